"""The baselines on a fixed split, built in place before training: BL-CA's CA form on a half/half split (paper
Table 1) and BL-2H's two disjoint halves of equal width (NR-CR's form with its two heads: the control for them)."""
from __future__ import annotations

import torch
import torch.nn as nn

from nr_study.nr.cost import widths_cost
from nr_study.nr.graph import ChannelGraph, build_graph, split_sides
from nr_study.nr.schemes import CAConv, conv_like
from nr_study.nr.surgery import apply_surgery, base_cost


def split_to_ca(model: nn.Module, input_shape, impl: str = "two", graph: ChannelGraph | None = None) -> nn.Module:
    """BL-CA: every conv reading a free group takes the CA form on a fixed half/half split, in place.

    Channel order, parameter count and biases are unchanged: the dense weight is cut into its four blocks
    (a conv writing a fixed group has no R outputs: W_SS and W_RS only)."""
    graph = graph or build_graph(model, input_shape)
    base_cost(model, graph)
    modules = dict(model.named_modules())
    s_of = {g.id: g.width - g.width // 2 for g in graph.free_groups()}
    for layer in graph.layers:
        old = modules[layer.name]
        if layer.kind != "conv" or type(old) is not nn.Conv2d:
            continue
        is_r = torch.cat([torch.arange(graph.groups[g].width).repeat_interleave(f) >= s_of[g] if g in s_of
                          else torch.zeros(graph.groups[g].width * f, dtype=torch.bool) for g, f in layer.in_layout])
        s_pos, r_pos = torch.nonzero(~is_r).flatten(), torch.nonzero(is_r).flatten()
        s_out = s_of.get(layer.out_group, old.out_channels)
        r_out = old.out_channels - s_out
        if not len(r_pos):
            continue  # reads no R channel: nothing to attend to
        w, dev = old.weight.detach(), old.weight.device
        inner = conv_like(old, len(s_pos), s_out, bias=old.bias is not None)
        w_sr = conv_like(old, len(s_pos), r_out) if r_out else None
        w_r = conv_like(old, len(r_pos), old.out_channels)
        with torch.no_grad():
            inner.weight.copy_(w[:s_out][:, s_pos.to(dev)])
            if old.bias is not None:
                inner.bias.copy_(old.bias[:s_out])
            if w_sr is not None:
                w_sr.weight.copy_(w[s_out:][:, s_pos.to(dev)])
            w_r.weight.copy_(w[:, r_pos.to(dev)])
        bias_r = old.bias.detach()[s_out:] if old.bias is not None and r_out else None
        new = CAConv(s_pos, r_pos, inner, w_sr, w_r, old, s_out, r_out, impl=impl, bias_r=bias_r)
        model.set_submodule(layer.name, new.train(old.training))
    graph.sides = split_sides(model, graph)
    return model


def split_halves(model: nn.Module, input_shape, target_ratio: float = 1.0, constraint: str = "params",
                 graph: ChannelGraph | None = None) -> tuple[nn.Module, dict]:
    """BL-2H, in place: every free group becomes two halves of equal width S and R, NR-CR's form (no cross
    blocks, so two disjoint sub-networks up to the layers with fixed outputs), the widths the largest whose cost
    is at most target_ratio · C. The weights are not a trained net's: the caller initialises them (it trains from
    step 1). Returns (model, {producer: half width})."""
    graph = graph or build_graph(model, input_shape)
    target = target_ratio * base_cost(model, graph)[constraint]
    free = graph.free_groups()

    def halves(m: float) -> dict[int, int]:  # at most the current width: the surgery keeps h of its channels
        return {g.id: min(g.width, max(1, int(m * g.width / 2))) for g in free}

    def cost(m: float) -> int:
        h = halves(m)
        return widths_cost(graph, h, h, constraint, scheme="cr")

    if cost(0.0) > target:
        raise ValueError(f"target_ratio: {target_ratio}: two halves of one channel each cost {cost(0.0)} "
                         f"{constraint}, more than the target {int(target)}; allowed: a larger target_ratio")
    lo, hi = 0.0, 2.0
    for _ in range(60):  # the largest m whose (step-function) cost fits
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if cost(mid) <= target else (lo, mid)
    h = halves(lo)
    apply_surgery(model, graph, {g.id: torch.arange(h[g.id]) for g in free}, dict(h), scheme="cr")
    return model, {g.producer: h[g.id] for g in free}
