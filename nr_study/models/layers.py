"""Shared building blocks: post-activation conv -> BN -> ReLU, and the common initialisation."""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn


class ConvBNReLU(nn.Sequential):
    """``conv`` (bias=False) -> ``bn`` -> ``relu``: the unit the NR channel analysis looks for."""

    def __init__(self, cin: int, cout: int, kernel_size: int = 3, stride: int = 1, padding: int | None = None,
                 groups: int = 1):
        if padding is None:
            padding = kernel_size // 2
        super().__init__(OrderedDict(
            conv=nn.Conv2d(cin, cout, kernel_size, stride=stride, padding=padding, groups=groups, bias=False),
            bn=nn.BatchNorm2d(cout),
            relu=nn.ReLU(inplace=False),
        ))


def init_weights(model: nn.Module, linear_std: float | None = 0.01) -> nn.Module:
    """Conv: Kaiming normal (fan_out, relu); BN: weight 1, bias 0; Linear: normal(0, linear_std), bias 0
    (``linear_std=None`` keeps PyTorch's default Linear init)."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.BatchNorm2d, nn.BatchNorm1d)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear) and linear_std is not None:
            nn.init.normal_(m.weight, 0.0, linear_std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
    return model


class GAPNet(nn.Module):
    """stem -> features -> global average pool -> flatten -> one Linear, the tail every paper CNN here shares.

    Subclasses set ``stem`` (nn.Identity() when there is none), ``features``, ``avgpool`` and ``classifier``.
    """

    def forward(self, x):
        x = self.features(self.stem(x))
        return self.classifier(torch.flatten(self.avgpool(x), 1))
