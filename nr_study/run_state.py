"""The mutable state of one training run — model, method, optimizer and lr schedule, counters, history, the
pending reports — and what it does to itself: build (or restore from a checkpoint), adopt a method's event,
evaluate, measure, checkpoint. The loop in nr_study.train drives it epoch by epoch."""
from __future__ import annotations

import contextlib
import json
import math
import sys
import time
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn as nn

from nr_study.checkpoint import (CKPT_FORMAT, CKPT_NAME, atomic_save, model_from_payload, model_payload, rng_state,
                                 set_rng_state)
from nr_study.config import Config, config_to_dict
from nr_study.errors import UnsupportedGraphError, one_line
from nr_study.methods import Event, make_method

def lr_at(ocfg, epochs: int, steps_per_epoch: int, step: int, offset: int = 0) -> float:
    """Learning rate before optimizer step `step` (0-based), the schedule having (re)started at step `offset`.
    step: ×gamma after each milestone epoch counted from the (re)start; cosine: over the remaining steps."""
    t = max(0, step - offset)
    if ocfg.schedule == "constant":
        return ocfg.lr
    if ocfg.schedule == "step":
        done = t // steps_per_epoch
        return ocfg.lr * ocfg.gamma ** sum(done >= m for m in ocfg.milestones)
    total = max(1, epochs * steps_per_epoch - offset)
    return ocfg.lr * 0.5 * (1.0 + math.cos(math.pi * min(1.0, t / total)))

@torch.no_grad()
def recalibrate_bn(model: nn.Module, batches) -> int:
    """Precise BN: reset every tracking BatchNorm and average its batch statistics over `batches` (train-mode
    forward, no gradient; momentum=None is PyTorch's cumulative average). Why: under a strong L1 on γ the weights
    move faster than the exponential running averages follow, the lag compounds layer by layer, and eval-mode
    error can sit near chance while the train-mode error is fine. The training RNG is left untouched, so a run
    trains the same with or without it. Returns the number of batches used."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    if not bns:
        return 0
    momenta = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None
    was_training, n = model.training, 0
    model.train()
    with torch.random.fork_rng(devices=[]):
        for x, _ in batches:
            model(x)
            n += 1
    for m, momentum in zip(bns, momenta):
        m.momentum = momentum
    model.train(was_training)
    return n

def epoch_bar(batches, *, steps: int, batch_size: int, desc: str, enabled: bool):
    """A tqdm bar around one epoch's batches (images/s; the loop adds the loss), on stderr, only when enabled
    and stderr is a terminal: a CPU epoch can take minutes, while logs, pipes and Ray trials stay clean."""
    from tqdm import tqdm

    return tqdm(batches, total=steps, desc=desc, unit="img", unit_scale=batch_size, leave=False, file=sys.stderr,
                dynamic_ncols=True, disable=not (enabled and sys.stderr.isatty()))

def shape_message(cfg: Config, data, exc: BaseException) -> str:
    shape = "x".join(str(int(s)) for s in data.input_shape)
    return (f"model.name {cfg.model.name!r} cannot take data.name {cfg.data.name!r} inputs of shape {shape} "
            f"(C x H x W): {one_line(exc, 240)}; use a larger input (data.synthetic.shape / another dataset) or "
            f"a model made for this size")


class Phases(dict):
    """Wall seconds by part of the loop: {"steps": 12.3, "eval": 1.1, ...} (on CUDA without syncs, kernels still
    running are counted where the host next waits for them)."""

    @contextlib.contextmanager
    def time_in(self, name: str):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self[name] = self.get(name, 0.0) + time.perf_counter() - t0

    def timed(self, name: str, fn: Callable) -> Callable:
        def inner(*a, **k):
            with self.time_in(name):
                return fn(*a, **k)
        return inner

class RunState:
    """The mutable state of one training run: model, method, optimizer, counters, history."""

    def __init__(self, cfg: Config, device: torch.device, data, ckpt_dir: Optional[Path], tracking_uri: str):
        self.cfg, self.device, self.data, self.ckpt_dir, self.tracking_uri = cfg, device, data, ckpt_dir, tracking_uri
        self.input_shape = (1, *data.input_shape)
        self.meta = dict(model_name=cfg.model.name, model_kwargs_json=json.dumps(cfg.model.kwargs, sort_keys=True),
                         num_classes=int(data.num_classes), in_channels=int(data.input_shape[0]),
                         input_shape=list(data.input_shape))
        self.amp = cfg.train.bf16
        self.channels_last = cfg.train.channels_last
        self.model: nn.Module = None
        self.method = None
        self.opt: torch.optim.Optimizer = None
        self._opt_params: list = []  # (name, tensor) of what self.opt trains
        self.tracker = None
        self.epoch, self.step, self.sched_offset = 0, 0, 0
        self.end_epoch = cfg.train.epochs  # the epoch this run ends after
        self.train_flops, self.image_flops = 0, 0  # multiply-adds trained so far; of one image's forward now
        self.history: list[dict] = []
        self.pending: list[tuple[str, dict]] = []  # artifacts to log after the next checkpoint
        self.row_extras: Optional[Callable[[dict], dict]] = None  # train(row_extras=...)
        self.phases = Phases()
        self._graph, self._graph_of = None, None
        self.spe = data.steps_per_epoch(cfg.train.batch_size)
        if cfg.train.max_steps_per_epoch:
            self.spe = min(self.spe, cfg.train.max_steps_per_epoch)

    # -- building -----------------------------------------------------------------------------------
    def build(self, ck: Optional[dict]) -> None:
        """Model and method, fresh (create_model; the method may transform it) or from a checkpoint."""
        from nr_study.models import create_model

        cfg = self.cfg
        self.method = make_method(cfg, self.input_shape, self.tracking_uri)
        if ck is None:
            model = create_model(cfg.model.name, num_classes=self.meta["num_classes"],
                                 in_channels=self.meta["in_channels"], **cfg.model.kwargs)
        else:
            model = model_from_payload(ck["model"])
            self.method.load_state_dict(ck["method_state"])
        self.check_input(model)
        self.model = self._placed(self.method.on_fit_start(self._placed(model)))
        self.rebuild_optimizer()
        self.image_flops = int(self.measure()["flops"])
        if ck is not None:
            self.opt.load_state_dict(ck["optimizer"])
            self.epoch, self.step, self.sched_offset = int(ck["epoch"]), int(ck["global_step"]), int(ck["sched_offset"])
            self.end_epoch, self.train_flops = int(ck["end_epoch"]), int(ck["train_flops"])
            self.history = [dict(r) for r in ck["history"]]
            self.pending = [(a, dict(r)) for a, r in json.loads(ck.get("pending_json", "[]"))]
            set_rng_state(ck["rng"])  # last: building consumed random numbers

    def _placed(self, model: nn.Module) -> nn.Module:
        model = model.to(self.device)
        return model.to(memory_format=torch.channels_last) if self.channels_last else model

    def rebuild_optimizer(self, sources=None) -> None:
        """A new SGD over the model's parameters; ``sources`` (an event's ParamSources): the old optimizer's
        momentum follows the surviving weights into it (nr.carry_momentum), else it starts empty."""
        o = self.cfg.optim
        old = {n: self.opt.state.get(p, {}).get("momentum_buffer") for n, p in self._opt_params} if sources else {}
        named = list(self.model.named_parameters())
        self.opt = torch.optim.SGD([p for _, p in named], lr=o.lr, momentum=o.momentum,
                                   weight_decay=o.weight_decay, nesterov=o.nesterov and o.momentum > 0)
        self._opt_params = named  # by name: a later surgery replaces the modules these tensors belong to
        if sources is not None and o.momentum > 0 and any(v is not None for v in old.values()):
            from nr_study.nr.optim_state import carry_state

            carried = carry_state(sources, old, dict(named))
            for n, p in named:
                self.opt.state[p]["momentum_buffer"] = carried[n]
        if self.method is not None:  # a method that edits weights in place zeroes their state in this optimizer
            self.method.on_optimizer(self.opt)

    def check_input(self, model: nn.Module) -> None:
        """One forward pass on a zero image of the dataset's shape: a model that cannot take it fails here,
        before any run or checkpoint exists (and before the NR core traces it), with the shape named."""
        was = model.training
        model.eval()
        try:
            p = next(model.parameters(), None)
            with torch.no_grad():
                model(torch.zeros(1, *self.data.input_shape, device=p.device if p is not None else "cpu"))
        except Exception as exc:
            raise UnsupportedGraphError(shape_message(self.cfg, self.data, exc)) from exc
        finally:
            model.train(was)

    # -- during an epoch ------------------------------------------------------------------------------
    def epoch_bar(self, progress: bool):
        batches = ((self._layout(x), y) for x, y in self.data.train_batches(self.epoch + 1, self.cfg.train.batch_size,
                                                                             self.spe))
        return epoch_bar(batches, steps=self.spe, batch_size=self.cfg.train.batch_size,
                         desc=f"epoch {self.epoch + 1}/{self.end_epoch}", enabled=progress)

    def lr(self, step: int) -> float:
        return lr_at(self.cfg.optim, self.end_epoch, self.spe, step, self.sched_offset)

    def set_lr(self) -> None:
        lr = self.lr(self.step)
        for g in self.opt.param_groups:
            g["lr"] = lr

    def adopt(self, event: Optional[Event], progress: bool) -> None:
        """A method's event: train its new model with a new optimizer (momentum dropped — the parameter tensors
        are new — unless the event says where they came from: nr.carry_momentum), log its report after the next checkpoint, and go on with the lr schedule as it says:
        continue; restart_schedule (from here over the epochs left); reset_epochs (the paper's protocol: the
        epoch counter restarts, train.epochs more epochs after this one's, on a fresh schedule)."""
        if event is None:
            return
        self.model = self._placed(event.model)
        self.model.train()
        self._graph_of = None
        self.rebuild_optimizer(event.sources)
        self.image_flops = int(self.measure()["flops"])
        if event.schedule in ("restart_schedule", "reset_epochs"):
            self.sched_offset = self.step
        if event.schedule == "reset_epochs":
            self.end_epoch = self.epoch + 1 + self.cfg.train.epochs
        self.pending.append((event.artifact, dict(event.report, epoch=self.epoch + 1, step=self.step)))
        if progress:
            from tqdm import tqdm

            tqdm.write(f"  {event.label or event.kind} at epoch {self.epoch + 1} step {self.step}", file=sys.stdout)
            sys.stdout.flush()  # tqdm.write: clears the epoch bar on the same terminal, prints, redraws it

    # -- after an epoch -------------------------------------------------------------------------------
    def _layout(self, x: torch.Tensor) -> torch.Tensor:
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    @torch.no_grad()
    def evaluate(self) -> dict:
        n_bn = self.cfg.train.precise_bn_batches
        if n_bn:
            batches = self.data.train_batches(self.epoch, self.cfg.train.batch_size, max_steps=n_bn)
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp):
                recalibrate_bn(self.model, ((self._layout(x), y) for x, y in batches))
        self.model.eval()
        n, wrong1, wrong5, wrong_heads = 0, 0, 0, {}
        for x, y in self.data.test_batches(self.cfg.train.eval_batch_size):
            x = self._layout(x)
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp):
                out = self.model(x).float()
            hit = out.topk(min(5, out.shape[1]), dim=1).indices == y[:, None]
            wrong1 += int((~hit[:, 0]).sum())
            wrong5 += int((~hit.any(1)).sum())
            for name, logits in self.method.head_outputs().items():  # two classifiers: each one's error too
                wrong_heads[name] = wrong_heads.get(name, 0) + int((logits.argmax(1) != y).sum())
            n += len(y)
        return {"test_err": 100.0 * wrong1 / max(1, n), "test_err5": 100.0 * wrong5 / max(1, n),
                **{f"test_err_{name}": 100.0 * w / max(1, n) for name, w in wrong_heads.items()}}

    def measure(self) -> dict:
        """util_params, util_flops, params, flops of the current model by the core's cost model (the channel
        graph traced once per architecture, not once per epoch)."""
        from nr_study.nr import build_graph, graph_utilization, live_masks

        if self._graph_of is not self.model:
            self._graph, self._graph_of = build_graph(self.model, self.input_shape), self.model
        masks = live_masks(self.model, self._graph, self.cfg.nr.dead_threshold)
        out = {}
        for c in ("params", "flops"):
            u = graph_utilization(self.model, self._graph, c, masks=masks)
            out[f"util_{c}"], out[c] = u.ratio, u.total
        return out

    def checkpoint_bytes(self) -> int:
        """About what one checkpoint takes: weights, momentum and the atomic write's temporary copy."""
        n = sum(p.numel() * p.element_size() for p in self.model.state_dict().values())
        return 3 * n + (1 << 20)

    def checkpoint(self) -> None:
        if self.ckpt_dir is None:
            return
        atomic_save({
            "format": CKPT_FORMAT, "config_json": json.dumps(config_to_dict(self.cfg)),
            "model": model_payload(self.model, self.meta), "optimizer": self.opt.state_dict(),
            "method_state": self.method.state_dict(), "rejuvenations": int(self.method.metrics()["rejuvenations"]),
            "epoch": self.epoch, "global_step": self.step, "sched_offset": self.sched_offset,
            "end_epoch": self.end_epoch, "train_flops": self.train_flops,
            "rng": rng_state(), "run_id": self.tracker.run_id, "history": self.history,
            "pending_json": json.dumps(self.pending),  # a kill before they are logged must not lose them
        }, self.ckpt_dir / CKPT_NAME)

    def log_pending(self) -> None:
        """The events' reports, once their epoch's checkpoint holds them (again after a resume: same files)."""
        for name, obj in self.pending:
            self.tracker.log_dict(obj, name)
        self.pending.clear()
