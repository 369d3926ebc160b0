"""NR-CR's two classifiers (nr.cr_heads: separate, the official code's training), the two-halves control BL-2H,
and the new channels' init options (nr.gamma_new, nr.new_head_init)."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from nr_study.errors import ConfigError
from nr_study.models import create_model
from nr_study.nr import build_graph, rejuvenate, utilization
from nr_study.nr.heads import SplitHeads, check_two_heads
from nr_study.nr.splits import split_halves
from nr_study.train import train
from tests.nets import PlainVGG, TinyResNet, kill_channels

SHAPE = (4, 1, 28, 28)


def cr_rejuvenated(seed: int, rounds: int = 1):
    torch.manual_seed(seed)
    model = create_model("vgg_small", num_classes=10, in_channels=1, width=8)
    for r in range(rounds):
        kill_channels(model, build_graph(model, SHAPE), 0.5, seed=seed * 10 + r)
        model, rep = rejuvenate(model, SHAPE, 1.0, scheme="cr")
    with torch.no_grad():
        model.classifier.bias.normal_()  # a trained bias is not 0: the sum of the two heads counts it twice
    return model.eval(), rep


def with_side_silenced(model, survivors: dict, side: str):
    """A copy whose last conv's S (or R) channels output 0: γ = β = 0 in its BN (ReLU(0) = 0 and pooling keep
    0), so the classifier sees only the other side's features — the naive reference for one head's logits."""
    m = copy.deepcopy(model)
    bn = m.features[7].bn
    s = survivors["features.7.conv"]
    idx = torch.arange(s) if side == "s" else torch.arange(s, bn.num_features)
    with torch.no_grad():
        bn.weight[idx] = 0
        bn.bias[idx] = 0
    return m


@pytest.mark.parametrize("seed,rounds", [(0, 1), (1, 1), (2, 2), (3, 2)])
def test_separate_heads_match_a_naive_reference(seed, rounds):
    model, rep = cr_rejuvenated(seed, rounds)
    x, y = torch.randn(SHAPE), torch.randint(0, 10, (SHAPE[0],))
    with torch.no_grad():
        ref_s = with_side_silenced(model, rep.survivors, "r")(x)  # R silenced: S's logits
        ref_r = with_side_silenced(model, rep.survivors, "s")(x)
    heads = SplitHeads(model, SHAPE, rep.survivors)
    assert heads.active and int(heads.r_mask.sum()) == rep.rejuvenated["features.7.conv"]  # 1x1 map at the head
    with torch.no_grad():
        out = model(x)
        got = heads.outputs()
    torch.testing.assert_close(got["s"], ref_s)
    torch.testing.assert_close(got["r"], ref_r)
    torch.testing.assert_close(out, ref_s + ref_r)  # the prediction comes from the sum
    torch.testing.assert_close(heads.loss(y), F.cross_entropy(ref_s, y) + F.cross_entropy(ref_r, y))
    heads.remove()
    with torch.no_grad():
        assert not torch.allclose(model(x), out)  # one head again: W f + b, not the sum's W f + 2b


def test_refused_where_two_heads_are_undefined():
    shape = (2, 3, 16, 16)
    for net, where in ((PlainVGG(), "'fc1' \\(a linear layer\\)"), (TinyResNet(), "'a.2' \\(a conv writing a fixed group\\)")):
        with pytest.raises(ValueError, match=where):
            check_two_heads(net, build_graph(net, shape))
    m = create_model("vgg_small", num_classes=10, in_channels=1, width=8)
    check_two_heads(m, build_graph(m, SHAPE))  # VGG: every conv splits, the classifier reads the last one


def test_split_halves_fills_the_budget_with_equal_halves():
    m = create_model("vgg_small", num_classes=10, in_channels=1, width=16)
    c = utilization(m, SHAPE).total
    m, halves = split_halves(m, SHAPE)
    blocks = [b for b in m.modules() if type(b).__name__ == "CRConv"]
    assert len(blocks) == 5 and all(b.s_out == b.r_out for b in blocks)
    assert 0.9 * c <= utilization(m, SHAPE).total <= c  # at most the budget, close to it
    half, _ = split_halves(create_model("vgg_small", num_classes=10, in_channels=1, width=16), SHAPE, 0.5)
    assert utilization(half, SHAPE).total <= 0.5 * c


def test_gamma_new_and_head_init():
    model, _ = cr_rejuvenated(0)  # any rejuvenated model: rejuvenate it again with each option
    kill_channels(model, build_graph(model, SHAPE), 0.3, seed=5)
    x = torch.randn(SHAPE)
    with torch.no_grad():
        before = model(x)
    exact, rep = rejuvenate(model, SHAPE, 1.0, gamma_new=0.25)
    bn = exact.features[7].bn
    s = rep.survivors["features.7.conv"]
    assert torch.all(bn.weight[s:] == 0.25) and torch.all(bn.bias[s:] == 0)
    with torch.no_grad():
        torch.testing.assert_close(exact.eval()(x), before)  # zero columns in the classifier: the same function
    normal, _ = rejuvenate(model, SHAPE, 1.0, head_init="normal")
    cols = normal.classifier.weight.detach()[:, s:]
    assert 0.003 < float(cols.std()) < 0.03 and bool((cols != 0).all())
    with torch.no_grad():
        assert not torch.allclose(normal.eval()(x), before)  # the official init changes the output


CFG = {
    "method": "NR-CR",
    "model": {"name": "vgg_small", "kwargs": {"width": 8}},
    "data": {"name": "synthetic", "n_train": 1024, "n_test": 64},
    "optim": {"lr": 0.1},
    "train": {"epochs": 2, "batch_size": 32, "threads": 1},
    "tracking": {"experiment": "heads"},
    "nr": {"tr": 0.95, "delta_lambda": 0.05, "delta_t": 1, "delta_t_unit": "step"},
}


def test_training_logs_each_heads_error_and_refuses_up_front(tracking_uri, tmp_path):
    res = train(CFG, tracking_uri=tracking_uri, checkpoint_dir=tmp_path / "a", progress=False)
    rows = [r for r in res["history"] if r["rejuvenations"] >= 1]
    assert res["rejuvenations"] == 1 and rows and all("test_err_s" in r and "test_err_r" in r for r in rows)
    joint = train({**CFG, "nr": {**CFG["nr"], "cr_heads": "joint"}}, tracking_uri=tracking_uri,
                  checkpoint_dir=tmp_path / "b", progress=False)
    assert all("test_err_s" not in r for r in joint["history"])
    bad = {**CFG, "model": {"name": "resnet164_cifar"}, "data": {"name": "synthetic", "n_train": 64, "n_test": 8,
                                                                 "synthetic": {"shape": [3, 32, 32]}}}
    with pytest.raises(ConfigError, match=r"^method NR-CR on model 'resnet164_cifar': nr.cr_heads: separate"):
        train(bad, tracking_uri=tracking_uri, checkpoint_dir=tmp_path / "c", progress=False)
    assert not (tmp_path / "c" / "state.pt").exists()


def test_tables_say_which_fidelity_options_their_runs_used():
    from nr_study.analysis.builders import fidelity_note
    from nr_study.analysis.runs import RunRecord

    def run(i, method, **params):
        return RunRecord(f"r{i}", "e", "FINISHED", {"nr.method": method}, {"method": method, **params}, {})

    runs = [run(0, "BL"), run(1, "NR-CR", **{"nr.cr_heads": "separate", "nr.gamma_new": "0.5"}),
            run(2, "NR-CR", **{"nr.cr_heads": "joint", "nr.gamma_new": "0.5", "nr.scheme": "None"}),
            run(3, "NR", **{"nr.cr_heads": "separate", "nr.gamma_new": "0.5"}),  # heads: NR-CR's option only
            run(4, "NR-CR")]  # logged before the options existed: one head, γ 1
    (note,) = fidelity_note(runs)
    assert "nr.cr_heads joint (2 runs) / separate (1 run)" in note
    assert "nr.gamma_new 0.5 (3 runs) / 1.0 (1 run)" in note and "nr.new_head_init zero;" in note
    assert fidelity_note([run(0, "BL")]) == []
