"""The baselines: BL (plain SGD) and BL-CA (the CA form on a fixed half/half split, paper Table 1)."""
from __future__ import annotations

from nr_study.methods.base import Method, prunable_graph
from nr_study.methods.registry import register_method

Baseline = register_method("BL")(Method)


@register_method("BL-CA", reads=("nr",), scheme="ca")
class BaselineCA(Method):
    """BL-CA: the baseline in the CA form on a fixed half/half split (paper Table 1), no rejuvenation."""

    def on_fit_start(self, model):
        if self.resumed:
            return model
        from nr_study.nr import split_to_ca

        graph = prunable_graph(model, self.input_shape, "BL-CA", self.cfg.model.name)
        return split_to_ca(model, self.input_shape, impl=self.cfg.nr.impl, graph=graph)
