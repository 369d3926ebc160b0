"""NR and its variants: the NeuralRejuvenation hook (nr_study.nr) as a method — L1 on γ with the adaptive (or
fixed) λ while the NR flag is on, a rejuvenation (surgery) when r < Tr. The variants differ only in NR's
defaults: the training scheme (nr, cr, ca), neural rescaling, reallocation (NR-IP reinitialises in place)."""
from __future__ import annotations

from typing import Optional

from nr_study.errors import ConfigError, one_line
from nr_study.methods.base import Event, Method, prunable_graph
from nr_study.methods.registry import METHODS, register_method

class Rejuvenation(Method):
    """NR and its variants (NR-BR, NR-CR, NR-CA, NR-CA-BR, NR-IP): the NeuralRejuvenation hook — L1 with the
    adaptive λ while the NR flag is on, a rejuvenation (surgery) when r < Tr."""

    def __init__(self, cfg, input_shape, tracking_uri=None):
        super().__init__(cfg, input_shape, tracking_uri)
        self.hook, self._state, self.two_heads, self.survivors = None, None, False, None

    def on_fit_start(self, model):
        from nr_study.nr import NeuralRejuvenation

        info = METHODS[self.cfg.method]
        graph = prunable_graph(model, self.input_shape, self.cfg.method, self.cfg.model.name)
        try:  # the validated `nr:` section, with the variant's scheme/rescale/realloc where it leaves them unset
            settings = self.cfg.nr.with_method_defaults(info.scheme, info.rescale, info.realloc)
            self.two_heads = settings.scheme == "cr" and settings.cr_heads == "separate"
            if self.two_heads and settings.max_rejuvenations > 0:
                from nr_study.nr.heads import check_two_heads

                check_two_heads(model, graph)
            self.hook = NeuralRejuvenation(model, self.input_shape, settings)
        except ValueError as exc:  # the core refuses settings it cannot honour here (e.g. a Tr out of reach)
            raise ConfigError(f"method {self.cfg.method} on model {self.cfg.model.name!r}: {one_line(exc)}") from None
        if self._state:
            self.hook.load_state_dict(self._state)
            self._set_heads(self._state.get("heads"))
        return model

    def _set_heads(self, survivors: Optional[dict]) -> None:
        """NR-CR with nr.cr_heads separate: after each rejuvenation, S's and R's classifiers (the official code's);
        a later rejuvenation makes every survivor S again and its new channels R."""
        self.survivors = survivors if self.two_heads else None
        self.set_heads(self.hook.model, self.survivors)

    def after_backward(self):
        self.hook.after_backward()

    def end_of_step(self):
        return self._event(self.hook.end_of_step())

    def end_of_epoch(self):
        return self._event(self.hook.end_of_epoch())

    def _event(self, report: Optional[dict]) -> Optional[Event]:
        if not report:
            return None
        self._set_heads(report["survivors"])
        n = self.hook.rejuvenations
        return Event("rejuvenation", self.hook.model, report, f"rejuvenations/{n:03d}.json",
                     self.cfg.train.after_rejuvenation, f"rejuvenation {n}", self.hook.last_sources)

    def metrics(self):
        return {"lambda": self.hook.lam.lam if self.hook.flag_on else 0.0, "rejuvenations": self.hook.rejuvenations}

    def state_dict(self):
        return {**self.hook.state_dict(), "heads": self.survivors}

    def load_state_dict(self, state):
        super().load_state_dict(state)
        self._state = state


# The variants, in the order tables and listings show them: (name, scheme, rescale, realloc).
for _name, _scheme, _rescale, _realloc in (("NR", "nr", False, True), ("NR-BR", "nr", True, True),
                                           ("NR-CR", "cr", False, True), ("NR-CA", "ca", False, True),
                                           ("NR-CA-BR", "ca", True, True), ("NR-IP", "nr", False, False)):
    register_method(_name, reads=("nr",), changes_model=True, hook=True, scheme=_scheme, rescale=_rescale,
                    realloc=_realloc)(Rejuvenation)
