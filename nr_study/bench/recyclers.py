"""The recyclers' step rows: a training step with ReDo's and with CBP's events against the plain one, timed
alternately on one batch. Each timed call is a block of steps (Sizes.recycle_block), so ReDo's periodic scoring
(hooks, a host sync, the recycling) is inside every call, at a period (redo.every = the block) far shorter than
its default: a bound on what the default costs. CBP runs at its ImageNet settings with maturity 0, so its
replacements happen at their steady-state rate from the first step (a real run starts them after m steps)."""
from __future__ import annotations

import copy

import torch
import torch.nn as nn

from nr_study.bench.settings import GOALS, Sizes
from nr_study.bench.steps import _prep_model
from nr_study.bench.timing import alternate, error_row, ratio_stats, row


class MethodSteps:
    """`block` trainer steps (nr_study.train.train_step) followed by the method's end_of_step, as fit runs them."""

    def __init__(self, method: str, settings: dict, model: nn.Module, x: torch.Tensor, y: torch.Tensor, amp: bool,
                 block: int):
        from nr_study.config import config_from_dict
        from nr_study.methods import make_method

        cfg = config_from_dict({"method": method, **settings})
        self.method = make_method(cfg, (1, *x.shape[1:]))
        self.model = self.method.on_fit_start(model)
        self.model.train()
        self.opt = torch.optim.SGD(self.model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
        self.method.on_optimizer(self.opt)
        self.x, self.y, self.amp, self.block = x, y, amp, block

    def __call__(self) -> None:
        from nr_study.train import train_step

        for _ in range(self.block):
            train_step(self.model, self.opt, self.x, self.y, amp=self.amp)
            self.method.end_of_step()


def bench_recyclers(sz: Sizes, device: torch.device) -> list[dict]:
    """Per step model: plain (BL), ReDo and CBP arms alternated; each row a ratio to the plain block."""
    from nr_study.models import create_model

    cuda = device.type == "cuda"
    block = sz.recycle_block
    rows = []
    for name, kw, batch, hw, warmup, reps in sz.step_models:
        names = (f"step_redo/plain[{name}]", f"step_cbp/plain[{name}]")
        try:
            torch.manual_seed(0)
            base = create_model(name, num_classes=10, in_channels=3, **kw)
            x = torch.randn(batch, 3, hw, hw, device=device)
            if cuda:
                x = x.contiguous(memory_format=torch.channels_last)
            y = torch.randint(0, 10, (batch,), device=device)

            def arm(method, settings):
                return MethodSteps(method, settings, _prep_model(copy.deepcopy(base), device, cuda), x, y, cuda, block)

            redo_cfg = {"redo": {"every": block}}
            cbp_cfg = {"cbp": {"maturity": 0}}
            arms = {"plain": arm("BL", {}), "redo": arm("ReDo", redo_cfg), "cbp": arm("CBP", cbp_cfg)}
            t = alternate(arms, reps, warmup, device)
            shape = f"batch {batch}, {hw}x{hw}{', ' + str(kw) if kw else ''}, {device.type}"
            if cuda:
                shape += ", channels_last + bf16 autocast"
            redo, cbp = arms["redo"].method, arms["cbp"].method
            units = sum(g.width for g in redo.groups)
            r, d = ratio_stats(t["redo"], t["plain"])
            rows.append(row(names[0], r, GOALS["redo"], "ratio",
                            f"{d}; blocks of {block} steps, ReDo scoring once per block (redo.every {block}, τ "
                            f"{redo.cfg.redo.tau:g}; recycled {redo.recycled} of {units} units over the run); "
                            f"{shape}"))
            r, d = ratio_stats(t["cbp"], t["plain"])
            rows.append(row(names[1], r, GOALS["cbp"], "ratio",
                            f"{d}; blocks of {block} steps, CBP every step (ρ {cbp.cfg.cbp.replacement_rate:g}, "
                            f"maturity 0: {cbp.recycled} replacements over {cbp.step} steps, {len(cbp.groups)} "
                            f"layers); {shape}"))
        except Exception as exc:  # one failing model must not hide the other rows
            rows.extend(error_row(n, GOALS[k], "ratio", exc) for n, k in zip(names, ("redo", "cbp")))
    return rows
