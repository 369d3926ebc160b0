"""Resource cost c(A) and utilization U(θ), r = U/c (paper §3.1.2), by mask feed-forward over the graph.

Params of a conv = |M_in|·|M_out|·Kh·Kw / groups; FLOPs (multiply-adds) = params·Oh·Ow; linear = |M_in|·|M_out|.
BN and biases are not counted. Nothing here runs the network: each layer reads the live counts of the
groups it consumes, so a monitor step costs a few microseconds per layer.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn as nn

from nr_study.nr.settings import CONSTRAINTS
from nr_study.nr.graph import ChannelGraph, Layer
from nr_study.nr.schemes import CRConv


def _check_constraint(constraint: str) -> None:
    if constraint not in CONSTRAINTS:
        raise ValueError(f"constraint: {constraint!r} is not allowed; allowed: params, flops")


def _submodule(model: nn.Module, name: str) -> nn.Module:
    """model.get_submodule(name) without its per-level checks (a monitor step resolves every layer)."""
    for atom in name.split(".") if name else ():
        model = model._modules[atom]
    return model


def live_masks(model: nn.Module, graph: ChannelGraph, threshold: float = 0.01) -> dict[int, torch.Tensor]:
    """Per free group: bool mask of live channels, |γ| >= threshold · max|γ| of its unit BN (paper §3.1.1).

    A layer never vanishes, nor does a side (S or R) of a split conv over it: where all of one is dead, its
    strongest channel counts as live. Pruning keeps exactly these channels, so U(θ) is the pruned cost."""
    groups = graph.free_groups()
    if not groups:
        return {}
    # vectorised over all groups (a monitor step runs a handful of ops, not a few per layer)
    gammas = [_submodule(model, g.bn).weight.detach() for g in groups]
    widths = [len(x) for x in gammas]
    flat = torch.cat(gammas).abs()
    seg = torch.repeat_interleave(torch.arange(len(groups), device=flat.device),
                                  torch.tensor(widths, device=flat.device))
    top = flat.new_zeros(len(groups)).scatter_reduce_(0, seg, flat, "amax", include_self=False)
    live = (flat >= threshold * top[seg]) & (top[seg] > 1e-12)
    masks = dict(zip((g.id for g in groups), live.split(widths)))
    if graph.sides or bool((top <= 1e-12).any()):
        masks = {gid: keep_one_per_side(m, gamma.abs(), [torch.arange(len(m))] + graph.sides.get(gid, []))
                 for (gid, m), gamma in zip(masks.items(), gammas)}
    return masks


def silence_weakest(model: nn.Module, graph: ChannelGraph, fraction: float) -> None:
    """Zero the γ of the weakest ``fraction`` of every free group's channels in its unit BN (at least one stays):
    dead channels on demand, spread over every layer the way L1 leaves them (the smoke's way to rejuvenate now)."""
    with torch.no_grad():
        for g in graph.free_groups():
            gamma = _submodule(model, g.bn).weight
            k = min(int(fraction * len(gamma)), len(gamma) - 1)
            gamma[gamma.abs().argsort(stable=True)[:k]] = 0.0


def keep_one_per_side(mask: torch.Tensor, score: torch.Tensor, sides: list[torch.Tensor]) -> torch.Tensor:
    """``mask`` with, in every index set of ``sides`` that it leaves empty, the highest-scoring channel added."""
    out = mask.clone()
    for idx in sides:
        idx = idx.to(mask.device)
        if len(idx) and not bool(out[idx].any()):
            out[idx[score[idx].argmax()]] = True
    return out


def _segment_mask(graph: ChannelGraph, layout, masks) -> torch.Tensor:
    parts = []
    for g, f in layout:
        m = masks.get(g)
        if m is None:
            m = torch.ones(graph.groups[g].width, dtype=torch.bool)
        parts.append(m.cpu().repeat_interleave(f) if f > 1 else m.cpu())
    return torch.cat(parts)


def layer_cost(layer: Layer, n_in: int, n_out: int, constraint: str) -> int:
    per_pos = n_in * n_out * layer.kernel // layer.groups
    return per_pos * layer.out_hw if constraint == "flops" else per_pos


def _depthwise(layer: Layer, n_in: int, constraint: str) -> int:
    return n_in * layer.kernel * (layer.out_hw if constraint == "flops" else 1)


@dataclass
class LayerUtil:
    name: str
    width: int
    live_width: int
    fixed: bool
    reason: str | None = None


@dataclass
class Utilization:
    constraint: str
    live: int
    total: int
    layers: list[LayerUtil] = field(default_factory=list)

    @property
    def ratio(self) -> float:
        return self.live / self.total if self.total else 1.0


def graph_utilization(model: nn.Module, graph: ChannelGraph, constraint: str = "params",
                      threshold: float = 0.01, masks: dict[int, torch.Tensor] | None = None) -> Utilization:
    """c(A) (all channels) and U(θ) (dead channels masked out) for the model the graph describes."""
    _check_constraint(constraint)
    masks = live_masks(model, graph, threshold) if masks is None else masks
    live_n = _live_counts(masks)
    total = live = 0
    for layer in graph.layers:
        module = _submodule(model, layer.name)
        if layer.kind == "depthwise":
            total += _depthwise(layer, graph.width(layer.in_layout), constraint)
            live += _depthwise(layer, _count(graph, layer.in_layout, live_n), constraint)
        elif isinstance(module, CRConv):
            in_mask = _segment_mask(graph, layer.in_layout, masks)
            out_mask = _segment_mask(graph, ((layer.out_group, 1),), masks)
            ones_in, ones_out = torch.ones_like(in_mask), torch.ones_like(out_mask)
            for idx, out_slice in module.blocks():
                idx = idx.cpu()
                total += layer_cost(layer, int(ones_in[idx].sum()), int(ones_out[out_slice].sum()), constraint)
                live += layer_cost(layer, int(in_mask[idx].sum()), int(out_mask[out_slice].sum()), constraint)
        else:
            w_out = graph.groups[layer.out_group].width
            total += layer_cost(layer, graph.width(layer.in_layout), w_out, constraint)
            live += layer_cost(layer, _count(graph, layer.in_layout, live_n),
                               live_n.get(layer.out_group, w_out), constraint)
    per_group = [LayerUtil(g.producer or "input", g.width, live_n.get(g.id, g.width), not g.free,
                           g.fixed_reason) for g in graph.groups.values() if g.producer is not None]
    return Utilization(constraint, live, total, per_group)


def min_reachable_ratio(model: nn.Module, graph: ChannelGraph, constraint: str = "params") -> float:
    """The smallest r(θ) the L1 pressure can reach: every free channel dead but one per layer (and side).

    Fixed groups never die, so a model they dominate (grouped convs, gates, residual streams) may never
    get under a given Tr; the hook refuses such a Tr up front instead of growing λ forever."""
    one = {g.id: torch.arange(g.width) == 0 for g in graph.free_groups()}
    one = {gid: keep_one_per_side(m, torch.ones(len(m)), graph.sides.get(gid, [])) for gid, m in one.items()}
    return graph_utilization(model, graph, constraint, masks=one).ratio


def _live_counts(masks: dict[int, torch.Tensor]) -> dict[int, int]:
    """Live channels per group, read back in one host transfer (one sync on CUDA instead of one per group)."""
    if not masks:
        return {}
    ms = list(masks.values())
    widths = [m.numel() for m in ms]
    if len({m.device for m in ms}) == 1 and min(widths) > 0:
        ends = torch.tensor(widths, device=ms[0].device).cumsum(0) - 1
        totals = torch.cat([m.flatten() for m in ms]).cumsum(0)[ends]
        return dict(zip(masks, totals.diff(prepend=totals.new_zeros(1)).tolist()))
    return {gid: int(m.sum()) for gid, m in masks.items()}


def _count(graph: ChannelGraph, layout, counts: dict[int, int]) -> int:
    return sum(counts.get(g, graph.groups[g].width) * f for g, f in layout)


def widths_cost(graph: ChannelGraph, s: dict[int, int], r: dict[int, int], constraint: str,
                scheme: str = "nr") -> int:
    """Cost of the architecture with group g holding s[g] survivors and r[g] new channels.

    Under NR-CR a conv whose input and output both hold new channels has no cross blocks, so it costs
    |S_in|·|S_out| + |R_in|·|R_out|; everything else is dense. Groups missing from s/r keep their width.
    """
    total = 0
    for layer in graph.layers:
        s_in = sum(s.get(g, graph.groups[g].width) * f for g, f in layer.in_layout)
        r_in = sum(r.get(g, 0) * f for g, f in layer.in_layout)
        if layer.kind == "depthwise":
            total += _depthwise(layer, s_in + r_in, constraint)
            continue
        s_out = s.get(layer.out_group, graph.groups[layer.out_group].width)
        r_out = r.get(layer.out_group, 0)
        if scheme == "cr" and layer.kind == "conv" and r_in and r_out:
            total += layer_cost(layer, s_in, s_out, constraint) + layer_cost(layer, r_in, r_out, constraint)
        else:
            total += layer_cost(layer, s_in + r_in, s_out + r_out, constraint)
    return total
