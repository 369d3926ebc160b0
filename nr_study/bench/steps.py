"""Training-step rows: NR's step against the plain one (also in the other memory layout and precision, the
utilization NR computes at each Δt, and on CUDA images/s), and odd widths against widths in multiples of 8 per
FLOP. Every step is the trainer's own (nr_study.train.train_step), so the bench times what a run executes."""
from __future__ import annotations

import copy
import statistics
from typing import Callable

import torch
import torch.nn as nn

from nr_study.bench.settings import GOALS, Sizes
from nr_study.bench.timing import alternate, error_row, ratio_stats, row, spread


class Step:
    """The trainer's own step (nr_study.train.train_step) on a fixed batch: forward, loss, backward, [L1
    subgradient], SGD step, [end_of_step]."""

    def __init__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, device: torch.device, amp: bool,
                 nr: bool, lam: float = 1e-4):
        from nr_study.nr import NeuralRejuvenation, NRConfig

        self.model, self.x, self.y, self.device, self.amp = model, x, y, device, amp
        self.hook = None
        if nr:
            # Δt in epochs: end_of_step only counts, as in a real run between two monitor points
            self.hook = NeuralRejuvenation(model, (1, *x.shape[1:]), NRConfig())
            self.hook.lam.lam = lam  # λ > 0, so the L1 subgradient does its work every step
        model.train()
        self.opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)

    def __call__(self) -> None:
        from nr_study.train import train_step

        train_step(self.model, self.opt, self.x, self.y, amp=self.amp,
                   after_backward=self.hook.after_backward if self.hook is not None else None)
        if self.hook is not None:
            self.hook.end_of_step()


def _utilization_fn(hook) -> Callable[[], None]:
    """What the hook computes at each Δt: live masks once, then params and FLOPs on the cached graph."""
    from nr_study.nr import CONSTRAINTS, graph_utilization, live_masks

    def fn():
        masks = live_masks(hook.model, hook.graph, hook.cfg.dead_threshold)
        for c in CONSTRAINTS:
            graph_utilization(hook.model, hook.graph, c, masks=masks)

    return fn


def _prep_model(model: nn.Module, device: torch.device, channels_last: bool) -> nn.Module:
    """On the device, in channels_last where the step runs so (CUDA's default; the layout row's other arm)."""
    model = model.to(device)
    return model.to(memory_format=torch.channels_last) if channels_last else model


def bench_steps(sz: Sizes, device: torch.device) -> list[dict]:
    """Per model, five arms alternated on one batch: plain, NR, NR's utilization, the other layout, the other
    precision; each row a ratio to the plain step, so NR's overhead is read against the same machine load."""
    from nr_study.models import create_model

    cuda = device.type == "cuda"
    rows = []
    for name, kw, batch, hw, warmup, reps in sz.step_models:
        try:
            torch.manual_seed(0)
            base = create_model(name, num_classes=10, in_channels=3, **kw)
            plain_m = _prep_model(copy.deepcopy(base), device, cuda)
            nr_m = _prep_model(copy.deepcopy(base), device, cuda)
            x = torch.randn(batch, 3, hw, hw, device=device)
            if cuda:
                x = x.contiguous(memory_format=torch.channels_last)
            y = torch.randint(0, 10, (batch,), device=device)
            plain, nr = Step(plain_m, x, y, device, cuda, nr=False), Step(nr_m, x, y, device, cuda, nr=True)
            # the plain step in the other memory layout and in the other precision (the CPU's plain step is
            # contiguous fp32, CUDA's channels_last bf16)
            layout = Step(_prep_model(copy.deepcopy(base), device, not cuda),
                          x.contiguous(memory_format=torch.contiguous_format if cuda else torch.channels_last),
                          y, device, cuda, nr=False)
            precision = Step(_prep_model(copy.deepcopy(base), device, cuda), x, y, device, not cuda, nr=False)
            util = _utilization_fn(nr.hook)
            t = alternate({"plain": plain, "nr": nr, "util": util, "layout": layout, "precision": precision}, reps,
                          warmup, device)
            shape = f"batch {batch}, {hw}x{hw}{', ' + str(kw) if kw else ''}, {device.type}"
            if cuda:
                shape += ", channels_last + bf16 autocast"
            r, d = ratio_stats(t["nr"], t["plain"])
            rows.append(row(f"step_nr/plain[{name}]", r, GOALS["step"], "ratio",
                            f"{d}; {shape}; λ=1e-4 on {len(nr.hook._gammas)} free BNs"))
            r, d = ratio_stats(t["util"], t["plain"])
            n_layers = len(nr.hook.graph.layers)
            rows.append(row(f"util/step[{name}]", r, GOALS["util"], "ratio",
                            f"{d}; params+FLOPs over {n_layers} layers, cached graph"))
            for variant, label, what in (("layout", "step_channels_last/contiguous",
                                          "model and batch in channels_last (train.channels_last) / contiguous"),
                                         ("precision", "step_bf16/fp32", "bf16 autocast (train.bf16) / fp32")):
                r, d = ratio_stats(*((t["plain"], t[variant]) if cuda else (t[variant], t["plain"])))
                rows.append(row(f"{label}[{name}]", r, None, "ratio", f"{d}; the plain step, {what}; {shape}"))
            if cuda and name in ("vgg19_bn_cifar", "resnet164_cifar"):
                ips = batch / statistics.median(t["plain"])
                ips_nr = batch / statistics.median(t["nr"])
                _, lo, hi, kind = spread([batch / s for s in t["plain"]])
                rows.append(row(f"images_per_s[{name}]", ips, None, "img/s",
                                f"plain training step, batch {batch}, channels_last + bf16 autocast; {kind} "
                                f"{lo:.0f}–{hi:.0f}; NR step {ips_nr:.0f} img/s"))
            del plain, nr, layout, precision, plain_m, nr_m, base
        except Exception as exc:  # one failing model must not hide the other rows
            rows.append(error_row(f"step_nr/plain[{name}]", GOALS["step"], "ratio", exc))
            rows.append(error_row(f"util/step[{name}]", GOALS["util"], "ratio", exc))
            rows.append(error_row(f"step_channels_last/contiguous[{name}]", None, "ratio", exc))
            rows.append(error_row(f"step_bf16/fp32[{name}]", None, "ratio", exc))
    return rows


# odd widths against multiples of 8, per FLOP
ODD_WIDTHS = [19, 21, "M", 37, 43, "M", 79, 83]    # widths as a rejuvenation leaves them (round_to 1)
ROUND8_WIDTHS = [16, 16, "M", 32, 40, "M", 72, 80]  # the same rounded down to multiples of 8 (round_to 8)


def time_steps(models: dict[str, nn.Module], batch: int, hw: int, warmup: int, reps: int, device: torch.device
               ) -> tuple[dict[str, list[float]], dict[str, int]]:
    """The trainer's plain step on each model, alternated on one random batch, and each model's forward FLOPs
    of one image (torch's FlopCounterMode): what a per-FLOP comparison of two networks needs."""
    from torch.utils.flop_counter import FlopCounterMode

    cuda = device.type == "cuda"
    x = torch.randn(batch, 3, hw, hw, device=device)
    if cuda:
        x = x.contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (batch,), device=device)
    steps, flops = {}, {}
    for label, model in models.items():
        model = _prep_model(model, device, cuda)
        with FlopCounterMode(display=False) as fc, torch.no_grad():
            model.eval()(x[:1])
        flops[label] = fc.get_total_flops()
        steps[label] = Step(model, x, y, device, cuda, nr=False)  # Step puts it back in train mode
    return alternate(steps, reps, warmup, device), flops


def bench_widths(sz: Sizes, device: torch.device) -> list[dict]:
    """Are odd widths slower per FLOP on this device? The trainer's step on a VGG with a rejuvenation's odd
    widths against the same net rounded down to multiples of 8, each step time divided by its forward FLOPs
    (torch's FlopCounterMode). > 1: odd widths cost more per FLOP (the case for nr.round_to 8)."""
    from nr_study.models.vgg import VGG, _make_features

    name, goal = "step_odd/round8", None
    try:
        _, _, batch, hw, warmup, reps = sz.step_models[0]
        models = {}
        for label, widths in (("odd", ODD_WIDTHS), ("round8", ROUND8_WIDTHS)):
            torch.manual_seed(0)
            features, c = _make_features(widths, 3)
            models[label] = VGG(features, c, 10)
        t, flops = time_steps(models, batch, hw, warmup, reps, device)
        r, d = ratio_stats(t["odd"], t["round8"])
        fr = flops["odd"] / flops["round8"]
        return [row(name, r / fr, goal, "ratio", f"step time odd/round8 {r:.3f} ({d}) / FLOPs ratio {fr:.3f}; widths "
                    f"{ODD_WIDTHS} vs {ROUND8_WIDTHS}; batch {batch}, {hw}x{hw}, {device.type}")]
    except Exception as exc:
        return [error_row(name, goal, "ratio", exc)]

