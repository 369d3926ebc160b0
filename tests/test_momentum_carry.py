"""nr.carry_momentum: SGD momentum follows the surviving weights across a rejuvenation.

The oracle is independent of how the surgery maps entries: momentum accumulates gradients, and a rejuvenation of
exactly dead channels keeps the function, so the gradient of every surviving weight in the new net is the old
gradient carried to its new place (times 1/s where neural rescaling scaled the weight by s). Carrying the old
gradients must therefore give the new gradients at every kept entry, and 0 at every new one."""
from __future__ import annotations

import copy

import pytest
import torch

from nr_study.errors import UnsupportedGraphError
from nr_study.nr import build_graph, rejuvenate
from nr_study.nr.optim_state import carry_state
from nr_study.train import train
from tests.nets import kill_channels
from tests.randnets import random_net
from tests.test_nr_fuzz import VARIANTS, logits

SEEDS = range(0, 60)


def grads(model: torch.nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """∂(Σ logits²)/∂θ in eval mode (BN on its running statistics: no batch coupling); unused weights: 0."""
    model.eval().zero_grad(set_to_none=True)
    logits(model(x)).square().sum().backward()
    return {n: (p.grad if p.grad is not None else torch.zeros_like(p)).detach().clone()
            for n, p in model.named_parameters()}


@pytest.mark.parametrize("seed", SEEDS, ids=[f"seed-{s}" for s in SEEDS])
def test_carried_momentum_is_the_new_nets_gradient(seed):
    model, shape, _ = random_net(seed, allow_refused=False)
    try:
        if not build_graph(model, shape).free_groups():
            return
    except UnsupportedGraphError:
        return
    x = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
    scheme, impl, rescale = VARIANTS[seed % len(VARIANTS)]
    net = copy.deepcopy(model)
    for round_ in range(2):  # a second rejuvenation starts from the first one's (CR: block) layout
        where = f"seed {seed}, {scheme}/{impl}/rescale={rescale}, round {round_ + 1}"
        kill_channels(net, build_graph(net, shape), 0.4, seed=seed * 7 + round_)
        old_grad = grads(net, x)
        old_values = torch.cat([p.detach().flatten() for p in net.parameters()])
        net, rep = rejuvenate(net, shape, 1.0, scheme=scheme, rescale=rescale, impl=impl, sources=True)
        new_params = dict(net.named_parameters())
        carried = carry_state(rep.sources, old_grad, new_params)
        new_grad = grads(net, x)
        assert set(carried) == set(new_params), where
        kept_any = False
        for n, p in new_params.items():
            idx = rep.sources.index[n]
            kept, new = idx >= 0, idx < 0
            kept_any |= bool(kept.any())
            assert carried[n].shape == p.shape, (where, n)
            assert torch.all(carried[n][new] == 0), f"{where}: {n}: a new entry carries momentum"
            scale = (new_grad[n][kept].abs().max() if kept.any() else 0) + 1e-6
            assert torch.allclose(carried[n][kept], new_grad[n][kept], rtol=1e-4, atol=1e-5 * scale), \
                f"{where}: {n}: the carried gradient is not the new net's gradient"
            if not rescale:  # the map itself: a kept entry holds the old value it came from
                assert torch.equal(p.detach()[kept], old_values[idx[kept]]), f"{where}: {n}: wrong source"
        assert kept_any, where


def test_sources_cost_nothing_to_the_training_stream():
    """Asking for the sources draws no random number the training would see: the same new weights either way."""
    model, shape, _ = random_net(3, allow_refused=False)
    kill_channels(model, build_graph(model, shape), 0.4, seed=1)
    outs = []
    for sources in (False, True):
        torch.manual_seed(0)
        net, _ = rejuvenate(copy.deepcopy(model), shape, 1.0, sources=sources)
        outs.append([p.detach().clone() for p in net.parameters()] + [torch.rand(3)])
    assert all(torch.equal(a, b) for a, b in zip(*outs))


CFG = {
    "method": "NR",
    "model": {"name": "vgg_small", "kwargs": {"width": 8}},
    "data": {"name": "synthetic", "n_train": 1024, "n_test": 64},
    "optim": {"lr": 0.1, "momentum": 0.9},
    "train": {"epochs": 2, "batch_size": 32, "threads": 1},
    "tracking": {"experiment": "carry"},
    "nr": {"tr": 0.95, "delta_lambda": 0.05, "delta_t": 1, "delta_t_unit": "step", "carry_momentum": True},
}


def test_training_carries_momentum_and_resumes_exactly(tracking_uri, tmp_path, monkeypatch):
    """In a run: the optimizer built at the rejuvenation starts with the carried buffers (not empty), and a run
    cut after epoch 1 resumes to the same metrics and weights."""
    from nr_study import run_state

    seen = []
    real = run_state.RunState.rebuild_optimizer

    def spy(self, sources=None):
        real(self, sources)
        if sources is not None:
            seen.append(sum(1 for p in self.opt.state if self.opt.state[p].get("momentum_buffer") is not None))

    monkeypatch.setattr(run_state.RunState, "rebuild_optimizer", spy)
    ref = train(CFG, tracking_uri=tracking_uri, checkpoint_dir=tmp_path / "ref", progress=False)
    assert ref["rejuvenations"] == 1 and seen and seen[0] > 0

    def stop_after_1(row, ckpt):
        if row["epoch"] == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(CFG, tracking_uri=tracking_uri, checkpoint_dir=tmp_path / "cut", on_epoch_end=stop_after_1,
              progress=False)
    res = train(CFG, tracking_uri=tracking_uri, checkpoint_dir=tmp_path / "cut", resume=True, progress=False)

    def strip(history):
        return [{k: v for k, v in r.items() if k not in ("epoch_time", "images_per_s")} for r in history]

    assert strip(res["history"]) == strip(ref["history"])
    off = dict(CFG, nr=dict(CFG["nr"], carry_momentum=False))  # the same run with a fresh optimizer after surgery
    plain = train(off, tracking_uri=tracking_uri, checkpoint_dir=tmp_path / "off", progress=False)
    assert plain["rejuvenations"] == 1 and plain["history"][-1]["train_loss"] != ref["history"][-1]["train_loss"]
