"""NeuralRejuvenation: the one object a training loop calls (Algorithm 1 of the paper).

Events: ``after_backward()`` adds the L1 subgradient; ``end_of_step()`` / ``end_of_epoch()`` count Δt and,
when the NR flag is on, monitor r(θ), update λ and rejuvenate when r < Tr. A rejuvenation changes the model
in place and is returned as a report dict; the caller must then rebuild its optimizer (we do not carry
momentum over: the S weights restart their momentum, the R weights have none to carry).

A rejuvenation never removes a live channel (DESIGN §3.3 item 7). A Tr above the target ratio could meet live
channels costing more than the target, so it is refused here. Under NR-CR a later rejuvenation may find the
live channels too costly made dense: it keeps the S and R blocks, removes the dead channels and adds none (the
report's ``no_growth`` says why). An nr.round_to whose multiples cannot hold the live channels within the budget
at that rejuvenation gives way to the exact widths, with a warning (the report's ``round_to`` is then 1).
"""
from __future__ import annotations

import warnings

import torch.nn as nn

from nr_study.nr.cost import CONSTRAINTS, graph_utilization, live_masks, min_reachable_ratio, widths_cost
from nr_study.nr.graph import build_graph
from nr_study.nr.sparsity import LambdaController, l1_subgradient_
from nr_study.nr.settings import NRConfig
from nr_study.nr.surgery import RoundToError, base_cost, rejuvenate, split_counts


class NeuralRejuvenation:
    def __init__(self, model: nn.Module, input_shape, config: NRConfig | None = None):
        self.model = model
        self.input_shape = tuple(input_shape)
        self.cfg = (config or NRConfig()).with_method_defaults()  # unset scheme/rescale/realloc: NR's
        self.graph = build_graph(model, self.input_shape)
        base_cost(model, self.graph)
        if self.cfg.max_rejuvenations > 0:
            self._check_reachable()
            if self.cfg.realloc and self.cfg.tr > self.cfg.target_ratio:
                raise ValueError(f"nr.tr: {self.cfg.tr} is above nr.target_ratio {self.cfg.target_ratio}: a "
                                 f"rejuvenation at r between them finds its live channels costing more than the "
                                 "target, and a rejuvenation never removes live channels (that is Network "
                                 "Slimming's job); allowed: tr <= target_ratio (the paper compresses with tr "
                                 "0.25, target_ratio 0.5)")
            if (self.cfg.round_to or 1) > 1 and self.cfg.realloc and self.cfg.scheme != "cr":
                self._check_round_to(self.cfg.round_to)
        self.lam = LambdaController(self.cfg.delta_r, self.cfg.delta_lambda, self.cfg.lambda_mode,
                                    self.cfg.lambda_fixed, self.cfg.lambda_max)
        self.step = 0
        self.epoch = 0
        self.rejuvenations = 0
        self.last_ratio: dict[str, float] = {}
        self.last_sources = None
        self._collect_gammas()

    def _check_reachable(self) -> None:
        """Refuse a model with nothing to rejuvenate, or a Tr its fixed channels keep r from reaching."""
        name = type(self.model).__name__
        if not self.graph.free_groups():
            raise ValueError(f"model {name}: no free channel group (every channel is fixed by residual adds, "
                             "grouped convs, gates or a missing BatchNorm), so NR has nothing to rejuvenate")
        c = self.cfg.constraint
        r_min = min_reachable_ratio(self.model, self.graph, c)
        if r_min >= self.cfg.tr:
            raise ValueError(f"nr.tr: {self.cfg.tr} cannot be reached on model {name}: even with every free "
                             f"channel dead but one per layer r({c}) is {r_min:.3f}; allowed: tr > {r_min:.3f}")
        if r_min > 0.8 * self.cfg.tr:
            warnings.warn(f"nr.tr: {self.cfg.tr} is close to the smallest reachable r({c}) = {r_min:.3f} on "
                          f"model {name}: λ may grow large before r gets there", stacklevel=3)

    def _check_round_to(self, m: int) -> None:
        """Refuse an nr.round_to no rejuvenation could meet: every free layer at its least, m channels, already
        costs more than the budget (found here, not at the first rejuvenation mid-run). Exact where a layer's
        cost depends on its width alone; under NR-CR it also depends on how many of its channels are new (no
        cross blocks), which only a rejuvenation knows, so there rejuvenate() refuses instead."""
        c = self.cfg.constraint
        free = self.graph.free_groups()
        s, r = split_counts({g.id: g.width for g in free}, {g.id: m for g in free})
        least = widths_cost(self.graph, s, r, c, self.cfg.scheme)
        budget = self.cfg.target_ratio * base_cost(self.model, self.graph)[c]
        if least > budget:
            raise ValueError(f"nr.round_to: {m}: with every layer at its least ({m} channels) model "
                             f"{type(self.model).__name__} costs {least} {c}, more than the budget {int(budget)} "
                             f"(nr.target_ratio {self.cfg.target_ratio}); allowed: a smaller round_to, or 1 (exact)")

    # -- events -----------------------------------------------------------------------------------------
    def after_backward(self) -> None:
        if self.flag_on:
            l1_subgradient_(self._gammas, self.lam.lam)

    def end_of_step(self) -> dict | None:
        self.step += 1
        if self.cfg.delta_t_unit == "step" and self.step % self.cfg.delta_t == 0:
            return self._monitor()
        return None

    def end_of_epoch(self) -> dict | None:
        self.epoch += 1
        if self.cfg.delta_t_unit == "epoch" and self.epoch % self.cfg.delta_t == 0:
            return self._monitor()
        return None

    @property
    def flag_on(self) -> bool:
        """NR flag: inside the window and with rejuvenations left."""
        in_window = self.cfg.window_epochs is None or self.epoch < self.cfg.window_epochs
        return in_window and self.rejuvenations < self.cfg.max_rejuvenations

    # -- monitor / rejuvenate -------------------------------------------------------------------------
    def utilization(self, constraint: str | None = None):
        return graph_utilization(self.model, self.graph, constraint or self.cfg.constraint,
                                 self.cfg.dead_threshold)

    def _round_to(self) -> int | None:
        """nr.round_to, or when unset by the device the model trains on: on CUDA None (multiples of 8 where they
        fit the budget: its kernels tile by 8), elsewhere 1, the paper's exact widths (on CPU multiples of 8 run
        faster too, `nr-study bench` step_odd/round8, but on the small nets CPU studies train they are a coarse
        grid: a 16-channel layer could only become 8, 16 or 24, which changes where NR regrows)."""
        if self.cfg.round_to is not None:
            return self.cfg.round_to
        p = next(self.model.parameters(), None)
        return None if p is not None and p.device.type == "cuda" else 1

    def _monitor(self) -> dict | None:
        if not self.flag_on:
            return None
        masks = live_masks(self.model, self.graph, self.cfg.dead_threshold)
        for c in CONSTRAINTS:
            self.last_ratio[c] = graph_utilization(self.model, self.graph, c, masks=masks).ratio
        r = self.last_ratio[self.cfg.constraint]
        if r < self.cfg.tr:
            try:
                report = self._rejuvenate(self._round_to())
            except RoundToError as exc:  # found before any surgery: the model is untouched
                warnings.warn(f"nr.{exc}; this rejuvenation uses the exact widths", stacklevel=2)
                report = self._rejuvenate(1)
            self.rejuvenations += 1
            self.lam.reset()
            self.last_ratio = {}
            self._collect_gammas()
            self.last_sources = report.sources  # where the new weights came from (nr.carry_momentum), else None
            out = report.as_dict()
            out.update(step=self.step, epoch=self.epoch, ratio=r, index=self.rejuvenations)
            return out
        self.lam.update(r)
        return None

    def _rejuvenate(self, round_to: int | None):
        return rejuvenate(self.model, self.input_shape, self.cfg.target_ratio, self.cfg.constraint, self.cfg.scheme,
                          self.cfg.rescale, self.cfg.realloc, inplace=True, threshold=self.cfg.dead_threshold,
                          gamma0=self.cfg.gamma0, graph=self.graph, impl=self.cfg.impl, round_to=round_to,
                          sources=self.cfg.carry_momentum, gamma_new=self.cfg.gamma_new,
                          head_init=self.cfg.new_head_init)[1]

    def _collect_gammas(self) -> None:
        modules = dict(self.model.named_modules())
        self._gammas = [modules[g.bn].weight for g in self.graph.free_groups()]

    # -- reporting / persistence --------------------------------------------------------------------------
    def metrics(self) -> dict:
        out = {"lambda": self.lam.lam if self.flag_on else 0.0, "rejuvenations": self.rejuvenations}
        masks = live_masks(self.model, self.graph, self.cfg.dead_threshold)
        for c in CONSTRAINTS:
            u = graph_utilization(self.model, self.graph, c, masks=masks)
            out[f"util_{c}"] = u.ratio
            out[c] = u.total
        return out

    def state_dict(self) -> dict:
        return {"step": self.step, "epoch": self.epoch, "rejuvenations": self.rejuvenations,
                "lambda": self.lam.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        """Restore counters and λ; the model must already have the checkpoint's architecture."""
        self.step, self.epoch = state["step"], state["epoch"]
        self.rejuvenations = state["rejuvenations"]
        self.lam.load_state_dict(state["lambda"])
        self.graph = build_graph(self.model, self.input_shape)
        self._collect_gammas()
