"""A seeded generator of random conv-BN networks for the core's generative tests.

A net is a *program*: a list of steps over a stack of feature maps, interpreted by one forward that torch.fx
traces (the program is static, so the trace unrolls it). The grammar covers what CNNs are made of: convs with
or without bias, strides, dilation, every padding mode, depthwise and grouped convs, residual adds,
concatenation (also of one tensor twice), pooling, SE-style gates, train-only auxiliary heads, flatten or
pooled heads with hidden Linear+BN1d units, BNs without affine or with momentum=None — and two shapes the
core must refuse: a module called twice (weight sharing) and one BN applied at two places.
"""
from __future__ import annotations

import random

import torch
import torch.nn as nn
import torch.nn.functional as F

ACTS = {"relu": nn.ReLU, "leaky": lambda: nn.LeakyReLU(0.1), "silu": nn.SiLU, "hswish": nn.Hardswish,
        "none": nn.Identity}  # every one maps 0 to 0, so a dead channel (γ = β = 0) stays 0 after it
PADDING_MODES = ("zeros", "zeros", "reflect", "replicate", "circular")


class RandomNet(nn.Module):
    def __init__(self, steps: list[tuple], modules: dict[str, nn.Module]):
        super().__init__()
        self.steps = steps
        self.mods = nn.ModuleDict(modules)

    def forward(self, x):
        stack, aux = [x], None
        for op, *args in self.steps:
            if op == "seq":  # apply modules in order to the top of the stack
                y = stack.pop()
                for name in args[0]:
                    y = self.mods[name](y)
                stack.append(y)
            elif op == "push":  # apply a chain to the top, keep both
                y = stack[-1]
                for name in args[0]:
                    y = self.mods[name](y)
                stack.append(y)
            elif op == "add":
                b, a = stack.pop(), stack.pop()
                stack.append(F.relu(a + b))
            elif op == "cat":
                b, a = stack.pop(), stack.pop()
                stack.append(torch.cat([a, b], 1))
            elif op == "cat_self":
                a = stack.pop()
                stack.append(torch.cat([a, a], dim=1))
            elif op == "gate":
                a = stack.pop()
                s = a.mean((2, 3), keepdim=True)
                for name in args[0]:
                    s = self.mods[name](s)
                stack.append(a * torch.sigmoid(s))
            elif op == "aux":  # a head that only runs in training (GoogLeNet / Inception style)
                if self.training:
                    aux = self.mods[args[0]](torch.flatten(F.adaptive_avg_pool2d(stack[-1], 1), 1))
            elif op == "head_gap":
                y = stack.pop().mean((2, 3))
                for name in args[0]:
                    y = self.mods[name](y)
                stack.append(y)
            elif op == "head_flat":
                y = torch.flatten(stack.pop(), 1)
                for name in args[0]:
                    y = self.mods[name](y)
                stack.append(y)
        out = stack.pop()
        return (out, aux) if aux is not None else out


class _Builder:
    def __init__(self, rng: random.Random):
        self.rng = rng
        self.mods: dict[str, nn.Module] = {}
        self.steps: list[tuple] = []
        self.refusal: str | None = None
        self.last_bn: str | None = None

    def add(self, kind: str, module: nn.Module) -> str:
        name = f"{kind}{len(self.mods)}"
        self.mods[name] = module
        return name

    def bn(self, c: int, dims: int = 2, plain: bool = False) -> str:
        r = 1.0 if plain else self.rng.random()
        cls = nn.BatchNorm2d if dims == 2 else nn.BatchNorm1d
        if r < 0.05:
            return self.add("bn", cls(c, affine=False))
        if r < 0.12:
            return self.add("bn", cls(c, momentum=None))
        return self.add("bn", cls(c))

    def act(self) -> str:
        return self.add("act", ACTS[self.rng.choice(list(ACTS))]())

    def conv_unit(self, cin: int, cout: int, hw: int, groups: int = 1, k: int | None = None) -> tuple[list, int]:
        rng = self.rng
        k = k or rng.choice((1, 3, 3))
        dil = 2 if k == 3 and hw >= 6 and rng.random() < 0.2 else 1
        stride = 2 if hw >= 6 and rng.random() < 0.25 else 1
        pad = dil * (k // 2)
        mode = rng.choice(PADDING_MODES) if pad and pad < hw else "zeros"
        conv = nn.Conv2d(cin, cout, k, stride, pad, dil, groups=groups, bias=rng.random() < 0.4, padding_mode=mode)
        # a BN that re-normalises another unit's channels (after a depthwise conv) has a γ to zero with them
        names = [self.add("conv", conv), self.bn(cout, plain=groups > 1), self.act()]
        self.last_bn = names[1]
        return names, (hw + 2 * pad - dil * (k - 1) - 1) // stride + 1


def random_net(seed: int, allow_refused: bool = True) -> tuple[RandomNet, tuple[int, ...], str | None]:
    """(model, input shape, why the core must refuse it or None)."""
    rng = random.Random(seed)
    b = _Builder(rng)
    hw = rng.choice((8, 10, 12))
    c = rng.choice((3, 4))
    shape = (2, c, hw, hw)
    names, hw = b.conv_unit(c, rng.choice((6, 8, 10)), hw)
    b.steps.append(("seq", names))
    c = b.mods[names[0]].out_channels
    for _ in range(rng.randint(2, 6)):
        op = rng.choices(["conv", "dw", "grouped", "res", "cat", "cat_self", "gate", "pool", "aux", "reuse",
                          "shared_bn"], [5, 1.5, 1, 2, 2, 0.7, 1, 1, 0.7, 0.4, 0.4])[0]
        if op in ("reuse", "shared_bn") and not allow_refused:
            op = "conv"
        if op == "conv":
            names, hw = b.conv_unit(c, rng.choice((4, 6, 8, 12)), hw)
            b.steps.append(("seq", names))
            c = b.mods[names[0]].out_channels
        elif op == "dw":
            names, hw = b.conv_unit(c, c, hw, groups=c)
            b.steps.append(("seq", names))
        elif op == "grouped" and c % 2 == 0:
            names, hw = b.conv_unit(c, c, hw, groups=2)
            b.steps.append(("seq", names))
        elif op == "res":
            mid = rng.choice((4, 6, 8))
            n1, _ = b.conv_unit(c, mid, hw, k=1)
            b.mods[n1[0]].stride = (1, 1)
            conv2 = nn.Conv2d(mid, c, 3, 1, 1, bias=rng.random() < 0.3)
            n2 = [b.add("conv", conv2), b.bn(c)]
            b.steps.append(("push", n1 + n2))
            b.steps.append(("add",))
        elif op == "cat":
            n1, _ = b.conv_unit(c, rng.choice((3, 5)), hw, k=rng.choice((1, 3)))
            b.mods[n1[0]].stride = (1, 1)
            b.steps.append(("push", n1))
            b.steps.append(("cat",))
            c += b.mods[n1[0]].out_channels
        elif op == "cat_self":
            b.steps.append(("cat_self",))
            c *= 2
        elif op == "gate":
            mid = max(2, c // 2)
            names = [b.add("conv", nn.Conv2d(c, mid, 1)), b.add("act", nn.ReLU()), b.add("conv", nn.Conv2d(mid, c, 1))]
            b.steps.append(("gate", names))
        elif op == "pool" and hw >= 4:
            pool = nn.MaxPool2d(2) if rng.random() < 0.5 else nn.AvgPool2d(2)
            b.steps.append(("seq", [b.add("pool", pool)]))
            hw //= 2
        elif op == "aux":
            b.steps.append(("aux", b.add("fc", nn.Linear(c, 5))))
        elif op == "reuse":
            conv = nn.Conv2d(c, c, 3, 1, 1, bias=False)
            name = b.add("conv", conv)
            b.steps.append(("seq", [name, b.add("act", nn.ReLU()), name]))
            b.refusal = "called more than once"
        elif op == "shared_bn" and b.last_bn is not None and b.mods[b.last_bn].num_features == c:
            conv = nn.Conv2d(c, c, 1, bias=False)
            b.steps.append(("seq", [b.add("conv", conv), b.last_bn]))
            b.refusal = "called more than once"
    classes = 7
    if hw <= 4 and rng.random() < 0.6:  # flatten a small map into a hidden Linear + BN1d unit
        hidden = rng.choice((6, 10))
        names = [b.add("fc", nn.Linear(c * hw * hw, hidden, bias=rng.random() < 0.5)), b.bn(hidden, dims=1),
                 b.add("act", nn.ReLU()), b.add("fc", nn.Linear(hidden, classes))]
        b.steps.append(("head_flat", names))
    else:
        b.steps.append(("head_gap", [b.add("fc", nn.Linear(c, classes))]))
    torch.manual_seed(seed)
    model = RandomNet(b.steps, b.mods)
    randomize(model, seed)
    return model, shape, b.refusal


def randomize(model: nn.Module, seed: int) -> None:
    """Non-trivial γ (some below γ0 = 1 so rescaling acts), β, running statistics and biases."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
                n = m.num_features
                if m.affine:
                    m.weight.copy_(torch.rand(n, generator=g) * 1.4 + 0.1)
                    m.bias.copy_(torch.randn(n, generator=g) * 0.1)
                m.running_mean.copy_(torch.randn(n, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
            elif isinstance(m, (nn.Conv2d, nn.Linear)) and m.bias is not None:
                m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.2)
