"""Generative test of the core's invariants: every random net is refused with a named reason, or all hold.

For each seed (the seed is in the test id, so a failure names it: rerun with `-k "seed-123"`):
cost = Σ conv/linear weights, FLOPs = flop counter / 2 (training mode, auxiliary heads included);
U(θ) = cost of the physically pruned model, which computes what the model did; then two successive
rejuvenations per scheme (NR, NR-CR, NR-CA with both implementations; rescaling on/off alternating by seed), each preserving the
function (eval mode, dead channels zeroed), costing exactly its weights, keeping U = pruned cost, and taking a
training step.

Then the rejuvenation's promise, on targets below 1 and live fractions drawn above and below them: a rejuvenation
keeps every live channel and the function, or refuses with the reason named (DESIGN §3.3 item 7), over three
rejuvenations per scheme; and widths rounded to multiples of m are maximal (no group can take one more).
"""
from __future__ import annotations

import copy
import os

import pytest
import torch
import torch.nn as nn
from torch.utils.flop_counter import FlopCounterMode

from nr_study.errors import UnsupportedGraphError
from nr_study.nr import build_graph, live_masks, prune, rejuvenate, utilization
from nr_study.nr.cost import graph_utilization, widths_cost
from nr_study.nr.surgery import split_counts
from tests.nets import kill_channels
from tests.randnets import random_net

# NR_FUZZ_SEEDS=START:STOP draws other nets (e.g. 200:1000 for a longer hunt than CI's)
SEEDS = range(*map(int, os.environ.get("NR_FUZZ_SEEDS", "0:200").split(":")))
VARIANTS = [("nr", "two", False), ("nr", "two", True), ("cr", "two", False), ("cr", "two", True),
            ("ca", "two", False), ("ca", "four", True)]


def weights(model: nn.Module) -> int:
    return sum(m.weight.numel() for m in model.modules() if type(m) in (nn.Conv2d, nn.Linear))


def train_flops(model: nn.Module, shape) -> int:
    """Multiply-adds of one image in training mode (where every head runs); the model is left untouched."""
    m = copy.deepcopy(model).train()
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        m(torch.zeros(shape))
    return counter.get_total_flops() // (2 * shape[0])


def logits(out):
    return out[0] if isinstance(out, tuple) else out


def eval_out(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return logits(model(x))


def close(a: torch.Tensor, b: torch.Tensor) -> bool:
    return bool(((a - b).norm() <= 1e-4 * b.norm() + 1e-5).item())


def live_by_bn(model, graph) -> dict:
    """The core's own live masks (a killed channel is dead; so is one an earlier surgery kept dead)."""
    masks = live_masks(model, graph)
    return {g.bn: masks[g.id] for g in graph.free_groups()}


def check_cost_and_pruning(model: nn.Module, shape, seed: int, where: str) -> None:
    """cost = weights, FLOPs = counter, and U(θ) = the pruned model's cost, which computes the same."""
    assert utilization(model, shape, "params").total == weights(model), where
    assert utilization(model, shape, "flops").total == train_flops(model, shape), where
    graph = build_graph(model, shape)
    kill_channels(model, graph, 0.5, seed=seed)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
    before = eval_out(model, x)
    pruned = prune(model, shape, live_by_bn(model, graph))
    for c in ("params", "flops"):
        assert utilization(pruned, shape, c).total == utilization(model, shape, c).live, f"{where}: U != pruned {c}"
    assert weights(pruned) == utilization(pruned, shape).total, where
    assert close(eval_out(pruned, x), before), f"{where}: pruning changed the function"


def train_step(model: nn.Module, shape) -> None:
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    out = model(torch.randn(shape))
    loss = sum(o.square().mean() for o in (out if isinstance(out, tuple) else (out,)))
    loss.backward()
    assert torch.isfinite(loss)
    opt.step()


@pytest.mark.parametrize("seed", SEEDS, ids=[f"seed-{s}" for s in SEEDS])
def test_random_net_is_exact_or_refused(seed):
    model, shape, refusal = random_net(seed)
    try:
        build_graph(model, shape)
    except UnsupportedGraphError as exc:
        assert refusal is not None, f"seed {seed}: refused a net the core should take: {exc}"
        assert refusal in str(exc) and "'" in str(exc), f"seed {seed}: the refusal names no node: {exc}"
        return
    assert refusal is None, f"seed {seed}: accepted a net it must refuse ({refusal})"
    model.eval()
    check_cost_and_pruning(copy.deepcopy(model), shape, seed, f"seed {seed}, as built")
    if not build_graph(model, shape).free_groups():
        with pytest.raises(ValueError, match="no free channel group"):
            rejuvenate(model, shape)
        return
    x = torch.randn(shape, generator=torch.Generator().manual_seed(seed + 1))
    for scheme, impl, rescale in VARIANTS[seed % 2::2]:  # NR, CR and CA each seed; the other half next seed
        where = f"seed {seed}, {scheme}/{impl}/rescale={rescale}"
        net = copy.deepcopy(model)
        for round_ in range(2):
            kill_channels(net, build_graph(net, shape), 0.4, seed=seed * 7 + round_)
            before = eval_out(net, x)
            net, rep = rejuvenate(net, shape, 1.0, scheme=scheme, rescale=rescale, impl=impl)
            assert close(eval_out(net, x), before), f"{where}, round {round_ + 1}: function changed"
            assert rep.cost_after == weights(net) == utilization(net, shape).total, where
            assert rep.cost_after <= rep.target, where
            train_step(copy.deepcopy(net), shape)
        check_cost_and_pruning(net, shape, seed + 1000, f"{where}, after two rejuvenations")


def test_the_generator_draws_what_it_claims():
    """Guard against a vacuous fuzz: CI's seeds cover refusals and every padding mode."""
    refused = 0
    seen_modes = set()
    for seed in range(200):  # CI's draws, whatever NR_FUZZ_SEEDS says
        model, shape, refusal = random_net(seed)
        refused += refusal is not None
        for m in model.modules():
            if isinstance(m, nn.Conv2d):
                seen_modes.add(m.padding_mode)
    assert 5 <= refused <= 100
    assert seen_modes == {"zeros", "reflect", "replicate", "circular"}


LIVE_SEEDS = range(*map(int, os.environ.get("NR_FUZZ_LIVE_SEEDS", "0:40").split(":")))


def live_outcomes(seed: int) -> list[str]:
    """Three rejuvenations per scheme on random net ``seed``, each at a target below 1 with a live fraction drawn
    above or below it (some rounds kill nothing: every channel alive after an NR-CR rejuvenation). Each keeps
    every live channel (as many survivors as live channels, per layer) and the function, within the target,
    or refuses naming why. Returns what each did: grew, kept CR's blocks (no growth), or refused."""
    model, shape, _ = random_net(seed, allow_refused=False)
    if not build_graph(model.eval(), shape).free_groups():
        return []
    g = torch.Generator().manual_seed(seed)
    draw = lambda: float(torch.rand(1, generator=g))  # noqa: E731
    x = torch.randn(shape, generator=g)
    constraint = ("params", "flops")[seed % 2]
    base = utilization(model, shape, constraint).total
    outcomes = []
    for scheme in ("nr", "cr", "ca"):
        net = copy.deepcopy(model)
        for round_ in range(3):
            where = f"seed {seed}, {scheme}, round {round_ + 1}"
            graph = build_graph(net, shape)
            kill_channels(net, graph, 0.0 if draw() < 0.25 else 0.8 * draw(), seed=seed + round_)
            live = graph_utilization(net, graph, constraint).live
            ratio = min(0.99, live / base * (0.7 + 0.8 * draw()))  # a target below or above the live channels
            round_to = (1, 1, None, 2, 4)[int(5 * draw())]
            before = eval_out(net, x)
            try:
                new, rep = rejuvenate(net, shape, ratio, constraint, scheme=scheme, rescale=draw() < 0.5,
                                      round_to=round_to, graph=graph)
            except ValueError as exc:
                if "the live channels alone cost" in str(exc):
                    assert live > ratio * base, f"{where}: refused, yet the live channels fit: {exc}"
                else:
                    assert round_to and round_to > 1 and f"round_to: {round_to}:" in str(exc), f"{where}: {exc}"
                outcomes.append("refused")
                continue
            assert close(eval_out(new, x), before), f"{where}: function changed"
            assert rep.survivors == rep.widths_live, f"{where}: live channels removed"
            assert all(rep.widths_after[k] >= n for k, n in rep.widths_live.items()), where
            assert rep.cost_after <= rep.target and (constraint == "flops" or rep.cost_after == weights(new)), where
            if rep.no_growth:
                assert scheme == "cr" and not any(rep.rejuvenated.values()), f"{where}: {rep.no_growth}"
            outcomes.append("kept blocks" if rep.no_growth else "grew")
            net = new
        train_step(copy.deepcopy(net), shape)
    return outcomes


def test_a_rejuvenation_keeps_every_live_channel_or_refuses():
    """Over LIVE_SEEDS (a failure names its seed): the invariant, and every outcome drawn (not a vacuous fuzz)."""
    seen = [o for seed in LIVE_SEEDS for o in live_outcomes(seed)]
    assert seen.count("grew") >= 20 and seen.count("refused") >= 20 and seen.count("kept blocks") >= 1, seen


@pytest.mark.parametrize("seed", LIVE_SEEDS, ids=[f"seed-{s}" for s in LIVE_SEEDS])
def test_rounded_widths_are_maximal(seed):
    """After rounding to multiples of m, no free group can take one more multiple within the budget."""
    model, shape, _ = random_net(seed, allow_refused=False)
    graph = build_graph(model, shape)
    if not graph.free_groups():
        return
    g = torch.Generator().manual_seed(seed)
    kill_channels(model, graph, 0.3 + 0.5 * float(torch.rand(1, generator=g)), seed=seed)
    m = (2, 3, 4, 8)[seed % 4]
    constraint, scheme = ("params", "flops")[seed % 2], ("nr", "cr", "ca")[seed % 3]
    try:
        _, rep = rejuvenate(model, shape, 1.0, constraint, scheme=scheme, round_to=m)
    except ValueError as exc:
        assert f"round_to: {m}:" in str(exc)
        return
    gid = {grp.producer: grp.id for grp in graph.free_groups()}
    w_prime = {gid[k]: n for k, n in rep.widths_live.items()}
    widths = {gid[k]: n for k, n in rep.widths_after.items()}
    assert all(w % m == 0 for w in widths.values())
    for grp in widths:
        more = widths_cost(graph, *split_counts(w_prime, {**widths, grp: widths[grp] + m}), constraint, scheme)
        assert more > rep.target, f"seed {seed}: {grp} could take {m} more ({more} <= {rep.target})"
