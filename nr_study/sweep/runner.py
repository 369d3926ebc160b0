"""Run a search space on Ray Tune: one MLflow parent run per sweep, one child run per trial.

run_sweep is four steps: open_folder (flags, disk, the new or resumed sweep folder) -> open_parent (the MLflow
server and the parent run) -> fit (Ray's experiment to its end, the summary) -> close (every run closed, Ray and
the server stopped, whatever happened). The pieces live beside it: trial.py (the trainable), runs.py (a trial's
and the parent's MLflow runs), ray_setup.py (the Tuner, Ray addresses, Ray's log filters), summary.py,
faults.py (a full disk and other faults of the machine), state.py (what --resume reads), pairs.py, space.py.

Layout of the run folder (`runs/`, or $NR_STUDY_RUNS):
    mlflow.db, mlartifacts/, mlflow_server.log      the local MLflow server's SQLite file and artifacts
    sweeps/<name>-<YYYYmmdd-HHMMSS>/                 Ray Tune's experiment folder (storage) for one sweep:
        nr_sweep.json                                parent run id, experiment, the search-space document
        optuna.db                                    search: optuna — the Optuna study (the driver writes it)
        trials/<trial_id>/state.pt                   the trial's working checkpoint (trainer's format)
        <Ray trial dirs, tuner.pkl, experiment_state-*.json>

Run continuity: the trial creates its MLflow child run up front (tag nr.trial = Ray trial id) unless its
checkpoint names one; the trainer's checkpoint carries the run id, so a retried (FailureConfig.max_failures) or
resumed (`--resume`, Tuner.restore) trial reopens THE SAME run and the trainer logs each epoch once. A trial
restarted without a checkpoint finds its run again by the nr.trial tag. At the end (also on errors and
Ctrl-C) every child still RUNNING is closed: FINISHED (finished or stopped early by ASHA, tag
nr.early_stopped), FAILED (errored) or KILLED (interrupted).

Faults (docs/reliability.md): `--resume` first reads every file Ray's restore needs (nr_study/sweep/state.py);
when Ray's state is cut short (a full disk) a grid sweep is rebuilt from the run folder (each configuration that
ran continues from trials/<id>/state.pt in its MLflow run, matched by its values), anything else is refused with
one line (exit 2, nothing changed) — never Ray's silent "Restarting experiment". The sweep's exit code is 0 only
when every configuration of the space finished. The sweep's own mlflow server is supervised and restarted on the
same address when it dies; a trial that loses its tracking server waits for it (bounded) and continues from its
checkpoint in the same process instead of spending one of Ray's retries.
"""
from __future__ import annotations

import os
import shlex
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from nr_study.errors import Terminated, UserError
from nr_study.files import check_sqlite_store, read_json, write_json_atomic
from nr_study.names import RUNNING
from nr_study.sweep.faults import check_disk, driver_fault, full_disk, local_store_dir, store_full
from nr_study.sweep.ray_setup import (UNREADABLE_ERROR_FILES, OneLineTrialErrors, RayStorageNotices, add_callback,
                                      build_trainable, build_tuner, check_address, init_ray, one_line_node_losses,
                                      quiet_loggers, tolerate_unreadable_error_files, trials_from_state)
from nr_study.sweep.runs import ensure_tracking, finalize, start_parent, tcall
from nr_study.tracking import client_for
from nr_study.tracking_uri import check_sweep_server
from nr_study.sweep.space import SearchSpace
from nr_study.sweep.summary import count_finished, format_summary, has_early_stops, log_summary, summarize
from nr_study.sweep.trial import TrialContext

SWEEP_FILE = "nr_sweep.json"


@dataclass
class Sweep:
    """One launch (or resume) of a sweep: what each step of run_sweep needs and leaves for the next."""

    space: SearchSpace
    folder: Path                    # the run folder
    store_dir: Optional[str]        # the tracking store's folder when it is on this machine (faults.local_store_dir)
    sweep_dir: Path
    resume_cmd: str
    state: dict = field(default_factory=dict)  # nr_sweep.json
    ray_state: Any = None           # what Ray's saved state says (a resume), state.RayState
    rebuild: Optional[str] = None   # why Ray's state is unreadable: the grid is rebuilt from the run folder
    server: Any = None              # the sweep's own MLflow server
    uri: str = ""
    client: Any = None
    experiment_id: Optional[str] = None
    parent_run_id: Optional[str] = None
    parent_before: Any = None       # the parent run as it was before a resume (put back if the resume is refused)
    trials: Optional[list] = None   # Ray's trials as last saved
    summary: dict = field(default_factory=dict)
    interrupted: bool = False
    refused: bool = False
    started_ray: bool = False       # Ray is ours to shut down ...
    owns_ray: bool = False          # ... and was started by this sweep (not a caller's)
    prev_term: Any = None           # the SIGTERM handler before the sweep


@one_line_node_losses()
def run_sweep(space: SearchSpace, *, source_text: str, address: Optional[str] = None,
              tracking_uri: Optional[str] = None, resume: Optional[str | bool] = None,
              runs: Optional[str] = None, verbose: int = 1, out=None) -> dict:
    """Launch (or resume) a sweep end to end; returns the summary dict (with 'sweep_dir', 'parent_run_id',
    'expected' and 'finished' configurations, 'interrupted', 'resume_command').
    `out` (default: sys.stdout at call time, not at import: a replaced or closed stream must not stick)."""
    out = out or sys.stdout
    sw = open_folder(space, address=address, tracking_uri=tracking_uri, resume=resume, runs=runs, out=out)
    error: Optional[BaseException] = None
    _sigterm_stops_the_sweep(sw)
    try:
        open_parent(sw, tracking_uri, source_text, out)
        fit(sw, address, verbose, out)
    except BaseException as exc:  # noqa: BLE001 - close runs on any error, then re-raise
        error = exc
        raise
    finally:
        close(sw, error, out)
    sw.summary.update(sweep_dir=str(sw.sweep_dir), parent_run_id=sw.parent_run_id, experiment_id=sw.experiment_id,
                      interrupted=sw.interrupted, terminated=bool(_TERMINATED), resume_command=sw.resume_cmd)
    if sw.interrupted:
        print(f"sweep interrupted; continue it with: {sw.resume_cmd}", file=out, flush=True)
    return sw.summary


# --------------------------------------------------------------------------------------------- 1. the folder
def open_folder(space: SearchSpace, *, address, tracking_uri, resume, runs, out) -> Sweep:
    """Check the flags and the disk, then make the sweep folder or find the one to resume: every refusal here
    comes before any server, run or Ray process exists."""
    from nr_study.mlflow_server import DB_NAME, runs_dir

    if tracking_uri:  # flags first: a bad one is refused before any folder, server or run exists
        check_sweep_server(tracking_uri)
    check_address(address)
    folder = runs_dir(runs)
    if not tracking_uri:  # the local server's store: a garbage mlflow.db is one line, before any sweep folder
        check_sqlite_store(f"sqlite:///{folder / DB_NAME}")
    store_dir = local_store_dir(tracking_uri, folder)
    check_disk(folder, store_dir, "run folder")  # a full disk is named now, not after minutes of MLflow's retries
    storage_root = folder / "sweeps"
    storage_root.mkdir(parents=True, exist_ok=True)
    if resume:
        space, sweep_dir, state, ray_state, rebuild = _resume_folder(space, storage_root, resume, folder,
                                                                     tracking_uri, address, out)
    else:
        state, ray_state, rebuild = {}, None, None
        sweep_dir = storage_root / f"{space.name}-{time.strftime('%Y%m%d-%H%M%S')}"
        while sweep_dir.exists():
            time.sleep(1.0)
            sweep_dir = storage_root / f"{space.name}-{time.strftime('%Y%m%d-%H%M%S')}"
        sweep_dir.mkdir(parents=True)
    resume_cmd = sweep_command(space.path, folder, sweep_dir, tracking_uri=tracking_uri, address=address)
    return Sweep(space=space, folder=folder, store_dir=store_dir, sweep_dir=sweep_dir, resume_cmd=resume_cmd,
                 state=state, ray_state=ray_state, rebuild=rebuild)


def _resume_folder(space, storage_root: Path, resume, folder: Path, tracking_uri, address, out):
    """The sweep folder to resume, its state and search space, and whether Ray can restore it (else why not)."""
    from nr_study.sweep.space import parse_search_space
    from nr_study.sweep.state import ResumeRefused, can_rebuild, check_resumable

    sweep_dir = Path(resume).resolve() if isinstance(resume, str) else find_latest_sweep(storage_root, space.name)
    if sweep_dir is None or not (sweep_dir / SWEEP_FILE).is_file():
        raise UserError(f"--resume: no sweep named {space.name!r} to resume under {storage_root}"
                        if not isinstance(resume, str) else f"--resume {resume}: not a sweep folder "
                        f"(no {SWEEP_FILE})")
    state = read_json(sweep_dir / SWEEP_FILE, "sweep state file")
    if not isinstance(state, dict) or not isinstance(state.get("document"), dict):
        raise UserError(f"{sweep_dir / SWEEP_FILE}: not an nr-study sweep state (no 'document' mapping); "
                        f"allowed: the {SWEEP_FILE} a sweep wrote")
    space = parse_search_space(state["document"], state.get("path", space.path))
    ray_state = rebuild = None
    # Before anything else: a Ray state Ray could not restore would make it start the sweep over.
    try:
        ray_state = check_resumable(sweep_dir, fresh_hint=sweep_command(space.path, folder, tracking_uri=tracking_uri,
                                                                        address=address))
    except ResumeRefused as exc:
        if exc.problem is None:
            raise
        if not can_rebuild(space):
            raise ResumeRefused(f"{exc}; nor can it be rebuilt from the run folder: a {space.search} search "
                                f"with sampled values cannot regenerate its configurations (only a grid's)") from None
        # Rebuild: a new Ray experiment of the same grid in the same folder; each configuration that ran
        # continues from its checkpoint in its MLflow run (matched by its values), the rest start.
        rebuild = exc.problem
    for w in (ray_state.warnings if ray_state is not None else []):
        print(f"warning: {w}", file=sys.stderr, flush=True)
    print(f"resuming sweep {space.name} from {sweep_dir}", file=out, flush=True)
    return space, sweep_dir, state, ray_state, rebuild


# --------------------------------------------------------------------------------------------- 2. the parent run
def open_parent(sw: Sweep, tracking_uri: Optional[str], source_text: str, out) -> None:
    """Start the MLflow server (unless one is given), then create the parent run or reopen it on a resume."""
    from nr_study.mlflow_server import MlflowServer, ui_url
    from nr_study.tracking import get_or_create_experiment

    space = sw.space
    if tracking_uri:
        sw.uri = tracking_uri
    else:
        sw.server = MlflowServer.start(sw.folder, quiet=False).supervise(out=sys.stderr)  # restarted if it dies
        sw.uri = sw.server.url
    os.environ["MLFLOW_TRACKING_URI"] = sw.uri
    sw.client = client_for(sw.uri)
    sw.experiment_id = tcall(sw.uri, "opening the experiment", get_or_create_experiment, sw.client, sw.uri,
                             space.experiment)
    aliases = _plan_rebuild(sw) if sw.rebuild is not None else None  # refused here: still nothing changed
    if sw.state.get("parent_run_id"):
        sw.parent_run_id = sw.state["parent_run_id"]
        sw.parent_before = tcall(sw.uri, "reading the sweep's parent run", sw.client.get_run, sw.parent_run_id).info
        tcall(sw.uri, "reopening the sweep's parent run", sw.client.update_run, sw.parent_run_id, status=RUNNING)
    else:
        sw.parent_run_id = tcall(sw.uri, "creating the sweep's parent run", start_parent, sw.client, sw.uri, space,
                                 sw.experiment_id, sw.sweep_dir, source_text)
        sw.state = {"parent_run_id": sw.parent_run_id, "experiment": space.experiment,
                    "experiment_id": sw.experiment_id, "name": space.name, "path": space.path,
                    "document": space.document, "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
                    "tracking_uri_at_launch": sw.uri}
        _write_sweep_state(sw.sweep_dir, sw.state)
    if aliases is not None:
        _rebuild(sw, aliases, out)
    print(f"sweep {space.name}: {space.num_trials} trial(s); MLflow {sw.uri} experiment {space.experiment!r} "
          f"parent run {sw.parent_run_id}; folder {sw.sweep_dir}", file=out, flush=True)
    if sw.uri.startswith(("http://", "https://")):
        print(f"MLflow UI: {ui_url(sw.uri, sw.experiment_id)}", file=out, flush=True)


def _plan_rebuild(sw: Sweep) -> dict:
    """Which trial each configuration ran as (state.plan_rebuild), from the folder and the parent's children."""
    from nr_study.sweep.state import plan_rebuild

    kids = tcall(sw.uri, "reading the sweep's runs", sw.client.search_runs, [sw.experiment_id], max_results=10000,
                 filter_string=f"tags.mlflow.parentRunId = '{sw.state.get('parent_run_id')}'")
    return plan_rebuild(sw.sweep_dir, sw.space, sw.rebuild, kids, known=sw.state.get("aliases"))


def _rebuild(sw: Sweep, aliases: dict, out) -> None:
    """Set Ray's unreadable experiment aside and record which trial id each configuration keeps."""
    from nr_study.sweep.state import set_aside

    aside = set_aside(sw.sweep_dir, keep=aliases.values())
    sw.state["aliases"] = aliases
    sw.state.setdefault("rebuilt", []).append({"at": time.strftime("%Y-%m-%dT%H:%M:%S"), "why": sw.rebuild,
                                               "aside": aside.name if aside else None})
    _write_sweep_state(sw.sweep_dir, sw.state)
    print(f"Ray's sweep state {sw.rebuild}: rebuilding the sweep from its run folder: {len(aliases)} "
          f"configuration(s) that ran continue from their checkpoints in their MLflow runs, "
          f"{max(0, sw.space.num_trials - len(aliases))} start"
          + (f"; Ray's old files are kept in {aside}" if aside else ""), file=out, flush=True)


# --------------------------------------------------------------------------------------------- 3. the fit
def fit(sw: Sweep, address: Optional[str], verbose: int, out) -> None:
    """Run (or restore) the Ray experiment to its end, then summarise it and log the summary to the parent."""
    sw.started_ray = sw.owns_ray = init_ray(address)
    if sw.prev_term in (signal.SIG_DFL, None) and _is_main_thread():
        # ray.init replaces our SIGTERM handler with its own sys.exit(15): the process then died by SIGABRT
        # (exit -6) after closing the runs, with no resume hint. Put ours back so SIGTERM is handled like Ctrl-C.
        signal.signal(signal.SIGTERM, _sigterm_to_interrupt)
    data_root = os.environ.get("NR_STUDY_DATA") or str(Path.cwd() / "data")
    ctx = TrialContext(space=sw.space, tracking_uri=sw.uri, parent_run_id=sw.parent_run_id,
                       experiment_id=sw.experiment_id, sweep_dir=str(sw.sweep_dir), data_root=data_root,
                       aliases=sw.state.get("aliases") or None, store_dir=sw.store_dir)
    results = _fit_tuner(sw, ctx, verbose)
    # Trial states as saved at the end of the run, before Ray's cleanup (which marks interrupted trials
    # TERMINATED): the truth about what finished, stopped early, failed, or was interrupted.
    sw.trials = trials_from_state(sw.sweep_dir) or list(results._experiment_analysis.trials)
    sw.interrupted = any(t.status not in ("TERMINATED", "ERROR") for t in sw.trials)
    if UNREADABLE_ERROR_FILES:
        print(f"warning: Ray's error record of {len(UNREADABLE_ERROR_FILES)} errored trial(s) cannot be read "
              f"(cut short: a full disk does this), e.g. {UNREADABLE_ERROR_FILES[0]}; their causes below come "
              f"from the MLflow runs", file=sys.stderr, flush=True)
    sw.summary = summary = summarize(sw.space, results)
    summary.update(expected=sw.space.num_trials, finished=count_finished(sw.trials))
    summary["partial"] = sw.interrupted or summary["finished"] < summary["expected"]
    text = format_summary(sw.space, summary)
    if text:
        print(text, file=out, flush=True)
    full = full_disk(sw.sweep_dir, sw.store_dir)
    if full is not None:  # the cause of every failed trial, said once with the command that continues
        summary["fault"] = f"{full}; then continue the sweep with: {sw.resume_cmd}"
    if not store_full(sw.store_dir):  # else nothing more can be logged: --resume logs it
        ensure_tracking(sw.uri, sw.server)
        log_summary(sw.client, sw.parent_run_id, sw.space, summary)


def _fit_tuner(sw: Sweep, ctx: TrialContext, verbose: int):
    """Tuner.fit() of a new or restored experiment, with Ray's fault output cut to one line per fault; a restore
    Ray could not do (it would start the sweep over) is refused, a fault of the machine named."""
    from ray import tune

    guard = None
    if sw.ray_state is not None and sw.ray_state.state_file is not None:
        from nr_study.sweep.state import RestoreGuard

        tuner = tune.Tuner.restore(str(sw.sweep_dir), trainable=build_trainable(sw.space, ctx),
                                   resume_unfinished=True, resume_errored=True)
        guard = RestoreGuard(len(sw.ray_state.trial_ids), str(sw.ray_state.state_file))
        add_callback(tuner, guard.tune_callback())
    else:  # a new sweep, or a resume of one that never got as far as Ray's first state (nothing started)
        tuner = build_tuner(sw.space, ctx, sw.sweep_dir.parent, sw.sweep_dir.name, verbose=verbose)
    tolerate_unreadable_error_files()
    with quiet_loggers({"ray.tune.execution.tune_controller": OneLineTrialErrors(sw.space.max_failures),
                        **dict.fromkeys(RayStorageNotices.LOGGERS, RayStorageNotices())}):
        try:
            return tuner.fit()
        except Exception as exc:
            if guard is not None and guard.fired:
                sw.refused = True
                from nr_study.sweep.state import ResumeRefused

                raise ResumeRefused(f"--resume {sw.sweep_dir}: Ray could not restore its sweep state "
                                    f"{sw.ray_state.state_file} (its log lines above say why) and would have "
                                    f"started the sweep over; stopped before any trial ran, nothing changed") from None
            fault = driver_fault(exc, sw.resume_cmd)
            if fault is None:
                raise
            raise fault from exc


# --------------------------------------------------------------------------------------------- 4. the end
def close(sw: Sweep, error: Optional[BaseException], out) -> None:
    """Whatever happened: end Ray's trial processes, close every child run and the parent (or put the parent back
    after a refused resume), stop the server. Never masks the original error."""
    try:
        if sw.started_ray:
            # First end every trial process (a trial stopped by ASHA may still be unwinding and writing its
            # run's status), so that closing the runs below is the last word on them.
            import ray

            ray.shutdown()
            sw.started_ray = False
        if sw.client is None or sw.parent_run_id is None:
            pass
        elif sw.refused and sw.parent_before is not None:
            _put_parent_back(sw)
        elif store_full(sw.store_dir):
            # Closing the runs cannot succeed (MLflow would retry each call for minutes): --resume does it.
            print("MLflow runs are left open (the disk is full); --resume closes them", file=sys.stderr, flush=True)
        else:
            _close_runs(sw, error, out)
    except Exception as exc:  # never mask the original error
        print(f"warning: could not close MLflow runs: {exc}", file=sys.stderr)
    finally:
        if sw.started_ray:
            import ray

            ray.shutdown()
        if sw.server is not None:
            sw.server.stop()
        if _is_main_thread() and signal.getsignal(signal.SIGTERM) is _sigterm_to_interrupt:
            signal.signal(signal.SIGTERM, sw.prev_term)


def _put_parent_back(sw: Sweep) -> None:
    """The refused resume changes nothing: the parent run goes back to how it was."""
    before = sw.parent_before
    if before.status == RUNNING or not before.end_time:
        sw.client.update_run(sw.parent_run_id, status=before.status)
    else:
        sw.client.set_terminated(sw.parent_run_id, before.status, end_time=before.end_time)


def _close_runs(sw: Sweep, error: Optional[BaseException], out) -> None:
    if sw.trials is None:
        sw.trials = trials_from_state(sw.sweep_dir)
    ensure_tracking(sw.uri, sw.server)
    causes: dict = {}
    aliases = sw.state.get("aliases")
    counts = finalize(sw.client, sw.space, sw.experiment_id, sw.parent_run_id, sw.trials, error, causes,
                      aliases=aliases)
    for row in sw.summary.get("trials", []):
        if row.get("error") and row.get("trial_id") in causes:
            row["cause"] = causes[row["trial_id"]]
    if not sw.owns_ray and has_early_stops(sw.space, sw.trials):
        time.sleep(3.0)  # a caller-owned Ray: give stopped trials a moment to unwind, then re-close
        counts = finalize(sw.client, sw.space, sw.experiment_id, sw.parent_run_id, sw.trials, error, aliases=aliases)
    sw.summary["run_status"] = counts
    print("MLflow runs: " + ", ".join(f"{k} {v}" for k, v in counts.items()), file=out, flush=True)


# --------------------------------------------------------------------------------------------- helpers
def find_latest_sweep(storage_root: Path, name: str) -> Optional[Path]:
    cands = [p for p in storage_root.glob(f"{name}-*") if (p / SWEEP_FILE).is_file()]
    return max(cands, key=lambda p: p.name) if cands else None


def sweep_command(path: str, folder: Path, resume_dir: Optional[Path] = None, tracking_uri: Optional[str] = None,
                  address: Optional[str] = None) -> str:
    """The `nr-study sweep` command line that continues (resume_dir) or restarts this sweep from where the user
    is: --runs whenever the run folder is not ./runs (a resume elsewhere would open an empty store)."""
    parts = ["nr-study", "sweep", str(path)]
    if resume_dir is not None:
        parts += ["--resume", str(resume_dir)]
    if Path(folder).resolve() != Path("runs").resolve():
        parts += ["--runs", str(folder)]
    if tracking_uri:
        parts += ["--tracking-uri", tracking_uri]
    if address:
        parts += ["--address", address]
    return " ".join(shlex.quote(p) for p in parts)


def _write_sweep_state(sweep_dir: Path, state: dict) -> None:
    """nr_sweep.json, atomically (a full disk leaves the previous one whole)."""
    write_json_atomic(sweep_dir / SWEEP_FILE, state, indent=1, default=str)


def _is_main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


_TERMINATED: list = []  # set when SIGTERM arrived: the sweep then exits 143, not 130


def _sigterm_to_interrupt(signum, frame):
    """SIGTERM stops the sweep like Ctrl-C, exit 143. Inside Tuner.fit, where Ray Tune has its own SIGINT handler,
    it is sent on as SIGINT, so Tune ends the trials as on Ctrl-C (runs KILLED, the resume hint) instead of being
    cut out of its loop; anywhere else (start-up, the end, or SIGINT inherited ignored) it raises Terminated."""
    _TERMINATED.append(signum)
    handler = signal.getsignal(signal.SIGINT)
    if callable(handler) and handler is not signal.default_int_handler:
        os.kill(os.getpid(), signal.SIGINT)
    else:
        raise Terminated()


def _sigterm_stops_the_sweep(sw: Sweep) -> None:
    """SIGTERM handled like Ctrl-C for the whole sweep (close() puts the previous handler back)."""
    sw.prev_term = signal.getsignal(signal.SIGTERM)
    _TERMINATED.clear()
    if sw.prev_term in (signal.SIG_DFL, None) and _is_main_thread():
        signal.signal(signal.SIGTERM, _sigterm_to_interrupt)
