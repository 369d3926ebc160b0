"""SLIM, Network Slimming (Liu et al. 2017, the paper's [40], Table 4's baseline): L1 on every prunable γ with
a fixed λ from the first step, one global |γ| threshold, physical pruning, fine-tuning. It is not NR with zero
rejuvenations."""
from __future__ import annotations

import math
from typing import TYPE_CHECKING

from nr_study.errors import ConfigError
from nr_study.methods.base import Event, Method, prunable_gammas, prunable_graph
from nr_study.methods.registry import register_method

if TYPE_CHECKING:
    import torch.nn as nn


def slim_prune(model: nn.Module, input_shape: tuple, ratio: float) -> tuple[nn.Module, dict]:
    """Network Slimming's prune: ONE |γ| threshold over all prunable BNs at the `ratio` percentile (not one per
    layer), the channels at or below it physically removed (nr.prune; a layer keeps at least its strongest
    channel). Returns (pruned copy, report)."""
    import torch

    from nr_study.nr import build_graph, prune, utilization

    graph = build_graph(model, input_shape)
    mods = dict(model.named_modules())
    bns = [g.bn for g in graph.free_groups()]
    if not bns:
        raise ConfigError("method SLIM: model has no prunable BatchNorm channels")
    gam = [mods[b].weight.detach().abs().float().cpu().flatten() for b in bns]
    allg = torch.cat(gam)
    k = int(math.floor(ratio * allg.numel()))
    order = torch.argsort(allg, stable=True)
    pruned = torch.zeros(allg.numel(), dtype=torch.bool)
    pruned[order[:k]] = True
    keep, off = {}, 0
    for b, g in zip(bns, gam):
        keep[b] = ~pruned[off : off + g.numel()]
        off += g.numel()
    before = utilization(model, input_shape, "params").total
    widths_before = {b: int(g.numel()) for b, g in zip(bns, gam)}
    model = prune(model, input_shape, keep, inplace=False)
    mods = dict(model.named_modules())
    widths_after = {b: int(mods[b].weight.numel()) for b in bns}
    report = {"prune_ratio": ratio, "threshold": float(allg[order[k - 1]]) if k else 0.0,
              "channels_before": int(allg.numel()), "channels_after": int(sum(widths_after.values())),
              "params_before": int(before), "params_after": int(utilization(model, input_shape, "params").total),
              "widths_before": widths_before, "widths_after": widths_after}
    return model, report



@register_method("SLIM", reads=("slim",), changes_model=True)
class Slimming(Method):
    """SLIM, Network Slimming (Liu et al. 2017, the paper's [40], Table 4's baseline): λ·Σ|γ| on every prunable
    BN with a fixed λ (`slim.l1`) from the first step; after epoch `slim.prune_epoch` (default: half the epochs)
    one global |γ| threshold at the `slim.prune_ratio` percentile, physical pruning, then fine-tuning without
    L1 (the schedule restarts when slim.restart_schedule)."""

    @classmethod
    def check_config(cls, cfg):
        if cfg.slim.prune_epoch is not None and cfg.slim.prune_epoch > cfg.train.epochs:
            return [f"slim.prune_epoch: {cfg.slim.prune_epoch} is out of range; allowed: 1 <= x <= train.epochs "
                    f"({cfg.train.epochs})"]
        return []

    def __init__(self, cfg, input_shape, tracking_uri=None):
        super().__init__(cfg, input_shape, tracking_uri)
        self.epoch, self.pruned, self.model, self.gammas = 0, False, None, []

    def on_fit_start(self, model):
        self.model = model
        if not self.pruned:
            self.gammas = prunable_gammas(model, prunable_graph(model, self.input_shape, "SLIM", self.cfg.model.name))
        return model

    def after_backward(self):
        if not self.pruned:
            from nr_study.nr import l1_subgradient_

            l1_subgradient_(self.gammas, self.cfg.slim.l1)

    def end_of_epoch(self):
        self.epoch += 1
        if self.pruned or self.epoch != (self.cfg.slim.prune_epoch or max(1, self.cfg.train.epochs // 2)):
            return None
        self.model, report = slim_prune(self.model, self.input_shape, self.cfg.slim.prune_ratio)
        self.pruned, self.gammas = True, []
        return Event("prune", self.model, report, "slim_prune.json",
                     "restart_schedule" if self.cfg.slim.restart_schedule else "continue", "SLIM prune")

    def metrics(self):
        return {"lambda": 0.0 if self.pruned else self.cfg.slim.l1, "rejuvenations": 0}

    def state_dict(self):
        return {"epoch": self.epoch, "pruned": self.pruned}

    def load_state_dict(self, state):
        super().load_state_dict(state)
        self.epoch, self.pruned = int(state["epoch"]), bool(state["pruned"])
