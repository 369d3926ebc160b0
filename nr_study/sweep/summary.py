"""The end of a sweep in numbers: a row per trial, configurations averaged over seeds (never across them), the
best configuration, the Pareto set; printed, and logged to the parent run."""
from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import Optional

from nr_study.names import TAG_CELL
from nr_study.analysis.stats import pareto_front
from nr_study.labels import distinct_labels, fmt_value
from nr_study.sweep.space import SearchSpace


METRIC_COLUMNS = ("test_err", "util_params", "lambda", "rejuvenations", "params")


_CAUSE = re.compile(r"^(?:[A-Za-z_][\w.]*\.)?(?P<type>[A-Z]\w*(?:Error|Exception|Exit|Interrupt))(?:\(\w+\))?: (?P<msg>.+)$")


def error_cause(err) -> str:
    """The one line that says why a trial errored: the innermost 'Type: message' line of Ray's error text (a
    RayTaskError holds the worker's whole traceback), without the module path."""
    lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
    for ln in reversed(lines):
        m = _CAUSE.match(ln)
        if m and not m["type"].startswith("RayTaskError"):
            msg = f"{m['type']}: {m['msg']}"
            return msg if len(msg) <= 300 else msg[:297] + "..."
    return (lines[-1] if lines else type(err).__name__)[:300]


def summarize(space: SearchSpace, results) -> dict:
    """Rows per trial, configurations averaged over seeds, best configuration, Pareto set."""
    rows, confs = [], []
    for r in results:
        cfg = r.config or {}
        values = space.trial_values(cfg)
        confs.append({k: v for k, v in values.items() if k != "seed"})
        _, name, tags = space.resolve_trial(cfg)
        m = r.metrics or {}
        tid = m.get("trial_id") or (Path(str(r.path)).name.split("-", 1)[0] if getattr(r, "path", None) else None)
        row = {"trial_id": tid, "name": name, "cell": tags[TAG_CELL], "error": bool(r.error),
               "epochs": m.get("training_iteration"), "complete": "final_test_err" in m}
        if r.error:
            row["cause"] = error_cause(r.error)
        row.update({k: values[k] for k in values})
        for metric in dict.fromkeys([*METRIC_COLUMNS, *(m_ for m_, _ in space.objectives)]):
            if metric in m:
                row[metric] = m[metric]
        rows.append(row)
    # a configuration's seeds are one row; configurations that share a cell name are never averaged together
    labels = distinct_labels([(row["cell"], conf) for row, conf in zip(rows, confs)])
    groups: dict[str, dict] = {}
    for row, label in zip(rows, labels):
        if row["error"]:
            continue
        g = groups.setdefault(label, {"cell": label, "n": 0, "_sums": {}, "complete": True})
        g["n"] += 1
        g["complete"] &= row["complete"]
        for metric, _ in space.objectives:
            if isinstance(row.get(metric), (int, float)):
                g["_sums"].setdefault(metric, []).append(float(row[metric]))
    configs = []
    for g in groups.values():
        c = {"cell": g["cell"], "n": g["n"], "complete": g["complete"]}
        for metric, vals in g["_sums"].items():
            c[metric] = sum(vals) / len(vals)
        configs.append(c)
    out = {"trials": rows, "configurations": configs}
    m0, md0 = space.objectives[0]
    ranked = [c for c in configs if isinstance(c.get(m0), float)]
    if any(c["complete"] for c in ranked):  # a trial a scheduler stopped early is ranked at a shorter training
        ranked = [c for c in ranked if c["complete"]]
    if ranked:
        out["best"] = (min if md0 == "min" else max)(ranked, key=lambda c: c[m0])
    if space.multi_objective:
        out["pareto"] = pareto_front(configs, space.objectives)
    return out


def format_summary(space: SearchSpace, summary: dict) -> str:
    lines = []
    objs = [m for m, _ in space.objectives]
    if summary.get("configurations"):
        lines.append(f"{'configuration (cell)':<40} {'n':>2} " + " ".join(f"{m:>12}" for m in objs))
        for c in sorted(summary["configurations"], key=lambda c: c["cell"]):
            lines.append(f"{c['cell'][:40]:<40} {c['n']:>2} " + " ".join(
                f"{c[m]:>12.4g}" if isinstance(c.get(m), float) else f"{'-':>12}" for m in objs))
    partial = summary.get("partial")
    if partial:
        lines.append(f"PARTIAL results: {summary.get('finished', 0)} of {summary.get('expected', '?')} "
                     f"configuration(s) finished; the rows above include unfinished trials' last epochs")
    stopped = [r for r in summary.get("trials", []) if not r["error"] and not r["complete"]]
    if stopped and not partial:
        lines.append(f"{len(stopped)} trial(s) stopped early by the scheduler (no final metrics, tag "
                     f"nr.early_stopped): their rows are from fewer epochs")
    if summary.get("best"):
        b = summary["best"]
        so_far = " so far (partial, not final)" if partial else ""
        lines.append(f"best by {objs[0]}{so_far}: {b['cell']} ({objs[0]} {b[objs[0]]:.4g}, n={b['n']})")
    if "pareto" in summary:
        lines.append(f"Pareto set{' so far (partial, not final)' if partial else ''} "
                     f"({', '.join(f'{m}: {md}' for m, md in space.objectives)}):")
        for p in summary["pareto"]:
            lines.append("  " + p["cell"] + "  " + ", ".join(f"{m}={fmt_value(p[m])}" for m in objs))
    return "\n".join(lines)


def count_finished(trials: Optional[list]) -> int:
    """Trials Ray ended TERMINATED: run to their last epoch or stopped early by the scheduler (ASHA), which is
    how a scheduler finishes a configuration. ERROR and anything still pending/running/paused did not finish."""
    return sum(1 for t in trials or [] if t.status == "TERMINATED")


def has_early_stops(space: SearchSpace, trials: Optional[list]) -> bool:
    """A trial Ray ended without the trainer's final metrics: the scheduler stopped it."""
    return any(t.status == "TERMINATED" and "final_test_err" not in (t.last_result or {}) for t in (trials or []))


def log_summary(client, parent_run_id: str, space: SearchSpace, summary: dict) -> None:
    try:
        if summary.get("partial"):  # an interrupted or incomplete sweep: no best_* metric that reads as final
            client.log_dict(parent_run_id, summary, "summary_partial.json")
            return
        client.log_dict(parent_run_id, summary, "summary.json")
        best = summary.get("best")
        if best:
            for m, _ in space.objectives:
                if isinstance(best.get(m), float):
                    client.log_metric(parent_run_id, f"best_{m}", best[m])
        if "pareto" in summary:
            client.log_dict(parent_run_id, summary["pareto"], "pareto.json")
    except Exception as exc:
        print(f"warning: could not log the sweep summary: {exc}", file=sys.stderr)
