"""Run a search space on Ray Tune: one MLflow parent run per sweep, one child run per trial.

Layout of the run folder (`runs/`, or $NR_STUDY_RUNS):
    mlflow.db, mlartifacts/, mlflow_server.log      the local MLflow server's SQLite file and artifacts
    sweeps/<name>-<YYYYmmdd-HHMMSS>/                 Ray Tune's experiment folder (storage) for one sweep:
        nr_sweep.json                                parent run id, experiment, the search-space document
        trials/<trial_id>/state.pt                   the trial's working checkpoint (trainer's format)
        <Ray trial dirs, tuner.pkl, experiment_state-*.json>

Run continuity: the trial creates its MLflow child run up front (tag nr.trial = Ray trial id) unless its
checkpoint names one; the trainer's checkpoint carries the run id, so a retried (FailureConfig.max_failures) or
resumed (`--resume`, Tuner.restore) trial reopens THE SAME run and the trainer logs each epoch once. A trial
restarted without a checkpoint finds its run again by the nr.trial tag. At the end (also on errors and
Ctrl-C) every child still RUNNING is closed: FINISHED (finished or stopped early by ASHA, tag
nr.early_stopped), FAILED (errored) or KILLED (interrupted).
"""
from __future__ import annotations

import json
import math
import os
import shutil
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from nr_study.errors import ConfigError, UserError
from nr_study.files import check_sqlite_store, read_json

# Before Ray is imported anywhere: the classic CLIReporter table (trimmed to our metrics), no per-checkpoint
# snapshot warnings, no MLflow "View run" lines from every trial.
os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
_WORKER_ENV = ("RAY_AIR_NEW_OUTPUT", "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "MLFLOW_DISABLE_TELEMETRY",
               "NR_STUDY_DATA")
from nr_study.sweep.space import REPEAT_KEY, TRIAL_INDEX_KEY, SearchSpace, dump_document, fmt_value

SWEEP_FILE = "nr_sweep.json"
METRIC_COLUMNS = ("test_err", "util_params", "lambda", "rejuvenations", "params")
FINISHED, FAILED, KILLED, RUNNING = "FINISHED", "FAILED", "KILLED", "RUNNING"


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


def _client(uri: str):
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


def _find_child(client, ctx: TrialContext, trial_id: str) -> Optional[str]:
    runs = client.search_runs(
        [ctx.experiment_id],
        filter_string=f"tags.mlflow.parentRunId = '{ctx.parent_run_id}' and tags.`nr.trial` = '{trial_id}'",
        max_results=5)
    return runs[0].info.run_id if runs else None


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

    from nr_study.config import config_from_dict, config_to_dict, flatten, set_dotted
    from nr_study.train import CKPT_NAME, load_checkpoint, train
    from nr_study.tracking import RunTracker

    import logging

    logging.getLogger("ray.train._internal.storage").setLevel(logging.WARNING)  # one line per checkpoint
    space = ctx.space
    tctx = tune.get_context()
    trial_id = tctx.get_trial_id()
    values = space.trial_values(config)
    full = space.trial_config(config)  # every field: for names and tags
    run_name = space.run_name(full, values)
    sparse = space.trial_config(config, sparse=True)  # what the file sets: the trainer fills the defaults
    set_dotted(sparse, "tracking.run_name", run_name)
    set_dotted(sparse, "tracking.experiment", space.experiment)
    if full["train"].get("threads") is None:
        set_dotted(sparse, "train.threads", max(1, int(space.cpu)))
    if full["data"].get("root") is None and ctx.data_root:
        set_dotted(sparse, "data.root", ctx.data_root)
    cfg = config_from_dict(sparse)
    tags = space.trial_tags(full, values)
    tags["nr.trial"] = trial_id
    try:
        import ray

        tags["nr.node"] = ray.get_runtime_context().get_node_id()
        gpus = ray.get_gpu_ids()
        tags["nr.gpus"] = ",".join(str(g) for g in gpus) if gpus else "-"
    except Exception:
        pass

    # The working checkpoint folder is stable across retries and resumes of this trial (absolute path).
    work = Path(ctx.sweep_dir) / "trials" / trial_id
    work.mkdir(parents=True, exist_ok=True)
    local = load_checkpoint(work)
    ray_ckpt = tune.get_checkpoint()
    ray_epoch = 0
    if ray_ckpt is not None:
        with ray_ckpt.as_directory() as d:
            src = Path(d) / CKPT_NAME
            if src.is_file():
                import torch

                st = torch.load(src, map_location="cpu", weights_only=True)
                ray_epoch = int(st.get("epoch", 0))
                if local is None or int(local.get("epoch", 0)) < ray_epoch:
                    shutil.copy2(src, work / CKPT_NAME)
                    local = st
    resume = local is not None

    client = _client(ctx.tracking_uri)
    run_id = (local or {}).get("run_id") or _find_child(client, ctx, trial_id)
    if run_id is None:  # first start: create the child run now, so a retry before any checkpoint finds it
        tracker = RunTracker(ctx.tracking_uri, space.experiment, run_name=run_name,
                             tags={**tags, "nr.method": cfg.method, "nr.arch": cfg.model.name,
                                   "nr.seed": cfg.seed},
                             parent_run_id=ctx.parent_run_id)
        run_id = tracker.start()
        tracker.log_params(flatten(config_to_dict(cfg)))
        import yaml

        tracker.log_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False), "config.yaml")

    # Epochs the local checkpoint holds beyond Ray's last persisted one (the worker died between the
    # trainer's checkpoint and its report): report them now so Ray's iteration count matches the run.
    if local is not None and int(local.get("epoch", 0)) > ray_epoch:
        rows = [r for r in local.get("history", []) if int(r["epoch"]) > ray_epoch]
        for i, row in enumerate(rows):
            last = i == len(rows) - 1
            tune.report(_numeric(row), checkpoint=tune.Checkpoint.from_directory(str(work)) if last else None)

    if local is not None and int(local.get("epoch", 0)) >= cfg.train.epochs and _status(client, run_id) == FINISHED:
        return  # finished (the driver died before Ray recorded it): nothing to re-run or re-log

    final: dict = {}

    def on_epoch_end(row: dict, checkpoint_dir: Optional[str]) -> None:
        if int(row["epoch"]) >= cfg.train.epochs:
            # The last epoch is reported after train() returns: a scheduler may stop a trial at its last
            # report (ASHA at max_t), and the trainer must first log the summary and the final model.
            final.update(row=row, checkpoint_dir=checkpoint_dir)
            return
        tune.report(_numeric(row), checkpoint=tune.Checkpoint.from_directory(checkpoint_dir))

    # Ray ends a trial it stops (ASHA, or a Ctrl-C of the sweep) with SystemExit from inside report(); the
    # driver, which knows which of the two it was, closes the run at the end of the sweep.
    summary = train(cfg, tracking_uri=ctx.tracking_uri, run_id=run_id, checkpoint_dir=str(work), resume=resume,
                    on_epoch_end=on_epoch_end, progress=False, tags=tags, parent_run_id=ctx.parent_run_id)
    if final:
        extra = {k: summary[k] for k in ("final_test_err", "best_test_err", "final_params", "final_flops")
                 if isinstance(summary.get(k), (int, float))}
        tune.report(_numeric({**final["row"], **extra}),
                    checkpoint=tune.Checkpoint.from_directory(final["checkpoint_dir"]))


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
            values = self.space.trial_values(trial.config)
            full = self.space.trial_config(trial.config)
            name = self.space.run_name(full, values)
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


def build_search_alg(space: SearchSpace):
    if space.search in ("grid", "random"):
        if space.search_seed is None:
            return None
        from ray.tune.search.basic_variant import BasicVariantGenerator

        return BasicVariantGenerator(random_state=space.search_seed)
    import optuna
    from ray.tune.search.optuna import OptunaSearch

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    if space.sampler == "nsga2":
        sampler = optuna.samplers.NSGAIISampler(seed=space.search_seed)
    else:
        sampler = optuna.samplers.TPESampler(seed=space.search_seed, multivariate=True)
    metrics = [m for m, _ in space.objectives]
    modes = [md for _, md in space.objectives]
    if len(metrics) == 1:
        metrics, modes = metrics[0], modes[0]
    searcher = OptunaSearch(metric=metrics, mode=modes, sampler=sampler)
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
        search_alg=build_search_alg(space),
        scheduler=build_scheduler(space),
        num_samples=space.num_trials if space.search == "optuna" else space.num_samples,
        max_concurrent_trials=space.max_concurrent,
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
    from nr_study.tracking import RunTracker, code_version

    tags = {"nr.sweep": space.name, "nr.sweep_dir": str(sweep_dir), "nr.code_version": code_version(),
            "nr.role": "sweep"}
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
             error: Optional[BaseException]) -> dict:
    """Close every child the sweep left open and the parent; returns counts by final status.

    `trials` are Ray's trials as last saved in the experiment state (taken before Ray's own cleanup, which
    marks interrupted trials TERMINATED): TERMINATED before the last epoch = stopped early by the scheduler
    (FINISHED, tag nr.early_stopped), ERROR = FAILED, anything else = interrupted (KILLED; --resume continues it).
    """
    by_trial = {t.trial_id: t for t in trials or []}
    epochs = int(space.base["train"]["epochs"])
    counts: dict[str, int] = {}
    children = client.search_runs([experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent_run_id}'",
                                  max_results=10000)
    for run in children:
        rid, status = run.info.run_id, run.info.status
        t = by_trial.get(run.data.tags.get("nr.trial"))
        tstatus = t.status if t is not None else None
        new = None
        if tstatus == "TERMINATED":
            iters = int((t.last_result or {}).get("training_iteration", 0) or 0)
            if iters < epochs:
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
    if isinstance(error, KeyboardInterrupt) or unfinished:
        parent_status = KILLED
    elif error is not None or errored:
        parent_status = FAILED
    else:
        parent_status = FINISHED
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


def summarize(space: SearchSpace, results) -> dict:
    """Rows per trial, configurations averaged over seeds, best configuration, Pareto set."""
    rows = []
    for r in results:
        cfg = r.config or {}
        values = space.trial_values(cfg)
        full = space.trial_config(cfg)
        m = r.metrics or {}
        row = {"trial_id": m.get("trial_id"), "name": space.run_name(full, values),
               "cell": space.cell_name(full, values), "error": bool(r.error),
               "epochs": m.get("training_iteration")}
        row.update({k: values[k] for k in values})
        for metric in dict.fromkeys([*METRIC_COLUMNS, *(m_ for m_, _ in space.objectives)]):
            if metric in m:
                row[metric] = m[metric]
        rows.append(row)
    groups: dict[str, dict] = {}
    for row in rows:
        if row["error"]:
            continue
        g = groups.setdefault(row["cell"], {"cell": row["cell"], "n": 0, "_sums": {}})
        g["n"] += 1
        for metric, _ in space.objectives:
            if isinstance(row.get(metric), (int, float)):
                g["_sums"].setdefault(metric, []).append(float(row[metric]))
    configs = []
    for g in groups.values():
        c = {"cell": g["cell"], "n": g["n"]}
        for metric, vals in g["_sums"].items():
            c[metric] = sum(vals) / len(vals)
        configs.append(c)
    out = {"trials": rows, "configurations": configs}
    m0, md0 = space.objectives[0]
    ranked = [c for c in configs if isinstance(c.get(m0), float)]
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
    if summary.get("best"):
        b = summary["best"]
        lines.append(f"best by {objs[0]}: {b['cell']} ({objs[0]} {b[objs[0]]:.4g}, n={b['n']})")
    if "pareto" in summary:
        lines.append(f"Pareto set ({', '.join(f'{m}: {md}' for m, md in space.objectives)}):")
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
    if address == "auto":
        try:
            from ray._private.services import get_ray_address_from_environment

            address = get_ray_address_from_environment("auto", None) or ""
        except Exception:
            return False
    host = address.rsplit(":", 1)[0].strip("[]")
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


def run_sweep(space: SearchSpace, *, source_text: str, address: Optional[str] = None,
              tracking_uri: Optional[str] = None, resume: Optional[str | bool] = None,
              runs: Optional[str] = None, verbose: int = 1, out=None) -> dict:
    """Launch (or resume) a sweep end to end; returns the summary dict (with 'sweep_dir', 'parent_run_id').
    `out` (default: sys.stdout at call time, not at import: a replaced or closed stream must not stick)."""
    out = out or sys.stdout
    from nr_study.mlflow_server import DB_NAME, MlflowServer, runs_dir
    from nr_study.tracking import get_or_create_experiment

    folder = runs_dir(runs)
    if not tracking_uri:  # the local server's store: a garbage mlflow.db is one line, before any sweep folder
        check_sqlite_store(f"sqlite:///{folder / DB_NAME}")
    storage_root = folder / "sweeps"
    storage_root.mkdir(parents=True, exist_ok=True)

    state: dict = {}
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

        space = parse_search_space(state["document"], state.get("path", space.path))
        print(f"resuming sweep {space.name} from {sweep_dir}", file=out, flush=True)
    else:
        sweep_dir = storage_root / f"{space.name}-{time.strftime('%Y%m%d-%H%M%S')}"
        while sweep_dir.exists():
            time.sleep(1.0)
            sweep_dir = storage_root / f"{space.name}-{time.strftime('%Y%m%d-%H%M%S')}"
        sweep_dir.mkdir(parents=True)

    server = None
    started_ray = state_started_ray = False
    error: Optional[BaseException] = None
    trials = None
    summary: dict = {}
    summary_interrupted = False
    client = parent_run_id = experiment_id = None
    prev_term = signal.getsignal(signal.SIGTERM)
    if prev_term in (signal.SIG_DFL, None) and _is_main_thread():
        signal.signal(signal.SIGTERM, _sigterm_to_interrupt)
    try:
        if tracking_uri:
            _check_tracking_uri(tracking_uri)
            uri = tracking_uri
        else:
            server = MlflowServer.start(folder, quiet=False)
            uri = server.url
        os.environ["MLFLOW_TRACKING_URI"] = uri
        client = _client(uri)
        experiment_id = get_or_create_experiment(client, uri, space.experiment)
        if state.get("parent_run_id"):
            parent_run_id = state["parent_run_id"]
            client.update_run(parent_run_id, status=RUNNING)
        else:
            parent_run_id = start_parent(client, uri, space, experiment_id, sweep_dir, source_text)
            state = {"parent_run_id": parent_run_id, "experiment": space.experiment,
                     "experiment_id": experiment_id, "name": space.name, "path": space.path,
                     "document": space.document, "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
                     "tracking_uri_at_launch": uri}
            (sweep_dir / SWEEP_FILE).write_text(json.dumps(state, indent=1, default=str))
        print(f"sweep {space.name}: {space.num_trials} trial(s); MLflow {uri} experiment {space.experiment!r} "
              f"parent run {parent_run_id}; folder {sweep_dir}", file=out, flush=True)

        started_ray = state_started_ray = init_ray(address)
        data_root = os.environ.get("NR_STUDY_DATA") or str(Path.cwd() / "data")
        ctx = TrialContext(space=space, tracking_uri=uri, parent_run_id=parent_run_id,
                           experiment_id=experiment_id, sweep_dir=str(sweep_dir), data_root=data_root)
        from ray import tune

        if resume and tune.Tuner.can_restore(str(sweep_dir)):
            tuner = tune.Tuner.restore(str(sweep_dir), trainable=build_trainable(space, ctx),
                                       resume_unfinished=True, resume_errored=True)
        else:
            tuner = build_tuner(space, ctx, storage_root, sweep_dir.name, verbose=verbose)
        results = tuner.fit()
        # Trial states as saved at the end of the run, before Ray's cleanup (which marks interrupted trials
        # TERMINATED): the truth about what finished, stopped early, failed, or was interrupted.
        trials = _trials_from_state(sweep_dir) or list(results._experiment_analysis.trials)
        summary_interrupted = any(t.status not in ("TERMINATED", "ERROR") for t in trials)
        summary = summarize(space, results)
        text = format_summary(space, summary)
        if text:
            print(text, file=out, flush=True)
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
            if client is not None and parent_run_id is not None:
                if trials is None:
                    trials = _trials_from_state(sweep_dir)
                counts = finalize(client, space, experiment_id, parent_run_id, trials, error)
                if not _owned_ray_was_shut_down(started=state_started_ray) and _has_early_stops(space, trials):
                    time.sleep(3.0)  # a caller-owned Ray: give stopped trials a moment to unwind, then re-close
                    counts = finalize(client, space, experiment_id, parent_run_id, trials, error)
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
                   interrupted=summary_interrupted)
    if summary_interrupted:
        print(f"sweep interrupted; continue it with: nr-study sweep {space.path} --resume {sweep_dir}", file=out,
              flush=True)
    return summary


def _owned_ray_was_shut_down(started: bool) -> bool:
    return started


def _has_early_stops(space: SearchSpace, trials: Optional[list]) -> bool:
    epochs = int(space.base["train"]["epochs"])
    return any(t.status == "TERMINATED" and int((t.last_result or {}).get("training_iteration", 0) or 0) < epochs
               for t in (trials or []))


def _trials_from_state(sweep_dir: Path) -> Optional[list]:
    """Trial statuses from Ray's experiment state (when fit() raised before returning results)."""
    try:
        from ray.tune import ExperimentAnalysis

        return list(ExperimentAnalysis(str(sweep_dir)).trials)
    except Exception:
        return None


def _log_summary(client, parent_run_id: str, space: SearchSpace, summary: dict) -> None:
    try:
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


def _sigterm_to_interrupt(signum, frame):
    raise KeyboardInterrupt("SIGTERM")
