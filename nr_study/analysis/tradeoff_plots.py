"""The trade-off plots of `nr-study plots`: what a method costs against what it gains, and what a sweep found.

- tradeoff_params / tradeoff_flops
                 final error vs final params / FLOPs for BL, the NR variants and Network Slimming (SLIM), one
                 panel per architecture and dataset, the paper's points (Tables 2 and 4) as distinct markers
- pareto_<sweep> Optuna 2-objective sweeps: test_err vs params, non-dominated trials marked
- importance_<sweep> / parallel_<sweep>
                 every sweep: Optuna's fANOVA importances of its swept keys for its first objective, and the
                 swept keys vs the objective as parallel coordinates

How a sweep is recognised and read: nr_study.analysis.plots (the command's description).
"""
from __future__ import annotations

import math
import re
import textwrap
from pathlib import Path
from typing import Any

from nr_study.analysis.paper import Paper, load_paper
from nr_study.analysis.plotting import (METHOD_ORDER, PlotResult, count_unit, file_name, method_color, plt,
                                        save_figure)
from nr_study.analysis.runs import RunRecord, norm, to_float
from nr_study.analysis.stats import pareto_mask
from nr_study.names import TAG_PAIRED_BASELINE

TRADEOFF_METHODS = set(METHOD_ORDER)


# ---------------------------------------------------------------------------------------------------
# Error vs params / FLOPs
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


def _tradeoff_panels(runs: list[RunRecord], paper: Paper, mode: str, notes: list[str]) -> dict[str, dict[str, Any]]:
    """'arch / dataset' -> its runs' points (BL, NR variants, SLIM) and the paper's; the paper's alone, in
    panels of their own, when no run has an error."""
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
    return panels


def _draw_tradeoff(data: dict[str, dict[str, list]], xkey: str, xname: str, title: str, out_dir: str | Path,
                   name: str) -> list[Path]:
    """One panel per 'arch / dataset': runs as dots per method, the paper's points as stars."""
    n = len(data)
    ncols = min(3, n)
    nrows = math.ceil(n / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(5.2 * ncols, 4.2 * nrows), squeeze=False)
    for ax, (key, d) in zip(axes.flat, data.items()):
        unit, scale = count_unit([x[xkey] for x in d["runs"] + d["paper"]])
        methods = sorted({x["method"] for x in d["runs"]}, key=lambda m: (METHOD_ORDER.index(m) if m in METHOD_ORDER else 99, m))
        for m in methods:
            pts = [x for x in d["runs"] if x["method"] == m]
            ax.scatter([x[xkey] / scale for x in pts], [x["err"] for x in pts], s=28, alpha=0.8,
                       color=method_color(m), label=m)
        for pp in d["paper"]:
            ax.scatter([pp[xkey] / scale], [pp["err"]], marker="*", s=170, edgecolor="black", linewidth=0.8,
                       color=method_color(pp["method"]), label=f"paper: {pp['method']}", zorder=3)
        ax.set(title=key, xlabel=f"{xname} ({unit or 'count'})" if xkey == "params" else f"FLOPs ({unit or ''}multiply-adds)",
               ylabel="Top-1 error (%)")
        ax.grid(alpha=0.3)
        ax.legend(loc="best")
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    fig.suptitle(textwrap.fill(title, width=48 * ncols))  # one panel is narrow: wrap, never clip
    return save_figure(fig, out_dir, name)


def plot_tradeoff(runs: list[RunRecord], out_dir: str | Path, paper: Paper | None = None, mode: str = "final") -> list[PlotResult]:
    """Error vs params and vs FLOPs per (arch, dataset): runs as dots per method, paper points as stars."""
    paper = paper or load_paper()
    common: list[str] = []
    panels = _tradeoff_panels(runs, paper, mode, common)
    results = []
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
        results.append(PlotResult(name, title, data, _draw_tradeoff(data, xkey, xname, title, out_dir, name), list(notes)))
    return results


# ---------------------------------------------------------------------------------------------------
# Sweeps: how each was searched, its Pareto front, its importances
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


def _draw_pareto(data: dict[str, Any], title: str, out_dir: str | Path, name: str) -> list[Path]:
    """Dominated trials in grey, the front as a line; counts (params, FLOPs) in their unit."""
    (ykey, xkey), mask = data["objectives"], data["pareto"]
    unit, scale = count_unit(data["x"]) if "param" in xkey or "flop" in xkey else ("", 1.0)
    fig, ax = plt.subplots(figsize=(7, 4.8))
    ax.scatter([x / scale for x, m in zip(data["x"], mask) if not m], [y for y, m in zip(data["y"], mask) if not m],
               s=25, color="0.6", label="dominated trials")
    front = sorted((x, y) for x, y, m in zip(data["x"], data["y"], mask) if m)
    ax.plot([x / scale for x, _ in front], [y for _, y in front], "-o", color="C3", label="Pareto front (non-dominated)")
    xl = {"params": f"Parameters ({unit or 'count'})", "flops": f"FLOPs ({unit}multiply-adds)"}.get(xkey.lower().removeprefix("final_"), xkey)
    ax.set(title=title, xlabel=xl, ylabel="Top-1 error (%)" if "err" in ykey else ykey)
    ax.grid(alpha=0.3)
    ax.legend(loc="best")
    return save_figure(fig, out_dir, name)


def plot_pareto(runs: list[RunRecord], out_dir: str | Path, parents: list[RunRecord] | None = None) -> list[PlotResult]:
    """One plot per Optuna sweep with 2 objectives: test_err vs params (the second objective), front marked."""
    results = []
    for sweep, (members, dicts) in _sweeps(runs, parents).items():
        notes: list[str] = []
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
        name = f"pareto_{file_name(sweep)}"
        title = f"Optuna Pareto front of sweep {sweep}: {ykey} vs {xkey}"
        data = {"x": [p[0] for p in pts], "y": [p[1] for p in pts], "pareto": mask, "run_ids": ids,
                "objectives": [ykey, xkey]}
        results.append(PlotResult(name, title, data, _draw_pareto(data, title, out_dir, name), notes))
    return results


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
    if len({y for _, y in rows}) < 2:  # fANOVA raises on it ("zero total variance"); a smoke run's 4 test images do it
        notes.append(f"{objective} is {rows[0][1]:g} in every one of the {len(rows)} finished trials: nothing to "
                     f"attribute to the swept keys")
        return None, list(dists), objective, notes
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction="minimize" if mode == "min" else "maximize")
    for p, y in rows:
        params = {k: (to_float(v) if isinstance(dists[k], FloatDistribution) else v) for k, v in p.items() if k in dists}
        study.add_trial(optuna.trial.create_trial(params=params, distributions=dists, value=y))
    return study, list(dists), objective, notes


def _importance_plot(sweep: str, study, objective: str, notes: list[str], out_dir: str | Path) -> PlotResult:
    """The swept keys' fANOVA importances (seeded; they sum to 1) as bars."""
    import optuna

    imp = optuna.importance.get_param_importances(
        study, evaluator=optuna.importance.FanovaImportanceEvaluator(seed=0))
    imp = {k: float(v) for k, v in imp.items()}
    title = f"Parameter importances of sweep {sweep} for {objective} (fANOVA, {len(study.trials)} trials)"
    fig, ax = plt.subplots(figsize=(7, 0.5 + 0.45 * len(imp)))
    names = list(imp)[::-1]
    ax.barh(names, [imp[k] for k in names], color="C0")
    ax.set(title=textwrap.fill(title, 70), xlabel="importance (share of the objective's variance)", xlim=(0, 1))
    ax.grid(alpha=0.3, axis="x")
    name = f"importance_{file_name(sweep)}"
    return PlotResult(name, title, {"importances": imp, "objective": objective, "n_trials": len(study.trials)},
                      save_figure(fig, out_dir, name), notes)


def _parallel_plot(sweep: str, study, keys: list[str], objective: str, notes: list[str], out_dir: str | Path
                   ) -> PlotResult:
    """The swept keys and the objective as parallel coordinates, each axis scaled to [0, 1] (categories evenly),
    lines coloured by the objective (the better, the darker)."""
    import optuna

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
    title = f"Parallel coordinates of sweep {sweep}: swept keys vs {objective}"
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
    ax.set(title=textwrap.fill(title, 80), ylim=(-0.05, 1.05))
    name = f"parallel_{file_name(sweep)}"
    return PlotResult(name, title, {"columns": cols, "rows": table}, save_figure(fig, out_dir, name), notes)


def plot_importances(runs: list[RunRecord], out_dir: str | Path, parents: list[RunRecord] | None = None) -> list[PlotResult]:
    """Per sweep: parameter importances of its swept keys for its first objective (Optuna's fANOVA evaluator,
    seeded; they sum to 1) and a parallel-coordinates plot of the swept keys against the objective."""
    results = []
    for sweep, (members, dicts) in _sweeps(runs, parents).items():
        study, keys, objective, notes = sweep_study(members, dicts)
        if study is None:  # said, not silently skipped
            results.append(PlotResult(f"importance_{file_name(sweep)}", f"Parameter importances of sweep {sweep}",
                                      {}, [], notes))
            continue
        results.append(_importance_plot(sweep, study, objective, notes, out_dir))
        results.append(_parallel_plot(sweep, study, keys, objective, notes, out_dir))
    return results
