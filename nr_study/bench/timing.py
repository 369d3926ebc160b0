"""The timing machinery every row shares: calls timed alternately (A, B, A, B, ..., the order rotated each
repetition, after a warm-up), medians of per-repetition ratios with their spread, and the row record. Pairs
taken back to back see the same machine load, so their ratio is far steadier than either time."""
from __future__ import annotations

import math
import statistics
import time
from typing import Callable, Optional

import torch


def _sync(device: torch.device) -> None:
    """CUDA runs asynchronously: without a barrier a timing would see only the kernel launches."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_call(fn: Callable[[], object], device: torch.device) -> float:
    """Seconds one call takes, the device synchronised before and after."""
    _sync(device)
    t0 = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - t0


def alternate(fns: dict[str, Callable[[], object]], reps: int, warmup: int, device: torch.device
              ) -> dict[str, list[float]]:
    """Time each fn once per repetition, interleaved, the order rotated every repetition; warm-up first."""
    names = list(fns)
    for _ in range(warmup):
        for n in names:
            fns[n]()
    _sync(device)
    times: dict[str, list[float]] = {n: [] for n in names}
    for i in range(reps):
        k = i % len(names)
        for n in names[k:] + names[:k]:
            times[n].append(time_call(fns[n], device))
    return times


def spread(xs: list[float]) -> tuple[float, float, float, str]:
    """(median, lo, hi, kind): IQR with 4+ values, else min–max."""
    xs = sorted(xs)
    med = statistics.median(xs)
    if len(xs) >= 4:
        q = statistics.quantiles(xs, n=4, method="inclusive")
        return med, q[0], q[2], "IQR"
    return med, xs[0], xs[-1], "min–max"


def ratio_stats(num: list[float], den: list[float]) -> tuple[float, str]:
    """Median of the per-repetition ratios num[i]/den[i], and a text with the spread and both medians."""
    ratios = [a / b for a, b in zip(num, den)]
    med, lo, hi, kind = spread(ratios)
    return med, (f"{kind} {lo:.3f}–{hi:.3f}, n={len(ratios)}; medians {fmt_seconds(statistics.median(num))} / "
                 f"{fmt_seconds(statistics.median(den))}")


def fmt_seconds(t: float) -> str:
    """A duration in the unit that keeps it readable (s, ms, µs)."""
    if t >= 1:
        return f"{t:.2f}s"
    if t >= 1e-3:
        return f"{t * 1e3:.1f}ms"
    return f"{t * 1e6:.0f}µs"


def row(name: str, value: Optional[float], goal: Optional[float], unit: str, detail: str) -> dict:
    """One result, as --json writes it; a non-finite value becomes null (JSON has no NaN)."""
    if value is not None and not math.isfinite(value):
        value = None
    return {"name": name, "value": None if value is None else float(value), "goal": goal, "unit": unit,
            "detail": detail}


def error_row(name: str, goal: Optional[float], unit: str, exc: BaseException) -> dict:
    """A row that failed: null, and one line saying why, so one failure never hides the other rows."""
    msg = f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
    return row(name, None, goal, unit, f"failed: {msg}")
