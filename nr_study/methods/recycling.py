"""What ReDo and CBP share: which units they may recycle, the activation they score a unit by, and recycling a
unit in place.

Units are the channels of the core's free channel groups (nr_study.nr.graph): a conv (or linear) whose channels
go straight into one BatchNorm, outside residual adds, gates and grouped convs. Fixed groups and the classifier
are never recycled (the network's output is always fixed). A unit's weights come from the graph as the surgery
reads them: its producer's rows and bias (incoming), every BN over its channels and every depthwise conv on its
path (part of the unit), and the columns of every dense layer that reads it, through concatenations and flattens
(outgoing). Recycling re-initialises the incoming weights with the rule NR gives its new channels (He-normal,
fan-out of the whole layer), resets the BNs (γ 1, β 0, running mean 0, var 1) and depthwise weights like them,
zeroes the outgoing weights, and zeroes the optimizer state of all of them. With its outgoing weights at zero a
recycled unit changes nothing the network computes at that moment, in train or eval mode: every path from a free
channel to the output goes through a dense reader (anything else would have fixed the group).

The activation of a unit is what its first dense reader reads of it (after the nonlinearity, pooling, a
flatten): mean |x| over the batch and positions, reduced on the device by a forward pre-hook, only while the
model trains with gradients on (not in evaluation, BN recalibration or tracing)."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Optional

import torch
import torch.nn as nn

from nr_study.errors import ConfigError
from nr_study.methods.base import prunable_graph

if TYPE_CHECKING:
    from nr_study.nr.graph import ChannelGraph


@dataclass
class Slot:
    """Where a layer holds a group's channels: channel c of the group is at positions offset + c·factor ..
    offset + (c + 1)·factor − 1 of the layer's channels (factor > 1 after a flatten)."""

    name: str
    offset: int
    factor: int = 1


@dataclass
class UnitGroup:
    """One free channel group: its channels are the units. ``readers`` are the dense layers reading them (their
    columns are the outgoing weights; the first one's input is the activation scored)."""

    gid: int
    width: int
    producer: str
    norms: list[Slot] = field(default_factory=list)
    depthwise: list[Slot] = field(default_factory=list)
    readers: list[Slot] = field(default_factory=list)


def unit_groups(model: nn.Module, input_shape: tuple, method: str, model_name: str) -> list[UnitGroup]:
    """The free channel groups of ``model`` with their weights, or a one-line ConfigError: a model with no free
    group, with NR's split convolutions (their blocks are not one weight per unit), or with a free group no
    dense layer reads (its activation could not be scored)."""
    from nr_study.nr.schemes import SPLIT_CONVS

    split = next((n for n, m in model.named_modules() if isinstance(m, SPLIT_CONVS)), None)
    if split is not None:
        raise ConfigError(f"method {method}: model {model_name!r} has a split convolution ({split!r}, NR's CR/CA "
                          f"form); {method} recycles units of dense layers; allowed: a model without split convs")
    graph = prunable_graph(model, input_shape, method, model_name)
    groups = {g.id: UnitGroup(g.id, g.width, g.producer) for g in graph.free_groups()}
    for bn in graph.bns:
        for gid, offset, factor in _segments(graph, bn.layout):
            if gid in groups:
                groups[gid].norms.append(Slot(bn.name, offset, factor))
    for layer in graph.layers:
        for gid, offset, factor in _segments(graph, layer.in_layout):
            if gid not in groups:
                continue
            if layer.kind == "depthwise":
                groups[gid].depthwise.append(Slot(layer.name, offset, factor))
            elif layer.kind in ("conv", "linear"):
                groups[gid].readers.append(Slot(layer.name, offset, factor))
            else:  # pragma: no cover - a grouped conv fixes what it reads
                raise AssertionError(f"free group read by {layer.kind} layer {layer.name!r}")
    unread = [g.producer for g in groups.values() if not g.readers]
    if unread:
        raise ConfigError(f"method {method}: model {model_name!r}: no layer reads the channels of {unread[0]!r}, so "
                          f"their activations cannot be scored; allowed: models whose every BN-followed conv feeds "
                          f"a later conv or linear layer")
    return list(groups.values())


def _segments(graph: ChannelGraph, layout) -> list[tuple[int, int, int]]:
    """(group, offset, factor) of each segment of a layout (a group appears twice after a cat of one tensor)."""
    out, offset = [], 0
    for gid, factor in layout:
        out.append((gid, offset, factor))
        offset += graph.groups[gid].width * factor
    return out


def _positions(slot: Slot, idx: torch.Tensor) -> torch.Tensor:
    """The layer positions of channels ``idx`` of the group (all ``factor`` positions of each)."""
    if slot.factor == 1:
        return idx + slot.offset
    return (idx[:, None] * slot.factor + torch.arange(slot.factor, device=idx.device)).flatten() + slot.offset


class Probe:
    """|activation| of every unit on a training forward: a forward pre-hook on each group's first reader reduces
    its input on the device (one L1 norm per group, no host sync) into ``sums[i]`` (float32, per channel: the
    sum of |x| over the batch and positions) and ``counts[i]`` (how many values each sum holds), so the mean is
    sums[i] / counts[i] and a per-step user can fold the division into its own update."""

    def __init__(self, model: nn.Module, groups: list[UnitGroup]):
        self.model, self.groups = model, groups
        self.sums: list[Optional[torch.Tensor]] = [None] * len(groups)
        self.counts: list[int] = [0] * len(groups)
        self.handles: list = []

    @property
    def attached(self) -> bool:
        return bool(self.handles)

    def attach(self) -> None:
        if self.handles:
            return
        mods = dict(self.model.named_modules())
        for i, g in enumerate(self.groups):
            slot = g.readers[0]
            self.handles.append(mods[slot.name].register_forward_pre_hook(self._hook(i, slot, g.width)))

    def detach(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []

    def take(self) -> list[Optional[tuple[torch.Tensor, int]]]:
        """(sum, count) per group from the last training forward (None: none reached its reader), cleared: a
        reduction is used once."""
        out = [None if s is None else (s, n) for s, n in zip(self.sums, self.counts)]
        self.sums = [None] * len(self.groups)
        return out

    def _hook(self, i: int, slot: Slot, width: int):
        def hook(module, args):
            if not (module.training and torch.is_grad_enabled()):  # evaluation, BN recalibration, tracing
                return
            x = args[0].detach()
            seg = x.narrow(1, slot.offset, width * slot.factor)
            if slot.factor > 1:  # a flatten: (N, width·factor) -> (N, width, factor)
                seg = seg.reshape(seg.shape[0], width, slot.factor)
                dims = (0, 2)
            else:
                dims = tuple(d for d in range(seg.dim()) if d != 1)
            self.sums[i] = torch.linalg.vector_norm(seg, ord=1, dim=dims, dtype=torch.float32)
            self.counts[i] = seg.numel() // width
        return hook


def outgoing_sum(group: UnitGroup, mods: dict) -> tuple[torch.Tensor, int]:
    """(Σ |w| over every outgoing weight of each unit — all readers' columns —, how many weights each sum
    holds): float32 on the device, one reduction per reader."""
    total, count = None, 0
    for slot in group.readers:
        w = mods[slot.name].weight.detach()
        cols = w.narrow(1, slot.offset, group.width * slot.factor)
        if w.dim() == 2:
            cols = cols.reshape(w.shape[0], group.width, slot.factor)
            s = torch.linalg.vector_norm(cols, ord=1, dim=(0, 2), dtype=torch.float32)
        else:
            s = torch.linalg.vector_norm(cols, ord=1, dim=tuple(d for d in range(w.dim()) if d != 1),
                                         dtype=torch.float32)
        total = s if total is None else total + s
        count += cols.numel() // group.width
    return total, count


def _he_normal(like: torch.Tensor, n: int) -> torch.Tensor:
    """n new rows for ``like`` (a weight, out × ...): He-normal with the fan-out of the whole layer, NR's rule for
    new channels (nr.surgery), so ReDo, CBP and NR-IP differ only in which units they renew and when."""
    fan_out = like.shape[0] * math.prod(like.shape[2:])
    return torch.randn((n, *like.shape[1:]), device=like.device, dtype=like.dtype) * math.sqrt(2.0 / max(1, fan_out))


@torch.no_grad()
def recycle_units(model: nn.Module, picks: list[tuple[UnitGroup, torch.Tensor]], opt=None,
                  mods: Optional[dict] = None) -> None:
    """Recycle, in place, channels ``idx`` of each ``(group, idx)`` (long tensors on the model's device, whose
    lengths are known without a host sync): incoming weights re-initialised and BNs reset for all of them first,
    then every outgoing weight zeroed, so a weight that is both a recycled unit's outgoing and another's incoming
    ends at zero (dopamine's order: a recycled unit's outgoing weights are all zero); the optimizer state of
    every edited entry is zeroed."""
    from nr_study.nr.optim_state import zero_optimizer_state

    picks = [(g, idx) for g, idx in picks if idx.shape[0]]
    mods = mods or dict(model.named_modules())
    for group, idx in picks:
        n = idx.shape[0]
        _renew_rows(mods[group.producer], idx, n, opt)
        for slot in group.depthwise:  # on the unit's path: a fresh filter, like a new channel's
            _renew_rows(mods[slot.name], _positions(slot, idx), n, opt)
        for slot in group.norms:
            bn, pos = mods[slot.name], _positions(slot, idx)
            if bn.affine:
                bn.weight.index_fill_(0, pos, 1.0)
                bn.bias.index_fill_(0, pos, 0.0)
                zero_optimizer_state(opt, bn.weight, pos)
                zero_optimizer_state(opt, bn.bias, pos)
            if bn.track_running_stats:
                bn.running_mean.index_fill_(0, pos, 0.0)
                bn.running_var.index_fill_(0, pos, 1.0)
    for group, idx in picks:
        for slot in group.readers:
            w, pos = mods[slot.name].weight, _positions(slot, idx)
            w.index_fill_(1, pos, 0.0)
            zero_optimizer_state(opt, w, pos, 1)


def _renew_rows(layer: nn.Module, rows: torch.Tensor, n: int, opt) -> None:
    from nr_study.nr.optim_state import zero_optimizer_state

    w = layer.weight
    w.index_copy_(0, rows, _he_normal(w, n))
    zero_optimizer_state(opt, w, rows)
    if layer.bias is not None:
        layer.bias.index_fill_(0, rows, 0.0)
        zero_optimizer_state(opt, layer.bias, rows)


def dormant_mask(total: torch.Tensor, count: int, tau: float) -> torch.Tensor:
    """ReDo's rule: score = mean |activation| / the layer's mean score (+1e-9, dopamine's), dormant when <= τ;
    ``total``/``count`` as the Probe reduces them."""
    mean = total / count
    return mean / (mean.mean() + 1e-9) <= tau
