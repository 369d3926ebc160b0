"""ResNets: the bottleneck ResNet-164 for CIFAR (post-activation), and torchvision's ImageNet ResNets."""

from __future__ import annotations

import torch
from torch import nn

from .layers import init_weights
from .registry import register_model, replace_first_conv


class Bottleneck(nn.Module):
    """conv1x1-BN-ReLU, conv3x3(stride)-BN-ReLU, conv1x1(x4)-BN, add the shortcut, ReLU.

    ``downsample`` (conv1x1 + BN) projects the shortcut where the shape changes; it is ``None`` otherwise.
    """

    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1):
        super().__init__()
        out = planes * self.expansion
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, out, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out)
        self.relu = nn.ReLU(inplace=False)
        self.downsample = None
        if stride != 1 or inplanes != out:
            self.downsample = nn.Sequential(nn.Conv2d(inplanes, out, 1, stride=stride, bias=False),
                                            nn.BatchNorm2d(out))

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)  # structural, not data-dependent
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class CifarResNet(nn.Module):
    """conv3x3(16)-BN-ReLU, three stages of bottlenecks (16/32/64 planes, stride 1/2/2), GAP, FC."""

    def __init__(self, depth: int = 164, num_classes: int = 10, in_channels: int = 3):
        super().__init__()
        if (depth - 2) % 9 != 0:
            raise ValueError(f"bottleneck CIFAR ResNet depth must be 9n+2, got {depth}")
        n = (depth - 2) // 9
        self.conv1 = nn.Conv2d(in_channels, 16, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.relu = nn.ReLU(inplace=False)
        inplanes = 16
        stages = []
        for planes, stride in ((16, 1), (32, 2), (64, 2)):
            blocks = []
            for i in range(n):
                blocks.append(Bottleneck(inplanes, planes, stride if i == 0 else 1))
                inplanes = planes * Bottleneck.expansion
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = stages
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(inplanes, num_classes)
        init_weights(self)

    def forward(self, x):
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer1(x)
        x = self.layer2(x)
        x = self.layer3(x)
        x = self.avgpool(x)
        x = torch.flatten(x, 1)
        return self.fc(x)


@register_model("resnet164_cifar")
def resnet164_cifar(num_classes: int = 10, in_channels: int = 3) -> nn.Module:
    """ResNet-164 (bottleneck, 3 stages x 18 blocks, outputs 64/128/256) for CIFAR, post-activation, with
    1x1 conv + BN projection shortcuts where the shape changes (first block of each stage), as in the
    official code (models/cifar/resnet.py). Params: 1,704,154 at 10 classes (paper Table 4: 1.70M),
    1,727,284 at 100 (1.73M).
    """
    return CifarResNet(164, num_classes, in_channels)


def _tv_resnet(arch: str, num_classes: int, in_channels: int) -> nn.Module:
    import torchvision.models as tvm

    model = getattr(tvm, arch)(weights=None, num_classes=num_classes)
    if in_channels != 3:
        replace_first_conv(model, in_channels)
    return model


@register_model("resnet18")
def resnet18(num_classes: int = 1000, in_channels: int = 3) -> nn.Module:
    """torchvision ResNet-18 (weights=None). Params: 11,689,512 at 1000 classes (paper Table 2: 11.7M)."""
    return _tv_resnet("resnet18", num_classes, in_channels)


@register_model("resnet34")
def resnet34(num_classes: int = 1000, in_channels: int = 3) -> nn.Module:
    """torchvision ResNet-34 (weights=None). Params: 21,797,672 at 1000 classes (paper Table 2: 21.8M)."""
    return _tv_resnet("resnet34", num_classes, in_channels)


@register_model("resnet50")
def resnet50(num_classes: int = 1000, in_channels: int = 3) -> nn.Module:
    """torchvision ResNet-50 (weights=None, v1.5: stride on the 3x3). Params: 25,557,032 at 1000 classes
    (paper Table 2: 25.6M)."""
    return _tv_resnet("resnet50", num_classes, in_channels)


@register_model("resnet101")
def resnet101(num_classes: int = 1000, in_channels: int = 3) -> nn.Module:
    """torchvision ResNet-101 (weights=None). Params: 44,549,160 at 1000 classes (paper Table 2: 44.5M)."""
    return _tv_resnet("resnet101", num_classes, in_channels)
