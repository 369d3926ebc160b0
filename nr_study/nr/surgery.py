"""Dead neuron rejuvenation (paper §3.2): remove dead channels, reallocate the budget, reinitialise, rescale.

Every free group g goes from width w to w'' = [S; R]: S its survivors (old order), R new channels.
The shared expansion rate α is the largest one whose widths w'' = floor(α·w') meet the target cost
(bisection: √(all/live) is right only when every layer is free). α is never below 1: every live channel
survives (DESIGN §3.3 item 7); where the live channels alone exceed the target the rejuvenation is refused,
and where only NR-CR's densification would exceed it the CR blocks are kept and nothing is added.
Reinitialisation keeps the function of the pruned network: W_S→S kept, W_R→S = 0, W_S→R = 0, W_R→R Kaiming,
R's γ = γ0, β = 0. Where a layer has no R input (it reads the image or a fixed residual stream) its R outputs
are initialised from all inputs instead, since otherwise they would be constant. The same code prunes (no new
channels) for Network Slimming and for the utilization invariants.

Every new weight block is drawn with one rule, the layer's own Kaiming init (He-normal, ReLU gain, fan-out
of the whole new layer), whatever the scheme. A conv bias stays with its block: b_S with W_SS, b_R (zero)
with W_RR.
"""
from __future__ import annotations

import copy
import math
from dataclasses import asdict, dataclass, field

import torch
import torch.nn as nn

from torch.nn.utils import skip_init

from nr_study.nr.settings import SCHEMES
from nr_study.nr.optim_state import ParamSources
from nr_study.nr.cost import CONSTRAINTS, graph_utilization, keep_one_per_side, live_masks, widths_cost
from nr_study.nr.graph import ChannelGraph, Layer, build_graph, split_sides
from nr_study.nr.schemes import CAConv, CRConv, conv_like


@dataclass
class RejuvenationReport:
    alpha: float
    constraint: str
    scheme: str
    rescale: bool
    realloc: bool
    target_ratio: float
    target: int  # target ratio · c(A as first built)
    cost_before: int  # c(A)
    utilized: int  # U(θ)
    cost_after: int  # c(A'')
    widths_before: dict[str, int] = field(default_factory=dict)
    widths_live: dict[str, int] = field(default_factory=dict)
    widths_after: dict[str, int] = field(default_factory=dict)
    survivors: dict[str, int] = field(default_factory=dict)  # |S| per layer
    rejuvenated: dict[str, int] = field(default_factory=dict)  # |R| per layer
    rescaled_channels: int = 0
    rescale_skipped: dict[str, str] = field(default_factory=dict)
    round_to: int = 1  # the multiple the new widths are in (1: exact floor(α·w'))
    no_growth: str | None = None  # why this rejuvenation added no channel (it still removed the dead ones)
    sources: ParamSources | None = field(default=None, repr=False, compare=False)  # asked for: sources=True

    def as_dict(self) -> dict:
        return {k: v for k, v in asdict(self).items() if k != "sources"}


# ---------------------------------------------------------------------------------------------------
# budget


def base_cost(model: nn.Module, graph: ChannelGraph) -> dict[str, int]:
    """c(A) of the model as first built; stored on the model so repeated rejuvenations share one C."""
    if getattr(model, "nr_base_cost", None) is None:
        model.nr_base_cost = {c: graph_utilization(model, graph, c, masks={}).total for c in CONSTRAINTS}
    return model.nr_base_cost


def expansion_widths(w_prime: dict[int, int], alpha: float, multiple: int = 1) -> dict[int, int]:
    """w'' = floor(α·w'), or floor(α·w'/m)·m (at least m) in multiples of m."""
    return {g: multiple * max(1, math.floor(alpha * w / multiple)) for g, w in w_prime.items()}


def split_counts(w_prime: dict[int, int], widths: dict[int, int]) -> tuple[dict[int, int], dict[int, int]]:
    """(|S|, |R|) per group: survivors fill first. A width below w' is only ever a cost probe (α < 1 while
    bisecting): rejuvenate() builds widths of at least w', since it never removes a live channel."""
    s = {g: min(widths[g], w_prime[g]) for g in widths}
    return s, {g: widths[g] - s[g] for g in widths}


def solve_alpha(graph: ChannelGraph, w_prime: dict[int, int], target: float, constraint: str,
                scheme: str = "nr") -> float:
    """Largest α with cost(floor(α·w')) <= target, by bisection on the step function of α."""

    def cost(alpha: float) -> int:
        return widths_cost(graph, *split_counts(w_prime, expansion_widths(w_prime, alpha)), constraint, scheme)

    if cost(0.0) > target:
        raise ValueError(f"target_ratio: the fixed layers alone cost {cost(0.0)} {constraint}, more than the "
                         f"target {int(target)}; allowed: a larger target_ratio")
    lo, hi = 0.0, 1.0
    while cost(hi) <= target:
        lo, hi = hi, hi * 2
        if hi > 2 ** 20:
            return lo  # nothing free to grow (every layer fixed): any α meets the target
    for _ in range(64):
        mid = (lo + hi) / 2
        if cost(mid) <= target:
            lo = mid
        else:
            hi = mid
    return lo


def rounded_widths(graph: ChannelGraph, w_prime: dict[int, int], alpha: float, multiple: int, target: float,
                   constraint: str, scheme: str = "nr") -> dict[int, int] | None:
    """α·w' in multiples of m, filling the budget. Each width starts at floor(α·w'/m)·m, never below its live
    channels rounded up to m (a rejuvenation keeps every live channel); the widths below their exact α·w' take
    one m more, largest remainder first, where the budget allows (so the layers keep the exact solution's
    proportions); then any group that still fits takes m more, the one furthest below α·w' first, until none
    fits: the widths are maximal (the remainder pass alone left up to 8 % of the budget unused on a small VGG).
    None: even the starting widths exceed the budget."""
    m = multiple
    widths = {g: max(m * math.floor(alpha * w / m), m * math.ceil(w / m)) for g, w in w_prime.items()}

    def cost(w: dict[int, int]) -> int:
        return widths_cost(graph, *split_counts(w_prime, w), constraint, scheme)

    def fill(order) -> bool:
        """One multiple more for each group of ``order`` in turn that the budget still allows."""
        grew = False
        for g in order:
            widths[g] += m
            if cost(widths) <= target:
                grew = True
            else:
                widths[g] -= m
        return grew

    if cost(widths) > target:
        return None
    fill(sorted((g for g in widths if alpha * w_prime[g] > widths[g]),
                key=lambda g: (-(alpha * w_prime[g] / m % 1), g)))
    while fill(sorted(widths, key=lambda g: (widths[g] / (alpha * w_prime[g] or 1.0), g))):
        pass
    return widths


class RoundToError(ValueError):
    """round_to's multiples, holding every live channel, cost more than the target on this model now."""


AUTO_ROUND_TO = 8  # round_to None: GPU kernels tile by 8 (and oneDNN on CPU blocks channels by 8 or 16)


# ---------------------------------------------------------------------------------------------------
# the public entry points


def rejuvenate(model: nn.Module, input_shape, target_ratio: float = 1.0, constraint: str = "params",
               scheme: str = "nr", rescale: bool = True, realloc: bool = True, inplace: bool = False,
               threshold: float = 0.01, gamma0: float = 1.0, graph: ChannelGraph | None = None,
               impl: str = "two", round_to: int | None = 1, sources: bool = False, gamma_new: float = 0.5,
               head_init: str = "zero"
               ) -> tuple[nn.Module, RejuvenationReport]:
    """Rejuvenate ``model``'s dead channels under target_ratio · c(A as first built); returns (model, report).

    ``sources``: also say where each entry of the new parameters came from (``report.sources``, a
    :class:`ParamSources`), so optimizer state such as SGD momentum can follow the surviving weights.

    ``round_to`` m > 1 puts the new widths in multiples of m (:func:`rounded_widths`; refused where they cannot
    meet the budget); None: multiples of 8 where they meet it, else the exact widths (the report says which).
    Refused (ValueError) where the live channels alone cost more than the target: no live channel is removed."""
    if constraint not in CONSTRAINTS:
        raise ValueError(f"constraint: {constraint!r} is not allowed; allowed: {', '.join(CONSTRAINTS)}")
    if scheme not in SCHEMES:
        raise ValueError(f"scheme: {scheme!r} is not allowed; allowed: {', '.join(SCHEMES)}")
    if not 0 < target_ratio <= 1:
        raise ValueError(f"target_ratio: {target_ratio!r} is not allowed; allowed: 0 < target_ratio <= 1")
    model, graph = _target(model, input_shape, graph, inplace)
    free = graph.free_groups()
    if not free:
        raise ValueError(f"model {type(model).__name__}: no free channel group to rejuvenate (every channel "
                         "is fixed by residual adds, grouped convs, gates or a missing BatchNorm)")
    target = target_ratio * base_cost(model, graph)[constraint]
    masks = live_masks(model, graph, threshold)  # a layer, and each side of a split conv, keeps a channel
    util = graph_utilization(model, graph, constraint, masks=masks)

    live_idx = {g.id: torch.nonzero(masks[g.id]).flatten() for g in free}
    w_prime = {gid: len(idx) for gid, idx in live_idx.items()}
    multiple, no_growth = 1, None
    dense_live = widths_cost(graph, w_prime, {}, constraint)  # every survivor S: the form the next net holds
    if not realloc:  # NR-IP: widths unchanged, dead channels reborn in place
        alpha, widths = 1.0, {g.id: g.width for g in free}
    elif dense_live <= target:  # so α >= 1: every live channel stays
        alpha = solve_alpha(graph, w_prime, target, constraint, scheme)
        widths = expansion_widths(w_prime, alpha)
        m = round_to or AUTO_ROUND_TO
        rounded = rounded_widths(graph, w_prime, alpha, m, target, constraint, scheme) if m > 1 else None
        if rounded is None and round_to is not None and round_to > 1:
            raise RoundToError(f"round_to: {m}: widths in multiples of {m} (at least {m} per layer, and at "
                               f"least the live channels) cost more than the target {int(target)} {constraint} "
                               "on this model; allowed: a smaller round_to, or 1 (exact widths)")
        if rounded is not None:
            multiple, widths = m, rounded
    elif util.live <= target:  # NR-CR blocks that would not fit made dense: kept, so nothing live is lost
        alpha, widths = 1.0, dict(w_prime)
        no_growth = (f"the live channels made dense (every survivor S) would cost {dense_live} {constraint}, "
                     f"more than the target {int(target)}: NR-CR's S and R blocks are kept apart, the dead "
                     "channels removed, none added")
    else:
        raise ValueError(f"target_ratio: {target_ratio}: the live channels alone cost {util.live} {constraint}, "
                         f"more than the target {int(target)}; a rejuvenation keeps every live channel (removing "
                         "live ones is Network Slimming's job); allowed: a target_ratio of at least "
                         f"{util.live / base_cost(model, graph)[constraint]:.3f}, or a rejuvenation once r(θ) "
                         "is below the target_ratio")
    assert all(widths[gid] >= n for gid, n in w_prime.items()), "a rejuvenation never removes a live channel"
    s_count, r_count = split_counts(w_prime, widths)

    report = RejuvenationReport(alpha, constraint, scheme, rescale, realloc, target_ratio, int(target),
                                util.total, util.live, 0, round_to=multiple, no_growth=no_growth)
    for g in free:
        report.widths_before[g.producer] = g.width
        report.widths_live[g.producer] = w_prime[g.id]
        report.widths_after[g.producer] = widths[g.id]
        report.survivors[g.producer] = s_count[g.id]
        report.rejuvenated[g.producer] = r_count[g.id]
    options = dict(scheme=scheme, gamma0=gamma0, impl=impl, densify_cr=no_growth is None, gamma_new=gamma_new,
                   head_init=head_init)
    if sources:
        report.sources = _sources(model, graph, live_idx, r_count, options, rescale)
    apply_surgery(model, graph, live_idx, r_count, rescale=rescale, report=report, **options)
    report.cost_after = graph_utilization(model, graph, constraint, masks={}).total
    return model, report


def _sources(model: nn.Module, graph: ChannelGraph, keep, n_new, options: dict, rescale: bool) -> ParamSources:
    """Where the surgery sends every kept entry (replayed without rescaling on a coded copy), and the factors
    neural rescaling puts on the kept entries' gradients (replayed on a copy of ones)."""
    out = ParamSources.of_surgery(model, lambda twin: apply_surgery(twin, copy.deepcopy(graph), keep, n_new,
                                                                    rescale=False, **options))
    if rescale:
        out.rescaled(model, {f"{bn.name}.weight" for bn in graph.bns},
                     lambda twin: _rescale(dict(twin.named_modules()), graph, keep, options["gamma0"], None))
    return out


def _target(model: nn.Module, input_shape, graph: ChannelGraph | None, inplace: bool):
    """The model and graph to operate on: copies of both unless ``inplace`` (the caller's graph is theirs)."""
    if not inplace:
        model = copy.deepcopy(model)
        graph = copy.deepcopy(graph) if graph is not None else None
    return model, graph or build_graph(model, input_shape)


def prune(model: nn.Module, input_shape, keep_masks: dict[str, torch.Tensor], inplace: bool = False,
          graph: ChannelGraph | None = None) -> nn.Module:
    """Physically remove channels: ``keep_masks`` maps a unit BN's name to the bool mask of channels to keep."""
    model, graph = _target(model, input_shape, graph, inplace)
    base_cost(model, graph)
    by_bn = {g.bn: g.id for g in graph.free_groups()}
    unknown = sorted(set(keep_masks) - set(by_bn))
    if unknown:
        raise ValueError(f"keep_masks: {unknown} are not prunable BatchNorms; allowed: {sorted(by_bn)}")
    modules = dict(model.named_modules())
    keep = {}
    for name, mask in keep_masks.items():
        gid = by_bn[name]
        mask = mask.flatten().to(torch.bool).cpu()
        if len(mask) != graph.groups[gid].width:
            raise ValueError(f"keep_masks['{name}']: {len(mask)} entries, the layer has {graph.groups[gid].width}")
        gamma = modules[name].weight.detach().abs().cpu()
        # like U(θ): a layer, and each side of a split conv, keeps its strongest channel
        mask = keep_one_per_side(mask, gamma, [torch.arange(len(mask))] + graph.sides.get(gid, []))
        keep[gid] = torch.nonzero(mask).flatten()
    apply_surgery(model, graph, keep, {gid: 0 for gid in keep}, scheme="nr", rescale=False)
    return model


# ---------------------------------------------------------------------------------------------------
# surgery


def apply_surgery(model: nn.Module, graph: ChannelGraph, keep: dict[int, torch.Tensor], n_new: dict[int, int],
                  scheme: str = "nr", rescale: bool = False, gamma0: float = 1.0, impl: str = "two",
                  report: RejuvenationReport | None = None, densify_cr: bool = False, gamma_new: float = 0.5,
                  head_init: str = "zero") -> None:
    """Rebuild, in place, every layer and BN touching a changed group: group g becomes [keep[g]; n_new[g] new].
    New channels start with BN γ = ``gamma_new``, β = 0; the model's output layers read them with zero weights
    (``head_init`` "zero": the function is kept) or N(0, 0.01) ("normal", the official code's classifier).

    ``densify_cr``: a rejuvenation makes every survivor S, so NR-CR's absent cross blocks become zeros
    (exact: the map is linear) and the layer is dense again; a prune keeps the CR blocks as they are."""
    modules = dict(model.named_modules())
    for layer in graph.layers if densify_cr else ():
        if isinstance(modules[layer.name], CRConv):
            old = modules[layer.name]
            dense = conv_like(old.conv_s, old.in_channels, old.out_channels, bias=old.conv_s.bias is not None)
            with torch.no_grad():
                dense.weight.copy_(old.to_dense())
                if dense.bias is not None:
                    dense.bias.copy_(old.dense_bias())
            model.set_submodule(layer.name, dense.train(old.training))
            modules[layer.name] = dense
    if rescale:
        _rescale(modules, graph, keep, gamma0, report)
    src = {}
    for gid, idx in keep.items():
        idx = idx.to(torch.long).cpu()
        src[gid] = torch.cat([idx, torch.full((n_new.get(gid, 0),), -1, dtype=torch.long)])

    def layout_src(layout) -> torch.Tensor:
        parts, offset = [], 0
        for g, f in layout:
            width = graph.groups[g].width
            s = src.get(g, torch.arange(width))
            if f > 1:
                s = torch.where(s[:, None] >= 0, s[:, None] * f + torch.arange(f), -1).flatten()
            parts.append(torch.where(s >= 0, s + offset, -1))
            offset += width * f
        return torch.cat(parts)

    heads = {layer.name for layer in graph.head_layers()}
    with torch.no_grad():
        for layer in graph.layers:
            in_src = layout_src(layer.in_layout)
            out_src = in_src if layer.kind == "depthwise" else layout_src(((layer.out_group, 1),))
            n_out = graph.width(layer.in_layout) if layer.kind == "depthwise" else graph.groups[layer.out_group].width
            if _unchanged(in_src, graph.width(layer.in_layout)) and _unchanged(out_src, n_out):
                continue
            new = _remap_layer(modules[layer.name], layer, in_src, out_src, scheme, impl)
            if head_init == "normal" and layer.name in heads and type(new) is nn.Linear:
                new_cols = torch.nonzero(in_src < 0).flatten().to(new.weight.device)
                new.weight[:, new_cols] = 0.01 * torch.randn(new.weight.shape[0], len(new_cols),
                                                             device=new.weight.device, dtype=new.weight.dtype)
            model.set_submodule(layer.name, new.train(modules[layer.name].training))
        for bn in graph.bns:
            s = layout_src(bn.layout)
            if not _unchanged(s, graph.width(bn.layout)):
                model.set_submodule(bn.name, _remap_bn(modules[bn.name], s, gamma_new))
    for gid, s in src.items():
        graph.groups[gid].width = len(s)
    graph.sides = split_sides(model, graph)


def _unchanged(src: torch.Tensor, old_width: int) -> bool:
    """True when a channel map keeps every old channel in place and adds none."""
    return len(src) == old_width and torch.equal(src, torch.arange(old_width))


def _rescale(modules, graph: ChannelGraph, keep, gamma0: float, report) -> None:
    """Neural rescaling: survivors with |γ| < γ0 get |γ| = γ0, β·s, and their readers' weights / s."""
    scales = {}
    for g in graph.free_groups():
        if g.id not in keep:
            continue
        if g.rescale_reason is not None:
            if report is not None:
                report.rescale_skipped[g.producer] = g.rescale_reason
            continue
        bn = modules[g.bn]
        gamma = bn.weight.detach()
        scale = torch.ones_like(gamma)
        idx = keep[g.id].to(gamma.device)
        small = idx[(gamma[idx].abs() < gamma0) & (gamma[idx] != 0)]
        scale[small] = gamma0 / gamma[small].abs()
        if report is not None:
            report.rescaled_channels += len(small)
        with torch.no_grad():
            bn.weight.mul_(scale)
            bn.bias.mul_(scale)
        scales[g.id] = scale
    with torch.no_grad():  # one division per reading layer, however many rescaled groups it concatenates
        for layer in graph.layers:
            if not any(gid in scales for gid, _ in layer.in_layout):
                continue
            weight = modules[layer.name]
            ref = next(iter(scales.values()))
            parts = [scales[gid].repeat_interleave(f) if gid in scales else
                     torch.ones(graph.groups[gid].width * f, device=ref.device, dtype=ref.dtype)
                     for gid, f in layer.in_layout]
            _scale_input(weight, torch.cat(parts))


def _scale_input(module: nn.Module, vec: torch.Tensor) -> None:
    if isinstance(module, CRConv):  # NR-CR blocks kept by a rejuvenation that could not densify them
        _scale_input(module.conv_s, vec[module.s_idx])
        _scale_input(module.conv_r, vec[module.r_idx])
    elif isinstance(module, CAConv):
        _scale_input(module.inner, vec[module.s_idx])
        if module.w_sr is not None:
            _scale_input(module.w_sr, vec[module.s_idx])
        if module.w_r is not None:
            _scale_input(module.w_r, vec[module.r_idx])
    elif isinstance(module, (nn.Conv2d, nn.Linear)):
        shape = (1, -1) + (1,) * (module.weight.dim() - 2)
        module.weight.div_(vec.view(shape))
    else:
        raise TypeError(f"cannot rescale the inputs of {type(module).__name__}")


def _kaiming(shape, like: torch.Tensor, fan_out: int) -> torch.Tensor:
    """He-normal values (ReLU gain) with the fan-out of the whole new layer, also when drawing one block."""
    return torch.randn(shape, device=like.device, dtype=like.dtype) * math.sqrt(2.0 / max(1, fan_out))


def _fan_out(template: nn.Module, n_out: int) -> int:
    """fan-out of a layer like ``template`` with ``n_out`` outputs, as nn.init.kaiming_normal_ computes it."""
    return n_out * (math.prod(template.kernel_size) if hasattr(template, "kernel_size") else 1)


def _new_dense(template: nn.Module, in_ch: int, out_ch: int, groups: int = 1) -> nn.Module:
    """An uninitialised layer shaped like ``template``: every caller overwrites its weights (and bias)."""
    has_bias = template.bias is not None
    dev, dtype = template.weight.device, template.weight.dtype
    if isinstance(template, nn.Linear):
        return skip_init(nn.Linear, in_ch, out_ch, bias=has_bias, device=dev, dtype=dtype)
    return skip_init(nn.Conv2d, in_ch, out_ch, template.kernel_size, template.stride, template.padding,
                     template.dilation, groups=groups, bias=has_bias, padding_mode=template.padding_mode,
                     device=dev, dtype=dtype)


def _remap_dense_weight(w: torch.Tensor, in_src: torch.Tensor, out_src: torch.Tensor, fan_out: int) -> torch.Tensor:
    """[S_out; R_out] × [S_in; R_in]: W_SS copied, W_RS = W_SR = 0, W_RR Kaiming (or R from all if no R_in)."""
    dev = w.device
    in_src, out_src = in_src.to(dev), out_src.to(dev)
    new = w.new_zeros((len(out_src), len(in_src)) + tuple(w.shape[2:]))
    s_out, s_in = torch.nonzero(out_src >= 0).flatten(), torch.nonzero(in_src >= 0).flatten()
    kept = w.index_select(0, out_src[s_out]).index_select(1, in_src[s_in])
    rows = w.new_zeros((len(s_out), len(in_src)) + tuple(w.shape[2:]))
    new.index_copy_(0, s_out, rows.index_copy_(1, s_in, kept))
    r_out, r_in = torch.nonzero(out_src < 0).flatten(), torch.nonzero(in_src < 0).flatten()
    if len(r_out):
        cols = r_in if len(r_in) else torch.arange(len(in_src), device=dev)
        fresh = _kaiming((len(r_out), len(cols)) + tuple(w.shape[2:]), w, fan_out)
        rows = w.new_zeros((len(r_out), len(in_src)) + tuple(w.shape[2:]))
        new.index_copy_(0, r_out, rows.index_copy_(1, cols, fresh))
    return new


def _remap_bias(old: nn.Module, new: nn.Module, out_src: torch.Tensor) -> None:
    """Survivors keep their bias, new outputs start at 0."""
    if old.bias is not None:
        out_src = out_src.to(old.bias.device)
        ok = out_src >= 0
        new.bias.zero_()
        new.bias[ok] = old.bias[out_src[ok]]


def _remap_layer(old: nn.Module, layer: Layer, in_src, out_src, scheme: str, impl: str) -> nn.Module:
    if layer.kind == "grouped":
        raise AssertionError(f"grouped conv '{layer.name}' has fixed channels and cannot change")
    if bool((in_src >= 0).all()) and bool((out_src >= 0).all()):
        return _select(old, in_src, out_src)  # only survivors: the layer keeps its form (CR/CA blocks too)
    if layer.kind == "depthwise":
        new = _new_dense(old, len(in_src), len(in_src), groups=len(in_src))
        ok = (in_src >= 0).to(old.weight.device)
        fresh = _kaiming(new.weight.shape, old.weight, _fan_out(old, len(in_src)))
        new.weight.copy_(torch.where(ok.view(-1, 1, 1, 1), old.weight[in_src.clamp(min=0).to(ok.device)], fresh))
        _remap_bias(old, new, in_src)
        return new
    s_pos = torch.nonzero(in_src >= 0).flatten()
    r_pos = torch.nonzero(in_src < 0).flatten()
    s_out = int((out_src >= 0).sum())
    r_out = len(out_src) - s_out
    template = _template(old)
    fan = _fan_out(template, len(out_src))
    # eq. 9-10 apply to every conv that reads R, whether its outputs are free (S and R) or fixed (S only)
    if isinstance(old, CAConv) or (scheme == "ca" and layer.kind == "conv" and len(r_pos)):
        inner = _select(old, in_src[s_pos], out_src[:s_out])
        w_sr = w_r = None
        if r_out:
            w_sr = conv_like(template, len(s_pos), r_out)
            if len(r_pos):
                w_sr.weight.zero_()  # W_S->R = 0
            else:  # no R input: S is R's only source
                w_sr.weight.copy_(_kaiming(w_sr.weight.shape, template.weight, fan))
        if len(r_pos):
            w_r = conv_like(template, len(r_pos), s_out + r_out)
            w_r.weight.zero_()  # W_R->S = 0
            w_r.weight[s_out:] = _kaiming((r_out, len(r_pos)) + tuple(w_r.weight.shape[2:]), template.weight, fan)
        bias_r = template.bias.new_zeros(r_out) if template.bias is not None and r_out else None
        return CAConv(s_pos, r_pos, inner, w_sr, w_r, template, s_out, r_out, impl=impl, bias_r=bias_r)
    if scheme == "cr" and layer.kind == "conv" and len(r_pos) and r_out:
        conv_s = _select(old, in_src[s_pos], out_src[:s_out])
        conv_r = conv_like(old, len(r_pos), r_out, bias=old.bias is not None)
        conv_r.weight.copy_(_kaiming(conv_r.weight.shape, old.weight, fan))
        if conv_r.bias is not None:
            conv_r.bias.zero_()
        return CRConv(s_pos, r_pos, conv_s, conv_r)
    new = _new_dense(old, len(in_src), len(out_src))
    new.weight.copy_(_remap_dense_weight(old.weight, in_src, out_src, fan))
    _remap_bias(old, new, out_src)
    return new


def _template(module: nn.Module) -> nn.Conv2d:
    while isinstance(module, CAConv):
        module = module.inner
    return module


def _split_positions(keep: torch.Tensor, s_idx: torch.Tensor, r_idx: torch.Tensor):
    """For input positions ``keep`` of a split conv: (new S positions, their index in S; same for R)."""
    pos_s = {int(p): i for i, p in enumerate(s_idx.tolist())}
    pos_r = {int(p): i for i, p in enumerate(r_idx.tolist())}
    keep = keep.tolist()
    new_s = [j for j, p in enumerate(keep) if p in pos_s]
    new_r = [j for j, p in enumerate(keep) if p in pos_r]
    as_long = lambda xs: torch.tensor(xs, dtype=torch.long)  # noqa: E731
    return (as_long(new_s), as_long([pos_s[keep[j]] for j in new_s]),
            as_long(new_r), as_long([pos_r[keep[j]] for j in new_r]))


def _select(module: nn.Module, in_keep: torch.Tensor, out_keep: torch.Tensor) -> nn.Module:
    """The same kind of module restricted to the given input and output channels (all old, no new ones).

    Sides never empty here (pruning keeps a channel of each side of a split conv: graph.split_sides)."""
    in_keep, out_keep = in_keep.cpu(), out_keep.cpu()
    if isinstance(module, (CAConv, CRConv)):
        new_s, s_in, new_r, r_in = _split_positions(in_keep, module.s_idx, module.r_idx)
        out_s = out_keep[out_keep < module.s_out]
        out_r = out_keep[out_keep >= module.s_out] - module.s_out
        if isinstance(module, CRConv):
            return CRConv(new_s, new_r, _select(module.conv_s, s_in, out_s), _select(module.conv_r, r_in, out_r))
        inner = _select(module.inner, s_in, out_s)
        w_sr = _slice_conv(module.w_sr, out_r, s_in) if module.w_sr is not None and len(out_r) else None
        w_r = None
        if module.w_r is not None and len(r_in):
            w_r = _slice_conv(module.w_r, torch.cat([out_s, out_r + module.s_out]), r_in)
        bias_r = module.bias_r.detach()[out_r.to(module.bias_r.device)] if module.bias_r is not None else None
        return CAConv(new_s, new_r, inner, w_sr, w_r, _template(module), len(out_s), len(out_r), impl=module.impl,
                      bias_r=bias_r)
    new = _slice_conv(module, out_keep, in_keep)
    _remap_bias(module, new, out_keep)
    return new


def _slice_conv(conv: nn.Module, out_keep: torch.Tensor, in_keep: torch.Tensor) -> nn.Module:
    """A bias-free copy of a dense conv/linear's block; callers set the bias where the block has one."""
    if getattr(conv, "groups", 1) > 1:  # depthwise: channel c reads channel c
        new = _new_dense(conv, len(in_keep), len(in_keep), groups=len(in_keep))
        new.weight.copy_(conv.weight[in_keep.to(conv.weight.device)])
        return new
    new = _new_dense(conv, len(in_keep), len(out_keep))
    dev = conv.weight.device
    new.weight.copy_(conv.weight[out_keep.to(dev)][:, in_keep.to(dev)])
    return new


def _remap_bn(old: nn.Module, src: torch.Tensor, gamma_new: float) -> nn.Module:
    """Survivors keep γ, β and running stats; new channels start at γ = gamma_new, β = 0, mean 0, var 1.

    With momentum=None (a cumulative average over num_batches_tracked batches) the counter restarts when
    channels are added, so the new channels' statistics are estimated from their own batches, not diluted."""
    new = type(old)(len(src), eps=old.eps, momentum=old.momentum, affine=old.affine,
                    track_running_stats=old.track_running_stats, device=_device(old), dtype=_dtype(old))
    src = src.to(_device(old))
    ok = src >= 0
    idx = src.clamp(min=0)
    with torch.no_grad():
        if old.affine:
            new.weight.copy_(torch.where(ok, old.weight[idx], torch.full_like(new.weight, gamma_new)))
            new.bias.copy_(torch.where(ok, old.bias[idx], torch.zeros_like(new.bias)))
        if old.track_running_stats:
            new.running_mean.copy_(torch.where(ok, old.running_mean[idx], torch.zeros_like(new.running_mean)))
            new.running_var.copy_(torch.where(ok, old.running_var[idx], torch.ones_like(new.running_var)))
            fresh = old.momentum is None and not bool(ok.all())
            new.num_batches_tracked.copy_(torch.zeros_like(old.num_batches_tracked) if fresh
                                          else old.num_batches_tracked)
    new.train(old.training)
    return new


def _device(m: nn.Module) -> torch.device:
    return next(iter(m.state_dict().values())).device


def _dtype(m: nn.Module) -> torch.dtype:
    for t in m.state_dict().values():
        if t.is_floating_point():
            return t.dtype
    return torch.float32
