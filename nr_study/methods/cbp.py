"""Continual Backprop (Dohare et al., Nature 2024, "Loss of plasticity in deep continual learning"; the code's
ConvGnT with the "contribution" utility): every step each unit's utility, a running average (decay `cbp.decay`)
of its mean |activation| × the mean |w| of its outgoing weights, is updated; among the units older than
`cbp.maturity` steps a fraction `cbp.replacement_rate` per step (accumulated across steps, per layer) with the
lowest bias-corrected utility is replaced: incoming weights re-initialised, outgoing weights zero, its BNs reset,
utility 0, age 0, optimizer state zeroed (methods/recycling.py).

Cheap enough for every step: the activations are reduced on the device by the reader's hook, the utility update
and the choice of units (topk) stay on the device, and how many units to replace is known on the host without
asking the device — a unit is mature unless it started within the last m steps, and the host knows how many
started when — so a step never waits for the GPU."""
from __future__ import annotations

from nr_study.methods.base import Method
from nr_study.methods.registry import register_method


@register_method("CBP", reads=("cbp",))
class ContinualBackprop(Method):
    """CBP: selective re-initialisation of low-utility mature units, every step."""

    def __init__(self, cfg, input_shape, tracking_uri=None):
        super().__init__(cfg, input_shape, tracking_uri)
        self.step, self.recycled = 0, 0
        self.model = self.opt = self.groups = self.probe = self.mods = None
        self.util, self.born, self.acc, self.recent, self.last = [], [], [], [], []
        self._state = None

    def on_fit_start(self, model):
        import torch

        from nr_study.methods.recycling import Probe, unit_groups

        self.model = model
        self.groups = unit_groups(model, self.input_shape, "CBP", self.cfg.model.name)
        self.mods = dict(model.named_modules())
        dev = next(model.parameters()).device
        st = self._state or {}
        saved = st.get("groups") or [{} for _ in self.groups]
        if len(saved) != len(self.groups) or any(len(s.get("util", [0] * g.width)) != g.width
                                                 for s, g in zip(saved, self.groups)):
            raise ValueError("CBP state does not match the model's units (a checkpoint of another model?)")
        self.util = [torch.tensor(s.get("util", [0.0] * g.width), dtype=torch.float32, device=dev)
                     for s, g in zip(saved, self.groups)]
        self.born = [torch.tensor(s.get("born", [0] * g.width), dtype=torch.long, device=dev)
                     for s, g in zip(saved, self.groups)]
        self.acc = [float(s.get("acc", 0.0)) for s in saved]
        self.recent = [[(int(a), int(b)) for a, b in s.get("recent", [])] for s in saved]
        self.last = [None] * len(self.groups)
        self.probe = Probe(model, self.groups)
        self.probe.attach()
        return model

    def on_optimizer(self, opt):
        self.opt = opt

    def end_of_step(self):
        import torch

        from nr_study.methods.recycling import outgoing_sum, recycle_units

        c = self.cfg.cbp
        self.step += 1
        t = self.step
        reduced = self.probe.take()
        seen = [i for i, r in enumerate(reduced) if r is not None]  # all of them in fit
        if seen:
            torch._foreach_mul_([self.util[i] for i in seen], c.decay)  # one launch for every layer
        picks = []
        for i in seen:
            group, (h_sum, h_count) = self.groups[i], reduced[i]
            w_sum, w_count = outgoing_sum(group, self.mods)
            util = self.util[i]  # += (1 - η) · mean |h| · mean |w_out|, the means folded into one scalar
            util.addcmul_(h_sum, w_sum, value=(1.0 - c.decay) / (h_count * w_count))
            self.last[i] = h_sum
            # mature: age t - born > m; a unit born at s < t - m is mature again, so only the recent starts count
            self.recent[i] = [(s, n) for s, n in self.recent[i] if s >= t - c.maturity]
            mature = 0 if t <= c.maturity else group.width - sum(n for _, n in self.recent[i])
            self.acc[i] += c.replacement_rate * mature
            k = min(int(self.acc[i]), mature)
            if k == 0:
                continue
            self.acc[i] -= k
            age = (t - self.born[i]).to(util.dtype)
            corrected = util / (1.0 - c.decay ** age)  # bias correction of the running average (ConvGnT's)
            candidates = torch.where(age > c.maturity, corrected, torch.full_like(util, float("inf")))
            idx = torch.topk(candidates, k, largest=False).indices
            picks.append((group, idx))
            util.index_fill_(0, idx, 0.0)
            self.born[i].index_fill_(0, idx, t)
            self.recent[i].append((t, k))
            self.recycled += k
        recycle_units(self.model, picks, self.opt, self.mods)
        return None

    def metrics(self):
        """`dormant`: the fraction of units whose activation was exactly 0 on the last batch (ReDo's rule at τ = 0:
        CBP has no threshold of its own)."""
        zero = sum(int((h == 0).sum()) for h in self.last if h is not None)
        total = sum(g.width for g, h in zip(self.groups or [], self.last) if h is not None)
        return {"lambda": 0.0, "rejuvenations": 0, "recycled": self.recycled,
                "dormant": zero / total if total else 0.0}

    def state_dict(self):
        return {"step": self.step, "recycled": self.recycled,
                "groups": [{"util": u.tolist(), "born": b.tolist(), "acc": a, "recent": [list(r) for r in rec]}
                           for u, b, a, rec in zip(self.util, self.born, self.acc, self.recent)]}

    def load_state_dict(self, state):
        super().load_state_dict(state)
        self.step, self.recycled, self._state = int(state["step"]), int(state["recycled"]), state
