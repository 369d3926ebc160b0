"""What MLflow shows beside the metrics: the experiment kind (runs table, not the GenAI overview), the code's
git commit and versions, the dataset inputs, system metrics and the logged model. Real stores, no mocks."""
from __future__ import annotations

import subprocess
import sys
import tempfile
from importlib.metadata import version
from pathlib import Path

from mlflow.tracking import MlflowClient

from nr_study import names as N
from nr_study import tracking as T
from nr_study.tracking_uri import default_tracking_uri


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


def _inputs(c, rid) -> dict:
    """context -> (name, digest, profile, source) of the run's dataset inputs."""
    import json

    out = {}
    for di in c.get_run(rid).inputs.dataset_inputs:
        ctx = {t.key: t.value for t in di.tags}["mlflow.data.context"]
        assert ctx not in out  # one input per subset
        d = di.dataset
        out[ctx] = (d.name, d.digest, json.loads(d.profile), json.loads(d.source), len(d.schema or ""))
    return out


def test_dataset_inputs_name_size_digest_source(tracking_uri, tiny_cfg, tmp_path):
    from nr_study.train import train

    tiny_cfg["train"]["epochs"] = 1
    tiny_cfg["data"].update(n_train=96, n_test=64)
    a = train(tiny_cfg, tracking_uri=tracking_uri, checkpoint_dir=tmp_path / "a", progress=False)["run_id"]
    b = train(tiny_cfg, tracking_uri=tracking_uri, progress=False)["run_id"]
    tiny_cfg["data"]["subset_seed"] = 1
    s = train(tiny_cfg, tracking_uri=tracking_uri, progress=False)["run_id"]
    c = MlflowClient(tracking_uri)
    ia, ib, is_ = _inputs(c, a), _inputs(c, b), _inputs(c, s)
    assert set(ia) == {N.DATA_CONTEXT_TRAIN, N.DATA_CONTEXT_TEST}
    name, digest, profile, source, schema_len = ia[N.DATA_CONTEXT_TRAIN]
    assert name == "synthetic" and profile["features_shape"] == [96, 1, 28, 28] and profile["targets_shape"] == [96]
    assert ia[N.DATA_CONTEXT_TEST][2]["features_shape"][0] == 64
    assert source["tags"]["nr_study.data"] == "synthetic" and source["tags"]["subset_seed"] == "0"
    assert schema_len < 2000  # metadata only: the images are not in the store
    assert ia == ib  # the same subset, the same digest
    assert is_[N.DATA_CONTEXT_TRAIN][1] != digest and is_[N.DATA_CONTEXT_TEST][1] != ia[N.DATA_CONTEXT_TEST][1]
    assert ia[N.DATA_CONTEXT_TRAIN][1] != ia[N.DATA_CONTEXT_TEST][1]

    tiny_cfg["data"]["subset_seed"] = 0
    # resume the first run: it is reopened, its inputs are not doubled
    assert train(tiny_cfg, tracking_uri=tracking_uri, checkpoint_dir=tmp_path / "a", resume=True,
                 progress=False)["run_id"] == a
    assert _inputs(c, a) == ia
    # the checkpoint had finished (its planned epochs): nothing more to train, no second logged model
    run = c.get_run(a)
    assert [c.get_logged_model(o.model_id).params["epoch"] for o in run.outputs.model_outputs] == ["1"]


def _system_steps(c, rid) -> dict:
    run = c.get_run(rid)
    return {k: sorted(m.step for m in c.get_metric_history(rid, k))
            for k in run.data.metrics if k.startswith(N.SYSTEM_METRICS_PREFIX)}


def test_system_metrics_opt_in_and_reopened_run(tracking_uri, tiny_cfg, tmp_path):
    from nr_study.train import train

    tiny_cfg["train"]["epochs"] = 1
    c = MlflowClient(tracking_uri)
    off = train(tiny_cfg, tracking_uri=tracking_uri, progress=False)["run_id"]  # nr-study train: off by default
    assert _system_steps(c, off) == {}
    tiny_cfg["tracking"] = {"system_metrics": True}
    rid = train(tiny_cfg, tracking_uri=tracking_uri, checkpoint_dir=tmp_path, progress=False)["run_id"]
    first = _system_steps(c, rid)
    for k in ("cpu_utilization_percentage", "system_memory_usage_megabytes"):
        assert first[N.SYSTEM_METRICS_PREFIX + k] == [0]  # one sample: the run is shorter than one interval
    tiny_cfg["train"]["epochs"] = 2
    train(tiny_cfg, tracking_uri=tracking_uri, checkpoint_dir=tmp_path, resume=True, progress=False)
    again = _system_steps(c, rid)  # the reopened run continues its steps
    assert again[N.SYSTEM_METRICS_PREFIX + "cpu_utilization_percentage"] == [0, 1]
    tiny_cfg["train"]["epochs"] = 1  # the argument (a sweep trial's default) wins over the config
    assert _system_steps(c, train(tiny_cfg, tracking_uri=tracking_uri, progress=False, system_metrics=False)["run_id"]) == {}


def _test_err(model, cfg) -> float:
    """Top-1 test error (%) of `model` on the config's test subset, batched as the trainer evaluates."""
    import torch

    from nr_study.config import config_from_dict
    from nr_study.data import build_data

    c = config_from_dict(cfg)
    data = build_data(c.data, "cpu", seed=c.seed)
    wrong = n = 0
    with torch.no_grad():
        for x, y in data.test_batches(c.train.eval_batch_size):
            wrong += int((model(x).argmax(1) != y).sum())
            n += len(y)
    return 100.0 * wrong / n


def test_logged_model_reproduces_the_final_test_error(tracking_uri, tiny_cfg, tmp_path, capsys, monkeypatch):
    import nr_study
    from nr_study.cli import main
    from nr_study.train import train

    tiny_cfg.update(method="NR-CR")  # a rejuvenated architecture: the spec must rebuild it
    tiny_cfg["nr"] = {"tr": 0.97, "dead_threshold": 0.8, "delta_t": 4, "delta_t_unit": "step", "delta_lambda": 0.04}
    tiny_cfg["train"]["epochs"] = 2
    s = train(tiny_cfg, tracking_uri=tracking_uri, progress=False)
    assert s["rejuvenations"] >= 1
    c = MlflowClient(tracking_uri)
    run = c.get_run(s["run_id"])
    assert [o.model_id for o in run.outputs.model_outputs] == [s["model_id"]]
    lm = c.get_logged_model(s["model_id"])
    assert lm.source_run_id == s["run_id"] and lm.model_type == N.MODEL_TYPE and str(lm.status) == "READY"
    assert {m.key: m.value for m in lm.metrics}["final_test_err"] == run.data.metrics["final_test_err"]

    want = run.data.metrics["final_test_err"]
    scratch = tmp_path / "scratch"  # the temporary folder load_model downloads into: left empty afterwards
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    assert _test_err(nr_study.load_model(s["run_id"], tracking_uri), tiny_cfg) == want
    assert _test_err(nr_study.load_model(f"models:/{s['model_id']}", tracking_uri), tiny_cfg) == want
    assert list(scratch.iterdir()) == []
    out = tmp_path / "exported"
    assert main(["export", s["run_id"], str(out), "--tracking-uri", tracking_uri]) == 0
    assert sorted(p.name for p in out.iterdir()) == [N.MODEL_META, N.MODEL_FILE]
    assert _test_err(nr_study.load_model(str(out)), tiny_cfg) == want
    assert main(["export", "0" * 32, str(tmp_path / "x"), "--tracking-uri", tracking_uri]) == 2
    assert "cannot fetch it" in capsys.readouterr().err and not (tmp_path / "x").exists()


def test_trials_starting_together_log_the_same_dataset(tracking_uri):
    """Concurrent trials log the same new dataset: MLflow's insert races on its UNIQUE key (seen in a real
    sweep as a failed trial); every run still gets both inputs, none fails."""
    import threading

    from nr_study.config import config_from_dict
    from nr_study.data import build_data

    c, errors = MlflowClient(tracking_uri), []
    for n in (32, 33, 34):  # a new dataset (digest) each round
        cfg = config_from_dict({"data": {"name": "synthetic", "n_train": n, "n_test": 16}})
        data = build_data(cfg.data)
        trackers = [T.RunTracker(tracking_uri, "same_data") for _ in range(4)]
        for t in trackers:
            t.start()
        barrier = threading.Barrier(len(trackers))

        def log(t):
            barrier.wait()
            try:
                t.log_data(cfg.data, data)
            except Exception as exc:  # noqa: BLE001 - the assertion below names it
                errors.append(f"{type(exc).__name__}: {exc}")

        threads = [threading.Thread(target=log, args=(t,)) for t in trackers]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        assert not errors, errors[0]
        digests = {tuple(sorted(v[1] for v in _inputs(c, t.run_id).values())) for t in trackers}
        assert len(digests) == 1 and len(next(iter(digests))) == 2  # both subsets, the same rows for every run


def test_demo_prints_the_experiments_runs_link(tmp_path):
    """`make demo`'s last line: the same runs-table link `nr-study sweep` prints, not MLflow's GenAI home."""
    from nr_study.mlflow_server import main, ui_url

    runs = tmp_path / "runs"
    out = subprocess.run([sys.executable, "-m", "nr_study.mlflow_server", "--runs", str(runs), "--experiment",
                          "nr-demo", "--print-url"], capture_output=True, text=True, check=True).stdout
    assert out.strip() == ui_url("http://127.0.0.1:5000") and not runs.exists()  # no store yet: list, nothing made
    exp = MlflowClient(default_tracking_uri(runs)).create_experiment("nr-demo")
    MlflowClient(default_tracking_uri(runs)).create_experiment("other")
    assert main(["--runs", str(runs), "--experiment", "nr-demo", "--print-url", "--port", "5001"]) == 0
    out = subprocess.run([sys.executable, "-m", "nr_study.mlflow_server", "--runs", str(runs), "--experiment",
                          "nr-demo", "--print-url"], capture_output=True, text=True, check=True).stdout
    link = out.split()[0]
    assert link == f"http://127.0.0.1:5000/#/experiments/{exp}?workflowType=machine_learning"
    assert "click +" in out
