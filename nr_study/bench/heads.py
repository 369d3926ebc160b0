"""NR-CR's two classifiers against one (nr.cr_heads separate vs joint): the same model in NR-CR's block form
(two equal halves, nr.splits.split_halves), one training step each, alternated on one batch. Separate runs the
head twice (on S's and on R's features) and sums two cross-entropies: the row says what that costs per step."""
from __future__ import annotations

import copy

import torch

from nr_study.bench.settings import GOALS, Sizes
from nr_study.bench.steps import _prep_model
from nr_study.bench.timing import alternate, error_row, ratio_stats, row


def bench_heads(sz: Sizes, device: torch.device) -> list[dict]:
    from nr_study.methods import Method
    from nr_study.models import create_model
    from nr_study.nr import build_graph
    from nr_study.nr.heads import check_two_heads
    from nr_study.nr.splits import split_halves
    from nr_study.train import train_step

    cuda = device.type == "cuda"
    rows = []
    for name, kw, batch, hw, warmup, reps in sz.step_models:
        label = f"step_heads_separate/joint[{name}]"
        try:
            torch.manual_seed(0)
            base = create_model(name, num_classes=10, in_channels=3, **kw)
            shape = (1, 3, hw, hw)
            try:
                check_two_heads(base, build_graph(base, shape))
            except ValueError as exc:  # a model NR-CR's two heads are refused on: said, not timed
                rows.append(row(label, None, None, "ratio", f"not applicable: {exc}"))
                continue
            base, halves = split_halves(base, shape)
            x = torch.randn(batch, 3, hw, hw, device=device)
            if cuda:
                x = x.contiguous(memory_format=torch.channels_last)
            y = torch.randint(0, 10, (batch,), device=device)

            def arm(two_heads: bool):
                model = _prep_model(copy.deepcopy(base), device, cuda).train()
                method = Method(None, shape)
                method.set_heads(model, halves if two_heads else None)
                opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
                return lambda: train_step(model, opt, x, y, amp=cuda, loss_fn=method.loss)

            t = alternate({"joint": arm(False), "separate": arm(True)}, reps, warmup, device)
            r, d = ratio_stats(t["separate"], t["joint"])
            rows.append(row(label, r, GOALS["heads"], "ratio",
                            f"{d}; two equal halves (NR-CR's form), batch {batch}, {hw}x{hw}, {device.type}"))
        except Exception as exc:  # one failing model must not hide the other rows
            rows.append(error_row(label, GOALS["heads"], "ratio", exc))
    return rows
