"""`nr-study bench`: NR's costs measured against plain training, side by side in one process.

Every number is a ratio of two things timed ALTERNATELY in the same process (A, B, A, B, ... with the order
rotated each repetition), after a warm-up, as the median of per-repetition ratios, with the spread printed
(IQR with 4+ repetitions, else min–max). The machine may be shared and noisy: pairs taken back to back see the
same load, so their ratio is far steadier than either time. Speed goals live here, never in timed tests.

Rows (name — what / goal):
  step_nr/plain[M]       NR training step (fwd, bwd, L1 subgradient, SGD step, end_of_step) / plain step   ≤ 1.03
  step_channels_last/contiguous[M]   the plain step in channels_last / contiguous layout (train.channels_last) (info)
  step_bf16/fp32[M]      the plain step under bf16 autocast (train.bf16) / in fp32                        (info)
  util/step[M]           utilization (live masks + params and FLOPs on the hook's cached graph) / one step ≤ 0.01
  surgery_s[M]           rejuvenate(inplace, cached graph) on a copy with ~30% dead channels, seconds       ≤ 0.5
  step_odd/round8        step time per FLOP, a rejuvenation's odd widths / the same rounded to multiples of 8 (info)
  layer_ca_two/plain     NR-CA layer fwd+bwd (two convolutions, the core's default) / plain conv            ≤ 1.3
  layer_ca_four/plain    NR-CA layer fwd+bwd (four convolutions, the official code's form) / plain conv     ≤ 1.3
  layer_cr/plain         NR-CR layer fwd+bwd / plain conv of equal width                                    ≤ 1.3
  layer_ca_two/ca_four   the two CA forms against each other (< 1: "two" is faster)                      (info)
  ca_nest_3/1            NR-CA net fwd+bwd after 3 rejuvenations / after 1 (each nests the last CA layer)  (info)
  sweep_makespan/ideal   makespan of 8 trials of 10-20 s (--quick: 4 of a few s) / (Σ trial time / slots),
                         reuse_actors false (a fresh process per trial); median of 3 sweeps (--quick: 1)    ≤ 1.10
  sweep_makespan/ideal[reuse_actors]   the same with reuse_actors true (the default), alternated with it  ≤ 1.10
  mlflow_share           time inside the tracker's calls / wall time of a real train() run                 ≤ 0.02
  run_nr/bl              a short real NR run (monitor + L1 + surgery) / the BL run of the same epochs        ≤ 1.10
  run_nr_round8/bl       the same NR run with nr.round_to 8 (widths in multiples of 8) / the BL run           (info)
  step_rejuvenated/bl    the trainer's step on the network NR grew (round_to 8 where it ran) / on BL's, per FLOP too (info)
  run_gap_by_part        NR − BL seconds per run, and by part of the loop (train()'s phase_s): setup, data,
                         steps, method_l1, method_events, adopt, eval, measure, checkpoint, tracking, finish (info)
  images_per_s[M]        (--device cuda) plain training-step throughput at batch 128                       (info)

`--quick` is a ≤ 2-minute version of every row (fewer repetitions, smaller shapes, a 4-trial sweep); `--tiny`
(the test suite's) skips the sweep row with null.
`--device cuda` runs the same code on the GPU with channels_last + bf16 autocast (torch.cuda.synchronize()
around every timing) and adds the images/s rows. `--json PATH` writes the rows as a list of
{"name", "value", "goal", "unit", "detail"}.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import io
import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn as nn

from nr_study.config import MAX_THREADS
from nr_study.errors import UserError
from nr_study.files import check_writable_dir, write_json_atomic

GOALS = {"step": 1.03, "util": 0.01, "surgery": 0.5, "layer": 1.3, "sweep": 1.10, "mlflow": 0.02, "run": 1.10}


# ------------------------------------------------------------------------------------------- settings
class Sizes:
    """Shapes and repetition counts for one mode (full / quick / tiny)."""

    def __init__(self, mode: str, device: torch.device):
        self.mode = mode
        cuda = device.type == "cuda"
        full, quick = mode == "full", mode == "quick"
        # (model name, kwargs, batch, input hw, warmup, reps)
        if cuda:
            self.step_models = [("vgg_small", {}, 128, 32, 3, 15), ("resnet164_cifar", {}, 128, 32, 3, 11),
                                ("vgg19_bn_cifar", {}, 128, 32, 3, 11)]
            if not full:
                self.step_models = [(n, k, b, hw, 2, 7) for n, k, b, hw, _, _ in self.step_models]
        elif full:
            self.step_models = [("vgg_small", {}, 64, 32, 2, 11), ("resnet164_cifar", {}, 32, 32, 1, 7)]
        elif quick:
            self.step_models = [("vgg_small", {}, 32, 32, 1, 7), ("resnet164_cifar", {}, 8, 32, 1, 5)]
        else:  # tiny (tests)
            self.step_models = [("vgg_small", {"width": 8}, 4, 16, 1, 3), ("resnet164_cifar", {}, 2, 8, 1, 3)]
        # surgery: (model name, input shape, num_classes, scheme, rescale); reps
        px = 224 if mode != "tiny" else 64
        self.surgery_models = [("resnet50", (1, 3, px, px), 1000, "ca", True),
                               ("vgg19_bn_cifar", (1, 3, 32, 32), 10, "cr", False)]
        self.surgery_reps = {"full": 5, "quick": 3, "tiny": 2}[mode]
        # single layer: channels, hw, batch, warmup, reps
        self.layer = {"full": (128, 32, 64, 2, 9), "quick": (128, 16, 16, 1, 5), "tiny": (32, 8, 4, 1, 3)}[mode]
        if cuda:
            self.layer = (128, 32, 64, 5, 21) if full else (128, 32, 64, 3, 9)
        # whole runs (BL vs NR, also the MLflow share): model width, input hw, n_train, batch, epochs, pairs
        self.run = {"full": (16, 32, 2048, 64, 4, 3), "quick": (8, 32, 512, 32, 2, 1),
                    "tiny": (4, 16, 256, 16, 2, 1)}[mode]
        if cuda:
            self.run = (32, 32, 8192, 128, 4, 2) if full else (32, 32, 4096, 128, 2, 1)
        self.sweep = {"full": 8, "quick": 4, "tiny": 0}[mode]  # trials of the sweep row; tiny (tests): skipped
        self.sweep_reps = 3 if full else 1  # sweeps per arm, alternated
        # each sweep trial's (training images, epochs): full mode's trials take 10-20 s, as the goal's do
        self.sweep_trial = (4096, 8) if mode == "full" else (512, 3)
        # CA nesting: vgg_small width, input hw, batch, warmup, reps
        self.nest = {"full": (16, 32, 32, 2, 9), "quick": (8, 32, 16, 1, 5), "tiny": (4, 16, 4, 1, 3)}[mode]


# --------------------------------------------------------------------------------------------- timing
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_call(fn: Callable[[], object], device: torch.device) -> float:
    _sync(device)
    t0 = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - t0


def alternate(fns: dict[str, Callable[[], object]], reps: int, warmup: int, device: torch.device
              ) -> dict[str, list[float]]:
    """Time each fn once per repetition, interleaved, the order rotated every repetition; warm-up first."""
    names = list(fns)
    for _ in range(warmup):
        for n in names:
            fns[n]()
    _sync(device)
    times: dict[str, list[float]] = {n: [] for n in names}
    for i in range(reps):
        k = i % len(names)
        for n in names[k:] + names[:k]:
            times[n].append(time_call(fns[n], device))
    return times


def spread(xs: list[float]) -> tuple[float, float, float, str]:
    """(median, lo, hi, kind): IQR with 4+ values, else min–max."""
    xs = sorted(xs)
    med = statistics.median(xs)
    if len(xs) >= 4:
        q = statistics.quantiles(xs, n=4, method="inclusive")
        return med, q[0], q[2], "IQR"
    return med, xs[0], xs[-1], "min–max"


def ratio_stats(num: list[float], den: list[float]) -> tuple[float, str]:
    """Median of the per-repetition ratios num[i]/den[i], and a text with the spread and both medians."""
    ratios = [a / b for a, b in zip(num, den)]
    med, lo, hi, kind = spread(ratios)
    return med, (f"{kind} {lo:.3f}–{hi:.3f}, n={len(ratios)}; medians {_fmt_s(statistics.median(num))} / "
                 f"{_fmt_s(statistics.median(den))}")


def _fmt_s(t: float) -> str:
    if t >= 1:
        return f"{t:.2f}s"
    if t >= 1e-3:
        return f"{t * 1e3:.1f}ms"
    return f"{t * 1e6:.0f}µs"


def row(name: str, value: Optional[float], goal: Optional[float], unit: str, detail: str) -> dict:
    if value is not None and not math.isfinite(value):
        value = None
    return {"name": name, "value": None if value is None else float(value), "goal": goal, "unit": unit,
            "detail": detail}


def _error_row(name: str, goal: Optional[float], unit: str, exc: BaseException) -> dict:
    msg = f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
    return row(name, None, goal, unit, f"failed: {msg}")


# ------------------------------------------------------------------------------------- training steps
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
    model = model.to(device)
    return model.to(memory_format=torch.channels_last) if channels_last else model


def bench_steps(sz: Sizes, device: torch.device) -> list[dict]:
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
            rows.append(_error_row(f"step_nr/plain[{name}]", GOALS["step"], "ratio", exc))
            rows.append(_error_row(f"util/step[{name}]", GOALS["util"], "ratio", exc))
            rows.append(_error_row(f"step_channels_last/contiguous[{name}]", None, "ratio", exc))
            rows.append(_error_row(f"step_bf16/fp32[{name}]", None, "ratio", exc))
    return rows


# ------------------------------------------------------------------------------------------- surgery
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
        return [_error_row(name, goal, "ratio", exc)]


def kill_channels(model: nn.Module, graph, fraction: float = 0.3, seed: int = 0) -> int:
    """Zero γ of a random `fraction` of each free group's channels (dead by the 1% rule); returns how many."""
    g = torch.Generator().manual_seed(seed)
    modules = dict(model.named_modules())
    n = 0
    with torch.no_grad():
        for grp in graph.free_groups():
            bn = modules[grp.bn]
            k = int(round(fraction * grp.width))
            if k == 0 or k >= grp.width:
                continue
            idx = torch.randperm(grp.width, generator=g)[:k].to(bn.weight.device)
            bn.weight[idx] = 0.0
            n += k
    return n


def bench_surgery(sz: Sizes, device: torch.device) -> list[dict]:
    from nr_study.models import create_model
    from nr_study.nr import build_graph, rejuvenate
    from nr_study.nr.surgery import base_cost

    rows = []
    for name, shape, ncls, scheme, rescale in sz.surgery_models:
        try:
            torch.manual_seed(0)
            model = create_model(name, num_classes=ncls, in_channels=3).to(device)
            graph = build_graph(model, shape)  # the hook's cached graph: traced once, not timed
            base_cost(model, graph)
            dead = kill_channels(model, graph, 0.3)
            total = sum(g.width for g in graph.free_groups())
            times, report = [], None
            for i in range(sz.surgery_reps + 1):  # the first one is a warm-up
                m, gr = copy.deepcopy(model), copy.deepcopy(graph)  # surgery edits both in place
                out = {}

                def run(m=m, gr=gr, out=out):
                    out["r"] = rejuvenate(m, shape, 1.0, "params", scheme, rescale, True, inplace=True, graph=gr)[1]

                t = time_call(run, device)
                report = out["r"]
                if i:
                    times.append(t)
                del m, gr
            med, lo, hi, kind = spread(times)
            rows.append(row(f"surgery_s[{name}]", med, GOALS["surgery"], "s",
                            f"{kind} {lo:.3f}–{hi:.3f}s, n={len(times)}; scheme {scheme}, rescale {rescale}, "
                            f"{dead}/{total} free channels dead, α={report.alpha:.3f}, input {list(shape)}, "
                            f"{device.type}"))
        except Exception as exc:
            rows.append(_error_row(f"surgery_s[{name}]", GOALS["surgery"], "s", exc))
    return rows


# ---------------------------------------------------------------------------------------- one layer
def split_layers(c: int, device: torch.device) -> dict[str, nn.Module]:
    """A plain 3x3 conv c->c and its NR-CA (two / four convolutions) and NR-CR forms at half S / half R."""
    from nr_study.nr.schemes import CAConv, CRConv, conv_like

    plain = nn.Conv2d(c, c, 3, padding=1, bias=False)
    h = c // 2
    s_idx, r_idx = torch.arange(h), torch.arange(h, c)
    inner, w_sr, w_r = conv_like(plain, h, h), conv_like(plain, h, h), conv_like(plain, c - h, c)
    ca2 = CAConv(s_idx, r_idx, inner, w_sr, w_r, plain, h, c - h, impl="two")
    cr = CRConv(s_idx, r_idx, conv_like(plain, h, h), conv_like(plain, c - h, c - h))
    with torch.no_grad():  # whatever conv_like initialises (or not), time on well-scaled weights
        for conv in (plain, inner, w_sr, w_r, cr.conv_s, cr.conv_r):
            nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
    ca4 = CAConv(s_idx, r_idx, copy.deepcopy(inner), copy.deepcopy(w_sr), copy.deepcopy(w_r), plain, h, c - h,
                 impl="four")
    return {n: m.to(device) for n, m in (("plain", plain), ("ca_two", ca2), ("ca_four", ca4), ("cr", cr))}


def bench_layer(sz: Sizes, device: torch.device) -> list[dict]:
    c, hw, batch, warmup, reps = sz.layer
    cuda = device.type == "cuda"
    names = ("layer_ca_two/plain", "layer_ca_four/plain", "layer_cr/plain")
    try:
        torch.manual_seed(0)
        mods = split_layers(c, device)
        fmt = torch.channels_last if cuda else torch.contiguous_format
        if cuda:
            mods = {n: m.to(memory_format=torch.channels_last) for n, m in mods.items()}
        x = torch.randn(batch, c, hw, hw, device=device).contiguous(memory_format=fmt).requires_grad_(True)
        g = torch.randn(batch, c, hw, hw, device=device).contiguous(memory_format=fmt)
        g16 = g.to(torch.bfloat16)

        def fwd_bwd(mod):
            def fn():
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
                    out = mod(x)
                out.backward(g if out.dtype == g.dtype else g16)
                x.grad = None
                mod.zero_grad(set_to_none=True)
            return fn

        t = alternate({n: fwd_bwd(m) for n, m in mods.items()}, reps, warmup, device)
        shape = f"{c}->{c} 3x3 at {hw}x{hw}, batch {batch}, half S / half R, fwd+bwd (input grad too), {device.type}"
        if cuda:
            shape += ", channels_last + bf16 autocast"
        rows = []
        for key, name in zip(("ca_two", "ca_four", "cr"), names):
            r, d = ratio_stats(t[key], t["plain"])
            rows.append(row(name, r, GOALS["layer"], "ratio", f"{d}; {shape}"))
        r, d = ratio_stats(t["ca_two"], t["ca_four"])
        faster = "two" if r < 1 else "four"
        rows.append(row("layer_ca_two/ca_four", r, None, "ratio",
                        f"{d}; < 1 means impl='two' (the default) is faster; here '{faster}' is faster"))
        return rows
    except Exception as exc:
        return [_error_row(n, GOALS["layer"], "ratio", exc) for n in names] + [
            _error_row("layer_ca_two/ca_four", None, "ratio", exc)]


def bench_nesting(sz: Sizes, device: torch.device) -> list[dict]:
    """Exactness makes NR-CA nest: the k-th rejuvenation wraps the previous CA layer as its S->S block."""
    from nr_study.models import create_model
    from nr_study.nr import build_graph, rejuvenate

    width, hw, batch, warmup, reps = sz.nest
    name = "ca_nest_3/1"
    try:
        torch.manual_seed(0)
        shape = (1, 3, hw, hw)
        model = create_model("vgg_small", num_classes=10, in_channels=3, width=width).to(device)
        nets, convs = {}, {}
        for k in range(1, 4):
            kill_channels(model, build_graph(model, shape), 0.3, seed=k)
            model, _ = rejuvenate(model, shape, 1.0, scheme="ca", inplace=False)
            if k in (1, 3):
                nets[k] = copy.deepcopy(model).train()
                convs[k] = sum(type(m) is nn.Conv2d for m in model.modules())
        x = torch.randn(batch, 3, hw, hw, device=device)

        def fwd_bwd(m):
            def fn():
                m(x).square().mean().backward()
                m.zero_grad(set_to_none=True)
            return fn

        t = alternate({str(k): fwd_bwd(m) for k, m in nets.items()}, reps, warmup, device)
        r, d = ratio_stats(t["3"], t["1"])
        return [row(name, r, None, "ratio", f"{d}; vgg_small width {width} at {hw}x{hw}, batch {batch}, fwd+bwd; "
                    f"conv modules {convs[1]} after 1 rejuvenation, {convs[3]} after 3; {device.type}")]
    except Exception as exc:
        return [_error_row(name, None, "ratio", exc)]


# ------------------------------------------------------------------------------------------- sweep
def _sweep_doc(device: torch.device, trials: int, reuse_actors: bool, n_train: int, epochs: int) -> dict:
    return {
        "name": "bench-sweep", "experiment": "nr-bench-sweep",
        "base": {"method": "BL", "model": {"name": "vgg_small", "kwargs": {"width": 8}},
                 "data": {"name": "synthetic", "n_train": n_train, "n_test": 128,
                          "synthetic": {"shape": [1, 16, 16], "noise": 0.5}},
                 "train": {"epochs": epochs, "batch_size": 32, "eval_batch_size": 128, "device": "cpu"},
                 "optim": {"lr": 0.05}},
        "space": {"seed": list(range(trials))},
        "resources_per_trial": {"cpu": 1},
        "max_failures": 0,
        "reuse_actors": reuse_actors,
    }


def bench_sweep(sz: Sizes, device: torch.device) -> list[dict]:
    """The sweep's makespan against the ideal (Σ trial time / slots), with fresh worker processes per trial and
    with reuse_actors (the default), alternated over sz.sweep_reps repetitions (the order rotates), each row
    the median of its repetitions with their spread: one sweep's makespan moves with the machine's load."""
    names = {False: "sweep_makespan/ideal", True: "sweep_makespan/ideal[reuse_actors]"}
    goal = GOALS["sweep"]
    if not sz.sweep:
        return [row(names[r], None, goal, "ratio", "skipped in --tiny") for r in (False, True)]
    runs: dict[bool, list[dict]] = {False: [], True: []}
    failed: dict[bool, str] = {}
    for i in range(sz.sweep_reps):
        for reuse in ((False, True) if i % 2 == 0 else (True, False)):
            if reuse in failed:
                continue
            try:
                runs[reuse].append(_sweep_once(sz.sweep, device, reuse, *sz.sweep_trial))
            except _NoSweep as exc:
                failed[reuse] = str(exc)
            except Exception as exc:
                failed[reuse] = f"failed: {type(exc).__name__}: {exc}".splitlines()[0][:300]
    rows = []
    for reuse in (False, True):
        if reuse in failed:
            rows.append(row(names[reuse], None, goal, "ratio", failed[reuse]))
            continue
        rs = runs[reuse]
        med, lo, hi, kind = spread([r["makespan"] / r["ideal"] for r in rs])
        mid = sorted(rs, key=lambda r: r["makespan"] / r["ideal"])[(len(rs) - 1) // 2]  # the median repetition
        times = mid["times"]
        n_train, epochs = sz.sweep_trial
        rows.append(row(names[reuse], med, goal, "ratio",
                        f"{kind} {lo:.3f}–{hi:.3f}, n={len(rs)} sweeps; the median one: makespan (Tuner.fit) "
                        f"{mid['makespan']:.1f}s vs Σ trial time {sum(times):.1f}s / {mid['slots']} slots = "
                        f"{mid['ideal']:.1f}s, trials {min(times):.1f}–{max(times):.1f}s (Ray time_total_s) in "
                        f"{mid['processes']} worker process(es), whole run_sweep incl. MLflow server start "
                        f"{mid['wall']:.1f}s; {sz.sweep} trials vgg_small w8 16x16 synthetic, {n_train} images, "
                        f"{epochs} epochs, embedded Ray, reuse_actors {str(reuse).lower()}, cpu"))
    if runs[True] and runs[False] and not failed:  # a reused process also skips the imports a trial pays
        fresh = statistics.median(r["makespan"] for r in runs[False])
        reused = statistics.median(r["makespan"] for r in runs[True])
        rows[-1]["detail"] += (f"; median makespan vs fresh workers {reused / fresh:.2f}x (a reused worker also "
                               f"skips the imports its first trial paid, so the ideal shrinks too)")
    return rows


class _NoSweep(Exception):
    """The sweep engine cannot run here (an optional part missing): the row says why, with no number."""


def _sweep_once(n: int, device: torch.device, reuse: bool, n_train: int, epochs: int) -> dict:
    """One real sweep of n trials on an embedded Ray: its Tuner.fit makespan, each trial's time, the slots."""
    try:
        import yaml

        from nr_study.sweep import load_search_space, run_sweep
    except Exception as exc:  # the sweep engine is optional here: say why, never invent a number
        raise _NoSweep(f"sweep engine not usable: {type(exc).__name__}: {exc}") from exc
    try:
        import ray
        from ray import tune

        from nr_study.train import available_cpus
    except Exception as exc:
        raise _NoSweep(f"Ray Tune not importable: {type(exc).__name__}: {exc}") from exc
    captured: dict = {}
    orig_fit = tune.Tuner.fit

    def timed_fit(self):
        t0 = time.perf_counter()
        try:
            res = orig_fit(self)
        finally:
            captured["makespan"] = time.perf_counter() - t0
        captured["results"] = res
        return res

    old_env = os.environ.get("MLFLOW_TRACKING_URI")
    try:
        with tempfile.TemporaryDirectory(prefix="nr-bench-sweep-") as td:
            doc = _sweep_doc(device, n, reuse, n_train, epochs)
            path = Path(td) / "bench_sweep.yaml"
            text = yaml.safe_dump(doc, sort_keys=False)
            path.write_text(text)
            space = load_search_space(path)
            # the embedded default, always a fresh local instance: a bare ray.init() joins any Ray cluster
            # already running on this machine (someone else's sweep or tests), which would skew the makespan
            own_ray = not ray.is_initialized()
            if own_ray:
                ray.init(address="local", num_cpus=available_cpus(), include_dashboard=False,
                         _node_ip_address="127.0.0.1", log_to_driver=False)
            tune.Tuner.fit = timed_fit
            t0 = time.perf_counter()
            try:
                run_sweep(space, source_text=text, runs=str(Path(td) / "runs"), verbose=0, out=io.StringIO())
            finally:
                tune.Tuner.fit = orig_fit
                if own_ray:
                    ray.shutdown()
            wall = time.perf_counter() - t0
    finally:
        if old_env is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = old_env
    results = captured.get("results")
    if results is None:
        raise _NoSweep("the sweep ran no Tuner.fit (nothing to time)")
    times, errors, pids = [], 0, set()
    for r in results:
        errors += bool(r.error)
        tt = (r.metrics or {}).get("time_total_s")
        if isinstance(tt, (int, float)):
            times.append(float(tt))
        pids.add((r.metrics or {}).get("pid"))
    if errors or len(times) != n:
        raise _NoSweep(f"{errors} of {n} trials errored / {len(times)} reported a time; no ratio")
    cpu = float(doc["resources_per_trial"]["cpu"])
    slots = max(1, min(n, doc.get("max_concurrent") or n, int(available_cpus() // cpu)))
    return {"makespan": captured["makespan"], "ideal": sum(times) / slots, "times": times, "slots": slots,
            "processes": len(pids), "wall": wall}


# ---------------------------------------------------------------------------- whole runs + MLflow share
_TRACKED = ("__init__", "start", "log_params", "set_tags", "log_epoch", "sync_history", "log_summary", "log_dict",
            "log_text", "log_artifact", "end")


@contextlib.contextmanager
def instrument_tracker():
    """Accumulate wall time spent inside RunTracker's calls (outermost call only) into the yielded dict."""
    from nr_study.tracking import RunTracker

    acc = {"total": 0.0, "calls": 0, "by": {}}
    depth = [0]
    saved = {n: RunTracker.__dict__[n] for n in _TRACKED if n in RunTracker.__dict__}

    def wrap(name, fn):
        def inner(*a, **k):
            if depth[0]:
                return fn(*a, **k)
            depth[0] += 1
            t0 = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                dt = time.perf_counter() - t0
                depth[0] -= 1
                acc["total"] += dt
                acc["calls"] += 1
                acc["by"][name] = acc["by"].get(name, 0.0) + dt
        return inner

    for n, fn in saved.items():
        setattr(RunTracker, n, wrap(n, fn))
    try:
        yield acc
    finally:
        for n, fn in saved.items():
            setattr(RunTracker, n, fn)


def _run_cfg(sz: Sizes, device: torch.device, method: str, epochs: Optional[int] = None) -> dict:
    width, hw, n_train, batch, ep, _ = sz.run
    cuda = device.type == "cuda"
    threads = torch.get_num_threads() if device.type == "cpu" else None
    cfg = {"method": method, "seed": 0,
           "model": {"name": "vgg_small", "kwargs": {"width": width}},
           "data": {"name": "synthetic", "n_train": n_train, "n_test": max(64, n_train // 4),
                    "synthetic": {"shape": [3, hw, hw], "noise": 0.5}},
           "optim": {"lr": 0.1},
           "train": {"epochs": epochs or ep, "batch_size": batch, "eval_batch_size": 256, "threads": threads,
                     "device": device.type, "channels_last": cuda, "bf16": cuda},
           "tracking": {"experiment": "nr-bench"}}
    if method != "BL":
        # monitor every 4 steps with a steep λ ramp, so the run rejuvenates (surgery included) around step 20:
        # a far denser monitor than the paper's once per epoch, so this overhead is an upper bound
        # constraint FLOPs: the rejuvenated network keeps the BL network's compute, so the ratio shows NR's own
        # cost (under a params budget realloc may move width to the high-resolution layers and raise FLOPs)
        cfg["nr"] = {"tr": 0.97, "dead_threshold": 0.8, "delta_t": 4, "delta_t_unit": "step",
                     "delta_lambda": 0.04, "max_rejuvenations": 1, "constraint": "flops"}
    return cfg


def _safe_ratio(a, b) -> str:
    try:
        return f"{float(a) / float(b):.3f}"
    except (TypeError, ValueError, ZeroDivisionError):
        return "?"


def bench_runs(sz: Sizes, device: torch.device) -> list[dict]:
    from nr_study.train import train

    pairs = sz.run[5]
    try:
        with tempfile.TemporaryDirectory(prefix="nr-bench-runs-") as td:
            uri = f"sqlite:///{Path(td) / 'mlflow.db'}"
            # warm-up: creates the store and the experiment (a sweep's trial finds them made), loads mlflow
            train(_run_cfg(sz, device, "BL", epochs=1), tracking_uri=uri, progress=False)
            arms = ["BL", "NR", "NR_round8"]  # NR_round8: NR with nr.round_to 8 (the CUDA default) on any device
            walls: dict[str, list[float]] = {a: [] for a in arms}
            shares, per_epoch, fixed, rejuv, flops, runs = [], [], [], [], {}, {}
            phases: dict[str, list[dict]] = {a: [] for a in arms}
            round8_refused = None  # a net too narrow for widths in multiples of 8 (--tiny): the core refuses
            for i in range(pairs):
                for method in arms[i % 3:] + arms[:i % 3]:  # the order rotates
                    if method == "NR_round8" and round8_refused:
                        continue
                    cfg = _run_cfg(sz, device, "BL" if method == "BL" else "NR")
                    if method == "NR_round8":
                        cfg["nr"]["round_to"] = 8
                    with instrument_tracker() as acc:
                        t0 = time.perf_counter()
                        try:
                            summary = train(cfg, tracking_uri=uri, progress=False)
                        except Exception as exc:
                            if method != "NR_round8":
                                raise
                            round8_refused = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
                            continue
                        wall = time.perf_counter() - t0
                    walls[method].append(wall)
                    phases[method].append(dict(summary["phase_s"], rest=wall - sum(summary["phase_s"].values())))
                    shares.append(acc["total"] / wall)
                    ep = cfg["train"]["epochs"]
                    per_epoch.append(acc["by"].get("log_epoch", 0.0) / ep)
                    fixed.append(acc["total"] - acc["by"].get("log_epoch", 0.0))
                    flops[method] = summary.get("final_flops")
                    runs[method] = summary["run_id"]
                    if method == "NR":
                        rejuv.append(int(summary.get("rejuvenations", 0)))
            grown = "NR_round8" if "NR_round8" in runs else "NR"  # round8: the allocation alone, not odd widths
            arch_row = _grown_step_row(sz, device, uri, runs[grown], runs["BL"], grown)
        width, hw, n_train, batch, ep, _ = sz.run
        what = (f"vgg_small w{width}, synthetic 3x{hw}x{hw}, {n_train} train images, batch {batch}, {ep} epochs, "
                f"{device.type}")
        med, lo, hi, kind = spread(shares)
        share_row = row("mlflow_share", med, GOALS["mlflow"], "ratio",
                        f"{kind} {lo:.3f}–{hi:.3f}, n={len(shares)} runs (BL and NR); per epoch "
                        f"{_fmt_s(statistics.median(per_epoch))} (one log_batch), per run fixed "
                        f"{_fmt_s(statistics.median(fixed))} (client, run, params, config, final artifacts, "
                        f"model.pt); sqlite store in a temp dir; {what}")
        r, d = ratio_stats(walls["NR"], walls["BL"])
        run_row = row("run_nr/bl", r, GOALS["run"], "ratio",
                      f"{d}; NR rejuvenations per run {rejuv}, constraint flops (final FLOPs NR/BL "
                      f"{_safe_ratio(flops.get('NR'), flops.get('BL'))}); monitor every "
                      f"{_run_cfg(sz, device, 'NR')['nr']['delta_t']} steps; {what}; tracking included in both")
        if round8_refused:
            round8_row = row("run_nr_round8/bl", None, None, "ratio", f"not measured: NR with nr.round_to 8 does not "
                             f"run on this net ({round8_refused}); {what}")
        else:
            r8, d8 = ratio_stats(walls["NR_round8"], walls["BL"])
            round8_row = row("run_nr_round8/bl", r8, None, "ratio",
                             f"{d8}; the same NR run with nr.round_to 8: final FLOPs NR_round8/BL "
                             f"{_safe_ratio(flops.get('NR_round8'), flops.get('BL'))}; {what}")
        return [share_row, run_row, round8_row, arch_row, breakdown_row(walls, phases)]
    except Exception as exc:
        return [_error_row("mlflow_share", GOALS["mlflow"], "ratio", exc),
                _error_row("run_nr/bl", GOALS["run"], "ratio", exc),
                _error_row("run_nr_round8/bl", None, "ratio", exc),
                _error_row("step_rejuvenated/bl", None, "ratio", exc),
                _error_row("run_gap_by_part", None, "s", exc)]


def _grown_step_row(sz: Sizes, device: torch.device, uri: str, nr_run: str, bl_run: str, arm: str) -> dict:
    """Is the gap NR's own work or the network it grew? The trainer's step on an NR run's final network (its
    logged model) against BL's, on the run's batch, alternated; also per forward FLOP. NR moves width where
    the budget is cheapest, which at equal FLOPs need not be equally fast."""
    from nr_study.tracking import load_model

    _, hw, _, batch, _, _ = sz.run
    _, _, _, _, warmup, reps = sz.step_models[0]
    models = {name: load_model(run_id, uri) for name, run_id in ((arm, nr_run), ("BL", bl_run))}
    widths = {name: [m.out_channels for m in model.modules() if isinstance(m, nn.Conv2d)]
              for name, model in models.items()}
    t, flops = time_steps(models, batch, hw, warmup, reps, device)
    r, d = ratio_stats(t[arm], t["BL"])
    fr = flops[arm] / flops["BL"]
    return row("step_rejuvenated/bl", r, None, "ratio", f"{d}; the final network of the {arm} run; FLOPs {fr:.3f}, "
               f"per FLOP {r / fr:.3f}; conv widths {widths[arm]} vs BL {widths['BL']}; batch {batch}, {hw}x{hw}, "
               f"{device.type}")


def breakdown_row(walls: dict[str, list[float]], phases: dict[str, list[dict]]) -> dict:
    """Where NR's whole run costs more than BL's: per part of the loop, the median over the alternated pairs of
    (NR − BL) seconds, largest first, beside the median gap itself (train()'s phase_s; 'rest' = the wall time
    outside every timed part)."""
    gap = statistics.median(n - b for n, b in zip(walls["NR"], walls["BL"]))
    parts = sorted({k for p in phases["NR"] + phases["BL"] for k in p})
    diffs = {k: statistics.median(n.get(k, 0.0) - b.get(k, 0.0) for n, b in zip(phases["NR"], phases["BL"]))
             for k in parts}
    shown = ", ".join(f"{k} {v:+.2f}s" for k, v in sorted(diffs.items(), key=lambda kv: -abs(kv[1])))
    bl = statistics.median(walls["BL"])
    return row("run_gap_by_part", gap, None, "s", f"NR − BL wall per run, median of {len(walls['NR'])} pairs "
               f"({gap / bl:+.1%} of BL's {bl:.2f}s); by part (NR − BL, medians): {shown}")


# --------------------------------------------------------------------------------------------- report
SECTIONS = {"steps": bench_steps, "widths": bench_widths, "surgery": bench_surgery, "layer": bench_layer,
            "nesting": bench_nesting,
            "sweep": bench_sweep, "runs": bench_runs}


def status(r: dict) -> str:
    if r["goal"] is None:
        return "-"
    if r["value"] is None:
        return "n/a"
    return "met" if r["value"] <= r["goal"] else "MISSED"


def format_table(rows: list[dict]) -> str:
    def val(r):
        if r["value"] is None:
            return "null"
        v = r["value"]
        return f"{v:.0f}" if abs(v) >= 1000 else f"{v:.4f}" if abs(v) < 0.1 else f"{v:.3f}"

    w = max([len(r["name"]) for r in rows] + [4])
    lines = [f"{'name':<{w}}  {'value':>9}  {'goal':>6}  {'unit':<6} {'goal met':<8}  detail"]
    for r in rows:
        goal = "-" if r["goal"] is None else f"≤{r['goal']:g}"
        lines.append(f"{r['name']:<{w}}  {val(r):>9}  {goal:>6}  {r['unit']:<6} {status(r):<8}  {r['detail']}")
    return "\n".join(lines)


def pick_threads(device: torch.device) -> int:
    """All CPUs available, or 1 on a CPU run when the machine is already busy (load ≥ CPUs / 2): several
    OpenMP threads on oversubscribed cores wait on each other at every barrier, which swamps any ratio in noise
    (and the load of a shared machine changes during a run)."""
    from nr_study.train import available_cpus

    cpus = available_cpus()
    if device.type == "cpu" and cpus > 1 and os.getloadavg()[0] >= cpus / 2:
        return 1
    return cpus


def run_bench(mode: str = "full", device: str = "cpu", only: Optional[list[str]] = None,
              threads: Optional[int] = None, log=None) -> list[dict]:
    log = log or sys.stderr  # read at call time: a stream replaced after import must not stick
    dev = torch.device(device)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError("--device cuda: CUDA is not available on this machine; allowed: cpu")
        torch.backends.cudnn.benchmark = True
    threads = threads or pick_threads(dev)
    torch.set_num_threads(threads)
    sz = Sizes(mode, dev)
    rows: list[dict] = []
    for key, fn in SECTIONS.items():
        if only and key not in only:
            continue
        t0 = time.perf_counter()
        print(f"[bench] {key} ...", file=log, flush=True)
        new = fn(sz, dev)
        torch.set_num_threads(threads)  # train() / Ray may have changed it
        print(f"[bench] {key} done in {time.perf_counter() - t0:.1f}s", file=log, flush=True)
        rows.extend(new)
    return rows


def cli_main(argv) -> int:
    from nr_study.cli_parser import CommandParser

    ap = CommandParser(prog="nr-study bench", description="Measure NR's overheads against plain "
                                 "training, as ratios timed alternately in one process.")
    ap.add_argument("--quick", action="store_true", help="a ≤ 2-minute version of every row: fewer "
                    "repetitions, smaller shapes, a 4-trial sweep")
    ap.add_argument("--tiny", action="store_true", help=argparse.SUPPRESS)  # tests: smallest shapes, no sweep
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"),
                    help="cuda: the GPU variants (channels_last, bf16 autocast) + images/s rows")
    ap.add_argument("--json", dest="json_path", default=None, metavar="PATH", help="write the rows as JSON")
    ap.add_argument("--only", action="append", choices=list(SECTIONS), default=None,
                    help="run only these sections (repeatable)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: the CPUs available, or "
                    "1 on a CPU run when the load average already reaches half the CPU count)")
    args = ap.parse_args(list(argv))
    if args.threads is not None and not 1 <= args.threads <= MAX_THREADS:
        raise UserError(f"--threads {args.threads}: not allowed; allowed: an integer from 1 to {MAX_THREADS}")
    json_path = _json_target(args.json_path) if args.json_path else None  # refused now, not after the bench
    tiny = args.tiny or os.environ.get("NR_STUDY_BENCH_TINY") == "1"
    mode = "tiny" if tiny else "quick" if args.quick else "full"
    t0 = time.perf_counter()
    rows = run_bench(mode, args.device, args.only, args.threads)
    print(format_table(rows))
    met = sum(status(r) == "met" for r in rows)
    missed = [r["name"] for r in rows if status(r) == "MISSED"]
    print(f"\n{met} goal(s) met, {len(missed)} missed{': ' + ', '.join(missed) if missed else ''}; "
          f"mode {mode}, device {args.device}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{time.perf_counter() - t0:.0f}s")
    if json_path:
        write_json_atomic(json_path, rows, indent=1)
    return 0


def _json_target(path: str) -> Path:
    """The --json file, checked before a bench of several minutes: its folder made and writable, not a folder."""
    p = Path(path)
    if p.is_dir():
        raise UserError(f"--json {path}: is a folder; allowed: a file path (its folder is made if missing)")
    check_writable_dir(p.parent, f"--json {path}: its folder")
    p.parent.mkdir(parents=True, exist_ok=True)
    return p


__all__ = ["cli_main", "run_bench", "format_table", "alternate", "ratio_stats", "GOALS"]
