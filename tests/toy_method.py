"""A method from outside the package, in one file: BL-L1, the baseline with Network Slimming's L1 on every
prunable γ (slim.l1) and no pruning — the control that separates what L1 alone does from what NR's surgery does.
Registering it is the whole integration: `tests/test_method_plugin.py` trains it and sweeps it
(NR_STUDY_METHODS=tests.toy_method makes the sweep's workers load it too)."""
from __future__ import annotations

from nr_study.methods import Method, prunable_gammas, prunable_graph, register_method


@register_method("BL-L1", reads=("slim",))
class BaselineL1(Method):
    def on_fit_start(self, model):
        self.gammas = prunable_gammas(model, prunable_graph(model, self.input_shape, "BL-L1", self.cfg.model.name))
        return model

    def after_backward(self):
        from nr_study.nr import l1_subgradient_

        l1_subgradient_(self.gammas, self.cfg.slim.l1)

    def metrics(self):
        return {"lambda": self.cfg.slim.l1, "rejuvenations": 0}
