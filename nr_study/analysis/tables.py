"""`nr-study tables`: the paper's tables, paper numbers beside the reproduced ones.

Each paper table (Tables 1-5 of the paper, numbers in nr_study/analysis/paper_results.yaml) is rebuilt in the paper's
layout from the FINISHED MLflow runs tagged `nr.table` = `table1` ... `table5`. A run lands in the cell whose
id equals its `nr.cell` tag (ids listed in paper_results.yaml, e.g. `resnet50/NR-params`, `vgg19/cifar10/NR-CR`,
`cifar100/nr3`); a run without a known `nr.cell` is matched on its tags `nr.arch`, `nr.dataset`,
`nr.method`, `nr.constraint` (and, for Table 5, its number of rejuvenations); a run matching no cell or
several is listed in the table's notes, never guessed into one.

Each cell reads `paper | reproduced mean ± std (n) | Δ` with Δ = reproduced mean − paper; "—" where there
is nothing (no run, or no paper number). n = the number of FINISHED runs in the cell that logged the value;
std is the sample std (n − 1), left out when n = 1. Values: top-1 / top-5 error (%) at the final epoch
(`--metric final`: the last step of `test_err` / `test_err5`, else the summary `final_test_err`) or the
best epoch (`--metric best`); params / FLOPs = the summaries `final_params` / `final_flops` (else the last
per-epoch `params` / `flops`), shown in the paper's units (M, G).

The CPU-scale analogues (`nr.table` = `fmnist_table4`, `fmnist_table5`) are tables of their own: rows are
(arch, dataset) found in the runs, columns are methods (fmnist_table4) or numbers of rejuvenations
(fmnist_table5), cells are `mean ± std (n)`, and the paper's analogous row is printed underneath for reference.
Their paired rows compare each column with the table's baseline column (`baseline`, `compare` in
paper_results.yaml): per seed, method − baseline, mean with a 95 % t interval and n seeds, at equal epochs
(same train.epochs) and/or equal training compute (the baseline's logged train_flops within ±10 % of the run's:
|base − run| ≤ 0.1 · run); a run with no partner at that basis is named in the notes. Any other `nr.table` tag
(a sweep's own, e.g. the demo's) gets a table of its cells: error, params, FLOPs, rejuvenations and a paired Δ
column per BL cell. Every table's notes say what each method trained for (its total epochs), so the budget a
comparison stands on is on the page.

In every table a cell holds runs of one configuration (runs.configuration: the logged params but
seed, paths and tracking): a cell whose runs differ in more is split, labelled by the keys that differ
('BL [width=11]'; the paper tables, whose layout is fixed, leave it empty), and said so in the notes. A pair
is two runs of one seed that differ only in what the method defines (method, nr.*, fs.*, slim.*, the
after-rejuvenation protocol), never in model, data, optimiser or training settings, but for what the
comparison names: equal compute lets train.epochs differ, and a sweep table's cell named 'BL,width=11' is
compared across model.kwargs.width.

Outputs under --out (default <runs folder>/report): tables/<name>.md, .tex, .csv, .html, tables/manifest.json,
plus the index page (report.md, index.html) over everything in --out.
"""
from __future__ import annotations

import argparse
import csv
import html
import io
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nr_study.analysis.runs import (NR_METHODS, RunRecord, RunStore, configuration, default_tracking_uri, norm,
                                    rejuvenation_count, runs_folder, to_float)
from nr_study.analysis.stats import (COMPUTE_TOLERANCE, DASH, Paired, equal_compute, mean_std, paired_t, seed_means,
                                     t_interval)
from nr_study.cli_parser import CommandParser
from nr_study.methods import METHODS
from nr_study.errors import ConfigError
from nr_study.files import read_yaml
from nr_study.labels import _num, distinct_labels, fmt_value, short_key, varying_keys
from nr_study.names import DELTA_METRIC

PAPER_YAML = Path(__file__).with_name("paper_results.yaml")
VALUE_NAMES = {"top1": "Top-1", "top5": "Top-5", "params": "Params", "flops": "FLOPs"}  # a paper entry's values
COLUMN_LABELS = {**VALUE_NAMES, "rejuvenations": "Rejuvenations", "relative_gain": "Relative Gain"}
UNIT_SCALE = {"K": 1e3, "M": 1e6, "G": 1e9, "T": 1e12}
MATCH_ATTRS = ("arch", "dataset", "method", "constraint", "rejuvenations")
METRIC_MODES = ("final", "best")


# ---------------------------------------------------------------------------------------------------
# Paper data
# ---------------------------------------------------------------------------------------------------
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
# Paired comparisons against the baseline
# ---------------------------------------------------------------------------------------------------
COMPARE_BASES = ("equal_epochs", "equal_compute")
BASIS_TEXT = {
    "equal_epochs": "equal epochs (a baseline run with the same seed and the same configuration but the method's own "
                    "settings: the same data, model, optimiser and train.epochs)",
    "equal_compute": "equal training compute (a baseline run with the same seed and the same configuration but the "
                     "method's own settings and train.epochs, whose logged train_flops are within "
                     f"±{COMPUTE_TOLERANCE:.0%} of the run's, |base − run| ≤ {COMPUTE_TOLERANCE:g} · run: a baseline "
                     "trained as long as the run was)",
}


def _train_flops(run: RunRecord) -> float | None:
    return run.final("train_flops")


BASIS_MAY_DIFFER = {"equal_epochs": (), "equal_compute": ("train.epochs",)}  # a longer-trained baseline is the point


def pair_differs(run: RunRecord, base: RunRecord, basis: str, named: tuple[str, ...] = ()) -> list[str]:
    """The keys that keep `base` from being `run`'s pair: the configuration (configuration(method=False):
    model, data, optimiser, training) must be the same, but for what the basis or the table names as the
    comparison (`named`, e.g. a width-scaled baseline's model.kwargs.width)."""
    a, b = configuration(run, method=False), configuration(base, method=False)
    allowed = (*BASIS_MAY_DIFFER[basis], *named)
    return [k for k in sorted({*a, *b}) if a.get(k) != b.get(k) and k not in allowed]


def _is_pair(run: RunRecord, base: RunRecord, basis: str, named: tuple[str, ...] = ()) -> bool:
    if pair_differs(run, base, basis, named):
        return False
    if basis == "equal_epochs":
        return run.params.get("train.epochs") is not None and run.params.get("train.epochs") == base.params.get("train.epochs")
    a, b = _train_flops(run), _train_flops(base)
    return a is not None and b is not None and equal_compute(a, b)


def paired_difference(runs: list[RunRecord], baselines: list[RunRecord], basis: str, value: str,
                      mode: str, named: tuple[str, ...] = ()) -> tuple[Paired, list[str]]:
    """Pair every run with the baseline runs of its seed and configuration that meet `basis` (_is_pair); a
    seed's runs on either side are averaged, so n counts seeds. Runs with no partner are listed in the notes
    (with the keys the seed's baselines differ in), never paired by guess."""
    by_seed: dict[str, tuple[list[float], list[float], list[float]]] = {}
    notes = []
    for r in runs:
        v, seed = run_value(r, value, mode), r.get("seed")
        if v is None or seed is None:
            continue
        same_seed = [b for b in baselines if b.get("seed") == seed]
        partners = [b for b in same_seed if _is_pair(r, b, basis, named)]
        vals = [bv for b in partners if (bv := run_value(b, value, mode)) is not None]
        if not vals:
            differ = sorted({k for b in same_seed for k in pair_differs(r, b, basis, named)})
            why = f" of its configuration (the seed's baselines differ in {', '.join(differ)})" if differ else ""
            notes.append(f"run {r.run_id[:8]} (seed {seed}): no baseline run at {basis.replace('_', ' ')}{why}; not paired")
            continue
        mine, theirs, ratios = by_seed.setdefault(seed, ([], [], []))
        mine.append(v)
        theirs.append(sum(vals) / len(vals))
        flops = [f for b in partners if (f := _train_flops(b))]
        if _train_flops(r) and flops:
            ratios.append(_train_flops(r) / (sum(flops) / len(flops)))
    out = paired_t({seed: (m, b) for seed, (m, b, _) in by_seed.items()})
    ratios = [x for _, _, rs in by_seed.values() for x in rs]
    out.compute_ratio = sum(ratios) / len(ratios) if ratios else None
    return out, notes


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
# Built tables (layout-agnostic model + renderers)
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

    # --- renderers ----------------------------------------------------------------------------
    def _grid(self, sep: str) -> tuple[list[str], list[list[str]]]:
        header = [self.row_label] + [c.label for c in self.columns]
        body = []
        for row in self.rows:
            line = [row]
            for col in self.columns:
                p = self.parts(row, col)
                line.append(DASH if p is None else sep.join(p))
            body.append(line)
        for ref_label, vals in self.reference_rows.items():
            line = [ref_label]
            for col in self.columns:
                pv = vals.get((col.group, col.value))
                line.append(pv.text if pv is not None and pv.text else DASH)
            body.append(line)
        for label, vals in self.paired_rows.items():
            body.append([label] + [vals[(c.group, c.value)].text() if (c.group, c.value) in vals else DASH
                                   for c in self.columns])
        if self.halves > 1 and body:
            per = -(-len(body) // self.halves)
            blocks = [body[i * per:(i + 1) * per] for i in range(self.halves)]
            blank = [""] * len(header)
            body = [sum((b[i] if i < len(b) else blank for b in blocks), []) for i in range(per)]
            header = header * self.halves
        return header, body

    def to_markdown(self) -> str:
        header, body = self._grid(" \\| ")
        out = [f"## {self.title}", "", self.caption, "", f"_{self.legend().replace('|', chr(92) + '|')}_", ""]
        out.append("| " + " | ".join(header) + " |")
        out.append("|" + "|".join([":---"] + [":---:"] * (len(header) - 1)) + "|")
        out += ["| " + " | ".join(line) + " |" for line in body]
        if self.notes:
            out += ["", "Notes:", ""] + [f"- {n}" for n in self.notes]
        return "\n".join(out) + "\n"

    def _group_spans(self) -> list[tuple[str, int]]:
        """Consecutive columns of one paper column group: [(group, how many columns)]."""
        spans: list[tuple[str, int]] = []
        for c in self.columns:
            g = c.group if not c.single else ""
            if spans and spans[-1][0] == g and g:
                spans[-1] = (g, spans[-1][1] + 1)
            else:
                spans.append((g, 1))
        return spans

    def to_latex(self) -> str:
        header, body = self._grid(" $\\mid$ ")

        def tex(s: str) -> str:
            s = s.replace("\\", "\\textbackslash{}") if "$\\mid$" not in s else s
            for a, b in (("%", "\\%"), ("&", "\\&"), ("#", "\\#"), ("_", "\\_")):
                s = s.replace(a, b)
            return s.replace("±", "$\\pm$").replace("−", "$-$").replace("—", "---").replace("Δ", "$\\Delta$")

        lines = [
            "% generated by nr-study tables; " + tex(self.legend()),
            "\\begin{table}[t]",
            "\\centering\\scriptsize",
            "\\begin{tabular}{" + ("l" + "c" * len(self.columns)) * self.halves + "}",
            "\\hline",
        ]
        spans = self._group_spans()
        if self.halves == 1 and any(n > 1 for _, n in spans):  # two header rows: groups, then values
            top, clines, col = [""], [], 2
            for group, n in spans:
                top.append(f"\\multicolumn{{{n}}}{{c}}{{{tex(group)}}}" if n > 1 else tex(group))
                if n > 1:
                    clines.append(f"\\cline{{{col}-{col + n - 1}}}")
                col += n
            names = [tex(self.row_label)] + [tex(VALUE_NAMES.get(c.value, c.label) if c.group and not c.single else c.label)
                                             for c in self.columns]
            lines += [" & ".join(top) + " \\\\", " ".join(clines), " & ".join(names) + " \\\\", "\\hline"]
        else:
            lines += [" & ".join(tex(h) for h in header) + " \\\\", "\\hline"]
        lines += [" & ".join(tex(c) for c in line) + " \\\\" for line in body]
        lines += ["\\hline", "\\end{tabular}", f"\\caption{{{tex(self.title)}. {tex(self.caption)}}}",
                  f"\\label{{tab:{self.name}}}", "\\end{table}"]
        return "\n".join(lines) + "\n"

    def records(self) -> list[dict[str, Any]]:
        """Tidy rows for the CSV: one per (row, column) value."""
        out = []
        for row in self.rows:
            for col in self.columns:
                if col.value.startswith("paired:"):
                    pr = self.paired_cells.get((row, col.value))
                    if pr:
                        out.append(self._paired_record(row, col.group, col.value, pr))
                    continue
                if col.value == "relative_gain":
                    p = self.derived.get((row, col.value))
                    if p:
                        out.append({"table": self.name, "cell": "", "row": row, "column": col.group, "value": col.value,
                                    "paper": p[0], "mean": p[1], "std": "", "n": "", "delta": p[2], "text": " | ".join(p),
                                    "kind": "derived", "run_ids": ""})
                    continue
                c = self.cells.get((row, col.group, col.value))
                if c is None:
                    continue
                out.append({
                    "table": self.name, "cell": self.cell_ids.get((row, col.group), ""), "row": row, "column": col.group,
                    "value": col.value, "paper": "" if c.paper.value is None else c.paper.value,
                    "mean": "" if c.mean is None else c.mean, "std": "" if c.std is None else c.std, "n": c.n,
                    "delta": "" if c.delta is None else c.delta, "text": " | ".join(cell_parts(col.value, c, self.with_paper)),
                    "kind": "cell", "run_ids": " ".join(c.run_ids),
                })
        for ref_label, vals in self.reference_rows.items():
            for (group, value), pv in vals.items():
                out.append({"table": self.name, "cell": "", "row": ref_label, "column": group, "value": value,
                            "paper": "" if pv.value is None else pv.value, "mean": "", "std": "", "n": "", "delta": "",
                            "text": pv.text or DASH, "kind": "paper_reference", "run_ids": ""})
        for label, vals in self.paired_rows.items():
            out += [self._paired_record(label, group, value, pr) for (group, value), pr in vals.items()]
        return out

    def _paired_record(self, row: str, column: str, value: str, pr: Paired) -> dict[str, Any]:
        blank = lambda x: "" if x is None else x  # noqa: E731
        return {"table": self.name, "cell": "", "row": row, "column": column, "value": value, "paper": "",
                "mean": blank(pr.mean), "std": "", "n": pr.n, "delta": "", "text": pr.text(), "kind": "paired",
                "run_ids": "", "ci_low": blank(pr.lo), "ci_high": blank(pr.hi), "compute_ratio": blank(pr.compute_ratio)}

    def to_csv(self) -> str:
        buf = io.StringIO()
        fields = ["table", "cell", "row", "column", "value", "paper", "mean", "std", "n", "delta", "text", "kind", "run_ids",
                  "ci_low", "ci_high", "compute_ratio"]
        w = csv.DictWriter(buf, fieldnames=fields, lineterminator="\n", restval="")
        w.writeheader()
        w.writerows(self.records())
        return buf.getvalue()

    def to_html(self) -> str:
        header, body = self._grid(" | ")
        h = [f"<h2 id='{self.name}'>{html.escape(self.title)}</h2>", f"<p>{html.escape(self.caption)}</p>",
             f"<p><em>{html.escape(self.legend())}</em></p>", "<table>",
             "<tr>" + "".join(f"<th>{html.escape(x)}</th>" for x in header) + "</tr>"]
        h += ["<tr>" + "".join(f"<td>{html.escape(x)}</td>" for x in line) + "</tr>" for line in body]
        h.append("</table>")
        if self.notes:
            h.append("<ul>" + "".join(f"<li>{html.escape(n)}</li>" for n in self.notes) + "</ul>")
        return "\n".join(h) + "\n"


# ---------------------------------------------------------------------------------------------------
# Building
# ---------------------------------------------------------------------------------------------------
def entry_matches(paper: Paper, entry: PaperEntry, run: RunRecord) -> bool:
    a = entry.attrs
    if not paper.arch_matches(a.get("arch"), run.get("arch")):
        return False
    for key in ("dataset", "method"):
        want = a.get(key)
        if want is not None and norm(run.get(key) or "") != norm(want):
            return False
    # constraint: only where the run has one (the trainer tags "-" for methods without NR)
    if a.get("constraint") is not None and run.get("constraint") is not None and norm(run.get("constraint")) != norm(a["constraint"]):
        return False
    if a.get("rejuvenations") is not None:
        count, _ = rejuvenation_count(run)
        if count != int(a["rejuvenations"]):
            return False
    return True


def assign_runs(paper: Paper, table: PaperTable, runs: list[RunRecord]) -> tuple[dict[str, list[RunRecord]], list[str]]:
    """cell id -> runs, and notes on runs that fit no cell (or several)."""
    out: dict[str, list[RunRecord]] = {e.cell: [] for e in table.entries}
    notes = []
    for r in runs:
        tag = r.get("cell")
        entry = table.entry(tag) if tag else None
        if entry is None:
            cands = [e for e in table.entries if e.reference is None and entry_matches(paper, e, r)]
            if len(cands) == 1:
                entry = cands[0]
            else:
                why = "no cell" if not cands else f"{len(cands)} cells ({', '.join(e.cell for e in cands)})"
                tag_s = f"nr.cell={tag!r}, " if tag else ""
                notes.append(f"run {r.run_id[:8]} ({tag_s}arch={r.get('arch')}, dataset={r.get('dataset')}, "
                             f"method={r.get('method')}, constraint={r.get('constraint')}) matches {why}; not used")
                continue
        if entry.reference is not None:
            notes.append(f"run {r.run_id[:8]} is tagged {entry.cell!r}, a cited number ({entry.reference}); not used")
            continue
        if entry.attrs.get("rejuvenations") is not None:
            _, note = rejuvenation_count(r)
            if note:
                notes.append(note)
        out[entry.cell].append(r)
    return out, notes


def _missing_notes(runs_by_cell: dict[str, list[RunRecord]], values: list[str], mode: str) -> list[str]:
    notes = []
    for cell, runs in runs_by_cell.items():
        for r in runs:
            lacking = [v for v in values if run_value(r, v, mode) is None]
            if lacking:
                notes.append(f"run {r.run_id[:8]} in cell {cell!r} logged no {', '.join(lacking)}")
    return notes


def _status_note(store: RunStore, name: str) -> list[str]:
    skipped = store.not_finished({"table": name})
    if not skipped:
        return []
    by: dict[str, int] = {}
    for r in skipped:
        by[r.outcome] = by.get(r.outcome, 0) + 1
    note = "ignored runs that did not train to their end: " + ", ".join(f"{k} {v}" for k, v in sorted(by.items()))
    if "STOPPED EARLY" in by:
        note += " (stopped early by the sweep's scheduler: their error is from fewer epochs)"
    return [note]


def budget_note(runs: list[RunRecord]) -> list[str]:
    """What each method trained for, from the runs themselves: the training budget a table compares at."""
    by: dict[str, tuple[set[int], set[str]]] = {}
    for r in runs:
        epochs = r.final("total_epochs") or to_float(r.params.get("train.epochs"))
        if epochs is None:
            continue
        eps, protocols = by.setdefault(r.get("method") or "?", (set(), set()))
        eps.add(int(epochs))
        if r.get("method") in NR_METHODS and r.get("after_rejuvenation"):  # what a rejuvenation did to the epochs
            protocols.add(r.get("after_rejuvenation"))
    if not by:
        return []
    order = list(METHODS)
    parts = []
    for m, (eps, protocols) in sorted(by.items(), key=lambda kv: (order.index(kv[0]) if kv[0] in order else len(order), kv[0])):
        span = str(min(eps)) if len(eps) == 1 else f"{min(eps)}–{max(eps)}"
        parts.append(f"{m} {span}" + (f" (after_rejuvenation={', '.join(sorted(protocols))})" if protocols else ""))
    return ["training epochs by method: " + "; ".join(parts)]


def build_paper_table(paper: Paper, key: str, store: RunStore, mode: str = "final") -> BuiltTable:
    table = paper.tables[key]
    runs = store.finished({"table": key})
    by_cell, notes = assign_runs(paper, table, runs)
    for cell, rs in by_cell.items():  # the paper's layout has one place per cell: a mixed one is left empty
        note = mixed_note(cell, rs, "not shown, never averaged (give each its own nr.cell)")
        if note:
            notes.append(note)
            by_cell[cell] = []
    rows: list[str] = []
    groups: list[str] = []
    for e in table.entries:
        if e.row not in rows:
            rows.append(e.row)
        if e.col not in groups:
            groups.append(e.col)
    columns = [Column(g, v, single=len(table.values) == 1) for g in groups for v in table.values]
    cells, ids = {}, {}
    for e in table.entries:
        ids[(e.row, e.col)] = e.cell
        for v in table.values:
            cells[(e.row, e.col, v)] = make_cell(e.values[v], by_cell[e.cell], v, mode)
    built = BuiltTable(key, table.title, table.caption, table.row_label, rows, columns, cells, ids,
                       notes=_status_note(store, key) + budget_note(runs) + notes + _missing_notes(by_cell, table.values, mode), metric=mode,
                       n_runs=sum(len(v) for v in by_cell.values()), halves=table.halves)
    if "relative_gain" in table.extra:
        built.columns.append(Column("", "relative_gain"))
        for row in rows:
            built.derived[(row, "relative_gain")] = _relative_gain(built, row, table.extra["relative_gain"].get(row))
    return built


def _relative_gain(built: BuiltTable, row: str, paper_text: str | None) -> tuple[str, str, str]:
    """Table 2's last column: best relative top-1 gain of NR Params / NR FLOPs over the baseline, in %."""
    base = built.cell(row, "Baseline", "top1")
    nr = [c for g in ("NR Params", "NR FLOPs") if (c := built.cell(row, g, "top1")) is not None and c.mean is not None]
    repro = None
    if base is not None and base.mean and nr:
        repro = (min(c.mean for c in nr) - base.mean) / base.mean * 100.0
    paper_v = parse_paper_value(paper_text).value if paper_text else None
    rs = DASH if repro is None else f"{repro:+.2f}%".replace("-", "−")
    ds = DASH if repro is None or paper_v is None else f"{repro - paper_v:+.2f}".replace("-", "−")
    return (paper_text or DASH).replace("-", "−"), rs, ds


def build_cpu_table(paper: Paper, key: str, store: RunStore, mode: str = "final") -> BuiltTable:
    spec = paper.cpu_tables[key]
    values = list(spec.get("values") or ["top1"])
    runs = store.finished({"table": key})
    notes = _status_note(store, key) + budget_note(runs)
    col_by = spec.get("col_by", "method")
    by_row: dict[str, dict[str, list[RunRecord]]] = {}
    for r in runs:
        row = " / ".join(str(r.get(a) or "?") for a in spec.get("row_by", ["arch", "dataset"]))
        if col_by == "rejuvenations":
            count, note = rejuvenation_count(r)
            if note:
                notes.append(note)
            if count is None:
                notes.append(f"run {r.run_id[:8]}: number of rejuvenations unknown (no nr.cell 'nrK', no "
                             f"'rejuvenations' metric, no nr.max_rejuvenations param); not used")
                continue
            col = str(count)
        else:
            col = r.get(col_by)
            if col is None:
                notes.append(f"run {r.run_id[:8]}: no {col_by}; not used")
                continue
        by_row.setdefault(row, {}).setdefault(col, []).append(r)
    # A column holds one configuration: a method's runs that differ in more (a width-11 BL beside the width-16
    # one under the same nr.table) are split into columns labelled by what differs, never averaged.
    groups: dict[tuple[str, str], list[RunRecord]] = {}
    base_of: dict[str, str] = {}  # column label -> the method (or count) it is a configuration of
    for row, by_col in by_row.items():
        for col, rs in by_col.items():
            split, mixed = split_mixed_cells({col: rs}, unit="column")
            notes += [f"{row}: {n}" for n in mixed]
            for sub, srs in split.items():
                groups[(row, sub)] = srs
                base_of[sub] = col
    row_names = sorted(by_row)
    col_names = list(base_of)
    # The paper's analogous row, keyed by the same column attribute.
    ref_table = paper.tables.get(spec.get("analogue_of", ""))
    ref_vals: dict[tuple[str, str], PaperValue] = {}
    ref_label = None
    if ref_table is not None:
        refs = [e for e in ref_table.entries if e.row == spec.get("reference_row")
                and (spec.get("reference_dataset") is None or e.attrs.get("dataset") == spec["reference_dataset"])]
        for e in refs:
            col = str(e.attrs.get(col_by))
            if col_by == "method":
                col = next((c for c in base_of.values() if norm(c) == norm(col)), col)
            if col not in base_of.values():  # show the paper's columns even where no run exists yet
                base_of[col] = col
                col_names.append(col)
            for v in values:
                if v in e.values:
                    ref_vals[(col, v)] = e.values[v]
        if ref_vals:
            ds = refs[0].attrs.get("dataset") or ""
            ref_label = f"paper: {refs[0].attrs.get('arch', refs[0].row)} {ds} ({ref_table.key})".replace("  ", " ")
    order = [str(c) for c in spec.get("col_order", [])]
    if col_by == "rejuvenations":
        def rank(c):
            return (int(base_of[c]), c)
    else:
        def rank(c):
            return (order.index(base_of[c]) if base_of[c] in order else len(order), base_of[c], c)
    col_names.sort(key=rank)
    label = "# of NR" if col_by == "rejuvenations" else col_by.capitalize()
    group_of = (lambda c: f"{label} {c}") if col_by == "rejuvenations" else (lambda c: c)
    cells, ids = {}, {}
    for row in row_names:
        for col in col_names:
            ids[(row, group_of(col))] = f"{row}/{col}"
            for v in values:
                cells[(row, group_of(col), v)] = make_cell(PaperValue(None, None), groups.get((row, col), []), v, mode)
    columns = [Column(group_of(c), v, single=len(values) == 1) for c in col_names for v in values]
    ref_rows = ({ref_label: {(group_of(c), v): pv for c in col_names for (b, v), pv in ref_vals.items() if base_of[c] == b}}
                if ref_label else {})
    caption = (f"CPU-scale analogue of the paper's {spec.get('analogue_of', '')}: rows = "
               f"{' / '.join(spec.get('row_by', ['arch', 'dataset']))} from the runs, columns = {col_by}.")
    paired_rows: dict[str, dict[tuple[str, str], Paired]] = {}
    baseline = spec.get("baseline")
    if baseline is not None:
        baseline, bases = str(baseline), list(spec.get("compare") or ["equal_epochs"])
        bad = [b for b in bases if b not in COMPARE_BASES]
        if bad:
            raise ConfigError(f"{PAPER_YAML.name}: cpu_tables.{key}.compare: {bad[0]!r} is not allowed; allowed: "
                              f"{', '.join(COMPARE_BASES)}")
        for basis in bases:
            for row in row_names:
                base_runs = [r for c in col_names if base_of[c] == baseline for r in groups.get((row, c), [])]
                vals = {}
                for col in col_names:
                    if base_of[col] == baseline:
                        continue
                    for v in values:
                        if v in ("top1", "top5") and groups.get((row, col)):
                            # each run pairs only with the baseline runs of its own configuration (_is_pair)
                            vals[(group_of(col), v)], why = paired_difference(groups[(row, col)], base_runs, basis, v, mode)
                            notes += [w for w in why if w not in notes]
                paired_rows[f"Δ vs {group_of(baseline)}, {basis.replace('_', ' ')}: {row}"] = vals
        caption += (f" Paired rows compare each column with {group_of(baseline)} at "
                    + "; and at ".join(BASIS_TEXT[b] for b in bases) + ".")
    by_cell = {f"{r}/{c}": rs for (r, c), rs in groups.items()}
    return BuiltTable(key, spec.get("title", key), caption, "Architecture / dataset", row_names, columns, cells, ids,
                      with_paper=False, reference_rows=ref_rows, paired_rows=paired_rows,
                      notes=notes + _missing_notes(by_cell, values, mode), metric=mode,
                      n_runs=sum(len(v) for v in groups.values()))


def own_pair_difference(runs: list[RunRecord]) -> Paired:
    """The paired difference each run of a paired sweep measured against its own baseline (same seed, data,
    architecture, epochs): per seed (a seed's runs averaged), mean [95 % t interval] (n seeds)."""
    by_seed: dict[str, list[float]] = {}
    for r in runs:
        d = r.final(DELTA_METRIC)
        if d is not None:
            by_seed.setdefault(r.get("seed") or r.run_id, []).append(d)
    return t_interval(seed_means(by_seed))


def mixed_note(cell: str, runs: list[RunRecord], what: str) -> str | None:
    """A note when a cell's runs are more than one configuration (runs.configuration), else None."""
    confs = list({tuple(sorted(c.items())): c for c in map(configuration, runs)}.values())
    if len(confs) < 2:
        return None
    return f"cell {cell!r} holds {len(confs)} configurations (they differ in {', '.join(varying_keys(confs))}): {what}"


def split_mixed_cells(by_cell: dict[str, list[RunRecord]], unit: str = "row"
                      ) -> tuple[dict[str, list[RunRecord]], list[str]]:
    """A cell's runs are averaged as seeds of one configuration (runs.configuration); a cell name that
    several configurations share is split into one `unit` per configuration, labelled by the keys they differ
    in (nr_study.labels.distinct_labels: 'BL [width=11]'), and said so."""
    runs = [r for rs in by_cell.values() for r in rs]
    items = [(cell, configuration(r)) for cell, rs in by_cell.items() for r in rs]
    out: dict[str, list[RunRecord]] = {}
    for r, label in zip(runs, distinct_labels(items)):
        out.setdefault(label, []).append(r)
    notes = [n for cell, rs in by_cell.items() if (n := mixed_note(cell, rs, f"one {unit} each, never averaged"))]
    return out, notes


def named_keys(runs: list[RunRecord]) -> tuple[str, ...]:
    """The keys a cell's own name states with their value ('BL,width=11' for model.kwargs.width = 11, as the
    sweep names a variant): a comparison across them is one the table names, not an accident."""
    out = set()
    for r in runs:
        said = dict(t.split("=", 1) for t in re.split(r"[,\s]+", r.get("cell") or "") if "=" in t)
        out |= {k for k, v in configuration(r, method=False).items()
                if fmt_value(_num(v)) in (said.get(short_key(k)), said.get(k))}
    return tuple(sorted(out))


def build_cells_table(key: str, store: RunStore, mode: str = "final") -> BuiltTable:
    """A sweep's own table (an `nr.table` tag that is no paper table, e.g. the demo's): a row per cell (its
    `nr.cell` tag, else its method), error / params / FLOPs / rejuvenations as mean ± std (n), and a paired
    difference column per BL cell (the full BL, a width-scaled BL, ...) at equal epochs: a pair shares its
    seed and configuration (pair_differs) but for what the two cells' names state (named_keys). A paired sweep's
    runs (pair_with) add their difference to their own baseline, and the rows are sorted by it. Runs a
    scheduler stopped early are left out (their error is that of a shorter training), and said so."""
    runs = store.finished({"table": key})
    notes = _status_note(store, key) + budget_note(runs)
    by_cell: dict[str, list[RunRecord]] = {}
    for r in runs:
        by_cell.setdefault(r.get("cell") or r.get("method") or "?", []).append(r)
    by_cell, mixed = split_mixed_cells(by_cell)
    notes += mixed
    bases = sorted(c for c, rs in by_cell.items() if all(r.get("method") == "BL" for r in rs))  # e.g. a width-scaled BL too
    own = {c: own_pair_difference(rs) for c, rs in by_cell.items()}
    own = {c: p for c, p in own.items() if p.n}
    if runs and not bases and not own:
        notes.append("no BL cell: no paired column")
    rows = sorted(by_cell, key=lambda c: (c not in bases, own[c].mean if c in own else math.inf, c))
    values = ["top1", "params", "flops", "rejuvenations"]
    columns = [Column("", v) for v in values]
    if own:
        columns.append(Column("Δ vs its own paired BL", "paired:own", single=True))
    columns += [Column(f"Δ vs {b}, paired", f"paired:{b}", single=True) for b in bases]
    cells = {(row, "", v): make_cell(PaperValue(None, None), by_cell[row], v, mode) for row in rows for v in values}
    built = BuiltTable(key, f"Sweep table {key!r}", "", "Cell", rows, columns, cells, {(r, ""): r for r in rows},
                       with_paper=False, notes=notes + _missing_notes(by_cell, values[:3], mode), metric=mode,
                       n_runs=len(runs))
    captions = []
    if own:
        captions.append("Δ vs its own paired BL is each run's test error minus that of the BL the sweep trained "
                        "with the same seed, data, architecture and epochs (pair_with), at the last epoch; rows are "
                        "sorted by it")
    if bases:
        captions.append(f"The Δ vs <cell> columns compare each with a BL cell ({', '.join(bases)}) at "
                        f"{BASIS_TEXT['equal_epochs']}")
    if captions:
        built.caption = "Rows are the sweep's cells. " + ". ".join(captions) + "."
    for c, pr in own.items():
        built.paired_cells[(c, "paired:own")] = pr
    for b in bases:
        for row in rows:
            if row != b:
                # a pair crosses only what the two cells' own names state (BL,width=11 vs BL): a named comparison
                named = tuple(sorted({*named_keys(by_cell[row]), *named_keys(by_cell[b])}))
                pr, why = paired_difference(by_cell[row], by_cell[b], "equal_epochs", "top1", mode, named)
                built.paired_cells[(row, f"paired:{b}")] = pr
                built.notes += [w for w in why if w not in built.notes]
                crossed = [k for k in named if len({configuration(r, False).get(k) for r in by_cell[row] + by_cell[b]}) > 1]
                if crossed and pr.n:
                    built.notes.append(f"Δ of {row!r} vs {b!r} compares across {', '.join(crossed)}, as the cells' names say")
    return built


def build_tables(store: RunStore, mode: str = "final", paper: Paper | None = None) -> list[BuiltTable]:
    if mode not in METRIC_MODES:
        raise ConfigError(f"--metric: unknown value {mode!r}; allowed: {', '.join(METRIC_MODES)}")
    paper = paper or load_paper()
    built = [build_paper_table(paper, k, store, mode) for k in paper.tables]
    built += [build_cpu_table(paper, k, store, mode) for k in paper.cpu_tables]
    known = set(paper.tables) | set(paper.cpu_tables)
    others = sorted({r.get("table") for r in store.finished() if r.get("table") and r.get("table") not in known})
    return built + [build_cells_table(k, store, mode) for k in others]


def write_tables(built: list[BuiltTable], out_dir: str | Path) -> list[Path]:
    out = Path(out_dir) / "tables"
    out.mkdir(parents=True, exist_ok=True)
    files, manifest = [], {}
    for t in built:
        entry = {"title": t.title, "files": {}, "n_runs": t.n_runs, "notes": t.notes}
        for ext, text in (("md", t.to_markdown()), ("tex", t.to_latex()), ("csv", t.to_csv()), ("html", t.to_html())):
            p = out / f"{t.name}.{ext}"
            p.write_text(text, encoding="utf-8")
            files.append(p)
            entry["files"][ext] = p.name
        manifest[t.name] = entry
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2, ensure_ascii=False), encoding="utf-8")
    return files


# ---------------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------------
def common_parser(prog: str, description: str) -> argparse.ArgumentParser:
    p = CommandParser(prog=f"nr-study {prog}", description=description)
    p.add_argument("--experiment", nargs="+", action="extend", default=None, metavar="NAME",
                   help="MLflow experiment name(s) to read (default: all)")
    p.add_argument("--tracking-uri", default=None,
                   help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else sqlite:///<runs>/mlflow.db)")
    p.add_argument("--out", default=None, help="output folder (default: <runs folder>/report)")
    p.add_argument("--metric", default="final", help="error at the final epoch (final) or the best epoch (best)")
    return p


def parse_common(prog: str, description: str, argv: list[str]) -> argparse.Namespace:
    """Parse and check what `tables` and `plots` share: the store opens (args.store) and the output folder is
    writable before any work, and a bad store leaves no --out folder behind."""
    args = common_parser(prog, description).parse_args(argv)
    if args.metric not in METRIC_MODES:
        raise ConfigError(f"--metric: unknown value {args.metric!r}; allowed: {', '.join(METRIC_MODES)}")
    args.store = RunStore(args.tracking_uri or default_tracking_uri(), args.experiment)
    args.out = Path(args.out) if args.out else runs_folder() / "report"
    try:
        args.out.mkdir(parents=True, exist_ok=True)
        probe = args.out / ".nr-study-write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as exc:
        raise ConfigError(f"--out {args.out}: cannot write there ({exc.strerror or exc}); "
                          "allowed: a writable folder") from None
    return args


def cli_main(argv: list[str]) -> int:
    args = parse_common("tables", "Rebuild the paper's tables (paper | reproduced mean ± std (n) | Δ) from MLflow "
                        "runs.", argv)
    built = build_tables(args.store, args.metric)
    out = args.out
    write_tables(built, out)
    from nr_study.analysis.report import write_index

    write_index(out)
    for t in built:
        print(f"{t.name}: {t.n_runs} run(s) -> {out / 'tables' / (t.name + '.md')}")
    print(f"index: {out / 'index.html'}")
    return 0
