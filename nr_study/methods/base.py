"""What every method is: an object with the same events, called by the loop (nr_study.train), which never asks
which method runs; the base class is the plain baseline (every event does nothing). Also the helpers several
methods share: the prunable graph and its γ."""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Optional

from nr_study.errors import ConfigError
from nr_study.methods.registry import METHODS

if TYPE_CHECKING:
    import torch
    import torch.nn as nn

    from nr_study.config import Config


@dataclass
class Event:
    kind: str            # "rejuvenation" | "prune"
    model: nn.Module     # the model after the event
    report: dict         # JSON-able; logged as `artifact` (the loop adds epoch and step)
    artifact: str
    schedule: str = "continue"  # what the lr schedule does next: one of config.AFTER_REJUVENATION
    label: str = ""             # what the progress line says ("rejuvenation 2")
    sources: Any = None         # nr.surgery.ParamSources: where the new weights came from (optimizer state follows)


# What every method logs each epoch (nr_study.names.EPOCH_METRICS): a method's metrics() over these defaults, so
# the names are the same for every method, a plugin's included. `recycled`: units recycled in place so far (ReDo,
# CBP); `dormant`: the fraction of units dormant at the last scoring (methods that score units).
METRIC_DEFAULTS = {"lambda": 0.0, "rejuvenations": 0, "recycled": 0, "dormant": 0.0}


def method_metrics(method: "Method") -> dict:
    """The method's metrics with every name present (METRIC_DEFAULTS where it says nothing)."""
    return {**METRIC_DEFAULTS, **method.metrics()}


def make_method(cfg: Config, input_shape: tuple, tracking_uri: Optional[str] = None) -> "Method":
    """The method object registered under cfg.method."""
    return METHODS[cfg.method].cls(cfg, tuple(input_shape), tracking_uri)


class Method:
    """The events every method has; this base does nothing in any of them (BL: plain SGD)."""

    def __init__(self, cfg: Config, input_shape: tuple, tracking_uri: Optional[str] = None):
        self.cfg, self.input_shape, self.tracking_uri = cfg, input_shape, tracking_uri
        self.resumed = False
        self.heads = None  # nr.heads.SplitHeads where the method trains two classifiers (NR-CR separate, BL-2H)

    @classmethod
    def check_config(cls, cfg: Config) -> list[str]:
        """What this method needs of a config beyond each field's own check: one error line each (the config
        lists them with the rest, before anything runs)."""
        return []

    def on_fit_start(self, model: nn.Module) -> nn.Module:
        return model

    def on_optimizer(self, opt: torch.optim.Optimizer) -> None:
        """The optimizer the loop built (at the start, after an event, on a resume before its state is loaded into
        it): a method that edits weights in place keeps it to zero their optimizer state."""

    def loss(self, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The training loss of a batch: cross-entropy of the output, or with two heads CE(S) + CE(R)."""
        if self.heads is not None and self.heads.active:
            return self.heads.loss(y)
        import torch.nn.functional as F

        return F.cross_entropy(out.float(), y)

    def head_outputs(self) -> dict:
        """Each head's logits of the last forward, by name ({} with one head): their errors are logged too."""
        return self.heads.outputs() if self.heads is not None and self.heads.active else {}

    def set_heads(self, model: nn.Module, survivors: Optional[dict]) -> None:
        """Two classifiers over the model's S and R (``survivors``: |S| per split group's producer), replacing
        any earlier ones; None: one head."""
        if self.heads is not None:
            self.heads.remove()
        self.heads = None
        if survivors:
            from nr_study.nr.heads import SplitHeads

            self.heads = SplitHeads(model, self.input_shape, survivors)

    def after_backward(self) -> None:
        pass

    def end_of_step(self) -> Optional[Event]:
        return None

    def end_of_epoch(self) -> Optional[Event]:
        return None

    def metrics(self) -> dict:
        return dict(METRIC_DEFAULTS)

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        self.resumed = True


def prunable_graph(model: nn.Module, input_shape: tuple, method: str, name: str):
    """The channel graph, refusing a model with nothing prunable (one line naming what fixed every group)."""
    from nr_study.nr import build_graph

    graph = build_graph(model, input_shape)
    if not graph.free_groups():
        reasons = sorted({g.fixed_reason.split("'")[0].strip() for g in graph.groups.values()
                          if g.producer is not None and g.fixed_reason})
        raise ConfigError(f"method {method}: model {name!r} has no prunable channels (every channel group is "
                          f"fixed: {'; '.join(reasons[:3]) or 'none found'}); {method} needs convolutions "
                          f"followed by a BatchNorm outside residual additions; allowed here: method BL")
    return graph


def prunable_gammas(model: nn.Module, graph) -> list[torch.Tensor]:
    """γ of every prunable BN (the free groups): what an L1 term on γ pulls toward zero."""
    mods = dict(model.named_modules())
    return [mods[g.bn].weight for g in graph.free_groups()]
