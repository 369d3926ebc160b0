"""The NR core on every registered architecture and on torchvision models through the same door."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from nr_study.models import create_model, list_models
import math

from nr_study.nr import build_graph, prune, rejuvenate, utilization
from nr_study.nr.cost import widths_cost
from nr_study.nr.surgery import expansion_widths, split_counts
from tests.nets import kill_channels, randomize_bn, weight_params
from tests.test_nr_core import flops_of

CIFAR = {"vgg19_bn_cifar", "resnet164_cifar", "densenet_bc_100_40", "vgg_small"}
MODELS = list_models() + ["tv:resnet18", "tv:resnet50", "tv:mobilenet_v2", "tv:densenet121"]


def shape_for(name):
    return (2, 3, 32, 32) if name in CIFAR else (2, 3, 64, 64)


@pytest.mark.parametrize("name", MODELS)
def test_model_forward_backward_utilization_rejuvenation_forward(name):
    torch.manual_seed(0)
    shape = shape_for(name)
    model = create_model(name, num_classes=10)
    assert utilization(model, shape, "params").total == weight_params(model)
    assert utilization(model, shape, "flops").total == flops_of(model, shape)
    x, y = torch.randn(shape), torch.tensor([0, 1])
    F.cross_entropy(model(x), y).backward()
    graph = build_graph(model, shape)
    assert graph.free_groups(), f"{name}: no prunable channel group found"
    randomize_bn(model)
    dead = kill_channels(model, graph, 0.3, seed=1)
    u = utilization(model, shape)
    assert u.live < u.total
    keep = {}
    for g in graph.free_groups():
        keep[g.bn] = torch.ones(g.width, dtype=torch.bool)
        keep[g.bn][dead[g.id]] = False
    assert utilization(prune(model, shape, keep), shape).total == u.live  # U(θ) = cost of the pruned model
    for scheme in ("nr", "ca"):
        new, rep = rejuvenate(model, shape, 1.0, scheme=scheme, rescale=True)
        assert rep.cost_after <= u.total and sum(rep.rejuvenated.values()) > 0
        new.train()
        out = new(x)
        assert out.shape == (2, 10) and torch.isfinite(out).all()
        F.cross_entropy(out, y).backward()
        assert utilization(new, shape).total == rep.cost_after
        w_prime = {g.id: rep.widths_live[g.producer] for g in graph.free_groups()}
        nxt = min((math.floor(rep.alpha * w) + 1) / w for w in w_prime.values())  # α is maximal
        assert widths_cost(graph, *split_counts(w_prime, expansion_widths(w_prime, nxt)), "params") > rep.target


@pytest.mark.parametrize("name", ["resnet164_cifar", "densenet_bc_100_40", "mobilenet_v1_025", "tv:densenet121"])
def test_function_preserved_on_paper_models(name):
    torch.manual_seed(0)
    shape = shape_for(name)
    model = create_model(name, num_classes=10)
    randomize_bn(model)
    model.eval()
    x = torch.randn(shape)
    for round_, scheme in enumerate(("cr", "ca")):
        kill_channels(model, build_graph(model, shape), 0.3, seed=round_)
        with torch.no_grad():
            before = model(x)
        model, _ = rejuvenate(model, shape, 1.0, scheme=scheme, rescale=True)
        model.eval()
        with torch.no_grad():
            after = model(x)
        assert (after - before).norm() / before.norm() < 1e-4
