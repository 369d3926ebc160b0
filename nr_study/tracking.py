"""MLflow tracking for one training run: params, tags, per-epoch metrics, artifacts, run continuity.

One MLflow run per training run, always. `RunTracker(uri, run_id=...)` reopens an existing run (a retried or
resumed trial) instead of opening a second one; `sync_history(history)` logs the epochs the run lacks, so each
epoch appears exactly once. All calls go through an `MlflowClient` (no global active run), so a sweep driver
holding its own parent run is never disturbed.

Beside params and metrics (what a researcher finds in the MLflow UI, README "What you see in the MLflow UI"):
the code's git commit and the stack's versions as tags (`version_tags`), every experiment tagged as model
training (`get_or_create_experiment`), the training and test subsets as dataset inputs (`log_data`), the final
model as a LoggedModel that loads without unpickling code (`log_model`, `load_model`), and MLflow's system
metrics (`SystemMetrics`).

Tracking URI precedence: explicit argument (CLI --tracking-uri) > config tracking.uri > $MLFLOW_TRACKING_URI >
sqlite:///<runs>/mlflow.db where <runs> is $NR_STUDY_RUNS or <cwd>/runs (absolute).

Faults (docs/reliability.md): every MLflow call goes through `RunTracker._call`, which turns any client failure
into one-line `TrackingError`. MLflow's HTTP client retries for minutes by default; unless the user set them,
we lower MLFLOW_HTTP_REQUEST_MAX_RETRIES / _BACKOFF_FACTOR / _TIMEOUT so a dead server fails a run in seconds.
The run then fails clearly with its checkpoint intact, and `--resume` (or the sweep's retry) logs the epochs
the run lacks (`sync_history`) — we fail rather than buffer, so no metric lives only in a process's memory.
"""
from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterable, Optional

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
# Fail fast on an unreachable tracking server (MLflow's defaults: 7 retries, backoff factor 2, 120 s timeout,
# i.e. minutes). With these a refused connection fails in ~6-9 s and a hung server within ~2 min.
HTTP_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "3", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
                 "MLFLOW_HTTP_REQUEST_BACKOFF_JITTER": "0.5", "MLFLOW_HTTP_REQUEST_TIMEOUT": "30"}
for _k, _v in HTTP_DEFAULTS.items():
    os.environ.setdefault(_k, _v)

from nr_study import __version__  # noqa: E402
from nr_study.errors import ConfigError, TrackingError, one_line  # noqa: E402
from nr_study.names import (DATA_CONTEXT_TEST, DATA_CONTEXT_TRAIN, EPOCH_KEY, EXPERIMENT_KIND, FAILED,  # noqa: E402
                            FINISHED, KILLED, MODEL_FILE, MODEL_META, MODEL_NAME, MODEL_TYPE, RUNNING,
                            SYSTEM_METRICS_INTERVAL_S, TAG_ARCH, TAG_CODE_VERSION, TAG_CONSTRAINT, TAG_DATASET,
                            TAG_ERROR, TAG_EXPERIMENT_KIND, TAG_GIT_COMMIT, TAG_METHOD, TAG_SCHEME, TAG_SEED,
                            VERSION_TAGS, runs_dir)
from nr_study.tracking_uri import resolve_tracking_uri  # noqa: E402

__all__ = ["FINISHED", "FAILED", "KILLED", "RUNNING", "EPOCH_KEY", "runs_dir", "RunTracker", "open_run", "run_tags"]


_UNREACHABLE = ("Max retries exceeded", "Connection refused", "NewConnectionError", "timed out", "ConnectionError",
                "RemoteDisconnected", "Connection aborted", "Name or service not known", "Failed to resolve")


def _short(exc: BaseException) -> str:
    """A short reason for a failed MLflow call: the OS error when there is one, else the first line."""
    text = str(exc)
    m = re.search(r"\[Errno -?\d+\][^'\")\]]*", text)
    if m:
        return m.group(0).strip().rstrip(",")
    return one_line(text, 240)


def tracking_error(uri: str, what: str, exc: BaseException) -> TrackingError:
    text = f"{type(exc).__name__}: {exc}"
    if any(k in text for k in _UNREACHABLE):
        return TrackingError(f"tracking server {uri} unreachable during {what} ({_short(exc)}); start it or "
                             f"pass --tracking-uri")
    return TrackingError(f"tracking store {uri}: {what} failed ({_short(exc)})")


_GIT: dict = {}


def _git(*args: str) -> Optional[str]:
    """`git <args>` in the package's folder: its output, or None (no git, not a checkout, or no answer in 5 s)."""
    try:
        r = subprocess.run(["git", *args], cwd=Path(__file__).resolve().parent, capture_output=True, text=True,
                           timeout=5, stdin=subprocess.DEVNULL)
    except (OSError, subprocess.SubprocessError):
        return None
    return r.stdout.strip() if r.returncode == 0 else None


def git_commit() -> Optional[str]:
    """The full commit of the code when the package sits in a git checkout, else None (asked once)."""
    if "commit" not in _GIT:
        _GIT["commit"] = _git("rev-parse", "HEAD") or None
        _GIT["dirty"] = bool(_GIT["commit"] and _git("status", "--porcelain", "--untracked-files=no", "."))
    return _GIT["commit"]


def code_version() -> str:
    """<package version>+g<commit>[.dirty] when the code is a git checkout, else the package version."""
    sha = git_commit()
    return __version__ + (f"+g{sha[:7]}" + (".dirty" if _GIT["dirty"] else "") if sha else "")


def version_tags() -> dict:
    """What code a run ran: nr.code_version, the git commit (absent outside a checkout), the stack's versions."""
    from importlib.metadata import PackageNotFoundError, version

    tags = {TAG_CODE_VERSION: code_version()}
    if git_commit():
        tags[TAG_GIT_COMMIT] = git_commit()
    for pkg, tag in VERSION_TAGS.items():
        try:
            tags[tag] = __version__ if pkg == "nr_study" else version(pkg)
        except PackageNotFoundError:
            pass
    return tags


def _artifact_location(uri: str, experiment: str) -> Optional[str]:
    """Artifacts next to a sqlite DB (<db dir>/artifacts/<experiment>) instead of ./mlruns of the cwd."""
    if uri.startswith("sqlite:///"):
        db = Path(uri[len("sqlite:///"):])
        return (db.parent / "artifacts" / experiment).absolute().as_uri()
    return None


def quiet_client_logs() -> None:
    """CLI only: no INFO lines from MLflow's DB setup and no urllib3 retry warnings on stderr, so a failure
    reads as the one `error:` line it ends with."""
    import logging

    for name, level in (("mlflow.store.db.utils", logging.WARNING), ("alembic", logging.WARNING),
                        ("urllib3.connectionpool", logging.ERROR), ("urllib3.util.retry", logging.ERROR)):
        logging.getLogger(name).setLevel(level)


def client_for(uri: str):
    """The MLflow client of a tracking URI (the one place nr_study builds one)."""
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


def get_or_create_experiment(client, uri: str, name: str) -> str:
    """The experiment's id, created (or restored) when needed. Every experiment gets mlflow.experimentKind =
    custom_model_development, also one made before this tag existed: MLflow 3 then opens it on the runs table,
    not on its GenAI overview."""
    from mlflow.exceptions import MlflowException

    exp = client.get_experiment_by_name(name)
    if exp is None:
        try:
            return client.create_experiment(name, artifact_location=_artifact_location(uri, name),
                                            tags={TAG_EXPERIMENT_KIND: EXPERIMENT_KIND})
        except MlflowException:  # created concurrently
            exp = client.get_experiment_by_name(name)
            if exp is None:
                raise
    if exp.lifecycle_stage == "deleted":
        client.restore_experiment(exp.experiment_id)
    if TAG_EXPERIMENT_KIND not in exp.tags:  # a kind the user chose is kept
        client.set_experiment_tag(exp.experiment_id, TAG_EXPERIMENT_KIND, EXPERIMENT_KIND)
    return exp.experiment_id


def _finite(v) -> bool:
    try:
        return v is not None and math.isfinite(float(v))
    except (TypeError, ValueError):
        return False


class RunTracker:
    """One MLflow run. start() creates it, or reopens `run_id` (status back to RUNNING)."""

    def __init__(self, tracking_uri: Optional[str] = None, experiment: str = "nr_study", run_id: Optional[str] = None,
                 run_name: Optional[str] = None, tags: Optional[dict] = None, parent_run_id: Optional[str] = None):
        self.uri = resolve_tracking_uri(tracking_uri)
        self.experiment = experiment
        self.run_id = run_id
        self.run_name = run_name
        self.tags = {k: str(v) for k, v in (tags or {}).items() if v is not None}
        self.parent_run_id = parent_run_id
        self.client = client_for(self.uri)
        self.reopened = False
        self.down = False  # a call failed because the store/server is unreachable: skip best-effort calls

    def _call(self, what: str, fn, *args, **kwargs):
        """Run one MLflow client call; any failure becomes a one-line TrackingError."""
        try:
            return fn(*args, **kwargs)
        except (TrackingError, ConfigError, KeyboardInterrupt):
            raise
        except Exception as exc:
            err = tracking_error(self.uri, what, exc)
            self.down = self.down or "unreachable" in str(err)
            raise err from exc

    def start(self) -> str:
        from mlflow.exceptions import MlflowException

        tags = {**version_tags(), **self.tags}
        if self.parent_run_id:
            tags["mlflow.parentRunId"] = self.parent_run_id
        if self.run_id:
            try:
                self.client.get_run(self.run_id)
            except MlflowException as exc:
                if getattr(exc, "error_code", "") == "RESOURCE_DOES_NOT_EXIST":
                    raise ConfigError(f"run id {self.run_id!r}: no such MLflow run at {self.uri}") from None
                raise tracking_error(self.uri, "start", exc) from exc
            except Exception as exc:
                raise tracking_error(self.uri, "start", exc) from exc
            self._call("start", self.client.update_run, self.run_id, status=RUNNING)
            self.reopened = True
            self.set_tags(tags)
        else:
            exp_id = self._call("start", get_or_create_experiment, self.client, self.uri, self.experiment)
            if self.run_name:
                tags["mlflow.runName"] = self.run_name
            run = self._call("start", self.client.create_run, exp_id, tags=tags, run_name=self.run_name)
            self.run_id = run.info.run_id
        return self.run_id

    # -- params / tags -------------------------------------------------------------------------------
    def log_params(self, params: dict) -> None:
        """Log params; ones the run already has (a reopened run) are skipped — MLflow params are immutable."""
        from mlflow.entities import Param

        have = self._call("log_params", self.client.get_run, self.run_id).data.params if self.reopened else {}
        items = [Param(str(k), self._pstr(v)) for k, v in params.items() if str(k) not in have]
        for i in range(0, len(items), 100):
            self._call("log_params", self.client.log_batch, self.run_id, params=items[i : i + 100])

    @staticmethod
    def _pstr(v) -> str:
        s = json.dumps(v) if isinstance(v, (list, dict)) else str(v)
        return s[:6000]

    def set_tags(self, tags: dict) -> None:
        from mlflow.entities import RunTag

        items = [RunTag(str(k), str(v)) for k, v in tags.items() if v is not None]
        if items:
            self._call("set_tags", self.client.log_batch, self.run_id, tags=items)

    # -- metrics ------------------------------------------------------------------------------------
    def log_epoch(self, epoch: int, metrics: dict) -> None:
        """All of one epoch's metrics in one log_batch call (step = epoch). Non-numbers/non-finite are skipped."""
        from mlflow.entities import Metric

        ts = int(time.time() * 1000)
        items = [Metric(k, float(v), ts, int(epoch)) for k, v in metrics.items()
                 if k != "epoch" and not isinstance(v, bool) and _finite(v)]
        if items:
            self._call(f"logging epoch {epoch}", self.client.log_batch, self.run_id, metrics=items)

    def logged_epochs(self, key: str = EPOCH_KEY) -> set[int]:
        return {int(m.step) for m in self._call("sync_history", self.client.get_metric_history, self.run_id, key)}

    def sync_history(self, history: Iterable[dict]) -> list[int]:
        """Log every epoch of `history` (dicts with 'epoch') that the run lacks; returns the epochs logged."""
        have = self.logged_epochs()
        done = []
        for row in history:
            e = int(row["epoch"])
            if e not in have:
                self.log_epoch(e, row)
                done.append(e)
        return done

    def log_summary(self, metrics: dict, model_id: Optional[str] = None) -> None:
        """The final metrics (step 0); with `model_id` they are also the logged model's metrics."""
        from mlflow.entities import Metric

        ts = int(time.time() * 1000)
        items = [Metric(k, float(v), ts, 0, model_id=model_id) for k, v in metrics.items() if _finite(v)]
        if items:
            self._call("log_summary", self.client.log_batch, self.run_id, metrics=items)

    # -- artifacts ----------------------------------------------------------------------------------
    def log_dict(self, obj, artifact_file: str) -> None:
        self._call(f"logging {artifact_file}", self.client.log_dict, self.run_id, obj, artifact_file)

    def log_text(self, text: str, artifact_file: str) -> None:
        self._call(f"logging {artifact_file}", self.client.log_text, self.run_id, text, artifact_file)

    def log_artifact(self, local_path, artifact_path: Optional[str] = None) -> None:
        self._call(f"logging {artifact_path or ''}/{Path(local_path).name}", self.client.log_artifact, self.run_id,
                   str(local_path), artifact_path)

    def list_artifacts(self, path: Optional[str] = None) -> list[str]:
        return [f.path for f in self._call("list_artifacts", self.client.list_artifacts, self.run_id, path)]

    def log_model(self, payload: dict, step: int) -> str:
        """The final model as an MLflow LoggedModel of this run (the runs table's Models column): the payload
        file (weights + architecture spec, loaded with weights_only=True; no pickled code) and its description
        as JSON. One model per run and final epoch: a retry that died after logging it keeps that one; a run
        resumed to train further gets a new one (load_model takes the latest). Returns its id."""
        import torch
        from mlflow.entities import LoggedModelOutput, LoggedModelStatus

        run = self._call("log_model", self.client.get_run, self.run_id)
        exp_id = run.info.experiment_id
        model_id = self._call("log_model", logged_model_id, self.client, self.run_id, exp_id, epoch=step)
        if model_id is None:
            meta = {k: v for k, v in payload.items() if k != "state_dict"}
            lm = self._call("log_model", self.client.create_logged_model, exp_id, name=MODEL_NAME,
                            source_run_id=self.run_id, model_type=MODEL_TYPE,
                            params={"model_name": meta["model_name"], "num_classes": str(meta["num_classes"]),
                                    "epoch": str(step)})
            model_id = lm.model_id
            with tempfile.TemporaryDirectory() as td:
                torch.save(payload, Path(td) / MODEL_FILE)
                (Path(td) / MODEL_META).write_text(json.dumps(dict(meta, run_id=self.run_id), indent=1))
                self._call("log_model", self.client.log_model_artifacts, model_id, td)
            self._call("log_model", self.client.finalize_logged_model, model_id, LoggedModelStatus.READY)
        if model_id not in {o.model_id for o in (run.outputs.model_outputs if run.outputs else [])}:
            self._call("log_model", self.client.log_outputs, self.run_id, [LoggedModelOutput(model_id, step)])
        return model_id

    # -- inputs -------------------------------------------------------------------------------------
    def log_data(self, dcfg, data) -> None:
        """The training and the test subset as dataset inputs (the runs table's Dataset column): names, sizes,
        a digest of the images and labels themselves, the source; only metadata goes into the store. MLflow
        keeps one input per dataset and digest, so a reopened run logging them again adds nothing."""
        inputs = dataset_inputs(dcfg, data)
        for attempt in range(3):
            try:
                return self._call("log_input", self.client.log_inputs, self.run_id, datasets=inputs)
            except TrackingError as exc:
                # trials starting together log the same new dataset: MLflow looks it up, finds none, and all but
                # one insert fail on its UNIQUE key (rolled back). Now it exists: linking it again succeeds.
                if attempt == 2 or "UNIQUE constraint failed" not in str(exc):
                    raise

    # -- end ----------------------------------------------------------------------------------------
    def end(self, status: str = FINISHED) -> None:
        if self.run_id:
            self._call(f"ending the run ({status})", self.client.set_terminated, self.run_id, status=status)

    def end_quietly(self, status: str, error: Optional[str] = None) -> bool:
        """Best effort after a failure: tag `nr.error` and set the status; never raises, skipped (False) when
        the server is known to be unreachable (each call would wait for its retries)."""
        if not self.run_id or self.down:
            return False
        try:
            if error:
                self.set_tags({TAG_ERROR: error[:500]})
            self.end(status)
            return True
        except Exception:
            return False


def _digest(*parts) -> str:
    """sha256 over whole arrays (MLflow's own numpy digest reads only the first 10,000 values)."""
    import hashlib

    import numpy as np

    h = hashlib.sha256()
    for p in parts:
        a = np.ascontiguousarray(p)
        h.update(str((a.dtype.str, a.shape)).encode())
        h.update(a.data)
    return h.hexdigest()[:16]


def dataset_inputs(dcfg, data) -> list:
    """DatasetInputs for a run's training and test subsets: an mlflow.data numpy dataset (schema, shapes) for
    tensor data, a metadata dataset (digest of the file list) for folder data; the source says how
    nr_study.data rebuilds the subset (dataset, root, subset seed, sizes)."""
    import mlflow.data
    import numpy as np
    from mlflow.data.code_dataset_source import CodeDatasetSource
    from mlflow.data.meta_dataset import MetaDataset
    from mlflow.entities import DatasetInput, InputTag
    from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

    out = []
    for ctx, split in ((DATA_CONTEXT_TRAIN, "train"), (DATA_CONTEXT_TEST, "test")):
        n = int(getattr(data, f"n_{split}"))
        source = CodeDatasetSource({"nr_study.data": dcfg.name, "split": split, "root": dcfg.root or "default",
                                    "subset_seed": str(dcfg.subset_seed), "n": str(n)})
        if hasattr(data, f"x_{split}"):
            x, y = (getattr(data, f"{a}_{split}").detach().cpu().numpy() for a in ("x", "y"))
            ds = mlflow.data.from_numpy(x, source=source, targets=y, name=dcfg.name, digest=_digest(x, y))
        else:  # LoaderData: an ImageFolder (maybe a Subset of it)
            sub = getattr(data, f"{split}_ds")
            idx = list(getattr(sub, "indices", range(len(sub))))
            samples = getattr(sub, "dataset", sub).samples
            files = json.dumps([samples[i] for i in idx]).encode()
            ds = MetaDataset(source, name=dcfg.name, digest=_digest(np.frombuffer(files, dtype=np.uint8)))
        out.append(DatasetInput(ds._to_mlflow_entity(), tags=[InputTag(MLFLOW_DATASET_CONTEXT, ctx),
                                                              InputTag("nr.n_images", str(n))]))
    return out


class SystemMetrics:
    """MLflow's SystemMetricsMonitor (CPU, memory, disk, network; GPU when pynvml is installed) on one run, a
    sample every SYSTEM_METRICS_INTERVAL_S (MLflow's $MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL overrides it).
    A reopened run continues its steps. MLflow's monitor drops the samples of the last unfinished interval
    (a run shorter than one interval would have none): stop() logs them. Never fails a run."""

    def __init__(self, run_id: str, uri: str):
        import logging

        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        # its INFO lines (start, stop, "skip GPU metrics") would be 4 lines per trial in a sweep's output
        logging.getLogger("mlflow.system_metrics").setLevel(logging.WARNING)
        self.monitor = SystemMetricsMonitor(run_id, sampling_interval=SYSTEM_METRICS_INTERVAL_S,
                                            resume_logging=True, tracking_uri=uri)
        self.monitor.start()

    @classmethod
    def start(cls, tracker: "RunTracker") -> Optional["SystemMetrics"]:
        try:
            return cls(tracker.run_id, tracker.uri)
        except Exception as exc:  # psutil missing, store unreachable: the run goes on without them
            print(f"warning: no system metrics for run {tracker.run_id}: {one_line(exc, 200)}", file=sys.stderr)
            return None

    def stop(self) -> None:
        m, self.monitor = self.monitor, None
        if m is None:
            return
        try:
            m.finish()
            m.collect_metrics()
            m.publish_metrics(m.aggregate_metrics())
            m.mlflow_logger.flush()
        except Exception:
            pass


def run_tags(cfg, extra: Optional[dict] = None) -> dict:
    """The tags every training run gets (names: nr_study.names), then the config's tracking.tags, then `extra`."""
    from nr_study.methods import resolved_nr

    res = resolved_nr(cfg)
    t = {TAG_METHOD: cfg.method, TAG_ARCH: cfg.model.name, TAG_DATASET: cfg.data.name, TAG_SEED: cfg.seed,
         TAG_SCHEME: res["scheme"] or "-", TAG_CONSTRAINT: cfg.nr.constraint if res["nr"] else "-"}
    t.update(cfg.tracking.tags or {})
    t.update(extra or {})
    return t


def open_run(uri: str, cfg, *, run_id: Optional[str] = None, tags: Optional[dict] = None,
             parent_run_id: Optional[str] = None) -> RunTracker:
    """A training run's MLflow run, started: a new one (tags, the flattened config as params, config.yaml), or
    `run_id` reopened (its params and config are already there). `train()` and a sweep trial (which opens its
    run before training, so a retry finds it) both open theirs here."""
    import yaml

    from nr_study.config import config_to_dict, flatten

    tracker = RunTracker(uri, cfg.tracking.experiment, run_id, run_name=cfg.tracking.run_name,
                         tags=run_tags(cfg, tags), parent_run_id=parent_run_id)
    tracker.start()
    if not tracker.reopened:
        try:
            tracker.log_params(flatten(config_to_dict(cfg)))
            tracker.log_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False), "config.yaml")
        except BaseException as exc:
            tracker.end_quietly(KILLED if isinstance(exc, KeyboardInterrupt) else FAILED,
                                f"{type(exc).__name__}: {one_line(exc, 500)}")
            raise
    return tracker


def download_artifact(run_id: str, artifact_path: str, tracking_uri: Optional[str], dst: str) -> str:
    """Download into `dst`, which the caller owns (a TemporaryDirectory): nothing is left behind in /tmp."""
    import mlflow.artifacts

    uri = resolve_tracking_uri(tracking_uri)
    try:
        return mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=artifact_path, tracking_uri=uri,
                                                   dst_path=dst)
    except Exception as exc:  # MlflowException, OSError
        raise ConfigError(f"run {run_id!r}: cannot fetch artifact {artifact_path!r} from {uri} ({exc})") from None


def logged_model_id(client, run_id: str, experiment_id: str, epoch: Optional[int] = None) -> Optional[str]:
    """The id of the latest READY model `run_id` logged (log_model), of that final `epoch` when given; None
    when it has none."""
    models = client.search_logged_models([experiment_id], filter_string=f"source_run_id = '{run_id}'",
                                         max_results=100)
    ready = [m for m in models if str(m.status) == "READY" and m.name == MODEL_NAME
             and (epoch is None or m.params.get("epoch") == str(epoch))]
    return max(ready, key=lambda m: (int(m.params.get("epoch", 0)), m.creation_timestamp)).model_id if ready else None


def load_model(ref: str, tracking_uri: Optional[str] = None):
    """The final model of a run in one line, as an nn.Module in eval mode on CPU: `ref` is a run id (its logged
    model, else its `model/model.pt` artifact), `models:/<model id>`, or a folder `nr-study export` wrote.
    The payload is read with weights_only=True and the architecture spec rebuilds the module: no code is
    unpickled."""
    import torch

    from nr_study.checkpoint import model_from_payload

    path = Path(ref) / MODEL_FILE
    if path.is_file():
        payload = torch.load(path, map_location="cpu", weights_only=True)
    else:
        with tempfile.TemporaryDirectory(prefix="nr_model_") as tmp:
            path = Path(download_model(ref, tracking_uri, dst=tmp)) / MODEL_FILE
            payload = torch.load(path, map_location="cpu", weights_only=True)
    model = model_from_payload(payload)
    model.eval()
    return model


def download_model(ref: str, tracking_uri: Optional[str], dst: str) -> str:
    """Download a run's final model (run id or models:/<id>) into `dst`, which the caller owns: the folder
    holding model.pt (and model.json for a logged model)."""
    uri = resolve_tracking_uri(tracking_uri)
    client = client_for(uri)
    try:
        if ref.startswith("models:/"):
            model_id = ref[len("models:/"):].strip("/")
        else:
            run = client.get_run(ref)
            model_id = logged_model_id(client, ref, run.info.experiment_id)
        if model_id is None:  # a run from before logged models: its plain artifact
            return str(Path(download_artifact(ref, f"model/{MODEL_FILE}", uri, dst)).parent)
        import mlflow.artifacts

        return mlflow.artifacts.download_artifacts(artifact_uri=client.get_logged_model(model_id).artifact_location,
                                                   tracking_uri=uri, dst_path=dst)
    except ConfigError:
        raise
    except Exception as exc:
        raise ConfigError(f"model {ref!r}: cannot fetch it from {uri} ({one_line(exc, 300)}); allowed: a run id, "
                          f"models:/<model id>, or a folder with {MODEL_FILE}") from None
