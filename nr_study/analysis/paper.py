"""The paper's numbers as data: nr_study/analysis/paper_results.yaml, read into Paper (Tables 1-5, each cell's
values as printed and parsed, the CPU-scale analogues' specs, the architecture aliases).

Read by the table builders (nr_study.analysis.builders) and the plots (the paper's points); no MLflow here.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nr_study.analysis.runs import norm
from nr_study.files import read_yaml

PAPER_YAML = Path(__file__).with_name("paper_results.yaml")
VALUE_NAMES = {"top1": "Top-1", "top5": "Top-5", "params": "Params", "flops": "FLOPs"}  # a paper entry's values
UNIT_SCALE = {"K": 1e3, "M": 1e6, "G": 1e9, "T": 1e12}
FIGURE1_TABLES = ("figure1", "fig1")  # the nr.table tags `nr-study plots` draws as the paper's Figure 1


@dataclass
class PaperValue:
    text: str | None  # as printed in the paper ("30.30", "7.92M"); None = "—"
    value: float | None  # parsed, in base units (errors in %, params/FLOPs as counts)
    unit: str = ""  # "", "M", "G"


def parse_paper_value(raw: Any) -> PaperValue:
    if raw is None:
        return PaperValue(None, None)
    text = str(raw).strip()
    m = re.fullmatch(r"([-+]?\d+(?:\.\d+)?)\s*([KMGT]?)(%?)", text)
    if not m:
        raise ValueError(f"paper value {text!r} is not a number")
    unit = m.group(2)
    return PaperValue(text, float(m.group(1)) * UNIT_SCALE.get(unit, 1.0), unit)


@dataclass
class PaperEntry:
    table: str
    cell: str
    row: str
    col: str
    attrs: dict[str, Any]
    values: dict[str, PaperValue]
    reference: str | None = None


@dataclass
class PaperTable:
    key: str
    title: str
    caption: str
    row_label: str
    values: list[str]
    entries: list[PaperEntry]
    extra: dict[str, dict[str, str]] = field(default_factory=dict)  # e.g. relative_gain per row
    halves: int = 1

    def entry(self, cell: str) -> PaperEntry | None:
        for e in self.entries:
            if norm(e.cell) == norm(cell):
                return e
        return None


@dataclass
class Paper:
    tables: dict[str, PaperTable]
    cpu_tables: dict[str, dict[str, Any]]
    arch_aliases: dict[str, set[str]]

    def arch_matches(self, paper_arch: str | None, run_arch: str | None) -> bool:
        if paper_arch is None:
            return True
        if run_arch is None:
            return False
        names = self.arch_aliases.get(paper_arch, set()) | {norm(paper_arch)}
        return norm(run_arch) in names

    def entries(self) -> list[PaperEntry]:
        return [e for t in self.tables.values() for e in t.entries]


def load_paper(path: str | Path = PAPER_YAML) -> Paper:
    data = read_yaml(path, "paper results file")
    aliases = {k: {norm(a) for a in v} | {norm(k)} for k, v in (data.get("arch_aliases") or {}).items()}
    tables: dict[str, PaperTable] = {}
    for key, t in data["tables"].items():
        defaults = dict(t.get("defaults") or {})
        entries = []
        for raw in t["entries"]:
            attrs = {**defaults, **{k: v for k, v in raw.items() if k not in ("cell", "row", "col", "reference", *VALUE_NAMES)}}
            values = {v: parse_paper_value(raw.get(v)) for v in t["values"]}
            entries.append(
                PaperEntry(key, str(raw["cell"]), str(raw["row"]), str(raw.get("col") or ""), attrs, values, raw.get("reference"))
            )
        extra = {"relative_gain": t["relative_gain"]} if "relative_gain" in t else {}
        tables[key] = PaperTable(key, t["title"], t.get("caption", ""), t.get("row_label", ""), list(t["values"]), entries,
                                 extra, int(t.get("halves", 1)))
    return Paper(tables, dict(data.get("cpu_tables") or {}), aliases)

