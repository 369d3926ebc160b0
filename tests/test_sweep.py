"""Sweep integration tests: a real local Ray, ONE real `mlflow server` per test session, tiny synthetic trials.

Every trial is vgg_small (width 4-8) on 16x16 synthetic data for 2-3 epochs of a few steps, so a trial costs
about a second of compute; the time goes into Ray worker start-up. Heavy tests are marked slow.
"""
from __future__ import annotations

import copy
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from nr_study.sweep.space import parse_search_space
from tests.procs import with_signals

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]
PY = sys.executable

BASE = {
    "method": "BL",
    "model": {"name": "vgg_small", "kwargs": {"width": 4}},
    "data": {"name": "synthetic", "n_train": 256, "n_test": 64,
             "synthetic": {"shape": [1, 16, 16], "noise": 0.5}},
    "train": {"epochs": 2, "batch_size": 16, "eval_batch_size": 64, "device": "cpu"},
    "optim": {"lr": 0.1},
    # NR settings that rejuvenate early in epoch 2 (step ~20 of 16-step epochs) on this toy problem
    "nr": {"tr": 0.97, "dead_threshold": 0.8, "delta_t": 4, "delta_t_unit": "step", "delta_lambda": 0.04},
}


def make_doc(name: str, **kw) -> dict:
    doc = {"name": name, "experiment": f"test-{name}", "base": copy.deepcopy(BASE),
           "resources_per_trial": {"cpu": 1}, "max_concurrent": 2, "max_failures": 1}
    base_over = kw.pop("base", {})
    for k, v in base_over.items():
        node = doc["base"]
        parts = k.split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = v
    doc.update(kw)
    return doc


# ------------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    """One real `mlflow server` (SQLite backend, proxied artifacts) shared by the whole test session."""
    from nr_study.mlflow_server import MlflowServer

    server = MlflowServer.start(tmp_path_factory.mktemp("mlflow_runs"))
    yield server
    server.stop()


@pytest.fixture(scope="module")
def local_ray():
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture
def runs(tmp_path, monkeypatch):
    d = tmp_path / "runs"
    monkeypatch.setenv("NR_STUDY_RUNS", str(d))
    return d


def client_for(server):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=server.url)


def children_of(client, summary) -> list:
    return client.search_runs([summary["experiment_id"]],
                              filter_string=f"tags.mlflow.parentRunId = '{summary['parent_run_id']}'")


def epochs_logged(client, run_id: str, key: str = "test_err") -> list[int]:
    return sorted(int(m.step) for m in client.get_metric_history(run_id, key))


def run(doc: dict, server, **kw) -> dict:
    from nr_study.sweep.runner import run_sweep

    space = parse_search_space(doc, f"{doc['name']}.yaml")
    return run_sweep(space, source_text=yaml.safe_dump(doc), tracking_uri=server.url, verbose=0, **kw)


# ------------------------------------------------------------------------------------------ tests
def test_grid_sweep_parent_and_child_runs(mlflow_server, local_ray, runs):
    doc = make_doc("grid4", space={"method": ["BL", "NR-CR"]}, repeat=2,
                   tags={"table": "table4", "cell": "{method}/w{model.kwargs.width}"})
    summary = run(doc, mlflow_server)
    client = client_for(mlflow_server)

    parent = client.get_run(summary["parent_run_id"])
    assert parent.info.status == "FINISHED"
    assert parent.data.params["sweep.num_trials"] == "4"
    assert parent.data.params["space.method"] == "grid(BL, NR-CR)"
    assert parent.data.tags["nr.table"] == "table4"
    arts = [f.path for f in client.list_artifacts(parent.info.run_id, "search_space")]
    assert "search_space/resolved.yaml" in arts and "search_space/grid4.yaml" in arts

    kids = children_of(client, summary)
    assert len(kids) == 4
    names = sorted(r.data.tags["mlflow.runName"] for r in kids)
    assert names == ["BL-vgg_small-s0", "BL-vgg_small-s1", "NR-CR-vgg_small-s0", "NR-CR-vgg_small-s1"]
    assert len({r.data.tags["nr.trial"] for r in kids}) == 4
    for r in kids:
        assert r.info.status == "FINISHED"
        assert r.data.tags["nr.table"] == "table4"
        assert r.data.tags["nr.cell"] == f"{r.data.tags['nr.method']}/w4"
        assert r.data.tags["nr.sweep"] == "grid4"
        assert epochs_logged(client, r.info.run_id) == [1, 2]  # each epoch exactly once
        assert r.data.params["train.threads"] == "1"  # threads = the trial's CPUs
        arts = [f.path for f in client.list_artifacts(r.info.run_id)]
        assert "config.yaml" in arts and "final_widths.json" in arts  # artifacts over HTTP
        if r.data.tags["nr.method"] == "NR-CR":
            assert r.data.metrics["rejuvenations"] >= 1
    assert {r.data.tags["nr.seed"] for r in kids} == {"0", "1"}
    assert sorted(c["cell"] for c in summary["configurations"]) == ["BL/w4", "NR-CR/w4"]


def test_optuna_multi_objective_pareto(mlflow_server, local_ray, runs):
    doc = make_doc("pareto", space={"model.kwargs.width": {"choice": [2, 4, 8]},
                                    "optim.lr": {"loguniform": [0.01, 0.2]}},
                   search={"type": "optuna", "sampler": "nsga2", "objectives": [{"test_err": "min"},
                                                                                {"params": "min"}], "seed": 1},
                   num_samples=4, tags={"table": "pareto", "cell": "w{model.kwargs.width}-lr{optim.lr:.3f}"})
    summary = run(doc, mlflow_server)
    front = summary["pareto"]
    assert front, "a Pareto set"
    configs = summary["configurations"]
    assert len(summary["trials"]) == 4
    for p in front:  # nothing in the sweep dominates a Pareto point
        for q in configs:
            assert not (q["test_err"] <= p["test_err"] and q["params"] <= p["params"]
                        and (q["test_err"] < p["test_err"] or q["params"] < p["params"]))
    client = client_for(mlflow_server)
    parent = client.get_run(summary["parent_run_id"])
    assert "pareto.json" in [f.path for f in client.list_artifacts(parent.info.run_id)]
    assert all(r.info.status == "FINISHED" for r in children_of(client, summary))


def test_asha_stops_trials_early(mlflow_server, local_ray, runs):
    # One good learning rate first, then hopeless ones: ASHA (rungs at 1 epoch) stops the later ones.
    doc = make_doc("asha", space={"optim.lr": [0.1, 1e-6, 2e-6, 3e-6]}, max_concurrent=1,
                   base={"train.epochs": 3, "model.kwargs.width": 8},
                   scheduler={"type": "asha", "metric": "train_loss", "mode": "min", "grace_period": 1,
                              "reduction_factor": 2})
    summary = run(doc, mlflow_server)
    epochs = [t["epochs"] for t in summary["trials"]]
    assert max(epochs) == 3 and min(epochs) < 3, epochs
    client = client_for(mlflow_server)
    kids = children_of(client, summary)
    assert len(kids) == 4
    stopped = [r for r in kids if r.data.tags.get("nr.early_stopped") == "true"]
    assert stopped
    for r in kids:
        assert r.info.status == "FINISHED"
        n = len(epochs_logged(client, r.info.run_id))
        assert epochs_logged(client, r.info.run_id) == list(range(1, n + 1))


def test_worker_kill_resumes_same_run_after_surgery(mlflow_server, local_ray, runs, tmp_path):
    marker = tmp_path / "killed_once"
    doc = make_doc("workerkill", space={"method": ["NR-CR"]}, max_failures=2,
                   base={"train.epochs": 3, "train.fault_kill_at_epoch": 2,
                         "train.fault_kill_once_marker": str(marker),
                         "train.fault_kill_point": "after_checkpoint"})
    summary = run(doc, mlflow_server)
    assert marker.exists(), "the fault injection fired"
    client = client_for(mlflow_server)
    kids = children_of(client, summary)
    assert len(kids) == 1, "a retried trial continues the same run"
    r = kids[0]
    assert r.info.status == "FINISHED"
    assert epochs_logged(client, r.info.run_id) == [1, 2, 3]
    assert epochs_logged(client, r.info.run_id, "rejuvenations") == [1, 2, 3]
    rej = {int(m.step): m.value for m in client.get_metric_history(r.info.run_id, "rejuvenations")}
    assert rej[2] >= 1, "the surgery happened before the kill at epoch 2, so the resume rebuilt the new architecture"
    assert summary["trials"][0]["epochs"] == 3
    assert not summary["trials"][0]["error"]


def _wait_for(pred, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = pred()
        if v:
            return v
        time.sleep(1.0)
    raise AssertionError(f"timed out waiting for {what}")


def test_driver_kill_then_resume(mlflow_server, runs, tmp_path):
    """Kill the CLI (the Tune driver) after some trials finished; `--resume` finishes the sweep, re-running
    nothing that finished and opening no second run for any trial."""
    import ray

    ray.shutdown()  # the CLI runs its own embedded Ray
    doc = make_doc("driverkill", space={"optim.lr": [0.05, 0.06, 0.07]}, max_concurrent=1,
                   base={"train.epochs": 3})
    path = tmp_path / "driverkill.yaml"
    path.write_text(yaml.safe_dump(doc))
    cmd = [PY, "-m", "nr_study.cli", "sweep", str(path), "--tracking-uri", mlflow_server.url, "--runs", str(runs),
           "--verbose", "0"]
    log = open(tmp_path / "first.log", "w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=str(REPO))
    client = client_for(mlflow_server)
    exp = _wait_for(lambda: client.get_experiment_by_name("test-driverkill"), 120, "the experiment")
    try:
        _wait_for(lambda: len(client.search_runs([exp.experiment_id],
                                                 filter_string="attributes.status = 'FINISHED'")) >= 1,
                  240, "a finished trial")
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
        log.close()
    finished_before = {r.info.run_id: r.info.end_time for r in client.search_runs(
        [exp.experiment_id], filter_string="attributes.status = 'FINISHED'") if "nr.trial" in r.data.tags}
    assert len(finished_before) >= 1

    out = subprocess.run(cmd[:5] + ["--resume"] + cmd[5:], capture_output=True, text=True, cwd=str(REPO),
                         timeout=400)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    parents = client.search_runs([exp.experiment_id], filter_string="tags.`nr.role` = 'sweep'")
    assert len(parents) == 1, "resume reuses the parent run"
    assert parents[0].info.status == "FINISHED"
    kids = client.search_runs([exp.experiment_id],
                              filter_string=f"tags.mlflow.parentRunId = '{parents[0].info.run_id}'")
    assert len(kids) == 3, "no duplicate runs"
    assert len({r.data.tags["nr.trial"] for r in kids}) == 3
    for r in kids:
        assert r.info.status == "FINISHED"
        assert epochs_logged(client, r.info.run_id) == [1, 2, 3]
        if r.info.run_id in finished_before:  # finished trials were not re-run
            assert r.info.end_time == finished_before[r.info.run_id]


def test_two_node_cluster_with_address(mlflow_server, runs, tmp_path):
    import ray
    from ray.cluster_utils import Cluster

    from nr_study.sweep import cli_main

    ray.shutdown()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False,
                                                            "node_ip_address": "127.0.0.1"})
    try:
        cluster.add_node(num_cpus=1, node_ip_address="127.0.0.1")
        cluster.wait_for_nodes()
        doc = make_doc("cluster", space={"optim.lr": [0.05, 0.1]}, max_concurrent=2,
                       base={"train.epochs": 2})
        path = tmp_path / "cluster.yaml"
        path.write_text(yaml.safe_dump(doc))
        assert cli_main([str(path), "--address", cluster.address, "--tracking-uri", mlflow_server.url,
                         "--runs", str(runs), "--verbose", "0"]) == 0
        client = client_for(mlflow_server)
        exp = client.get_experiment_by_name("test-cluster")
        parent = client.search_runs([exp.experiment_id], filter_string="tags.`nr.role` = 'sweep'")[0]
        assert parent.info.status == "FINISHED"
        kids = client.search_runs([exp.experiment_id],
                                  filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
        assert len(kids) == 2 and all(r.info.status == "FINISHED" for r in kids)
        assert len({r.data.tags["nr.node"] for r in kids}) == 2, "one trial on each node"
    finally:
        ray.shutdown()
        cluster.shutdown()


def test_ctrl_c_leaves_no_run_running(mlflow_server, runs, tmp_path):
    """SIGINT (Ctrl-C) to the CLI: exit code 130, the interrupted trial's run and the parent KILLED."""
    import ray

    ray.shutdown()
    doc = make_doc("ctrlc", space={"optim.lr": [0.05, 0.06]}, max_concurrent=1,
                   base={"train.epochs": 40, "data.n_train": 512})
    path = tmp_path / "ctrlc.yaml"
    path.write_text(yaml.safe_dump(doc))
    cmd = [PY, "-m", "nr_study.cli", "sweep", str(path), "--tracking-uri", mlflow_server.url, "--runs", str(runs),
           "--verbose", "0"]
    # default SIGINT whatever this test process inherited (a background job / nohup ignores it): tests/procs.py
    proc = subprocess.Popen(with_signals(cmd), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=str(REPO),
                            text=True)
    client = client_for(mlflow_server)
    try:
        exp = _wait_for(lambda: client.get_experiment_by_name("test-ctrlc"), 120, "the experiment")
        _wait_for(lambda: [r for r in client.search_runs([exp.experiment_id]) if "nr.trial" in r.data.tags
                           and client.get_metric_history(r.info.run_id, "test_err")], 180, "a logged epoch")
    finally:
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 130, out[-3000:]
    assert "--resume" in out
    runs_ = client.search_runs([exp.experiment_id])
    assert runs_ and not [r for r in runs_ if r.info.status == "RUNNING"]
    parent = [r for r in runs_ if r.data.tags.get("nr.role") == "sweep"][0]
    assert parent.info.status == "KILLED"
    assert [r.info.status for r in runs_ if "nr.trial" in r.data.tags] == ["KILLED"]
