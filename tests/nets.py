"""Small CNNs that exercise every graph pattern the channel analysis handles, and helpers for NR tests."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


def cbr(cin, cout, k=3, stride=1, groups=1):
    return nn.Sequential(nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False),
                         nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class PlainVGG(nn.Module):
    """Flatten of a 4×4 map into the head (factor 16) and a hidden linear + BN1d unit."""

    def __init__(self, num_classes=10):
        super().__init__()
        self.features = nn.Sequential(cbr(3, 12), cbr(12, 16), nn.MaxPool2d(2), cbr(16, 20), nn.AvgPool2d(2))
        self.fc1 = nn.Linear(20 * 4 * 4, 24, bias=False)
        self.bn_fc = nn.BatchNorm1d(24)
        self.fc2 = nn.Linear(24, num_classes)

    def forward(self, x):
        x = torch.flatten(self.features(x), 1)
        return self.fc2(F.relu(self.bn_fc(self.fc1(x))))


class TinyResNet(nn.Module):
    """Bottleneck blocks: the residual stream is fixed, the inner convs are free."""

    def __init__(self, num_classes=10):
        super().__init__()
        self.stem = cbr(3, 16)
        self.a = nn.Sequential(cbr(16, 8, 1), cbr(8, 8), nn.Conv2d(8, 16, 1, bias=False), nn.BatchNorm2d(16))
        self.b = nn.Sequential(cbr(16, 12, 1), cbr(12, 12, stride=2), nn.Conv2d(12, 32, 1, bias=False),
                               nn.BatchNorm2d(32))
        self.down = nn.Sequential(nn.Conv2d(16, 32, 1, 2, bias=False), nn.BatchNorm2d(32))
        self.fc = nn.Linear(32, num_classes)

    def forward(self, x):
        x = self.stem(x)
        x = F.relu(x + self.a(x))
        x = F.relu(self.down(x) + self.b(x))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


class TinyDense(nn.Module):
    """Post-activation dense block: concatenations map channel offsets."""

    def __init__(self, num_classes=10):
        super().__init__()
        self.stem = cbr(3, 8)
        self.l1 = nn.Sequential(cbr(8, 12, 1), cbr(12, 6))
        self.l2 = nn.Sequential(cbr(14, 12, 1), cbr(12, 6))
        self.trans = cbr(20, 10, 1)
        self.fc = nn.Linear(10, num_classes)

    def forward(self, x):
        x = self.stem(x)
        x = torch.cat([x, self.l1(x)], 1)
        x = torch.cat([x, self.l2(x)], 1)
        x = F.avg_pool2d(self.trans(x), 2)
        return self.fc(x.mean((2, 3)))


class TinyMobile(nn.Module):
    """Depthwise convs tie their channels to their input's."""

    def __init__(self, num_classes=10):
        super().__init__()
        self.stem = cbr(3, 8, stride=2)
        self.dw1, self.pw1 = cbr(8, 8, groups=8), cbr(8, 16, 1)
        self.dw2, self.pw2 = cbr(16, 16, stride=2, groups=16), cbr(16, 24, 1)
        self.fc = nn.Linear(24, num_classes)

    def forward(self, x):
        x = self.pw2(self.dw2(self.pw1(self.dw1(self.stem(x)))))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


class ShuffleNet(nn.Module):
    """A channel shuffle: the analysis must refuse it, naming the node."""

    def __init__(self):
        super().__init__()
        self.c = cbr(3, 8)
        self.fc = nn.Linear(8, 10)

    def forward(self, x):
        x = self.c(x)
        n, c, h, w = x.shape
        x = x.view(n, 2, c // 2, h, w).transpose(1, 2).reshape(n, c, h, w)
        return self.fc(x.mean((2, 3)))


TINY_NETS = {"plain_vgg": PlainVGG, "tiny_resnet": TinyResNet, "tiny_dense": TinyDense, "tiny_mobile": TinyMobile}
INPUT = (2, 3, 16, 16)


def randomize_bn(model: nn.Module, seed: int = 0) -> None:
    """Non-trivial γ (some below γ0 = 1 so rescaling acts), β and running statistics."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
                n = m.num_features
                m.weight.copy_(torch.rand(n, generator=g) * 1.4 + 0.1)
                m.bias.copy_(torch.randn(n, generator=g) * 0.1)
                m.running_mean.copy_(torch.randn(n, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(n, generator=g) + 0.5)


def kill_channels(model: nn.Module, graph, fraction: float = 0.4, seed: int = 0) -> dict[int, torch.Tensor]:
    """Make a random subset of every free group's channels dead: γ = β = 0 in every BN over them."""
    g = torch.Generator().manual_seed(seed)
    dead = {}
    for grp in graph.free_groups():
        n_dead = int(grp.width * fraction)
        dead[grp.id] = torch.randperm(grp.width, generator=g)[:n_dead]
    return silence(model, graph, dead)


def silence(model: nn.Module, graph, dead: dict[int, torch.Tensor]) -> dict[int, torch.Tensor]:
    """Channels dead[g] of each group g made dead: γ = β = 0 in every BN over them (a concatenation included)."""
    modules = dict(model.named_modules())
    with torch.no_grad():
        for bn in graph.bns:
            offset = 0
            for gid, f in bn.layout:
                if gid in dead:
                    idx = (dead[gid][:, None] * f + torch.arange(f)).flatten() + offset
                    modules[bn.name].weight[idx] = 0
                    modules[bn.name].bias[idx] = 0
                offset += graph.groups[gid].width * f
    return dead


def weight_params(model: nn.Module) -> int:
    """Σ of conv/linear weight sizes (biases and BN excluded, as the paper counts)."""
    return sum(m.weight.numel() for m in model.modules() if type(m) in (nn.Conv2d, nn.Linear))
