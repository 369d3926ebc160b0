"""Every torchvision classification model through the core: exact or refused with a reason, Tr checked.

The graph verdict runs for all of them on the meta device (no memory, no arithmetic); the real-weight
invariants (cost = weights, one rejuvenation per scheme preserving the function, a training step) run on
the smallest model of each family here, and on every supported model in `python -m tests.tv_survey`, whose
table is in docs/architecture.md.
"""
from __future__ import annotations

import pytest
import torch

from nr_study.nr import NeuralRejuvenation, NRConfig
from tests.tv_survey import analyse, build_light, exercise, names

# one per pattern: concat, SE + stochastic depth, train-only heads, depthwise, hard-swish SE, grouped + SE,
# basic blocks (CA on fixed-output convs), conv biases
FAMILIES = ["densenet121", "efficientnet_b0", "googlenet", "mobilenet_v2", "mobilenet_v3_small", "regnet_y_400mf",
            "resnet18", "vgg11_bn"]


@pytest.mark.parametrize("name", names())
def test_graph_verdict_and_tr_reachability(name):
    verdict = analyse(name)
    if verdict["outcome"] == "refused":
        reason = verdict["reason"]
        assert "node '" in reason or "no free channel group" in reason or "cannot take an input" in reason, reason
        return
    shape = (2, 3, verdict["size"], verdict["size"])
    model = build_light(name)
    if verdict["r_min"] >= 0.5:
        with pytest.raises(ValueError, match=r"nr\.tr: 0\.5 cannot be reached"):
            NeuralRejuvenation(model, shape, NRConfig(tr=0.5))
    else:
        NeuralRejuvenation(model, shape, NRConfig(tr=0.5))


@pytest.mark.slow
@pytest.mark.parametrize("name", FAMILIES)
def test_real_weights_exact_under_every_scheme(name):
    verdict = analyse(name)
    assert verdict["outcome"] == "supported", verdict
    torch.manual_seed(0)
    assert exercise(name, verdict["size"])["max_rel_change"] < 1e-4
