"""nr_study/analysis/paper_results.yaml against the paper's text: every number is found there, and the derived
numbers the paper prints (Table 2's relative gains, Table 5's gains) follow from the transcribed cells."""
from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from nr_study.analysis.paper import load_paper

ROOT = Path(__file__).resolve().parents[1]
# The paper's text is not in the repository. It is found at $NR_STUDY_PAPER, else in shared/paper/ beside the
# checkout (../shared, where CI keeps it) or inside it. .ci/run sets NR_STUDY_PAPER when ../shared exists, so on
# CI a missing paper fails these tests instead of skipping them.
PAPER_NAME = "neural_rejuvenation_cvpr2019.txt"
REQUIRED = os.environ.get("NR_STUDY_PAPER")
CANDIDATES = [Path(REQUIRED)] if REQUIRED else [ROOT.parent / "shared" / "paper" / PAPER_NAME,
                                                 ROOT / "shared" / "paper" / PAPER_NAME]
PAPER_TXT = next((p for p in CANDIDATES if p.is_file()), None)


@pytest.fixture(scope="module")
def paper():
    return load_paper()


@pytest.fixture(scope="module")
def text():
    if PAPER_TXT is None and REQUIRED:
        pytest.fail(f"NR_STUDY_PAPER={REQUIRED}: no such file (the paper text {PAPER_NAME})")
    if PAPER_TXT is None:
        pytest.skip(f"paper text not found: put {PAPER_NAME} in {CANDIDATES[0].parent} (shared/paper beside the "
                    f"repository) or set NR_STUDY_PAPER=FILE to run these tests")
    return PAPER_TXT.read_text(encoding="utf-8")


def _in_text(text: str, number: str) -> bool:
    return re.search(rf"(?<![\d.]){re.escape(number)}(?![\d])", text) is not None


# (table, cell, value, as printed): a sample across all five tables, checked one by one
SAMPLE = [
    ("table1", "BL", "top1", "32.13"), ("table1", "NR-CA-BR", "top5", "10.58"), ("table1", "NR-IP", "top1", "31.35"),
    ("table1", "NR+DSD", "top5", "9.94"), ("table2", "densenet121/BL", "params", "7.92M"),
    ("table2", "vgg16/NR-params", "flops", "23.5G"), ("table2", "resnet18/BL", "top5", "10.7"),
    ("table2", "resnet50/NR-flops", "top1", "22.79"), ("table2", "resnet101/NR-flops", "params", "50.2M"),
    ("table3", "mobilenet_0.50/NR", "top1", "40.12"), ("table3", "mobilenet_0.25/MN-ref", "top1", "54.1"),
    ("table4", "vgg19/cifar100/SLIM", "params", "10.32M"), ("table4", "resnet164/cifar10/NR-CR", "top1", "5.13"),
    ("table4", "densenet100_40/cifar100/NR-CR", "top1", "18.59"), ("table5", "cifar10/nr5", "top1", "3.62"),
    ("table5", "cifar100/nr3", "top1", "19.91"),
]


@pytest.mark.parametrize("table,cell,value,printed", SAMPLE)
def test_sample_cells_match_paper_text(paper, text, table, cell, value, printed):
    entry = paper.tables[table].entry(cell)
    assert entry is not None, cell
    assert entry.values[value].text == printed
    assert _in_text(text, printed)


def test_every_number_is_in_the_paper_text(paper, text):
    missing = [(e.table, e.cell, k, v.text) for e in paper.entries() for k, v in e.values.items()
               if v.text is not None and not _in_text(text, v.text)]
    assert not missing


def test_tables_are_complete(paper):
    counts = {k: sum(v.text is not None for e in t.entries for v in e.values.values()) for k, t in paper.tables.items()}
    # Table 1: 10 methods x (top-1, top-5); Table 2: 6 archs x 3 settings x 4; Table 3: 2 x 4;
    # Table 4: 3 archs x 6 x (err, params); Table 5: 6 + 4 (C100 at 4 and 5 is "-")
    assert counts == {"table1": 20, "table2": 72, "table3": 8, "table4": 36, "table5": 10}
    for t in paper.tables.values():
        assert len({e.cell for e in t.entries}) == len(t.entries), t.key
        assert len({(e.row, e.col) for e in t.entries}) == len(t.entries), t.key


def test_table2_relative_gain_follows_from_cells(paper):
    t = paper.tables["table2"]
    for row, gain in t.extra["relative_gain"].items():
        top1 = {e.col: e.values["top1"].value for e in t.entries if e.row == row}
        best = min(top1["NR Params"], top1["NR FLOPs"])
        assert (best - top1["Baseline"]) / top1["Baseline"] * 100 == pytest.approx(float(gain.rstrip("%")), abs=0.015)


def test_table5_gains_as_stated(paper):
    t = paper.tables["table5"]
    c10 = [e.values["top1"].value for e in t.entries if e.row == "C10"]
    c100 = [e.values["top1"].value for e in t.entries if e.row == "C100" and e.values["top1"].value is not None]
    assert c10 == sorted(c10, reverse=True)  # "the improvement trends are clear"
    assert (c10[0] - min(c10)) / c10[0] * 100 == pytest.approx(33.5, abs=0.05)
    assert (c100[0] - min(c100)) / c100[0] * 100 == pytest.approx(13.8, abs=0.05)
    # the baseline column is Table 4's VGG-19 baseline, the 1-NR column Table 4's NR-CR
    t4 = paper.tables["table4"]
    assert t4.entry("vgg19/cifar10/BL").values["top1"].text == t.entry("cifar10/nr0").values["top1"].text
    assert t4.entry("vgg19/cifar100/NR-CR").values["top1"].text == t.entry("cifar100/nr1").values["top1"].text
