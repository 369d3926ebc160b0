"""VGG variants used in the paper (all post-activation conv -> BN -> ReLU, GAP + one FC head)."""

from __future__ import annotations

import torch
from torch import nn

from nr_study.errors import ConfigError

from .layers import ConvBNReLU, GAPNet, init_weights
from .registry import register_model


def _make_features(cfg, in_channels: int) -> tuple[nn.Sequential, int]:
    """``cfg``: ints are conv3x3 widths, 'M' a 2x2/2 max-pool."""
    layers: list[nn.Module] = []
    c = in_channels
    for v in cfg:
        if v == "M":
            layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
        else:
            layers.append(ConvBNReLU(c, v, 3))
            c = v
    return nn.Sequential(*layers), c


class VGG(GAPNet):
    """``features`` -> global average pool -> flatten -> ``classifier`` (one Linear)."""

    def __init__(self, features: nn.Sequential, out_channels: int, num_classes: int):
        super().__init__()
        self.stem = nn.Identity()
        self.features = features
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(out_channels, num_classes)
        init_weights(self)


# Paper §4.4 and the official code (models/cifar/vgg.py): the 4 original max-pools are removed and 2 are
# added after the 4th and the 10th conv; the widths are VGG-19's.
VGG19_CIFAR_CFG = [64, 64, 128, 128, "M", 256, 256, 256, 256, 512, 512, "M", 512, 512, 512, 512, 512, 512]


@register_model("vgg19_bn_cifar")
def vgg19_bn_cifar(num_classes: int = 10, in_channels: int = 3) -> nn.Module:
    """VGG-19 (BN) for CIFAR as in paper §4.4 (Tables 4, 5).

    16 conv3x3-BN-ReLU layers with VGG-19's widths (64x2, 128x2, 256x4, 512x8), no FC stack: global average
    pooling + one FC. Pool placement follows the paper text ("remove the original 4 max-pooling layers and add
    2 max-pooling layers after the 4th and the 10th convolutional layers") and the official code: 32x32 ->
    conv1-4 at 32x32, pool, conv5-10 at 16x16, pool, conv11-16 at 8x8. (Pool placement changes FLOPs, not
    parameters.) Params: 20,035,018 at 10 classes (paper Table 4: 20.04M), 20,081,188 at 100 (20.08M).
    """
    features, c = _make_features(VGG19_CIFAR_CFG, in_channels)
    return VGG(features, c, num_classes)


class VGG19Simplified(GAPNet):
    """Paper §4.2 / Table 1's simplified VGG-19 for 128 px ImageNet (see :func:`vgg19_simplified_imagenet`)."""

    def __init__(self, num_classes: int = 1000, in_channels: int = 3):
        super().__init__()
        self.stem = ConvBNReLU(in_channels, 64, kernel_size=7, stride=2, padding=3)
        body = [ConvBNReLU(64, 64, 3), nn.MaxPool2d(kernel_size=3, stride=2, padding=1)]
        rest, c = _make_features([128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M",
                                  512, 512, 512, 512], 64)
        self.features = nn.Sequential(*body, *rest)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(c, num_classes)
        init_weights(self)


@register_model("vgg19_simplified_imagenet")
def vgg19_simplified_imagenet(num_classes: int = 1000, in_channels: int = 3) -> nn.Module:
    """Simplified VGG-19 of paper §4.2 (Table 1 ablation, 128x128 ImageNet).

    The first conv is ResNet's (conv7x7/2 -> BN -> ReLU), the three FC layers are replaced by global average
    pooling + one FC. Layout follows the official code (models/imagenet/vgg.py): stem conv7x7/2, conv3x3 64,
    ResNet's max-pool 3x3/2, then VGG-19's remaining convs 128x2, M, 256x4, M, 512x4, M, 512x4 with 2x2/2
    max-pools, and no 5th pool (GAP follows): overall stride 32, i.e. 4x4 maps at 128 px like a ResNet.
    Params: 20,550,568 at 1000 classes (paper: "only 20.5M parameters").
    """
    return VGG19Simplified(num_classes, in_channels)


class VGG16Conv4096(nn.Module):
    """VGG-16 with BN whose FC-4096 layers became 1x1 convs (see :func:`vgg16_bn_imagenet`)."""

    def __init__(self, num_classes: int = 1000, in_channels: int = 3):
        super().__init__()
        self.features, c = _make_features([64, 64, "M", 128, 128, "M", 256, 256, 256, "M",
                                           512, 512, 512, "M", 512, 512, 512], in_channels)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Sequential(ConvBNReLU(c, 4096, kernel_size=1), ConvBNReLU(4096, 4096, kernel_size=1))
        self.classifier = nn.Linear(4096, num_classes)
        init_weights(self)

    def forward(self, x):
        x = self.features(x)
        x = self.avgpool(x)
        x = self.head(x)
        x = torch.flatten(x, 1)
        return self.classifier(x)


@register_model("vgg16_bn_imagenet")
def vgg16_bn_imagenet(num_classes: int = 1000, in_channels: int = 3) -> nn.Module:
    """VGG-16 of paper §4.3 / Table 2: BN after every conv, the three FC layers removed, two convs with 4096
    output channels added, then global average pooling and FC(4096, num_classes).

    Kernel choice: both 4096 convs are 1x1 (that is what gives the paper's 37.7M; a 3x3 first one would give
    54.5M). Following the official code (models/imagenet/vgg_ori.py) there is no 5th max-pool and the global
    average pool comes *before* the two 1x1 convs (they then run at 1x1, which matches Table 2's 15.3G FLOPs
    at 224 px); the final GAP over a 1x1 map is a no-op and is folded into the flatten.
    Params: 37,706,664 at 1000 classes (paper Table 2: 37.7M).
    """
    return VGG16Conv4096(num_classes, in_channels)


@register_model("vgg_small")
def vgg_small(num_classes: int = 10, in_channels: int = 3, width: int = 32) -> nn.Module:
    """A small VGG for quick CPU runs on 28x28 (Fashion-MNIST) or 32x32 inputs.

    conv3x3 widths [w, w, M, 2w, 2w, M, 4w, 4w] (w = ``width``, default 32) + GAP + FC: 288,170 params at
    w=32, 10 classes, 1 input channel. Works for any input of at least 4x4.
    """
    if isinstance(width, bool) or not isinstance(width, int) or width < 1:
        raise ConfigError(f"model: vgg_small width must be a positive integer, got {width!r}")
    w = width
    features, c = _make_features([w, w, "M", 2 * w, 2 * w, "M", 4 * w, 4 * w], in_channels)
    return VGG(features, c, num_classes)
