"""The training loop: `train(cfg, ...)` trains one configuration end to end (what a sweep trial calls).

`fit()` is the loop and reads top to bottom: per epoch, the steps (`train_step`: forward, backward, the method's
after_backward, SGD step; then the method's end_of_step), the method's end_of_epoch, evaluation, the cost model's
measures and the method's metrics, checkpoint (atomic), MLflow (one log_batch), on_epoch_end, fault injection.
The method (nr_study.methods: BL, BL-CA, NR and its variants, NR-FS, SLIM) is one object with those events; the
loop never asks which one runs. An event (a rejuvenation, SLIM's prune) hands the loop a new model: the
optimizer is rebuilt (momentum dropped: the tensors are new; nr.carry_momentum carries it to the survivors) and
the lr schedule continues or restarts as the event says. With progress on and stderr a terminal, an epoch's steps show a tqdm bar (images/s,
loss) on stderr; the epoch's line follows on stdout. Sweep trials run with progress off.

Checkpoints: nr_study.checkpoint (a run resumed after a rejuvenation continues bit for bit on CPU).

Bad input fails before anything is written (docs/reliability.md): `train()` first checks that the checkpoint and
tracking folders can be written, reads and matches the checkpoint (resume), builds the data, the model and the
method and runs one forward pass on the dataset's input shape — only then is the MLflow run created. Faults
during training (divergence, tracking server lost, disk full) end the run FAILED with one line and the last
checkpoint intact; Ctrl-C / SIGTERM end it KILLED.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from nr_study.checkpoint import (CKPT_NAME, check_checkpoint_fits, load_checkpoint, model_from_payload, model_payload,
                                 rng_state, seed_everything, set_rng_state)
from nr_study.config import Config, config_from_dict, load_config
from nr_study.errors import ConfigError, Terminated, UnsupportedGraphError, one_line
from nr_study.files import check_free_space, check_writable_dir
from nr_study.files import check_sqlite_store
from nr_study.methods.base import method_metrics
from nr_study.run_state import RunState, lr_at, shape_message

NAN_CHECK_EVERY = 20  # CUDA: look at the loss flag every N steps (a host sync), and at the end of each epoch


class TrainingDivergedError(RuntimeError):
    """The loss became NaN or infinite."""


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


def train_step(model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor, *,
               after_backward: Optional[Callable[[], None]] = None, amp: bool = False,
               loss_fn: Optional[Callable] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One optimizer step: forward (bf16 autocast when `amp`), the loss (`loss_fn(out, y)`, the method's;
    default cross-entropy), backward, `after_backward()` (the method's L1 subgradient), SGD step. Returns (loss,
    logits), not synchronised. nr-study bench times this."""
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=amp):
        out = model(x)
        loss = loss_fn(out, y) if loss_fn is not None else F.cross_entropy(out.float(), y)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    if after_backward is not None:
        after_backward()
    opt.step()
    return loss, out


class _EpochStats:
    """One epoch's loss and error sums, kept on the device. A NaN/inf loss stops the run: on CPU checked every
    step, on CUDA every NAN_CHECK_EVERY steps (a host sync) and at the end of the epoch."""

    def __init__(self, run: "RunState", bar):
        dev = run.device
        self.run, self.bar, self.seen = run, bar, 0
        self.loss = torch.zeros((), device=dev, dtype=torch.float64)
        self.wrong = torch.zeros((), device=dev, dtype=torch.long)
        self.bad = torch.zeros((), device=dev, dtype=torch.bool)
        self.every = 1 if dev.type == "cpu" else NAN_CHECK_EVERY

    def add(self, loss: torch.Tensor, out: torch.Tensor, y: torch.Tensor) -> None:
        loss, r = loss.detach(), self.run
        self.bad |= ~torch.isfinite(loss)
        if r.step % self.every == 0:
            if bool(self.bad):
                raise TrainingDivergedError(f"epoch {r.epoch + 1} step {r.step}: loss is {loss.item()}; training "
                                            f"diverged (lower optim.lr, nr.delta_lambda or nr.lambda_max)")
            if not self.bar.disable:
                self.bar.set_postfix(loss=f"{loss.item():.4f}", refresh=False)
        self.loss += loss.double() * len(y)
        self.wrong += (out.detach().argmax(1) != y).sum()
        self.seen += len(y)

    def check(self) -> None:
        if bool(self.bad):
            raise TrainingDivergedError(f"epoch {self.run.epoch + 1}: loss became NaN/inf by step {self.run.step}; "
                                        f"training diverged (lower optim.lr, nr.delta_lambda or nr.lambda_max)")

    def row(self, seconds: float) -> dict:
        n = max(1, self.seen)
        return {"train_loss": self.loss.item() / n, "train_err": 100.0 * self.wrong.item() / n,
                "epoch_time": seconds, "images_per_s": self.seen / max(seconds, 1e-9)}


# ------------------------------------------------------------------------------------------ the loop
def fit(run: "RunState", tracker, on_epoch_end: Optional[Callable] = None, progress: bool = True) -> None:
    """Epochs, steps, the method's events, evaluation, checkpoint, log. `run.phases` keeps the wall time of each
    part (what `nr-study bench` breaks a whole run's cost into)."""
    method, time_in = run.method, run.phases.time_in
    after_backward = run.phases.timed("method_l1", method.after_backward) if method.after_backward else None
    while run.epoch < run.end_epoch:  # train.epochs, more after a reset_epochs rejuvenation
        run.model.train()
        t0 = time.perf_counter()
        with run.epoch_bar(progress) as bar:
            stats = _EpochStats(run, bar)
            batches = iter(bar)
            while True:
                with time_in("data"):
                    x, y = next(batches, (None, None))
                if x is None:
                    break
                run.set_lr()
                with time_in("steps"):  # forward, backward, optimizer step (less the method's L1, timed apart)
                    loss, out = train_step(run.model, run.opt, x, y, after_backward=after_backward, amp=run.amp,
                                           loss_fn=method.loss)
                run.step += 1
                run.train_flops += 3 * run.image_flops * len(y)  # forward + backward (≈ 2 × forward)
                stats.add(loss, out, y)  # a NaN/inf loss stops the run here
                with time_in("method_events"):  # monitoring, λ, the rejuvenation's surgery
                    event = method.end_of_step()
                with time_in("adopt"):  # a new model: optimizer rebuilt, cost measured
                    run.adopt(event, progress)
        stats.check()
        _smoke_silence(run)
        with time_in("method_events"):
            event = method.end_of_epoch()
        with time_in("adopt"):
            run.adopt(event, progress)
        run.epoch += 1
        with time_in("eval"):
            evaluated = run.evaluate()
        with time_in("measure"):
            measured = run.measure()
        row = {"epoch": run.epoch, **stats.row(time.perf_counter() - t0), "lr": run.lr(max(0, run.step - 1)),
               **evaluated, **measured, **{k: float(v) for k, v in method_metrics(method).items()},
               "total_epochs": run.end_epoch, "train_flops": run.train_flops}
        if run.row_extras is not None:
            row.update(run.row_extras(row))
        run.history.append(row)
        with time_in("checkpoint"):
            run.checkpoint()
        _fault_kill(run.cfg.testing, run.epoch, "after_checkpoint")
        with time_in("tracking"):
            tracker.log_epoch(run.epoch, row)
            run.log_pending()
        if progress:
            print(_fmt(row, run.end_epoch), flush=True)
        if on_epoch_end is not None:
            on_epoch_end(dict(row), str(run.ckpt_dir) if run.ckpt_dir else None)
        _fault_kill(run.cfg.testing, run.epoch, "after_epoch")
    run.phases["method_l1"] = run.phases.get("method_l1", 0.0)
    run.phases["steps"] = run.phases.get("steps", 0.0) - run.phases["method_l1"]  # L1 ran inside the steps


def _smoke_silence(run: "RunState") -> None:
    """The `testing:` section's silence_fraction (the smoke): while an NR method can still rejuvenate, the weakest
    channels of every layer die before its end-of-epoch check — that fraction, more where r would stay at or
    above Tr (99 %, then all but one a layer: r's floor) — so it rejuvenates now, from survivors in every layer as
    after a real run's L1. (One channel a layer everywhere makes the regrowth uniform: VGG-16 at 224 px regrew
    580 channels in every layer, its 224 px layers too.)"""
    from nr_study.nr.cost import silence_weakest

    fraction, hook = run.cfg.testing.silence_fraction, getattr(run.method, "hook", None)
    if not fraction or hook is None or not hook.flag_on:
        return
    for f in (fraction, 1.0 - (1.0 - fraction) / 10, 1.0):
        silence_weakest(hook.model, hook.graph, f)
        if hook.utilization().ratio < hook.cfg.tr:
            return


def _fault_kill(testing, epoch: int, point: str) -> None:
    """The `testing:` section's SIGKILL (tests only): at this epoch and point, once while its marker is absent."""
    if testing.kill_at_epoch != epoch or testing.kill_point != point:
        return
    marker = testing.kill_once_marker
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


ALLOCATION_FAILURES = ("can't allocate memory", "storage size calculation overflowed", "out of memory",
                       "not enough memory")


def too_large(section: str, name: str, exc: BaseException) -> BaseException:
    """A config valid by its ranges whose tensors this machine cannot hold (a huge width, shape or subset):
    one line naming the section, not an internal error. Any other error is returned unchanged."""
    if isinstance(exc, MemoryError) or any(k in str(exc).lower() for k in ALLOCATION_FAILURES):
        return ConfigError(f"{section} ({name!r}): too large to allocate on this machine ({one_line(exc, 160)}); "
                           f"allowed: {section} sizes whose tensors fit in memory")
    return exc


def _fmt(row: dict, epochs: int) -> str:
    s = (f"epoch {row['epoch']:>3}/{epochs} loss {row['train_loss']:.4f} train_err {row['train_err']:5.2f}% "
         f"test_err {row['test_err']:5.2f}%")
    if "util_params" in row:
        s += f" util {row['util_params']:.3f}"
    s += f" λ {row.get('lambda', 0.0):.2e} lr {row['lr']:.4g}"
    if row.get("rejuvenations"):
        s += f" rejuv {int(row['rejuvenations'])}"
    if row.get("recycled"):  # ReDo, CBP: units recycled so far
        s += f" recycled {int(row['recycled'])}"
    return s + f" ({row['epoch_time']:.1f}s)"


def train(cfg, *, tracking_uri: Optional[str] = None, run_id: Optional[str] = None, checkpoint_dir=None,
          resume: bool = False, on_epoch_end: Optional[Callable[[dict, Optional[str]], None]] = None,
          progress: bool = True, tags: Optional[dict] = None, parent_run_id: Optional[str] = None,
          system_metrics: Optional[bool] = None, row_extras: Optional[Callable[[dict], dict]] = None) -> dict:
    """Train one configuration end to end; returns the final summary (incl. run_id, and phase_s: this process's
    wall seconds by part — setup, data, steps, method_l1, method_events, adopt, eval, measure, checkpoint,
    tracking, finish).

    cfg: a Config or a nested dict. checkpoint_dir: where state.pt is written each epoch (None: no checkpoints).
    resume: continue from checkpoint_dir/state.pt when it exists (its MLflow run is reopened).
    on_epoch_end(metrics, checkpoint_dir): called after each epoch's checkpoint is written and logged.
    system_metrics: MLflow's system metrics on this run (None: tracking.system_metrics, off when unset).
    row_extras(row) -> {metric: value}: more metrics for each epoch's row, added before it is checkpointed and
    logged, so they are kept and logged exactly once like the row (a sweep's paired difference).
    """
    from nr_study.tracking_uri import resolve_tracking_uri

    started = time.perf_counter()
    if not isinstance(cfg, Config):
        cfg = config_from_dict(cfg)
    ckpt_dir = Path(checkpoint_dir).absolute() if checkpoint_dir else None
    uri = resolve_tracking_uri(tracking_uri, cfg.tracking.uri, create=False)
    run, ck = _prepare(cfg, uri, ckpt_dir, resume, run_id)
    run.row_extras = row_extras
    return _tracked(run, ck, started, run_id=run_id, tags=tags, parent_run_id=parent_run_id,
                    system_metrics=system_metrics, on_epoch_end=on_epoch_end, progress=progress)


def _prepare(cfg: Config, uri: str, ckpt_dir: Optional[Path], resume: bool, run_id: Optional[str]):
    """Preflight: bad input fails here, before a run, a checkpoint folder or a runs/ folder exists. Returns the
    built run state and the checkpoint it resumes from (None: a fresh start)."""
    from nr_study.data import build_data
    from nr_study.tracking import FAILED, KILLED, RunTracker
    from nr_study.tracking_uri import local_store_dir

    tc = cfg.train
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
        try:
            data = build_data(cfg.data, device, seed=cfg.seed)
        except (MemoryError, RuntimeError, OverflowError) as exc:
            raise too_large("data", cfg.data.name, exc) from None
        if ck is not None:
            check_checkpoint_fits(ck, cfg, data, ckpt_dir / CKPT_NAME)
        run = RunState(cfg, device, data, ckpt_dir, uri)
        try:
            run.build(ck)
        except (MemoryError, RuntimeError, OverflowError) as exc:
            raise too_large("model", cfg.model.name, exc) from None
        except UnsupportedGraphError as exc:
            msg = str(exc)
            if "cannot take data.name" not in msg:
                msg = shape_message(cfg, data, exc) if "shape" in msg else (
                    f"model.name {cfg.model.name!r} on data.name {cfg.data.name!r} (inputs "
                    f"{'x'.join(map(str, data.input_shape))}): {one_line(msg, 300)}")
            raise UnsupportedGraphError(msg) from exc
        if ck_probe is not None:
            check_free_space(ck_probe, run.checkpoint_bytes(), "checkpoint folder", needs="a checkpoint needs",
                             error=ConfigError)
        if store is not None:
            try:
                store.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise ConfigError(f"tracking store folder {store}: cannot create it ({exc.strerror or exc})") from None
    except BaseException as exc:
        if run_id:  # a run made for us (a sweep trial): say why it never started
            t = RunTracker(uri, cfg.tracking.experiment, run_id=run_id)
            t.end_quietly(KILLED if isinstance(exc, (KeyboardInterrupt, SystemExit)) else FAILED,
                          f"{type(exc).__name__}: {one_line(exc)}")
        raise
    return run, ck


def _tracked(run: RunState, ck: Optional[dict], started: float, *, run_id, tags, parent_run_id, system_metrics,
             on_epoch_end, progress) -> dict:
    """The run in its MLflow run: opened (or reopened from the checkpoint), trained, closed with the status that
    says how it ended; a failure leaves the checkpoint and says how to continue."""
    from nr_study.errors import TrackingError
    from nr_study.tracking import FAILED, FINISHED, KILLED, SystemMetrics, open_run

    cfg, ckpt_dir = run.cfg, run.ckpt_dir
    rng = rng_state()  # MLflow must not shift the training's random streams
    tracker = run.tracker = open_run(run.tracking_uri, cfg, run_id=run_id or (ck or {}).get("run_id") or None,
                                     tags=tags, parent_run_id=parent_run_id)
    status = FAILED
    monitor = None
    try:
        if cfg.tracking.system_metrics if system_metrics is None else system_metrics:
            monitor = SystemMetrics.start(tracker)
        tracker.log_data(cfg.data, run.data)
        if ck is not None:
            tracker.sync_history(run.history)
            run.log_pending()  # the reports of an epoch whose logging a kill cut short
            if progress:
                print(f"resumed from {ckpt_dir / CKPT_NAME} at epoch {run.epoch} (run {tracker.run_id})", flush=True)
        set_rng_state(rng)
        run.phases["setup"] = time.perf_counter() - started  # data, model, run, inputs logged
        fit(run, tracker, on_epoch_end, progress)
        with run.phases.time_in("finish"):  # final metrics, the logged model, artifacts
            summary = _finish(run, tracker)
        summary["phase_s"] = dict(run.phases)
        if monitor is not None:
            monitor.stop()
        status = FINISHED
        if progress:
            print(f"done: final test_err {summary['final_test_err']:.2f}% (best {summary['best_test_err']:.2f}%), "
                  f"params {summary['final_params']:,}, FLOPs {summary.get('final_flops', float('nan')):,.0f}, "
                  f"rejuvenations {summary['rejuvenations']}, {summary['epochs']} epochs, training FLOPs "
                  f"{summary['train_flops']:.3g}, run {summary['run_id']}", flush=True)
    except (KeyboardInterrupt, SystemExit):  # Ctrl-C, or a sweep stopping the trial (ASHA): not a failure
        status = KILLED
        with _interruptions_deferred():
            if monitor is not None:
                monitor.stop()
            tracker.end_quietly(KILLED)
        raise
    except BaseException as exc:
        with _interruptions_deferred():
            if monitor is not None:
                monitor.stop()
            tracker.end_quietly(FAILED, f"{type(exc).__name__}: {one_line(exc, 500)}")
        if isinstance(exc, TrackingError) and ckpt_dir is not None and (ckpt_dir / CKPT_NAME).is_file():
            raise TrackingError(f"{exc}; checkpoint {ckpt_dir / CKPT_NAME} holds epoch {run.epoch}: rerun with "
                                f"--resume to continue (the missing epochs are logged then)") from exc
        raise
    with _interruptions_deferred():
        tracker.end(status)
    return summary


def _finish(run: RunState, tracker) -> dict:
    from nr_study.nr import architecture_spec, utilization

    m = run.measure()
    last = run.history[-1] if run.history else {}
    best = min((r["test_err"] for r in run.history), default=float("nan"))
    summary = {"final_test_err": last.get("test_err", float("nan")), "best_test_err": best,
               "final_params": int(m["params"]), "final_flops": int(m["flops"])}
    payload = model_payload(run.model, run.meta)
    model_id = tracker.log_model(payload, run.epoch)  # the Models column; nr_study.load_model(run id) loads it
    tracker.log_summary(summary, model_id=model_id)  # the run's final metrics are also the model's
    widths = {lu.name: int(lu.width) for lu in utilization(run.model, run.input_shape, "params").layers}
    tracker.log_dict({"model": run.cfg.model.name, "widths": widths, "architecture": architecture_spec(run.model)},
                     "final_widths.json")
    with tempfile.TemporaryDirectory() as td:  # also a plain artifact: what NR-FS (fs.run_id) reads
        p = Path(td) / "model.pt"
        torch.save(payload, p)
        tracker.log_artifact(p, "model")
    return dict(summary, run_id=tracker.run_id, model_id=model_id, rejuvenations=int(run.method.metrics()["rejuvenations"]),
                epochs=run.epoch, train_flops=run.train_flops, final_test_err5=last.get("test_err5", float("nan")), method=run.cfg.method,
                checkpoint_dir=str(run.ckpt_dir) if run.ckpt_dir else None, history=list(run.history))


# ------------------------------------------------------------------------------------------------ CLI
_CONFIG_KEY_LINE = re.compile(r"(?:%s)\b[\w.]*:" % "|".join(f.name for f in dataclasses.fields(Config)))


def in_file(path: str, message: str) -> str:
    """Each line of `message` that starts with a config key ("model: ...", "data.n_train: ...") as
    '<path>: <line>', so an error found only while building names the file, like load_config's own."""
    return "\n".join(f"{path}: {line}" if _CONFIG_KEY_LINE.match(line) else line for line in message.splitlines())


def _on_sigterm(signum, frame):
    raise Terminated()


def cli_main(argv) -> int:
    from nr_study.tracking import quiet_client_logs, runs_dir

    quiet_client_logs()
    from nr_study.cli_parser import CommandParser

    ap = CommandParser(prog="nr-study train", description="Train one configuration with MLflow tracking.")
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
    except ConfigError as exc:  # found while building (a model's kwargs, ...): say which file it is in
        raise ConfigError(in_file(args.config, str(exc))) from None
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


__all__ = ["train", "fit", "train_step", "cli_main", "TrainingDivergedError", "lr_at", "model_from_payload",
           "model_payload", "load_checkpoint", "CKPT_NAME", "available_cpus"]
