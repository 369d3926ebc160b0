"""Post-activation DenseNet-BC (paper §4.3: "We change it from pre-activation to post-activation")."""

from __future__ import annotations

import torch
from torch import nn

from .layers import ConvBNReLU, GAPNet, init_weights
from .registry import register_model


class DenseLayer(nn.Module):
    """conv1x1 (bn_size*k) -> BN -> ReLU -> conv3x3 (k) -> BN -> ReLU, then concatenated to the input."""

    def __init__(self, cin: int, growth_rate: int, bn_size: int = 4):
        super().__init__()
        mid = bn_size * growth_rate
        self.conv1 = nn.Conv2d(cin, mid, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(mid)
        self.relu1 = nn.ReLU(inplace=False)
        self.conv2 = nn.Conv2d(mid, growth_rate, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(growth_rate)
        self.relu2 = nn.ReLU(inplace=False)

    def forward(self, x):
        new = self.relu1(self.bn1(self.conv1(x)))
        new = self.relu2(self.bn2(self.conv2(new)))
        return torch.cat([x, new], 1)


class Transition(nn.Module):
    """conv1x1 -> BN -> ReLU -> avgpool 2x2/2."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 1, bias=False)
        self.bn = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=False)
        self.pool = nn.AvgPool2d(kernel_size=2, stride=2)

    def forward(self, x):
        return self.pool(self.relu(self.bn(self.conv(x))))


class DenseNet(GAPNet):
    """Post-activation DenseNet-BC: ``stem`` -> dense blocks with transitions -> GAP -> FC.

    Every dense layer's output is already ReLU'd, so no final BN is needed (unlike pre-activation DenseNet).
    """

    def __init__(self, stem: nn.Module, num_init_features: int, block_config, growth_rate: int,
                 bn_size: int = 4, compression: float = 0.5, num_classes: int = 10):
        super().__init__()
        self.stem = stem
        c = num_init_features
        feats: list[nn.Module] = []
        for i, n in enumerate(block_config):
            layers = []
            for _ in range(n):
                layers.append(DenseLayer(c, growth_rate, bn_size))
                c += growth_rate
            feats.append(nn.Sequential(*layers))
            if i != len(block_config) - 1:
                cout = int(c * compression)
                feats.append(Transition(c, cout))
                c = cout
        self.features = nn.Sequential(*feats)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(c, num_classes)
        init_weights(self)


@register_model("densenet_bc_100_40")
def densenet_bc_100_40(num_classes: int = 10, in_channels: int = 3) -> nn.Module:
    """DenseNet-BC-100 with growth rate 40 for CIFAR (paper Table 4 "DenseNet-100-40"), post-activation.

    Layout as the official code (models/cifar/densenet.py): stem conv3x3 to 2k=80 channels -> BN -> ReLU;
    3 dense blocks of (100-4)/6 = 16 bottleneck layers (1x1 to 4k=160, 3x3 to k=40); transitions halve the
    channels (720->360, 1000->500) and avg-pool; final 1140 channels -> GAP -> FC.
    Params: 8,269,050 at 10 classes (paper Table 4: 8.27M), 8,371,740 at 100 (8.37M).
    """
    k = 40
    stem = ConvBNReLU(in_channels, 2 * k, kernel_size=3)
    return DenseNet(stem, 2 * k, (16, 16, 16), k, bn_size=4, compression=0.5, num_classes=num_classes)


@register_model("densenet121")
def densenet121(num_classes: int = 1000, in_channels: int = 3) -> nn.Module:
    """DenseNet-121 for ImageNet, post-activation as in paper §4.3 and the official code
    (models/imagenet/densenet.py): stem conv7x7/2 (64) -> BN -> ReLU -> maxpool 3x3/2; blocks 6/12/24/16 with
    growth 32, bottleneck 4k=128, compression 0.5; GAP; FC(1024, num_classes).
    Params: 7,915,688 at 1000 classes (paper Table 2: 7.92M; torchvision's pre-activation one has 7.98M
    because its BNs sit on the wider layer inputs).
    """
    stem = nn.Sequential(ConvBNReLU(in_channels, 64, kernel_size=7, stride=2, padding=3),
                         nn.MaxPool2d(kernel_size=3, stride=2, padding=1))
    return DenseNet(stem, 64, (6, 12, 24, 16), 32, bn_size=4, compression=0.5, num_classes=num_classes)
