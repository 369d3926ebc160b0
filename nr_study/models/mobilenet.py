"""MobileNet v1 (Howard et al. 2017) with a width multiplier (paper Table 3: MobileNet-0.50 / 0.25)."""

from __future__ import annotations

from collections import OrderedDict

from torch import nn

from .layers import ConvBNReLU, GAPNet, init_weights
from .registry import register_model

# (output channels at width 1.0, stride) of the 13 depthwise-separable blocks.
MOBILENET_V1_BLOCKS = [(64, 1), (128, 2), (128, 1), (256, 2), (256, 1), (512, 2),
                       (512, 1), (512, 1), (512, 1), (512, 1), (512, 1), (1024, 2), (1024, 1)]


class DepthwiseSeparable(nn.Sequential):
    """``dw``: conv3x3 groups=C -> BN -> ReLU, then ``pw``: conv1x1 -> BN -> ReLU."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__(OrderedDict(
            dw=ConvBNReLU(cin, cin, 3, stride=stride, groups=cin),
            pw=ConvBNReLU(cin, cout, 1),
        ))


class MobileNetV1(GAPNet):
    def __init__(self, width_mult: float = 1.0, num_classes: int = 1000, in_channels: int = 3):
        super().__init__()

        def ch(c):
            return max(1, int(c * width_mult))

        c = ch(32)
        self.stem = ConvBNReLU(in_channels, c, 3, stride=2)
        blocks = []
        for cout, stride in MOBILENET_V1_BLOCKS:
            blocks.append(DepthwiseSeparable(c, ch(cout), stride))
            c = ch(cout)
        self.features = nn.Sequential(*blocks)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(c, num_classes)
        init_weights(self)


@register_model("mobilenet_v1_025")
def mobilenet_v1_025(num_classes: int = 1000, in_channels: int = 3) -> nn.Module:
    """MobileNet v1, width 0.25 (channels 8 ... 256). Params: 470,072 at 1000 classes (MobileNet paper
    Table 6: 0.5M)."""
    return MobileNetV1(0.25, num_classes, in_channels)


@register_model("mobilenet_v1_050")
def mobilenet_v1_050(num_classes: int = 1000, in_channels: int = 3) -> nn.Module:
    """MobileNet v1, width 0.5 (channels 16 ... 512). Params: 1,331,592 at 1000 classes (MobileNet paper
    Table 6: 1.3M)."""
    return MobileNetV1(0.5, num_classes, in_channels)
