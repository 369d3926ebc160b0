"""Adding a method is one file (tests/toy_method.py registers BL-L1 with @register_method): the config accepts
it, the trainer runs it through the same events as every method, and a sweep runs it in Ray workers."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from mlflow.tracking import MlflowClient

REPO = Path(__file__).resolve().parents[1]
CFG = {"model": {"name": "vgg_small", "kwargs": {"width": 8}},
       "data": {"name": "synthetic", "n_train": 256, "n_test": 64},
       "optim": {"lr": 0.05}, "train": {"epochs": 1, "batch_size": 32, "threads": 1},
       "slim": {"l1": 0.05}, "tracking": {"experiment": "plugin"}}


def _gamma_l1(run_id: str, uri: str) -> float:
    from nr_study.tracking import load_model

    model = load_model(run_id, uri)
    return sum(float(m.weight.detach().abs().sum()) for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d))


@pytest.fixture
def toy_registered():
    """BL-L1 registered for one test, then gone again: the registry is global and other tests list it."""
    import importlib

    from nr_study.methods import METHODS

    sys.modules.pop("tests.toy_method", None)
    importlib.import_module("tests.toy_method")  # registers BL-L1
    yield
    METHODS.pop("BL-L1", None)
    sys.modules.pop("tests.toy_method", None)


def test_a_method_registered_from_one_file_trains(tmp_path, toy_registered):
    from nr_study.methods import METHODS
    from nr_study.train import train

    assert METHODS["BL-L1"].reads == ("slim",)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    toy = train(dict(CFG, method="BL-L1"), tracking_uri=uri, progress=False)
    base = train(dict(CFG, method="BL"), tracking_uri=uri, progress=False)
    run = MlflowClient(uri).get_run(toy["run_id"])
    assert run.data.tags["nr.method"] == "BL-L1" and run.data.metrics["lambda"] == 0.05
    assert toy["final_params"] == base["final_params"]  # no surgery, no prune
    assert _gamma_l1(toy["run_id"], uri) < _gamma_l1(base["run_id"], uri)  # its L1 pulled γ down (same seed)


def test_a_module_that_cannot_be_imported_is_one_line(monkeypatch, tmp_path):
    from nr_study.errors import ConfigError
    from nr_study.methods.registry import load_plugins

    from nr_study.methods import METHODS

    monkeypatch.setenv("NR_STUDY_METHODS", "tests.toy_method, no_such_module_here")
    with pytest.raises(ConfigError) as exc:
        load_plugins()
    METHODS.pop("BL-L1", None)  # registered by the first module before the second failed
    sys.modules.pop("tests.toy_method", None)
    assert "\n" not in str(exc.value) and "'no_such_module_here' cannot be imported" in str(exc.value)
    (tmp_path / "cfg.yaml").write_text("method: BL\n")
    proc = subprocess.run([sys.executable, "-m", "nr_study.cli", "train", str(tmp_path / "cfg.yaml")], cwd=str(tmp_path),
                          text=True, capture_output=True, timeout=120,
                          env={**os.environ, "NR_STUDY_METHODS": "no_such_module_here", "NR_STUDY_RUNS": str(tmp_path)})
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert proc.returncode == 2 and len(lines) == 1 and "no_such_module_here" in lines[0], proc.stderr


@pytest.mark.slow
def test_a_method_registered_from_one_file_runs_in_a_sweep(tmp_path):
    doc = {"name": "plugin", "experiment": "test-plugin", "base": dict(CFG, method="BL"),
           "space": {"method": ["BL-L1"]}, "resources_per_trial": {"cpu": 1}}
    path = tmp_path / "plugin.yaml"
    path.write_text(yaml.safe_dump(doc))
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "NR_STUDY_RUNS")}
    env.update(NR_STUDY_METHODS="tests.toy_method", PYTHONPATH=os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]))
    runs = tmp_path / "runs"
    proc = subprocess.run([sys.executable, "-m", "nr_study.cli", "sweep", str(path), "--runs", str(runs),
                           "--verbose", "0"], cwd=str(REPO), env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    client = MlflowClient(f"sqlite:///{runs / 'mlflow.db'}")
    kids = [r for r in client.search_runs([client.get_experiment_by_name("test-plugin").experiment_id])
            if "nr.trial" in r.data.tags]
    assert [(r.data.tags["nr.method"], r.info.status) for r in kids] == [("BL-L1", "FINISHED")]
    assert kids[0].data.metrics["lambda"] == 0.05
