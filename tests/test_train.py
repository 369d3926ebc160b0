"""Training loop end to end on CPU: BL learns, NR rejuvenates, resume is exact, NR-FS / SLIM / BL-CA, statuses."""
from __future__ import annotations

import copy
import json
import math
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient

from nr_study import cli
from nr_study import tracking as T
from nr_study.config import config_from_dict
from nr_study.train import TrainingDivergedError, load_checkpoint, lr_at, model_from_payload, train

ROOT = Path(__file__).resolve().parents[1]
BASE = {
    "method": "BL",
    "model": {"name": "vgg_small", "kwargs": {"width": 8}},
    "data": {"name": "synthetic", "n_train": 512, "n_test": 256},
    "optim": {"lr": 0.05},
    "train": {"epochs": 3, "batch_size": 32, "threads": 1},
    "tracking": {"experiment": "train_tests"},
}
# Aggressive NR (monitor every step): it rejuvenates once, in epoch 2 (about step 27 of 16-step epochs). Tests
# that need the rejuvenation look one epoch later, so a CPU whose numerics shift it by a few steps still passes.
NR = dict(BASE, method="NR", optim={"lr": 0.1}, train=dict(BASE["train"], epochs=4),
          nr={"tr": 0.95, "delta_lambda": 0.05, "delta_t": 1, "delta_t_unit": "step"})
EPOCH_KEYS = ["train_loss", "train_err", "test_err", "test_err5", "util_params", "util_flops", "lambda", "params",
              "flops", "rejuvenations", "epoch_time", "images_per_s", "lr", "total_epochs", "train_flops"]


def cfg(base=BASE, **sections):
    d = copy.deepcopy(base)
    for k, v in sections.items():
        if isinstance(v, dict):
            d.setdefault(k, {}).update(v)
        else:
            d[k] = v
    return d


def steps(client, run_id, key):
    return [m.step for m in client.get_metric_history(run_id, key)]


def test_lr_schedules():
    o = config_from_dict({"optim": {"lr": 0.1, "schedule": "step", "milestones": [2, 3]}}).optim
    assert [lr_at(o, 4, 10, s) for s in (0, 19, 20, 30, 39)] == pytest.approx([0.1, 0.1, 0.01, 0.001, 0.001])
    assert lr_at(o, 4, 10, 25, offset=20) == pytest.approx(0.1)  # restarted schedule
    o = config_from_dict({"optim": {"lr": 0.1, "schedule": "cosine"}}).optim
    assert lr_at(o, 4, 10, 0) == pytest.approx(0.1) and lr_at(o, 4, 10, 20) == pytest.approx(0.05)
    assert lr_at(o, 4, 10, 30, offset=20) == pytest.approx(0.05)  # half-way through the remaining 20 steps


def assert_learned(history: list[dict], num_classes: int = 10) -> None:
    """What training guarantees on any CPU and thread count (no accuracy read off one machine): the loss falls
    and ends well below the chance-level loss log(K), and the test error ends far below chance, 100·(1 − 1/K) %."""
    first, last = history[0], history[-1]
    chance_loss, chance_err = math.log(num_classes), 100.0 * (1 - 1 / num_classes)
    assert last["train_loss"] < first["train_loss"], history
    assert last["train_loss"] < 0.5 * chance_loss, history
    assert last["test_err"] < 0.5 * chance_err, history


def test_bl_learns_and_is_tracked(tracking_uri, tmp_path):
    s = train(cfg(train={"epochs": 5}), tracking_uri=tracking_uri, checkpoint_dir=tmp_path / "ck", progress=False,
              tags={"nr.table": "t0"})
    h = s["history"]
    assert [r["epoch"] for r in h] == [1, 2, 3, 4, 5]
    assert_learned(h)
    c = MlflowClient(tracking_uri)
    run = c.get_run(s["run_id"])
    assert run.info.status == "FINISHED"
    tags = run.data.tags
    assert tags["nr.method"] == "BL" and tags["nr.arch"] == "vgg_small" and tags["nr.dataset"] == "synthetic"
    assert tags["nr.seed"] == "0" and tags["nr.table"] == "t0" and tags["nr.code_version"]
    assert run.data.params["train.epochs"] == "5" and run.data.params["nr.tr"] == "0.5"
    for k in EPOCH_KEYS:
        assert steps(c, s["run_id"], k) == [1, 2, 3, 4, 5], k
    for k in ("final_test_err", "best_test_err", "final_params", "final_flops"):
        assert k in run.data.metrics
    assert run.data.metrics["final_test_err"] == pytest.approx(h[-1]["test_err"])
    arts = {f.path for f in c.list_artifacts(s["run_id"])} | {f.path for f in c.list_artifacts(s["run_id"], "model")}
    assert {"config.yaml", "final_widths.json", "model/model.pt"} <= arts
    # the logged model rebuilds and predicts like the checkpointed one
    m = T.load_model(s["run_id"], tracking_uri)
    ref = model_from_payload(load_checkpoint(tmp_path / "ck")["model"]).eval()
    x = torch.randn(4, 1, 28, 28)
    assert torch.equal(m(x), ref(x))


def test_raising_run_is_failed_and_ctrl_c_killed(tracking_uri):
    seen = []

    def boom(metrics, ckpt):
        seen.append(ckpt)
        raise RuntimeError("boom at the end of epoch 1")

    with pytest.raises(RuntimeError, match="boom"):
        train(cfg(train={"epochs": 2, "max_steps_per_epoch": 2}), tracking_uri=tracking_uri, on_epoch_end=boom,
              progress=False)
    c = MlflowClient(tracking_uri)
    exp = c.get_experiment_by_name("train_tests")
    failed = c.search_runs([exp.experiment_id], "attributes.status = 'FAILED'")
    assert failed and failed[0].data.tags["nr.error"].startswith("RuntimeError: boom")
    assert seen == [None]

    def ctrl_c(metrics, ckpt):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(cfg(train={"epochs": 2, "max_steps_per_epoch": 2}), tracking_uri=tracking_uri, on_epoch_end=ctrl_c,
              progress=False)
    killed = c.search_runs([exp.experiment_id], "attributes.status = 'KILLED'")
    assert killed
    assert not c.search_runs([exp.experiment_id], "attributes.status = 'RUNNING'")


def test_nan_loss_stops_with_clear_error(tracking_uri):
    with pytest.raises(TrainingDivergedError, match=r"epoch 1 step \d+: loss is (nan|inf)"):
        train(cfg(optim={"lr": 1e30}, train={"epochs": 1}), tracking_uri=tracking_uri, progress=False)
    c = MlflowClient(tracking_uri)
    exp = c.get_experiment_by_name("train_tests")
    runs = c.search_runs([exp.experiment_id], order_by=["attributes.start_time DESC"], max_results=1)
    assert runs[0].info.status == "FAILED" and "TrainingDivergedError" in runs[0].data.tags["nr.error"]


@pytest.fixture(scope="module")
def nr_run(tracking_uri, tmp_path_factory):
    ck = tmp_path_factory.mktemp("nr_ck")
    s = train(copy.deepcopy(NR), tracking_uri=tracking_uri, checkpoint_dir=ck, progress=False)
    return s


def test_nr_rejuvenates_and_logs_event(nr_run, tracking_uri, tmp_path):
    s = nr_run
    assert s["rejuvenations"] == 1
    c = MlflowClient(tracking_uri)
    rid = s["run_id"]
    assert [f.path for f in c.list_artifacts(rid, "rejuvenations")] == ["rejuvenations/001.json"]
    rep = json.loads(Path(T.download_artifact(rid, "rejuvenations/001.json", tracking_uri, str(tmp_path))).read_text())
    assert rep["widths_before"] != rep["widths_after"] and rep["utilized"] < rep["cost_before"]
    assert [m.value for m in c.get_metric_history(rid, "rejuvenations")][-1] == 1
    fw = json.loads(Path(T.download_artifact(rid, "final_widths.json", tracking_uri, str(tmp_path))).read_text())
    assert {k: fw["widths"][k] for k in rep["widths_after"]} == rep["widths_after"]
    assert c.get_run(rid).data.tags["nr.scheme"] == "nr"
    m = T.load_model(rid, tracking_uri)
    assert m(torch.randn(2, 1, 28, 28)).shape == (2, 10)


def _train_until_logging_fails_at(epoch: int, tracking_uri, ckpt_dir, monkeypatch) -> None:
    """NR trains until MLflow "goes down" right after `epoch`'s checkpoint is written (the run stops there)."""
    real_log = T.RunTracker.log_epoch

    def flaky(self, e, metrics):
        if e == epoch:
            raise ConnectionError("tracking server unreachable")
        return real_log(self, e, metrics)

    with monkeypatch.context() as m:
        m.setattr(T.RunTracker, "log_epoch", flaky)
        with pytest.raises(ConnectionError):
            train(copy.deepcopy(NR), tracking_uri=tracking_uri, checkpoint_dir=ckpt_dir, progress=False)


def test_resume_after_rejuvenation_is_exact_and_logs_each_epoch_once(nr_run, tracking_uri, tmp_path, monkeypatch):
    ref = nr_run["history"]
    _train_until_logging_fails_at(3, tracking_uri, tmp_path, monkeypatch)
    ck = load_checkpoint(tmp_path)
    assert ck["epoch"] == 3 and ck["rejuvenations"] == 1 and ck["model"]["arch_spec_json"]
    c = MlflowClient(tracking_uri)
    rid = ck["run_id"]
    assert c.get_run(rid).info.status == "FAILED" and steps(c, rid, "test_err") == [1, 2]

    s = train(copy.deepcopy(NR), tracking_uri=tracking_uri, checkpoint_dir=tmp_path, resume=True, progress=False)
    assert s["run_id"] == rid and c.get_run(rid).info.status == "FINISHED"
    for k in ("train_loss", "train_err", "test_err", "util_params", "lambda", "params", "rejuvenations"):
        assert [r[k] for r in s["history"]] == [r[k] for r in ref], k
    for k in EPOCH_KEYS:
        assert steps(c, rid, k) == [1, 2, 3, 4], k


def test_a_cut_after_the_rejuvenations_checkpoint_still_logs_its_report(nr_run, tracking_uri, tmp_path, monkeypatch):
    # The rejuvenation's epoch is checkpointed, then its logging fails (a kill or MLflow down there): the report
    # travels in the checkpoint and the resume logs it; without it the run would finish with no rejuvenation file.
    at = next(r["epoch"] for r in nr_run["history"] if r["rejuvenations"] == 1)
    _train_until_logging_fails_at(at, tracking_uri, tmp_path, monkeypatch)
    c = MlflowClient(tracking_uri)
    rid = load_checkpoint(tmp_path)["run_id"]
    assert c.list_artifacts(rid, "rejuvenations") == []
    train(copy.deepcopy(NR), tracking_uri=tracking_uri, checkpoint_dir=tmp_path, resume=True, progress=False)
    assert [f.path for f in c.list_artifacts(rid, "rejuvenations")] == ["rejuvenations/001.json"]
    rep = json.loads(Path(T.download_artifact(rid, "rejuvenations/001.json", tracking_uri, str(tmp_path))).read_text())
    assert rep["epoch"] == at and rep["widths_before"] != rep["widths_after"]


# 32 steps an epoch: NR rejuvenates once near step 27 (epoch 1, or 2 on a CPU whose numerics shift it a little)
NR32 = dict(NR, data=dict(BASE["data"], n_train=1024, n_test=64), optim={"lr": 0.1, "schedule": "cosine"},
            train=dict(BASE["train"], epochs=2))


@pytest.mark.parametrize("after", ["continue", "restart_schedule", "reset_epochs"])
def test_after_rejuvenation_protocols(after, tracking_uri, tmp_path):
    """train.after_rejuvenation: continue the lr schedule, restart it over the epochs left, or (the paper) reset
    the epoch counter: train.epochs more epochs after the rejuvenation's, on a fresh schedule. Every run logs its
    total epochs and training FLOPs; a reset run resumes exactly from a checkpoint after the rejuvenation."""
    c = cfg(NR32, train={"after_rejuvenation": after})
    s = train(c, tracking_uri=tracking_uri, checkpoint_dir=tmp_path / "a", progress=False)
    rep = json.loads(Path(T.download_artifact(s["run_id"], "rejuvenations/001.json", tracking_uri,
                                              str(tmp_path))).read_text())
    k, at, h = rep["epoch"], rep["step"], s["history"]
    total = k + 2 if after == "reset_epochs" else 2
    assert [r["epoch"] for r in h] == list(range(1, total + 1)) and s["epochs"] == total
    assert all(r["total_epochs"] == (2 if r["epoch"] < k else total) for r in h)
    assert all(b["train_flops"] > a["train_flops"] for a, b in zip(h, h[1:])) and s["train_flops"] == h[-1]["train_flops"]
    o = config_from_dict(c).optim
    offset = 0 if after == "continue" else at
    assert [r["lr"] for r in h] == pytest.approx([lr_at(o, total, 32, 32 * e - 1, offset) for e in range(1, total + 1)])
    if after == "reset_epochs":  # a fresh cosine from the rejuvenation to the end, which comes train.epochs later
        assert 32 * (k - 1) < at <= 32 * k and h[-1]["lr"] < 1e-3 * o.lr
        with pytest.raises(KeyboardInterrupt):
            train(c, tracking_uri=tracking_uri, checkpoint_dir=tmp_path / "b", progress=False,
                  on_epoch_end=lambda row, ck: (_ for _ in ()).throw(KeyboardInterrupt) if row["epoch"] == k + 1 else None)
        r = train(c, tracking_uri=tracking_uri, checkpoint_dir=tmp_path / "b", resume=True, progress=False)
        drop = ("epoch_time", "images_per_s")
        assert [{x: v for x, v in row.items() if x not in drop} for row in r["history"]] == \
            [{x: v for x, v in row.items() if x not in drop} for row in h]


@pytest.mark.parametrize("method, bf16", [("NR", False), ("NR-CA", True)])
def test_channels_last_on_cpu_survives_surgery_and_resumes_exactly(method, bf16, tracking_uri, tmp_path, monkeypatch):
    """train.channels_last (and bf16) on CPU: the network built and every network a rejuvenation hands back train
    in NHWC (surgery returns new tensors; the trainer lays them out again), and a resume after the rejuvenation is
    exact."""
    from nr_study.run_state import RunState as _Run

    def nhwc(model) -> bool:  # 3x3 kernels over several channels: the two layouts differ there
        ws = [p for p in model.parameters() if p.dim() == 4 and p.shape[1] > 1 and p.shape[2] > 1]
        return bool(ws) and all(p.is_contiguous(memory_format=torch.channels_last) and not p.is_contiguous()
                                for p in ws)

    seen, real_build, real_adopt = [], _Run.build, _Run.adopt
    monkeypatch.setattr(_Run, "build", lambda self, ck: (real_build(self, ck), seen.append(("build", nhwc(self.model)))))
    monkeypatch.setattr(_Run, "adopt", lambda self, ev, progress: (
        real_adopt(self, ev, progress), ev is not None and seen.append(("adopt", nhwc(self.model)))))
    c = cfg(NR, method=method, train={"channels_last": True, "bf16": bf16})
    ref = train(copy.deepcopy(c), tracking_uri=tracking_uri, progress=False)
    assert ref["rejuvenations"] == 1 and seen == [("build", True), ("adopt", True)], seen
    k = next(r["epoch"] for r in ref["history"] if r["rejuvenations"] == 1)
    with pytest.raises(KeyboardInterrupt):
        train(copy.deepcopy(c), tracking_uri=tracking_uri, checkpoint_dir=tmp_path, progress=False,
              on_epoch_end=lambda row, ck: (_ for _ in ()).throw(KeyboardInterrupt) if row["epoch"] == k else None)
    r = train(copy.deepcopy(c), tracking_uri=tracking_uri, checkpoint_dir=tmp_path, resume=True, progress=False)
    assert seen[-1] == ("build", True)  # the grown network, rebuilt from the checkpoint
    drop = ("epoch_time", "images_per_s")
    assert [{x: v for x, v in row.items() if x not in drop} for row in r["history"]] == \
        [{x: v for x, v in row.items() if x not in drop} for row in ref["history"]]


def test_bf16_applies_on_cpu(tracking_uri, monkeypatch):
    """train.bf16 is what runs on every device: on CPU the steps run under bf16 autocast (the loss differs from
    fp32's), never a logged `true` over an fp32 run."""
    import nr_study.train as train_mod

    seen, real_step = [], train_mod.train_step
    monkeypatch.setattr(train_mod, "train_step", lambda *a, **k: (seen.append(k["amp"]), real_step(*a, **k))[1])
    one = {"epochs": 1, "max_steps_per_epoch": 4}
    fp32 = train(cfg(train=one), tracking_uri=tracking_uri, progress=False)
    bf16 = train(cfg(train=dict(one, bf16=True)), tracking_uri=tracking_uri, progress=False)
    assert seen == [False] * 4 + [True] * 4
    assert bf16["history"][0]["train_loss"] != fp32["history"][0]["train_loss"]
    assert MlflowClient(tracking_uri).get_run(bf16["run_id"]).data.params["train.bf16"] == "True"


def test_nr_fs_rebuilds_found_widths(nr_run, tracking_uri, tmp_path, monkeypatch):
    src = nr_run["run_id"]
    fw = json.loads(Path(T.download_artifact(src, "final_widths.json", tracking_uri, str(tmp_path))).read_text())
    quick = {"epochs": 1, "max_steps_per_epoch": 2}
    scratch = tmp_path / "scratch"  # the source model is downloaded to a temporary folder and removed
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    s = train(cfg(method="NR-FS", fs={"run_id": src}, train=quick), tracking_uri=tracking_uri, progress=False)
    assert not [p for p in scratch.iterdir() if p.name.startswith("nr_")]
    c = MlflowClient(tracking_uri)
    got = json.loads(Path(T.download_artifact(s["run_id"], "final_widths.json", tracking_uri,
                                              str(tmp_path / "b"))).read_text())
    assert got["widths"] == fw["widths"] and s["final_params"] == nr_run["final_params"]
    assert c.get_run(s["run_id"]).data.tags["nr.method"] == "NR-FS"
    # weights are re-initialised, not copied from the NR run
    a, b = T.load_model(src, tracking_uri), T.load_model(s["run_id"], tracking_uri)
    wa = next(p for n, p in a.named_parameters() if p.dim() == 4)
    wb = next(p for n, p in b.named_parameters() if p.dim() == 4)
    assert wa.shape == wb.shape and not torch.allclose(wa, wb, atol=1e-2)
    # the exported widths file works too
    s2 = train(cfg(method="NR-FS", fs={"architecture_file": str(Path(tmp_path) / "final_widths.json")}, train=quick),
               tracking_uri=tracking_uri, progress=False)
    assert s2["final_params"] == nr_run["final_params"]


def free_gamma_l1(model, shape=(1, 1, 28, 28)) -> float:
    """Σ|γ| over the prunable BNs (the channel graph's free groups): what an L1 term on γ pulls down."""
    from nr_study.nr import build_graph

    mods = dict(model.named_modules())
    return sum(float(mods[g.bn].weight.detach().abs().sum()) for g in build_graph(model, shape).free_groups())


def test_slim_l1_is_active_from_the_first_step(tracking_uri, tmp_path):
    """Network Slimming trains with λ·Σ|γ| from the first step: under the same seed its γ's L1 norm ends epoch 1
    below BL's, the more so the larger slim.l1 (before the fix SLIM trained as BL: the norms were equal)."""
    norms = {}
    for name, method, l1 in (("BL", "BL", 0.0), ("slim_1e-4", "SLIM", 1e-4), ("slim_1e-3", "SLIM", 1e-3)):
        got = []
        s = train(cfg(method=method, slim={"l1": l1, "prune_epoch": 2}, train={"epochs": 2}),
                  tracking_uri=tracking_uri, checkpoint_dir=tmp_path / name, progress=False,
                  on_epoch_end=lambda row, ck: got.append(free_gamma_l1(model_from_payload(load_checkpoint(ck)["model"])))
                  if row["epoch"] == 1 else None)
        norms[name] = got[0]
        if method == "SLIM":
            assert s["history"][0]["lambda"] == l1 and s["history"][1]["lambda"] == 0.0  # pruned after epoch 2
    assert norms["BL"] > norms["slim_1e-4"] > norms["slim_1e-3"], norms
    assert norms["BL"] - norms["slim_1e-3"] > 5 * (norms["BL"] - norms["slim_1e-4"]) > 0, norms


def test_slim_threshold_is_global():
    """One |γ| threshold over every prunable BN (not a per-layer percentile): a layer of large γ keeps all its
    channels, a layer of small γ keeps its strongest one; every kept |γ| is above every pruned one."""
    from nr_study.models import create_model
    from nr_study.methods import slim_prune

    torch.manual_seed(0)
    model = create_model("vgg_small", num_classes=10, in_channels=1, width=8)
    bns = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.BatchNorm2d)}
    with torch.no_grad():
        for i, (n, bn) in enumerate(bns.items()):
            bn.weight.copy_(torch.rand(bn.num_features) + (1.0 if i % 2 == 0 else 0.0) * 10)  # even: ~10, odd: <1
    before = {n: bn.weight.detach().abs().clone() for n, bn in bns.items()}
    pruned, rep = slim_prune(model, (1, 1, 28, 28), 0.5)
    allv = torch.cat(list(before.values()))
    assert rep["threshold"] == float(allv.sort().values[55])  # the 56th smallest |γ| of all 112: one number
    kept = {k: rep["widths_after"][k] / rep["widths_before"][k] for k in rep["widths_before"]}
    assert kept["features.0.bn"] == 1.0 and kept["features.7.bn"] == 1 / 32, kept  # a per-layer cut keeps 0.5
    assert rep["channels_after"] == 56 + 3  # the 56 small ones go, but each small layer keeps its strongest
    after = dict(pruned.named_modules())
    for name, g in before.items():  # kept: exactly the channels above the threshold (or the layer's strongest)
        above = sorted(v for v in g.tolist() if v > rep["threshold"]) or [max(g.tolist())]
        assert sorted(after[name].weight.detach().abs().tolist()) == pytest.approx(above), name


def test_slim_prunes_to_percentile(tracking_uri, tmp_path):
    s = train(cfg(method="SLIM", slim={"l1": 1e-3, "prune_ratio": 0.5, "prune_epoch": 1},
                  train={"epochs": 2, "max_steps_per_epoch": 4}), tracking_uri=tracking_uri, progress=False)
    rep = json.loads(Path(T.download_artifact(s["run_id"], "slim_prune.json", tracking_uri, str(tmp_path))).read_text())
    n = rep["channels_before"]
    assert rep["channels_after"] == n - math.floor(0.5 * n)
    assert rep["params_after"] < rep["params_before"]
    kept = {k: rep["widths_after"][k] / rep["widths_before"][k] for k in rep["widths_before"]}
    assert len(set(kept.values())) > 1, kept  # a global threshold: layers keep different fractions
    h = s["history"]
    assert h[0]["params"] == rep["params_after"] and h[1]["params"] == rep["params_after"]
    assert s["final_params"] == rep["params_after"] < 18248
    assert h[0]["lambda"] == 0.0  # pruned at the end of epoch 1: fine-tuning without L1


def test_bl_ca_trains(tracking_uri):
    from nr_study.nr import CAConv

    s = train(cfg(method="BL-CA", train={"epochs": 1, "max_steps_per_epoch": 2}), tracking_uri=tracking_uri,
              progress=False)
    m = T.load_model(s["run_id"], tracking_uri)
    assert any(isinstance(x, CAConv) for x in m.modules())
    assert MlflowClient(tracking_uri).get_run(s["run_id"]).data.tags["nr.scheme"] == "ca"


def test_cli_train_prints_progress_and_summary(tracking_uri, tmp_path, capsys):
    rc = cli.main(["train", str(ROOT / "configs" / "synthetic_smoke.yaml"), "--tracking-uri", tracking_uri,
                   "--checkpoint-dir", str(tmp_path), "--set", "train.epochs=2", "--set", "train.max_steps_per_epoch=3",
                   "--set", "train.threads=1"])
    out, err = capsys.readouterr()
    assert rc == 0
    assert "img/s" not in err + out and "\r" not in err  # stderr is not a terminal: no progress bar
    assert "epoch   1/2 loss" in out and "epoch   2/2 loss" in out and "util" in out and "λ" in out
    assert "done: final test_err" in out and "params" in out and "FLOPs" in out and "run " in out
    assert load_checkpoint(tmp_path)["epoch"] == 2
    rc = cli.main(["train", str(ROOT / "configs" / "synthetic_smoke.yaml"), "--tracking-uri", tracking_uri,
                   "--checkpoint-dir", str(tmp_path / "none"), "--resume"])
    assert rc == 2 and "--resume: no checkpoint" in capsys.readouterr().err


def cli_on_terminal(args: list, cwd: Path) -> tuple[int, str, str]:
    """`nr-study ARGS` with stderr on a pseudo-terminal (24x120) and stdout on a pipe: (rc, stdout, terminal).
    TQDM_MININTERVAL=0: the bar redraws at every step, so what it shows does not depend on the machine's speed."""
    import fcntl
    import struct
    import termios

    master, slave = os.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 120, 0, 0))
    env = dict(os.environ, PYTHONPATH=str(ROOT), TQDM_MININTERVAL="0", NR_STUDY_RUNS=str(cwd / "runs"))
    p = subprocess.Popen([sys.executable, "-m", "nr_study.cli", *map(str, args)], stdout=subprocess.PIPE,
                         stderr=slave, env=env, cwd=cwd)
    os.close(slave)
    chunks = []
    while True:
        try:
            data = os.read(master, 1 << 16)
        except OSError:  # EIO: the child closed its end of the terminal
            break
        if not data:
            break
        chunks.append(data)
    os.close(master)
    out = p.stdout.read().decode()
    return p.wait(timeout=120), out, b"".join(chunks).decode(errors="replace")


@pytest.mark.parametrize("quiet", [False, True], ids=["bar", "quiet"])
def test_progress_bar_on_a_terminal_only(quiet, tracking_uri, tmp_path):
    """On a terminal each epoch shows a tqdm bar on stderr (epoch i/N, images/s, current loss), cleared when
    the epoch ends; --quiet (what sweep trials get: progress off) shows none."""
    (tmp_path / "cfg.yaml").write_text(json.dumps(cfg(train={"epochs": 2, "max_steps_per_epoch": 4})))
    rc, out, term = cli_on_terminal(["train", tmp_path / "cfg.yaml", "--tracking-uri", tracking_uri,
                                     "--checkpoint-dir", tmp_path / "ck"] + (["--quiet"] if quiet else []), tmp_path)
    assert rc == 0, term[-2000:]
    assert "img/s" not in out
    if quiet:
        assert "img/s" not in term and "epoch 1/2" not in term, term
        return
    assert "epoch   1/2 loss" in out and "epoch   2/2 loss" in out
    for epoch in (1, 2):
        draws = [d for d in term.split("\r") if d.startswith(f"epoch {epoch}/2")]
        assert draws and all("img/s" in d for d in draws), term
        # counted in images: 4 steps of 32; the loss appears once a step has run
        assert any(re.search(r"128/128 \[.*img/s, loss=\d+\.\d{4}\]", d) for d in draws), draws


@pytest.mark.slow
def test_fault_kill_once_then_resume(tracking_uri, tmp_path):
    marker = tmp_path / "killed.marker"
    c = cfg(train={"epochs": 2, "max_steps_per_epoch": 3},
            testing={"kill_at_epoch": 1, "kill_once_marker": str(marker)})
    code = ("import json,sys; from nr_study.train import train; "
            "s=train(json.loads(sys.argv[1]), tracking_uri=sys.argv[2], checkpoint_dir=sys.argv[3], resume=True,"
            " progress=False); print('RUN', s['run_id'])")
    args = [sys.executable, "-c", code, json.dumps(c), tracking_uri, str(tmp_path / "ck")]
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    p = subprocess.run(args, capture_output=True, text=True, env=env, timeout=300)
    assert p.returncode == -9 and marker.exists(), p.stderr[-2000:]
    ck = load_checkpoint(tmp_path / "ck")
    assert ck["epoch"] == 1
    p = subprocess.run(args, capture_output=True, text=True, env=env, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    rid = p.stdout.split("RUN ")[1].strip()
    assert rid == ck["run_id"]
    client = MlflowClient(tracking_uri)
    assert client.get_run(rid).info.status == "FINISHED" and steps(client, rid, "test_err") == [1, 2]


@pytest.mark.slow
@pytest.mark.skipif(not Path("/usr/share/datasets/fashion-mnist").is_dir(), reason="no offline Fashion-MNIST")
def test_fashion_mnist_subset_learns(tracking_uri):
    # cosine: the last epoch's small steps settle the weights, so the final test error is not one noisy step
    s = train(cfg(data={"name": "fashion_mnist", "n_train": 1000, "n_test": 500}, optim={"schedule": "cosine"},
                  train={"epochs": 6}), tracking_uri=tracking_uri, progress=False)
    assert_learned(s["history"])


def test_recalibrate_bn_averages_batch_statistics():
    """Precise BN: each BN's running mean/var become the mean of its batch statistics over the given batches."""
    from nr_study.run_state import recalibrate_bn

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU(),
                                torch.nn.Conv2d(4, 5, 3), torch.nn.BatchNorm2d(5, momentum=None))
    batches = [(torch.randn(8, 3, 9, 9) * (1 + i), None) for i in range(3)]
    seen = {1: [], 4: []}
    handles = [model[i].register_forward_hook(lambda m, inp, out, i=i: seen[i].append(inp[0].detach()))
               for i in seen]
    with torch.no_grad():
        model.train()
        for x, _ in batches:
            model(x)
    for h in handles:
        h.remove()
    for i in seen:  # stale statistics, as a fast-moving γ leaves them
        model[i].running_mean.fill_(5.0)
        model[i].running_var.fill_(50.0)
    model.eval()
    rng = torch.get_rng_state()
    assert recalibrate_bn(model, iter(batches)) == 3
    assert torch.equal(torch.get_rng_state(), rng) and not model.training
    for i, inputs in seen.items():
        mean = torch.stack([x.mean((0, 2, 3)) for x in inputs]).mean(0)
        var = torch.stack([x.var((0, 2, 3), unbiased=True) for x in inputs]).mean(0)
        assert torch.allclose(model[i].running_mean, mean, atol=1e-5)
        assert torch.allclose(model[i].running_var, var, atol=1e-4)
    assert (model[1].momentum, model[4].momentum) == (0.1, None)


def test_precise_bn_changes_the_evaluation_not_the_training(tracking_uri):
    """The same NR run with and without precise BN trains identically (same losses, same rejuvenation); only
    the eval-mode statistics differ."""
    base = cfg(NR, train=dict(NR["train"], epochs=3))
    plain = train(base, tracking_uri=tracking_uri, progress=False)
    precise = train(cfg(base, train=dict(base["train"], precise_bn_batches=4)), tracking_uri=tracking_uri, progress=False)
    assert [r["train_loss"] for r in plain["history"]] == [r["train_loss"] for r in precise["history"]]
    assert plain["rejuvenations"] == precise["rejuvenations"] == 1
