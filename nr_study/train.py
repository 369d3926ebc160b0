"""The training loop: `train(cfg, ...)` trains one configuration end to end (what a sweep trial calls).

Read top to bottom: build data and model (NR-FS: an earlier run's architecture, re-initialised; BL-CA: the CA
form on a half/half split), attach the NR hook (NR methods) or a fixed-λ L1 hook (SLIM), then per epoch:
steps (forward, backward, hook.after_backward, SGD step, hook.end_of_step) -> hook.end_of_epoch -> SLIM prune ->
evaluation -> checkpoint (atomic) -> MLflow (one log_batch) -> on_epoch_end -> fault injection.
With progress on and stderr a terminal, an epoch's steps show a tqdm bar (images/s, loss) on stderr; the
epoch's line follows on stdout. Sweep trials run with progress off.
A rejuvenation (a report from the hook) rebuilds the optimizer: momentum buffers are dropped, because the
parameter tensors are new (S weights move to new positions and R weights are fresh); optionally the lr
schedule restarts (optim.restart_after_rejuvenation).

Checkpoints (`<checkpoint_dir>/state.pt`, torch.load(weights_only=True)) hold the architecture (model name,
kwargs, core architecture spec as JSON), weights, optimizer, NR state, epoch, step, RNG states, run id and the
metric history, so a run resumed after a rejuvenation continues bit-for-bit on CPU.

Bad input fails before anything is written (docs/reliability.md): `train()` first checks that the checkpoint and
tracking folders can be written, reads and matches the checkpoint (resume), builds the data and the model and
runs one forward pass on the dataset's input shape — only then is the MLflow run created. Faults during training
(divergence, tracking server lost, disk full) end the run FAILED with one line and the last checkpoint intact;
Ctrl-C / SIGTERM end it KILLED.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import random
import shutil
import signal
import sys
import threading
import tempfile
import time
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import yaml

from nr_study.config import Config, config_from_dict, config_to_dict, flatten, load_config, resolved_nr
from nr_study.errors import (CheckpointError, CheckpointWriteError, ConfigError, UnsupportedGraphError,
                             one_line)
from nr_study.files import check_sqlite_store, read_json, read_torch

CKPT_NAME = "state.pt"
CKPT_FORMAT = 1
NAN_CHECK_EVERY = 20  # CUDA: look at the loss flag every N steps (a host sync), and at the end of each epoch


class TrainingDivergedError(RuntimeError):
    """The loss became NaN or infinite."""


# ------------------------------------------------------------------------------------------- helpers
def _core():
    """The NR core (nr_study.nr) when it is importable with the documented API, else None."""
    try:
        from nr_study import nr
    except ImportError:
        return None
    return nr if hasattr(nr, "NeuralRejuvenation") else None


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device: 'cuda' is not available on this machine; allowed: auto, cpu")
    return torch.device(name)


def available_cpus() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - non-Linux
        return max(1, os.cpu_count() or 1)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def rng_state() -> dict:
    st = np.random.get_state()
    py = random.getstate()
    out = {
        "torch": torch.get_rng_state(),
        "numpy_keys": torch.from_numpy(st[1].astype(np.int64)),
        "numpy_pos": int(st[2]), "numpy_has_gauss": int(st[3]), "numpy_gauss": float(st[4]),
        "python_version": int(py[0]), "python_state": list(py[1]), "python_gauss": py[2],
    }
    if torch.cuda.is_available():
        out["cuda"] = torch.cuda.get_rng_state_all()
    return out


def set_rng_state(s: dict) -> None:
    torch.set_rng_state(s["torch"])
    np.random.set_state(("MT19937", s["numpy_keys"].numpy().astype(np.uint32), s["numpy_pos"],
                         s["numpy_has_gauss"], s["numpy_gauss"]))
    random.setstate((s["python_version"], tuple(s["python_state"]), s["python_gauss"]))
    if "cuda" in s and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])


def atomic_save(obj, path: Path) -> None:
    """Write `obj` next to `path` and rename it over `path`: a crash or a full disk leaves the old file intact."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(obj, tmp)
        os.replace(tmp, path)
    except (OSError, RuntimeError) as exc:  # ENOSPC surfaces as RuntimeError from torch's zip writer
        try:
            tmp.unlink()
        except OSError:
            pass
        what = getattr(exc, "strerror", None) or one_line(exc, 200)
        kept = "the previous checkpoint is intact" if path.is_file() else "no earlier checkpoint"
        raise CheckpointWriteError(f"cannot write checkpoint {path} ({what}); {kept}") from exc


CKPT_KEYS = ("format", "model", "optimizer", "epoch", "global_step", "history", "rng")


def load_checkpoint(checkpoint_dir) -> Optional[dict]:
    """The checkpoint in `checkpoint_dir` (None when there is none). A file that is not a readable nr_study
    training checkpoint raises CheckpointError (one line), never an unpickling traceback."""
    p = Path(checkpoint_dir) / CKPT_NAME
    if not p.is_file():
        return None
    ck = read_torch(p, "nr_study checkpoint", hint="delete it or use another --checkpoint-dir")
    if not isinstance(ck, dict) or not all(k in ck for k in CKPT_KEYS):
        what = (f"a {type(ck).__name__}" if not isinstance(ck, dict)
                else "a dict with keys " + ", ".join(sorted(map(str, ck))[:8]))
        raise CheckpointError(f"checkpoint {p}: a torch file but not an nr_study training checkpoint (it holds "
                              f"{what}); delete it or use another --checkpoint-dir")
    if ck.get("format") != CKPT_FORMAT:
        raise CheckpointError(f"checkpoint {p}: unknown checkpoint format {ck.get('format')!r}; allowed: "
                              f"{CKPT_FORMAT}")
    return ck


def check_checkpoint_fits(ck: dict, cfg: Config, data, path) -> None:
    """Refuse to resume a checkpoint written for another method/architecture/dataset (one line)."""
    try:
        old = json.loads(ck.get("config_json") or "{}")
    except json.JSONDecodeError:
        old = {}
    meta = ck["model"] if isinstance(ck.get("model"), dict) else {}
    have = {
        "method": old.get("method"),
        "model.name": meta.get("model_name", (old.get("model") or {}).get("name")),
        "model.kwargs": json.loads(meta["model_kwargs_json"]) if meta.get("model_kwargs_json") else None,
        "data.name": (old.get("data") or {}).get("name"),
        "input shape": list(meta["input_shape"]) if meta.get("input_shape") is not None else None,
        "num_classes": meta.get("num_classes"),
    }
    want = {"method": cfg.method, "model.name": cfg.model.name, "model.kwargs": dict(cfg.model.kwargs),
            "data.name": cfg.data.name, "input shape": list(data.input_shape), "num_classes": int(data.num_classes)}
    for k, v in want.items():
        if have[k] is not None and have[k] != v:
            raise CheckpointError(f"checkpoint {path}: written for {k} {have[k]!r}, but this config has {v!r}; "
                                  f"resume with the config that wrote it or use another --checkpoint-dir")


def check_writable_dir(path, what: str) -> Path:
    """Raise ConfigError unless `path` is a writable folder or can be created as one. Creates nothing;
    returns the nearest existing folder (for the free-space check)."""
    p = Path(path).absolute()
    probe = p
    while not probe.exists() and probe.parent != probe:
        probe = probe.parent
    if p.exists() and not p.is_dir():
        raise ConfigError(f"{what} {p}: exists but is not a folder")
    if not probe.is_dir():
        raise ConfigError(f"{what} {p}: cannot be created, {probe} is a file, not a folder")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise ConfigError(f"{what} {p}: {probe} is not writable (read-only file system or permissions)")
    return probe


def check_free_space(folder: Path, need_bytes: int, what: str) -> None:
    try:
        free = shutil.disk_usage(folder).free
    except OSError:
        return
    if free < need_bytes:
        raise ConfigError(f"{what} {folder}: only {free / 2**20:.1f} MiB free, a checkpoint needs about "
                          f"{need_bytes / 2**20:.1f} MiB; free some space or use another folder")


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


# ---------------------------------------------------------------------------------------- the model
def model_payload(model: nn.Module, meta: dict) -> dict:
    """Weights + everything create_model/apply_architecture need to rebuild them (weights_only-safe)."""
    core = _core()
    spec = core.architecture_spec(model) if core is not None else None
    return dict(meta, arch_spec_json=json.dumps(spec) if spec is not None else "",
                state_dict={k: v.detach().cpu() for k, v in model.state_dict().items()})


def model_from_payload(payload: dict, load_weights: bool = True) -> nn.Module:
    from nr_study.models import create_model

    model = create_model(payload["model_name"], num_classes=int(payload["num_classes"]),
                         in_channels=int(payload["in_channels"]), **json.loads(payload.get("model_kwargs_json") or "{}"))
    spec = payload.get("arch_spec_json") or ""
    if spec:
        core = _core()
        if core is None:
            raise ConfigError("this checkpoint/model holds a rejuvenated architecture; it needs nr_study.nr")
        model = core.apply_architecture(model, json.loads(spec)) or model
    if load_weights:
        model.load_state_dict(payload["state_dict"])
    return model


def _reinit(model: nn.Module) -> None:
    try:
        from nr_study.models.layers import init_weights
    except ImportError:  # pragma: no cover
        for m in model.modules():
            if hasattr(m, "reset_parameters") and m is not model:
                m.reset_parameters()
        return
    init_weights(model)


def _fs_spec(cfg: Config, tracking_uri: str) -> tuple[dict, Optional[str]]:
    """NR-FS: the architecture spec found by an earlier run (MLflow run id or exported file)."""
    if cfg.fs.run_id:
        from nr_study.tracking import download_artifact

        path = download_artifact(cfg.fs.run_id, "model/model.pt", cfg.fs.tracking_uri or tracking_uri)
        payload = read_torch(path, "nr_study model file")
        spec = payload.get("arch_spec_json") if isinstance(payload, dict) else None
        if not spec:
            raise ConfigError(f"fs.run_id: run {cfg.fs.run_id!r} has no architecture spec (was it a BL run?)")
        return json.loads(spec), payload.get("model_name")
    path = Path(cfg.fs.architecture_file)
    if not path.is_file():
        raise ConfigError(f"fs.architecture_file: {str(path)!r} not found; expected final_widths.json or model.pt")
    if path.suffix in (".pt", ".pth"):
        payload = read_torch(path, "nr_study model file")
        if not (isinstance(payload, dict) and payload.get("arch_spec_json")):
            raise ConfigError(f"fs.architecture_file: {str(path)!r} holds no architecture spec; allowed: the "
                              f"model.pt of an NR run (or its final_widths.json)")
        return json.loads(payload["arch_spec_json"]), payload.get("model_name")
    obj = read_json(path, "final_widths.json architecture file")
    if isinstance(obj, dict) and "architecture" in obj:  # final_widths.json
        return obj["architecture"], obj.get("model")
    return obj, None


def _nr_config(cfg: Config, **override):
    core = _core()
    names = {f.name for f in dataclasses.fields(core.NRConfig)}
    vals = dataclasses.asdict(cfg.nr)
    res = resolved_nr(cfg)
    vals.update(scheme=res["scheme"], rescale=res["rescale"], realloc=res["realloc"])
    vals.update(override)
    return core.NRConfig(**{k: v for k, v in vals.items() if k in names and v is not None})


def measure(model: nn.Module, input_shape: tuple) -> dict:
    """util_params, util_flops, params, flops of a model (core's cost model; a plain count without it)."""
    core = _core()
    if core is not None:
        up = core.utilization(model, input_shape, constraint="params")
        uf = core.utilization(model, input_shape, constraint="flops")
        return {"util_params": up.ratio, "util_flops": uf.ratio, "params": up.total, "flops": uf.total}
    n = sum(m.weight.numel() for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear)))
    return {"params": n}


def _widths(model: nn.Module, input_shape: tuple) -> dict:
    core = _core()
    if core is None:
        return {n: m.out_channels for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}
    u = core.utilization(model, input_shape, constraint="params")
    return {lu.name: int(lu.width) for lu in u.layers}


def slim_prune(model: nn.Module, input_shape: tuple, ratio: float) -> tuple[nn.Module, dict]:
    """Network Slimming: physically prune the `ratio` fraction of channels with the smallest |γ| among the
    non-fixed BNs (one global percentile; a layer keeps at least its largest channel). Returns (model, report)."""
    core = _core()
    if core is None:
        raise ConfigError("method SLIM needs the NR core (nr_study.nr), which is not available")
    graph = core.build_graph(model, input_shape)
    mods = dict(model.named_modules())
    bns = [g.bn for g in graph.free_groups()]
    if not bns:
        raise ConfigError("method SLIM: model has no prunable BatchNorm channels")
    gam = [mods[b].weight.detach().abs().float().cpu().flatten() for b in bns]
    allg = torch.cat(gam)
    k = int(math.floor(ratio * allg.numel()))
    pruned = torch.zeros(allg.numel(), dtype=torch.bool)
    pruned[torch.argsort(allg, stable=True)[:k]] = True
    keep, off = {}, 0
    for b, g in zip(bns, gam):
        keep[b] = ~pruned[off : off + g.numel()]
        off += g.numel()
    before = core.utilization(model, input_shape, "params").total
    widths_before = {b: int(g.numel()) for b, g in zip(bns, gam)}
    model = core.prune(model, input_shape, keep, inplace=False)
    mods = dict(model.named_modules())
    widths_after = {b: int(mods[b].weight.numel()) for b in bns}
    report = {"prune_ratio": ratio, "threshold": float(allg[torch.argsort(allg, stable=True)[k - 1]]) if k else 0.0,
              "channels_before": int(allg.numel()), "channels_after": int(sum(widths_after.values())),
              "params_before": int(before), "params_after": int(core.utilization(model, input_shape, "params").total),
              "widths_before": widths_before, "widths_after": widths_after}
    return model, report


class SlimL1:
    """Network Slimming's sparsity term (Liu et al. 2017): λ·Σ|γ| over every prunable BN (the channel graph's
    free groups), a fixed λ (`slim.l1`) from the first step until the prune. Not NR's hook: no monitor, no λ
    rule, no rejuvenation."""

    def __init__(self, model: nn.Module, graph, lam: float):
        mods = dict(model.named_modules())
        self.gammas = [mods[g.bn].weight for g in graph.free_groups()]
        self.lam = float(lam)

    def after_backward(self) -> None:
        from nr_study.nr import l1_subgradient_

        l1_subgradient_(self.gammas, self.lam)

    def end_of_step(self):
        return None

    def end_of_epoch(self):
        return None

    def metrics(self) -> dict:
        return {"lambda": self.lam, "rejuvenations": 0}

    def state_dict(self) -> dict:
        return {}


def _no_free_groups_error(method: str, name: str, graph) -> ConfigError:
    reasons = sorted({g.fixed_reason.split("'")[0].strip() for g in graph.groups.values()
                      if g.producer is not None and g.fixed_reason})
    return ConfigError(f"method {method}: model {name!r} has no prunable channels (every channel group is fixed: "
                       f"{'; '.join(reasons[:3]) or 'none found'}); NR/SLIM/BL-CA need convolutions followed by a "
                       f"BatchNorm outside residual additions; allowed here: method BL")


def to_ca_half_split(model: nn.Module, input_shape: tuple, impl: str = "two", name: str = "") -> nn.Module:
    core = _core()
    if core is None:
        raise ConfigError("method BL-CA needs the NR core (nr_study.nr), which is not available")
    graph = core.build_graph(model, input_shape)
    if not graph.free_groups():
        raise _no_free_groups_error("BL-CA", name or type(model).__name__, graph)
    return core.split_to_ca(model, input_shape, impl=impl, graph=graph)


# ------------------------------------------------------------------------------------------ the loop
class _Run:
    """Mutable state of one training run (kept out of train() so the loop reads in one screen)."""

    def __init__(self, cfg: Config, device: torch.device, data, tracker, ckpt_dir: Optional[Path]):
        self.cfg, self.device, self.data, self.tracker, self.ckpt_dir = cfg, device, data, tracker, ckpt_dir
        self.input_shape = (1, *data.input_shape)
        self.meta = dict(model_name=cfg.model.name, model_kwargs_json=json.dumps(cfg.model.kwargs, sort_keys=True),
                         num_classes=int(data.num_classes), in_channels=int(data.input_shape[0]),
                         input_shape=list(data.input_shape))
        self.model: nn.Module = None
        self.hook = None
        self.hook_kind = ""  # "nr" | "slim" | ""
        self.opt: torch.optim.Optimizer = None
        self.epoch = 0
        self.step = 0
        self.sched_offset = 0
        self.n_events = 0
        self.slim_pruned = False
        self.history: list[dict] = []
        self.pending: list[tuple[str, dict]] = []  # artifacts to log after the next checkpoint
        self._graph, self._graph_of = None, None
        self.spe = data.steps_per_epoch(cfg.train.batch_size)
        if cfg.train.max_steps_per_epoch:
            self.spe = min(self.spe, cfg.train.max_steps_per_epoch)

    # -- building -----------------------------------------------------------------------------------
    def build_fresh(self, tracking_uri: str) -> None:
        from nr_study.models import create_model

        cfg = self.cfg
        model = create_model(cfg.model.name, num_classes=self.meta["num_classes"],
                             in_channels=self.meta["in_channels"], **cfg.model.kwargs)
        self.check_input(model)
        if cfg.method == "NR-FS":
            spec, src = _fs_spec(cfg, tracking_uri)
            if src and src != cfg.model.name:
                raise ConfigError(f"model.name: {cfg.model.name!r} differs from the NR-FS source model {src!r}")
            core = _core()
            if core is None:
                raise ConfigError("method NR-FS needs nr_study.nr.apply_architecture (the NR core)")
            model = core.apply_architecture(model, spec) or model
            _reinit(model)
        elif cfg.method == "BL-CA":
            model = to_ca_half_split(model, self.input_shape, cfg.nr.impl, cfg.model.name)
        self.model = model.to(self.device)
        self._attach_hook(state=None)
        self.rebuild_optimizer()

    def build_from_checkpoint(self, ck: dict) -> None:
        self.model = model_from_payload(ck["model"]).to(self.device)
        self.check_input(self.model)
        self.slim_pruned = bool(ck.get("slim_pruned", False))
        self._attach_hook(state=ck.get("nr_state") or None)
        self.rebuild_optimizer()
        self.opt.load_state_dict(ck["optimizer"])
        self.epoch, self.step = int(ck["epoch"]), int(ck["global_step"])
        self.sched_offset, self.n_events = int(ck["sched_offset"]), int(ck["rejuvenations"])
        self.history = [dict(r) for r in ck["history"]]
        set_rng_state(ck["rng"])  # last: building consumed random numbers

    def _attach_hook(self, state) -> None:
        cfg = self.cfg
        if self.device.type == "cuda" and cfg.train.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.hook, self.hook_kind = None, ""
        if resolved_nr(cfg)["nr"]:
            kind = "nr"
        elif cfg.method == "SLIM" and not self.slim_pruned:
            kind = "slim"
        else:
            return
        core = _core()
        if core is None:
            raise ConfigError(f"method {cfg.method} needs the NR core (nr_study.nr), which is not available yet")
        graph = core.build_graph(self.model, self.input_shape)
        if not graph.free_groups():
            raise _no_free_groups_error(cfg.method, cfg.model.name, graph)
        if kind == "slim":  # Network Slimming's own L1 on every prunable γ, fixed λ from the first step
            self.hook, self.hook_kind = SlimL1(self.model, graph, cfg.slim.l1), kind
            return
        try:
            nrc = _nr_config(cfg)
            self.hook, self.hook_kind = core.NeuralRejuvenation(self.model, self.input_shape, nrc), kind
        except ValueError as exc:  # the core refuses settings it cannot honour on this model (e.g. Tr out of reach)
            raise ConfigError(f"method {cfg.method} on model {cfg.model.name!r}: {one_line(exc)}") from None
        if state:
            self.hook.load_state_dict(state)

    def rebuild_optimizer(self) -> None:
        o = self.cfg.optim
        self.opt = torch.optim.SGD(self.model.parameters(), lr=o.lr, momentum=o.momentum,
                                   weight_decay=o.weight_decay, nesterov=o.nesterov and o.momentum > 0)

    # -- events -------------------------------------------------------------------------------------
    def on_rejuvenation(self, report: dict) -> None:
        self.model = getattr(self.hook, "model", self.model)
        self.model.train()
        if self.device.type == "cuda" and self.cfg.train.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.n_events += 1
        self._graph_of = None
        report = dict(report, epoch=self.epoch + 1, step=self.step)
        self.pending.append((f"rejuvenations/{self.n_events:03d}.json", report))
        self.rebuild_optimizer()
        if self.cfg.optim.restart_after_rejuvenation:
            self.sched_offset = self.step
        if self._progress:
            from tqdm import tqdm

            tqdm.write(f"  rejuvenation {self.n_events} at epoch {self.epoch + 1} step {self.step}", file=sys.stdout)
            sys.stdout.flush()  # tqdm.write: clears the epoch bar on the same terminal, prints, redraws it

    def maybe_slim_prune(self) -> None:
        cfg = self.cfg
        if cfg.method != "SLIM" or self.slim_pruned:
            return
        at = cfg.slim.prune_epoch or max(1, cfg.train.epochs // 2)
        if self.epoch != at:
            return
        self.model, report = slim_prune(self.model, self.input_shape, cfg.slim.prune_ratio)
        self.model = self.model.to(self.device)
        self.slim_pruned = True
        self.hook, self.hook_kind = None, ""  # fine-tuning: no more L1
        self.rebuild_optimizer()
        if cfg.slim.restart_schedule:
            self.sched_offset = self.step
        self.pending.append(("slim_prune.json", dict(report, epoch=self.epoch)))

    # -- one epoch ----------------------------------------------------------------------------------
    def train_epoch(self) -> dict:
        cfg, model = self.cfg, self.model
        model.train()
        amp = self.device.type == "cuda" and cfg.train.bf16
        loss_sum = torch.zeros((), device=self.device, dtype=torch.float64)
        wrong = torch.zeros((), device=self.device, dtype=torch.long)
        seen = 0
        bad = torch.zeros((), device=self.device, dtype=torch.bool)
        check_every = 1 if self.device.type == "cpu" else NAN_CHECK_EVERY
        t0 = time.perf_counter()
        batches = self.data.train_batches(self.epoch + 1, cfg.train.batch_size, self.spe)
        with epoch_bar(batches, steps=self.spe, batch_size=cfg.train.batch_size,
                       desc=f"epoch {self.epoch + 1}/{cfg.train.epochs}", enabled=self._progress) as bar:
            for x, y in bar:
                if self.device.type == "cuda" and cfg.train.channels_last:
                    x = x.contiguous(memory_format=torch.channels_last)
                lr = lr_at(cfg.optim, cfg.train.epochs, self.spe, self.step, self.sched_offset)
                for g in self.opt.param_groups:
                    g["lr"] = lr
                with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=amp):
                    out = self.model(x)
                    loss = F.cross_entropy(out.float(), y)
                bad = bad | ~torch.isfinite(loss.detach())
                sync = (self.step + 1) % check_every == 0  # CPU: every step; CUDA: without a sync per step
                if sync and bool(bad):
                    raise TrainingDivergedError(
                        f"epoch {self.epoch + 1} step {self.step + 1}: loss is {loss.item()}; training diverged "
                        f"(lower optim.lr, nr.delta_lambda or nr.lambda_max)")
                if sync and not bar.disable:
                    bar.set_postfix(loss=f"{loss.item():.4f}", refresh=False)
                self.opt.zero_grad(set_to_none=True)
                loss.backward()
                if self.hook is not None:
                    self.hook.after_backward()
                self.opt.step()
                self.step += 1
                loss_sum += loss.detach().double() * len(y)
                wrong += (out.detach().argmax(1) != y).sum()
                seen += len(y)
                if self.hook is not None:
                    rep = self.hook.end_of_step()
                    if rep:
                        self.on_rejuvenation(rep)
        if bool(bad):
            raise TrainingDivergedError(f"epoch {self.epoch + 1}: loss became NaN/inf by step {self.step}; training "
                                        f"diverged (lower optim.lr, nr.delta_lambda or nr.lambda_max)")
        if self.hook is not None:
            rep = self.hook.end_of_epoch()
            if rep:
                self.on_rejuvenation(rep)
        self.epoch += 1
        dt = time.perf_counter() - t0
        return {"train_loss": loss_sum.item() / max(1, seen), "train_err": 100.0 * wrong.item() / max(1, seen),
                "lr": lr_at(cfg.optim, cfg.train.epochs, self.spe, max(0, self.step - 1), self.sched_offset),
                "epoch_time": dt, "images_per_s": seen / max(dt, 1e-9)}

    @torch.no_grad()
    def evaluate(self) -> dict:
        model = self.model
        model.eval()
        amp = self.device.type == "cuda" and self.cfg.train.bf16
        n, wrong1, wrong5 = 0, 0, 0
        for x, y in self.data.test_batches(self.cfg.train.eval_batch_size):
            if self.device.type == "cuda" and self.cfg.train.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=amp):
                out = model(x).float()
            k = min(5, out.shape[1])
            top = out.topk(k, dim=1).indices
            hit = top == y[:, None]
            wrong1 += int((~hit[:, 0]).sum())
            wrong5 += int((~hit.any(1)).sum())
            n += len(y)
        return {"test_err": 100.0 * wrong1 / max(1, n), "test_err5": 100.0 * wrong5 / max(1, n)}

    def nr_metrics(self) -> dict:
        if self.hook_kind == "nr":
            return dict(self.hook.metrics())
        if self.hook is not None:  # SLIM before its prune
            return dict(self.measure(), **self.hook.metrics())
        m = self.measure()
        m.update({"lambda": 0.0, "rejuvenations": self.n_events})
        return m

    def measure(self) -> dict:
        """Like measure(), with the channel graph traced once per architecture (not once per epoch)."""
        core = _core()
        if core is None:
            return measure(self.model, self.input_shape)
        if self._graph_of is not self.model:
            self._graph, self._graph_of = core.build_graph(self.model, self.input_shape), self.model
        masks = core.live_masks(self.model, self._graph, self.cfg.nr.dead_threshold)
        out = {}
        for c in ("params", "flops"):
            u = core.graph_utilization(self.model, self._graph, c, masks=masks)
            out[f"util_{c}"], out[c] = u.ratio, u.total
        return out

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

    def checkpoint_bytes(self) -> int:
        """About what one checkpoint takes: weights, momentum and the atomic write's temporary copy."""
        n = sum(p.numel() * p.element_size() for p in self.model.state_dict().values())
        return 3 * n + (1 << 20)

    # -- persistence --------------------------------------------------------------------------------
    def checkpoint(self) -> None:
        if self.ckpt_dir is None:
            return
        atomic_save({
            "format": CKPT_FORMAT,
            "config_json": json.dumps(config_to_dict(self.cfg)),
            "model": model_payload(self.model, self.meta),
            "optimizer": self.opt.state_dict(),
            "nr_state": self.hook.state_dict() if self.hook is not None else {},
            "hook_kind": self.hook_kind,
            "slim_pruned": self.slim_pruned,
            "epoch": self.epoch, "global_step": self.step, "sched_offset": self.sched_offset,
            "rejuvenations": self.n_events,
            "rng": rng_state(),
            "run_id": self.tracker.run_id,
            "history": self.history,
        }, self.ckpt_dir / CKPT_NAME)

    def log_pending(self) -> None:
        for name, obj in self.pending:
            self.tracker.log_dict(obj, name)
        self.pending.clear()

    _progress = True


def epoch_bar(batches, *, steps: int, batch_size: int, desc: str, enabled: bool):
    """A tqdm bar around one epoch's batches (images/s; the loop adds the loss), on stderr, only when enabled
    and stderr is a terminal: a CPU epoch can take minutes, while logs, pipes and Ray trials stay clean."""
    from tqdm import tqdm

    return tqdm(batches, total=steps, desc=desc, unit="img", unit_scale=batch_size, leave=False, file=sys.stderr,
                dynamic_ncols=True, disable=not (enabled and sys.stderr.isatty()))


def _fault_kill(tcfg, epoch: int, point: str) -> None:
    if tcfg.fault_kill_at_epoch != epoch or tcfg.fault_kill_point != point:
        return
    marker = tcfg.fault_kill_once_marker
    if marker:
        m = Path(marker)
        if m.exists():
            return
        m.parent.mkdir(parents=True, exist_ok=True)
        m.write_text(f"killed at epoch {epoch}, pid {os.getpid()}\n")
    sys.stdout.flush()
    sys.stderr.flush()
    os.kill(os.getpid(), signal.SIGKILL)
    os._exit(137)  # pragma: no cover - SIGKILL does not return


def shape_message(cfg: Config, data, exc: BaseException) -> str:
    shape = "x".join(str(int(s)) for s in data.input_shape)
    return (f"model.name {cfg.model.name!r} cannot take data.name {cfg.data.name!r} inputs of shape {shape} "
            f"(C x H x W): {one_line(exc, 240)}; use a larger input (data.synthetic.shape / another dataset) or "
            f"a model made for this size")


def _interruptions_deferred():
    """Context: SIGINT/SIGTERM are ignored while a run's final status is written (main thread only), so a
    second Ctrl-C cannot leave the run RUNNING."""
    import contextlib

    @contextlib.contextmanager
    def cm():
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        got: list = []
        old = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            for s in old:
                signal.signal(s, lambda signum, frame: got.append(signum))
        except (ValueError, OSError):  # pragma: no cover - not allowed here
            yield
            return
        try:
            yield
        finally:
            for s, h in old.items():
                signal.signal(s, h)
    return cm()


def _tags(cfg: Config, extra: Optional[dict]) -> dict:
    res = resolved_nr(cfg)
    t = {"nr.method": cfg.method, "nr.arch": cfg.model.name, "nr.dataset": cfg.data.name, "nr.seed": cfg.seed,
         "nr.scheme": res["scheme"] or "-", "nr.constraint": cfg.nr.constraint if res["nr"] else "-"}
    t.update(cfg.tracking.tags or {})
    t.update(extra or {})
    return t


def _fmt(row: dict, epochs: int) -> str:
    s = (f"epoch {row['epoch']:>3}/{epochs} loss {row['train_loss']:.4f} train_err {row['train_err']:5.2f}% "
         f"test_err {row['test_err']:5.2f}%")
    if "util_params" in row:
        s += f" util {row['util_params']:.3f}"
    s += f" λ {row.get('lambda', 0.0):.2e} lr {row['lr']:.4g}"
    if row.get("rejuvenations"):
        s += f" rejuv {int(row['rejuvenations'])}"
    return s + f" ({row['epoch_time']:.1f}s)"


def train(cfg, *, tracking_uri: Optional[str] = None, run_id: Optional[str] = None, checkpoint_dir=None,
          resume: bool = False, on_epoch_end: Optional[Callable[[dict, Optional[str]], None]] = None,
          progress: bool = True, tags: Optional[dict] = None, parent_run_id: Optional[str] = None) -> dict:
    """Train one configuration end to end; returns the final summary (incl. run_id).

    cfg: a Config or a nested dict. checkpoint_dir: where state.pt is written each epoch (None: no checkpoints).
    resume: continue from checkpoint_dir/state.pt when it exists (its MLflow run is reopened).
    on_epoch_end(metrics, checkpoint_dir): called after each epoch's checkpoint is written and logged.
    """
    from nr_study.data import build_data
    from nr_study.errors import TrackingError
    from nr_study.tracking import FAILED, FINISHED, KILLED, RunTracker, local_store_dir, resolve_tracking_uri

    if not isinstance(cfg, Config):
        cfg = config_from_dict(cfg)
    tc = cfg.train
    ckpt_dir = Path(checkpoint_dir).absolute() if checkpoint_dir else None
    uri = resolve_tracking_uri(tracking_uri, cfg.tracking.uri, create=False)
    # -- preflight: bad input fails here, before a run, a checkpoint folder or a runs/ folder exists ------------
    try:
        device = pick_device(tc.device)
        torch.set_num_threads(tc.threads or available_cpus())
        if device.type == "cuda":
            torch.backends.cudnn.benchmark = not tc.cuda_deterministic
            torch.backends.cudnn.deterministic = tc.cuda_deterministic
        ck_probe = check_writable_dir(ckpt_dir, "checkpoint folder") if ckpt_dir is not None else None
        store = local_store_dir(uri)
        if store is not None:
            check_writable_dir(store, "tracking store folder")
        check_sqlite_store(uri)
        ck = load_checkpoint(ckpt_dir) if (resume and ckpt_dir is not None) else None
        seed_everything(cfg.seed)
        data = build_data(cfg.data, device, seed=cfg.seed)
        if ck is not None:
            check_checkpoint_fits(ck, cfg, data, ckpt_dir / CKPT_NAME)
        run = _Run(cfg, device, data, None, ckpt_dir)
        run._progress = progress
        try:
            if ck is not None:
                run.build_from_checkpoint(ck)
            else:
                run.build_fresh(uri)
        except UnsupportedGraphError as exc:
            msg = str(exc)
            if "cannot take data.name" not in msg:
                msg = shape_message(cfg, data, exc) if "shape" in msg else (
                    f"model.name {cfg.model.name!r} on data.name {cfg.data.name!r} (inputs "
                    f"{'x'.join(map(str, data.input_shape))}): {one_line(msg, 300)}")
            raise UnsupportedGraphError(msg) from exc
        if ck_probe is not None:
            check_free_space(ck_probe, run.checkpoint_bytes(), "checkpoint folder")
    except BaseException as exc:
        if run_id:  # a run made for us (a sweep trial): say why it never started
            t = RunTracker(uri, cfg.tracking.experiment, run_id=run_id)
            t.end_quietly(KILLED if isinstance(exc, (KeyboardInterrupt, SystemExit)) else FAILED,
                          f"{type(exc).__name__}: {one_line(exc)}")
        raise
    # -- the run --------------------------------------------------------------------------------------------
    if store is not None:
        try:
            store.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfigError(f"tracking store folder {store}: cannot create it ({exc.strerror or exc})") from None
    rng = rng_state()  # MLflow must not shift the training's random streams
    tracker = RunTracker(uri, cfg.tracking.experiment, run_id or (ck or {}).get("run_id") or None,
                         run_name=cfg.tracking.run_name, tags=_tags(cfg, tags), parent_run_id=parent_run_id)
    run.tracker = tracker
    tracker.start()
    status = FAILED
    try:
        if not tracker.reopened:
            tracker.log_params(flatten(config_to_dict(cfg)))
            tracker.log_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False), "config.yaml")
        if ck is not None:
            tracker.sync_history(run.history)
            if progress:
                print(f"resumed from {ckpt_dir / CKPT_NAME} at epoch {run.epoch} (run {tracker.run_id})", flush=True)
        set_rng_state(rng)
        while run.epoch < tc.epochs:
            row = {"epoch": run.epoch + 1}
            row.update(run.train_epoch())
            run.maybe_slim_prune()
            row.update(run.evaluate())
            row.update({k: float(v) for k, v in run.nr_metrics().items()})
            run.history.append(row)
            run.checkpoint()
            _fault_kill(tc, run.epoch, "after_checkpoint")
            tracker.log_epoch(run.epoch, row)
            run.log_pending()
            if progress:
                print(_fmt(row, tc.epochs), flush=True)
            if on_epoch_end is not None:
                on_epoch_end(dict(row), str(ckpt_dir) if ckpt_dir else None)
            _fault_kill(tc, run.epoch, "after_epoch")
        summary = _finish(run, tracker)
        status = FINISHED
        if progress:
            print(f"done: final test_err {summary['final_test_err']:.2f}% (best {summary['best_test_err']:.2f}%), "
                  f"params {summary['final_params']:,}, FLOPs {summary.get('final_flops', float('nan')):,.0f}, "
                  f"rejuvenations {summary['rejuvenations']}, run {summary['run_id']}", flush=True)
    except (KeyboardInterrupt, SystemExit):  # Ctrl-C, or a sweep stopping the trial (ASHA): not a failure
        status = KILLED
        with _interruptions_deferred():
            tracker.end_quietly(KILLED)
        raise
    except BaseException as exc:
        with _interruptions_deferred():
            tracker.end_quietly(FAILED, f"{type(exc).__name__}: {one_line(exc, 500)}")
        if isinstance(exc, TrackingError) and ckpt_dir is not None and (ckpt_dir / CKPT_NAME).is_file():
            raise TrackingError(f"{exc}; checkpoint {ckpt_dir / CKPT_NAME} holds epoch {run.epoch}: rerun with "
                                f"--resume to continue (the missing epochs are logged then)") from exc
        raise
    with _interruptions_deferred():
        tracker.end(status)
    return summary


def _finish(run: _Run, tracker) -> dict:
    m = run.measure()
    last = run.history[-1] if run.history else {}
    best = min((r["test_err"] for r in run.history), default=float("nan"))
    summary = {"final_test_err": last.get("test_err", float("nan")), "best_test_err": best,
               "final_params": int(m["params"]), "final_flops": int(m["flops"]) if "flops" in m else float("nan")}
    tracker.log_summary(summary)
    core = _core()
    spec = core.architecture_spec(run.model) if core is not None else None
    tracker.log_dict({"model": run.cfg.model.name, "widths": _widths(run.model, run.input_shape),
                      "architecture": spec}, "final_widths.json")
    with tempfile.TemporaryDirectory() as td:
        p = Path(td) / "model.pt"
        torch.save(model_payload(run.model, run.meta), p)
        tracker.log_artifact(p, "model")
    return dict(summary, run_id=tracker.run_id, rejuvenations=run.n_events, epochs=run.epoch,
                final_test_err5=last.get("test_err5", float("nan")), method=run.cfg.method,
                checkpoint_dir=str(run.ckpt_dir) if run.ckpt_dir else None, history=list(run.history))


# ------------------------------------------------------------------------------------------------ CLI
class _ArgParser(argparse.ArgumentParser):
    """argparse that reports a bad command line as one `error:` line (exit 2) instead of usage + error."""

    def error(self, message):
        raise ConfigError(f"{self.prog}: {message} (see {self.prog} --help)")


class Terminated(KeyboardInterrupt):
    """SIGTERM (a cluster's scheduler, `kill`): handled like Ctrl-C, the run ends KILLED, exit 143."""


def _on_sigterm(signum, frame):
    raise Terminated()


def cli_main(argv) -> int:
    from nr_study.tracking import quiet_client_logs, runs_dir

    quiet_client_logs()
    ap = _ArgParser(prog="nr-study train", description="Train one configuration with MLflow tracking.")
    ap.add_argument("config", help="YAML config (see configs/)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="override a config key, value parsed as YAML (repeatable), e.g. --set nr.tr=0.3")
    ap.add_argument("--tracking-uri", default=None, help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI or "
                    "sqlite:///<runs>/mlflow.db)")
    ap.add_argument("--checkpoint-dir", default=None, help="checkpoint folder (default: <runs>/checkpoints/<config>)")
    ap.add_argument("--resume", action="store_true", help="continue from the checkpoint folder's state.pt")
    ap.add_argument("--run-id", default=None, help="log into this existing MLflow run")
    ap.add_argument("--quiet", action="store_true", help="no per-epoch lines")
    args = ap.parse_args(list(argv))
    cfg = load_config(args.config, args.overrides)
    ckpt = args.checkpoint_dir or str(runs_dir() / "checkpoints" / Path(args.config).stem)
    if args.resume and not (Path(ckpt) / CKPT_NAME).is_file():
        raise ConfigError(f"--resume: no checkpoint at {Path(ckpt) / CKPT_NAME}")
    old_term = None
    if threading.current_thread() is threading.main_thread():
        old_term = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        summary = train(cfg, tracking_uri=args.tracking_uri, run_id=args.run_id, checkpoint_dir=ckpt,
                        resume=args.resume, progress=not args.quiet)
    except TrainingDivergedError as exc:
        print(f"error: {one_line(exc)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as exc:
        code, what = (143, "terminated (SIGTERM)") if isinstance(exc, Terminated) else (130, "interrupted")
        again = (f"; continue with: nr-study train {args.config} --resume --checkpoint-dir {ckpt}"
                 if (Path(ckpt) / CKPT_NAME).is_file() else "")
        print(f"error: {what}: the run ended KILLED{again}", file=sys.stderr)
        return code
    finally:
        if old_term is not None:
            signal.signal(signal.SIGTERM, old_term)
    if args.quiet:
        print(json.dumps({k: v for k, v in summary.items() if k != "history"}))
    return 0


__all__ = ["train", "cli_main", "TrainingDivergedError", "lr_at", "model_from_payload", "model_payload",
           "load_checkpoint", "CKPT_NAME", "available_cpus"]
