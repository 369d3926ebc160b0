"""Run a search space on Ray Tune: one MLflow parent run per sweep, one child run per trial.

Layout of the run folder (`runs/`, or $NR_STUDY_RUNS):
    mlflow.db, mlartifacts/, mlflow_server.log      the local MLflow server's SQLite file and artifacts
    sweeps/<name>-<YYYYmmdd-HHMMSS>/                 Ray Tune's experiment folder (storage) for one sweep:
        nr_sweep.json                                parent run id, experiment, the search-space document
        optuna.db                                    search: optuna — the Optuna study (the driver writes it)
        trials/<trial_id>/state.pt                   the trial's working checkpoint (trainer's format)
        <Ray trial dirs, tuner.pkl, experiment_state-*.json>

Run continuity: the trial creates its MLflow child run up front (tag nr.trial = Ray trial id) unless its
checkpoint names one; the trainer's checkpoint carries the run id, so a retried (FailureConfig.max_failures) or
resumed (`--resume`, Tuner.restore) trial reopens THE SAME run and the trainer logs each epoch once. A trial
restarted without a checkpoint finds its run again by the nr.trial tag. At the end (also on errors and
Ctrl-C) every child still RUNNING is closed: FINISHED (finished or stopped early by ASHA, tag
nr.early_stopped), FAILED (errored) or KILLED (interrupted).

Faults (docs/reliability.md): `--resume` first reads every file Ray's restore needs (nr_study/sweep/state.py);
when Ray's state is cut short (a full disk) a grid sweep is rebuilt from the run folder (each configuration that
ran continues from trials/<id>/state.pt in its MLflow run, matched by its values), anything else is refused with
one line (exit 2, nothing changed) — never Ray's silent "Restarting experiment". The sweep's exit code is 0 only
when every configuration of the space finished. The sweep's own mlflow server is supervised and restarted on the
same address when it dies; a trial that loses its tracking server waits for it (bounded) and continues from its
checkpoint in the same process instead of spending one of Ray's retries.
"""
from __future__ import annotations

import contextlib
import errno
import functools
import json
import logging
import math
import os
import re
import shlex
import shutil
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from nr_study.errors import ConfigError, FaultError, Terminated, UserError, one_line
from nr_study.files import check_sqlite_store, read_json, write_json_atomic

# Before Ray is imported anywhere: the classic CLIReporter table (trimmed to our metrics), no per-checkpoint
# snapshot warnings, no MLflow "View run" lines from every trial.
os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
_WORKER_ENV = ("RAY_AIR_NEW_OUTPUT", "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "MLFLOW_DISABLE_TELEMETRY",
               "NR_STUDY_DATA")
from nr_study.sweep.space import REPEAT_KEY, TRIAL_INDEX_KEY, SearchSpace, distinct_labels, dump_document, fmt_value

SWEEP_FILE = "nr_sweep.json"
METRIC_COLUMNS = ("test_err", "util_params", "lambda", "rejuvenations", "params")
from nr_study.names import (DELTA_METRIC, FAILED, FINISHED, KILLED, OPTUNA_DB, RUNNING, TAG_CELL,  # noqa: E402
                            TAG_GPUS, TAG_NODE, TAG_TRIAL)


# --------------------------------------------------------------------------------------------- context
@dataclass
class TrialContext:
    """What every trial needs from the driver (picklable; passed with tune.with_parameters)."""

    space: SearchSpace
    tracking_uri: str
    parent_run_id: str
    experiment_id: str
    sweep_dir: str           # absolute
    data_root: Optional[str]  # absolute default for data.root (trials run in their own working dir)
    aliases: Optional[dict] = None  # a rebuilt sweep: configuration key -> the trial id it first ran as
    store_dir: Optional[str] = None  # the tracking store's folder when it is on this machine's disk

    def identity(self, trial_id: str, config: dict) -> str:
        """The id a trial's checkpoint folder and MLflow run go by: the Ray trial id, or in a sweep rebuilt from
        its run folder (Ray's state unreadable) the id its configuration first ran as."""
        if self.aliases:
            from nr_study.sweep.state import config_key

            return self.aliases.get(config_key(config), trial_id)
        return trial_id


def _client(uri: str):
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


def _find_child(client, ctx: TrialContext, trial_id: str) -> Optional[str]:
    from nr_study.tracking import tracking_error

    try:
        runs = client.search_runs(
            [ctx.experiment_id],
            filter_string=f"tags.mlflow.parentRunId = '{ctx.parent_run_id}' and tags.`nr.trial` = '{trial_id}'",
            max_results=5)
    except Exception as exc:  # the trainer's one-line TrackingError, not a raw MlflowException
        raise tracking_error(ctx.tracking_uri, f"finding trial {trial_id}'s run", exc) from exc
    return runs[0].info.run_id if runs else None


def _server_answers(uri: str, timeout: float = 3.0) -> bool:
    """The tracking server answers HTTP at all (its /health, or any reply below 500 from a proxy in front)."""
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout) as resp:
            return resp.status < 500
    except urllib.error.HTTPError as exc:
        return exc.code < 500
    except (urllib.error.URLError, OSError, ValueError):
        return False


def tracking_wait_s() -> float:
    try:
        return max(0.0, float(os.environ.get("NR_STUDY_TRACKING_WAIT_S", "300")))
    except ValueError:
        return 300.0


def _wait_for_tracking(uri: str, who: str, exc: BaseException, budget: Optional[float] = None,
                       poll: float = 2.0) -> bool:
    """After a tracking failure: True when the server was (or is) down and answers again within `budget`
    seconds ($NR_STUDY_TRACKING_WAIT_S, default 300) — retry then; False for an error the server itself gave
    (it answers) or when it stays down (the caller fails as before). One line when it starts waiting, one when
    the server is back or the wait ends."""
    if not uri.startswith(("http://", "https://")):
        return False
    unreachable = "unreachable" in str(exc)
    if _server_answers(uri):
        return unreachable  # it was down and is back already; any other error is the server's own answer
    budget = tracking_wait_s() if budget is None else budget
    t0 = time.monotonic()
    print(f"{who}: tracking server {uri} is not answering; waiting up to {budget:.0f} s for it "
          f"(NR_STUDY_TRACKING_WAIT_S) instead of failing; the checkpoint is kept", file=sys.stderr, flush=True)
    while time.monotonic() - t0 < budget:
        time.sleep(poll)
        if _server_answers(uri):
            print(f"{who}: tracking server {uri} answers again after {time.monotonic() - t0:.0f} s; continuing",
                  file=sys.stderr, flush=True)
            return True
    print(f"{who}: tracking server {uri} still not answering after {budget:.0f} s; giving up", file=sys.stderr,
          flush=True)
    return False


def local_store_dir(tracking_uri: Optional[str], runs_folder: Path) -> Optional[str]:
    """Where the tracking store lives on this machine: the run folder for the sweep's own server, a sqlite URI's
    folder; None for a server elsewhere (its disk is not ours to measure)."""
    if not tracking_uri:
        return str(runs_folder)
    if tracking_uri.startswith("sqlite:///"):
        return str(Path(tracking_uri[len("sqlite:///"):]).parent)
    return None


def check_disk(sweep_dir, store_dir: Optional[str], what: str = "sweep folder") -> None:
    """Stop at once, naming the folder, when the sweep folder or the tracking store has too little space left: a
    full SQLite store makes the server answer 503, which MLflow's client retries for minutes as if the server were
    overloaded."""
    from nr_study.files import SWEEP_FREE_BYTES, check_free_space

    check_free_space(Path(sweep_dir), SWEEP_FREE_BYTES, what, fix="free some space")
    if store_dir:
        check_free_space(Path(store_dir), SWEEP_FREE_BYTES, "tracking store folder", fix="free some space")


def _store_full(store_dir: Optional[str]) -> bool:
    """The tracking store's disk has too little room: every MLflow write would be retried for minutes, then fail."""
    from nr_study.files import SWEEP_FREE_BYTES

    try:
        return store_dir is not None and shutil.disk_usage(store_dir).free < SWEEP_FREE_BYTES
    except OSError:
        return False


def _full_disk(sweep_dir, store_dir: Optional[str]) -> Optional[str]:
    """check_disk's line, or None when there is room."""
    from nr_study.errors import DiskFullError

    try:
        check_disk(sweep_dir, store_dir)
    except DiskFullError as exc:
        return str(exc)
    return None


def _clear_tracking_error(client, run_id: str) -> None:
    """A run ended FAILED by a tracking outage the trial then waited out: drop that nr.error tag."""
    try:
        if client.get_run(run_id).data.tags.get("nr.error", "").startswith("TrackingError"):
            client.delete_tag(run_id, "nr.error")
    except Exception:
        pass


def _numeric(row: dict) -> dict:
    out = {}
    for k, v in row.items():
        if isinstance(v, bool):
            out[k] = int(v)
        elif isinstance(v, (int, float)):
            out[k] = v
    return out


# --------------------------------------------------------------------------------------------- trial
def trial_fn(config: dict, ctx: TrialContext) -> None:
    """One Ray Tune trial: resolve the config, find/create its MLflow run, train with checkpoints."""
    from ray import tune

    from nr_study.errors import TrackingError
    from nr_study.train import CKPT_NAME, load_checkpoint

    import logging

    logging.getLogger("ray.train._internal.storage").setLevel(logging.WARNING)  # one line per checkpoint
    space = ctx.space
    tctx = tune.get_context()
    trial_id = ctx.identity(tctx.get_trial_id(), config)
    cfg, run_name, tags = space.resolve_trial(config, ctx.data_root)  # validated once, named, tagged
    tags[TAG_TRIAL] = trial_id
    try:
        import ray

        tags[TAG_NODE] = ray.get_runtime_context().get_node_id()
        gpus = ray.get_gpu_ids()
        tags[TAG_GPUS] = ",".join(str(g) for g in gpus) if gpus else "-"
    except Exception:
        pass

    check_disk(ctx.sweep_dir, ctx.store_dir)  # before anything is written or a run is created
    # The working checkpoint folder is stable across retries and resumes of this trial (absolute path).
    work = Path(ctx.sweep_dir) / "trials" / trial_id
    work.mkdir(parents=True, exist_ok=True)
    _write_trial_config(work, config)
    if trial_id != tctx.get_trial_id():
        tags["nr.ray_trial"] = tctx.get_trial_id()
    local = load_checkpoint(work)
    ray_ckpt = tune.get_checkpoint()
    ray_epoch = 0
    if ray_ckpt is not None:
        try:
            with ray_ckpt.as_directory() as d:
                src = Path(d) / CKPT_NAME
                if src.is_file():
                    import torch

                    st = torch.load(src, map_location="cpu", weights_only=True)
                    ray_epoch = int(st.get("epoch", 0))
                    if local is None or int(local.get("epoch", 0)) < ray_epoch:
                        shutil.copy2(src, work / CKPT_NAME)
                        local = st
        except Exception as exc:  # Ray's copy cut short (a full disk) or gone: the trainer's own file is atomic
            ray_epoch = int((local or {}).get("epoch", 0))
            print(f"trial {trial_id}: Ray's checkpoint copy is unreadable ({type(exc).__name__}: "
                  f"{str(exc).splitlines()[0][:160] if str(exc) else ''}); continuing from "
                  f"{work / CKPT_NAME if local else 'the start'}", file=sys.stderr, flush=True)
    # The tracking server down (killed, restarting, a network blip): wait for it here, bounded, and continue
    # from the checkpoint in this same process, instead of failing the trial and burning one of Ray's retries.
    reported = {"epoch": ray_epoch}  # the last epoch Ray has from this trial
    attempt = 0
    while True:
        try:
            return _trial_attempt(config, ctx, cfg, trial_id, run_name, tags, work, local, reported, attempt)
        except TrackingError as exc:
            check_disk(ctx.sweep_dir, ctx.store_dir)  # a store on a full disk answers 503 as if overloaded
            attempt += 1
            if attempt > 20 or not _wait_for_tracking(ctx.tracking_uri, f"trial {trial_id}", exc):
                raise
            local = load_checkpoint(work)


def _trial_attempt(config: dict, ctx: TrialContext, cfg, trial_id: str, run_name: str, tags: dict, work: Path,
                   local: Optional[dict], reported: dict, attempt: int) -> None:
    from ray import tune

    from nr_study.train import train
    from nr_study.tracking import open_run

    ray_epoch = reported["epoch"]
    resume = local is not None
    client = _client(ctx.tracking_uri)
    run_id = (local or {}).get("run_id") or _find_child(client, ctx, trial_id)
    if run_id is not None and attempt:
        _clear_tracking_error(client, run_id)
    if run_id is None:  # first start: create the child run now, so a retry before any checkpoint finds it
        run_id = open_run(ctx.tracking_uri, cfg, tags=tags, parent_run_id=ctx.parent_run_id).run_id

    # Epochs the local checkpoint holds beyond Ray's last persisted one (the worker died between the
    # trainer's checkpoint and its report): report them now so Ray's iteration count matches the run.
    if local is not None and int(local.get("epoch", 0)) > ray_epoch:
        rows = [r for r in local.get("history", []) if int(r["epoch"]) > ray_epoch]
        for i, row in enumerate(rows):
            last = i == len(rows) - 1
            tune.report(_numeric(row), checkpoint=tune.Checkpoint.from_directory(str(work)) if last else None)
            reported["epoch"] = int(row["epoch"])

    if (local is not None and int(local.get("epoch", 0)) >= int(local.get("end_epoch", cfg.train.epochs))
            and _status(client, run_id) == FINISHED):
        return  # finished (the driver died before Ray recorded it): nothing to re-run or re-log

    row_extras = None
    if ctx.space.pair_with:  # the paired baseline first: every epoch row then carries delta_test_err
        from nr_study.names import TAG_PAIR_RUN
        from nr_study.sweep.pairs import delta_row, train_pair

        pair = train_pair(ctx, cfg, client)
        client.set_tag(run_id, TAG_PAIR_RUN, pair["run_id"])
        row_extras = functools.partial(delta_row, pair_history=pair["history"])
    final: dict = {}

    def on_epoch_end(row: dict, checkpoint_dir: Optional[str]) -> None:
        if int(row["epoch"]) >= int(row.get("total_epochs", cfg.train.epochs)):  # more after a reset_epochs
            # The last epoch is reported after train() returns: a scheduler may stop a trial at its last
            # report (ASHA at max_t), and the trainer must first log the summary and the final model.
            final.update(row=row, checkpoint_dir=checkpoint_dir)
            return
        tune.report(_numeric(row), checkpoint=tune.Checkpoint.from_directory(checkpoint_dir))
        reported["epoch"] = int(row["epoch"])

    # Ray ends a trial it stops (ASHA, or a Ctrl-C of the sweep) with SystemExit from inside report(); the
    # driver, which knows which of the two it was, closes the run at the end of the sweep.
    summary = train(cfg, tracking_uri=ctx.tracking_uri, run_id=run_id, checkpoint_dir=str(work), resume=resume,
                    on_epoch_end=on_epoch_end, progress=False, tags=tags, parent_run_id=ctx.parent_run_id,
                    system_metrics=cfg.tracking.system_metrics is not False,  # on unless the space turns it off
                    row_extras=row_extras)
    if final:
        extra = {k: summary[k] for k in ("final_test_err", "best_test_err", "final_params", "final_flops")
                 if isinstance(summary.get(k), (int, float))}
        tune.report(_numeric({**final["row"], **extra}),
                    checkpoint=tune.Checkpoint.from_directory(final["checkpoint_dir"]))


def _write_trial_config(work: Path, config: dict) -> None:
    """trials/<id>/config.json: which configuration this trial is (what a rebuild from the run folder reads)."""
    from nr_study.sweep.state import TRIAL_CONFIG

    path = work / TRIAL_CONFIG
    if path.is_file():
        return
    try:
        write_json_atomic(path, config, sort_keys=True, default=str)
    except OSError:  # a full disk: the checkpoint write right after says so; params.json is the fallback
        pass


def _status(client, run_id: str) -> Optional[str]:
    try:
        return client.get_run(run_id).info.status
    except Exception:
        return None


# --------------------------------------------------------------------------------------------- Ray pieces
class TrialNamer:
    """Readable Ray trial names/dirs (picklable: kept in the Tuner state for restores)."""

    def __init__(self, space: SearchSpace, dirname: bool = False):
        self.space = space
        self.dirname = dirname

    def __call__(self, trial) -> str:
        try:
            _, name, _ = self.space.resolve_trial(trial.config)
        except Exception:
            name = "trial"
        if self.dirname:
            safe = "".join(c if (c.isalnum() or c in "-_.") else "_" for c in name)[:60]
            return f"{trial.trial_id}-{safe}"
        return name


def _multi_repeater():
    from ray.tune.search import Repeater

    class MultiRepeater(Repeater):
        """Ray's Repeater, also for a list of metrics (multi-objective Optuna): averages each metric."""

        def on_trial_complete(self, trial_id: str, result: Optional[dict] = None, **kwargs):
            metrics = self.searcher.metric
            if not isinstance(metrics, list):
                return super().on_trial_complete(trial_id, result, **kwargs)
            import numpy as np

            group = self._trial_id_to_group[trial_id]
            ok = result and all(m in result for m in metrics)
            group.report(trial_id, tuple(result[m] for m in metrics) if ok else tuple([np.nan] * len(metrics)))
            if group.finished_reporting():
                arr = np.array(group.scores(), dtype=float)
                means = np.nanmean(arr, axis=0)
                self.searcher.on_trial_complete(group.primary_trial_id,
                                                result={m: float(v) for m, v in zip(metrics, means)}, **kwargs)

    return MultiRepeater


def optuna_storage(sweep_dir) -> str:
    """The sweep's Optuna study (search: optuna): SQLite in the sweep folder, written by the driver only (the
    searcher lives there); a resumed sweep continues it, `make dashboard` opens it."""
    return f"sqlite:///{Path(sweep_dir).absolute() / OPTUNA_DB}"


def build_search_alg(space: SearchSpace, sweep_dir: Optional[str] = None):
    if space.search in ("grid", "random"):
        if space.search_seed is None:
            return None
        from ray.tune.search.basic_variant import BasicVariantGenerator

        return BasicVariantGenerator(random_state=space.search_seed)
    import optuna
    from ray.tune.search.optuna import OptunaSearch

    from nr_study.sweep.samplers import make_sampler

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    sampler = make_sampler(space.sampler or "tpe", space.search_seed)
    metrics = [m for m, _ in space.objectives]
    modes = [md for _, md in space.objectives]
    if len(metrics) == 1:
        metrics, modes = metrics[0], modes[0]
    storage = optuna.storages.RDBStorage(optuna_storage(sweep_dir)) if sweep_dir else None
    searcher = OptunaSearch(metric=metrics, mode=modes, sampler=sampler, storage=storage,
                            study_name=space.name if storage else None)
    if space.repeat > 1:
        searcher = _multi_repeater()(searcher, repeat=space.repeat, set_index=True)
    return searcher


def build_scheduler(space: SearchSpace):
    sc = space.scheduler
    if sc["type"] == "fifo":
        return None
    from ray.tune.schedulers import ASHAScheduler

    return ASHAScheduler(time_attr="training_iteration", metric=sc["metric"], mode=sc["mode"], max_t=sc["max_t"],
                         grace_period=sc["grace_period"], reduction_factor=sc["reduction_factor"],
                         brackets=sc["brackets"])


def build_reporter(space: SearchSpace):
    from ray.tune import CLIReporter

    params = {k: (k.split(".", 1)[-1] if "." in k else k) for k in space.swept_keys}
    if space.repeat > 1:
        params[REPEAT_KEY if space.search != "optuna" else TRIAL_INDEX_KEY] = "rep"
    metrics = {"training_iteration": "epoch"}
    metrics.update({m: ("util" if m == "util_params" else "rejuv" if m == "rejuvenations" else m)
                    for m in METRIC_COLUMNS})
    if space.pair_with:
        metrics[DELTA_METRIC] = f"Δ vs {space.pair_with}"
    return CLIReporter(metric_columns=metrics, parameter_columns=params, max_report_frequency=30,
                       total_samples=space.num_trials, max_column_length=16)


def build_trainable(space: SearchSpace, ctx: TrialContext):
    from ray import tune

    res = {"cpu": space.cpu}
    if space.gpu:
        res["gpu"] = space.gpu
    return tune.with_resources(tune.with_parameters(trial_fn, ctx=ctx), res)


def build_tuner(space: SearchSpace, ctx: TrialContext, storage_root: Path, sweep_name: str,
                verbose: int = 1):
    from ray import tune

    tune_config = tune.TuneConfig(
        search_alg=build_search_alg(space, ctx.sweep_dir),
        scheduler=build_scheduler(space),
        num_samples=space.num_trials if space.search == "optuna" else space.num_samples,
        max_concurrent_trials=space.max_concurrent,
        reuse_actors=space.reuse_actors,
        trial_name_creator=TrialNamer(space),
        trial_dirname_creator=TrialNamer(space, dirname=True),
    )
    run_config = tune.RunConfig(
        name=sweep_name,
        storage_path=str(storage_root),
        failure_config=tune.FailureConfig(max_failures=space.max_failures),
        checkpoint_config=tune.CheckpointConfig(num_to_keep=2),
        progress_reporter=build_reporter(space),
        verbose=verbose,
    )
    return tune.Tuner(build_trainable(space, ctx), param_space=space.param_space(),
                      tune_config=tune_config, run_config=run_config)


# --------------------------------------------------------------------------------------------- MLflow parent
def _param_items(space: SearchSpace) -> dict:
    from nr_study.config import flatten

    p: dict[str, Any] = {"sweep.name": space.name, "sweep.search": space.search,
                         "sweep.pair_with": space.pair_with or "-", "sweep.reuse_actors": space.reuse_actors,
                         "sweep.scheduler": space.scheduler["type"], "sweep.num_samples": space.num_samples,
                         "sweep.num_trials": space.num_trials, "sweep.repeat": space.repeat,
                         "sweep.max_concurrent": space.max_concurrent, "sweep.max_failures": space.max_failures,
                         "sweep.cpu": space.cpu, "sweep.gpu": space.gpu,
                         "sweep.objectives": ",".join(f"{m}:{md}" for m, md in space.objectives)}
    if space.sampler:
        p["sweep.sampler"] = space.sampler
    for d in space.dims:
        p[f"space.{d.key}"] = d.describe()
    for k, v in flatten(space.base).items():
        p[f"base.{k}"] = json.dumps(v) if isinstance(v, (list, dict)) else v
    return p


def start_parent(client, uri: str, space: SearchSpace, experiment_id: str, sweep_dir: Path,
                 source_text: str) -> str:
    from nr_study.tracking import RunTracker, version_tags

    tags = {"nr.sweep": space.name, "nr.sweep_dir": str(sweep_dir), **version_tags(), "nr.role": "sweep"}
    for k, v in space.tags.items():
        if k != "cell":
            tags[k if k.startswith("nr.") else f"nr.{k}"] = str(v)
    run = client.create_run(experiment_id, tags={**tags, "mlflow.runName": f"sweep:{space.name}"},
                            run_name=f"sweep:{space.name}")
    run_id = run.info.run_id
    tracker = RunTracker(uri, space.experiment, run_id=run_id)
    tracker.log_params(_param_items(space))
    client.log_text(run_id, source_text, f"search_space/{Path(space.path).name or 'search_space.yaml'}")
    client.log_text(run_id, dump_document(space.document), "search_space/resolved.yaml")
    return run_id


def _stopped_by_ray(run) -> bool:
    """The trainer ended this run FAILED only because Ray stopped the trial (SystemExit from report())."""
    return run.info.status == FAILED and run.data.tags.get("nr.error", "").startswith("SystemExit")


def finalize(client, space: SearchSpace, experiment_id: str, parent_run_id: str, trials: Optional[list],
             error: Optional[BaseException], causes: Optional[dict] = None,
             aliases: Optional[dict] = None) -> dict:
    """Close every child the sweep left open and the parent; returns counts by final status.

    `trials` are Ray's trials as last saved in the experiment state (taken before Ray's own cleanup, which
    marks interrupted trials TERMINATED): TERMINATED without final metrics = stopped early by the scheduler
    (FINISHED, tag nr.early_stopped), ERROR = FAILED, anything else = interrupted (KILLED; --resume continues it).
    """
    if aliases:  # a rebuilt sweep: Ray's new trials continue the runs of the trials their configurations ran as
        from nr_study.sweep.state import config_key

        by_trial = {aliases.get(config_key(t.config or {}), t.trial_id): t for t in trials or []}
    else:
        by_trial = {t.trial_id: t for t in trials or []}
    counts: dict[str, int] = {}
    children = client.search_runs([experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent_run_id}'",
                                  max_results=10000)
    for run in children:
        rid, status = run.info.run_id, run.info.status
        t = by_trial.get(run.data.tags.get("nr.trial"))
        tstatus = t.status if t is not None else None
        if causes is not None and tstatus == "ERROR" and run.data.tags.get("nr.error"):
            causes[run.data.tags["nr.trial"]] = run.data.tags["nr.error"]  # the trainer's one line
        new = None
        if tstatus == "TERMINATED":
            # The trainer logs final_test_err at its end only: without it the scheduler stopped the trial, whatever
            # its epoch count says (under reset_epochs a trial trains past train.epochs).
            if "final_test_err" not in run.data.metrics:
                client.set_tag(rid, "nr.early_stopped", "true")
                if status != FINISHED:
                    new = FINISHED
            elif status == RUNNING:
                new = FINISHED
        elif tstatus == "ERROR":
            if status == RUNNING:
                new = FAILED
        elif status == RUNNING or _stopped_by_ray(run):
            new = KILLED
        if new is not None:
            if _stopped_by_ray(run):
                try:
                    client.delete_tag(rid, "nr.error")
                except Exception:
                    pass
            client.set_terminated(rid, new)
            status = new
        if os.environ.get("NR_SWEEP_DEBUG"):
            print(f"finalize {rid} trial={run.data.tags.get('nr.trial')} tstatus={tstatus} was={run.info.status} "
                  f"now={status} err={run.data.tags.get('nr.error')!r}", file=sys.stderr)
        counts[status] = counts.get(status, 0) + 1
    unfinished = trials is None or any(t.status not in ("TERMINATED", "ERROR") for t in trials)
    errored = any(t.status == "ERROR" for t in (trials or []))
    missing = max(0, space.num_trials - _finished(trials))  # never ran, errored, or still open
    if isinstance(error, KeyboardInterrupt) or unfinished:
        parent_status = KILLED
    elif error is not None or errored or missing:
        parent_status = FAILED
    else:
        parent_status = FINISHED
    if parent_status != FINISHED and missing:
        client.set_tag(parent_run_id, "nr.unfinished", f"{missing} of {space.num_trials} configurations")
    elif parent_status == FINISHED:
        try:
            client.delete_tag(parent_run_id, "nr.unfinished")
        except Exception:
            pass
    client.set_terminated(parent_run_id, parent_status)
    counts["parent"] = parent_status
    return counts


# --------------------------------------------------------------------------------------------- summaries
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


# --------------------------------------------------------------------------------------------- driver
def find_latest_sweep(storage_root: Path, name: str) -> Optional[Path]:
    cands = [p for p in storage_root.glob(f"{name}-*") if (p / SWEEP_FILE).is_file()]
    return max(cands, key=lambda p: p.name) if cands else None


def _check_tracking_uri(uri: str) -> None:
    if uri.startswith("sqlite:"):
        raise ConfigError(f"--tracking-uri {uri}: SQLite takes one writer and trials log concurrently; omit "
                          "--tracking-uri (a local mlflow server is started on the run folder's SQLite file) or "
                          "pass an http:// server")
    if not re.match(r"https?://[^/\s]+", uri):
        raise ConfigError(f"--tracking-uri {uri}: not an MLflow server address; allowed: http://host:port or "
                          f"https://host[:port], or omit it (a local mlflow server is started)")


_NO_ADDRESS = "omit --address for an embedded local Ray"
_ADDRESS_HELP = ("allowed: auto (the cluster this machine is a node of), HOST:PORT of a running Ray head (e.g. "
                 f"10.0.0.5:6379) or ray://HOST:PORT; {_NO_ADDRESS}")


def _ray_host_port(address: str) -> tuple[str, int]:
    """(host, port) of a Ray address: `auto` as Ray's own discovery resolves it ($RAY_ADDRESS, the last `ray
    start`, a running GCS), then HOST:PORT or ray://HOST:PORT; ConfigError for anything else."""
    target = address
    if address == "auto":
        try:
            from ray._private.services import get_ray_address_from_environment

            target = get_ray_address_from_environment("auto", None)
        except Exception:  # Ray says no cluster is running here (ConnectionError), or it cannot tell
            target = None
        if not target:
            raise ConfigError("--address auto: no Ray cluster runs on this machine (none started with `ray start "
                              f"--head`, $RAY_ADDRESS unset); start one, or {_NO_ADDRESS}")
    m = re.fullmatch(r"(?:ray://)?(\[[0-9a-fA-F:]+\]|[^\s:/\[\]]+):(\d{1,5})", target)
    if not m or not 1 <= int(m.group(2)) <= 65535:
        raise ConfigError(f"--address {address}: not a Ray address; {_ADDRESS_HELP}")
    return m.group(1).strip("[]"), int(m.group(2))


def check_address(address: Optional[str], timeout: float = 5.0) -> None:
    """Refuse a Ray address nothing answers at, in one line and before anything is written: ray.init would
    otherwise retry for minutes (a wrong host) or fail after the sweep's folder and parent run exist."""
    if not address:
        return
    host, port = _ray_host_port(address)
    import socket

    try:
        socket.create_connection((host, port), timeout=timeout).close()
    except OSError as exc:
        why = exc.strerror or type(exc).__name__
        raise ConfigError(f"--address {address}: nothing answers at {host}:{port} ({why}); start the Ray head "
                          f"there (ray start --head), or {_NO_ADDRESS}") from None


def init_ray(address: Optional[str]):
    import ray

    if ray.is_initialized():
        return False
    env = {k: os.environ[k] for k in _WORKER_ENV if k in os.environ}
    if address:
        kw: dict[str, Any] = {}
        if _loopback_cluster(address):
            # A cluster bound to 127.0.0.1 (e.g. `ray start --head --node-ip-address 127.0.0.1`): Ray would
            # rewrite 127.0.0.1 to this host's network address, where nothing listens. Stay on loopback.
            import ray._private.ray_constants as ray_constants

            ray_constants.ENABLE_RAY_CLUSTER = False
            kw["_node_ip_address"] = "127.0.0.1"
        ray.init(address=address, log_to_driver=True, runtime_env={"env_vars": env}, **kw)
    else:
        from nr_study.train import available_cpus

        # address="local": always a fresh embedded instance, never a cluster someone else started on this host
        kw: dict[str, Any] = dict(address="local", num_cpus=available_cpus(), include_dashboard=False,
                                  _node_ip_address="127.0.0.1", log_to_driver=True)
        ray.init(**kw)
    return True


def _loopback_cluster(address: str) -> bool:
    if address.startswith("ray://"):
        return False
    try:
        host, _ = _ray_host_port(address)
    except ConfigError:
        return False
    return host in ("localhost", "::1") or host.startswith("127.")


def cluster_resources(address: Optional[str]) -> Optional[dict]:
    if address:
        return None
    from nr_study.train import available_cpus

    gpus = 0
    try:
        import torch

        gpus = torch.cuda.device_count()
    except Exception:
        pass
    return {"CPU": available_cpus(), "GPU": gpus}


def sweep_command(path: str, folder: Path, resume_dir: Optional[Path] = None, tracking_uri: Optional[str] = None,
                  address: Optional[str] = None) -> str:
    """The `nr-study sweep` command line that continues (resume_dir) or restarts this sweep from where the user
    is: --runs whenever the run folder is not ./runs (a resume elsewhere would open an empty store)."""
    parts = ["nr-study", "sweep", str(path)]
    if resume_dir is not None:
        parts += ["--resume", str(resume_dir)]
    if Path(folder).resolve() != Path("runs").resolve():
        parts += ["--runs", str(folder)]
    if tracking_uri:
        parts += ["--tracking-uri", tracking_uri]
    if address:
        parts += ["--address", address]
    return " ".join(shlex.quote(p) for p in parts)


@contextlib.contextmanager
def _one_line_node_losses():
    """A lost node makes Ray print, through the driver's error listener, the dead raylet's last 20 log lines and
    a heartbeat explanation (~50 lines in all) for a fault Tune then handles (the trial continues from its
    checkpoint elsewhere; _OneLineTrialErrors says so). While a sweep runs, each such message becomes its first
    sentence; other messages pass unchanged. Ray's printer is a private function: where it is missing, nothing
    is changed."""
    try:
        import ray._private.worker as ray_worker
    except ImportError:
        yield
        return
    original = getattr(ray_worker, "print_to_stdstream", None)
    if original is None:
        yield
        return

    def condensed(data, ignore_prefix):
        lines = data.get("lines") or []
        if data.get("pid") == "raylet" and lines and isinstance(lines[0], str) and _NODE_LOST.search(lines[0]):
            data = dict(data, lines=[_first_sentences(lines[0])])
        return original(data, ignore_prefix)

    ray_worker.print_to_stdstream = condensed
    try:
        yield
    finally:
        ray_worker.print_to_stdstream = original


_NODE_LOST = re.compile(r"^Raylet is terminated|has been marked dead because")


def _first_sentences(message: str) -> str:
    """A message's first sentence on one line, and the next one too when the first is short ('Raylet is
    terminated. Termination is unexpected.')."""
    parts = re.split(r"(?<=\.)\s+(?=[A-Z])", " ".join(message.split()))
    return " ".join(parts[:2] if len(parts[0]) < 40 else parts[:1])[:300]


@_one_line_node_losses()
def run_sweep(space: SearchSpace, *, source_text: str, address: Optional[str] = None,
              tracking_uri: Optional[str] = None, resume: Optional[str | bool] = None,
              runs: Optional[str] = None, verbose: int = 1, out=None) -> dict:
    """Launch (or resume) a sweep end to end; returns the summary dict (with 'sweep_dir', 'parent_run_id',
    'expected' and 'finished' configurations, 'interrupted', 'resume_command').
    `out` (default: sys.stdout at call time, not at import: a replaced or closed stream must not stick)."""
    out = out or sys.stdout
    from nr_study.mlflow_server import DB_NAME, MlflowServer, runs_dir
    from nr_study.tracking import get_or_create_experiment

    if tracking_uri:  # flags first: a bad one is refused before any folder, server or run exists
        _check_tracking_uri(tracking_uri)
    check_address(address)
    folder = runs_dir(runs)
    if not tracking_uri:  # the local server's store: a garbage mlflow.db is one line, before any sweep folder
        check_sqlite_store(f"sqlite:///{folder / DB_NAME}")
    store_dir = local_store_dir(tracking_uri, folder)
    check_disk(folder, store_dir, "run folder")  # a full disk is named now, not after minutes of MLflow's retries
    storage_root = folder / "sweeps"
    storage_root.mkdir(parents=True, exist_ok=True)

    state: dict = {}
    ray_state = None
    rebuild = None
    if resume:
        sweep_dir = Path(resume).resolve() if isinstance(resume, str) else find_latest_sweep(storage_root, space.name)
        if sweep_dir is None or not (sweep_dir / SWEEP_FILE).is_file():
            raise UserError(f"--resume: no sweep named {space.name!r} to resume under {storage_root}"
                            if not isinstance(resume, str) else f"--resume {resume}: not a sweep folder "
                            f"(no {SWEEP_FILE})")
        state = read_json(sweep_dir / SWEEP_FILE, "sweep state file")
        if not isinstance(state, dict) or not isinstance(state.get("document"), dict):
            raise UserError(f"{sweep_dir / SWEEP_FILE}: not an nr-study sweep state (no 'document' mapping); "
                            f"allowed: the {SWEEP_FILE} a sweep wrote")
        from nr_study.sweep.space import parse_search_space
        from nr_study.sweep.state import ResumeRefused, can_rebuild, check_resumable

        space = parse_search_space(state["document"], state.get("path", space.path))
        # Before anything else: a Ray state Ray could not restore would make it start the sweep over.
        try:
            ray_state = check_resumable(sweep_dir, fresh_hint=sweep_command(space.path, folder,
                                                                            tracking_uri=tracking_uri,
                                                                            address=address))
        except ResumeRefused as exc:
            if exc.problem is None:
                raise
            if not can_rebuild(space):
                raise ResumeRefused(f"{exc}; nor can it be rebuilt from the run folder: a {space.search} search "
                                    f"with sampled values cannot regenerate its configurations (only a grid's)"
                                    ) from None
            # Rebuild: a new Ray experiment of the same grid in the same folder; each configuration that ran
            # continues from its checkpoint in its MLflow run (matched by its values), the rest start.
            rebuild = exc.problem
        for w in (ray_state.warnings if ray_state is not None else []):
            print(f"warning: {w}", file=sys.stderr, flush=True)
        print(f"resuming sweep {space.name} from {sweep_dir}", file=out, flush=True)
    else:
        sweep_dir = storage_root / f"{space.name}-{time.strftime('%Y%m%d-%H%M%S')}"
        while sweep_dir.exists():
            time.sleep(1.0)
            sweep_dir = storage_root / f"{space.name}-{time.strftime('%Y%m%d-%H%M%S')}"
        sweep_dir.mkdir(parents=True)
    resume_cmd = sweep_command(space.path, folder, sweep_dir, tracking_uri=tracking_uri, address=address)

    server = None
    started_ray = state_started_ray = False
    error: Optional[BaseException] = None
    trials = None
    summary: dict = {}
    summary_interrupted = False
    refused = False
    parent_before = None
    client = parent_run_id = experiment_id = None
    prev_term = signal.getsignal(signal.SIGTERM)
    _TERMINATED.clear()
    if prev_term in (signal.SIG_DFL, None) and _is_main_thread():
        signal.signal(signal.SIGTERM, _sigterm_to_interrupt)
    try:
        if tracking_uri:
            uri = tracking_uri
        else:
            server = MlflowServer.start(folder, quiet=False).supervise(out=sys.stderr)  # restarted if it dies
            uri = server.url
        os.environ["MLFLOW_TRACKING_URI"] = uri
        client = _client(uri)
        experiment_id = _tcall(uri, "opening the experiment", get_or_create_experiment, client, uri, space.experiment)
        if rebuild is not None:  # which trial each configuration ran as (refused here: still nothing changed)
            from nr_study.sweep.state import plan_rebuild

            kids = _tcall(uri, "reading the sweep's runs", client.search_runs, [experiment_id], max_results=10000,
                          filter_string=f"tags.mlflow.parentRunId = '{state.get('parent_run_id')}'")
            aliases = plan_rebuild(sweep_dir, space, rebuild, kids, known=state.get("aliases"))
        if state.get("parent_run_id"):
            parent_before = _tcall(uri, "reading the sweep's parent run", client.get_run,
                                   state["parent_run_id"]).info
            parent_run_id = state["parent_run_id"]
            _tcall(uri, "reopening the sweep's parent run", client.update_run, parent_run_id, status=RUNNING)
        else:
            parent_run_id = _tcall(uri, "creating the sweep's parent run", start_parent, client, uri, space,
                                   experiment_id, sweep_dir, source_text)
            state = {"parent_run_id": parent_run_id, "experiment": space.experiment,
                     "experiment_id": experiment_id, "name": space.name, "path": space.path,
                     "document": space.document, "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
                     "tracking_uri_at_launch": uri}
            _write_sweep_state(sweep_dir, state)
        if rebuild is not None:
            from nr_study.sweep.state import set_aside

            problem = rebuild
            aside = set_aside(sweep_dir, keep=aliases.values())
            state["aliases"] = aliases
            state.setdefault("rebuilt", []).append({"at": time.strftime("%Y-%m-%dT%H:%M:%S"), "why": problem,
                                                    "aside": aside.name if aside else None})
            _write_sweep_state(sweep_dir, state)
            print(f"Ray's sweep state {problem}: rebuilding the sweep from its run folder: {len(aliases)} "
                  f"configuration(s) that ran continue from their checkpoints in their MLflow runs, "
                  f"{max(0, space.num_trials - len(aliases))} start"
                  + (f"; Ray's old files are kept in {aside}" if aside else ""), file=out, flush=True)
        print(f"sweep {space.name}: {space.num_trials} trial(s); MLflow {uri} experiment {space.experiment!r} "
              f"parent run {parent_run_id}; folder {sweep_dir}", file=out, flush=True)
        if uri.startswith(("http://", "https://")):
            from nr_study.mlflow_server import ui_url

            print(f"MLflow UI: {ui_url(uri, experiment_id)}", file=out, flush=True)

        started_ray = state_started_ray = init_ray(address)
        if prev_term in (signal.SIG_DFL, None) and _is_main_thread():
            # ray.init replaces our SIGTERM handler with its own sys.exit(15): the process then died by SIGABRT
            # (exit -6) after closing the runs, with no resume hint. Put ours back so SIGTERM is handled like Ctrl-C.
            signal.signal(signal.SIGTERM, _sigterm_to_interrupt)
        data_root = os.environ.get("NR_STUDY_DATA") or str(Path.cwd() / "data")
        ctx = TrialContext(space=space, tracking_uri=uri, parent_run_id=parent_run_id,
                           experiment_id=experiment_id, sweep_dir=str(sweep_dir), data_root=data_root,
                           aliases=state.get("aliases") or None, store_dir=store_dir)
        from ray import tune

        guard = None
        if ray_state is not None and ray_state.state_file is not None:
            from nr_study.sweep.state import RestoreGuard

            tuner = tune.Tuner.restore(str(sweep_dir), trainable=build_trainable(space, ctx),
                                       resume_unfinished=True, resume_errored=True)
            guard = RestoreGuard(len(ray_state.trial_ids), str(ray_state.state_file))
            _add_callback(tuner, guard.tune_callback())
        else:  # a new sweep, or a resume of one that never got as far as Ray's first state (nothing started)
            tuner = build_tuner(space, ctx, storage_root, sweep_dir.name, verbose=verbose)
        _tolerate_unreadable_error_files()
        one_line_errors = _OneLineTrialErrors(space.max_failures)
        controller_log = logging.getLogger("ray.tune.execution.tune_controller")
        controller_log.addFilter(one_line_errors)
        storage_notices = _RayStorageNotices()
        for name in _RayStorageNotices.LOGGERS:
            logging.getLogger(name).addFilter(storage_notices)
        try:
            results = tuner.fit()
        except Exception as exc:
            if guard is not None and guard.fired:
                refused = True
                from nr_study.sweep.state import ResumeRefused

                raise ResumeRefused(f"--resume {sweep_dir}: Ray could not restore its sweep state "
                                    f"{ray_state.state_file} (its log lines above say why) and would have started "
                                    f"the sweep over; stopped before any trial ran, nothing changed") from None
            fault = _driver_fault(exc, resume_cmd)
            if fault is None:
                raise
            raise fault from exc
        finally:
            controller_log.removeFilter(one_line_errors)
            for name in _RayStorageNotices.LOGGERS:
                logging.getLogger(name).removeFilter(storage_notices)
        # Trial states as saved at the end of the run, before Ray's cleanup (which marks interrupted trials
        # TERMINATED): the truth about what finished, stopped early, failed, or was interrupted.
        trials = _trials_from_state(sweep_dir) or list(results._experiment_analysis.trials)
        summary_interrupted = any(t.status not in ("TERMINATED", "ERROR") for t in trials)
        if _UNREADABLE_ERROR_FILES:
            print(f"warning: Ray's error record of {len(_UNREADABLE_ERROR_FILES)} errored trial(s) cannot be read "
                  f"(cut short: a full disk does this), e.g. {_UNREADABLE_ERROR_FILES[0]}; their causes below come "
                  f"from the MLflow runs", file=sys.stderr, flush=True)
        summary = summarize(space, results)
        summary.update(expected=space.num_trials, finished=_finished(trials))
        summary["partial"] = summary_interrupted or summary["finished"] < summary["expected"]
        text = format_summary(space, summary)
        if text:
            print(text, file=out, flush=True)
        full = _full_disk(sweep_dir, store_dir)
        if full is not None:  # the cause of every failed trial, said once with the command that continues
            summary["fault"] = f"{full}; then continue the sweep with: {resume_cmd}"
        if not _store_full(store_dir):  # else nothing more can be logged: --resume logs it
            _ensure_tracking(uri, server)
            _log_summary(client, parent_run_id, space, summary)
    except BaseException as exc:  # noqa: BLE001 - close runs on any error, then re-raise
        error = exc
        raise
    finally:
        try:
            if started_ray:
                # First end every trial process (a trial stopped by ASHA may still be unwinding and writing its
                # run's status), so that closing the runs below is the last word on them.
                import ray

                ray.shutdown()
                started_ray = False
            if refused and client is not None and parent_before is not None:
                # The refused resume changes nothing: the parent run goes back to how it was.
                if parent_before.status == RUNNING or not parent_before.end_time:
                    client.update_run(parent_run_id, status=parent_before.status)
                else:
                    client.set_terminated(parent_run_id, parent_before.status, end_time=parent_before.end_time)
            elif client is not None and parent_run_id is not None and _store_full(store_dir):
                # Closing the runs cannot succeed (MLflow would retry each call for minutes): --resume does it.
                print("MLflow runs are left open (the disk is full); --resume closes them", file=sys.stderr,
                      flush=True)
            elif client is not None and parent_run_id is not None:
                if trials is None:
                    trials = _trials_from_state(sweep_dir)
                _ensure_tracking(uri, server)
                causes: dict = {}
                counts = finalize(client, space, experiment_id, parent_run_id, trials, error, causes,
                                  aliases=state.get("aliases"))
                for row in summary.get("trials", []):
                    if row.get("error") and row.get("trial_id") in causes:
                        row["cause"] = causes[row["trial_id"]]
                if not _owned_ray_was_shut_down(started=state_started_ray) and _has_early_stops(space, trials):
                    time.sleep(3.0)  # a caller-owned Ray: give stopped trials a moment to unwind, then re-close
                    counts = finalize(client, space, experiment_id, parent_run_id, trials, error,
                                      aliases=state.get("aliases"))
                summary["run_status"] = counts
                print("MLflow runs: " + ", ".join(f"{k} {v}" for k, v in counts.items()), file=out, flush=True)
        except Exception as exc:  # never mask the original error
            print(f"warning: could not close MLflow runs: {exc}", file=sys.stderr)
        finally:
            if started_ray:
                import ray

                ray.shutdown()
            if server is not None:
                server.stop()
            if _is_main_thread() and signal.getsignal(signal.SIGTERM) is _sigterm_to_interrupt:
                signal.signal(signal.SIGTERM, prev_term)
    summary.update(sweep_dir=str(sweep_dir), parent_run_id=parent_run_id, experiment_id=experiment_id,
                   interrupted=summary_interrupted, terminated=bool(_TERMINATED), resume_command=resume_cmd)
    if summary_interrupted:
        print(f"sweep interrupted; continue it with: {resume_cmd}", file=out, flush=True)
    return summary


class _RayStorageNotices(logging.Filter):
    """While a sweep runs, Ray's troubles writing the sweep folder are one line each, said once: its syncer logged
    a 20-line traceback every 10 s on a full disk (2,050 lines in one sweep) and its experiment-state save one per
    try. Ray's "Resume experiment with: Tuner.restore(...)" is dropped: nr-study prints the command that
    continues the sweep (`nr-study sweep ... --resume ...`), and a user should see one instruction."""

    LOGGERS = ("ray.train._internal.syncer", "ray.tune.execution.experiment_state", "ray.tune.tune")

    def __init__(self):
        super().__init__()
        self.seen: set = set()

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        if "Resume experiment with:" in msg or "Resume training with:" in msg:
            return False
        if record.name == "ray.tune.tune" or not (record.exc_info or "Traceback" in msg):
            return True
        if record.exc_info and record.exc_info[1] is not None:
            cause = f"{type(record.exc_info[1]).__name__}: {record.exc_info[1]}"
        else:
            cause = [ln for ln in msg.splitlines() if ln.strip()][-1]
        cause = one_line(cause, 200)
        if (record.name, cause) in self.seen:
            return False
        self.seen.add((record.name, cause))
        first = msg.splitlines()[0].rstrip(" :")
        record.msg = f"{first}: {cause} (said once; repeats are not shown)"
        record.args, record.exc_info, record.exc_text = None, None, None
        return True


class _OneLineTrialErrors(logging.Filter):
    """Ray logs every trial failure with its whole traceback ("Trial task failed for trial X"): ~25 lines and an
    OOM-killer hint for a worker that was killed and is about to be retried from its checkpoint. A dead worker
    (RayActorError) and one of our own one-line errors (a UserError in the trial: disk full, tracking server,
    bad input) become one line; any other exception (a bug) keeps Ray's traceback. The full text is always in
    the trial's error.txt."""

    PREFIX = "Trial task failed for trial "

    def __init__(self, max_failures: int):
        super().__init__()
        self.max_failures = max_failures

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.msg if isinstance(record.msg, str) else ""
        if not (record.exc_info and msg.startswith(self.PREFIX)):
            return True
        exc = record.exc_info[1]
        name = msg[len(self.PREFIX):]
        try:
            from ray.exceptions import RayActorError, RayTaskError
        except ImportError:
            return True
        retry = (f"Ray restarts it from its last checkpoint while its failures stay within max_failures "
                 f"({self.max_failures})" if self.max_failures else "max_failures is 0: no retry")
        if isinstance(exc, RayActorError):
            text = (f"trial {name}: its worker process died ({type(exc).__name__}: killed, out of memory, or its "
                    f"node was lost); {retry}")
        elif isinstance(exc, RayTaskError) and isinstance(getattr(exc, "cause", exc), UserError):
            cause = getattr(exc, "cause", exc)
            first = (str(cause).splitlines() or [""])[0][:400]
            text = f"trial {name} failed: {type(cause).__name__}: {first}; {retry}"
        elif isinstance(exc, RayTaskError) and _machine_fault(getattr(exc, "cause", exc)) is not None:
            # the machine, not our code: Ray's own checkpoint copy hit a full disk, a read-only or failing drive
            text = f"trial {name} failed: {_machine_fault(getattr(exc, 'cause', exc))}; {retry}"
        else:
            return True
        record.msg, record.args, record.exc_info, record.exc_text = text, None, None, None
        return True


def _tcall(uri: str, what: str, fn, *args, **kwargs):
    """A driver MLflow call: a failure is the trainer's one-line TrackingError (exit 1), not a raw exception."""
    from nr_study.tracking import tracking_error

    try:
        return fn(*args, **kwargs)
    except UserError:
        raise
    except Exception as exc:
        raise tracking_error(uri, what, exc) from exc


def _ensure_tracking(uri: str, server) -> None:
    """Before the driver's own MLflow calls: the sweep's server may be restarting, a user's may be down."""
    if server is not None:
        server.wait_up(180.0)
    elif uri.startswith(("http://", "https://")) and not _server_answers(uri):
        _wait_for_tracking(uri, "sweep", Exception("unreachable"), budget=min(120.0, tracking_wait_s()))


def _write_sweep_state(sweep_dir: Path, state: dict) -> None:
    """nr_sweep.json, atomically (a full disk leaves the previous one whole)."""
    write_json_atomic(sweep_dir / SWEEP_FILE, state, indent=1, default=str)


def _finished(trials: Optional[list]) -> int:
    """Trials Ray ended TERMINATED: run to their last epoch or stopped early by the scheduler (ASHA), which is
    how a scheduler finishes a configuration. ERROR and anything still pending/running/paused did not finish."""
    return sum(1 for t in trials or [] if t.status == "TERMINATED")


def _add_callback(tuner, callback) -> None:
    """Append a Tune callback to a restored Tuner (Tuner.restore takes its RunConfig from tuner.pkl)."""
    try:
        rc = tuner._local_tuner._run_config
        rc.callbacks = list(rc.callbacks or []) + [callback]
    except AttributeError:  # another Ray layout: the file checks before the restore still stand
        pass


_UNREADABLE_ERROR_FILES: list = []


def _tolerate_unreadable_error_files() -> None:
    """Ray reads each errored trial's error.pkl when it builds the results; one cut short by a full disk raised
    UnpicklingError/EOFError out of Tuner.fit() (an 'internal error'). Read it as 'the trial errored'."""
    from ray.tune.result_grid import ResultGrid

    _UNREADABLE_ERROR_FILES.clear()
    current = ResultGrid.__dict__.get("_populate_exception")
    fn = getattr(current, "__func__", current)
    if fn is None or getattr(fn, "_nr_tolerant", False):
        return

    def populate(trial):
        try:
            return fn(trial)
        except Exception as exc:
            from ray.tune.error import TuneError

            try:  # the copy in the sweep folder (what Ray reads) was cut short; the driver's own copy is whole
                where = str(Path(trial.storage.trial_fs_path, trial.run_metadata.pickled_error_filename))
            except Exception:
                where = "error.pkl"
            _UNREADABLE_ERROR_FILES.append(f"{where} ({type(exc).__name__}: {str(exc)[:80]})")
            text = None
            try:
                local = Path(trial.local_path, trial.run_metadata.error_filename or "error.txt")
                text = local.read_text(errors="replace") if local.is_file() else None
            except Exception:
                pass
            return TuneError(text) if text else TuneError(f"Ray's error record {where} cannot be read "
                                                          f"({type(exc).__name__})")

    populate._nr_tolerant = True
    ResultGrid._populate_exception = staticmethod(populate)


def _os_error(exc: BaseException) -> Optional[OSError]:
    seen = set()
    stack = [exc]
    while stack:
        e = stack.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno is not None:
            return e
        stack += [e.__cause__, e.__context__]
    return None


_MACHINE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EIO)


def _machine_fault(exc: BaseException) -> Optional[str]:
    """An OSError of the machine (full disk, quota, read-only or failing drive) behind `exc`, as one line."""
    os_err = _os_error(exc)
    if os_err is None or os_err.errno not in _MACHINE_ERRNOS:
        return None
    where = f" ({os_err.filename})" if getattr(os_err, "filename", None) else ""
    return f"{os_err.strerror or os_err}{where}, errno {errno.errorcode.get(os_err.errno, os_err.errno)}"


def _driver_fault(exc: BaseException, resume_cmd: str) -> Optional[FaultError]:
    """A fault of the machine under the sweep driver (full disk, lost folder, cut-short Ray file) as one line
    (exit 1) with the command that continues the sweep; None for anything else (a bug: the CLI says so)."""
    import pickle

    fault = _machine_fault(exc)
    if fault is not None:
        return FaultError(f"sweep stopped: {fault}; the trials' checkpoints are kept: fix it (free space), then "
                          f"continue it with: {resume_cmd}")
    if isinstance(exc, (pickle.UnpicklingError, EOFError)):
        return FaultError(f"sweep stopped: a file Ray wrote cannot be read ({type(exc).__name__}: "
                          f"{str(exc)[:120]}; a full disk cuts files short); continue it with: {resume_cmd}")
    return None


def _owned_ray_was_shut_down(started: bool) -> bool:
    return started


def _has_early_stops(space: SearchSpace, trials: Optional[list]) -> bool:
    """A trial Ray ended without the trainer's final metrics: the scheduler stopped it."""
    return any(t.status == "TERMINATED" and "final_test_err" not in (t.last_result or {}) for t in (trials or []))


def _trials_from_state(sweep_dir: Path) -> Optional[list]:
    """Trial statuses from Ray's experiment state (when fit() raised before returning results)."""
    try:
        from ray.tune import ExperimentAnalysis

        return list(ExperimentAnalysis(str(sweep_dir)).trials)
    except Exception:
        return None


def _log_summary(client, parent_run_id: str, space: SearchSpace, summary: dict) -> None:
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


def _is_main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


_TERMINATED: list = []  # set when SIGTERM arrived: the sweep then exits 143, not 130


def _sigterm_to_interrupt(signum, frame):
    """SIGTERM stops the sweep like Ctrl-C, exit 143. Inside Tuner.fit, where Ray Tune has its own SIGINT handler,
    it is sent on as SIGINT, so Tune ends the trials as on Ctrl-C (runs KILLED, the resume hint) instead of being
    cut out of its loop; anywhere else (start-up, the end, or SIGINT inherited ignored) it raises Terminated."""
    _TERMINATED.append(signum)
    handler = signal.getsignal(signal.SIGINT)
    if callable(handler) and handler is not signal.default_int_handler:
        os.kill(os.getpid(), signal.SIGINT)
    else:
        raise Terminated()
