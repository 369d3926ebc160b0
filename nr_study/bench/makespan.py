"""Sweep rows: a real sweep's makespan on an embedded Ray against the ideal (Σ trial time / slots), with fresh
worker processes and with reuse_actors, alternated. The sweep engine is optional here: without it the rows say
why and carry no number."""
from __future__ import annotations

import io
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

from nr_study.bench.settings import GOALS, Sizes
from nr_study.bench.timing import row, spread


def _sweep_doc(device: torch.device, trials: int, reuse_actors: bool, n_train: int, epochs: int) -> dict:
    """The search space of the timed sweep: `trials` seeds of a small BL run, one CPU each."""
    return {
        "name": "bench-sweep", "experiment": "nr-bench-sweep",
        "base": {"method": "BL", "model": {"name": "vgg_small", "kwargs": {"width": 8}},
                 "data": {"name": "synthetic", "n_train": n_train, "n_test": 128,
                          "synthetic": {"shape": [1, 16, 16], "noise": 0.5}},
                 "train": {"epochs": epochs, "batch_size": 32, "eval_batch_size": 128, "device": "cpu"},
                 "optim": {"lr": 0.05}},
        "space": {"seed": list(range(trials))},
        "resources_per_trial": {"cpu": 1},
        "max_failures": 0,
        "reuse_actors": reuse_actors,
    }


def bench_sweep(sz: Sizes, device: torch.device) -> list[dict]:
    """The sweep's makespan against the ideal (Σ trial time / slots), with fresh worker processes per trial and
    with reuse_actors (the default), alternated over sz.sweep_reps repetitions (the order rotates), each row
    the median of its repetitions with their spread: one sweep's makespan moves with the machine's load."""
    names = {False: "sweep_makespan/ideal", True: "sweep_makespan/ideal[reuse_actors]"}
    goal = GOALS["sweep"]
    if not sz.sweep:
        return [row(names[r], None, goal, "ratio", "skipped in --tiny") for r in (False, True)]
    runs: dict[bool, list[dict]] = {False: [], True: []}
    failed: dict[bool, str] = {}
    for i in range(sz.sweep_reps):
        for reuse in ((False, True) if i % 2 == 0 else (True, False)):
            if reuse in failed:
                continue
            try:
                runs[reuse].append(_sweep_once(sz.sweep, device, reuse, *sz.sweep_trial))
            except _NoSweep as exc:
                failed[reuse] = str(exc)
            except Exception as exc:
                failed[reuse] = f"failed: {type(exc).__name__}: {exc}".splitlines()[0][:300]
    rows = []
    for reuse in (False, True):
        if reuse in failed:
            rows.append(row(names[reuse], None, goal, "ratio", failed[reuse]))
            continue
        rs = runs[reuse]
        med, lo, hi, kind = spread([r["makespan"] / r["ideal"] for r in rs])
        mid = sorted(rs, key=lambda r: r["makespan"] / r["ideal"])[(len(rs) - 1) // 2]  # the median repetition
        times = mid["times"]
        n_train, epochs = sz.sweep_trial
        rows.append(row(names[reuse], med, goal, "ratio",
                        f"{kind} {lo:.3f}–{hi:.3f}, n={len(rs)} sweeps; the median one: makespan (Tuner.fit) "
                        f"{mid['makespan']:.1f}s vs Σ trial time {sum(times):.1f}s / {mid['slots']} slots = "
                        f"{mid['ideal']:.1f}s, trials {min(times):.1f}–{max(times):.1f}s (Ray time_total_s) in "
                        f"{mid['processes']} worker process(es), whole run_sweep incl. MLflow server start "
                        f"{mid['wall']:.1f}s; {sz.sweep} trials vgg_small w8 16x16 synthetic, {n_train} images, "
                        f"{epochs} epochs, embedded Ray, reuse_actors {str(reuse).lower()}, cpu"))
    if runs[True] and runs[False] and not failed:  # a reused process also skips the imports a trial pays
        fresh = statistics.median(r["makespan"] for r in runs[False])
        reused = statistics.median(r["makespan"] for r in runs[True])
        rows[-1]["detail"] += (f"; median makespan vs fresh workers {reused / fresh:.2f}x (a reused worker also "
                               f"skips the imports its first trial paid, so the ideal shrinks too)")
    return rows


class _NoSweep(Exception):
    """The sweep engine cannot run here (an optional part missing): the row says why, with no number."""


def _sweep_once(n: int, device: torch.device, reuse: bool, n_train: int, epochs: int) -> dict:
    """One real sweep of n trials on an embedded Ray: its Tuner.fit makespan, each trial's time, the slots."""
    try:
        import yaml

        from nr_study.sweep import load_search_space, run_sweep
    except Exception as exc:  # the sweep engine is optional here: say why, never invent a number
        raise _NoSweep(f"sweep engine not usable: {type(exc).__name__}: {exc}") from exc
    try:
        import ray
        from ray import tune

        from nr_study.train import available_cpus
    except Exception as exc:
        raise _NoSweep(f"Ray Tune not importable: {type(exc).__name__}: {exc}") from exc
    captured: dict = {}
    orig_fit = tune.Tuner.fit

    def timed_fit(self):
        t0 = time.perf_counter()
        try:
            res = orig_fit(self)
        finally:
            captured["makespan"] = time.perf_counter() - t0
        captured["results"] = res
        return res

    old_env = os.environ.get("MLFLOW_TRACKING_URI")
    try:
        with tempfile.TemporaryDirectory(prefix="nr-bench-sweep-") as td:
            doc = _sweep_doc(device, n, reuse, n_train, epochs)
            path = Path(td) / "bench_sweep.yaml"
            text = yaml.safe_dump(doc, sort_keys=False)
            path.write_text(text)
            space = load_search_space(path)
            # the embedded default, always a fresh local instance: a bare ray.init() joins any Ray cluster
            # already running on this machine (someone else's sweep or tests), which would skew the makespan
            own_ray = not ray.is_initialized()
            if own_ray:
                ray.init(address="local", num_cpus=available_cpus(), include_dashboard=False,
                         _node_ip_address="127.0.0.1", log_to_driver=False)
            tune.Tuner.fit = timed_fit
            t0 = time.perf_counter()
            try:
                run_sweep(space, source_text=text, runs=str(Path(td) / "runs"), verbose=0, out=io.StringIO())
            finally:
                tune.Tuner.fit = orig_fit
                if own_ray:
                    ray.shutdown()
            wall = time.perf_counter() - t0
    finally:
        if old_env is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = old_env
    results = captured.get("results")
    if results is None:
        raise _NoSweep("the sweep ran no Tuner.fit (nothing to time)")
    times, errors, pids = [], 0, set()
    for r in results:
        errors += bool(r.error)
        tt = (r.metrics or {}).get("time_total_s")
        if isinstance(tt, (int, float)):
            times.append(float(tt))
        pids.add((r.metrics or {}).get("pid"))
    if errors or len(times) != n:
        raise _NoSweep(f"{errors} of {n} trials errored / {len(times)} reported a time; no ratio")
    cpu = float(doc["resources_per_trial"]["cpu"])
    slots = max(1, min(n, doc.get("max_concurrent") or n, int(available_cpus() // cpu)))
    return {"makespan": captured["makespan"], "ideal": sum(times) / slots, "times": times, "slots": slots,
            "processes": len(pids), "wall": wall}

