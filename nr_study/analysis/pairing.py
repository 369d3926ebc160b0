"""Paired comparisons against a baseline: which baseline run is a run's pair (same seed and configuration,
differing only in what the method defines, but for what the basis or the table names), and the paired
difference per seed with its t interval (the statistics are nr_study.analysis.stats').

Bases: equal epochs (same train.epochs) and equal training compute (the baseline's logged train_flops within
±10 % of the run's). A paired sweep's runs also carry their own difference to their own baseline (DELTA_METRIC).
"""
from __future__ import annotations

import re

from nr_study.analysis.runs import RunRecord, configuration
from nr_study.analysis.stats import COMPUTE_TOLERANCE, Paired, equal_compute, paired_t, seed_means, t_interval
from nr_study.analysis.table_model import run_value
from nr_study.labels import _num, fmt_value, short_key
from nr_study.names import DELTA_METRIC

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


def own_pair_difference(runs: list[RunRecord], metric: str = DELTA_METRIC) -> Paired:
    """The paired difference each run of a paired sweep measured against its own baseline (same seed, data,
    architecture; `metric` DELTA_METRIC: the same epochs, DELTA_COMPUTE_METRIC: as many epochs as a reset_epochs
    run trained): per seed (a seed's runs averaged), mean [95 % t interval] (n seeds)."""
    by_seed: dict[str, list[float]] = {}
    for r in runs:
        d = r.final(metric)
        if d is not None:
            by_seed.setdefault(r.get("seed") or r.run_id, []).append(d)
    return t_interval(seed_means(by_seed))


def named_keys(runs: list[RunRecord]) -> tuple[str, ...]:
    """The keys a cell's own name states with their value ('BL,width=11' for model.kwargs.width = 11, as the
    sweep names a variant): a comparison across them is one the table names, not an accident."""
    out = set()
    for r in runs:
        said = dict(t.split("=", 1) for t in re.split(r"[,\s]+", r.get("cell") or "") if "=" in t)
        out |= {k for k, v in configuration(r, method=False).items()
                if fmt_value(_num(v)) in (said.get(short_key(k)), said.get(k))}
    return tuple(sorted(out))
