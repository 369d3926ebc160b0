"""ReDo and CBP recycle where their rules say and nowhere else (issue 28).

On the core's random nets (tests/randnets.py, the generator of tests/test_nr_fuzz.py) and the hand-made ones of
tests/nets.py: units forced dormant (γ = β = 0 in every BN over them, so their activation is 0 after any of the
generator's activations) are recycled at the next scoring step; at that moment the network computes the same
in eval and in train mode (the outgoing weights are zero); every entry of every parameter, buffer and momentum
buffer outside the recycled units' slices is bit-identical, and the momentum of the recycled slices is zero.
CBP's count of replacements follows its rule (a brute force with explicit per-unit ages) and picks the units of
least utility. Refusals are one line."""
from __future__ import annotations

import contextlib
import copy
import os

import pytest
import torch
import torch.nn as nn

from nr_study.config import config_from_dict
from nr_study.errors import ConfigError, UnsupportedGraphError
from nr_study.methods.cbp import ContinualBackprop
from nr_study.methods.recycling import unit_groups
from nr_study.methods.redo import ReDo
from nr_study.nr import build_graph, zero_optimizer_state
from tests.nets import INPUT, TINY_NETS, kill_channels, randomize_bn, silence
from tests.randnets import random_net

# the core fuzz's nets (its NR_FUZZ_SEEDS widens the draw); 100 by default: a seed takes ~1.5 s on a busy CPU
SEEDS = range(*map(int, os.environ.get("NR_FUZZ_SEEDS", "0:100").split(":")))


def logits(out):
    return out[0] if isinstance(out, tuple) else out


def close(a: torch.Tensor, b: torch.Tensor) -> bool:
    return bool(((a - b).norm() <= 1e-4 * b.norm() + 1e-5).item())


def step(model: nn.Module, opt, x: torch.Tensor) -> None:
    """One training step (train mode, gradients on: the probe records); every output of the net in the loss."""
    model.train()
    opt.zero_grad(set_to_none=True)
    out = model(x)
    loss = sum(o.square().mean() for o in (out if isinstance(out, tuple) else (out,)))
    loss.backward()
    opt.step()


def outputs(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(eval output, train-mode output) of a copy: the model's running statistics stay as they are."""
    m = copy.deepcopy(model)
    with torch.no_grad():
        ev = logits(m.eval()(x))
        tr = logits(m.train()(x))
    return ev, tr


def snapshot(model: nn.Module, opt) -> tuple[dict, dict]:
    params = {k: v.detach().clone() for k, v in model.state_dict().items()}
    named = dict(model.named_parameters())
    mom = {k: opt.state[p]["momentum_buffer"].clone() for k, p in named.items() if "momentum_buffer" in opt.state[p]}
    return params, mom


def slices(model: nn.Module, groups, recycled: dict[int, torch.Tensor]) -> dict[str, tuple[torch.Tensor, dict]]:
    """Per state entry, the mask of what recycling the units `recycled` (group id -> channels) may edit, and
    what each edited slice must hold afterwards: "rows" (new random values: changed), 0, 1 or "momentum 0"."""
    sd = model.state_dict()
    masks = {k: torch.zeros_like(v, dtype=torch.bool) for k, v in sd.items() if v.is_floating_point()}
    expect: dict[str, list] = {}

    def mark(key, sel, value):
        m = torch.zeros_like(masks[key])
        m[sel] = True
        masks[key] |= m
        expect.setdefault(key, []).append((m, value))

    def positions(slot, idx):
        return (idx[:, None] * slot.factor + torch.arange(slot.factor)).flatten() + slot.offset

    for g in groups:
        idx = recycled.get(g.gid)
        if idx is None or not len(idx):
            continue
        for name, pos in [(g.producer, idx)] + [(s.name, positions(s, idx)) for s in g.depthwise]:
            mark(f"{name}.weight", pos, "rows")
            if f"{name}.bias" in sd:
                mark(f"{name}.bias", pos, 0.0)
        for s in g.norms:
            pos = positions(s, idx)
            for attr, value in (("weight", 1.0), ("bias", 0.0), ("running_mean", 0.0), ("running_var", 1.0)):
                if f"{s.name}.{attr}" in masks:
                    mark(f"{s.name}.{attr}", pos, value)
        for s in g.readers:
            mark(f"{s.name}.weight", (slice(None), positions(s, idx)), 0.0)
    return {k: (masks[k], expect.get(k, [])) for k in masks}


def check_recycled_exactly(model, opt, groups, recycled, before, after, where: str) -> None:
    """Recycled where the rule says (fresh rows, BN reset, outgoing zero, momentum zero) and nowhere else."""
    (p0, m0), (p1, m1) = before, after
    edits = slices(model, groups, recycled)
    for key in set(p0) - set(edits):  # integer buffers (num_batches_tracked): never edited
        assert torch.equal(p1[key], p0[key]), f"{where}: {key} changed"
    for key, (mask, expect) in edits.items():
        assert torch.equal(p1[key][~mask], p0[key][~mask]), f"{where}: {key} changed outside the recycled units"
        for sel, value in expect:
            if value == "rows":
                assert not torch.equal(p1[key][sel], p0[key][sel]), f"{where}: {key}: incoming weights not renewed"
            else:
                assert bool((p1[key][sel] == value).all()), f"{where}: {key}: recycled entries are not {value}"
        if key in m0:
            assert torch.equal(m1[key][~mask], m0[key][~mask]), f"{where}: momentum of {key} changed elsewhere"
            assert bool((m1[key][mask] == 0).all()), f"{where}: momentum of {key} not zeroed where recycled"


@contextlib.contextmanager
def zero_units(model: nn.Module, groups):
    """The units whose input to their first reader is exactly 0 on the next forward (group id -> channels): the
    test's own reading of the reader inputs, kept whole, independent of the method's reduction."""
    mods, zero, handles = dict(model.named_modules()), {}, []

    def capture(gid, slot, width):
        def hook(module, args):
            seg = args[0].detach().narrow(1, slot.offset, width * slot.factor)
            per = seg.reshape(seg.shape[0], width, -1) if seg.dim() == 2 else seg.transpose(0, 1).reshape(width, -1).T
            zero[gid] = torch.nonzero((per == 0).reshape(per.shape[0], width, -1).all(2).all(0)).flatten()
        return hook

    for g in groups:
        handles.append(mods[g.readers[0].name].register_forward_pre_hook(capture(g.gid, g.readers[0], g.width)))
    try:
        yield zero
    finally:
        for h in handles:
            h.remove()


def redo_case(model: nn.Module, shape: tuple, seed: int, where: str) -> None:
    """Kill 40 % of every free group's channels, score them at the next step with ReDo (τ = 0: exactly the units
    whose activation is 0 on the batch), and check what recycling did."""
    cfg = config_from_dict({"method": "ReDo", "redo": {"tau": 0.0, "every": 1}})
    redo = ReDo(cfg, shape)
    redo.on_fit_start(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    redo.on_optimizer(opt)
    gen = torch.Generator().manual_seed(seed)
    step(model, opt, torch.randn(shape, generator=gen))  # momentum everywhere; weights moved
    redo.probe.take()  # that step scored nothing (end_of_step not called): forget its reduction
    dead = kill_channels(model, build_graph(model, shape), 0.4, seed=seed)
    for g in opt.param_groups:  # the scoring step: momentum updated, weights kept, so the killed stay dead
        g["lr"] = 0.0
    x = torch.randn(shape, generator=gen)
    with zero_units(model, redo.groups) as zero:
        step(model, opt, x)
    before, out_before = snapshot(model, opt), outputs(model, x)
    redo.end_of_step()
    after, out_after = snapshot(model, opt), outputs(model, x)
    for gid, idx in dead.items():
        assert set(idx.tolist()) <= set(zero[gid].tolist()), f"{where}: a unit forced dormant is not 0 at its reader"
    n_zero = sum(len(v) for v in zero.values())  # forced, and any a batch of two leaves at 0 (a BN1d unit)
    assert redo.recycled == n_zero, f"{where}: recycled {redo.recycled} units, {n_zero} were 0 on the batch"
    assert close(out_after[0], out_before[0]), f"{where}: recycling changed the eval-mode function"
    assert close(out_after[1], out_before[1]), f"{where}: recycling changed the train-mode function"
    check_recycled_exactly(model, opt, redo.groups, zero, before, after, where)


@pytest.mark.parametrize("seed", SEEDS, ids=[f"seed-{s}" for s in SEEDS])
def test_redo_recycles_the_dormant_units_of_a_random_net_and_nothing_else(seed):
    model, shape, _ = random_net(seed, allow_refused=False)
    try:
        graph = build_graph(model, shape)
    except UnsupportedGraphError:
        return  # the core refuses it (test_nr_fuzz checks why)
    if not graph.free_groups():
        with pytest.raises(ConfigError, match=r"^method ReDo: .* has no prunable channels .*allowed here: method BL$"):
            unit_groups(model, shape, "ReDo", "random")
        return
    redo_case(model, shape, seed, f"seed {seed}")


@pytest.mark.parametrize("name", list(TINY_NETS))
def test_redo_on_the_hand_made_nets(name):
    """Flatten into a hidden Linear + BN1d (factor 16), residual blocks, concatenations, depthwise convs."""
    torch.manual_seed(0)
    model = TINY_NETS[name]()
    randomize_bn(model)
    redo_case(model, INPUT, 7, name)


def test_redo_scores_only_every_period_with_hooks_only_on_scoring_steps():
    torch.manual_seed(0)
    model = TINY_NETS["plain_vgg"]()
    cfg = config_from_dict({"method": "ReDo", "redo": {"tau": 1.0, "every": 3}})  # τ = 1: about half recycled
    redo = ReDo(cfg, INPUT)
    redo.on_fit_start(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    redo.on_optimizer(opt)
    attached, counts = [redo.probe.attached], []
    for _ in range(7):
        step(model, opt, torch.randn(INPUT))
        redo.end_of_step()
        attached.append(redo.probe.attached)
        counts.append(redo.recycled)
    assert attached == [False, False, True, False, False, True, False, False]  # before steps 1..7, after 7
    assert counts[0] == counts[1] == 0 < counts[2] == counts[3] == counts[4] < counts[5] == counts[6]
    assert 0 < redo.metrics()["dormant"] < 1


def kill(model: nn.Module, graph, counts: dict[int, int], seed: int) -> dict[int, torch.Tensor]:
    """counts[g] channels of each free group g made dormant: γ = β = 0 in every BN over them."""
    g = torch.Generator().manual_seed(seed)
    dead = {gid: torch.randperm(graph.groups[gid].width, generator=g)[:n].sort().values for gid, n in counts.items()}
    return silence(model, graph, dead)


def cbp(model, shape, **kw) -> ContinualBackprop:
    cfg = config_from_dict({"method": "CBP", "cbp": kw})
    m = ContinualBackprop(cfg, shape)
    m.on_fit_start(model)
    return m


@pytest.mark.parametrize("name", ["plain_vgg", "tiny_mobile", "tiny_dense"])
def test_cbp_replaces_the_dormant_units_first_once_mature(name):
    """As many channels per free group killed as CBP replaces there at the first step after maturity
    (int(ρ · width)): they have utility 0, so exactly they are replaced, the function unchanged at that moment
    (a live unit replaced would take its contribution with it); nothing is replaced before maturity."""
    torch.manual_seed(0)
    model = TINY_NETS[name]()
    randomize_bn(model)
    graph = build_graph(model, INPUT)
    widths = {g.id: g.width for g in graph.free_groups()}
    m, rho = 3, 1.0 / min(widths.values())  # at step m + 1 every unit is mature: int(ρ · width) >= 1 replaced
    method = cbp(model, INPUT, replacement_rate=rho, maturity=m)
    opt = torch.optim.SGD(model.parameters(), lr=0.0, momentum=0.9)  # lr 0: the killed stay dead
    method.on_optimizer(opt)
    dead = kill(model, graph, {gid: int(rho * w) for gid, w in widths.items()}, seed=3)
    gen = torch.Generator().manual_seed(1)
    for t in range(1, m + 1):
        step(model, opt, torch.randn(INPUT, generator=gen))
        method.end_of_step()
        assert method.recycled == 0, f"step {t}: replaced before maturity"
    x = torch.randn(INPUT, generator=gen)
    step(model, opt, x)
    before, out_before = snapshot(model, opt), outputs(model, x)
    method.end_of_step()
    after, out_after = snapshot(model, opt), outputs(model, x)
    assert close(out_after[0], out_before[0]) and close(out_after[1], out_before[1])
    replaced = {g.gid: torch.nonzero(b == m + 1).flatten() for g, b in zip(method.groups, method.born)}
    assert {k: v.tolist() for k, v in replaced.items()} == {k: v.tolist() for k, v in dead.items()}
    assert method.recycled == sum(int(rho * w) for w in widths.values()) > len(widths)
    check_recycled_exactly(model, opt, method.groups, replaced, before, after, name)
    assert all(bool((u[i] == 0).all()) for u, i in zip(method.util, replaced.values()))


def test_cbp_replacement_count_follows_the_rule():
    """Per group and step: ages + 1; mature = age > m; acc += ρ · mature; replace int(acc) mature units (age 0).
    A brute force with explicit ages (the loss-of-plasticity code's bookkeeping) against CBP's host-side count."""
    torch.manual_seed(0)
    model = TINY_NETS["tiny_mobile"]()
    rho, m, steps = 0.07, 5, 40
    method = cbp(model, INPUT, replacement_rate=rho, maturity=m)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    method.on_optimizer(opt)
    ages = [torch.zeros(g.width) for g in method.groups]
    acc = [0.0] * len(ages)
    want, got = 0, []
    expected = []
    for _ in range(steps):
        step(model, opt, torch.randn(INPUT))
        method.end_of_step()
        got.append(method.recycled)
        for i, a in enumerate(ages):
            a += 1
            mature = torch.nonzero(a > m).flatten()
            acc[i] += rho * len(mature)
            k = int(acc[i])
            acc[i] -= k
            a[mature[:k]] = 0  # which mature units does not change the count
            want += k
        expected.append(want)
    assert got == expected and got[-1] > 0
    # what the method says of its units' ages agrees with the brute force
    for a, b in zip(ages, method.born):
        assert sorted((steps - b).tolist()) == sorted(a.long().tolist())


def test_cbp_state_round_trips_exactly():
    torch.manual_seed(0)
    model = TINY_NETS["plain_vgg"]()
    method = cbp(model, INPUT, replacement_rate=0.05, maturity=2)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    method.on_optimizer(opt)
    for _ in range(6):
        step(model, opt, torch.randn(INPUT))
        method.end_of_step()
    state = method.state_dict()
    other = ContinualBackprop(method.cfg, INPUT)
    other.load_state_dict(state)
    other.on_fit_start(model)
    assert other.state_dict() == state and other.step == 6 and other.recycled == method.recycled > 0
    assert all(torch.equal(a, b) for a, b in zip(other.util, method.util))


@pytest.mark.parametrize("kind", ["sgd", "adam"])
def test_zero_optimizer_state_zeroes_only_the_slices(kind):
    w = nn.Parameter(torch.randn(4, 3, 2, 2))
    opt = torch.optim.SGD([w], lr=0.1, momentum=0.9) if kind == "sgd" else torch.optim.Adam([w], lr=0.1)
    zero_optimizer_state(opt, w, torch.tensor([1]), 0)  # no state yet: nothing to do, nothing created
    assert w not in opt.state or not opt.state[w]
    w.grad = torch.randn_like(w)
    opt.step()
    before = {k: v.clone() for k, v in opt.state[w].items()}
    zero_optimizer_state(opt, w, torch.tensor([0, 2]), 1)
    for k, v in opt.state[w].items():
        if v.shape == w.shape:
            assert bool((v[:, [0, 2]] == 0).all()) and torch.equal(v[:, 1], before[k][:, 1])
            assert bool((v[:, 1] != 0).all())
        else:  # Adam's step count: not per entry, left alone
            assert torch.equal(v, before[k])


@pytest.mark.parametrize("method", ["ReDo", "CBP"])
def test_a_model_with_nothing_to_recycle_is_refused_in_one_line(method):
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 14 * 14, 10))
    cls = {"ReDo": ReDo, "CBP": ContinualBackprop}[method]
    with pytest.raises(ConfigError) as exc:
        cls(config_from_dict({"method": method}), INPUT).on_fit_start(model)
    msg = str(exc.value)
    assert "\n" not in msg and msg.startswith(f"method {method}: ") and msg.endswith("allowed here: method BL")


def test_split_convolutions_are_refused_in_one_line():
    from nr_study.nr import split_to_ca

    model = split_to_ca(TINY_NETS["plain_vgg"](), INPUT)
    with pytest.raises(ConfigError, match=r"^method ReDo: model 'x' has a split convolution \('features\.1\.0', .*; "
                                          r"allowed: a model without split convs$"):
        unit_groups(model, INPUT, "ReDo", "x")


@pytest.mark.parametrize("key, value, says", [
    ("redo.tau", -0.1, "redo.tau: -0.1 is out of range; allowed: tau >= 0"),
    ("redo.every", 0, "redo.every: 0 is out of range; allowed: every >= 1"),
    ("cbp.replacement_rate", 0, "cbp.replacement_rate: 0.0 is out of range; allowed: 0 < replacement_rate <= 1"),
    ("cbp.replacement_rate", 1.5, "cbp.replacement_rate: 1.5 is out of range; allowed: 0 < replacement_rate <= 1"),
    ("cbp.maturity", -1, "cbp.maturity: -1 is out of range; allowed: maturity >= 0"),
    ("cbp.decay", 1.0, "cbp.decay: 1.0 is out of range; allowed: 0 <= decay < 1"),
    ("cbp.rate", 0.1, "cbp.rate: unknown key; did you mean 'cbp.maturity'?"),
])
def test_bad_values_are_one_line_naming_key_value_and_allowed(key, value, says):
    section, field = key.split(".")
    with pytest.raises(ConfigError) as exc:
        config_from_dict({"method": "CBP", section: {field: value}})
    assert str(exc.value) == says


def test_recycling_is_logged_and_plotted(tracking_uri, tmp_path):
    """End to end: ReDo and CBP runs log `recycled` and `dormant` each epoch to MLflow, and `nr-study plots`'
    recycling figure draws them beside the BL run of the same table."""
    from nr_study.analysis.plots import plot_recycling
    from nr_study.analysis.runs import RunStore
    from nr_study.train import train

    base = {"model": {"name": "vgg_small", "kwargs": {"width": 8}},
            "data": {"name": "synthetic", "n_train": 256, "n_test": 64},
            "train": {"epochs": 2, "batch_size": 32, "threads": 1},
            "tracking": {"experiment": "recyclers-plot", "tags": {"nr.table": "recyclers_test"}},
            "redo": {"tau": 1.0, "every": 3}, "cbp": {"replacement_rate": 0.02, "maturity": 2}}
    for method in ("BL", "ReDo", "CBP"):
        train({**base, "method": method}, tracking_uri=tracking_uri, progress=False)
    runs = RunStore(tracking_uri, ["recyclers-plot"]).finished()
    res = plot_recycling(runs, tmp_path)
    assert {p.suffix for p in res.files} == {".png", ".svg"}
    assert len(res.data) == 3 and sum(v["baseline"] for v in res.data.values()) == 1
    for v in res.data.values():
        assert v["epoch"] == [1, 2] and len(v["top1_acc"]) == 2
        if not v["baseline"]:
            assert 0 < v["recycled"][0] < v["recycled"][1] and all(0 <= d <= 1 for d in v["dormant"])
