"""What MLflow shows beside the metrics: the experiment kind (runs table, not the GenAI overview), the code's
git commit and versions, the dataset inputs, system metrics and the logged model. Real stores, no mocks."""
from __future__ import annotations

import subprocess
from importlib.metadata import version
from pathlib import Path

from mlflow.tracking import MlflowClient

from nr_study import names as N
from nr_study import tracking as T


def test_every_experiment_opens_on_the_runs_table(tracking_uri):
    c = MlflowClient(tracking_uri)
    T.RunTracker(tracking_uri, "kind_new").start()
    assert c.get_experiment_by_name("kind_new").tags[N.TAG_EXPERIMENT_KIND] == N.EXPERIMENT_KIND
    old = c.create_experiment("kind_old")  # made before nr_study set the tag
    assert N.TAG_EXPERIMENT_KIND not in c.get_experiment(old).tags
    T.RunTracker(tracking_uri, "kind_old").start()
    assert c.get_experiment(old).tags[N.TAG_EXPERIMENT_KIND] == N.EXPERIMENT_KIND
    chosen = c.create_experiment("kind_chosen", tags={N.TAG_EXPERIMENT_KIND: "genai_development"})
    T.RunTracker(tracking_uri, "kind_chosen").start()
    assert c.get_experiment(chosen).tags[N.TAG_EXPERIMENT_KIND] == "genai_development"  # the user's choice kept


def test_runs_carry_git_commit_and_versions(tracking_uri, monkeypatch, tmp_path):
    here = Path(T.__file__).resolve().parent
    try:
        r = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=30)
        sha = r.stdout.strip() if r.returncode == 0 else None
    except OSError:
        sha = None
    monkeypatch.setattr(T, "_GIT", {})
    rid = T.RunTracker(tracking_uri, "versions").start()
    tags = MlflowClient(tracking_uri).get_run(rid).data.tags
    assert tags.get(N.TAG_GIT_COMMIT) == sha  # absent outside a git checkout
    for pkg in ("torch", "ray", "mlflow"):
        assert tags[N.VERSION_TAGS[pkg]] == version(pkg)
    assert tags[N.VERSION_TAGS["nr_study"]] == T.__version__

    monkeypatch.setattr(T, "_GIT", {})
    monkeypatch.setenv("PATH", str(tmp_path))  # no git on the PATH: no tag, no error
    rid = T.RunTracker(tracking_uri, "versions").start()
    tags = MlflowClient(tracking_uri).get_run(rid).data.tags
    assert N.TAG_GIT_COMMIT not in tags and tags[N.TAG_CODE_VERSION] == T.__version__
    assert tags[N.VERSION_TAGS["torch"]] == version("torch")
