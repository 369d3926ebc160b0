"""`nr-study bench`: every row is produced with the right keys (no timing thresholds: speed goals live in the
bench itself), the JSON file is written, and the small helpers behave."""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from nr_study import bench

REPO = Path(__file__).resolve().parents[1]
ROW_KEYS = {"name", "value", "goal", "unit", "detail"}
EXPECTED = {
    "step_nr/plain[vgg_small]": 1.03, "util/step[vgg_small]": 0.01,
    "step_nr/plain[resnet164_cifar]": 1.03, "util/step[resnet164_cifar]": 0.01,
    "step_channels_last/contiguous[vgg_small]": None, "step_channels_last/contiguous[resnet164_cifar]": None,
    "step_bf16/fp32[vgg_small]": None, "step_bf16/fp32[resnet164_cifar]": None,
    "surgery_s[resnet50]": 0.5, "surgery_s[vgg19_bn_cifar]": 0.5,
    "layer_ca_two/plain": 1.3, "layer_ca_four/plain": 1.3, "layer_cr/plain": 1.3, "layer_ca_two/ca_four": None,
    "ca_nest_3/1": None, "step_odd/round8": None,
    "step_redo/plain[vgg_small]": 1.03, "step_cbp/plain[vgg_small]": 1.10,
    "step_redo/plain[resnet164_cifar]": 1.03, "step_cbp/plain[resnet164_cifar]": 1.10,
    "step_heads_separate/joint[vgg_small]": 1.05,
    "step_heads_separate/joint[resnet164_cifar]": None,  # two heads are refused on ResNet: said, not timed
    "sweep_makespan/ideal": 1.10, "sweep_makespan/ideal[reuse_actors]": 1.10, "mlflow_share": 0.02,
    "run_nr/bl": 1.10, "run_nr_round8/bl": None, "step_rejuvenated/bl": None, "run_gap_by_part": None,
}


@pytest.mark.slow
def test_quick_bench_produces_every_row_and_the_json(tmp_path):
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, "-m", "nr_study.cli", "bench", "--quick", "--tiny", "--threads", "1", "--json", str(out)],
        cwd=tmp_path, capture_output=True, text=True, timeout=600,
        env={**__import__("os").environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads(out.read_text())
    assert isinstance(rows, list)
    by_name = {r["name"]: r for r in rows}
    assert set(by_name) == set(EXPECTED), sorted(set(by_name) ^ set(EXPECTED))
    for r in rows:
        assert set(r) == ROW_KEYS, r
        assert r["goal"] == EXPECTED[r["name"]]
        assert r["value"] is None or (isinstance(r["value"], (int, float)) and math.isfinite(r["value"])), r
        assert isinstance(r["unit"], str) and r["unit"] and isinstance(r["detail"], str) and r["detail"]
        assert not r["detail"].startswith("failed:"), r  # nothing crashed; a null must say why
    # every measured row has a number; in --tiny only the sweep is skipped, and it says so
    sweeps = ("sweep_makespan/ideal", "sweep_makespan/ideal[reuse_actors]")
    assert all(by_name[n]["value"] is None and by_name[n]["detail"] == "skipped in --tiny" for n in sweeps)
    # --tiny's width-4 net has no widths in multiples of 8 within its budget: the core refuses, the row says so
    r8 = by_name["run_nr_round8/bl"]
    assert r8["value"] is not None or r8["detail"].startswith("not measured: NR with nr.round_to 8 does not run"), r8
    refused = by_name["step_heads_separate/joint[resnet164_cifar]"]
    assert refused["value"] is None and refused["detail"].startswith("not applicable: nr.cr_heads: separate: ")
    assert all(r["value"] is not None for n, r in by_name.items()
               if n not in sweeps + ("run_nr_round8/bl", "step_heads_separate/joint[resnet164_cifar]"))
    assert "1 rejuvenation" in by_name["run_nr/bl"]["detail"] or "[1]" in by_name["run_nr/bl"]["detail"]
    gap = by_name["run_gap_by_part"]["detail"]  # every part of the loop is accounted for
    for part in ("setup", "steps", "method_l1", "method_events", "adopt", "eval", "checkpoint", "tracking", "finish",
                 "rest"):
        assert f" {part} " in gap, (part, gap)
    # the table on stdout has a goal met/missed column and one line per row
    lines = proc.stdout.splitlines()
    assert "goal met" in lines[0]
    for name in EXPECTED:
        assert any(ln.startswith(name + " ") for ln in lines), name


@pytest.mark.parametrize("args, says", [
    (["--threads", "0"], "error: --threads 0: not allowed; allowed: an integer from 1 to"),
    (["--threads", "-3"], "error: --threads -3: not allowed; allowed: an integer from 1 to"),
    (["--json", "{tmp}"], "error: --json {tmp}: is a folder; allowed: a file path"),
    (["--json", "{tmp}/file.txt/rows.json"], "error: --json {tmp}/file.txt/rows.json: its folder {tmp}/file.txt: exists but is not a folder"),
])
def test_bad_arguments_are_refused_before_any_measurement(args, says, tmp_path):
    (tmp_path / "file.txt").write_text("a file where a folder is asked for")
    args = [a.format(tmp=tmp_path) for a in args]
    proc = subprocess.run([sys.executable, "-m", "nr_study.cli", "bench", "--tiny", "--only", "layer", *args],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300,
                          env={**__import__("os").environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(says.format(tmp=tmp_path)), proc.stderr
    assert "[bench]" not in proc.stdout + proc.stderr  # nothing was measured


def test_alternate_rotates_the_order_and_times_every_rep():
    calls = []
    fns = {k: (lambda k=k: calls.append(k)) for k in "abc"}
    times = bench.alternate(fns, reps=3, warmup=1, device=torch.device("cpu"))
    assert calls == list("abc") + list("abc") + list("bca") + list("cab")
    assert {k: len(v) for k, v in times.items()} == {"a": 3, "b": 3, "c": 3}


def test_ratio_stats_is_the_median_of_paired_ratios():
    med, text = bench.ratio_stats([2.0, 4.0, 9.0, 3.0], [1.0, 2.0, 3.0, 3.0])
    assert med == pytest.approx(2.0)  # ratios 2, 2, 3, 1
    assert "IQR" in text and "n=4" in text
    med, text = bench.ratio_stats([1.0, 3.0], [1.0, 1.0])
    assert med == pytest.approx(2.0) and "min–max 1.000–3.000" in text


def test_status_and_table():
    rows = [bench.row("a", 0.5, 1.0, "ratio", "x"), bench.row("b", 2.0, 1.0, "s", "y"),
            bench.row("c", None, 1.0, "ratio", "why"), bench.row("d", 3.0, None, "img/s", "info"),
            bench.row("e", float("nan"), 1.0, "ratio", "nan becomes null")]
    assert [bench.status(r) for r in rows] == ["met", "MISSED", "n/a", "-", "n/a"]
    assert rows[4]["value"] is None
    table = bench.format_table(rows)
    assert "goal met" in table.splitlines()[0] and "null" in table


def test_instrument_tracker_times_calls_and_restores_the_class(tracking_uri):
    from nr_study.tracking import RunTracker

    before = dict(RunTracker.__dict__)
    with bench.instrument_tracker() as acc:
        t = RunTracker(tracking_uri, experiment="bench-test")
        t.start()
        t.log_epoch(1, {"test_err": 1.0})
        t.end()
    assert acc["calls"] == 4 and acc["total"] > 0
    assert set(acc["by"]) == {"__init__", "start", "log_epoch", "end"}
    assert dict(RunTracker.__dict__) == before


def test_kill_channels_makes_thirty_percent_dead():
    from nr_study.models import create_model
    from nr_study.nr import build_graph, live_masks

    model = create_model("vgg_small", num_classes=10, in_channels=3, width=8)
    graph = build_graph(model, (1, 3, 16, 16))
    n = bench.kill_channels(model, graph, 0.3)
    masks = live_masks(model, graph)
    dead = sum(int((~m).sum()) for m in masks.values())
    total = sum(g.width for g in graph.free_groups())
    assert dead == n and 0.25 <= n / total <= 0.35


def test_breakdown_row_is_medians_of_paired_differences():
    walls = {"NR": [3.0, 5.0, 4.0], "BL": [2.0, 2.0, 3.0]}  # gaps 1, 3, 1
    phases = {"NR": [{"steps": 2.0, "adopt": 0.5}, {"steps": 3.0, "adopt": 1.5}, {"steps": 2.5, "adopt": 0.2}],
              "BL": [{"steps": 1.9}, {"steps": 1.8}, {"steps": 2.4}]}
    r = bench.breakdown_row(walls, phases)
    assert r["value"] == 1.0 and r["unit"] == "s"
    assert "adopt +0.50s, steps +0.10s" in r["detail"] and "+50.0% of BL's 2.00s" in r["detail"]
