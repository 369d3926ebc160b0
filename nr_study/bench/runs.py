"""Whole-run rows: short real BL and NR train() runs alternated, giving NR's whole-run cost, where its gap goes
(train()'s phase_s), the step on the network NR grew, and the share of wall time inside MLflow tracking."""
from __future__ import annotations

import contextlib
import statistics
import tempfile
import time
from pathlib import Path
from typing import Optional

import torch
import torch.nn as nn

from nr_study.bench.settings import GOALS, Sizes
from nr_study.bench.steps import time_steps
from nr_study.bench.timing import error_row, fmt_seconds, ratio_stats, row, spread


_TRACKED = ("__init__", "start", "log_params", "set_tags", "log_epoch", "sync_history", "log_summary", "log_dict",
            "log_text", "log_artifact", "end")


@contextlib.contextmanager
def instrument_tracker():
    """Accumulate wall time spent inside RunTracker's calls (outermost call only) into the yielded dict."""
    from nr_study.tracking import RunTracker

    acc = {"total": 0.0, "calls": 0, "by": {}}
    depth = [0]
    saved = {n: RunTracker.__dict__[n] for n in _TRACKED if n in RunTracker.__dict__}

    def wrap(name, fn):
        def inner(*a, **k):
            if depth[0]:
                return fn(*a, **k)
            depth[0] += 1
            t0 = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                dt = time.perf_counter() - t0
                depth[0] -= 1
                acc["total"] += dt
                acc["calls"] += 1
                acc["by"][name] = acc["by"].get(name, 0.0) + dt
        return inner

    for n, fn in saved.items():
        setattr(RunTracker, n, wrap(n, fn))
    try:
        yield acc
    finally:
        for n, fn in saved.items():
            setattr(RunTracker, n, fn)


def _run_cfg(sz: Sizes, device: torch.device, method: str, epochs: Optional[int] = None) -> dict:
    """The configuration of one timed run (BL or NR), equal in everything but the method."""
    width, hw, n_train, batch, ep, _ = sz.run
    cuda = device.type == "cuda"
    threads = torch.get_num_threads() if device.type == "cpu" else None
    cfg = {"method": method, "seed": 0,
           "model": {"name": "vgg_small", "kwargs": {"width": width}},
           "data": {"name": "synthetic", "n_train": n_train, "n_test": max(64, n_train // 4),
                    "synthetic": {"shape": [3, hw, hw], "noise": 0.5}},
           "optim": {"lr": 0.1},
           "train": {"epochs": epochs or ep, "batch_size": batch, "eval_batch_size": 256, "threads": threads,
                     "device": device.type, "channels_last": cuda, "bf16": cuda},
           "tracking": {"experiment": "nr-bench"}}
    if method != "BL":
        # monitor every 4 steps with a steep λ ramp, so the run rejuvenates (surgery included) around step 20:
        # a far denser monitor than the paper's once per epoch, so this overhead is an upper bound
        # constraint FLOPs: the rejuvenated network keeps the BL network's compute, so the ratio shows NR's own
        # cost (under a params budget realloc may move width to the high-resolution layers and raise FLOPs)
        cfg["nr"] = {"tr": 0.97, "dead_threshold": 0.8, "delta_t": 4, "delta_t_unit": "step",
                     "delta_lambda": 0.04, "max_rejuvenations": 1, "constraint": "flops"}
    return cfg


def _safe_ratio(a, b) -> str:
    """a / b for a detail text, '?' where either is missing: a detail must never fail its row."""
    try:
        return f"{float(a) / float(b):.3f}"
    except (TypeError, ValueError, ZeroDivisionError):
        return "?"


def bench_runs(sz: Sizes, device: torch.device) -> list[dict]:
    """BL, NR and NR with round_to 8 as real train() runs, the order rotating over sz.run's pairs, one sqlite
    store; from the same runs: the MLflow share, the gap by part, and the step on the grown network."""
    from nr_study.train import train

    pairs = sz.run[5]
    try:
        with tempfile.TemporaryDirectory(prefix="nr-bench-runs-") as td:
            uri = f"sqlite:///{Path(td) / 'mlflow.db'}"
            # warm-up: creates the store and the experiment (a sweep's trial finds them made), loads mlflow
            train(_run_cfg(sz, device, "BL", epochs=1), tracking_uri=uri, progress=False)
            arms = ["BL", "NR", "NR_round8"]  # NR_round8: NR with nr.round_to 8 (the CUDA default) on any device
            walls: dict[str, list[float]] = {a: [] for a in arms}
            shares, per_epoch, fixed, rejuv, flops, runs = [], [], [], [], {}, {}
            phases: dict[str, list[dict]] = {a: [] for a in arms}
            round8_refused = None  # a net too narrow for widths in multiples of 8 (--tiny): the core refuses
            for i in range(pairs):
                for method in arms[i % 3:] + arms[:i % 3]:  # the order rotates
                    if method == "NR_round8" and round8_refused:
                        continue
                    cfg = _run_cfg(sz, device, "BL" if method == "BL" else "NR")
                    if method == "NR_round8":
                        cfg["nr"]["round_to"] = 8
                    with instrument_tracker() as acc:
                        t0 = time.perf_counter()
                        try:
                            summary = train(cfg, tracking_uri=uri, progress=False)
                        except Exception as exc:
                            if method != "NR_round8":
                                raise
                            round8_refused = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
                            continue
                        wall = time.perf_counter() - t0
                    walls[method].append(wall)
                    phases[method].append(dict(summary["phase_s"], rest=wall - sum(summary["phase_s"].values())))
                    shares.append(acc["total"] / wall)
                    ep = cfg["train"]["epochs"]
                    per_epoch.append(acc["by"].get("log_epoch", 0.0) / ep)
                    fixed.append(acc["total"] - acc["by"].get("log_epoch", 0.0))
                    flops[method] = summary.get("final_flops")
                    runs[method] = summary["run_id"]
                    if method == "NR":
                        rejuv.append(int(summary.get("rejuvenations", 0)))
            grown = "NR_round8" if "NR_round8" in runs else "NR"  # round8: the allocation alone, not odd widths
            arch_row = _grown_step_row(sz, device, uri, runs[grown], runs["BL"], grown)
        width, hw, n_train, batch, ep, _ = sz.run
        what = (f"vgg_small w{width}, synthetic 3x{hw}x{hw}, {n_train} train images, batch {batch}, {ep} epochs, "
                f"{device.type}")
        med, lo, hi, kind = spread(shares)
        share_row = row("mlflow_share", med, GOALS["mlflow"], "ratio",
                        f"{kind} {lo:.3f}–{hi:.3f}, n={len(shares)} runs (BL and NR); per epoch "
                        f"{fmt_seconds(statistics.median(per_epoch))} (one log_batch), per run fixed "
                        f"{fmt_seconds(statistics.median(fixed))} (client, run, params, config, final artifacts, "
                        f"model.pt); sqlite store in a temp dir; {what}")
        r, d = ratio_stats(walls["NR"], walls["BL"])
        run_row = row("run_nr/bl", r, GOALS["run"], "ratio",
                      f"{d}; NR rejuvenations per run {rejuv}, constraint flops (final FLOPs NR/BL "
                      f"{_safe_ratio(flops.get('NR'), flops.get('BL'))}); monitor every "
                      f"{_run_cfg(sz, device, 'NR')['nr']['delta_t']} steps; {what}; tracking included in both")
        if round8_refused:
            round8_row = row("run_nr_round8/bl", None, None, "ratio", f"not measured: NR with nr.round_to 8 does not "
                             f"run on this net ({round8_refused}); {what}")
        else:
            r8, d8 = ratio_stats(walls["NR_round8"], walls["BL"])
            round8_row = row("run_nr_round8/bl", r8, None, "ratio",
                             f"{d8}; the same NR run with nr.round_to 8: final FLOPs NR_round8/BL "
                             f"{_safe_ratio(flops.get('NR_round8'), flops.get('BL'))}; {what}")
        return [share_row, run_row, round8_row, arch_row, breakdown_row(walls, phases)]
    except Exception as exc:
        return [error_row("mlflow_share", GOALS["mlflow"], "ratio", exc),
                error_row("run_nr/bl", GOALS["run"], "ratio", exc),
                error_row("run_nr_round8/bl", None, "ratio", exc),
                error_row("step_rejuvenated/bl", None, "ratio", exc),
                error_row("run_gap_by_part", None, "s", exc)]


def _grown_step_row(sz: Sizes, device: torch.device, uri: str, nr_run: str, bl_run: str, arm: str) -> dict:
    """Is the gap NR's own work or the network it grew? The trainer's step on an NR run's final network (its
    logged model) against BL's, on the run's batch, alternated; also per forward FLOP. NR moves width where
    the budget is cheapest, which at equal FLOPs need not be equally fast."""
    from nr_study.tracking import load_model

    _, hw, _, batch, _, _ = sz.run
    _, _, _, _, warmup, reps = sz.step_models[0]
    models = {name: load_model(run_id, uri) for name, run_id in ((arm, nr_run), ("BL", bl_run))}
    widths = {name: [m.out_channels for m in model.modules() if isinstance(m, nn.Conv2d)]
              for name, model in models.items()}
    t, flops = time_steps(models, batch, hw, warmup, reps, device)
    r, d = ratio_stats(t[arm], t["BL"])
    fr = flops[arm] / flops["BL"]
    return row("step_rejuvenated/bl", r, None, "ratio", f"{d}; the final network of the {arm} run; FLOPs {fr:.3f}, "
               f"per FLOP {r / fr:.3f}; conv widths {widths[arm]} vs BL {widths['BL']}; batch {batch}, {hw}x{hw}, "
               f"{device.type}")


def breakdown_row(walls: dict[str, list[float]], phases: dict[str, list[dict]]) -> dict:
    """Where NR's whole run costs more than BL's: per part of the loop, the median over the alternated pairs of
    (NR − BL) seconds, largest first, beside the median gap itself (train()'s phase_s; 'rest' = the wall time
    outside every timed part)."""
    gap = statistics.median(n - b for n, b in zip(walls["NR"], walls["BL"]))
    parts = sorted({k for p in phases["NR"] + phases["BL"] for k in p})
    diffs = {k: statistics.median(n.get(k, 0.0) - b.get(k, 0.0) for n, b in zip(phases["NR"], phases["BL"]))
             for k in parts}
    shown = ", ".join(f"{k} {v:+.2f}s" for k, v in sorted(diffs.items(), key=lambda kv: -abs(kv[1])))
    bl = statistics.median(walls["BL"])
    return row("run_gap_by_part", gap, None, "s", f"NR − BL wall per run, median of {len(walls['NR'])} pairs "
               f"({gap / bl:+.1%} of BL's {bl:.2f}s); by part (NR − BL, medians): {shown}")

