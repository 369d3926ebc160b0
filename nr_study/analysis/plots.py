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
- pareto_<sweep> Optuna 2-objective sweeps: test_err vs params, non-dominated trials marked. A sweep = the runs
                 sharing a `nr.sweep` tag; it is Optuna when its parent run (or a trial) has a tag/param like
                 `sweep.search` = optuna, and its objectives come from `sweep.objectives` ("test_err:min,params:min").
- importance_<sweep> / parallel_<sweep>
                 every sweep (grid, random or Optuna): Optuna's fANOVA importances of its swept keys (the parent's
                 `space.<key>` params) for its first objective, over an in-memory study built from its finished
                 trials' runs; and the swept keys vs the objective as parallel coordinates
"""
from __future__ import annotations

import json
import math
import textwrap
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from nr_study.analysis.runs import NR_METHODS, RunRecord, RunStore, norm, rejuvenation_count, to_float  # noqa: E402
from nr_study.analysis.stats import mean_std, pareto_mask  # noqa: E402
from nr_study.analysis.tables import Paper, parse_common, load_paper  # noqa: E402
from nr_study.methods import METHODS  # noqa: E402
from nr_study.names import TAG_PAIRED_BASELINE  # noqa: E402

plt.rcParams.update({"font.size": 10, "axes.titlesize": 11, "legend.fontsize": 8, "figure.dpi": 100})
MAX_LINES = 12
METHOD_ORDER = [*(m for m in METHODS if m not in NR_METHODS), *NR_METHODS]  # every registered method, baselines first
TRADEOFF_METHODS = set(METHOD_ORDER)
UNITS = (("G", 1e9), ("M", 1e6), ("K", 1e3), ("", 1.0))


@dataclass
class PlotResult:
    name: str
    title: str
    data: dict[str, Any]
    files: list[Path] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def _unit(values: list[float]) -> tuple[str, float]:
    top = max((abs(v) for v in values), default=0.0)
    for u, s in UNITS:
        if top >= s:
            return u, s
    return "", 1.0


def _save(fig, out_dir: str | Path, name: str) -> list[Path]:
    out = Path(out_dir) / "plots"
    out.mkdir(parents=True, exist_ok=True)
    files = [out / f"{name}.png", out / f"{name}.svg"]
    fig.tight_layout()
    fig.savefig(files[0], dpi=120)
    fig.savefig(files[1])
    plt.close(fig)
    return files


def _color(i: int):
    return plt.get_cmap("tab10")(i % 10)


def _epoch_axis(*axes) -> None:
    for ax in axes:
        ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))


def _method_color(method: str):
    m = method.split(" ")[0].upper()
    return _color(METHOD_ORDER.index(m) if m in METHOD_ORDER else len(METHOD_ORDER))


def _is_nr(run: RunRecord) -> bool:
    return (run.get("method") or "").upper() in NR_METHODS


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


# ---------------------------------------------------------------------------------------------------
def plot_figure1(runs: list[RunRecord], out_dir: str | Path) -> PlotResult:
    """Figure 1: parameter/FLOPs utilization and top-1 accuracy vs epoch, one line per run; the BL runs of
    the same tables (dashed, accuracy only) for comparison."""
    notes: list[str] = []
    tagged = [r for r in runs if (r.get("table") or "").lower() in ("figure1", "fig1")]
    pool = tagged or [r for r in runs if "util_params" in r.metrics and _is_nr(r)]
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
        a1.plot(s["epoch"], s["util_params"], "-", color=_color(i), label=f"{label} (params)")
        if any(v is not None for v in s["util_flops"]):
            a1.plot(s["epoch"], [math.nan if v is None else v for v in s["util_flops"]], ":", color=_color(i),
                    label=f"{label} (FLOPs)")
        a2.plot(s["epoch"], acc, "-", color=_color(i), label=label)
    a1.set(title="Resource utilization r = U(θ)/c(A)", xlabel="Epoch", ylabel="Utilization (fraction of budget)", ylim=(0, 1.05))
    a2.set(title="Top-1 test accuracy", xlabel="Epoch", ylabel="Top-1 accuracy (%)")
    a1.legend(loc="best")
    a2.legend(loc="best")
    a1.grid(alpha=0.3)
    a2.grid(alpha=0.3)
    _epoch_axis(a1, a2)
    fig.suptitle(title)
    return PlotResult("figure1", title, data, _save(fig, out_dir, "figure1"), notes)


# ---------------------------------------------------------------------------------------------------
def _paper_points(paper: Paper, arch: str | None, dataset: str | None) -> list[dict[str, Any]]:
    pts = []
    for e in paper.entries():
        if e.reference is not None or "top1" not in e.values or e.values["top1"].value is None:
            continue
        if arch is not None and not paper.arch_matches(e.attrs.get("arch"), arch):
            continue
        if dataset is not None and norm(e.attrs.get("dataset") or "") != norm(dataset):
            continue
        p, f = e.values.get("params"), e.values.get("flops")
        if (p is None or p.value is None) and (f is None or f.value is None):
            continue
        pts.append({"table": e.table, "cell": e.cell, "arch": e.attrs.get("arch"), "dataset": e.attrs.get("dataset"),
                    "method": f"{e.attrs.get('method')}" + (f" ({e.attrs['constraint']})" if e.attrs.get("constraint") and e.table == "table2" else ""),
                    "err": e.values["top1"].value, "params": None if p is None else p.value,
                    "flops": None if f is None else f.value})
    return pts


def plot_tradeoff(runs: list[RunRecord], out_dir: str | Path, paper: Paper | None = None, mode: str = "final") -> list[PlotResult]:
    """Error vs params and vs FLOPs per (arch, dataset): runs as dots per method, paper points as stars."""
    paper = paper or load_paper()
    notes: list[str] = []
    panels: dict[str, dict[str, Any]] = {}
    for r in runs:
        method = r.get("method")
        if method is None or method.upper() not in TRADEOFF_METHODS:
            continue
        arch, ds = r.get("arch"), r.get("dataset")
        if arch is None or ds is None:
            notes.append(f"run {r.run_id[:8]}: no arch or dataset tag; skipped")
            continue
        err, params, flops = r.error(mode), r.n_params(), r.n_flops()
        if err is None:
            notes.append(f"run {r.run_id[:8]} ({r.label}): no test error; skipped")
            continue
        key = f"{arch} / {ds}"
        panel = panels.setdefault(key, {"arch": arch, "dataset": ds, "runs": [], "paper": _paper_points(paper, arch, ds)})
        panel["runs"].append({"run_id": r.run_id, "method": method.upper(), "constraint": r.get("constraint"),
                              "err": err, "params": params, "flops": flops})
    if not panels:
        notes.append("no BL / NR / SLIM runs with an error: showing the paper's points only")
        for e in _paper_points(paper, None, None):
            key = f"{e['arch']} / {e['dataset']} (paper)"
            panels.setdefault(key, {"arch": e["arch"], "dataset": e["dataset"], "runs": [], "paper": []})["paper"].append(e)
    results = []
    common = list(notes)
    for xkey, xname in (("params", "Params"), ("flops", "FLOPs")):
        notes = list(common)
        name = f"tradeoff_{xkey}"
        title = f"Error vs {xname}: BL, NR variants, Network Slimming (paper points: ★)"
        data = {}
        for key, p in panels.items():
            rpts = [d for d in p["runs"] if d[xkey] is not None]
            ppts = [d for d in p["paper"] if d[xkey] is not None]
            missing = len(p["runs"]) - len(rpts)
            if missing:
                notes_x = f"{key}: {missing} run(s) logged no final {xkey}; skipped in {name}"
                if notes_x not in notes:
                    notes.append(notes_x)
            if rpts or ppts:
                data[key] = {"runs": rpts, "paper": ppts}
        if not data:
            results.append(PlotResult(name, title, data, [], notes + [f"nothing to draw for {xname}"]))
            continue
        n = len(data)
        ncols = min(3, n)
        nrows = math.ceil(n / ncols)
        fig, axes = plt.subplots(nrows, ncols, figsize=(5.2 * ncols, 4.2 * nrows), squeeze=False)
        for ax, (key, d) in zip(axes.flat, data.items()):
            unit, scale = _unit([x[xkey] for x in d["runs"] + d["paper"]])
            methods = sorted({x["method"] for x in d["runs"]}, key=lambda m: (METHOD_ORDER.index(m) if m in METHOD_ORDER else 99, m))
            for m in methods:
                pts = [x for x in d["runs"] if x["method"] == m]
                ax.scatter([x[xkey] / scale for x in pts], [x["err"] for x in pts], s=28, alpha=0.8,
                           color=_method_color(m), label=m)
            for j, pp in enumerate(d["paper"]):
                ax.scatter([pp[xkey] / scale], [pp["err"]], marker="*", s=170, edgecolor="black", linewidth=0.8,
                           color=_method_color(pp["method"]), label=f"paper: {pp['method']}", zorder=3)
            ax.set(title=key, xlabel=f"{xname} ({unit or 'count'})" if xkey == "params" else f"FLOPs ({unit or ''}multiply-adds)",
                   ylabel="Top-1 error (%)")
            ax.grid(alpha=0.3)
            ax.legend(loc="best")
        for ax in list(axes.flat)[n:]:
            ax.axis("off")
        fig.suptitle(textwrap.fill(title, width=48 * ncols))  # one panel is narrow: wrap, never clip
        results.append(PlotResult(name, title, data, _save(fig, out_dir, name), list(notes)))
    return results


# ---------------------------------------------------------------------------------------------------
def _varying(runs: list[RunRecord], attrs: tuple[str, ...]) -> list[str]:
    return [a for a in attrs if len({r.get(a) for r in runs}) > 1]


SYMBOL = {"delta_lambda": "Δλ", "delta_r": "Δr", "arch": "", "dataset": "", "method": "", "constraint": ""}


def _line_label(r: RunRecord, keys: list[str]) -> str:
    bits = []
    for k in keys:
        v = r.get(k) or "n/a"
        bits.append(f"{SYMBOL.get(k, k)}={v}" if SYMBOL.get(k, k) else str(v))
    return ", ".join(bits)


def plot_tr_sweep(runs: list[RunRecord], out_dir: str | Path, mode: str = "final") -> PlotResult:
    """Final error and final params vs Tr, one line per Δλ / Δr (and arch/method where they vary)."""
    notes: list[str] = []
    pool = []
    for r in runs:
        if not _is_nr(r):
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
    unit, scale = _unit([v for s in data.values() for v in s["params_mean"] if v is not None])
    for i, (label, s) in enumerate(data.items()):
        ok = [j for j, v in enumerate(s["err_mean"]) if v is not None]
        a1.errorbar([s["tr"][j] for j in ok], [s["err_mean"][j] for j in ok], yerr=[s["err_std"][j] for j in ok],
                    marker="o", capsize=3, color=_color(i), label=label)
        okp = [j for j, v in enumerate(s["params_mean"]) if v is not None]
        a2.errorbar([s["tr"][j] for j in okp], [s["params_mean"][j] / scale for j in okp],
                    yerr=[s["params_std"][j] / scale for j in okp], marker="o", capsize=3, color=_color(i), label=label)
    a1.set(title="Final top-1 error vs Tr", xlabel="Utilization threshold Tr (fraction)", ylabel="Top-1 error (%)")
    a2.set(title="Final parameters vs Tr", xlabel="Utilization threshold Tr (fraction)", ylabel=f"Parameters ({unit or 'count'})")
    pm = [v for s in data.values() for v in s["params_mean"] if v]
    if pm and max(pm) / min(pm) > 20:
        a2.set_yscale("log")
    for a in (a1, a2):
        a.grid(alpha=0.3)
        a.legend(loc="best", title="mean ± std over seeds")
    fig.suptitle(title)
    return PlotResult("tr_sweep", title, data, _save(fig, out_dir, "tr_sweep"), notes)


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
        ax.errorbar(s["x"], s["mean"], yerr=s["std"], marker="o", capsize=3, color=_color(i), label=f"{label} (mean ± std)")
    for j, (label, s) in enumerate(data["paper"].items()):
        ax.plot(s["x"], s["y"], "--", marker="*", markersize=10, markeredgecolor="black", color=_color(7 + j), label=label)
    ax.set(title=title, xlabel="Number of rejuvenations", ylabel="Top-1 error (%)")
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    ax.legend(loc="best")
    return PlotResult("rejuvenations", title, data, _save(fig, out_dir, "rejuvenations"), notes)


# ---------------------------------------------------------------------------------------------------
def plot_trajectories(runs: list[RunRecord], out_dir: str | Path) -> PlotResult:
    """λ and parameter utilization vs epoch per NR run; epochs where a rejuvenation happened are marked."""
    notes: list[str] = []
    pool = [r for r in runs if _is_nr(r) and "lambda" in r.metrics]
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
        a1.plot(s["epoch"], s["lambda"], "-", color=_color(i), label=label)
        a2.plot(s["epoch"], [math.nan if v is None else v for v in s["util_params"]], "-", color=_color(i), label=label)
        ev = [e for e in s["rejuvenation_epochs"] if e in s["epoch"]]
        if ev:
            idx = [s["epoch"].index(e) for e in ev]
            a1.scatter(ev, [s["lambda"][j] for j in idx], marker="x", s=60, color=_color(i))
            a2.scatter(ev, [s["util_params"][j] if s["util_params"][j] is not None else math.nan for j in idx],
                       marker="x", s=60, color=_color(i))
    a1.set(title="Sparsity coefficient λ", xlabel="Epoch", ylabel="λ (L1 coefficient on BN γ)")
    a1.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
    _epoch_axis(a1, a2)
    a2.set(title="Parameter utilization", xlabel="Epoch", ylabel="Utilization r (fraction of budget)", ylim=(0, 1.05))
    for a in (a1, a2):
        a.grid(alpha=0.3)
        a.legend(loc="best")
    fig.suptitle(title)
    return PlotResult("trajectories", title, data, _save(fig, out_dir, "trajectories"), notes)


# ---------------------------------------------------------------------------------------------------
SEARCH_KEY = re.compile(r"(^|[._])(search|searcher|search_alg|algo|algorithm|sampler)($|[._])", re.I)
OBJECTIVE_KEY = re.compile(r"(^|[._])(metric|metrics|objective|objectives)$", re.I)


def _sweep_search(dicts: list[dict[str, str]]) -> tuple[bool, list[tuple[str, str]] | None]:
    """(is optuna, [(objective, min|max)] or None) from the sweep's tags/params, e.g. the parent run's
    `sweep.search` = optuna and `sweep.objectives` = "test_err:min,params:min" (nr_study.sweep)."""
    optuna, objectives = False, None
    for d in dicts:
        for k, v in d.items():
            if SEARCH_KEY.search(k) and "optuna" in str(v).lower():
                optuna = True
            if OBJECTIVE_KEY.search(k) and objectives is None and not k.lower().startswith(("base.", "space.", "tracking.")):
                names = [x for x in re.split(r"[\s,\[\]'\"(){}]+", str(v)) if x and x.lower() not in ("none", "null")]
                objs = []
                for x in names:
                    name, _, mode = x.partition(":")
                    if name in ("min", "max") and objs:  # "[test_err, min]"-style pairs
                        objs[-1] = (objs[-1][0], name)
                        continue
                    objs.append((name, mode.strip().lower() if mode.strip().lower() in ("min", "max") else "min"))
                if objs:
                    objectives = objs
    return optuna, objectives


def _objective(r: RunRecord, name: str) -> float | None:
    n = name.lower().removeprefix("final_")
    if n in ("test_err", "err", "error"):
        return r.error("final")
    if n == "params":
        return r.n_params()
    if n == "flops":
        return r.n_flops()
    return r.metrics.get(name)


def plot_pareto(runs: list[RunRecord], out_dir: str | Path, parents: list[RunRecord] | None = None) -> list[PlotResult]:
    """One plot per Optuna sweep with 2 objectives: test_err vs params (the second objective), front marked."""
    by_id = {p.run_id: p for p in parents or []}
    sweeps: dict[str, list[RunRecord]] = {}
    for r in runs:
        if r.get("sweep") and r.tags.get(TAG_PAIRED_BASELINE) != "true":  # a pair is no trial of the search
            sweeps.setdefault(r.get("sweep"), []).append(r)
    results = []
    for sweep, members in sorted(sweeps.items()):
        notes: list[str] = []
        dicts = []
        for r in members[:1] + [by_id[pid] for pid in {m.tags.get("mlflow.parentRunId") for m in members} if pid in by_id]:
            dicts += [r.tags, r.params]
        optuna, objectives = _sweep_search(dicts)
        if not optuna:
            continue
        if objectives is None:
            objectives = [("test_err", "min"), ("params", "min")]
            notes.append("objectives not recorded (looked for a sweep.objectives param); assuming test_err and params, both minimised")
        if len(objectives) != 2:
            continue
        if objectives[1][0].lower().removeprefix("final_") in ("test_err", "err"):
            objectives = objectives[::-1]
        (ykey, ymode), (xkey, xmode) = objectives
        pts, ids = [], []
        for r in members:
            x, y = _objective(r, xkey), _objective(r, ykey)
            if x is None or y is None:
                notes.append(f"run {r.run_id[:8]}: no {xkey if x is None else ykey}; skipped")
                continue
            pts.append((x, y))
            ids.append(r.run_id)
        if not pts:
            continue
        mask = pareto_mask(pts, (xmode, ymode))  # stats.pareto_front, the sweep summary's definition
        safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", sweep)
        name = f"pareto_{safe}"
        title = f"Optuna Pareto front of sweep {sweep}: {ykey} vs {xkey}"
        data = {"x": [p[0] for p in pts], "y": [p[1] for p in pts], "pareto": mask, "run_ids": ids,
                "objectives": [ykey, xkey]}
        unit, scale = _unit(data["x"]) if "param" in xkey or "flop" in xkey else ("", 1.0)
        fig, ax = plt.subplots(figsize=(7, 4.8))
        ax.scatter([x / scale for x, m in zip(data["x"], mask) if not m], [y for y, m in zip(data["y"], mask) if not m],
                   s=25, color="0.6", label="dominated trials")
        front = sorted((x, y) for x, y, m in zip(data["x"], data["y"], mask) if m)
        ax.plot([x / scale for x, _ in front], [y for _, y in front], "-o", color="C3", label="Pareto front (non-dominated)")
        xl = {"params": f"Parameters ({unit or 'count'})", "flops": f"FLOPs ({unit}multiply-adds)"}.get(xkey.lower().removeprefix("final_"), xkey)
        ax.set(title=title, xlabel=xl, ylabel="Top-1 error (%)" if "err" in ykey else ykey)
        ax.grid(alpha=0.3)
        ax.legend(loc="best")
        results.append(PlotResult(name, title, data, _save(fig, out_dir, name), notes))
    return results


# ---------------------------------------------------------------------------------------------------
def _sweeps(runs: list[RunRecord], parents: list[RunRecord] | None) -> dict[str, tuple[list[RunRecord], list[dict]]]:
    """sweep name -> (its finished trials, the tags/params of its first trial and its parent runs)."""
    by_id = {p.run_id: p for p in parents or []}
    sweeps: dict[str, list[RunRecord]] = {}
    for r in runs:
        if r.get("sweep") and r.tags.get(TAG_PAIRED_BASELINE) != "true":  # a pair is no trial of the search
            sweeps.setdefault(r.get("sweep"), []).append(r)
    out = {}
    for sweep, members in sorted(sweeps.items()):
        dicts = []
        for r in members[:1] + [by_id[pid] for pid in {m.tags.get("mlflow.parentRunId") for m in members} if pid in by_id]:
            dicts += [r.tags, r.params]
        out[sweep] = (members, dicts)
    return out


def sweep_study(members: list[RunRecord], dicts: list[dict]):
    """An in-memory Optuna study of a sweep's finished trials, built from the MLflow runs (any search: grid,
    random or Optuna): the swept keys (the parent's `space.<key>` params, else the params that vary), each
    trial's values and its first objective. Returns (study, keys, objective, notes); study is None when there
    is nothing to rank (fewer than 2 trials or no varying key)."""
    import optuna
    from optuna.distributions import CategoricalDistribution, FloatDistribution

    notes: list[str] = []
    _, objectives = _sweep_search(dicts)
    objective, mode = (objectives or [("test_err", "min")])[0]
    keys = sorted({k[len("space."):] for d in dicts for k in d if k.startswith("space.")})
    if not keys or any(k not in m.params for k in keys for m in members):
        # no space params, or a `variant` list (no param of that name): the config keys that vary over the
        # trials, less the seed a `repeat` varies (unless it is swept)
        keys = sorted(k for k in set().union(*(m.params for m in members))
                      if not k.startswith("tracking.") and k not in ("seed", "name") and
                      len({m.params.get(k) for m in members}) > 1)
    rows = []
    for r in members:
        y = _objective(r, objective)
        if y is None or not math.isfinite(y) or any(k not in r.params for k in keys):
            notes.append(f"run {r.run_id[:8]}: no {objective if y is None else 'value of a swept key'}; skipped")
            continue
        rows.append(({k: r.params[k] for k in keys}, float(y)))
    dists = {}
    for k in keys:
        vals = sorted({p[k] for p, _ in rows})
        nums = [to_float(v) for v in vals]
        if len(vals) < 2:
            continue  # constant over the finished trials: nothing to attribute to it
        if all(n is not None for n in nums):
            dists[k] = FloatDistribution(min(nums), max(nums))
        else:
            dists[k] = CategoricalDistribution(vals)
    if len(rows) < 2 or not dists:
        notes.append(f"{len(rows)} finished trial(s), {len(dists)} varying key(s): nothing to rank")
        return None, list(dists), objective, notes
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction="minimize" if mode == "min" else "maximize")
    for p, y in rows:
        params = {k: (to_float(v) if isinstance(dists[k], FloatDistribution) else v) for k, v in p.items() if k in dists}
        study.add_trial(optuna.trial.create_trial(params=params, distributions=dists, value=y))
    return study, list(dists), objective, notes


def plot_importances(runs: list[RunRecord], out_dir: str | Path, parents: list[RunRecord] | None = None) -> list[PlotResult]:
    """Per sweep: parameter importances of its swept keys for its first objective (Optuna's fANOVA evaluator,
    seeded; they sum to 1) and a parallel-coordinates plot of the swept keys against the objective."""
    import optuna

    results = []
    for sweep, (members, dicts) in _sweeps(runs, parents).items():
        study, keys, objective, notes = sweep_study(members, dicts)
        if study is None:  # said, not silently skipped
            results.append(PlotResult(f"importance_{re.sub(r'[^A-Za-z0-9_.-]+', '_', sweep)}",
                                      f"Parameter importances of sweep {sweep}", {}, [], notes))
            continue
        safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", sweep)
        imp = optuna.importance.get_param_importances(
            study, evaluator=optuna.importance.FanovaImportanceEvaluator(seed=0))
        imp = {k: float(v) for k, v in imp.items()}
        title = f"Parameter importances of sweep {sweep} for {objective} (fANOVA, {len(study.trials)} trials)"
        fig, ax = plt.subplots(figsize=(7, 0.5 + 0.45 * len(imp)))
        names = list(imp)[::-1]
        ax.barh(names, [imp[k] for k in names], color="C0")
        ax.set(title=textwrap.fill(title, 70), xlabel="importance (share of the objective's variance)", xlim=(0, 1))
        ax.grid(alpha=0.3, axis="x")
        name = f"importance_{safe}"
        results.append(PlotResult(name, title, {"importances": imp, "objective": objective,
                                                "n_trials": len(study.trials)}, _save(fig, out_dir, name), notes))

        cols = keys + [objective]
        table = [[t.params[k] for k in keys] + [t.value] for t in study.trials]
        scaled, ticks = [], []
        for j, k in enumerate(cols):
            col = [row[j] for row in table]
            if all(isinstance(v, (int, float)) for v in col):
                lo, hi = min(col), max(col)
                scaled.append([(v - lo) / (hi - lo) if hi > lo else 0.5 for v in col])
                ticks.append([(0.0, f"{lo:.3g}"), (1.0, f"{hi:.3g}")])
            else:
                cats = sorted(set(col))
                scaled.append([cats.index(v) / max(1, len(cats) - 1) for v in col])
                ticks.append([(i / max(1, len(cats) - 1), c) for i, c in enumerate(cats)])
        ptitle = f"Parallel coordinates of sweep {sweep}: swept keys vs {objective}"
        fig, ax = plt.subplots(figsize=(max(6, 1.8 * len(cols)), 4.8))
        obj = scaled[-1]
        cmap = plt.get_cmap("viridis_r" if study.direction == optuna.study.StudyDirection.MINIMIZE else "viridis")
        for i in range(len(table)):
            ax.plot(range(len(cols)), [scaled[j][i] for j in range(len(cols))], color=cmap(obj[i]), alpha=0.8)
        for j, tk in enumerate(ticks):
            ax.axvline(j, color="0.3", lw=0.8)
            for y, label in tk:
                ax.annotate(label, (j, y), xytext=(4, 0), textcoords="offset points", fontsize=7, va="center")
        ax.set_xticks(range(len(cols)), cols)
        ax.set_yticks([])
        ax.set(title=textwrap.fill(ptitle, 80), ylim=(-0.05, 1.05))
        pname = f"parallel_{safe}"
        results.append(PlotResult(pname, ptitle, {"columns": cols, "rows": table}, _save(fig, out_dir, pname), notes))
    return results


# ---------------------------------------------------------------------------------------------------
def make_all(store: RunStore, out_dir: str | Path, mode: str = "final") -> list[PlotResult]:
    runs = store.finished()
    paper = load_paper()
    results = [plot_figure1(runs, out_dir)]
    results += plot_tradeoff(runs, out_dir, paper, mode)
    results.append(plot_tr_sweep(runs, out_dir, mode))
    results.append(plot_rejuvenations(runs, out_dir, paper, mode))
    results.append(plot_trajectories(runs, out_dir))
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
