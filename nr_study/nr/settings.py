"""NR's settings: what the NeuralRejuvenation hook takes, and the `nr:` section of a config. They live with the
method (the config imports them, not the reverse) and import no torch, so the config and the CLI stay light; the
validation machinery (nr_study.schema) is the standard library only."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional

from nr_study.schema import F, check_section, choice, rng

SCHEMES = ("nr", "cr", "ca")
CONSTRAINTS = ("params", "flops")


@dataclass(frozen=True)
class NRCfg:
    """NR's settings: the `nr:` section of a config and, as nr_study.nr.NRConfig, what the NeuralRejuvenation
    hook takes — one definition, torch-free. Built directly (NRConfig(tr=0.3)) it checks the same ranges
    (ValueError naming the field); scheme / rescale / realloc left null take a method's defaults
    (`with_method_defaults`; NR's: nr, no rescaling, reallocation)."""

    tr: float = F(0.5, rng(0.0, 1.0, True, True), doc="utilization threshold Tr: rejuvenate when r < tr")
    delta_r: float = F(0.01, rng(0.0, lo_open=True))
    delta_lambda: float = F(5e-5, rng(0.0))
    delta_t: int = F(1, rng(1))
    delta_t_unit: str = F("epoch", choice(("epoch", "step")))
    lambda_mode: str = F("adaptive", choice(("adaptive", "fixed")))
    lambda_fixed: float = F(1.5e-4, rng(0.0))
    lambda_max: Optional[float] = F(None, rng(0.0))
    window_epochs: Optional[int] = F(None, rng(1), doc="NR active only during the first K epochs")
    max_rejuvenations: int = F(1, rng(0))
    target_ratio: float = F(1.0, rng(0.0, 1.0, lo_open=True))
    constraint: str = F("params", choice(CONSTRAINTS), doc="the resource r(θ) and the budget are measured in")
    scheme: Optional[str] = F(None, choice(SCHEMES), doc="null: the method's scheme")
    rescale: Optional[bool] = F(None, doc="null: the method's default")
    realloc: Optional[bool] = F(None, doc="null: the method's default")
    gamma0: float = F(1.0, rng(0.0, lo_open=True), doc="neural rescaling's target: survivors with |γ| below it "
                      "are scaled up to it")
    gamma_new: float = F(0.5, rng(0.0, lo_open=True), doc="γ of a rejuvenated channel (the official code's 0.5; "
                         "its outgoing weights are 0, so any value keeps the function)")
    new_head_init: str = F("zero", choice(("zero", "normal")), doc="the classifier's columns reading new channels: "
                           "zero keeps the function exactly; normal: N(0, 0.01) as the official code")
    cr_heads: str = F("separate", choice(("joint", "separate")), doc="NR-CR after a rejuvenation: separate = the "
                      "official two classifiers (the head run on S and on R, loss CE(S) + CE(R), prediction from "
                      "their sum); joint: one head over [S; R]")
    carry_momentum: bool = F(False, doc="SGD momentum follows the surviving weights across a rejuvenation "
                             "(rescaling inverted, new entries 0); false: the paper's fresh optimizer")
    dead_threshold: float = F(0.01, rng(0.0, 1.0, True, True))
    impl: str = F("two", choice(("two", "four")), doc="CA convolutions: two or four per layer")
    round_to: Optional[int] = F(None, rng(1), doc="rejuvenated widths in multiples of this, maximal within the "
                                "budget (refused up front where they cannot meet it; a rejuvenation whose live "
                                "channels do not fit falls back to exact widths, warned); 1: the paper's exact "
                                "floor(α·w'); null: on CUDA 8 where they meet the budget, else exact; on CPU exact")

    def __post_init__(self):
        errors = check_section(self, "nr.")
        if errors:
            raise ValueError("\n".join(errors))

    def with_method_defaults(self, scheme: str = "nr", rescale: bool = False, realloc: bool = True) -> "NRCfg":
        """These settings with an unset scheme / rescale / realloc taken from a method (default: NR's)."""
        return dataclasses.replace(self, scheme=scheme if self.scheme is None else self.scheme,
                                   rescale=rescale if self.rescale is None else self.rescale,
                                   realloc=realloc if self.realloc is None else self.realloc)


NRConfig = NRCfg  # the name the core's API uses (nr_study.nr.NRConfig)
