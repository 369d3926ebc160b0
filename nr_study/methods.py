"""Training methods: one object per method, the same events for all (Composer's shape: a plain function does
the work, a thin class says when). The loop (nr_study.train) calls the events and never asks which method runs.

    on_fit_start(model) -> model   the model to train. A fresh run gets the new model: a method may transform it
                                   (BL-CA: CA form; NR-FS: the found widths) and attaches what it needs (NR's
                                   hook, SLIM's γ list). A resumed run calls load_state_dict(state) first and
                                   passes the checkpoint's model, already transformed.
    after_backward()               after loss.backward(), before the optimizer step (the L1 subgradient)
    end_of_step() -> Event | None  after the optimizer step
    end_of_epoch() -> Event | None after an epoch's last step, before evaluation
    metrics() -> dict              `lambda` (the L1 strength applied now) and `rejuvenations` (how many so far)
    state_dict() / load_state_dict(state)

An Event is surgery or a prune: the new model (the loop adopts it and rebuilds its optimizer), the report it logs
as an artifact, and what the learning-rate schedule does next. Registry: config.METHODS maps a method's name to
its class here and its NR defaults; a new method is a class below and a line there.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
import torch.nn as nn

from nr_study.config import AFTER_REJUVENATION, METHODS, Config
from nr_study.errors import ConfigError, one_line
from nr_study.files import read_json, read_torch

SCHEDULE_AFTER = AFTER_REJUVENATION  # what the lr schedule does after an event (train.after_rejuvenation)


@dataclass
class Event:
    kind: str            # "rejuvenation" | "prune"
    model: nn.Module     # the model after the event
    report: dict         # JSON-able; logged as `artifact` (the loop adds epoch and step)
    artifact: str
    schedule: str = "continue"  # one of SCHEDULE_AFTER
    label: str = ""             # what the progress line says ("rejuvenation 2")


def make_method(cfg: Config, input_shape: tuple, tracking_uri: Optional[str] = None) -> "Method":
    """The method object config.METHODS names for cfg.method."""
    return globals()[METHODS[cfg.method].impl](cfg, tuple(input_shape), tracking_uri)


# --------------------------------------------------------------------------------------------- the work
def prunable_graph(model: nn.Module, input_shape: tuple, method: str, name: str):
    """The channel graph, refusing a model with nothing prunable (one line naming what fixed every group)."""
    from nr_study.nr import build_graph

    graph = build_graph(model, input_shape)
    if not graph.free_groups():
        reasons = sorted({g.fixed_reason.split("'")[0].strip() for g in graph.groups.values()
                          if g.producer is not None and g.fixed_reason})
        raise ConfigError(f"method {method}: model {name!r} has no prunable channels (every channel group is "
                          f"fixed: {'; '.join(reasons[:3]) or 'none found'}); NR/SLIM/BL-CA need convolutions "
                          f"followed by a BatchNorm outside residual additions; allowed here: method BL")
    return graph


def prunable_gammas(model: nn.Module, graph) -> list[torch.Tensor]:
    """γ of every prunable BN (the free groups): what an L1 term on γ pulls toward zero."""
    mods = dict(model.named_modules())
    return [mods[g.bn].weight for g in graph.free_groups()]


def slim_prune(model: nn.Module, input_shape: tuple, ratio: float) -> tuple[nn.Module, dict]:
    """Network Slimming's prune: ONE |γ| threshold over all prunable BNs at the `ratio` percentile (not one per
    layer), the channels at or below it physically removed (nr.prune; a layer keeps at least its strongest
    channel). Returns (pruned copy, report)."""
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


def fs_spec(cfg: Config, tracking_uri: Optional[str]) -> tuple[dict, Optional[str]]:
    """NR-FS: the architecture spec found by an earlier run (MLflow run id or exported file), and its model."""
    if cfg.fs.run_id:
        import tempfile

        from nr_study.tracking import download_artifact

        with tempfile.TemporaryDirectory(prefix="nr_study_art_") as tmp:
            path = download_artifact(cfg.fs.run_id, "model/model.pt", cfg.fs.tracking_uri or tracking_uri, tmp)
            payload = read_torch(path, "nr_study model file")
        spec = payload.get("arch_spec_json") if isinstance(payload, dict) else None
        if not spec:
            raise ConfigError(f"fs.run_id: run {cfg.fs.run_id!r} has no architecture spec (was it a BL run?)")
        return json.loads(spec), payload.get("model_name")
    path = Path(cfg.fs.architecture_file)
    if not path.is_file():
        raise ConfigError(f"fs.architecture_file: {str(path)!r} not found; expected final_widths.json or model.pt")
    if path.suffix in (".pt", ".pth"):
        payload = read_torch(path, "nr_study model file")
        if not (isinstance(payload, dict) and payload.get("arch_spec_json")):
            raise ConfigError(f"fs.architecture_file: {str(path)!r} holds no architecture spec; allowed: the "
                              f"model.pt of an NR run (or its final_widths.json)")
        return json.loads(payload["arch_spec_json"]), payload.get("model_name")
    obj = read_json(path, "final_widths.json architecture file")
    if isinstance(obj, dict) and "architecture" in obj:  # final_widths.json
        return obj["architecture"], obj.get("model")
    return obj, None


# ------------------------------------------------------------------------------------------- the methods
class Method:
    """BL: plain SGD. The base class: every event does nothing."""

    def __init__(self, cfg: Config, input_shape: tuple, tracking_uri: Optional[str] = None):
        self.cfg, self.input_shape, self.tracking_uri = cfg, input_shape, tracking_uri
        self.resumed = False

    def on_fit_start(self, model: nn.Module) -> nn.Module:
        return model

    def after_backward(self) -> None:
        pass

    def end_of_step(self) -> Optional[Event]:
        return None

    def end_of_epoch(self) -> Optional[Event]:
        return None

    def metrics(self) -> dict:
        return {"lambda": 0.0, "rejuvenations": 0}

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        self.resumed = True


Baseline = Method


class BaselineCA(Method):
    """BL-CA: the baseline in the CA form on a fixed half/half split (paper Table 1), no rejuvenation."""

    def on_fit_start(self, model):
        if self.resumed:
            return model
        from nr_study.nr import split_to_ca

        graph = prunable_graph(model, self.input_shape, "BL-CA", self.cfg.model.name)
        return split_to_ca(model, self.input_shape, impl=self.cfg.nr.impl, graph=graph)


class FromScratch(Method):
    """NR-FS: the architecture an NR run found, trained from scratch (re-initialised weights)."""

    def on_fit_start(self, model):
        if self.resumed:
            return model
        from nr_study.models.layers import init_weights
        from nr_study.nr import apply_architecture

        spec, src = fs_spec(self.cfg, self.tracking_uri)
        if src and src != self.cfg.model.name:
            raise ConfigError(f"model.name: {self.cfg.model.name!r} differs from the NR-FS source model {src!r}")
        model = apply_architecture(model, spec) or model
        init_weights(model)
        return model


class Rejuvenation(Method):
    """NR and its variants (NR-BR, NR-CR, NR-CA, NR-CA-BR, NR-IP): the NeuralRejuvenation hook — L1 with the
    adaptive λ while the NR flag is on, a rejuvenation (surgery) when r < Tr."""

    def __init__(self, cfg, input_shape, tracking_uri=None):
        super().__init__(cfg, input_shape, tracking_uri)
        self.hook, self._state = None, None

    def on_fit_start(self, model):
        from nr_study.nr import NeuralRejuvenation

        spec = METHODS[self.cfg.method]
        prunable_graph(model, self.input_shape, self.cfg.method, self.cfg.model.name)
        try:  # the validated `nr:` section, with the variant's scheme/rescale/realloc where it leaves them unset
            settings = self.cfg.nr.with_method_defaults(spec.scheme, spec.rescale, spec.realloc)
            self.hook = NeuralRejuvenation(model, self.input_shape, settings)
        except ValueError as exc:  # the core refuses settings it cannot honour here (e.g. a Tr out of reach)
            raise ConfigError(f"method {self.cfg.method} on model {self.cfg.model.name!r}: {one_line(exc)}") from None
        if self._state:
            self.hook.load_state_dict(self._state)
        return model

    def after_backward(self):
        self.hook.after_backward()

    def end_of_step(self):
        return self._event(self.hook.end_of_step())

    def end_of_epoch(self):
        return self._event(self.hook.end_of_epoch())

    def _event(self, report: Optional[dict]) -> Optional[Event]:
        if not report:
            return None
        n = self.hook.rejuvenations
        return Event("rejuvenation", self.hook.model, report, f"rejuvenations/{n:03d}.json",
                     self.cfg.train.after_rejuvenation, f"rejuvenation {n}")

    def metrics(self):
        return {"lambda": self.hook.lam.lam if self.hook.flag_on else 0.0, "rejuvenations": self.hook.rejuvenations}

    def state_dict(self):
        return self.hook.state_dict()

    def load_state_dict(self, state):
        super().load_state_dict(state)
        self._state = state


class Slimming(Method):
    """SLIM, Network Slimming (Liu et al. 2017, the paper's [40], Table 4's baseline): λ·Σ|γ| on every prunable
    BN with a fixed λ (`slim.l1`) from the first step; after epoch `slim.prune_epoch` (default: half the epochs)
    one global |γ| threshold at the `slim.prune_ratio` percentile, physical pruning, then fine-tuning without
    L1 (the schedule restarts when slim.restart_schedule)."""

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


__all__ = ["Event", "Method", "make_method", "prunable_graph", "prunable_gammas", "slim_prune", "fs_spec",
           "Baseline", "BaselineCA", "FromScratch", "Rejuvenation", "Slimming"]
