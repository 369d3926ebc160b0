"""Every method (config.METHODS), one parametrized test (Composer's per-algorithm tests are the model): two epochs
on synthetic data, the method's defining behaviour — L1 on γ exactly where the method says, surgery or a prune
where it says, no hook where there is none —, the same metric names for every method, and an exact resume from
the checkpoint after epoch 1 (bit-identical metrics)."""
from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient

from nr_study import names as N
from nr_study import tracking as T
from nr_study import train as TR
from nr_study.methods import METHODS
from nr_study.train import load_checkpoint, model_from_payload, train

# 32 steps an epoch. NR (monitor every step, λ += 0.05 each check) rejuvenates once near step 27 of 64, so a few
# steps' shift on another CPU still rejuvenates well inside the run; SLIM prunes after epoch 1.
BASE = {
    "model": {"name": "vgg_small", "kwargs": {"width": 8}},
    "data": {"name": "synthetic", "n_train": 1024, "n_test": 64},
    "optim": {"lr": 0.1},
    "train": {"epochs": 2, "batch_size": 32, "threads": 1},
    "tracking": {"experiment": "methods"},
    "nr": {"tr": 0.95, "delta_lambda": 0.05, "delta_t": 1, "delta_t_unit": "step"},
    "slim": {"l1": 1e-3, "prune_epoch": 1},
    # the recyclers at a pace a 64-step run sees: ReDo scores every 10 steps (τ = 1: at init every unit scores
    # about the layer's mean, so about half are recycled each time); CBP's units mature after 10 steps
    "redo": {"tau": 1.0, "every": 10},
    "cbp": {"replacement_rate": 0.01, "maturity": 10},
}
STEPS = 64
NR_VARIANTS = [m for m, info in METHODS.items() if info.hook]
EVENT = {**{m: "rejuvenations/001.json" for m in NR_VARIANTS}, "SLIM": "slim_prune.json"}
RECYCLERS = ("ReDo", "CBP")  # units recycled in place: no event, the architecture unchanged
# what every method logs, per epoch and once at the end (the one list: nr_study.names)
EPOCH_METRICS, SUMMARY_METRICS = set(N.EPOCH_METRICS), set(N.SUMMARY_METRICS)
TIMING = ("epoch_time", "images_per_s")


@pytest.fixture(scope="module")
def found_widths(tmp_path_factory) -> Path:
    """An architecture 'found by NR' for NR-FS: vgg_small (width 8) with some channels removed."""
    from nr_study.models import create_model
    from nr_study.nr import architecture_spec, build_graph, prune

    shape = (1, 1, 28, 28)
    model = create_model("vgg_small", num_classes=10, in_channels=1, width=8)
    keep = {g.bn: torch.arange(g.width) % 3 != 0 for g in build_graph(model, shape).free_groups()}
    small = prune(model, shape, keep)
    p = tmp_path_factory.mktemp("fs") / "final_widths.json"
    p.write_text(json.dumps({"model": "vgg_small", "architecture": architecture_spec(small)}))
    return p


def config(method: str, found_widths: Path) -> dict:
    c = copy.deepcopy(BASE)
    c["method"] = method
    if method == "NR-FS":
        c["fs"] = {"architecture_file": str(found_widths)}
    return c


@pytest.fixture
def l1_spy(monkeypatch):
    """Which steps applied an L1 subgradient on γ, with which λ and on how many tensors: every method's L1
    (NR's hook, SLIM) goes through nr.l1_subgradient_."""
    import nr_study.nr as nr
    import nr_study.nr.hook as hook

    real, step, calls = nr.l1_subgradient_, [0], []

    def spy(gammas, lam):
        if lam:
            calls.append((step[0], lam, len(gammas)))
        return real(gammas, lam)

    real_step = TR.train_step

    def counting_step(*a, **kw):
        step[0] += 1
        return real_step(*a, **kw)

    monkeypatch.setattr(nr, "l1_subgradient_", spy)
    monkeypatch.setattr(hook, "l1_subgradient_", spy)
    monkeypatch.setattr(TR, "train_step", counting_step)
    return calls


@pytest.mark.parametrize("method", list(METHODS))
def test_method(method, found_widths, l1_spy, tracking_uri, tmp_path):
    c = MlflowClient(tracking_uri)
    ref = train(config(method, found_widths), tracking_uri=tracking_uri, checkpoint_dir=tmp_path / "ref",
                progress=False)
    rid, h = ref["run_id"], ref["history"]
    calls, l1_calls = list(l1_spy), len(l1_spy)
    run = c.get_run(rid)
    assert run.info.status == "FINISHED" and run.data.tags["nr.method"] == method

    # -- the same metric names for every method --------------------------------------------------------------
    heads = set(N.HEAD_METRICS) if METHODS[method].scheme == "cr" else set()  # two classifiers (cr_heads separate)
    assert set(run.data.metrics) == EPOCH_METRICS | SUMMARY_METRICS | heads
    assert all(set(r) == EPOCH_METRICS | {"epoch"} | heads for r in h)

    # -- the defining behaviour ------------------------------------------------------------------------------
    arts = {f.path for f in c.list_artifacts(rid)} | {f.path for f in c.list_artifacts(rid, "rejuvenations")}
    assert arts - {"config.yaml", "final_widths.json", "model", "rejuvenations"} == ({EVENT[method]} if method in EVENT else set())
    method_state = load_checkpoint(tmp_path / "ref")["method_state"]
    free_bns = 6  # vgg_small: every conv is followed by a BN outside residual adds
    if method in EVENT:
        rep = json.loads(Path(T.download_artifact(rid, EVENT[method], tracking_uri, str(tmp_path))).read_text())
        at = rep["step"]
        assert 1 <= at < STEPS
        if method == "SLIM":  # L1 with its own fixed λ on every prunable γ from step 1 to the prune, then none
            assert at == 32 and rep["epoch"] == 1
            assert calls == [(s, 1e-3, free_bns) for s in range(1, at + 1)]
            assert h[0]["params"] == h[1]["params"] == ref["final_params"] == rep["params_after"] < rep["params_before"]
            assert [r["lambda"] for r in h] == [0.0, 0.0] and method_state == {"epoch": 2, "pruned": True}
        else:  # NR: adaptive λ (0 at step 1) while the NR flag is on, none after the (only) rejuvenation
            assert ref["rejuvenations"] == 1 and h[-1]["rejuvenations"] == 1
            assert [s for s, _, _ in calls] == list(range(2, at + 1))
            assert all(n == free_bns for _, _, n in calls)
            assert rep["scheme"] == METHODS[method].scheme and rep["rescale"] == METHODS[method].rescale
            assert (rep["widths_after"] == rep["widths_before"]) == (method == "NR-IP")
            assert h[-1]["lambda"] == 0.0 and method_state["rejuvenations"] == 1 and "config" not in method_state
    elif method in RECYCLERS:  # no L1, no event: units recycled in place, counted in the state and the metrics
        assert calls == [] and h[0]["params"] == h[1]["params"] == ref["final_params"]
        assert [r["lambda"] for r in h] == [0.0, 0.0] and ref["rejuvenations"] == 0
        assert method_state["step"] == STEPS and 0 < h[0]["recycled"] < h[1]["recycled"] == method_state["recycled"]
        assert all(0.0 <= r["dormant"] <= 1.0 for r in h)
    else:  # no L1, no event, no state: the architecture is the one training started with
        assert calls == []
        if method == "BL-2H":  # two disjoint halves of equal width within the baseline's budget (18,248 params)
            blocks = [m for m in model_from_payload(load_checkpoint(tmp_path / "ref")["model"]).modules()
                      if type(m).__name__ == "CRConv"]
            assert blocks and all(m.s_out == m.r_out for m in blocks) and ref["final_params"] <= 18248
            assert set(method_state) == {"halves"}
        else:
            assert method_state == {}
        assert h[0]["params"] == h[1]["params"] == ref["final_params"]
        assert [r["lambda"] for r in h] == [0.0, 0.0] and ref["rejuvenations"] == 0
    if method not in RECYCLERS:
        assert [(r["recycled"], r["dormant"]) for r in h] == [(0.0, 0.0)] * 2
    # training FLOPs: 3 × the forward multiply-adds of the architecture trained, per image (1024 an epoch)
    first_clean = rep["epoch"] + 1 if method in EVENT else 1  # epochs whose architecture did not change
    steps_flops = [b["train_flops"] - a["train_flops"] for a, b in zip([{"train_flops": 0}] + h, h)]
    for e in range(first_clean, 3):
        assert steps_flops[e - 1] == 3 * h[e - 1]["flops"] * 1024, (e, steps_flops)
    assert [r["total_epochs"] for r in h] == [2, 2] and ref["train_flops"] == h[-1]["train_flops"]
    model = model_from_payload(load_checkpoint(tmp_path / "ref")["model"])
    has_ca = any(type(m).__name__ == "CAConv" for m in model.modules())
    assert has_ca == (method == "BL-CA" or (METHODS[method].scheme == "ca" and method in EVENT))
    if method == "NR-FS":  # the found widths, trained from scratch
        fw = json.loads(found_widths.read_text())
        from nr_study.nr import architecture_spec

        assert architecture_spec(model) == fw["architecture"]
        assert ref["final_params"] < 18248

    # -- exact resume from the checkpoint after epoch 1 -------------------------------------------------------
    def stop_after_1(row, ckpt):
        if row["epoch"] == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(config(method, found_widths), tracking_uri=tracking_uri, checkpoint_dir=tmp_path / "cut",
              on_epoch_end=stop_after_1, progress=False)
    assert load_checkpoint(tmp_path / "cut")["epoch"] == 1
    del l1_spy[:]
    res = train(config(method, found_widths), tracking_uri=tracking_uri, checkpoint_dir=tmp_path / "cut",
                resume=True, progress=False)
    assert len(l1_spy) == l1_calls - sum(1 for s, _, _ in calls if s <= STEPS // 2)  # epoch 2's L1 only
    strip = [{k: v for k, v in r.items() if k not in TIMING} for r in h]
    assert [{k: v for k, v in r.items() if k not in TIMING} for r in res["history"]] == strip
    assert res["final_params"] == ref["final_params"] and res["final_test_err"] == ref["final_test_err"]
    a = model_from_payload(load_checkpoint(tmp_path / "ref")["model"]).eval()
    b = model_from_payload(load_checkpoint(tmp_path / "cut")["model"]).eval()
    x = torch.randn(2, 1, 28, 28)
    assert torch.equal(a(x), b(x))
