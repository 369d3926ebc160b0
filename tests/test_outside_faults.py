"""Faults injected from outside, at moments nr-study does not choose: a real `nr-study sweep` process, its own
embedded Ray and `mlflow server`, and a test that finds a trial's worker in the sweep's process tree and
SIGKILLs it mid-epoch — no `testing.kill_*` keys, nothing in the trainer knows it is coming.

The sweep is started through tests/procs.py (known signal dispositions) and only processes below its pid are
looked at or signalled, so other sweeps on the machine are never touched.
"""
from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import yaml

from tests.procs import with_signals

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]
EPOCHS = 4
DOC = {
    "name": "outkill",
    "experiment": "test-outkill",
    "base": {
        "method": "NR-CR",
        "model": {"name": "vgg_small", "kwargs": {"width": 4}},
        # ~2-4 s per epoch on 2 busy cores: room to land a kill inside one
        "data": {"name": "synthetic", "n_train": 2048, "n_test": 64, "synthetic": {"shape": [1, 16, 16],
                                                                                   "noise": 0.5}},
        "train": {"epochs": EPOCHS, "batch_size": 16, "eval_batch_size": 64, "device": "cpu"},
        "optim": {"lr": 0.1},
        "nr": {"tr": 0.97, "dead_threshold": 0.8, "delta_t": 4, "delta_t_unit": "step", "delta_lambda": 0.04},
    },
    "space": {"optim.lr": [0.05, 0.1]},
    "resources_per_trial": {"cpu": 1},
    "max_concurrent": 2,
    "max_failures": 2,
}


def trial_workers(root: psutil.Process) -> dict[str, psutil.Process]:
    """The Ray workers below `root` that are running a trial, by trial id: Ray titles them
    `ray::ImplicitFunc.train` and runs each in `working_dirs/<trial id>-<run name>`."""
    found = {}
    for p in root.children(recursive=True):
        try:
            if p.cmdline()[:1] and p.cmdline()[0].startswith("ray::ImplicitFunc"):
                found[Path(p.cwd()).name.split("-", 1)[0]] = p
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            pass
    return found


def still_running(procs, timeout: float) -> list:
    """Those of `procs` still running (not exited, not a zombie) after up to `timeout` seconds."""
    _, alive = psutil.wait_procs(procs, timeout=timeout)
    left = []
    for p in alive:
        try:
            if p.status() != psutil.STATUS_ZOMBIE:
                left.append((p.pid, p.name()))
        except psutil.NoSuchProcess:
            pass
    return left


def trial_runs(runs: Path, experiment: str) -> tuple:
    """(client, the trials' MLflow runs so far) from the sweep's own server, which `runs/mlflow_server.json`
    names; (None, []) while it is not up."""
    from mlflow.tracking import MlflowClient

    try:
        client = MlflowClient(json.loads((runs / "mlflow_server.json").read_text())["url"])
        exp = client.get_experiment_by_name(experiment)
        return client, [r for r in client.search_runs([exp.experiment_id]) if "nr.trial" in r.data.tags] if exp else []
    except Exception:  # the server not up yet
        return None, []


def logged_epochs(client, run_id: str) -> list[int]:
    return sorted(int(m.step) for m in client.get_metric_history(run_id, "test_err"))


def test_worker_sigkilled_from_outside_mid_epoch(tmp_path):
    """SIGKILL a running trial's worker, found from outside, at a random moment inside an epoch after its first:
    Ray retries the trial from its last checkpoint into the same MLflow run; the sweep exits 0, one run per
    trial, each epoch logged once, every run FINISHED, no process of the sweep left behind."""
    from mlflow.tracking import MlflowClient

    path, runs = tmp_path / "outkill.yaml", tmp_path / "runs"
    path.write_text(yaml.safe_dump(DOC))
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "NR_STUDY_RUNS")}
    cmd = [sys.executable, "-m", "nr_study.cli", "sweep", str(path), "--runs", str(runs), "--verbose", "0"]
    log = open(tmp_path / "sweep.log", "w+")
    proc = subprocess.Popen(with_signals(cmd), stdout=log, stderr=subprocess.STDOUT, cwd=str(REPO), env=env)
    root = psutil.Process(proc.pid)
    rng = random.Random()
    seen: dict = {}
    tree: list[psutil.Process] = []
    try:
        deadline = time.monotonic() + 240
        while "killed" not in seen and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.3)
            client, kids = trial_runs(runs, "test-outkill")
            workers = trial_workers(root)
            for r in kids:
                trial, done = r.data.tags["nr.trial"], logged_epochs(client, r.info.run_id)
                if trial in workers and 1 <= len(done) <= EPOCHS - 2:  # inside epoch 2..EPOCHS-1
                    delay = rng.uniform(0.2, 1.5)
                    time.sleep(delay)  # a random point of the next epoch (they take 2-4 s here)
                    tree = root.children(recursive=True)
                    workers[trial].send_signal(signal.SIGKILL)
                    seen.update(killed=workers[trial], run=r.info.run_id, after=done[-1], delay=delay)
                    break
        assert "killed" in seen, "no trial worker found mid-epoch"
        assert not still_running([seen["killed"]], 10)
        rc = proc.wait(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)
    log.seek(0)
    out = log.read()
    log.close()
    assert rc == 0, (seen, out[-4000:])
    assert out.count("its worker process died") == 1, (seen, out[-4000:])  # the kill was seen and recovered

    client = MlflowClient(f"sqlite:///{runs / 'mlflow.db'}")  # the sweep stopped its server
    exp = client.get_experiment_by_name("test-outkill")
    everything = client.search_runs([exp.experiment_id])
    assert not [r for r in everything if r.info.status != "FINISHED"], [(r.info.run_name, r.info.status)
                                                                        for r in everything]
    parents = [r for r in everything if r.data.tags.get("nr.role") == "sweep"]
    kids = [r for r in everything if "nr.trial" in r.data.tags]
    assert len(parents) == 1 and len(kids) == 2, "one parent, one run per trial"
    assert sorted(r.data.tags["nr.trial"] for r in kids) == sorted(set(r.data.tags["nr.trial"] for r in kids))
    assert seen["run"] in [r.info.run_id for r in kids], "the killed trial continued its own run"
    for r in kids:
        assert logged_epochs(client, r.info.run_id) == list(range(1, EPOCHS + 1)), (seen, r.info.run_name)
        assert "nr.error" not in r.data.tags
    assert not still_running(tree, 30)  # Ray's processes and the mlflow server went with the sweep


def test_lost_node_trial_continues_from_its_checkpoint(tmp_path):
    """A 2-node Ray cluster (`ray.cluster_utils.Cluster`: a head and a worker node, one CPU each, so the two
    trials run one per node); the worker node is killed (raylet and workers SIGKILLed, not drained) at a random
    moment inside an epoch of the trial on it. Ray marks the node dead, the trial is retried on the surviving
    node from its last checkpoint (the run folder is the storage both nodes share here; a real cluster needs a
    shared or cloud `storage_path`) and continues its one MLflow run: sweep exit 0, each epoch logged once, the
    epochs after the loss logged on the head."""
    from mlflow.tracking import MlflowClient
    from ray.cluster_utils import Cluster

    fast_death = {"health_check_initial_delay_ms": 0, "health_check_period_ms": 1000,
                  "health_check_failure_threshold": 5}  # a lost node is declared dead in ~5 s, not ~30 s
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 1, "include_dashboard": False, "node_ip_address": "127.0.0.1", "_system_config": fast_death})
    proc = None
    try:
        worker = cluster.add_node(num_cpus=1, node_ip_address="127.0.0.1")
        cluster.wait_for_nodes()
        doc = dict(DOC, name="lostnode", experiment="test-lostnode")
        path, runs = tmp_path / "lostnode.yaml", tmp_path / "runs"
        path.write_text(yaml.safe_dump(doc))
        env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "NR_STUDY_RUNS", "RAY_ADDRESS")}
        cmd = [sys.executable, "-m", "nr_study.cli", "sweep", str(path), "--address", cluster.address,
               "--runs", str(runs), "--verbose", "0"]
        log = open(tmp_path / "sweep.log", "w+")
        proc = subprocess.Popen(with_signals(cmd), stdout=log, stderr=subprocess.STDOUT, cwd=str(REPO), env=env)
        rng = random.Random()
        seen: dict = {}
        deadline = time.monotonic() + 240
        while "removed" not in seen and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.3)
            client, kids = trial_runs(runs, "test-lostnode")
            for r in kids:
                done = logged_epochs(client, r.info.run_id)
                if r.data.tags.get("nr.node") == worker.node_id and 1 <= len(done) <= EPOCHS - 2:
                    time.sleep(rng.uniform(0.2, 1.5))  # a random point of the next epoch
                    cluster.remove_node(worker, allow_graceful=False)
                    seen.update(removed=time.time(), run=r.info.run_id, after=done[-1])
                    break
        assert "removed" in seen, "no trial seen mid-epoch on the worker node"
        rc = proc.wait(timeout=300)
    finally:
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait(30)
        cluster.shutdown()
    log.seek(0)
    out = log.read()
    log.close()
    assert rc == 0, (seen, out[-4000:])
    assert out.count("its worker process died") == 1, (seen, out[-4000:])  # the loss was seen and recovered
    # Ray's own report of the lost node is its first sentence, not the dead raylet's last 20 log lines
    assert "Last 20 lines of the Raylet logs" not in out and "accessor.cc" not in out, out[-4000:]

    client = MlflowClient(f"sqlite:///{runs / 'mlflow.db'}")
    exp = client.get_experiment_by_name("test-lostnode")
    everything = client.search_runs([exp.experiment_id])
    assert not [r for r in everything if r.info.status != "FINISHED"], [(r.info.run_name, r.info.status)
                                                                        for r in everything]
    kids = [r for r in everything if "nr.trial" in r.data.tags]
    assert len(kids) == 2 and len({r.data.tags["nr.trial"] for r in kids}) == 2, "one run per trial"
    for r in kids:
        assert logged_epochs(client, r.info.run_id) == list(range(1, EPOCHS + 1)), (seen, r.info.run_name)
    lost = client.get_metric_history(seen["run"], "test_err")
    later = sorted(int(m.step) for m in lost if m.timestamp / 1000 > seen["removed"])
    assert later and later == list(range(later[0], EPOCHS + 1)), (seen, later)  # on the head, the node left


def test_sigterm_to_the_sweep_ends_every_run_killed(tmp_path):
    """SIGTERM to the `nr-study sweep` process (a batch scheduler's stop, `kill PID`) mid-epoch: the unfinished
    runs and the parent end KILLED, nothing left RUNNING, no process of the sweep left behind, and the hint
    says how to continue."""
    from mlflow.tracking import MlflowClient

    doc = dict(DOC, name="sigterm", experiment="test-sigterm", base=dict(DOC["base"], train=dict(
        DOC["base"]["train"], epochs=40)))
    path, runs = tmp_path / "sigterm.yaml", tmp_path / "runs"
    path.write_text(yaml.safe_dump(doc))
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "NR_STUDY_RUNS")}
    cmd = [sys.executable, "-m", "nr_study.cli", "sweep", str(path), "--runs", str(runs), "--verbose", "0"]
    proc = subprocess.Popen(with_signals(cmd), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=str(REPO),
                            env=env, text=True)
    root = psutil.Process(proc.pid)
    tree: list[psutil.Process] = []
    try:
        deadline = time.monotonic() + 240
        while not tree and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.3)
            client, kids = trial_runs(runs, "test-sigterm")
            if any(logged_epochs(client, r.info.run_id) for r in kids):
                time.sleep(random.uniform(0.2, 1.5))  # inside the next epoch
                tree = root.children(recursive=True)
                proc.send_signal(signal.SIGTERM)
        assert tree, "no epoch logged"
        out, _ = proc.communicate(timeout=180)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate(timeout=30)
    assert proc.returncode == 143, out[-3000:]
    assert f"continue it with: nr-study sweep {path} --resume " in out, out[-3000:]
    assert "Tuner.restore" not in out, out[-3000:]  # one instruction: ours, not also Ray's
    client = MlflowClient(f"sqlite:///{runs / 'mlflow.db'}")
    everything = client.search_runs([client.get_experiment_by_name("test-sigterm").experiment_id])
    assert everything and not [r for r in everything if r.info.status == "RUNNING"], [
        (r.info.run_name, r.info.status) for r in everything]
    assert [r.info.status for r in everything if r.data.tags.get("nr.role") == "sweep"] == ["KILLED"]
    assert not still_running(tree, 30)


def test_sigterm_at_start_up_with_sigint_ignored(tmp_path):
    """A sweep started with SIGINT ignored (`cmd &` in a script, nohup) gets SIGTERM while it starts, before Ray
    Tune's loop has a SIGINT handler of its own: it still stops, exit 143, no run left RUNNING, nothing left."""
    from mlflow.tracking import MlflowClient

    doc = dict(DOC, name="sigterm0", experiment="test-sigterm0")
    path, runs = tmp_path / "sigterm0.yaml", tmp_path / "runs"
    path.write_text(yaml.safe_dump(doc))
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "NR_STUDY_RUNS")}
    cmd = [sys.executable, "-m", "nr_study.cli", "sweep", str(path), "--runs", str(runs), "--verbose", "0"]
    proc = subprocess.Popen(with_signals(cmd, sigint="ignore"), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            cwd=str(REPO), env=env, text=True)
    seen, tree = [], []
    try:
        for line in proc.stdout:  # the parent run exists; Ray is starting next
            seen.append(line)
            if line.startswith("MLflow UI: "):
                tree = psutil.Process(proc.pid).children(recursive=True)
                proc.send_signal(signal.SIGTERM)
                break
        assert tree, "".join(seen)[-3000:]
        out, _ = proc.communicate(timeout=180)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate(timeout=30)
    out = "".join(seen) + out
    assert proc.returncode == 143, out[-3000:]
    client = MlflowClient(f"sqlite:///{runs / 'mlflow.db'}")
    everything = client.search_runs([client.get_experiment_by_name("test-sigterm0").experiment_id])
    assert everything and not [r for r in everything if r.info.status == "RUNNING"], [
        (r.info.run_name, r.info.status) for r in everything]
    assert not still_running(tree, 30)


def _sweep_process(path: Path, runs: Path, log_path: Path, *extra) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "NR_STUDY_RUNS")}
    cmd = [sys.executable, "-m", "nr_study.cli", "sweep", str(path), "--runs", str(runs), "--verbose", "1", *extra]
    return subprocess.Popen(with_signals(cmd), stdout=open(log_path, "w"), stderr=subprocess.STDOUT,
                            cwd=str(REPO), env=env)


def _histories(runs: Path, experiment: str) -> dict:
    """{learning rate: (its runs' nr.trial ids, per-epoch test_err)} from a finished sweep's store."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{runs / 'mlflow.db'}")
    exp = client.get_experiment_by_name(experiment)
    out: dict = {}
    for r in client.search_runs([exp.experiment_id]):
        if "nr.trial" in r.data.tags:
            assert r.info.status == "FINISHED", (r.info.run_name, r.info.status)
            hist = sorted((m.step, m.value) for m in client.get_metric_history(r.info.run_id, "test_err"))
            ids, hists = out.setdefault(float(r.data.params["optim.lr"]), ([], []))
            ids.append(r.data.tags["nr.trial"])
            hists.append(hist)
    return out


def test_full_disk_fails_fast_names_it_and_resume_matches_a_fault_free_sweep(tmp_path):
    """The run folder (sweep folder, checkpoints and the sweep's own MLflow store) sits on a small filesystem that
    is filled from outside after the first epoch is logged. The sweep exits before its queued trials run, with one
    line naming the full disk and the --resume command, prints no traceback, leaves no temp file; after space is
    freed, --resume finishes with one trial id per configuration (old Ray trial folders set aside) and every
    per-epoch metric equal to a fault-free sweep's of the same file."""
    import sqlite3

    from tests.disks import fill, small_fs

    doc = dict(DOC, name="diskfull", experiment="test-diskfull", max_failures=1,
               space={"optim.lr": [0.05, 0.06, 0.07, 0.08]})
    doc["base"] = dict(DOC["base"], method="BL", data=dict(DOC["base"]["data"], n_train=384),
                       train=dict(DOC["base"]["train"], epochs=3))
    path = tmp_path / "diskfull.yaml"
    path.write_text(yaml.safe_dump(doc))
    ref = tmp_path / "ref-runs"
    assert _sweep_process(path, ref, tmp_path / "ref.log").wait(timeout=600) == 0
    want = _histories(ref, "test-diskfull")

    with small_fs(tmp_path / "small", 48) as disk:
        runs = disk / "runs"
        proc = _sweep_process(path, runs, tmp_path / "full.log")
        filled_at = None
        try:
            deadline = time.monotonic() + 300
            while proc.poll() is None and time.monotonic() < deadline:
                time.sleep(0.3)
                if filled_at is None and (runs / "mlflow.db").is_file():
                    try:
                        with sqlite3.connect(f"file:{runs / 'mlflow.db'}?mode=ro", uri=True) as db:
                            logged = db.execute("select count(*) from metrics where key = 'test_err'").fetchone()[0]
                    except sqlite3.Error:
                        logged = 0
                    if logged:
                        fill(disk)
                        filled_at = time.monotonic()
            rc = proc.wait(timeout=120)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(30)
        out = (tmp_path / "full.log").read_text()
        assert filled_at is not None, out[-3000:]
        # fails fast: it exits on its own (the wait above is only a hang guard: no wall-clock bound that a busy
        # machine could break) and stops the sweep there, before the trials still queued have run
        assert rc == 1, (rc, out[-3000:])
        with sqlite3.connect(f"file:{runs / 'mlflow.db'}?mode=ro", uri=True) as db:
            logged = db.execute("select count(*) from metrics where key = 'test_err'").fetchone()[0]
        assert logged < len(doc["space"]["optim.lr"]) * doc["base"]["train"]["epochs"], (logged, out[-3000:])
        assert "Traceback" not in out and "internal error" not in out, out[-6000:]
        last = [ln for ln in out.splitlines() if ln.strip()][-1]
        assert last.startswith("error: ") and "disk full" in last and "--resume" in last, last
        assert out.count("Last sync command failed") <= 1 and "Resume experiment with" not in out
        assert not list(runs.rglob("*.tmp")), list(runs.rglob("*.tmp"))

        (disk / "filler").unlink()
        assert _sweep_process(path, runs, tmp_path / "resume.log", "--resume").wait(timeout=600) == 0, \
            (tmp_path / "resume.log").read_text()[-4000:]
        got = _histories(runs, "test-diskfull")
        sweep_dir = next((runs / "sweeps").iterdir())
        ray_dirs = {p.name.split("-", 1)[0] for p in sweep_dir.iterdir() if p.is_dir() and "_" in p.name
                    and not p.name.startswith(".")}
        ours = {p.name for p in (sweep_dir / "trials").iterdir()}
    assert sorted(got) == sorted(want), "every configuration ran"
    for lr, (ids, hists) in got.items():
        assert len(ids) == 1, f"lr={lr}: one run per configuration, got trial ids {ids}"
        assert hists == want[lr][1], f"lr={lr}: per-epoch test_err differs from the fault-free sweep's"
    assert ours == {ids[0] for ids, _ in got.values()}, (ours, got)  # one checkpoint folder per trial id
    assert len(ray_dirs) == len(got), ray_dirs  # the old experiment's trial folders were set aside
