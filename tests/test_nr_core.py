"""Invariants of the method (DESIGN.md §3/§5) on small nets covering every graph pattern."""
from __future__ import annotations

import copy
import dataclasses
import math
import zlib

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from nr_study.errors import UnsupportedGraphError
from nr_study.models import create_model
from nr_study.nr import (CAConv, CRConv, LambdaController, NeuralRejuvenation, NRConfig, apply_architecture,
                         architecture_spec, build_graph, prune, rejuvenate, split_to_ca, utilization)
from nr_study.nr.cost import live_masks, widths_cost
from nr_study.nr.surgery import expansion_widths, rounded_widths, solve_alpha, split_counts
from tests.nets import INPUT, TINY_NETS, ShuffleNet, kill_channels, randomize_bn, weight_params

NETS = sorted(TINY_NETS)


def make(name, seed=0):
    torch.manual_seed(seed)
    model = TINY_NETS[name]()
    randomize_bn(model, seed)
    return model.eval()


def flops_of(model, shape):
    """Multiply-adds of one image (the flop counter reports 2·MACs for the whole batch)."""
    counter = FlopCounterMode(display=False)
    was_training = model.training
    with counter, torch.no_grad():
        model.eval()(torch.zeros((1,) + tuple(shape[1:])))
    model.train(was_training)
    return counter.get_total_flops() // 2


@pytest.mark.parametrize("name", NETS)
def test_all_live_cost_matches_real_model(name):
    model = make(name)
    assert utilization(model, INPUT, "params").total == weight_params(model)
    assert utilization(model, INPUT, "flops").total == flops_of(model, INPUT)
    assert utilization(model, INPUT).ratio == 1.0


@pytest.mark.parametrize("name", NETS)
@pytest.mark.parametrize("constraint", ["params", "flops"])
def test_utilization_equals_physically_pruned_cost(name, constraint):
    model = make(name)
    graph = build_graph(model, INPUT)
    dead = kill_channels(model, graph, 0.4, seed=1)
    u = utilization(model, INPUT, constraint)
    assert u.live < u.total
    keep = {}
    for g in graph.free_groups():
        mask = torch.ones(g.width, dtype=torch.bool)
        mask[dead[g.id]] = False
        keep[g.bn] = mask
    pruned = prune(model, INPUT, keep)
    assert utilization(pruned, INPUT, constraint).total == u.live
    if constraint == "params":
        assert weight_params(pruned) == u.live
    else:
        assert flops_of(pruned, INPUT) == u.live
    with torch.no_grad():  # removing dead channels does not change the function
        x = torch.randn(INPUT)
        torch.testing.assert_close(pruned(x), model(x), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", NETS)
@pytest.mark.parametrize("constraint", ["params", "flops"])
@pytest.mark.parametrize("ratio", [1.0, 0.5])
@pytest.mark.parametrize("scheme", ["nr", "cr"])
def test_alpha_is_maximal_under_target(name, constraint, ratio, scheme):
    model = make(name)
    graph = build_graph(model, INPUT)
    kill_channels(model, graph, 0.7, seed=2)  # the live channels fit the 0.5 target on every net
    base = utilization(model, INPUT, constraint).total
    new, rep = rejuvenate(model, INPUT, ratio, constraint, scheme=scheme)
    target = ratio * base
    assert rep.cost_after <= target
    assert utilization(new, INPUT, constraint).total == rep.cost_after
    # one more step of α (the next width breakpoint) exceeds the target
    w_prime = {g.id: rep.widths_live[g.producer] for g in graph.free_groups()}
    widths = expansion_widths(w_prime, rep.alpha)
    assert widths == {g.id: rep.widths_after[g.producer] for g in graph.free_groups()}
    nxt = min((math.floor(rep.alpha * w) + 1) / w for w in w_prime.values())
    assert widths_cost(graph, *split_counts(w_prime, expansion_widths(w_prime, nxt)), constraint, scheme) > target


@pytest.mark.parametrize("name", NETS)
@pytest.mark.parametrize("scheme", ["nr", "cr", "ca"])
@pytest.mark.parametrize("rescale", [False, True])
def test_function_preserved_over_three_rejuvenations(name, scheme, rescale):
    model = make(name)
    x = torch.randn(INPUT)
    base = utilization(model, INPUT).total
    for round_ in range(3):
        graph = build_graph(model, INPUT)
        kill_channels(model, graph, 0.4, seed=10 + round_)
        with torch.no_grad():
            before = model(x)
        model, rep = rejuvenate(model, INPUT, 1.0, "params", scheme=scheme, rescale=rescale)
        model.eval()
        with torch.no_grad():
            after = model(x)
        rel = (after - before).norm() / before.norm()
        assert rel < 1e-4, f"round {round_}: relative error {rel:.2e}"
        assert sum(rep.rejuvenated.values()) > 0
        assert rep.cost_after <= base
        assert utilization(model, INPUT).total == rep.cost_after
        assert weight_params(model) == rep.cost_after  # split convs hold plain Conv2d blocks: all counted


def test_rescaling_restores_gamma0_and_counts():
    model = make("plain_vgg")
    graph = build_graph(model, INPUT)
    kill_channels(model, graph, 0.3, seed=3)
    new, rep = rejuvenate(model, INPUT, 1.0, rescale=True, gamma_new=1.0)  # new channels at γ0 too: every γ >= 1
    assert rep.rescaled_channels > 0
    for m in new.modules():
        if isinstance(m, nn.BatchNorm2d):
            assert (m.weight.detach().abs() >= 1.0 - 1e-6).all()


def test_rescaling_skipped_with_reason_where_not_exact():
    model = make("tiny_mobile")
    graph = build_graph(model, INPUT)
    kill_channels(model, graph, 0.3, seed=3)
    _, rep = rejuvenate(model, INPUT, 1.0, rescale=True)
    assert any("depthwise" in r or "BatchNorm" in r for r in rep.rescale_skipped.values())


def test_graph_fixed_groups_and_units():
    graph = build_graph(TINY_NETS["tiny_resnet"](), INPUT)
    by_name = {g.producer: g for g in graph.groups.values()}
    assert by_name["a.0.0"].free and by_name["a.1.0"].free
    assert by_name["a.2"].fixed and by_name["stem.0"].fixed and by_name["down.0"].fixed
    assert "coupled" in by_name["a.2"].fixed_reason
    assert by_name["fc"].fixed_reason == "network output"
    dense = build_graph(TINY_NETS["tiny_dense"](), INPUT)
    trans = next(layer for layer in dense.layers if layer.name == "trans.0")
    assert len(trans.in_layout) == 3  # stem + two dense layers, concatenated


def test_refused_graph_names_the_node():
    with pytest.raises(UnsupportedGraphError, match="node '.*(view|transpose)"):
        build_graph(ShuffleNet(), INPUT)


def test_input_size_the_model_cannot_take():
    with pytest.raises(UnsupportedGraphError, match="cannot take an input of shape"):
        build_graph(TINY_NETS["plain_vgg"](), (1, 3, 8, 8))


def _four_conv_reference(m: CAConv, x):
    xs, xr = x[:, m.s_idx], x[:, m.r_idx]
    conv = lambda t, w: F.conv2d(t, w, None, m.stride, m.padding, m.dilation)  # noqa: E731
    w_ss, w_sr = m.inner.weight, m.w_sr.weight
    w_rs, w_rr = m.w_r.weight[: m.s_out], m.w_r.weight[m.s_out:]
    a_s, a_r = conv(xs, w_ss), conv(xr, w_rr)
    s = a_s + 2 * torch.sigmoid(a_s) * conv(xr, w_rs)
    r = a_r + 2 * torch.sigmoid(a_r) * conv(xs, w_sr)
    return torch.cat([s, r], 1)


def test_ca_equals_four_convolution_reference_and_grads_reach_r():
    model = make("tiny_dense")
    graph = build_graph(model, INPUT)
    kill_channels(model, graph, 0.4, seed=4)
    new, _ = rejuvenate(model, INPUT, 1.0, scheme="ca")
    cas = [m for m in new.modules() if isinstance(m, CAConv)]
    assert cas
    for m in cas:  # random cross weights so every block matters
        with torch.no_grad():
            for p in m.parameters():
                p.normal_(0, 0.1)
    full = [m for m in cas if isinstance(m.inner, nn.Conv2d) and m.w_sr is not None and m.w_r is not None]
    assert full, "no CA layer with all four blocks to compare"
    for m in full:
        x = torch.randn(2, m.in_channels, 8, 8)
        ref = _four_conv_reference(m, x)
        torch.testing.assert_close(m(x), ref, rtol=1e-5, atol=1e-5)
        m.impl = "four"
        torch.testing.assert_close(m(x), ref, rtol=1e-5, atol=1e-5)
        m.impl = "two"
    new.train()
    new(torch.randn(INPUT)).square().mean().backward()
    for m in cas:
        if m.w_r is not None:
            assert m.w_r.weight.grad.abs().sum() > 0


def test_cr_has_no_cross_parameters_and_grads_reach_r():
    model = make("plain_vgg")
    graph = build_graph(model, INPUT)
    kill_channels(model, graph, 0.5, seed=5)
    new, rep = rejuvenate(model, INPUT, 1.0, scheme="cr")
    crs = [m for m in new.modules() if isinstance(m, CRConv)]
    assert crs
    for m in crs:
        k = m.conv_s.kernel_size[0] * m.conv_s.kernel_size[1]
        n = sum(p.numel() for p in m.parameters())
        assert n == (len(m.s_idx) * m.s_out + len(m.r_idx) * m.r_out) * k
    assert weight_params(new) == rep.cost_after  # CR's Conv2d children are exactly the counted blocks
    # W_R->S = 0 everywhere, so R gets its first gradient once the head's new columns have moved: two steps
    new.train()
    opt = torch.optim.SGD(new.parameters(), lr=0.1)
    x, y = torch.randn(INPUT), torch.tensor([1, 2])
    for _ in range(2):
        opt.zero_grad()
        F.cross_entropy(new(x), y).backward()
        opt.step()
    for m in crs:
        assert m.conv_r.weight.grad.abs().sum() > 0


def test_bl_ca_keeps_params():
    model = make("plain_vgg")
    n = weight_params(model)
    split_to_ca(model, INPUT)
    cas = [m for m in model.modules() if isinstance(m, CAConv)]
    assert len(cas) == 2  # the convs between two free groups (the first conv reads the image)
    assert utilization(model, INPUT).total == n == weight_params(model)  # same parameters, only the CA form
    model.train()(torch.randn(INPUT)).sum().backward()


def test_architecture_spec_round_trip_after_surgery():
    for scheme in ("nr", "cr", "ca"):
        model = make("tiny_dense")
        for seed in (6, 7):
            kill_channels(model, build_graph(model, INPUT), 0.4, seed=seed)
            model, _ = rejuvenate(model, INPUT, 1.0, scheme=scheme)
        spec = architecture_spec(model)
        fresh = TINY_NETS["tiny_dense"]()
        apply_architecture(fresh, spec)
        fresh.load_state_dict(model.state_dict())
        fresh.eval()
        model.eval()
        x = torch.randn(INPUT)
        with torch.no_grad():
            torch.testing.assert_close(fresh(x), model(x))
        assert fresh.nr_base_cost == model.nr_base_cost


def test_repeated_compression_is_relative_to_first_cost():
    model = make("plain_vgg")
    base = utilization(model, INPUT).total
    for seed in (8, 9):  # enough dead that the live channels fit the target (a rejuvenation keeps them all)
        kill_channels(model, build_graph(model, INPUT), 0.5, seed=seed)
        model, rep = rejuvenate(model, INPUT, 0.5)
        assert rep.target == int(0.5 * base)
        assert rep.cost_after <= 0.5 * base


def test_nr_ip_keeps_widths():
    model = make("plain_vgg")
    graph = build_graph(model, INPUT)
    kill_channels(model, graph, 0.4, seed=11)
    widths = {g.producer: g.width for g in graph.free_groups()}
    _, rep = rejuvenate(model, INPUT, realloc=False)
    assert rep.widths_after == widths
    assert all(rep.rejuvenated[k] == widths[k] - rep.widths_live[k] for k in widths)


# -- the λ controller --------------------------------------------------------------------------------------

def test_lambda_rules():
    c = LambdaController(delta_r=0.01, delta_lambda=1e-4)
    assert c.lam == 0
    c.update(1.0)  # first check: nothing to compare with, so r did not fall: grow
    assert c.lam == pytest.approx(1e-4)
    c.update(0.95)  # fell by more than Δr: keep
    assert c.lam == pytest.approx(1e-4)
    c.update(0.945)  # fell by less than Δr: grow
    assert c.lam == pytest.approx(2e-4)
    c.reset()
    assert c.lam == 0 and c.prev_r is None
    capped = LambdaController(delta_lambda=1.0, lambda_max=1.5)
    for _ in range(3):
        capped.update(1.0)
    assert capped.lam == 1.5
    fixed = LambdaController(mode="fixed", fixed=2e-4)
    fixed.update(1.0)
    fixed.update(1.0)
    assert fixed.lam == 2e-4


def test_hook_reaches_tr_in_bounded_checks_and_resets_lambda():
    """Training with the L1 pressure drives r under Tr within (1 − Tr)/Δr + O(1) checks once λ has grown."""
    torch.manual_seed(0)
    model = TINY_NETS["plain_vgg"]()
    cfg = NRConfig(tr=0.6, delta_r=0.02, delta_lambda=2e-3, delta_t=5, delta_t_unit="step", max_rejuvenations=1,
                   rescale=True)
    hook = NeuralRejuvenation(model, INPUT, cfg)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    x, y = torch.randn(32, 3, 16, 16), torch.randint(0, 10, (32,))
    report, keeps, grows = None, 0, 0
    for _ in range(2000):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        hook.after_backward()
        opt.step()
        lam_before = hook.lam.lam
        report = hook.end_of_step()
        if report:
            break
        if hook.step % cfg.delta_t == 0:
            keeps += hook.lam.lam == lam_before
            grows += hook.lam.lam > lam_before
    assert report is not None, "r never reached Tr"
    # every check where λ was kept lowered r by more than Δr, so there are at most (1 − Tr)/Δr of them
    assert keeps <= (1 - cfg.tr) / cfg.delta_r + 1
    assert grows >= 1
    assert report["ratio"] < cfg.tr
    assert hook.lam.lam == 0 and hook.rejuvenations == 1
    assert not hook.flag_on  # max_rejuvenations reached: the NR flag stays off
    # with rescaling every survivor is back at |γ| >= γ0, the new channels start at γ0: all alive
    assert hook.metrics()["util_params"] == 1.0
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    F.cross_entropy(model(x), y).backward()  # the rebuilt model trains
    opt.step()


def test_hook_state_round_trip():
    model = make("plain_vgg").train()
    hook = NeuralRejuvenation(model, INPUT, NRConfig(delta_t_unit="step", delta_t=1))
    for _ in range(3):
        hook.end_of_step()
    state = hook.state_dict()
    other = NeuralRejuvenation(model, INPUT, NRConfig(delta_t_unit="step", delta_t=1))
    other.load_state_dict(state)
    assert other.state_dict() == state


def test_config_errors_name_the_field():
    with pytest.raises(ValueError, match=r"nr\.tr: 1.5 is not allowed; allowed: 0 < tr < 1"):
        NRConfig(tr=1.5)
    with pytest.raises(ValueError, match="scheme"):
        rejuvenate(make("plain_vgg"), INPUT, scheme="xx")


@pytest.mark.parametrize("name", NETS)
@pytest.mark.parametrize("constraint", ["params", "flops"])
@pytest.mark.parametrize("scheme", ["nr", "cr"])
def test_rounded_widths_fill_the_budget_in_multiples(name, constraint, scheme):
    """Over random dead sets, targets and multiples: widths in multiples of m, none below its floor(α·w'/m)·m nor
    its live channels, under the target, and maximal (no group can take m more); None only where even those
    starting widths exceed the target; rejuvenate builds exactly these widths and says the multiple, or refuses
    where the live channels alone exceed the target (it never removes one)."""
    gen = torch.Generator().manual_seed(zlib.crc32(f"{name}/{constraint}/{scheme}".encode()))
    filled = 0
    for case in range(8):
        model = make(name, seed=case)
        graph = build_graph(model, INPUT)
        kill_channels(model, graph, float(torch.rand(1, generator=gen)) * 0.7, seed=case)
        ratio = float(torch.rand(1, generator=gen)) * 0.4 + 0.6
        m = (2, 3, 4, 8)[int(torch.randint(0, 4, (1,), generator=gen))]
        target = ratio * utilization(model, INPUT, constraint).total
        masks = live_masks(model, graph, 0.01)
        w_prime = {g.id: int(masks[g.id].sum()) for g in graph.free_groups()}
        cost = lambda w: widths_cost(graph, *split_counts(w_prime, w), constraint, scheme)  # noqa: E731
        if cost(w_prime) > target:
            with pytest.raises(ValueError, match="the live channels alone cost"):
                rejuvenate(model, INPUT, ratio, constraint, scheme=scheme, round_to=m)
            continue
        alpha = solve_alpha(graph, w_prime, target, constraint, scheme)
        widths = rounded_widths(graph, w_prime, alpha, m, target, constraint, scheme)
        start = {g: max(f, m * math.ceil(w_prime[g] / m)) for g, f in expansion_widths(w_prime, alpha, m).items()}
        if widths is None:
            assert cost(start) > target
            with pytest.raises(ValueError, match=f"round_to: {m}: widths in multiples of {m}"):
                rejuvenate(model, INPUT, ratio, constraint, scheme=scheme, round_to=m)
            continue
        filled += 1
        assert cost(widths) <= target
        for g, w in widths.items():
            assert w % m == 0 and w >= start[g]
            assert cost({**widths, g: w + m}) > target, (case, g)  # maximal: not one more multiple fits
        _, rep = rejuvenate(model, INPUT, ratio, constraint, scheme=scheme, round_to=m)
        assert rep.widths_after == {g.producer: widths[g.id] for g in graph.free_groups()}
        assert rep.round_to == m and rep.cost_after <= target
    assert filled >= 3  # most cases fit: the properties above were checked, not skipped


def test_round_to_null_is_eight_where_it_fits_else_exact():
    """The hook's default (nr.round_to null): multiples of 8 where they meet the budget, exact widths where the
    net is too narrow for them; the report says which. An explicit multiple that cannot fit is refused."""
    def net(a, b):
        return nn.Sequential(nn.Conv2d(3, a, 3, padding=1, bias=False), nn.BatchNorm2d(a), nn.ReLU(),
                             nn.Conv2d(a, b, 3, padding=1, bias=False), nn.BatchNorm2d(b), nn.ReLU(),
                             nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(b, 10))

    for model, multiple in ((net(32, 48), 8), (net(4, 6), 1)):  # 8 + 8 channels cost more than 4 + 6
        graph = build_graph(model, INPUT)
        kill_channels(model, graph, 0.3, seed=3)
        _, rep = rejuvenate(model, INPUT, 1.0, round_to=None)
        assert rep.round_to == multiple
        assert all(w % multiple == 0 for w in rep.widths_after.values())
        assert rep.cost_after <= rep.target
    model = make("tiny_mobile")
    kill_channels(model, build_graph(model, INPUT), 0.5, seed=1)
    with pytest.raises(ValueError, match=r"round_to: 64: .*allowed: a smaller round_to"):
        rejuvenate(model, INPUT, 1.0, round_to=64)
    # the hook refuses it up front where no rejuvenation could meet it (every layer at 8 is over the budget)
    with pytest.raises(ValueError, match=r"nr\.round_to: 8: with every layer at its least \(8 channels\)"):
        NeuralRejuvenation(net(4, 6), INPUT, NRConfig(round_to=8))
    NeuralRejuvenation(net(32, 48), INPUT, NRConfig(round_to=8))
    # under NR-CR new channels drop their cross blocks, so m channels can cost less than m dense ones: no
    # refusal up front where a rejuvenation meets the budget (one live channel per layer, 7 new ones)
    cfg = NRConfig(round_to=8, scheme="cr", target_ratio=0.4, constraint="flops", tr=0.4)
    model = create_model("vgg_small", num_classes=10, in_channels=3, width=8)
    with pytest.raises(ValueError, match=r"nr\.round_to: 8: with every layer at its least"):
        NeuralRejuvenation(copy.deepcopy(model), (1, 3, 16, 16), dataclasses.replace(cfg, scheme="nr"))
    NeuralRejuvenation(copy.deepcopy(model), (1, 3, 16, 16), cfg)
    for bn in (m for m in model.modules() if isinstance(m, nn.BatchNorm2d)):
        with torch.no_grad():
            bn.weight[1:] = 0.0
    _, rep = rejuvenate(model, (1, 3, 16, 16), 0.4, "flops", scheme="cr", round_to=8)
    assert rep.round_to == 8 and rep.cost_after <= rep.target


@pytest.mark.parametrize("scheme", ["nr", "cr", "ca"])
def test_a_single_surviving_first_channel(scheme):
    """A group shrinking to its own first channel is still a change (regression: it was taken for identity)."""
    model = make("plain_vgg")
    graph = build_graph(model, INPUT)
    keep = {g.bn: torch.arange(g.width) < 1 for g in graph.free_groups()}
    pruned = prune(model, INPUT, keep)
    assert pruned(torch.randn(INPUT)).shape == (2, 10)
    assert all(g.width == 1 for g in build_graph(pruned, INPUT).free_groups())
    assert weight_params(pruned) == utilization(pruned, INPUT).total < weight_params(model)
    modules = dict(model.named_modules())
    with torch.no_grad():  # every layer but its first channel dead
        for g in graph.free_groups():
            modules[g.bn].weight[1:] = 0
            modules[g.bn].bias[1:] = 0
    new, rep = rejuvenate(model, INPUT, 1.0, scheme=scheme, realloc=False)
    assert all(v == 1 for v in rep.survivors.values())
    assert new(torch.randn(INPUT)).shape == (2, 10)
