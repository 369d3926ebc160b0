"""`nr-study plots`: figures from MLflow runs (matplotlib, Agg backend), PNG and SVG.

Every plot function takes the FINISHED runs (nr_study.analysis.runs.RunRecord) and an output folder, writes
`<out>/plots/<name>.png` and `.svg`, and returns a PlotResult whose `data` holds the series drawn (so tests
and notebooks can check them) and whose `notes` say which runs were skipped and why (a missing param or
metric skips that run for that plot; nothing is filled in).

- figure1        utilization (`util_params`, `util_flops`) and top-1 accuracy (100 − `test_err`) vs epoch,
                 one line per run (runs tagged nr.table = figure1, else every NR run with a utilization history)
- tradeoff_params / tradeoff_flops
                 final error vs final params / FLOPs for BL, the NR variants and Network Slimming (SLIM), one
                 panel per architecture and dataset, the paper's points (Tables 2 and 4) as distinct markers
- tr_sweep       final error and final params vs Tr (param `nr.tr`), one line per Δλ / Δr (params
                 `nr.delta_lambda`, `nr.delta_r`), mean ± std over seeds as error bars
- rejuvenations  error vs number of rejuvenations (Table 5 as a plot), paper's Table 5 overlaid
- trajectories   λ and parameter utilization vs epoch, rejuvenations marked
- recycling      ReDo / CBP runs: units recycled so far (`recycled`), the dormant fraction (`dormant`) and top-1
                 accuracy vs epoch, the BL runs of the same tables dashed
- pareto_<sweep> Optuna 2-objective sweeps: test_err vs params, non-dominated trials marked. A sweep = the runs
                 sharing a `nr.sweep` tag; it is Optuna when its parent run (or a trial) has a tag/param like
                 `sweep.search` = optuna, and its objectives come from `sweep.objectives` ("test_err:min,params:min").
- importance_<sweep> / parallel_<sweep>
                 every sweep (grid, random or Optuna): Optuna's fANOVA importances of its swept keys (the parent's
                 `space.<key>` params) for its first objective, over an in-memory study built from its finished
                 trials' runs; and the swept keys vs the objective as parallel coordinates

Where it lives: this module draws the figures and trajectories (figure1, tr_sweep, rejuvenations,
trajectories) and is the command; tradeoff_plots.py the trade-offs, Pareto fronts and importances;
plotting.py what they share (PlotResult, saving, colours, units).
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from nr_study.analysis.paper import FIGURE1_TABLES, Paper, load_paper
from nr_study.analysis.plotting import PlotResult, count_unit, integer_epochs, is_nr, line_color, plt, save_figure
from nr_study.analysis.runs import RunRecord, RunStore, rejuvenation_count
from nr_study.analysis.stats import mean_std
from nr_study.analysis.tables import parse_common
from nr_study.analysis.tradeoff_plots import plot_importances, plot_pareto, plot_tradeoff
from nr_study.methods import METHODS

MAX_LINES = 12


# ---------------------------------------------------------------------------------------------------
# Which runs a line plot draws, and their legend labels
# ---------------------------------------------------------------------------------------------------
def _newest(runs: list[RunRecord], k: int, what: str, notes: list[str]) -> list[RunRecord]:
    if len(runs) <= k:
        return runs
    notes.append(f"{len(runs)} runs qualify for {what}; drawing the {k} newest (pass --experiment to choose)")
    return sorted(runs, key=lambda r: r.start_time, reverse=True)[:k]


DISTINGUISHING = ("seed", "tr", "delta_lambda", "target_ratio", "max_rejuvenations", "constraint", "after_rejuvenation")


def line_labels(runs: list[RunRecord]) -> dict[str, str]:
    """run id -> legend label: its `nr.cell` (else arch method seed), plus the settings that tell apart runs
    that would share a label (e.g. Tr), the run id only where nothing else does."""
    labels = {r.run_id: r.get("cell") or r.label for r in runs}
    for label in {v for v in labels.values() if list(labels.values()).count(v) > 1}:
        same = [r for r in runs if labels[r.run_id] == label]
        keys = _varying(same, DISTINGUISHING)
        for r in same:
            labels[r.run_id] = f"{label}, {_line_label(r, keys)}" if keys else label
    for label in {v for v in labels.values() if list(labels.values()).count(v) > 1}:
        for r in runs:
            if labels[r.run_id] == label:
                labels[r.run_id] = f"{label} [{r.run_id[:6]}]"
    return labels


def _varying(runs: list[RunRecord], attrs: tuple[str, ...]) -> list[str]:
    return [a for a in attrs if len({r.get(a) for r in runs}) > 1]


SYMBOL = {"delta_lambda": "Δλ", "delta_r": "Δr", "arch": "", "dataset": "", "method": "", "constraint": ""}


def _line_label(r: RunRecord, keys: list[str]) -> str:
    bits = []
    for k in keys:
        v = r.get(k) or "n/a"
        bits.append(f"{SYMBOL.get(k, k)}={v}" if SYMBOL.get(k, k) else str(v))
    return ", ".join(bits)


# ---------------------------------------------------------------------------------------------------
# The plots
# ---------------------------------------------------------------------------------------------------
def plot_figure1(runs: list[RunRecord], out_dir: str | Path) -> PlotResult:
    """Figure 1: parameter/FLOPs utilization and top-1 accuracy vs epoch, one line per run; the BL runs of
    the same tables (dashed, accuracy only) for comparison."""
    notes: list[str] = []
    tagged = [r for r in runs if (r.get("table") or "").lower() in FIGURE1_TABLES]
    pool = tagged or [r for r in runs if "util_params" in r.metrics and is_nr(r)]
    if not tagged:
        notes.append("no runs tagged nr.table=figure1: using every NR run with a util_params history")
    pool = _newest(pool, MAX_LINES, "Figure 1", notes)
    tables = {r.get("table") for r in pool} - {None}
    baselines = _newest([r for r in runs if r.get("method") == "BL" and r.get("table") in tables
                         and "test_err" in r.metrics], 3, "the Figure 1 baselines", notes)
    labels = line_labels(pool + baselines)
    data: dict[str, Any] = {}
    for r in pool + baselines:
        err = dict(r.history("test_err"))
        up = r.history("util_params") if r in pool else [(e, None) for e in sorted(err)]
        if not up:
            notes.append(f"run {r.run_id[:8]} ({r.label}): no util_params history; skipped")
            continue
        uf = dict(r.history("util_flops"))
        epochs = [s for s, _ in up]
        data[labels[r.run_id]] = {
            "epoch": epochs,
            "util_params": [v for _, v in up],
            "util_flops": [uf.get(e) for e in epochs],
            "top1_acc": [None if err.get(e) is None else 100.0 - err[e] for e in epochs],
            "baseline": r not in pool,
        }
    title = "Figure 1 (analogue): utilization and top-1 accuracy vs epoch"
    if not data:
        return PlotResult("figure1", title, data, [], notes + ["nothing to draw"])
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(12, 4.5))
    for i, (label, s) in enumerate(data.items()):
        acc = [math.nan if v is None else v for v in s["top1_acc"]]
        if s["baseline"]:
            a2.plot(s["epoch"], acc, "--", color="black", alpha=0.4 + 0.2 * (i % 3), label=f"{label} (baseline)")
            continue
        a1.plot(s["epoch"], s["util_params"], "-", color=line_color(i), label=f"{label} (params)")
        if any(v is not None for v in s["util_flops"]):
            a1.plot(s["epoch"], [math.nan if v is None else v for v in s["util_flops"]], ":", color=line_color(i),
                    label=f"{label} (FLOPs)")
        a2.plot(s["epoch"], acc, "-", color=line_color(i), label=label)
    a1.set(title="Resource utilization r = U(θ)/c(A)", xlabel="Epoch", ylabel="Utilization (fraction of budget)", ylim=(0, 1.05))
    a2.set(title="Top-1 test accuracy", xlabel="Epoch", ylabel="Top-1 accuracy (%)")
    a1.legend(loc="best")
    a2.legend(loc="best")
    a1.grid(alpha=0.3)
    a2.grid(alpha=0.3)
    integer_epochs(a1, a2)
    fig.suptitle(title)
    return PlotResult("figure1", title, data, save_figure(fig, out_dir, "figure1"), notes)


# ---------------------------------------------------------------------------------------------------
def plot_tr_sweep(runs: list[RunRecord], out_dir: str | Path, mode: str = "final") -> PlotResult:
    """Final error and final params vs Tr, one line per Δλ / Δr (and arch/method where they vary)."""
    notes: list[str] = []
    pool = []
    for r in runs:
        if not is_nr(r):
            continue
        if r.get_float("tr") is None:
            notes.append(f"run {r.run_id[:8]} ({r.label}): no param nr.tr; skipped")
            continue
        pool.append(r)
    title = "Tr sweep: final error and parameters vs Tr"
    # A Tr sweep = the runs of one sweep (tag nr.sweep; runs without one: per experiment) that vary Tr.
    pools: dict[str, list[RunRecord]] = {}
    for r in pool:
        pools.setdefault(r.get("sweep") or r.experiment, []).append(r)
    pools = {k: v for k, v in pools.items() if len({r.get_float("tr") for r in v}) > 1}
    if not pools:
        return PlotResult("tr_sweep", title, {}, [], notes + ["no sweep (or experiment) whose NR runs vary the param nr.tr"])
    lines: dict[str, dict[float, list[RunRecord]]] = {}
    for sweep, members in pools.items():
        keys = _varying(members, ("arch", "dataset", "method", "constraint", "delta_lambda", "delta_r"))
        if not any(k in keys for k in ("delta_lambda", "delta_r")):
            keys.append("delta_lambda" if any(r.get("delta_lambda") for r in members) else "delta_r")
        for r in members:
            label = _line_label(r, keys)
            if len(pools) > 1:
                label = f"{sweep}: {label}"
            lines.setdefault(label, {}).setdefault(r.get_float("tr"), []).append(r)
    data: dict[str, Any] = {}
    for label, by_tr in sorted(lines.items()):
        s = {"tr": [], "err_mean": [], "err_std": [], "params_mean": [], "params_std": [], "n": []}
        for tr in sorted(by_tr):
            errs = [v for r in by_tr[tr] if (v := r.error(mode)) is not None]
            prm = [v for r in by_tr[tr] if (v := r.n_params()) is not None]
            em, es, n = mean_std(errs)
            pm, ps, _ = mean_std(prm)
            s["tr"].append(tr)
            s["err_mean"].append(em)
            s["err_std"].append(es or 0.0)
            s["params_mean"].append(pm)
            s["params_std"].append(ps or 0.0)
            s["n"].append(n)
        data[label] = s
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(12, 4.5))
    unit, scale = count_unit([v for s in data.values() for v in s["params_mean"] if v is not None])
    for i, (label, s) in enumerate(data.items()):
        ok = [j for j, v in enumerate(s["err_mean"]) if v is not None]
        a1.errorbar([s["tr"][j] for j in ok], [s["err_mean"][j] for j in ok], yerr=[s["err_std"][j] for j in ok],
                    marker="o", capsize=3, color=line_color(i), label=label)
        okp = [j for j, v in enumerate(s["params_mean"]) if v is not None]
        a2.errorbar([s["tr"][j] for j in okp], [s["params_mean"][j] / scale for j in okp],
                    yerr=[s["params_std"][j] / scale for j in okp], marker="o", capsize=3, color=line_color(i), label=label)
    a1.set(title="Final top-1 error vs Tr", xlabel="Utilization threshold Tr (fraction)", ylabel="Top-1 error (%)")
    a2.set(title="Final parameters vs Tr", xlabel="Utilization threshold Tr (fraction)", ylabel=f"Parameters ({unit or 'count'})")
    pm = [v for s in data.values() for v in s["params_mean"] if v]
    if pm and max(pm) / min(pm) > 20:
        a2.set_yscale("log")
    for a in (a1, a2):
        a.grid(alpha=0.3)
        a.legend(loc="best", title="mean ± std over seeds")
    fig.suptitle(title)
    return PlotResult("tr_sweep", title, data, save_figure(fig, out_dir, "tr_sweep"), notes)


# ---------------------------------------------------------------------------------------------------
def plot_rejuvenations(runs: list[RunRecord], out_dir: str | Path, paper: Paper | None = None, mode: str = "final") -> PlotResult:
    """Table 5 as a plot: error vs number of rejuvenations, one line per (arch, dataset), paper overlaid."""
    paper = paper or load_paper()
    notes: list[str] = []
    pool = [r for r in runs if (r.get("table") or "") in ("table5", "fmnist_table5")]
    groups: dict[str, dict[int, list[float]]] = {}
    for r in pool:
        count, note = rejuvenation_count(r)
        if note:
            notes.append(note)
        err = r.error(mode)
        if count is None or err is None:
            notes.append(f"run {r.run_id[:8]} ({r.label}): no rejuvenation count or error; skipped")
            continue
        groups.setdefault(f"{r.get('arch')} / {r.get('dataset')}", {}).setdefault(count, []).append(err)
    if not pool:
        notes.append("no runs tagged nr.table=table5 or fmnist_table5: paper only")
    data: dict[str, Any] = {"runs": {}, "paper": {}}
    for label, by_n in sorted(groups.items()):
        s = {"x": [], "mean": [], "std": [], "n": []}
        for k in sorted(by_n):
            m, sd, n = mean_std(by_n[k])
            s["x"].append(k)
            s["mean"].append(m)
            s["std"].append(sd or 0.0)
            s["n"].append(n)
        data["runs"][label] = s
    t5 = paper.tables.get("table5")
    if t5 is not None:
        for row in dict.fromkeys(e.row for e in t5.entries):
            pts = [(int(e.attrs["rejuvenations"]), e.values["top1"].value) for e in t5.entries
                   if e.row == row and e.values["top1"].value is not None]
            data["paper"][f"paper: VGG-19 {row}"] = {"x": [p[0] for p in pts], "y": [p[1] for p in pts]}
    title = "Error vs number of rejuvenations (Table 5 as a plot)"
    fig, ax = plt.subplots(figsize=(7, 4.8))
    for i, (label, s) in enumerate(data["runs"].items()):
        ax.errorbar(s["x"], s["mean"], yerr=s["std"], marker="o", capsize=3, color=line_color(i), label=f"{label} (mean ± std)")
    for j, (label, s) in enumerate(data["paper"].items()):
        ax.plot(s["x"], s["y"], "--", marker="*", markersize=10, markeredgecolor="black", color=line_color(7 + j), label=label)
    ax.set(title=title, xlabel="Number of rejuvenations", ylabel="Top-1 error (%)")
    integer_epochs(ax)  # whole rejuvenation counts
    ax.grid(alpha=0.3)
    ax.legend(loc="best")
    return PlotResult("rejuvenations", title, data, save_figure(fig, out_dir, "rejuvenations"), notes)


# ---------------------------------------------------------------------------------------------------
def plot_trajectories(runs: list[RunRecord], out_dir: str | Path) -> PlotResult:
    """λ and parameter utilization vs epoch per NR run; epochs where a rejuvenation happened are marked."""
    notes: list[str] = []
    pool = [r for r in runs if is_nr(r) and "lambda" in r.metrics]
    pool = _newest(pool, MAX_LINES, "the λ trajectories", notes)
    labels = line_labels(pool)
    data: dict[str, Any] = {}
    for r in pool:
        lam = r.history("lambda")
        util = dict(r.history("util_params"))
        rej = r.history("rejuvenations")
        events = [s for (s, v), (_, pv) in zip(rej[1:], rej[:-1]) if v > pv]
        if rej and rej[0][1] > 0:
            events.insert(0, rej[0][0])
        label = labels[r.run_id]
        epochs = [s for s, _ in lam]
        data[label] = {"epoch": epochs, "lambda": [v for _, v in lam], "util_params": [util.get(e) for e in epochs],
                       "rejuvenation_epochs": events}
    title = "λ and utilization trajectories (× = rejuvenation)"
    if not data:
        return PlotResult("trajectories", title, data, [], notes + ["no NR run with a lambda history"])
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(12, 4.5))
    for i, (label, s) in enumerate(data.items()):
        a1.plot(s["epoch"], s["lambda"], "-", color=line_color(i), label=label)
        a2.plot(s["epoch"], [math.nan if v is None else v for v in s["util_params"]], "-", color=line_color(i), label=label)
        ev = [e for e in s["rejuvenation_epochs"] if e in s["epoch"]]
        if ev:
            idx = [s["epoch"].index(e) for e in ev]
            a1.scatter(ev, [s["lambda"][j] for j in idx], marker="x", s=60, color=line_color(i))
            a2.scatter(ev, [s["util_params"][j] if s["util_params"][j] is not None else math.nan for j in idx],
                       marker="x", s=60, color=line_color(i))
    a1.set(title="Sparsity coefficient λ", xlabel="Epoch", ylabel="λ (L1 coefficient on BN γ)")
    a1.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
    integer_epochs(a1, a2)
    a2.set(title="Parameter utilization", xlabel="Epoch", ylabel="Utilization r (fraction of budget)", ylim=(0, 1.05))
    for a in (a1, a2):
        a.grid(alpha=0.3)
        a.legend(loc="best")
    fig.suptitle(title)
    return PlotResult("trajectories", title, data, save_figure(fig, out_dir, "trajectories"), notes)


# ---------------------------------------------------------------------------------------------------
RECYCLERS = tuple(m for m, info in METHODS.items() if {"redo", "cbp"} & set(info.reads))  # ReDo, CBP


def plot_recycling(runs: list[RunRecord], out_dir: str | Path) -> PlotResult:
    """The recyclers' Figure 1: units recycled so far (`recycled`), the fraction of units dormant at the last
    scoring (`dormant`) and top-1 accuracy vs epoch, one line per ReDo / CBP run; the BL runs of the same
    tables (dashed, accuracy only) for comparison."""
    notes: list[str] = []
    pool = _newest([r for r in runs if r.get("method") in RECYCLERS and "recycled" in r.metrics], MAX_LINES,
                   "the recycling plot", notes)
    tables = {r.get("table") for r in pool} - {None}
    baselines = _newest([r for r in runs if r.get("method") == "BL" and r.get("table") in tables
                         and "test_err" in r.metrics], 3, "the recycling plot's baselines", notes)
    labels = line_labels(pool + baselines)
    data: dict[str, Any] = {}
    for r in pool + baselines:
        err = dict(r.history("test_err"))
        epochs = sorted(err)
        rec, dor = (dict(r.history("recycled")), dict(r.history("dormant"))) if r in pool else ({}, {})
        data[labels[r.run_id]] = {"epoch": epochs, "recycled": [rec.get(e) for e in epochs],
                                  "dormant": [dor.get(e) for e in epochs],
                                  "top1_acc": [100.0 - err[e] for e in epochs], "baseline": r not in pool}
    title = "Recycling (ReDo, CBP): units recycled, dormant fraction and top-1 accuracy vs epoch"
    if not pool:
        return PlotResult("recycling", title, data, [], notes + ["no ReDo or CBP run with a recycled history"])
    fig, (a1, a2, a3) = plt.subplots(1, 3, figsize=(16, 4.5))
    for i, (label, s) in enumerate(data.items()):
        if s["baseline"]:
            a3.plot(s["epoch"], s["top1_acc"], "--", color="black", alpha=0.4 + 0.2 * (i % 3), label=f"{label} (baseline)")
            continue
        nan = [math.nan if v is None else v for v in s["recycled"]], [math.nan if v is None else v for v in s["dormant"]]
        a1.plot(s["epoch"], nan[0], "-", color=line_color(i), label=label)
        a2.plot(s["epoch"], nan[1], "-", color=line_color(i), label=label)
        a3.plot(s["epoch"], s["top1_acc"], "-", color=line_color(i), label=label)
    a1.set(title="Units recycled so far", xlabel="Epoch", ylabel="Units (channels)")
    a2.set(title="Dormant at the last scoring", xlabel="Epoch", ylabel="Fraction of units", ylim=(0, 1.05))
    a3.set(title="Top-1 test accuracy", xlabel="Epoch", ylabel="Top-1 accuracy (%)")
    for a in (a1, a2, a3):
        a.grid(alpha=0.3)
        a.legend(loc="best")
    integer_epochs(a1, a2, a3)
    fig.suptitle(title)
    return PlotResult("recycling", title, data, save_figure(fig, out_dir, "recycling"), notes)


# ---------------------------------------------------------------------------------------------------
# The command
# ---------------------------------------------------------------------------------------------------
def make_all(store: RunStore, out_dir: str | Path, mode: str = "final") -> list[PlotResult]:
    runs = store.finished()
    paper = load_paper()
    results = [plot_figure1(runs, out_dir)]
    results += plot_tradeoff(runs, out_dir, paper, mode)
    results.append(plot_tr_sweep(runs, out_dir, mode))
    results.append(plot_rejuvenations(runs, out_dir, paper, mode))
    results.append(plot_trajectories(runs, out_dir))
    results.append(plot_recycling(runs, out_dir))
    pareto = plot_pareto(runs, out_dir, store.parents)
    results += pareto
    results += plot_importances(runs, out_dir, store.parents)
    if not pareto:
        results.append(PlotResult("pareto", "Optuna Pareto fronts", {}, [],
                                  ["no sweep whose parent run (or trials) records an Optuna search (param sweep.search = optuna) with 2 objectives"]))
    skipped = len(store.all_runs()) - len(runs)
    if skipped:
        results[0].notes.insert(0, f"{skipped} run(s) that did not train to their end (not FINISHED, or stopped early) ignored")
    return results


def write_manifest(results: list[PlotResult], out_dir: str | Path) -> Path:
    out = Path(out_dir) / "plots"
    out.mkdir(parents=True, exist_ok=True)
    mf = out / "manifest.json"
    manifest = {}
    for r in results:
        files = {p.suffix.lstrip("."): p.name for p in r.files}
        manifest[r.name] = {"title": r.title, "files": files, "notes": r.notes}
    mf.write_text(json.dumps(manifest, indent=2, ensure_ascii=False), encoding="utf-8")
    return mf


def cli_main(argv: list[str]) -> int:
    args = parse_common("plots", "Figure 1, trade-offs, Tr sweeps, rejuvenation counts, λ trajectories and Optuna "
                        "fronts from MLflow runs.", argv)
    out = args.out
    results = make_all(args.store, out, args.metric)
    write_manifest(results, out)
    from nr_study.analysis.report import write_index

    write_index(out)
    for r in results:
        where = ", ".join(str(f) for f in r.files if f.suffix == ".png") or "(nothing drawn: " + "; ".join(r.notes[-1:]) + ")"
        print(f"{r.name}: {where}")
    print(f"index: {out / 'index.html'}")
    return 0
