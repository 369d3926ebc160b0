"""BL-2H, the control that separates "ensemble" from "rejuvenation" in NR-CR's gain (issue 27): the baseline
trained from the first step as two disjoint halves of equal width — NR-CR's form, no cross blocks — with the two
classifiers NR-CR trains after its rejuvenation (loss CE(S) + CE(R), prediction from the sum), under the same
budget (nr.target_ratio · C in nr.constraint). If BL-2H matches NR-CR, the gain is the ensemble, not the
rejuvenated channels."""
from __future__ import annotations

from nr_study.errors import ConfigError, one_line
from nr_study.methods.base import Method, prunable_graph
from nr_study.methods.registry import register_method


@register_method("BL-2H", reads=("nr",), scheme="cr")
class TwoHalves(Method):
    def __init__(self, cfg, input_shape, tracking_uri=None):
        super().__init__(cfg, input_shape, tracking_uri)
        self.halves = None

    def on_fit_start(self, model):
        from nr_study.nr.heads import check_two_heads
        from nr_study.nr.splits import split_halves

        if not self.resumed:  # a resumed run's checkpoint holds the two halves already
            graph = prunable_graph(model, self.input_shape, "BL-2H", self.cfg.model.name)
            try:
                check_two_heads(model, graph)
                model, self.halves = split_halves(model, self.input_shape, self.cfg.nr.target_ratio,
                                                  self.cfg.nr.constraint, graph)
            except ValueError as exc:
                raise ConfigError(f"method BL-2H on model {self.cfg.model.name!r}: "
                                  f"{one_line(exc).replace('nr.cr_heads: separate: ', '')}") from None
            from nr_study.models.layers import init_weights

            init_weights(model)  # two fresh halves: every conv He-normal over its own block, BN 1/0, Linear N(0, 0.01)
        self.set_heads(model, self.halves)
        return model

    def state_dict(self):
        return {"halves": self.halves}

    def load_state_dict(self, state):
        super().load_state_dict(state)
        self.halves = state["halves"]
