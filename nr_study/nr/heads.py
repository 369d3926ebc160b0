"""NR-CR's two classifiers, as the official code trains them (nr.cr_heads: separate), and the two-halves model.

After an NR-CR rejuvenation the convolutions have no cross blocks, so S (the survivors) and R (the new channels)
are two disjoint sub-networks up to the classifier. The official code runs the classifier twice with the same
weights and bias: once with R's input features zeroed (S's logits), once with S's zeroed (R's logits); the loss is
CE(S) + CE(R) and the prediction comes from their sum. `SplitHeads` does that with a forward hook on the head
layer — the model itself is unchanged, so its graph, cost and checkpoints are those of the joint model — and
nr.splits.split_halves builds the control that trains such two halves from the first step (BL-2H).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from nr_study.nr.graph import ChannelGraph, build_graph


def head_layer(model: nn.Module, graph: ChannelGraph):
    """The one layer whose output is the model's output (read by no other layer or BN), if it is a Linear:
    otherwise ValueError naming what was found. Two classifiers are defined for one linear head, whose logits
    are the output (a 1x1 convolution head may be followed by a ReLU or a pool, which the sum would not pass)."""
    heads = graph.head_layers()
    modules = dict(model.named_modules())
    if len(heads) != 1:
        names = ", ".join(repr(h.name) for h in heads) or "none"
        raise ValueError(f"nr.cr_heads: separate needs exactly one output layer; found {names}; allowed: "
                         "nr.cr_heads joint")
    layer, m = heads[0], modules[heads[0].name]
    if type(m) is not nn.Linear:
        raise ValueError(f"nr.cr_heads: separate: the output layer {layer.name!r} is a {type(m).__name__}; "
                         "allowed: a Linear classifier, or nr.cr_heads joint")
    return layer, m


def r_features(graph: ChannelGraph, layer, survivors: dict[str, int]) -> torch.Tensor | None:
    """Which input features of the head belong to R. ``survivors``: |S| per producer of a split group, as a
    rejuvenation reports it (its channels are [S; R]); None when no group the head reads has an R side."""
    parts = []
    for gid, f in layer.in_layout:
        group = graph.groups[gid]
        is_r = torch.zeros(group.width, dtype=torch.bool)
        if group.producer in survivors:
            is_r[survivors[group.producer]:] = True
        parts.append(is_r.repeat_interleave(f))
    is_r = torch.cat(parts)
    return is_r if bool(is_r.any()) else None


class SplitHeads:
    """The head layer run on S's and on R's features (same weights and bias): the model outputs their sum, and
    `outputs()` gives each for the loss and the per-head errors. Installed as a forward hook; `remove()`.
    ``survivors``: |S| per split group's producer (a rejuvenation's report, or nr.splits.split_halves')."""

    def __init__(self, model: nn.Module, input_shape, survivors: dict[str, int], graph: ChannelGraph | None = None):
        graph = graph or build_graph(model, input_shape)
        check_two_heads(model, graph)
        self.layer, self.module = head_layer(model, graph)
        is_r = r_features(graph, self.layer, survivors)
        self.active = is_r is not None
        self._last: dict[str, torch.Tensor] = {}
        self._handle = None
        if self.active:
            w = self.module.weight
            self.s_mask = (~is_r).to(device=w.device, dtype=w.dtype).view(1, -1)
            self.r_mask = is_r.to(device=w.device, dtype=w.dtype).view(1, -1)
            self._handle = self.module.register_forward_hook(self._hook)

    def _hook(self, module, inputs, output):
        x, m = inputs[0], self.module
        s = F.linear(x * self.s_mask.to(x.dtype), m.weight, m.bias)
        r = F.linear(x * self.r_mask.to(x.dtype), m.weight, m.bias)
        self._last = {"s": s, "r": r}
        return s + r

    def outputs(self) -> dict[str, torch.Tensor]:
        """The last forward's logits of each head ({} before R exists)."""
        return self._last

    def loss(self, y: torch.Tensor) -> torch.Tensor:
        """CE(S logits) + CE(R logits), the official NR-CR loss."""
        return sum(F.cross_entropy(v.float(), y) for v in self._last.values())

    def remove(self) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle, self._last, self.active = None, {}, False


def check_two_heads(model: nn.Module, graph: ChannelGraph) -> None:
    """Two classifiers need S and R apart up to the head: under NR-CR every convolution over prunable channels
    writing prunable channels becomes two blocks (S->S, R->R), a depthwise one stays per channel; any other layer
    over prunable channels (a conv writing a fixed group such as a residual stream, a hidden Linear) would mix
    them. Checked before training (and again on the split model): ValueError naming the first such layer."""
    layer, _ = head_layer(model, graph)
    for other in graph.layers:
        if other is layer or other.kind == "depthwise" or not any(graph.groups[g].free for g, _ in other.in_layout):
            continue
        if not (other.kind == "conv" and graph.groups[other.out_group].free):
            what = "a conv writing a fixed group" if other.kind == "conv" else f"a {other.kind} layer"
            raise ValueError(f"nr.cr_heads: separate: {other.name!r} ({what}) reads prunable channels, so S and R "
                             f"would mix before the output layer {layer.name!r}; allowed: nr.cr_heads joint on this "
                             "model")
