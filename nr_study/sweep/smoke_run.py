"""`nr-study sweep FILE --smoke`: every trial of a search space, made small (nr_study.sweep.smoke), through what a
cluster run goes through, on this machine, before a day of GPU time finds the mistake instead.

1. prepare: the file as it would launch is validated, its table tag checked (smoke.check_table_name), the smoke
   document made and validated; every refusal is one line (exit 2) with nothing written. Then a folder of its
   own, `<runs>/smoke/<name>-<time>/` (its MLflow store, sweep folder, logs, report): the smoke's runs never
   reach the store the real tables read.
2. launch: `nr-study sweep <smoke file> --tracking-uri <the smoke's own mlflow server>` in a child process: the
   real Ray, MLflow, checkpoints; the fault injection SIGKILLs the first trial to finish epoch 1 and the
   sweep's retry continues it. Once a checkpoint is written after that kill the launch gets Ctrl-C (SIGINT).
3. resume: `nr-study sweep <smoke file> --resume <its folder> ...` finishes it (re-running nothing finished).
4. check: per trial, from Ray's state and the MLflow run: finished, one run with each epoch once, its model
   and widths logged, an NR method rejuvenated after epoch 1, SLIM pruned; then `nr-study tables` and `plots`
   are built from the smoke's experiment and each run must be in a cell of the table its nr.table tag names
   (a paper table that leaves it out says why in its notes; Figure 1 must be drawn).
One line per trial (ok, or the first problem, named), exit 2 if any trial or step failed.
"""
from __future__ import annotations

import copy
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from nr_study.names import FAILED, FINISHED, TAG_ERROR, TAG_PAIRED_BASELINE, TAG_TABLE, TAG_TRIAL

LAUNCH_LOG, RESUME_LOG, KILL_MARKER = "launch.log", "resume.log", "killed_once"
SETTLE_S = 600.0  # how long an interrupted launch may take to close its runs and stop Ray


@dataclass
class Smoke:
    """One smoke: the space as written, the smoke's space and where its files go."""

    source: str                  # the search-space file
    space: object                # SearchSpace as the file launches
    smoke: object                # SearchSpace the smoke runs
    document: dict               # its document (written to `file`)
    folder: Path                 # <runs>/smoke/<name>-<time>
    groups: dict                 # the changes, grouped: {group: ["key old -> new", ...]}
    cpus: int = 1
    device: str = "cpu"

    @property
    def file(self) -> Path:
        return self.folder / f"{self.smoke.name}.yaml"

    @property
    def marker(self) -> Path:
        return self.folder / KILL_MARKER


@dataclass
class Verdict:
    trial_id: str
    name: str
    problem: Optional[str] = None   # the first problem, named; None: ok
    done: list = field(default_factory=list)  # what it did (ok line)


def local_machine() -> tuple[int, bool]:
    """CPUs this process may use and whether a CUDA GPU is there: what the smoke's trials get."""
    import torch

    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - non-Linux
        cpus = os.cpu_count() or 1
    return max(1, cpus), bool(torch.cuda.is_available())


def prepare(path, overrides=(), *, runs=None, select: Optional[list] = None, machine=None) -> Smoke:
    """Everything refused comes from here, before anything is written (the folder is named, not made)."""
    from nr_study.names import runs_dir
    from nr_study.sweep.smoke import check_table_name, smoke_document, subset_document
    from nr_study.sweep.space import apply_space_overrides, parse_search_space, read_document

    doc = read_document(path)
    apply_space_overrides(doc, overrides)
    space = parse_search_space(copy.deepcopy(doc), str(path))
    check_table_name(space)
    cpus, cuda = machine or local_machine()
    root = runs_dir(runs) / "smoke"
    folder = root / f"{space.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    n = 1
    while folder.exists():
        n += 1
        folder = root / f"{space.name}-{time.strftime('%Y%m%d-%H%M%S')}-{n}"
    sdoc, groups = smoke_document(doc, space, cpus=cpus, cuda=cuda, marker=str(folder / KILL_MARKER))
    if select is not None:
        sdoc = subset_document(sdoc, parse_search_space(copy.deepcopy(sdoc), str(path)), list(select))
    smoke = parse_search_space(copy.deepcopy(sdoc), str(folder / f"{sdoc['name']}.yaml"))
    return Smoke(str(path), space, smoke, sdoc, folder, groups, cpus=cpus,
                 device=smoke.base["train"]["device"])


def describe(sm: Smoke) -> list[str]:
    """What the smoke will run and every key it changed (old -> new)."""
    s = sm.smoke
    lines = [f"smoke of {sm.source}: {s.num_trials} trial(s) of {sm.space.num_trials} on this machine "
             f"({sm.device}, {sm.cpus} CPU(s)), MLflow experiment {s.experiment!r} in {sm.folder}"]
    lines += [f"  changed, {group}: {', '.join(items)}" for group, items in sm.groups.items()]
    return lines


def write(sm: Smoke) -> None:
    from nr_study.sweep.space import dump_document

    sm.folder.mkdir(parents=True)
    sm.file.write_text(dump_document(sm.document), encoding="utf-8")


# --------------------------------------------------------------------------------------------- the phases
def _sweep_cmd(sm: Smoke, uri: str, *extra: str) -> list[str]:
    return [sys.executable, "-m", "nr_study.cli", "sweep", str(sm.file), "--runs", str(sm.folder),
            "--tracking-uri", uri, "--verbose", "0", *extra]


def _default_sigint() -> None:  # pragma: no cover - runs in the child before exec
    signal.signal(signal.SIGINT, signal.SIG_DFL)  # a smoke started in the background still gets its Ctrl-C


def _checkpointed_after_kill(sm: Smoke) -> bool:
    """The forced kill happened and some trial has written a checkpoint since (its retry, or another trial)."""
    try:
        killed = sm.marker.stat().st_mtime
    except FileNotFoundError:
        return False
    return any(p.stat().st_mtime > killed for p in sm.folder.glob("sweeps/*/trials/*/state.pt"))


def launch(sm: Smoke, uri: str) -> tuple[int, bool]:
    """Phase 2: the sweep in a child process, Ctrl-C'd once a trial checkpointed after the forced kill.
    Returns (exit code, whether it was interrupted)."""
    with open(sm.folder / LAUNCH_LOG, "w", encoding="utf-8") as log:
        proc = subprocess.Popen(_sweep_cmd(sm, uri), stdout=log, stderr=subprocess.STDOUT,
                                preexec_fn=_default_sigint)
        interrupted = False
        try:
            while proc.poll() is None:
                time.sleep(0.5)
                if not interrupted and _checkpointed_after_kill(sm):
                    proc.send_signal(signal.SIGINT)
                    interrupted = True
                    try:
                        proc.wait(timeout=SETTLE_S)
                    except subprocess.TimeoutExpired:
                        proc.kill()
        finally:
            if proc.poll() is None:  # our own Ctrl-C or an error: the child goes too
                proc.send_signal(signal.SIGINT)
                try:
                    proc.wait(timeout=SETTLE_S)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
    return proc.returncode, interrupted


def resume(sm: Smoke, uri: str, sweep_dir: Path) -> int:
    """Phase 3: `--resume` of the launched sweep, as a user types it."""
    with open(sm.folder / RESUME_LOG, "w", encoding="utf-8") as log:
        proc = subprocess.Popen(_sweep_cmd(sm, uri, "--resume", str(sweep_dir)), stdout=log,
                                stderr=subprocess.STDOUT, preexec_fn=_default_sigint)
        try:
            return proc.wait()
        finally:
            if proc.poll() is None:
                proc.send_signal(signal.SIGINT)
                proc.wait()


def last_error(log: Path) -> str:
    """The last `error:` line of a phase's log (else its last line): why a phase failed, in one line."""
    try:
        lines = [ln.strip() for ln in log.read_text(encoding="utf-8", errors="replace").splitlines() if ln.strip()]
    except OSError:
        return f"{log}: not written"
    errors = [ln for ln in lines if ln.startswith("error:")]
    return (errors or lines or ["(no output)"])[-1][:400]


# --------------------------------------------------------------------------------------------- the checks
def _tables(uri: str, experiment: str, out: Path):
    """`nr-study tables` and `plots` over the smoke's experiment, written under `out`: (tables, plots)."""
    from nr_study.analysis.plots import make_all, write_manifest
    from nr_study.analysis.report import write_index
    from nr_study.analysis.runs import RunStore
    from nr_study.analysis.tables import build_tables, write_tables

    store = RunStore(uri, [experiment])
    built = build_tables(store, "final")
    write_tables(built, out)
    plots = make_all(store, out, "final")
    write_manifest(plots, out)
    write_index(out)
    return built, plots


def _placements(built) -> dict[str, list[tuple[str, str]]]:
    """run id -> [(table, cell id)] for every cell of every built table."""
    where: dict[str, list] = {}
    for t in built:
        for (row, group, _value), cell in t.cells.items():
            cid = t.cell_ids.get((row, group)) or "/".join(x for x in (row, group) if x)
            for rid in cell.run_ids:
                if (t.name, cid) not in where.setdefault(rid, []):
                    where[rid].append((t.name, cid))
    return where


def _ray_error(trial) -> Optional[str]:
    from nr_study.sweep.summary import error_cause

    try:
        err = trial.get_error()
    except Exception:  # noqa: BLE001 - an unreadable error record: the run's tag or the status says it
        return None
    return error_cause(err) if err else None


def _run_problem(client, run, cfg, trial) -> Optional[str]:
    """The first thing wrong with a trial's finished MLflow run, else None (and what it did, in trial.done)."""
    from nr_study.methods import METHODS

    m = run.data.metrics
    rid = run.info.run_id
    steps = sorted(int(x.step) for x in client.get_metric_history(rid, "test_err"))
    total = int(m.get("total_epochs", 0))
    if "final_test_err" not in m:
        return "no final metrics: the run did not train to its end"
    if steps != list(range(1, total + 1)):
        return f"epochs logged {steps}; expected 1..{total}, each once (across the retry and the resume)"
    arts = {a.path for a in client.list_artifacts(rid)}
    for need in ("model", "final_widths.json", "config.yaml"):
        if need not in arts:
            return f"artifact {need} missing"
    trial.done.append(f"{total} epochs")
    info = METHODS.get(cfg.method)
    if info is not None and info.hook and cfg.nr.max_rejuvenations > 0:
        first = dict((int(x.step), x.value) for x in client.get_metric_history(rid, "rejuvenations")).get(1, 0)
        if first < 1:
            return (f"no rejuvenation after epoch 1 (nr.tr {cfg.nr.tr}, nr.{cfg.nr.constraint}): the surgery did "
                    f"not run")
        if "rejuvenations" not in arts:
            return "rejuvenated after epoch 1, but no report of it was logged (rejuvenations/NNN.json)"
        trial.done.append(f"{int(m.get('rejuvenations', first))} rejuvenation(s) from epoch 1")
    if info is not None and "slim" in info.reads:
        if "slim_prune.json" not in arts:
            return "no SLIM prune after epoch 1"
        trial.done.append("pruned after epoch 1")
    return None


def check(sm: Smoke, uri: str, sweep_dir: Path, report: Path) -> tuple[list[Verdict], list[str]]:
    """Per trial: its first problem or what it did; and the problems of the whole (tables, plots, the kill)."""
    from mlflow.tracking import MlflowClient

    from nr_study.analysis.paper import FIGURE1_TABLES
    from nr_study.files import read_json
    from nr_study.sweep.ray_setup import trials_from_state
    from nr_study.sweep.runner import SWEEP_FILE

    client = MlflowClient(tracking_uri=uri)
    state = read_json(sweep_dir / SWEEP_FILE, "sweep state file")
    kids = client.search_runs([state["experiment_id"]], max_results=10000,
                              filter_string=f"tags.mlflow.parentRunId = '{state['parent_run_id']}'")
    by_trial: dict[str, list] = {}
    for r in kids:
        if r.data.tags.get(TAG_PAIRED_BASELINE) != "true":
            by_trial.setdefault(r.data.tags.get(TAG_TRIAL, "?"), []).append(r)
    trials = sorted(trials_from_state(sweep_dir) or [], key=lambda t: t.trial_id)
    overall: list[str] = []
    if len(trials) != sm.smoke.num_trials:
        overall.append(f"Ray's state holds {len(trials)} trial(s) of {sm.smoke.num_trials}")
    built = plots = None
    try:
        built, plots = _tables(uri, sm.smoke.experiment, report)
    except Exception as exc:  # noqa: BLE001 - a table that cannot read the runs is what the smoke is for
        overall.append(f"nr-study tables/plots over {sm.smoke.experiment!r}: {type(exc).__name__}: "
                       f"{str(exc).strip().splitlines()[0][:300] if str(exc).strip() else ''}")
    where = _placements(built or [])
    notes = [n for t in (built or []) for n in t.notes]
    figure = next((p for p in plots or [] if p.name == "figure1"), None)
    verdicts = []
    for t in trials:
        cfg, name, tags = sm.smoke.resolve_trial(t.config)
        v = Verdict(t.trial_id, name)
        runs = by_trial.get(t.trial_id, [])
        run = runs[0] if len(runs) == 1 else None
        if t.status == "ERROR" or (run is not None and run.info.status == FAILED):
            v.problem = ((run.data.tags.get(TAG_ERROR) if run is not None else None) or _ray_error(t)
                         or "errored (Ray's record of why is unreadable; see the logs)")
        elif t.status != "TERMINATED":
            v.problem = f"did not finish (Ray status {t.status})"
        elif run is None:
            v.problem = f"{len(runs)} MLflow runs for this trial; expected one, continued across its retry"
        elif run.info.status != FINISHED:
            v.problem = f"its MLflow run is {run.info.status}"
        else:
            v.problem = _run_problem(client, run, cfg, v)
        if v.problem is None and t.num_failures:
            v.done.append(f"SIGKILLed after epoch 1 and retried from its checkpoint ({t.num_failures}x)")
        if v.problem is None and built is not None:
            table = tags.get(TAG_TABLE)
            placed = [c for tb, c in where.get(run.info.run_id, []) if tb == table]
            why = [n for n in notes if run.info.run_id[:8] in n]
            if table and not placed:
                v.problem = (f"table {table}: not in any of its cells" + (f" ({why[0]})" if why else "")
                             + " (nr-study tables)")
            elif table and str(table).lower() in FIGURE1_TABLES and not (figure and figure.files):
                v.problem = f"Figure 1 not drawn ({'; '.join((figure.notes if figure else [])[-1:])})"
            elif table:
                v.done.append(f"table {table} cell {placed[0]}")
        verdicts.append(v)
    if sm.marker.exists() and not any(t.num_failures for t in trials):
        overall.append(f"a worker was SIGKILLed ({sm.marker}) but Ray records no retry of any trial")
    return verdicts, overall


# --------------------------------------------------------------------------------------------- the command
def run_smoke(path, overrides=(), *, runs=None, select: Optional[list] = None, out=None) -> int:
    """The whole smoke (module doc); prints its lines to `out` and returns the exit code (0 ok, 2 any failure)."""
    from nr_study.mlflow_server import MlflowServer
    from nr_study.sweep.runner import find_latest_sweep

    out = out or sys.stdout
    started = time.monotonic()
    sm = prepare(path, overrides, runs=runs, select=select)
    write(sm)

    def say(line: str) -> None:
        print(line, file=out, flush=True)

    for line in describe(sm):
        say(line)
    server = MlflowServer.start(sm.folder).supervise(out=sys.stderr)
    overall: list[str] = []
    try:
        say(f"launch: {' '.join(_sweep_cmd(sm, server.url)[3:])} (log {sm.folder / LAUNCH_LOG})")
        rc, interrupted = launch(sm, server.url)
        sweep_dir = find_latest_sweep(sm.folder / "sweeps", sm.smoke.name)
        if sweep_dir is None:
            say(f"FAILED  launch (exit {rc}): {last_error(sm.folder / LAUNCH_LOG)}")
            return 2
        killed = ("after the forced worker kill and a checkpoint since" if sm.marker.exists()
                  else "(no trial was killed)")
        say(f"launch: {'interrupted (Ctrl-C) ' + killed if interrupted else 'ended before it was interrupted'}, "
            f"exit {rc}")
        say(f"resume: --resume {sweep_dir} (log {sm.folder / RESUME_LOG})")
        rrc = resume(sm, server.url, sweep_dir)
        say(f"resume: exit {rrc}")
        if rrc not in (0, 1):
            overall.append(f"--resume exit {rrc}: {last_error(sm.folder / RESUME_LOG)}")
        verdicts, more = check(sm, server.url, sweep_dir, sm.folder / "report")
        overall += more
    finally:
        server.stop()
    failed = [v for v in verdicts if v.problem]
    if rrc == 1 and not failed:
        overall.append(f"--resume exit 1 with every trial ok: {last_error(sm.folder / RESUME_LOG)}")
    for v in verdicts:
        say(f"FAILED  {v.name}: {v.problem}" if v.problem else f"ok      {v.name}: {', '.join(v.done)}")
    for line in overall:
        say(f"FAILED  {line}")
    say(f"tables and plots: {sm.folder / 'report' / 'index.html'}")
    ok = not failed and not overall
    freed = drop_checkpoints(sm) if ok else ""
    say(f"smoke {'passed' if ok else 'FAILED'}: {len(verdicts) - len(failed)} of {sm.smoke.num_trials} trial(s) ok "
        f"in {time.monotonic() - started:.0f} s; {sm.folder} holds {_size(sm.folder)}{freed} (delete it when done)")
    return 0 if ok else 2


def drop_checkpoints(sm: Smoke) -> str:
    """A passed smoke's checkpoints (the trainer's state.pt and Ray's two copies per trial: 7 GB for Table 5's
    twelve VGG-19 trials) are of no further use; a failed smoke keeps everything to look at."""
    import shutil

    gone = 0
    for p in sm.folder.glob("sweeps/*/trials/*/state.pt"):
        gone += p.stat().st_size
        p.unlink()
    for d in sm.folder.glob("sweeps/*/*/checkpoint_*"):
        if d.is_dir():
            gone += sum(f.stat().st_size for f in d.rglob("*") if f.is_file())
            shutil.rmtree(d)
    return f" after its checkpoints ({gone / 2**20:.0f} MiB) were removed" if gone else ""


def _size(folder: Path) -> str:
    total = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
    return f"{total / 2**20:.0f} MiB"
