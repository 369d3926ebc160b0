"""Shared fixtures. Keep small: tiny configs and one sqlite MLflow store per test session."""
from __future__ import annotations

import copy
import os

import pytest

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")


@pytest.fixture(scope="session")
def tracking_uri(tmp_path_factory) -> str:
    """A file-based MLflow store (sqlite) shared by this session's tests; one process writes it."""
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"


TINY = {
    "method": "BL",
    "seed": 0,
    "model": {"name": "vgg_small", "kwargs": {"width": 8}},
    "data": {"name": "synthetic", "n_train": 512, "n_test": 256},
    "optim": {"lr": 0.05},
    "train": {"epochs": 3, "batch_size": 32, "threads": 1},
}


@pytest.fixture
def tiny_cfg() -> dict:
    """A nested config dict for a seconds-long CPU run: vgg_small (width 8) on 512 synthetic 1x28x28 images."""
    return copy.deepcopy(TINY)


@pytest.fixture(scope="module")
def local_ray():
    """A local Ray of 2 CPUs for a module's sweeps (test_searchers keeps its own of 1 CPU)."""
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False)
    yield
    ray.shutdown()
