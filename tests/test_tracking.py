"""Tracking: URI precedence, one run reopened (not duplicated), epochs logged once, terminal status."""
from __future__ import annotations

from mlflow.tracking import MlflowClient

from nr_study import tracking as T
from nr_study import tracking_uri as U


def test_uri_precedence(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("NR_STUDY_RUNS", str(tmp_path / "r"))
    assert U.resolve_tracking_uri() == f"sqlite:///{tmp_path / 'r' / 'mlflow.db'}"
    assert (tmp_path / "r").is_dir()
    monkeypatch.delenv("NR_STUDY_RUNS")
    monkeypatch.chdir(tmp_path)
    assert U.default_tracking_uri() == f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:////env.db")
    assert U.resolve_tracking_uri() == "sqlite:////env.db"
    assert U.resolve_tracking_uri(None, "sqlite:////cfg.db") == "sqlite:////cfg.db"
    assert U.resolve_tracking_uri("http://x:5000", "sqlite:////cfg.db") == "http://x:5000"


def test_run_reopened_and_epochs_logged_once(tracking_uri):
    tr = T.RunTracker(tracking_uri, "tracking_test", tags={"nr.method": "BL"}, run_name="t")
    rid = tr.start()
    tr.log_params({"a.b": 1, "c": [1, 2]})
    hist = [{"epoch": e, "test_err": 50.0 - e, "train_loss": 1.0 / e} for e in (1, 2, 3)]
    tr.log_epoch(1, hist[0])
    tr.end(T.KILLED)
    c = MlflowClient(tracking_uri)
    assert c.get_run(rid).info.status == "KILLED"

    tr2 = T.RunTracker(tracking_uri, "tracking_test", run_id=rid)
    assert tr2.start() == rid and tr2.reopened
    assert c.get_run(rid).info.status == "RUNNING"
    tr2.log_params({"a.b": 1, "new": "x"})  # existing params are skipped, not re-logged
    assert tr2.sync_history(hist) == [2, 3]
    assert tr2.sync_history(hist) == []
    tr2.end(T.FINISHED)
    run = c.get_run(rid)
    assert run.info.status == "FINISHED" and run.data.params == {"a.b": "1", "c": "[1, 2]", "new": "x"}
    assert run.data.tags["nr.method"] == "BL" and run.data.tags["nr.code_version"] == T.code_version()
    assert [m.step for m in c.get_metric_history(rid, "test_err")] == [1, 2, 3]
    assert len(c.search_runs([run.info.experiment_id])) == 1


def test_parent_run_tag_and_missing_run(tracking_uri):
    import pytest

    from nr_study.errors import ConfigError

    parent = T.RunTracker(tracking_uri, "tracking_test")
    pid = parent.start()
    child = T.RunTracker(tracking_uri, "tracking_test", parent_run_id=pid)
    cid = child.start()
    assert MlflowClient(tracking_uri).get_run(cid).data.tags["mlflow.parentRunId"] == pid
    child.end()
    parent.end()
    with pytest.raises(ConfigError, match="no such MLflow run"):
        T.RunTracker(tracking_uri, run_id="0" * 32).start()
