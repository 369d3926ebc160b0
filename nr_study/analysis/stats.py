"""Statistics of the analysis, one definition each: mean ± std, the paired difference with its Student-t
interval, the equal-compute criterion of a pair, and the Pareto front.

Pure functions over numbers and dicts (scipy only for the t quantile, imported when needed): no MLflow, no
runs; the tables, the plots (and the sweep's summary) call them.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

DASH = "—"  # what a table shows for no value


# ---------------------------------------------------------------------------------------------------
# Mean, std and the paired t interval
# ---------------------------------------------------------------------------------------------------
def mean_std(values: list[float]) -> tuple[float | None, float | None, int]:
    """(mean, sample std (ddof=1; None when n < 2), n)."""
    n = len(values)
    if n == 0:
        return None, None, 0
    mean = sum(values) / n
    if n < 2:
        return mean, None, n
    var = sum((v - mean) ** 2 for v in values) / (n - 1)
    return mean, math.sqrt(var), n


@dataclass
class Paired:
    """Mean per-seed difference (method − baseline) with its 95 % t interval over n seeds, and the mean ratio
    of the two arms' training compute (train_flops) over the same pairs."""

    mean: float | None = None
    lo: float | None = None
    hi: float | None = None
    n: int = 0
    compute_ratio: float | None = None

    def text(self) -> str:
        if self.n == 0 or self.mean is None:
            return DASH
        body = f"{self.mean:+.2f}".replace("-", "−")
        if self.lo is not None:
            body += f" [{self.lo:+.2f}, {self.hi:+.2f}]".replace("-", "−")
        body += f" ({self.n})"
        if self.compute_ratio is not None:
            body += f" · compute {self.compute_ratio:.2f}×"
        return body


def t_interval(diffs: list[float], level: float = 0.95) -> Paired:
    """Mean and Student-t interval of paired differences (no interval for one pair)."""
    mean, std, n = mean_std(diffs)
    if n < 2:
        return Paired(mean, None, None, n)
    from scipy.stats import t  # imported here: only the paired rows need it

    half = float(t.ppf(0.5 + level / 2, n - 1)) * std / n ** 0.5
    return Paired(mean, mean - half, mean + half, n)


def seed_means(by_seed: dict[Any, list[float]]) -> list[float]:
    """One value per seed: the mean of that seed's values (a seed's runs are averaged, so n counts seeds)."""
    return [sum(v) / len(v) for v in by_seed.values()]


def paired_t(by_seed: dict[Any, tuple[list[float], list[float]]], level: float = 0.95) -> Paired:
    """Per seed, the mean of the method's values minus the mean of its baseline's; their t_interval."""
    return t_interval([sum(m) / len(m) - sum(b) / len(b) for m, b in by_seed.values()], level)


COMPUTE_TOLERANCE = 0.10  # equal_compute: the baseline's training multiply-adds within ±10 % of the run's


def equal_compute(run_flops: float, base_flops: float) -> bool:
    """The baseline's train_flops within ±10 % *of the run's*: |base − run| ≤ 0.1 · run. The run is the
    reference (run 100, baseline 111: 11 % more, not equal; |run/base − 1| = 0.099 would say it is)."""
    return run_flops > 0 and abs(base_flops - run_flops) <= COMPUTE_TOLERANCE * run_flops


# ---------------------------------------------------------------------------------------------------
# Pareto front
# ---------------------------------------------------------------------------------------------------
def pareto_front(points: list[dict], objectives: list[tuple[str, str]]) -> list[dict]:
    """Non-dominated points (each a dict holding every objective metric)."""
    def key(p):
        return [p[m] if md == "min" else -p[m] for m, md in objectives]

    pts = [p for p in points if all(isinstance(p.get(m), (int, float)) and math.isfinite(p[m])
                                    for m, _ in objectives)]
    front = []
    for p in pts:
        kp = key(p)
        dominated = False
        for q in pts:
            kq = key(q)
            if q is not p and all(a <= b for a, b in zip(kq, kp)) and any(a < b for a, b in zip(kq, kp)):
                dominated = True
                break
        if not dominated:
            front.append(p)
    return sorted(front, key=key)


def pareto_mask(points: list[tuple[float, ...]], modes: tuple[str, ...] | None = None) -> list[bool]:
    """For each point, whether it is on pareto_front over its coordinates (each minimised, or as `modes`
    says: 'min' | 'max' per coordinate). Equal points dominate neither each other; a coordinate that is no
    finite number keeps its point off the front."""
    if not points:
        return []
    modes = modes or ("min",) * len(points[0])
    dicts = [{f"c{i}": v for i, v in enumerate(p)} for p in points]
    front = {id(p) for p in pareto_front(dicts, [(f"c{i}", md) for i, md in enumerate(modes)])}
    return [id(p) in front for p in dicts]
