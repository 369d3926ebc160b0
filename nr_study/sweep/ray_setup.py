"""Everything that talks to Ray: the environment its workers inherit, the Tuner and its parts (searcher,
scheduler, reporter, trainable), Ray addresses and init, and the log filters and the one patch that keep Ray's
output to one line per fault while a sweep runs."""
from __future__ import annotations

import contextlib
import logging
import os
import re
from pathlib import Path
from typing import Any, Optional

from nr_study.errors import ConfigError, UserError, one_line

# Before Ray is imported anywhere (the sweep modules import this one first): the classic CLIReporter table
# (trimmed to our metrics), no per-checkpoint snapshot warnings, no MLflow "View run" lines from every trial.
os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

from nr_study.names import DELTA_METRIC, OPTUNA_DB  # noqa: E402
from nr_study.sweep.faults import machine_fault  # noqa: E402
from nr_study.sweep.space import REPEAT_KEY, TRIAL_INDEX_KEY, SearchSpace  # noqa: E402
from nr_study.sweep.summary import METRIC_COLUMNS  # noqa: E402
from nr_study.sweep.trial import TrialContext, trial_fn  # noqa: E402


_WORKER_ENV = ("RAY_AIR_NEW_OUTPUT", "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "MLFLOW_DISABLE_TELEMETRY", "NR_STUDY_METHODS",
               "NR_STUDY_DATA")


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


_NO_ADDRESS = "omit --address for an embedded local Ray"


_ADDRESS_HELP = ("allowed: auto (the cluster this machine is a node of), HOST:PORT of a running Ray head (e.g. "
                 f"10.0.0.5:6379) or ray://HOST:PORT; {_NO_ADDRESS}")


def ray_host_port(address: str) -> tuple[str, int]:
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
    host, port = ray_host_port(address)
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
        host, _ = ray_host_port(address)
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


@contextlib.contextmanager
def one_line_node_losses():
    """A lost node makes Ray print, through the driver's error listener, the dead raylet's last 20 log lines and
    a heartbeat explanation (~50 lines in all) for a fault Tune then handles (the trial continues from its
    checkpoint elsewhere; OneLineTrialErrors says so). While a sweep runs, each such message becomes its first
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


class RayStorageNotices(logging.Filter):
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


class OneLineTrialErrors(logging.Filter):
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
        elif isinstance(exc, RayTaskError) and machine_fault(getattr(exc, "cause", exc)) is not None:
            # the machine, not our code: Ray's own checkpoint copy hit a full disk, a read-only or failing drive
            text = f"trial {name} failed: {machine_fault(getattr(exc, 'cause', exc))}; {retry}"
        else:
            return True
        record.msg, record.args, record.exc_info, record.exc_text = text, None, None, None
        return True


def add_callback(tuner, callback) -> None:
    """Append a Tune callback to a restored Tuner (Tuner.restore takes its RunConfig from tuner.pkl)."""
    try:
        rc = tuner._local_tuner._run_config
        rc.callbacks = list(rc.callbacks or []) + [callback]
    except AttributeError:  # another Ray layout: the file checks before the restore still stand
        pass


UNREADABLE_ERROR_FILES: list = []


def tolerate_unreadable_error_files() -> None:
    """Ray reads each errored trial's error.pkl when it builds the results; one cut short by a full disk raised
    UnpicklingError/EOFError out of Tuner.fit() (an 'internal error'). Read it as 'the trial errored'."""
    from ray.tune.result_grid import ResultGrid

    UNREADABLE_ERROR_FILES.clear()
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
            UNREADABLE_ERROR_FILES.append(f"{where} ({type(exc).__name__}: {str(exc)[:80]})")
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


def trials_from_state(sweep_dir: Path) -> Optional[list]:
    """Trial statuses from Ray's experiment state (when fit() raised before returning results)."""
    try:
        from ray.tune import ExperimentAnalysis

        return list(ExperimentAnalysis(str(sweep_dir)).trials)
    except Exception:
        return None


@contextlib.contextmanager
def quiet_loggers(filters: dict):
    """{logger name: filter} installed for the duration (Ray's loggers while Tuner.fit runs)."""
    for name, f in filters.items():
        logging.getLogger(name).addFilter(f)
    try:
        yield
    finally:
        for name, f in filters.items():
            logging.getLogger(name).removeFilter(f)
