"""Sweep integration tests: a real local Ray, ONE real `mlflow server` per test session, tiny synthetic trials.

Every trial is vgg_small (width 4-8) on 16x16 synthetic data for 2-3 epochs of a few steps, so a trial costs
about a second of compute; the time goes into Ray worker start-up. Heavy tests are marked slow.
"""
from __future__ import annotations

import copy
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from nr_study.sweep.space import parse_search_space
from tests.disks import fill, small_fs
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


def test_asha_lets_reset_epochs_trials_train_to_their_end(mlflow_server, local_ray, runs):
    # Under reset_epochs a rejuvenating trial trains past train.epochs (2 + 2 here). ASHA's max_t used to default to
    # train.epochs: the trial was cut at epoch 2 with no final metrics, yet closed FINISHED as if complete.
    doc = make_doc("asha_reset", space={"method": ["NR", "BL"]}, max_concurrent=1,
                   base={"train.after_rejuvenation": "reset_epochs"},
                   scheduler={"type": "asha", "metric": "train_loss", "mode": "min", "grace_period": 1})
    assert parse_search_space(doc, "x.yaml").scheduler["max_t"] == 4
    summary = run(doc, mlflow_server)
    client = client_for(mlflow_server)
    kids = {r.data.tags["nr.method"]: r for r in children_of(client, summary)}
    nr = kids["NR"]
    assert nr.data.metrics["rejuvenations"] >= 1
    assert nr.data.metrics["total_epochs"] > 2 and "final_test_err" in nr.data.metrics
    assert epochs_logged(client, nr.info.run_id) == list(range(1, int(nr.data.metrics["total_epochs"]) + 1))
    for r in kids.values():
        assert r.info.status == "FINISHED" and "nr.early_stopped" not in r.data.tags
    assert not summary["partial"] and all(t["complete"] for t in summary["trials"])


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
        assert (r.data.tags.get("nr.early_stopped") == "true") == ("final_test_err" not in r.data.metrics)
        n = len(epochs_logged(client, r.info.run_id))
        assert epochs_logged(client, r.info.run_id) == list(range(1, n + 1))


def test_paired_sweep_trains_each_baseline_once_and_reports_the_exact_difference(mlflow_server, local_ray, runs):
    # 4 NR trials on 2 seeds: the two methods of a seed share one BL pair (it reads none of the nr settings),
    # trained once while the other trial of that seed waits on its lock; delta_test_err is the trial's test_err
    # minus its pair's, epoch by epoch, and the pair is the BL that `train` gives for that configuration.
    from nr_study.sweep.pairs import pair_config
    from nr_study.train import train

    doc = make_doc("paired", space={"method": ["NR", "NR-CR"]}, repeat=2, pair_with="BL",
                   search={"type": "grid", "objectives": ["delta_test_err: min"]}, tags={"table": "paired"})
    summary = run(doc, mlflow_server)
    client = client_for(mlflow_server)
    kids = children_of(client, summary)
    pairs = [r for r in kids if r.data.tags.get("nr.paired_baseline") == "true"]
    trials = [r for r in kids if r not in pairs]
    assert len(trials) == 4 and len(pairs) == 2, [r.data.tags.get("mlflow.runName") for r in kids]
    assert all(r.info.status == "FINISHED" for r in kids)
    assert all("nr.table" not in r.data.tags and r.data.tags["nr.method"] == "BL" for r in pairs)
    pair_err = {r.info.run_id: {int(m.step): m.value for m in client.get_metric_history(r.info.run_id, "test_err")}
                for r in pairs}
    assert all(sorted(h) == [1, 2] for h in pair_err.values())  # each epoch once
    for r in trials:
        mine = {int(m.step): m.value for m in client.get_metric_history(r.info.run_id, "test_err")}
        delta = {int(m.step): m.value for m in client.get_metric_history(r.info.run_id, "delta_test_err")}
        theirs = pair_err[r.data.tags["nr.pair_run"]]
        assert sorted(delta) == [1, 2]
        for e in delta:
            assert delta[e] == pytest.approx(mine[e] - theirs[e], abs=1e-9)
        assert client.get_run(r.data.tags["nr.pair_run"]).data.params["seed"] == r.data.params["seed"]
    assert summary["best"]["delta_test_err"] == min(c["delta_test_err"] for c in summary["configurations"])
    # the pair of seed 1 is the BL of that configuration, to the digit
    space = parse_search_space(doc, "paired.yaml")
    cfg, _, _ = space.resolve_trial({"method": "NR", "__repeat__": 1})
    direct = train(pair_config(cfg, "BL"), tracking_uri=mlflow_server.url, progress=False)
    seed1 = next(r for r in pairs if r.data.params["seed"] == "1")
    assert [row["test_err"] for row in direct["history"]] == [pair_err[seed1.info.run_id][e] for e in (1, 2)]


def test_reset_epochs_trial_is_paired_at_equal_epochs_and_at_equal_compute(mlflow_server, local_ray, runs):
    # The paper's protocol: NR rejuvenates in epoch 2, then trains train.epochs (2) more: 4 epochs in all. Its
    # equal-epochs pair (BL, 2 epochs) meets its epochs counted from the rejuvenation (3, 4 <-> 1, 2; epoch 1,
    # before it, <-> 1); its equal-compute pair is BL for 4 epochs, trained once the total is known.
    from nr_study.analysis.builders import build_cells_table
    from nr_study.analysis.runs import RunStore

    doc = make_doc("paired_reset", space={"method": ["NR"]}, pair_with="BL", tags={"table": "paired_reset"},
                   base={"train.after_rejuvenation": "reset_epochs"})
    summary = run(doc, mlflow_server)
    client = client_for(mlflow_server)
    kids = children_of(client, summary)
    (trial,) = [r for r in kids if r.data.tags.get("nr.paired_baseline") != "true"]
    pairs = {r.info.run_id: r for r in kids if r.data.tags.get("nr.paired_baseline") == "true"}
    assert len(pairs) == 2 and all(r.info.status == "FINISHED" for r in kids)

    def hist(run_id, key):
        return {int(m.step): m.value for m in client.get_metric_history(run_id, key)}

    mine, delta = hist(trial.info.run_id, "test_err"), hist(trial.info.run_id, "delta_test_err")
    assert sorted(mine) == [1, 2, 3, 4] and trial.data.metrics["rejuvenations"] == 1
    epochs_pair, compute_pair = trial.data.tags["nr.pair_run"], trial.data.tags["nr.pair_run_compute"]
    base = hist(epochs_pair, "test_err")
    assert sorted(base) == [1, 2] and sorted(hist(compute_pair, "test_err")) == [1, 2, 3, 4]
    assert sorted(delta) == [1, 3, 4]  # epoch 2 (the rejuvenation's) meets no epoch of the pair
    for e, off in ((1, 0), (3, 2), (4, 2)):
        assert delta[e] == pytest.approx(mine[e] - base[e - off], abs=1e-9)
    assert trial.data.metrics["delta_test_err_compute"] == pytest.approx(
        mine[4] - hist(compute_pair, "test_err")[4], abs=1e-9)
    assert pairs[compute_pair].data.tags["nr.cell"] == "BL (paired baseline, 4 epochs: equal compute)"
    table = build_cells_table(None, "paired_reset", RunStore(mlflow_server.url, ["test-paired_reset"]))
    assert {c.value for c in table.columns} >= {"paired:own", "paired:own_compute"}
    assert table.paired_cells[("NR", "paired:own_compute")].mean == pytest.approx(
        trial.data.metrics["delta_test_err_compute"])


def test_worker_killed_while_training_the_pair_continues_it(mlflow_server, local_ray, runs, tmp_path):
    # The pair trains first, so it is what the one-time kill after epoch 1's checkpoint hits; the retried trial
    # takes the lock again and continues the pair from its checkpoint in the same run, then trains itself.
    marker = tmp_path / "killed_once"
    doc = make_doc("pairkill", space={"method": ["NR"]}, pair_with="BL", max_failures=2,
                   base={"testing.kill_at_epoch": 1, "testing.kill_once_marker": str(marker),
                         "testing.kill_point": "after_checkpoint"})
    summary = run(doc, mlflow_server)
    assert marker.exists()
    client = client_for(mlflow_server)
    kids = children_of(client, summary)
    (pair,) = [r for r in kids if r.data.tags.get("nr.paired_baseline") == "true"]
    (trial,) = [r for r in kids if r is not pair]
    assert pair.info.status == trial.info.status == "FINISHED"
    assert epochs_logged(client, pair.info.run_id) == [1, 2] == epochs_logged(client, trial.info.run_id)
    assert trial.data.tags["nr.pair_run"] == pair.info.run_id
    assert epochs_logged(client, trial.info.run_id, "delta_test_err") == [1, 2]


def test_reuse_actors_default_runs_trials_in_one_worker_each_in_its_own_run(mlflow_server, local_ray, runs):
    # reuse_actors: the next trial runs in the worker process the last one finished in; each trial still gets
    # its own MLflow run, each epoch once, its own seed and threads, and NR's surgery starts from a fresh model.
    doc = make_doc("reuse", space={"method": ["BL", "NR-CR", "NR"]}, repeat=1, max_concurrent=1)  # the default
    summary = run(doc, mlflow_server)
    client = client_for(mlflow_server)
    kids = children_of(client, summary)
    assert len(kids) == 3 and all(r.info.status == "FINISHED" for r in kids)
    assert client.get_run(summary["parent_run_id"]).data.params["sweep.reuse_actors"] == "True"
    for r in kids:
        assert epochs_logged(client, r.info.run_id) == [1, 2]
    from ray.tune import ExperimentAnalysis  # the workers' pids, as Ray recorded them per result

    pids = {t.last_result["pid"] for t in ExperimentAnalysis(summary["sweep_dir"]).trials}
    assert len(pids) == 1, pids
    # reuse_actors: false, a fresh process per trial; its NR trains to the digit the same as the one that ran
    # after two other trials in one process (nothing leaks from the trials before it)
    fresh = run(make_doc("reuse_ref", space={"method": ["BL", "NR"]}, max_concurrent=1, reuse_actors=False),
                mlflow_server)
    assert len({t.last_result["pid"] for t in ExperimentAnalysis(fresh["sweep_dir"]).trials}) == 2
    (ref,) = [r for r in children_of(client, fresh) if r.data.tags["nr.method"] == "NR"]
    (nr,) = [r for r in kids if r.data.tags["nr.method"] == "NR"]
    hist = lambda r: [m.value for m in sorted(client.get_metric_history(r.info.run_id, "test_err"), key=lambda m: m.step)]  # noqa: E731
    assert hist(nr) == hist(ref)


def test_worker_kill_resumes_same_run_after_surgery(mlflow_server, local_ray, runs, tmp_path, caplog):
    marker = tmp_path / "killed_once"
    doc = make_doc("workerkill", space={"method": ["NR-CR"]}, max_failures=2,
                   base={"train.epochs": 3, "testing.kill_at_epoch": 2, "testing.kill_once_marker": str(marker),
                         "testing.kill_point": "after_checkpoint"})
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
    # the recovered kill is one line, not Ray's ~25-line ActorDiedError traceback with its OOM-killer hint
    failed = [r for r in caplog.records if "Trial task failed" in r.getMessage() or "worker process died" in
              r.getMessage()]
    assert len(failed) == 1 and failed[0].exc_info is None, [r.getMessage()[:200] for r in failed]
    assert "its worker process died (ActorDiedError" in failed[0].getMessage()


# ------------------------------------------------------------------------------------------ disk full, Ray state
def _sweep_cli(capfd, *argv) -> tuple[int, list[str], str]:
    """`nr-study sweep ...` in-process (the real CLI entry); returns rc, the stderr lines, stdout+stderr."""
    from nr_study import cli

    capfd.readouterr()
    rc = cli.main(["sweep", *map(str, argv)])
    cap = capfd.readouterr()
    return rc, [ln for ln in cap.err.splitlines() if ln.strip()], cap.out + cap.err


def _parent(client, experiment: str):
    exp = client.get_experiment_by_name(experiment)
    return exp, client.search_runs([exp.experiment_id], filter_string="tags.`nr.role` = 'sweep'")[0]


def _all_runs(client, exp) -> set:
    return {(r.info.run_id, r.info.status, r.info.end_time) for r in client.search_runs([exp.experiment_id])}


def test_resume_of_an_unreadable_ray_state_is_refused(mlflow_server, local_ray, runs, tmp_path, capfd):
    """Ray's experiment_state-*.json cut short (a full disk) in a search with a sampled value (which cannot be
    rebuilt from the folder, unlike a grid): --resume refuses with one line naming the file (exit 2) and changes
    nothing, instead of Ray's "Restarting experiment" (a new sweep reported as success). Also a cut-short
    tuner.pkl, and a state Ray fails to restore for a reason the file checks cannot see."""
    import json

    from nr_study.sweep.state import ResumeRefused, RestoreGuard, check_resumable

    doc = make_doc("cutstate", space={"optim.lr": {"loguniform": [0.01, 0.1]}}, search="random",
                   base={"train.epochs": 1, "data.n_train": 64})
    path = tmp_path / "cutstate.yaml"
    path.write_text(yaml.safe_dump(doc))
    argv = [path, "--tracking-uri", mlflow_server.url, "--runs", runs, "--verbose", "0"]
    rc, err, _ = _sweep_cli(capfd, *argv)
    assert rc == 0, err
    client = client_for(mlflow_server)
    exp, parent = _parent(client, "test-cutstate")
    sweep_dir = Path(parent.data.tags["nr.sweep_dir"])
    client.set_terminated(parent.info.run_id, "KILLED")  # as an interrupted sweep leaves its parent
    before = _all_runs(client, exp)
    state = sorted(sweep_dir.glob("experiment_state-*.json"))[-1]
    good = state.read_bytes()
    state.write_bytes(good[: len(good) // 2])
    listing = {str(p.relative_to(sweep_dir)): p.stat().st_size for p in sweep_dir.rglob("*")}

    rc, err, _ = _sweep_cli(capfd, *argv, "--resume", sweep_dir)
    assert rc == 2 and len(err) == 1 and err[0].startswith("error: "), err
    assert str(state) in err[0] and "cut short" in err[0] and "nothing was resumed or changed" in err[0], err
    assert "nor can it be rebuilt from the run folder" in err[0], err
    assert _all_runs(client, exp) == before, "no new trial run; the parent is still KILLED"
    assert {str(p.relative_to(sweep_dir)): p.stat().st_size for p in sweep_dir.rglob("*")} == listing

    state.write_bytes(good)
    tuner = sweep_dir / "tuner.pkl"
    tb = tuner.read_bytes()
    tuner.write_bytes(tb[: len(tb) // 2])
    with pytest.raises(ResumeRefused, match="tuner.pkl is not a complete pickle"):
        check_resumable(sweep_dir, "nr-study sweep F")
    tuner.write_bytes(tb)

    # Valid JSON, but a trial entry Ray cannot unpickle: Ray logs "Failed to restore" and would start over.
    d = json.loads(good)
    trial_state = json.loads(d["trial_data"][0][0])
    trial_state["storage"]["value"] = "00ff"
    d["trial_data"][0][0] = json.dumps(trial_state)
    state.write_text(json.dumps(d))
    rc, err, _ = _sweep_cli(capfd, *argv, "--resume", sweep_dir)
    ours = [ln for ln in err if ln.startswith("error: ")]
    assert rc == 2 and len(ours) == 1 and "Ray could not restore its sweep state" in ours[0], err
    assert _all_runs(client, exp) == before
    assert RestoreGuard(0, "x").tune_callback().on_step_begin(iteration=0, trials=[]) is None  # nothing to lose


def test_disk_full_mid_sweep_then_resume(mlflow_server, local_ray, runs, tmp_path, capfd):
    """The sweep folder's disk fills up mid-sweep: the first run ends with a clear "no space" line (exit 1, never
    an internal error) and the command that continues it; after freeing space `--resume` finishes every
    configuration of the YAML, each in its one MLflow run with each epoch once (exit 0) — when Ray's state was cut
    short, by rebuilding the grid from the run folder — or refuses with one line (exit 2); never exit 0 with
    configurations missing."""
    import threading

    small = small_fs(tmp_path / "small", 32)
    disk = small.__enter__()
    try:
        runs_ = disk / "runs"
        lrs = [0.05, 0.06, 0.07]  # two run at once, the third has not started when the disk fills
        doc = make_doc("diskfull", space={"optim.lr": lrs}, max_concurrent=2, max_failures=1,
                       base={"train.epochs": 3, "data.n_train": 384})
        path = tmp_path / "diskfull.yaml"
        path.write_text(yaml.safe_dump(doc))
        argv = [path, "--tracking-uri", mlflow_server.url, "--runs", runs_, "--verbose", "0"]
        client = client_for(mlflow_server)
        filled: dict = {}

        def fill_after_first_epoch():
            deadline = time.monotonic() + 240
            while time.monotonic() < deadline and "file" not in filled:
                exp = client.get_experiment_by_name("test-diskfull")
                if exp is not None and any(client.get_metric_history(r.info.run_id, "test_err")
                                           for r in client.search_runs([exp.experiment_id])
                                           if "nr.trial" in r.data.tags):
                    filled["file"] = fill(disk)
                    return
                time.sleep(0.5)

        t = threading.Thread(target=fill_after_first_epoch, daemon=True)
        t.start()
        rc, err, text = _sweep_cli(capfd, *argv)
        t.join(5)
        assert "file" in filled, "the disk was filled mid-sweep"
        assert rc == 1, text[-4000:]
        assert "internal error" not in text and "unexpected pos" not in text, text[-4000:]
        # the trainer's checkpoint write ("... (No space left on device)") or its free-space check on a retry
        assert "No space left on device" in text or "disk full, only 0.0 MiB free" in text, text[-4000:]
        assert err[-1].startswith("error: ") and "--resume" in err[-1] and f"--runs {runs_}" in err[-1], err[-3:]

        filled["file"].unlink()  # space freed
        exp, parent = _parent(client, "test-diskfull")
        before = _all_runs(client, exp)
        rc, err, text = _sweep_cli(capfd, *argv, "--resume")
        parent = client.get_run(parent.info.run_id)
        if rc == 2:  # Ray's state was cut short: refused, nothing changed
            ours = [ln for ln in err if ln.startswith("error: ")]
            assert len(ours) == 1 and "nothing was resumed or changed" in ours[0], err
            assert _all_runs(client, exp) == before and parent.info.status != "FINISHED"
            return
        assert rc == 0, text[-4000:]
        if "rebuilding the sweep from its run folder" in text:
            assert list(Path(parent.data.tags["nr.sweep_dir"]).glob(".ray-unreadable-*/experiment_state-*.json"))
        assert parent.info.status == "FINISHED"
        kids = [r for r in client.search_runs([exp.experiment_id],
                                              filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'")]
        by_lr: dict = {}
        for r in kids:
            by_lr.setdefault(float(r.data.params["optim.lr"]), []).append(r)
        assert sorted(by_lr) == lrs, "every configuration of the YAML ran"
        for lr, rs in by_lr.items():
            assert len(rs) == 1, f"lr={lr}: one MLflow run per configuration, got {[r.info.status for r in rs]}"
            assert rs[0].info.status == "FINISHED"
            assert epochs_logged(client, rs[0].info.run_id) == [1, 2, 3]  # each epoch once
    finally:
        small.__exit__(None, None, None)


# ------------------------------------------------------------------------------------------ tracking server faults
def test_owned_server_sigkilled_mid_sweep_is_restarted(local_ray, runs, capfd):
    """SIGKILL of the sweep's own `mlflow server` and its uvicorn child (the whole process group) from outside,
    mid-epoch: the sweep restarts it on the same address/backend, the trials wait for it and continue (no Ray
    retry is spent: max_failures 0), exit 0; every trial one run, each epoch once, nothing left RUNNING."""
    import json
    import threading

    from mlflow.tracking import MlflowClient

    from nr_study import cli

    doc = make_doc("srvkill", space={"optim.lr": [0.05, 0.1]}, max_concurrent=2, max_failures=0,
                   base={"train.epochs": 5, "data.n_train": 1024})
    path = runs.parent / "srvkill.yaml"
    path.write_text(yaml.safe_dump(doc))
    seen: dict = {}

    def kill_after_first_epoch():
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            try:
                info = json.loads((runs / "mlflow_server.json").read_text())
                c = MlflowClient(info["url"])
                exp = c.get_experiment_by_name("test-srvkill")
                kids = [r for r in c.search_runs([exp.experiment_id]) if "nr.trial" in r.data.tags] if exp else []
                if any(c.get_metric_history(r.info.run_id, "test_err") for r in kids):
                    os.killpg(info["pid"], signal.SIGKILL)  # `mlflow server` and its uvicorn worker
                    seen.update(killed=time.monotonic(), pid=info["pid"], url=info["url"])
                    break
            except Exception:
                pass
            time.sleep(0.3)
        while "killed" in seen and time.monotonic() < deadline:  # the time until an epoch is logged again
            try:
                c = MlflowClient(seen["url"])
                n = sum(len(c.get_metric_history(r.info.run_id, "test_err"))
                        for r in c.search_runs([c.get_experiment_by_name("test-srvkill").experiment_id]))
                seen.setdefault("n_at_back", n)
                if n > seen["n_at_back"]:
                    seen["recovered"] = time.monotonic() - seen["killed"]
                    return
            except Exception:
                pass
            time.sleep(0.3)

    t = threading.Thread(target=kill_after_first_epoch, daemon=True)
    t.start()
    capfd.readouterr()
    rc = cli.main(["sweep", str(path), "--runs", str(runs), "--verbose", "0"])
    text = "".join(capfd.readouterr())
    t.join(10)
    assert "killed" in seen, "the server was killed mid-sweep"
    assert rc == 0, text[-4000:]
    assert f"(pid {seen['pid']}) died (signal 9); restarting it" in text and "is back" in text, text[-4000:]
    print(f"server SIGKILL -> next logged epoch: {seen.get('recovered', float('nan')):.1f} s")

    client = MlflowClient(f"sqlite:///{runs / 'mlflow.db'}")  # the sweep stopped its server
    exp = client.get_experiment_by_name("test-srvkill")
    all_runs = client.search_runs([exp.experiment_id])
    assert not [r for r in all_runs if r.info.status == "RUNNING"]
    parent = [r for r in all_runs if r.data.tags.get("nr.role") == "sweep"]
    assert len(parent) == 1 and parent[0].info.status == "FINISHED"
    kids = [r for r in all_runs if "nr.trial" in r.data.tags]
    assert len(kids) == 2 and len({r.data.tags["nr.trial"] for r in kids}) == 2, "one run per trial"
    for r in kids:
        assert r.info.status == "FINISHED" and "nr.error" not in r.data.tags
        assert epochs_logged(client, r.info.run_id) == [1, 2, 3, 4, 5]  # each epoch once


def test_trial_waits_for_a_user_tracking_server(capsys):
    """With --tracking-uri the sweep cannot restart the server: a trial waits for it (bounded, one line each
    way) instead of failing; a server that stays down ends the wait after the budget."""
    import http.server
    import threading

    from nr_study.mlflow_server import free_port
    from nr_study.sweep.runs import wait_for_tracking

    port = free_port()
    uri = f"http://127.0.0.1:{port}"
    t0 = time.monotonic()
    assert not wait_for_tracking(uri, "trial t1", Exception("unreachable"), budget=1.0, poll=0.2)
    err = capsys.readouterr().err
    assert "trial t1: tracking server" in err and "waiting up to 1 s" in err and "still not answering" in err
    assert time.monotonic() - t0 < 10

    class Health(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.end_headers()
            self.wfile.write(b"OK")

        def log_message(self, *a):
            pass

    httpd = None

    def serve_later():
        nonlocal httpd
        time.sleep(1.5)
        httpd = http.server.HTTPServer(("127.0.0.1", port), Health)
        httpd.serve_forever()

    threading.Thread(target=serve_later, daemon=True).start()
    t0 = time.monotonic()
    try:
        assert wait_for_tracking(uri, "trial t2", Exception("unreachable"), budget=30.0, poll=0.2)
        assert 1.0 < time.monotonic() - t0 < 25
        assert "trial t2: tracking server" in capsys.readouterr().err
        # it answers: an error the server gave is not an outage (no wait), a refused connection is retried
        assert not wait_for_tracking(uri, "trial t3", Exception("tracking store X: log failed (400)"))
        assert wait_for_tracking(uri, "trial t3", Exception("tracking server X unreachable during log"))
    finally:
        if httpd is not None:
            httpd.shutdown()


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
    assert f"continue it with: nr-study sweep {path} --resume " in out and f"--runs {runs}" in out, out[-3000:]
    assert "Tuner.restore" not in out, out[-3000:]  # one instruction: ours, not also Ray's
    # partial trials: no "best" as if final, on the screen or in the parent run
    assert "best by test_err:" not in out and "PARTIAL results" in out, out[-3000:]
    runs_ = client.search_runs([exp.experiment_id])
    assert runs_ and not [r for r in runs_ if r.info.status == "RUNNING"]
    parent = [r for r in runs_ if r.data.tags.get("nr.role") == "sweep"][0]
    assert parent.info.status == "KILLED"
    assert not [k for k in parent.data.metrics if k.startswith("best_")]
    assert [r.info.status for r in runs_ if "nr.trial" in r.data.tags] == ["KILLED"]
