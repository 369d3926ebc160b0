"""Optimizer state of edited weights, one home for both kinds of edit.

A surgery rebuilds the parameters: ParamSources says where each new entry came from and carry_state carries
per-entry state (SGD momentum: nr.carry_momentum) to the survivors. A recycler (ReDo, CBP) re-initialises units
in place: zero_optimizer_state clears their state, or the old velocity would push the fresh weights along the old
direction at the next step. Generic over optimizers: every per-entry state tensor (the parameter's shape) is
edited, scalars such as Adam's step count are left alone."""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn as nn


def zero_optimizer_state(opt: torch.optim.Optimizer | None, param: torch.Tensor, index: torch.Tensor,
                         dim: int = 0) -> None:
    """Zero the per-entry state of ``param``'s slices ``index`` along ``dim`` (index_fill_: no host sync). A
    parameter the optimizer holds no state for yet (before its first step) is left as it is."""
    if opt is None:
        return
    state = opt.state.get(param)  # .get: opt.state is a defaultdict; do not create entries
    if not state:
        return
    for value in state.values():
        if torch.is_tensor(value) and value.shape == param.shape:
            value.index_fill_(dim, index.to(value.device), 0)


@dataclass
class ParamSources:
    """Where each entry of a rebuilt model's parameters came from: ``index[name]`` holds, per entry of the new
    parameter ``name``, its position in the old parameters laid end to end in ``old`` order (name, numel),
    or -1 for a new entry; ``scale[name]`` (old names, old shapes) the factor rescaling put on an old entry's
    gradient (absent: 1).
    What SGD momentum needs to follow the surviving weights across a surgery (:func:`carry_state`)."""

    old: list[tuple[str, int]]
    index: dict[str, torch.Tensor]
    scale: dict[str, torch.Tensor] = field(default_factory=dict)

    @classmethod
    def of_surgery(cls, model: nn.Module, replay: Callable[[nn.Module], None]) -> "ParamSources":
        """``replay`` the surgery (without rescaling) on a float64 copy of ``model`` on the CPU whose entries are
        codes -(position + 0.5): every entry the surgery keeps carries its code to its new place; new entries
        (random, 0 or γ0) never equal a code. Exact for every scheme and layer kind with no bookkeeping in the
        remaps; the random numbers the replay draws are given back, so training goes on as without it."""
        old = [(n, p.numel()) for n, p in model.named_parameters()]
        twin = copy.deepcopy(model).to("cpu", torch.float64)
        with torch.no_grad():
            offset = 0
            for p in twin.parameters():
                p.copy_(-(torch.arange(p.numel(), dtype=torch.float64) + offset + 0.5).view_as(p))
                offset += p.numel()
        with torch.random.fork_rng(devices=[]):
            replay(twin)
        index = {}
        for n, p in twin.named_parameters():
            code = -p.detach() - 0.5
            is_code = (code == code.round()) & (code >= 0) & (code < offset)
            index[n] = torch.where(is_code, code, -1.0).long()
        return cls(old, index)

    def rescaled(self, model: nn.Module, bn_weights: set[str], rescale: Callable[[nn.Module], None]) -> None:
        """Neural rescaling multiplies γ and β by s and divides the readers' weights by s; their gradients (and so
        momentum) scale by the inverse. The factors come from ``rescale`` run on a float64 copy whose entries are
        1 (γ keeps its value: the rescaling decides on it): a 1 becomes its value factor — exact, zeros
        included (a zero weight's gradient scales too). Kept as the gradient factor per old entry, ``scale``."""
        twin = copy.deepcopy(model).to("cpu", torch.float64)
        with torch.no_grad():
            for n, p in twin.named_parameters():
                if n not in bn_weights:
                    p.fill_(1.0)
        gammas = {n: p.detach().clone() for n, p in twin.named_parameters() if n in bn_weights}
        rescale(twin)
        for n, p in twin.named_parameters():
            v = p.detach()
            factor = torch.where(gammas[n] != 0, gammas[n] / v, 1.0) if n in gammas else 1.0 / v
            if bool((factor != 1).any()):
                self.scale[n] = factor


def carry_state(sources: ParamSources, old_state: dict[str, torch.Tensor | None], new_params: dict[str, torch.Tensor]
                ) -> dict[str, torch.Tensor]:
    """Per-entry optimizer state (e.g. SGD's momentum buffer, by old parameter name; None: no state yet) carried
    to the new parameters: a kept entry takes its old value times the inverse of its rescaling (a gradient scales
    by 1/s when its weight scales by s), a new entry 0."""
    if not sources.old:
        return {n: torch.zeros_like(p) for n, p in new_params.items()}
    def old_entries(n: str, k: int) -> torch.Tensor:
        v = old_state.get(n)
        v = v.detach().flatten().double().cpu() if v is not None else torch.zeros(k, dtype=torch.float64)
        return v * sources.scale[n].flatten() if n in sources.scale else v

    flat = torch.cat([old_entries(n, k) for n, k in sources.old])
    out = {}
    for n, p in new_params.items():
        idx = sources.index[n]
        v = torch.where(idx >= 0, flat[idx.clamp(min=0)], 0.0)
        out[n] = v.to(device=p.device, dtype=p.dtype).view_as(p).contiguous(memory_format=_layout_of(p))
    return out


def _layout_of(p: torch.Tensor) -> torch.memory_format:
    return torch.channels_last if p.dim() == 4 and p.is_contiguous(memory_format=torch.channels_last) \
        and not p.is_contiguous() else torch.contiguous_format
