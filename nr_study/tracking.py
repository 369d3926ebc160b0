"""MLflow tracking for one training run: params, tags, per-epoch metrics, artifacts, run continuity.

One MLflow run per training run, always. `RunTracker(uri, run_id=...)` reopens an existing run (a retried or
resumed trial) instead of opening a second one; `sync_history(history)` logs the epochs the run lacks, so each
epoch appears exactly once. All calls go through an `MlflowClient` (no global active run), so a sweep driver
holding its own parent run is never disturbed.

Tracking URI precedence: explicit argument (CLI --tracking-uri) > config tracking.uri > $MLFLOW_TRACKING_URI >
sqlite:///<runs>/mlflow.db where <runs> is $NR_STUDY_RUNS or <cwd>/runs (absolute).
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Iterable, Optional

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

from nr_study import __version__  # noqa: E402
from nr_study.errors import ConfigError  # noqa: E402

FINISHED, FAILED, KILLED, RUNNING = "FINISHED", "FAILED", "KILLED", "RUNNING"
EPOCH_KEY = "test_err"  # the metric whose history says which epochs a run already has


def runs_dir() -> Path:
    return Path(os.environ.get("NR_STUDY_RUNS") or Path.cwd() / "runs").absolute()


def default_tracking_uri() -> str:
    d = runs_dir()
    d.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{d / 'mlflow.db'}"


def resolve_tracking_uri(uri: Optional[str] = None, cfg_uri: Optional[str] = None) -> str:
    return uri or cfg_uri or os.environ.get("MLFLOW_TRACKING_URI") or default_tracking_uri()


_CODE_VERSION: Optional[str] = None


def code_version() -> str:
    """<package version>+g<commit>[.dirty] when the code is a git checkout, else the package version."""
    global _CODE_VERSION
    if _CODE_VERSION is None:
        here = Path(__file__).resolve().parent
        v = __version__
        try:
            sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=here, capture_output=True, text=True,
                                 timeout=10)
            if sha.returncode == 0 and sha.stdout.strip():
                v += f"+g{sha.stdout.strip()}"
                st = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "."], cwd=here,
                                    capture_output=True, text=True, timeout=10)
                if st.returncode == 0 and st.stdout.strip():
                    v += ".dirty"
        except (OSError, subprocess.SubprocessError):
            pass
        _CODE_VERSION = v
    return _CODE_VERSION


def _artifact_location(uri: str, experiment: str) -> Optional[str]:
    """Artifacts next to a sqlite DB (<db dir>/artifacts/<experiment>) instead of ./mlruns of the cwd."""
    if uri.startswith("sqlite:///"):
        db = Path(uri[len("sqlite:///"):])
        return (db.parent / "artifacts" / experiment).absolute().as_uri()
    return None


def _client(uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


def get_or_create_experiment(client, uri: str, name: str) -> str:
    from mlflow.exceptions import MlflowException

    exp = client.get_experiment_by_name(name)
    if exp is not None:
        if exp.lifecycle_stage == "deleted":
            client.restore_experiment(exp.experiment_id)
        return exp.experiment_id
    try:
        return client.create_experiment(name, artifact_location=_artifact_location(uri, name))
    except MlflowException:  # created concurrently
        exp = client.get_experiment_by_name(name)
        if exp is None:
            raise
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
        self.client = _client(self.uri)
        self.reopened = False

    def start(self) -> str:
        from mlflow.exceptions import MlflowException

        tags = dict(self.tags)
        tags.setdefault("nr.code_version", code_version())
        if self.parent_run_id:
            tags["mlflow.parentRunId"] = self.parent_run_id
        if self.run_id:
            try:
                self.client.get_run(self.run_id)
            except MlflowException:
                raise ConfigError(f"run id {self.run_id!r}: no such MLflow run at {self.uri}") from None
            self.client.update_run(self.run_id, status=RUNNING)
            self.reopened = True
            self.set_tags(tags)
        else:
            exp_id = get_or_create_experiment(self.client, self.uri, self.experiment)
            if self.run_name:
                tags["mlflow.runName"] = self.run_name
            run = self.client.create_run(exp_id, tags=tags, run_name=self.run_name)
            self.run_id = run.info.run_id
        return self.run_id

    # -- params / tags -------------------------------------------------------------------------------
    def log_params(self, params: dict) -> None:
        """Log params; ones the run already has (a reopened run) are skipped — MLflow params are immutable."""
        from mlflow.entities import Param

        have = self.client.get_run(self.run_id).data.params if self.reopened else {}
        items = [Param(str(k), self._pstr(v)) for k, v in params.items() if str(k) not in have]
        for i in range(0, len(items), 100):
            self.client.log_batch(self.run_id, params=items[i : i + 100])

    @staticmethod
    def _pstr(v) -> str:
        s = json.dumps(v) if isinstance(v, (list, dict)) else str(v)
        return s[:6000]

    def set_tags(self, tags: dict) -> None:
        from mlflow.entities import RunTag

        items = [RunTag(str(k), str(v)) for k, v in tags.items() if v is not None]
        if items:
            self.client.log_batch(self.run_id, tags=items)

    # -- metrics ------------------------------------------------------------------------------------
    def log_epoch(self, epoch: int, metrics: dict) -> None:
        """All of one epoch's metrics in one log_batch call (step = epoch). Non-numbers/non-finite are skipped."""
        from mlflow.entities import Metric

        ts = int(time.time() * 1000)
        items = [Metric(k, float(v), ts, int(epoch)) for k, v in metrics.items()
                 if k != "epoch" and not isinstance(v, bool) and _finite(v)]
        if items:
            self.client.log_batch(self.run_id, metrics=items)

    def logged_epochs(self, key: str = EPOCH_KEY) -> set[int]:
        return {int(m.step) for m in self.client.get_metric_history(self.run_id, key)}

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

    def log_summary(self, metrics: dict) -> None:
        from mlflow.entities import Metric

        ts = int(time.time() * 1000)
        items = [Metric(k, float(v), ts, 0) for k, v in metrics.items() if _finite(v)]
        if items:
            self.client.log_batch(self.run_id, metrics=items)

    # -- artifacts ----------------------------------------------------------------------------------
    def log_dict(self, obj, artifact_file: str) -> None:
        self.client.log_dict(self.run_id, obj, artifact_file)

    def log_text(self, text: str, artifact_file: str) -> None:
        self.client.log_text(self.run_id, text, artifact_file)

    def log_artifact(self, local_path, artifact_path: Optional[str] = None) -> None:
        self.client.log_artifact(self.run_id, str(local_path), artifact_path)

    def list_artifacts(self, path: Optional[str] = None) -> list[str]:
        return [f.path for f in self.client.list_artifacts(self.run_id, path)]

    # -- end ----------------------------------------------------------------------------------------
    def end(self, status: str = FINISHED) -> None:
        if self.run_id:
            self.client.set_terminated(self.run_id, status=status)


def download_artifact(run_id: str, artifact_path: str, tracking_uri: Optional[str] = None,
                      dst: Optional[str] = None) -> str:
    import mlflow.artifacts

    uri = resolve_tracking_uri(tracking_uri)
    dst = dst or tempfile.mkdtemp(prefix="nr_study_art_")
    try:
        return mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=artifact_path, tracking_uri=uri,
                                                   dst_path=dst)
    except Exception as exc:  # MlflowException, OSError
        raise ConfigError(f"run {run_id!r}: cannot fetch artifact {artifact_path!r} from {uri} ({exc})") from None


def load_model_from_run(run_id: str, tracking_uri: Optional[str] = None):
    """Rebuild the final model of a run from its `model/model.pt` artifact (create_model + apply_architecture +
    load_state_dict). Returns the nn.Module in eval mode, on CPU."""
    import torch

    from nr_study.train import model_from_payload

    path = download_artifact(run_id, "model/model.pt", tracking_uri)
    payload = torch.load(path, map_location="cpu", weights_only=True)
    model = model_from_payload(payload)
    model.eval()
    return model
