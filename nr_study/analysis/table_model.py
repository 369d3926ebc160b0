"""The table model every table kind builds and every output format renders: a Cell (the paper's number beside
the reproduced mean ± std (n)), how a cell's value is read from a run and printed, a Column, and BuiltTable.

Builders: nr_study.analysis.builders. Output formats (Markdown, LaTeX, CSV, HTML): nr_study.analysis.formats.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from nr_study.analysis.paper import UNIT_SCALE, VALUE_NAMES, PaperValue
from nr_study.analysis.runs import RunRecord
from nr_study.analysis.stats import DASH, Paired, mean_std

COLUMN_LABELS = {**VALUE_NAMES, "rejuvenations": "Rejuvenations", "relative_gain": "Relative Gain"}


# ---------------------------------------------------------------------------------------------------
# Cells
# ---------------------------------------------------------------------------------------------------
@dataclass
class Cell:
    """One value of one cell: the paper's number and the reproduced statistics."""

    paper: PaperValue
    mean: float | None = None
    std: float | None = None
    n: int = 0
    run_ids: list[str] = field(default_factory=list)

    @property
    def delta(self) -> float | None:
        if self.mean is None or self.paper.value is None:
            return None
        return self.mean - self.paper.value


def run_value(run: RunRecord, value: str, mode: str) -> float | None:
    if value == "top1":
        return run.error(mode, 1)
    if value == "top5":
        return run.error(mode, 5)
    if value == "params":
        return run.n_params()
    if value == "flops":
        return run.n_flops()
    if value == "rejuvenations":
        n = run.n_rejuvenations()
        return 0.0 if n is None and run.get("method") == "BL" else n
    raise KeyError(value)


def make_cell(paper: PaperValue, runs: list[RunRecord], value: str, mode: str) -> Cell:
    vals, ids = [], []
    for r in runs:
        v = run_value(r, value, mode)
        if v is not None:
            vals.append(v)
            ids.append(r.run_id)
    mean, std, n = mean_std(vals)
    return Cell(paper, mean, std, n, ids)


# ---------------------------------------------------------------------------------------------------
# How a cell prints
# ---------------------------------------------------------------------------------------------------
def _fmt_num(x: float, decimals: int) -> str:
    s = f"{x:.{decimals}f}"
    return s.replace("-", "−") if s.startswith("-") else s


def _auto_unit(x: float) -> str:
    ax = abs(x)
    for u in ("G", "M", "K"):
        if ax >= UNIT_SCALE[u]:
            return u
    return ""


def format_stat(value: str, mean: float | None, std: float | None, n: int, unit: str | None = None) -> str:
    """'31.90 ± 0.12 (3)'; params/FLOPs in `unit` (the paper's, else automatic): '9.98M ± 0.01M (3)'."""
    if mean is None or n == 0:
        return DASH
    if value in ("params", "flops"):
        unit = unit if unit is not None else _auto_unit(mean)
        scale = UNIT_SCALE.get(unit, 1.0)
        dec = 2 if abs(mean) / scale < 100 else 1
        body = f"{_fmt_num(mean / scale, dec)}{unit}"
        if std is not None:
            body += f" ± {std / scale:.{dec}f}{unit}"
    else:
        body = _fmt_num(mean, 2)
        if std is not None:
            body += f" ± {std:.2f}"
    return f"{body} ({n})"


def format_delta(value: str, cell: Cell) -> str:
    d = cell.delta
    if d is None:
        return DASH
    if value in ("params", "flops"):
        unit = cell.paper.unit
        scale = UNIT_SCALE.get(unit, 1.0)
        s = f"{d / scale:+.2f}{unit}"
    else:
        s = f"{d:+.2f}"
    return s.replace("-", "−")


def cell_parts(value: str, cell: Cell, with_paper: bool = True) -> list[str]:
    stat = format_stat(value, cell.mean, cell.std, cell.n, cell.paper.unit if cell.paper.text else None)
    if not with_paper:
        return [stat]
    return [cell.paper.text or DASH, stat, format_delta(value, cell)]


# ---------------------------------------------------------------------------------------------------
# Built tables (layout-agnostic: the output formats render them)
# ---------------------------------------------------------------------------------------------------
@dataclass
class Column:
    group: str  # the paper's column ("NR Params", "Baseline C10", "" when the table has only values)
    value: str  # "top1" | "top5" | "params" | "flops" | "relative_gain"
    single: bool = False  # the table has one value per column group: the group alone is the label

    @property
    def label(self) -> str:
        name = COLUMN_LABELS.get(self.value, self.value)
        if self.single and self.group:
            return self.group
        return f"{self.group} {name}".strip() if self.group else name


@dataclass
class BuiltTable:
    name: str
    title: str
    caption: str
    row_label: str
    rows: list[str]
    columns: list[Column]
    cells: dict[tuple[str, str, str], Cell]  # (row, group, value) -> Cell
    cell_ids: dict[tuple[str, str], str]  # (row, group) -> cell id
    with_paper: bool = True
    reference_rows: dict[str, dict[tuple[str, str], PaperValue]] = field(default_factory=dict)
    derived: dict[tuple[str, str], tuple[str, str, str]] = field(default_factory=dict)  # (row, col label) -> parts
    paired_rows: dict[str, dict[tuple[str, str], Paired]] = field(default_factory=dict)  # label -> (group, value)
    paired_cells: dict[tuple[str, str], Paired] = field(default_factory=dict)  # (row, "paired:<baseline>")
    notes: list[str] = field(default_factory=list)
    metric: str = "final"
    n_runs: int = 0
    halves: int = 1  # rows printed in this many side-by-side blocks (Table 1)

    def cell(self, row: str, group: str, value: str) -> Cell | None:
        return self.cells.get((row, group, value))

    def parts(self, row: str, col: Column) -> list[str] | None:
        if col.value == "relative_gain":
            return list(self.derived.get((row, "relative_gain"), (DASH, DASH, DASH)))
        if col.value.startswith("paired:"):
            pr = self.paired_cells.get((row, col.value))
            return [pr.text() if pr else DASH]
        c = self.cells.get((row, col.group, col.value))
        if c is None:
            return None
        return cell_parts(col.value, c, self.with_paper)

    def legend(self) -> str:
        what = "final epoch" if self.metric == "final" else "best epoch"
        if self.with_paper:
            return (f"Each cell: paper | reproduced mean ± std (n) | Δ = reproduced − paper; errors in % at the {what}; "
                    f"— = no run / not in the paper. {self.n_runs} FINISHED run(s) used.")
        paired = (" Paired: Δ = method − baseline in points, per seed (a seed's runs averaged), mean "
                  "[95 % t interval] (n seeds); compute = the method's training multiply-adds / its baseline's."
                  if self.paired_rows or any(c.value.startswith("paired:") for c in self.columns) else "")
        refs = " Reference rows: the paper's numbers for the analogous setting." if self.reference_rows else ""
        return (f"Each cell: reproduced mean ± std (n); errors in % at the {what}; — = no run.{refs}{paired} "
                f"{self.n_runs} FINISHED run(s) used.")

