"""Model registry: parameter counts vs the paper, forward shapes, torch.fx traceability, errors."""

import pytest
import torch
import torch.fx
from torch import nn

from nr_study.errors import ConfigError
from nr_study.models import create_model, list_models, register_model

# (name, num_classes, paper's parameter count, source). Counted on the meta device: no init, no forward.
PAPER_PARAMS = [
    # paper Table 4 (CIFAR, "Baseline" columns: C10 (Params) / C100 (Params))
    ("vgg19_bn_cifar", 10, 20.04e6, "Table 4: VGG-19 5.44 (20.04M)"),
    ("vgg19_bn_cifar", 100, 20.08e6, "Table 4: VGG-19 23.11 (20.08M)"),
    ("resnet164_cifar", 10, 1.70e6, "Table 4: ResNet-164 6.11 (1.70M)"),
    ("resnet164_cifar", 100, 1.73e6, "Table 4: ResNet-164 28.86 (1.73M)"),
    ("densenet_bc_100_40", 10, 8.27e6, "Table 4: DenseNet-100-40 3.64 (8.27M)"),
    ("densenet_bc_100_40", 100, 8.37e6, "Table 4: DenseNet-100-40 19.85 (8.37M)"),
    # paper §4.2: "The resulted model has only 20.5M parameters."
    ("vgg19_simplified_imagenet", 1000, 20.5e6, "§4.2 simplified VGG-19: 20.5M"),
    # paper Table 2 ("Baseline Params" column) and §4.3 ("138M to 37.7M")
    ("densenet121", 1000, 7.92e6, "Table 2: DenseNet-121 7.92M"),
    ("vgg16_bn_imagenet", 1000, 37.7e6, "Table 2: VGG-16 37.7M"),
    ("resnet18", 1000, 11.7e6, "Table 2: ResNet-18 11.7M"),
    ("resnet34", 1000, 21.8e6, "Table 2: ResNet-34 21.8M"),
    ("resnet50", 1000, 25.6e6, "Table 2: ResNet-50 25.6M"),
    ("resnet101", 1000, 44.5e6, "Table 2: ResNet-101 44.5M"),
    # paper Table 3 names MobileNet-0.50/0.25 without sizes; MobileNet paper (Howard et al. 2017)
    # Table 6: 1.0 MobileNet-224 ... 0.50 -> 1.3M, 0.25 -> 0.5M; the exact layouts give 1.33M / 0.47M.
    ("mobilenet_v1_050", 1000, 1.33e6, "MobileNet paper Table 6: 0.50 MobileNet 1.3M"),
    ("mobilenet_v1_025", 1000, 0.47e6, "MobileNet paper Table 6: 0.25 MobileNet 0.5M"),
]

CIFAR_SIZED = {"vgg19_bn_cifar", "resnet164_cifar", "densenet_bc_100_40", "vgg_small"}
TV_MODELS = ["tv:resnet18", "tv:mobilenet_v2"]


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name,num_classes,paper,source", PAPER_PARAMS,
                         ids=[f"{n}-{c}" for n, c, _, _ in PAPER_PARAMS])
def test_param_count_matches_paper(name, num_classes, paper, source):
    with torch.device("meta"):
        model = create_model(name, num_classes=num_classes)
    got = n_params(model)
    assert abs(got - paper) / paper <= 0.03, f"{name}: {got:,} params vs {source}"


def test_every_paper_architecture_has_a_count():
    counted = {n for n, *_ in PAPER_PARAMS}
    assert set(list_models()) - counted == {"vgg_small"}


@pytest.mark.parametrize("name", list_models() + TV_MODELS)
def test_forward_shape_and_fx_trace(name):
    torch.manual_seed(0)
    size = 32 if name in CIFAR_SIZED else 64
    model = create_model(name, num_classes=7).eval()
    with torch.no_grad():
        out = model(torch.randn(2, 3, size, size))
    assert out.shape == (2, 7)
    gm = torch.fx.symbolic_trace(model)
    assert any(n.op == "call_module" for n in gm.graph.nodes)


@pytest.mark.parametrize("name", list_models())
def test_every_conv_feeds_a_batchnorm(name):
    """Post-activation: each conv's only user is a BN (the unit NR's channel analysis looks for)."""
    with torch.device("meta"):
        model = create_model(name)
    gm = torch.fx.symbolic_trace(model)
    mods = dict(gm.named_modules())
    convs = [n for n in gm.graph.nodes if n.op == "call_module" and isinstance(mods[n.target], nn.Conv2d)]
    assert convs
    for n in convs:
        assert mods[n.target].bias is None, n.target
        users = list(n.users)
        assert len(users) == 1 and users[0].op == "call_module", n.target
        assert isinstance(mods[users[0].target], nn.BatchNorm2d), n.target


def test_initialisation_and_traced_equivalence():
    model = create_model("vgg_small", in_channels=1)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            assert torch.all(m.weight == 1) and torch.all(m.bias == 0)
        if isinstance(m, nn.Linear):
            assert torch.all(m.bias == 0) and m.weight.std() < 0.02
    model.eval()
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(torch.fx.symbolic_trace(model)(x), model(x))


@pytest.mark.parametrize("size", [28, 32])
def test_vgg_small_inputs(size):
    model = create_model("vgg_small", num_classes=10, in_channels=1)
    assert 0.2e6 < n_params(model) < 0.4e6
    with torch.no_grad():
        assert model.eval()(torch.randn(2, 1, size, size)).shape == (2, 10)
    model3 = create_model("vgg_small", num_classes=10)
    with torch.no_grad():
        assert model3.eval()(torch.randn(2, 3, size, size)).shape == (2, 10)


@pytest.mark.parametrize("name", ["tv:resnet18", "mobilenet_v1_025", "resnet18"])
def test_in_channels_one(name):
    model = create_model(name, num_classes=5, in_channels=1).eval()
    first = next(m for m in model.modules() if isinstance(m, nn.Conv2d))
    assert first.in_channels == 1
    with torch.no_grad():
        assert model(torch.randn(2, 1, 64, 64)).shape == (2, 5)
    torch.fx.symbolic_trace(model)


def _one_line_error(name, **kw) -> str:
    with pytest.raises(ConfigError) as ei:
        create_model(name, **kw)
    msg = str(ei.value)
    assert "\n" not in msg
    return msg


def test_unknown_architecture_message():
    msg = _one_line_error("resnet5")
    assert msg.startswith("model: unknown architecture 'resnet5'; allowed: ")
    assert ", ".join(list_models()) in msg
    assert "or tv:<torchvision classification model>" in msg
    assert "did you mean 'resnet50'" in msg


def test_unknown_torchvision_model():
    msg = _one_line_error("tv:resnet19")
    assert "'tv:resnet19' is not a torchvision classification model" in msg
    assert "tv:resnet18" in msg
    # a torchvision model that is not a classifier is refused, too
    assert "not a classification model" in _one_line_error("tv:fasterrcnn_resnet50_fpn")


def test_bad_options():
    assert "no option 'depth'" in _one_line_error("vgg19_bn_cifar", depth=3)
    assert "num_classes" in _one_line_error("vgg_small", num_classes=0)
    assert "in_channels" in _one_line_error("vgg_small", in_channels="3")
    assert "width" in _one_line_error("vgg_small", width=0)
    with pytest.raises(ConfigError):
        create_model("tv:resnet18", weights="IMAGENET1K_V1")


def test_register_model_decorator():
    @register_model("_test_tiny")
    def tiny(num_classes=10, in_channels=3):
        return nn.Sequential(nn.Conv2d(in_channels, 4, 3, bias=False), nn.BatchNorm2d(4), nn.ReLU(),
                             nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, num_classes))

    try:
        assert "_test_tiny" in list_models()
        assert create_model("_test_tiny", num_classes=3)(torch.randn(2, 3, 8, 8)).shape == (2, 3)
        with pytest.raises(ValueError):
            register_model("_test_tiny")(lambda **kw: None)
        with pytest.raises(ValueError):
            register_model("tv:x")
    finally:
        from nr_study.models import registry
        registry._REGISTRY.pop("_test_tiny", None)
