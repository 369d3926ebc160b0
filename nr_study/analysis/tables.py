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
is two runs of one seed that differ only in what the method defines (method, nr.*, fs.*, slim.*, redo.*,
cbp.*, the after-rejuvenation protocol), never in model, data, optimiser or training settings, but for what the
comparison names: equal compute lets train.epochs differ, and a sweep table's cell named 'BL,width=11' is
compared across model.kwargs.width.

Outputs under --out (default <runs folder>/report): tables/<name>.md, .tex, .csv, .html, tables/manifest.json,
plus the index page (report.md, index.html) over everything in --out.

Where it lives: the paper's numbers in paper.py, the table model (cells, columns, BuiltTable) in table_model.py,
pairing with a baseline in pairing.py, one builder per table kind (a registry) in builders.py, the output
formats in formats.py; this module builds every table, writes the files and is the command.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from nr_study.analysis.builders import TABLE_KINDS
from nr_study.analysis.formats import FORMATS
from nr_study.analysis.paper import Paper, load_paper
from nr_study.analysis.runs import RunStore
from nr_study.analysis.table_model import BuiltTable
from nr_study.cli_parser import CommandParser
from nr_study.names import runs_dir
from nr_study.errors import ConfigError

METRIC_MODES = ("final", "best")


def build_tables(store: RunStore, mode: str = "final", paper: Paper | None = None) -> list[BuiltTable]:
    """Every table the runs and the paper make, kind by kind (builders.TABLE_KINDS: the paper's tables, the CPU
    analogues, then each sweep's own table), each kind's tables in its order."""
    if mode not in METRIC_MODES:
        raise ConfigError(f"--metric: unknown value {mode!r}; allowed: {', '.join(METRIC_MODES)}")
    paper = paper or load_paper()
    built: list[BuiltTable] = []
    taken: set[str] = set()
    for kind in TABLE_KINDS.values():
        names = kind.keys(paper, store, taken)
        built += [kind.build(paper, name, store, mode) for name in names]
        taken |= set(names)
    return built


def write_tables(built: list[BuiltTable], out_dir: str | Path) -> list[Path]:
    out = Path(out_dir) / "tables"
    out.mkdir(parents=True, exist_ok=True)
    files, manifest = [], {}
    for t in built:
        entry = {"title": t.title, "files": {}, "n_runs": t.n_runs, "notes": t.notes}
        for ext, render in FORMATS.items():
            p = out / f"{t.name}.{ext}"
            p.write_text(render(t), encoding="utf-8")
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
    args.store = RunStore(args.tracking_uri, args.experiment)
    args.out = Path(args.out) if args.out else runs_dir() / "report"
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
