"""The table builders of `nr-study tables`, one per table kind, chosen from a registry (TABLE_KINDS):

- paper   Tables 1-5 of the paper, in the paper's layout (paper_results.yaml `tables`)
- cpu     the CPU-scale analogues (paper_results.yaml `cpu_tables`: fmnist_table4, fmnist_table5)
- sweep   any other `nr.table` tag (a sweep's own, e.g. the demo's): a table of its cells

A kind registers itself with @table_kind(name, keys): `keys(paper, store, taken)` lists the table names of that
kind (`taken`: the names earlier kinds claimed) and the decorated builder makes one table,
`build(paper, key, store, mode) -> BuiltTable`. Adding a table kind is one decorated function here.
What each table holds and how its cells pair is described in nr_study.analysis.tables.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

from nr_study.analysis.paper import PAPER_YAML, Paper, PaperEntry, PaperTable, PaperValue, parse_paper_value
from nr_study.analysis.pairing import (BASIS_TEXT, COMPARE_BASES, named_keys, own_pair_difference,
                                       paired_difference)
from nr_study.analysis.runs import NR_METHODS, RunRecord, RunStore, configuration, norm, rejuvenation_count, to_float
from nr_study.analysis.stats import DASH, Paired
from nr_study.analysis.table_model import BuiltTable, Column, make_cell, run_value
from nr_study.errors import ConfigError
from nr_study.labels import distinct_labels, varying_keys
from nr_study.methods import METHODS
from nr_study.names import DELTA_COMPUTE_METRIC


# ---------------------------------------------------------------------------------------------------
# The registry of table kinds
# ---------------------------------------------------------------------------------------------------
KeysFn = Callable[[Paper, RunStore, set[str]], list[str]]
BuildFn = Callable[[Paper, str, RunStore, str], BuiltTable]


@dataclass(frozen=True)
class TableKind:
    name: str
    keys: KeysFn  # (paper, store, names earlier kinds took) -> the table names of this kind, in order
    build: BuildFn  # (paper, table name, store, metric mode) -> the table


TABLE_KINDS: dict[str, TableKind] = {}  # in the order tables are built (and listed)


def table_kind(name: str, keys: KeysFn) -> Callable[[BuildFn], BuildFn]:
    """Register the decorated builder as table kind `name`, whose tables are `keys(paper, store, taken)`."""
    def register(build: BuildFn) -> BuildFn:
        TABLE_KINDS[name] = TableKind(name, keys, build)
        return build
    return register


# ---------------------------------------------------------------------------------------------------
# Notes every kind writes: skipped runs, training budgets, missing values, mixed configurations
# ---------------------------------------------------------------------------------------------------
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


# The options where nr_study follows the paper's text or the official code (docs/fidelity.md), and what a run logged
# before the option existed did (its params lack the key).
FIDELITY_OPTIONS = {"nr.cr_heads": "joint", "nr.gamma_new": "1.0", "nr.new_head_init": "zero",
                    "nr.carry_momentum": "False"}


def fidelity_note(runs: list[RunRecord]) -> list[str]:
    """Which fidelity options the table's NR runs used (every value seen, with how many runs): a table mixing
    them says so. nr.cr_heads is NR-CR's (and BL-2H's) only."""
    seen: dict[str, dict[str, int]] = {}
    for r in runs:
        method = r.get("method")
        if method not in NR_METHODS and method != "BL-2H":
            continue
        scheme = r.params.get("nr.scheme")
        scheme = scheme if scheme not in (None, "", "None") else METHODS[method].scheme
        for key, before in FIDELITY_OPTIONS.items():
            if key != "nr.cr_heads" or scheme == "cr":
                counts = seen.setdefault(key, {})
                counts[r.params.get(key, before)] = counts.get(r.params.get(key, before), 0) + 1
    if not seen:
        return []
    parts = [f"{key} " + (next(iter(vals)) if len(vals) == 1 else
                          " / ".join(f"{v} ({n} run{'s' * (n != 1)})" for v, n in sorted(vals.items())))
             for key, vals in seen.items()]
    return ["fidelity options of the NR runs (docs/fidelity.md): " + "; ".join(parts)]



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


# ---------------------------------------------------------------------------------------------------
# The paper's tables (Tables 1-5)
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



@table_kind("paper", keys=lambda paper, store, taken: list(paper.tables))
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
                       notes=_status_note(store, key) + budget_note(runs) + fidelity_note(runs) + notes + _missing_notes(by_cell, table.values, mode), metric=mode,
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



# ---------------------------------------------------------------------------------------------------
# The CPU-scale analogues (fmnist_table4, fmnist_table5)
# ---------------------------------------------------------------------------------------------------
@dataclass
class CpuColumns:
    """A CPU table's columns: the runs of each (row, column), and the method (or number of rejuvenations) each
    column is a configuration of; a column label is the method, or 'BL [width=11]' where one method's runs
    are several configurations."""

    col_by: str  # "method" or "rejuvenations"
    groups: dict[tuple[str, str], list[RunRecord]]  # (row, column label) -> runs
    base_of: dict[str, str]  # column label -> the method (or count) it is a configuration of
    rows: list[str]
    names: list[str]  # column labels, in the table's order once sorted

    def group_of(self, col: str) -> str:
        return f"# of NR {col}" if self.col_by == "rejuvenations" else col


def _cpu_column_of(r: RunRecord, col_by: str, notes: list[str]) -> str | None:
    """The column a run falls in (its method, or its number of rejuvenations); None, said in the notes, when
    it has none."""
    if col_by == "rejuvenations":
        count, note = rejuvenation_count(r)
        if note:
            notes.append(note)
        if count is None:
            notes.append(f"run {r.run_id[:8]}: number of rejuvenations unknown (no nr.cell 'nrK', no "
                         f"'rejuvenations' metric, no nr.max_rejuvenations param); not used")
            return None
        return str(count)
    col = r.get(col_by)
    if col is None:
        notes.append(f"run {r.run_id[:8]}: no {col_by}; not used")
    return col


def _cpu_columns(spec: dict, runs: list[RunRecord], notes: list[str]) -> CpuColumns:
    col_by = spec.get("col_by", "method")
    by_row: dict[str, dict[str, list[RunRecord]]] = {}
    for r in runs:
        row = " / ".join(str(r.get(a) or "?") for a in spec.get("row_by", ["arch", "dataset"]))
        col = _cpu_column_of(r, col_by, notes)
        if col is not None:
            by_row.setdefault(row, {}).setdefault(col, []).append(r)
    # A column holds one configuration: a method's runs that differ in more (a width-11 BL beside the width-16
    # one under the same nr.table) are split into columns labelled by what differs, never averaged.
    groups: dict[tuple[str, str], list[RunRecord]] = {}
    base_of: dict[str, str] = {}
    for row, by_col in by_row.items():
        for col, rs in by_col.items():
            split, mixed = split_mixed_cells({col: rs}, unit="column")
            notes += [f"{row}: {n}" for n in mixed]
            for sub, srs in split.items():
                groups[(row, sub)] = srs
                base_of[sub] = col
    return CpuColumns(col_by, groups, base_of, sorted(by_row), list(base_of))


def _cpu_reference(paper: Paper, spec: dict, cols: CpuColumns, values: list[str]
                   ) -> tuple[str | None, dict[tuple[str, str], PaperValue]]:
    """The paper's analogous row, keyed by (column, value): (its label, its values); the paper's columns join
    the table even where no run exists yet."""
    ref_table = paper.tables.get(spec.get("analogue_of", ""))
    ref_vals: dict[tuple[str, str], PaperValue] = {}
    if ref_table is None:
        return None, ref_vals
    refs = [e for e in ref_table.entries if e.row == spec.get("reference_row")
            and (spec.get("reference_dataset") is None or e.attrs.get("dataset") == spec["reference_dataset"])]
    for e in refs:
        col = str(e.attrs.get(cols.col_by))
        if cols.col_by == "method":
            col = next((c for c in cols.base_of.values() if norm(c) == norm(col)), col)
        if col not in cols.base_of.values():  # show the paper's columns even where no run exists yet
            cols.base_of[col] = col
            cols.names.append(col)
        for v in values:
            if v in e.values:
                ref_vals[(col, v)] = e.values[v]
    if not ref_vals:
        return None, ref_vals
    ds = refs[0].attrs.get("dataset") or ""
    return f"paper: {refs[0].attrs.get('arch', refs[0].row)} {ds} ({ref_table.key})".replace("  ", " "), ref_vals


def _sort_cpu_columns(spec: dict, cols: CpuColumns) -> None:
    base_of = cols.base_of
    if cols.col_by == "rejuvenations":
        def rank(c):
            return (int(base_of[c]), c)
    else:
        order = [str(c) for c in spec.get("col_order", [])]

        def rank(c):
            return (order.index(base_of[c]) if base_of[c] in order else len(order), base_of[c], c)
    cols.names.sort(key=rank)


def _cpu_paired_rows(key: str, spec: dict, cols: CpuColumns, values: list[str], mode: str, notes: list[str]
                     ) -> tuple[dict[str, dict[tuple[str, str], Paired]], str]:
    """The paired rows (each column minus the table's baseline column, per basis) and the caption's sentence
    on them; none without a `baseline` in the spec."""
    paired_rows: dict[str, dict[tuple[str, str], Paired]] = {}
    baseline = spec.get("baseline")
    if baseline is None:
        return paired_rows, ""
    baseline, bases = str(baseline), list(spec.get("compare") or ["equal_epochs"])
    bad = [b for b in bases if b not in COMPARE_BASES]
    if bad:
        raise ConfigError(f"{PAPER_YAML.name}: cpu_tables.{key}.compare: {bad[0]!r} is not allowed; allowed: "
                          f"{', '.join(COMPARE_BASES)}")
    for basis in bases:
        for row in cols.rows:
            base_runs = [r for c in cols.names if cols.base_of[c] == baseline for r in cols.groups.get((row, c), [])]
            vals = {}
            for col in cols.names:
                if cols.base_of[col] == baseline:
                    continue
                for v in values:
                    if v in ("top1", "top5") and cols.groups.get((row, col)):
                        # each run pairs only with the baseline runs of its own configuration (pairing._is_pair)
                        vals[(cols.group_of(col), v)], why = paired_difference(cols.groups[(row, col)], base_runs,
                                                                               basis, v, mode)
                        notes += [w for w in why if w not in notes]
            paired_rows[f"Δ vs {cols.group_of(baseline)}, {basis.replace('_', ' ')}: {row}"] = vals
    return paired_rows, (f" Paired rows compare each column with {cols.group_of(baseline)} at "
                         + "; and at ".join(BASIS_TEXT[b] for b in bases) + ".")


@table_kind("cpu", keys=lambda paper, store, taken: list(paper.cpu_tables))
def build_cpu_table(paper: Paper, key: str, store: RunStore, mode: str = "final") -> BuiltTable:
    """Rows = (arch, dataset) found in the runs, columns = methods or numbers of rejuvenations, cells mean ± std
    (n); the paper's analogous row underneath and the paired rows against the table's baseline column."""
    spec = paper.cpu_tables[key]
    values = list(spec.get("values") or ["top1"])
    runs = store.finished({"table": key})
    notes = _status_note(store, key) + budget_note(runs) + fidelity_note(runs)
    cols = _cpu_columns(spec, runs, notes)
    ref_label, ref_vals = _cpu_reference(paper, spec, cols, values)
    _sort_cpu_columns(spec, cols)
    group_of = cols.group_of
    cells, ids = {}, {}
    for row in cols.rows:
        for col in cols.names:
            ids[(row, group_of(col))] = f"{row}/{col}"
            for v in values:
                cells[(row, group_of(col), v)] = make_cell(PaperValue(None, None), cols.groups.get((row, col), []), v, mode)
    columns = [Column(group_of(c), v, single=len(values) == 1) for c in cols.names for v in values]
    ref_rows = ({ref_label: {(group_of(c), v): pv for c in cols.names for (b, v), pv in ref_vals.items()
                             if cols.base_of[c] == b}} if ref_label else {})
    caption = (f"CPU-scale analogue of the paper's {spec.get('analogue_of', '')}: rows = "
               f"{' / '.join(spec.get('row_by', ['arch', 'dataset']))} from the runs, columns = {cols.col_by}.")
    paired_rows, paired_caption = _cpu_paired_rows(key, spec, cols, values, mode, notes)
    by_cell = {f"{r}/{c}": rs for (r, c), rs in cols.groups.items()}
    return BuiltTable(key, spec.get("title", key), caption + paired_caption, "Architecture / dataset", cols.rows,
                      columns, cells, ids, with_paper=False, reference_rows=ref_rows, paired_rows=paired_rows,
                      notes=notes + _missing_notes(by_cell, values, mode), metric=mode,
                      n_runs=sum(len(v) for v in cols.groups.values()))



# ---------------------------------------------------------------------------------------------------
# A sweep's own table (any other nr.table tag): a row per cell
# ---------------------------------------------------------------------------------------------------
def _sweep_table_names(paper: Paper, store: RunStore, taken: set[str]) -> list[str]:
    """Every `nr.table` tag of a FINISHED run that no other kind took."""
    return sorted({t for r in store.finished() if (t := r.get("table")) and t not in taken})


@table_kind("sweep", keys=_sweep_table_names)
def build_cells_table(paper: Paper | None, key: str, store: RunStore, mode: str = "final") -> BuiltTable:
    """A sweep's own table (an `nr.table` tag that is no paper table, e.g. the demo's): a row per cell (its
    `nr.cell` tag, else its method), error / params / FLOPs / rejuvenations as mean ± std (n), and a paired
    difference column per BL cell (the full BL, a width-scaled BL, ...) at equal epochs: a pair shares its
    seed and configuration (pair_differs) but for what the two cells' names state (named_keys). A paired sweep's
    runs (pair_with) add their difference to their own baseline, and the rows are sorted by it. Runs a
    scheduler stopped early are left out (their error is that of a shorter training), and said so. `paper` is
    not read (a sweep's table has no paper numbers): it is the signature every table kind's builder shares."""
    runs = store.finished({"table": key})
    notes = _status_note(store, key) + budget_note(runs) + fidelity_note(runs)
    by_cell: dict[str, list[RunRecord]] = {}
    for r in runs:
        by_cell.setdefault(r.get("cell") or r.get("method") or "?", []).append(r)
    by_cell, mixed = split_mixed_cells(by_cell)
    notes += mixed
    bases = sorted(c for c, rs in by_cell.items() if all(r.get("method") == "BL" for r in rs))  # e.g. a width-scaled BL too
    own = {c: own_pair_difference(rs) for c, rs in by_cell.items()}
    own = {c: p for c, p in own.items() if p.n}
    own_compute = {c: p for c, rs in by_cell.items() if (p := own_pair_difference(rs, DELTA_COMPUTE_METRIC)).n}
    if runs and not bases and not own:
        notes.append("no BL cell: no paired column")
    rows = sorted(by_cell, key=lambda c: (c not in bases, own[c].mean if c in own else math.inf, c))
    values = ["top1", "params", "flops", "rejuvenations"]
    columns = [Column("", v) for v in values]
    if own:
        columns.append(Column("Δ vs its own paired BL" + (", equal epochs" if own_compute else ""), "paired:own",
                              single=True))
    if own_compute:
        columns.append(Column("Δ vs its own paired BL, equal compute", "paired:own_compute", single=True))
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
    if own_compute:
        captions.append("under train.after_rejuvenation reset_epochs (the paper's protocol: train.epochs more after "
                        "the rejuvenation) the equal-epochs BL trained train.epochs; the equal-compute one as many "
                        "epochs as the run did")
    if bases:
        captions.append(f"The Δ vs <cell> columns compare each with a BL cell ({', '.join(bases)}) at "
                        f"{BASIS_TEXT['equal_epochs']}")
    if captions:
        built.caption = "Rows are the sweep's cells. " + ". ".join(captions) + "."
    for c, pr in own.items():
        built.paired_cells[(c, "paired:own")] = pr
    for c, pr in own_compute.items():
        built.paired_cells[(c, "paired:own_compute")] = pr
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

