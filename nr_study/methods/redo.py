"""ReDo (Sokar, Agarwal, Castro, Evci, ICML 2023, "The Dormant Neuron Phenomenon in Deep Reinforcement
Learning"): every `redo.every` steps, score each unit by its mean |activation| on that step's batch over its
layer's mean score, and recycle the units scoring at or below `redo.tau` — incoming weights re-initialised,
outgoing weights zeroed, optimizer state zeroed (methods/recycling.py says what a unit's weights are). No L1, no
reallocation: the architecture stays as it is, which is the comparison NR's reallocation needs."""
from __future__ import annotations

from nr_study.methods.base import Method
from nr_study.methods.registry import register_method


@register_method("ReDo", reads=("redo",))
class ReDo(Method):
    """Recycle dormant units every `redo.every` steps. The activations are read on the scoring step's own
    training forward: the hooks are attached only for that step (after the previous step ends)."""

    def __init__(self, cfg, input_shape, tracking_uri=None):
        super().__init__(cfg, input_shape, tracking_uri)
        self.step, self.recycled, self.dormant = 0, 0, 0.0
        self.model = self.opt = self.groups = self.probe = self.mods = None

    def on_fit_start(self, model):
        from nr_study.methods.recycling import Probe, unit_groups

        self.model = model
        self.groups = unit_groups(model, self.input_shape, "ReDo", self.cfg.model.name)
        self.mods = dict(model.named_modules())
        self.probe = Probe(model, self.groups)
        self._arm()
        return model

    def on_optimizer(self, opt):
        self.opt = opt

    def _arm(self) -> None:
        """Hooks on exactly while the next step is a scoring step."""
        if (self.step + 1) % self.cfg.redo.every == 0:
            self.probe.attach()
        else:
            self.probe.detach()

    def end_of_step(self):
        self.step += 1
        if self.step % self.cfg.redo.every == 0:
            self._score_and_recycle(self.probe.take())
        self._arm()
        return None

    def _score_and_recycle(self, mags) -> None:
        import torch

        from nr_study.methods.recycling import dormant_mask, recycle_units

        picks, total = [], 0
        for group, reduced in zip(self.groups, mags):
            if reduced is None:  # no training forward reached this group's reader (never in fit)
                continue
            picks.append((group, torch.nonzero(dormant_mask(*reduced, self.cfg.redo.tau)).flatten()))  # a sync
            total += group.width
        recycle_units(self.model, picks, self.opt, self.mods)
        dormant = sum(idx.shape[0] for _, idx in picks)
        self.recycled += dormant
        self.dormant = dormant / total if total else 0.0

    def metrics(self):
        return {"lambda": 0.0, "rejuvenations": 0, "recycled": self.recycled, "dormant": self.dormant}

    def state_dict(self):
        return {"step": self.step, "recycled": self.recycled, "dormant": self.dormant}

    def load_state_dict(self, state):
        super().load_state_dict(state)
        self.step, self.recycled, self.dormant = int(state["step"]), int(state["recycled"]), float(state["dormant"])
