"""What `nr-study sweep --resume` needs from a sweep folder, checked before Ray reads it.

Ray's `Tuner.restore` reads `tuner.pkl`, the newest `experiment_state-<session>.json` (every trial, its status,
last result and checkpoint) and the searcher's newest state file. When one of them is cut short (a full disk) or
garbage, Ray logs "Failed to restore the run state ... Restarting experiment" and runs the search space from the
start in the same folder: new trial ids, new MLflow runs, the old ones closed KILLED, and a parent FINISHED with
configurations missing. `check_resumable` reads every one of those files first (JSON parsed, pickles walked
opcode by opcode with `pickletools`, nothing unpickled) and refuses a resume Ray could not do, with one line
naming the file. `RestoreGuard` catches the case the file checks cannot foresee: Ray dropped a state it had.
"""
from __future__ import annotations

import io
import json
import pickletools
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Optional

from nr_study.errors import UserError

STATE_PREFIX = "experiment_state-"
TUNER_PKL = "tuner.pkl"
_SESSION = re.compile(r"^(?P<family>.+?)-(?P<session>\d{4}-\d\d-\d\d_\d\d-\d\d-\d\d(?:\.\d+)?)\.(?P<ext>json|pkl)$")


class ResumeRefused(UserError):
    """A resume that Ray could not do without starting the sweep over (exit 2, nothing changed). `problem`: the
    unreadable Ray file and why, when that is the reason (a grid sweep is then rebuilt instead, see below)."""

    def __init__(self, msg: str, problem: Optional[str] = None):
        super().__init__(msg)
        self.problem = problem


@dataclass
class RayState:
    """What Ray's newest experiment state says (None fields: no state was written yet)."""

    state_file: Optional[Path] = None
    trial_ids: list = field(default_factory=list)
    statuses: dict = field(default_factory=dict)  # trial id -> Ray status (as last saved)
    warnings: list = field(default_factory=list)


def _why_unreadable_json(path: Path) -> Optional[str]:
    try:
        data = path.read_bytes()
    except OSError as exc:
        return f"cannot be read ({exc.strerror or exc})"
    if not data.strip():
        return f"is empty ({len(data)} bytes)"
    try:
        json.loads(data.decode("utf-8"))
    except UnicodeDecodeError as exc:
        return f"is not UTF-8 text (byte {exc.start} of {len(data)})"
    except ValueError as exc:
        if not data.rstrip().endswith((b"}", b"]")):
            return (f"is cut short (not valid JSON: it ends mid-document after {len(data)} bytes; a full disk "
                    f"does this)")
        pos = getattr(exc, "pos", None)
        where = f" at byte {pos} of {len(data)}" if pos is not None else ""
        return f"is corrupt (not valid JSON{where}: {getattr(exc, 'msg', exc)})"
    return None


def _why_unreadable_pickle(path: Path) -> Optional[str]:
    """Walk the pickle's opcodes without executing any (pickletools): a cut-short file has no STOP."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        return f"cannot be read ({exc.strerror or exc})"
    if not data:
        return "is empty (0 bytes)"
    try:
        for _ in pickletools.genops(io.BytesIO(data)):
            pass
    except Exception as exc:  # ValueError: truncated / bad opcode
        return f"is not a complete pickle ({len(data)} bytes: {exc}; a full disk cuts files short)"
    return None


def _is_pickle(path: Path) -> bool:
    """Ray names some pickles .json (basic-variant-state-*.json): protocol 2+ pickles start with 0x80."""
    try:
        with open(path, "rb") as f:
            return f.read(1) == b"\x80"
    except OSError:
        return False


def _families(sweep_dir: Path) -> dict[str, list[Path]]:
    """Ray's per-session state files by family (experiment_state, basic-variant-state, searcher-state, ...),
    each family sorted oldest first (Ray restores from the newest: the largest session stamp)."""
    fam: dict[str, list[Path]] = {}
    for p in sweep_dir.iterdir():
        m = _SESSION.match(p.name)
        if m and p.is_file():
            fam.setdefault(f"{m['family']}.{m['ext']}", []).append(p)
    return {k: sorted(v, key=lambda p: p.name) for k, v in fam.items()}


def started_trials(sweep_dir: Path) -> list[str]:
    """Trials that started in this folder: each made trials/<trial_id>/ on its first start."""
    d = sweep_dir / "trials"
    return sorted(p.name for p in d.iterdir() if p.is_dir()) if d.is_dir() else []


def check_resumable(sweep_dir: Path, fresh_hint: str) -> RayState:
    """Raise ResumeRefused (one line) when Ray could not restore this sweep folder as it is; else return what
    the newest experiment state holds. `fresh_hint` is the command that starts the sweep again, from scratch."""
    sweep_dir = Path(sweep_dir)
    tail = (f"Ray cannot continue the sweep from it (it would start over), so nothing was resumed or changed "
            f"(the trials' checkpoints and MLflow runs are kept); to run the sweep again from the start, in a new folder: {fresh_hint}")
    fams = _families(sweep_dir)
    states = fams.pop(f"{STATE_PREFIX[:-1]}.json", [])
    started = started_trials(sweep_dir)
    out = RayState()
    if not states:
        if started:
            problem = f"({STATE_PREFIX}*.json) is missing, yet {len(started)} trial(s) started there"
            raise ResumeRefused(f"--resume {sweep_dir}: Ray's sweep state {problem}; {tail}", problem)
        return out  # nothing ran yet: a fresh Tuner in this folder loses nothing
    newest = states[-1]
    why = _why_unreadable_json(newest)
    if why is None:
        doc = json.loads(newest.read_text("utf-8"))
        why = _structure_problem(doc, out)
    if why is not None:
        raise ResumeRefused(f"--resume {sweep_dir}: Ray's sweep state {newest} {why}; {tail}", f"{newest.name} {why}")
    out.state_file = newest
    for old in states[:-1]:
        w = _why_unreadable_json(old)
        if w:
            out.warnings.append(f"older Ray state {old.name} {w} (ignored: Ray restores from {newest.name})")
    tuner = sweep_dir / TUNER_PKL
    why = "is missing" if not tuner.is_file() else _why_unreadable_pickle(tuner)
    if why is not None:
        raise ResumeRefused(f"--resume {sweep_dir}: Ray's sweep file {tuner} {why}; {tail}", f"file {tuner.name} {why}")
    for name, files in sorted(fams.items()):  # the searcher's / callbacks' state: Ray reads the newest of each
        f = files[-1]
        why = _why_unreadable_pickle(f) if _is_pickle(f) or f.suffix == ".pkl" else _why_unreadable_json(f)
        if why is not None:
            raise ResumeRefused(f"--resume {sweep_dir}: Ray's search state {f} {why}; {tail}",
                                f"file {f.name} {why}")
    return out


def _structure_problem(doc, out: RayState) -> Optional[str]:
    if not isinstance(doc, dict) or not isinstance(doc.get("trial_data"), list) \
            or not isinstance(doc.get("runner_data"), dict):
        return "is not a Ray experiment state (no 'trial_data' list / 'runner_data' mapping)"
    for i, item in enumerate(doc["trial_data"]):
        try:
            state = json.loads(item[0])
            meta = json.loads(item[1])
            tid = state["trial_id"]
        except (TypeError, ValueError, KeyError, IndexError) as exc:
            return f"has an unreadable trial entry #{i + 1} ({type(exc).__name__}: {exc})"
        out.trial_ids.append(tid)
        out.statuses[tid] = state.get("status") or (meta.get("status") if isinstance(meta, dict) else None)
    return None


class RestoreGuard:
    """A Ray Tune callback (picklable) that stops a resume before its first trial when Ray restored none of the
    trials its state file holds — Ray's "Failed to restore the run state ... Restarting experiment"."""

    def __init__(self, expected: int, state_file: str):
        self.expected = int(expected)
        self.state_file = state_file
        self.fired = False
        self.checked = False

    def tune_callback(self):
        from ray.tune import Callback

        guard = self

        class _Guard(Callback):
            def on_step_begin(self, iteration, trials, **info):
                if guard.checked:
                    return
                guard.checked = True
                if guard.expected and not trials:
                    guard.fired = True
                    raise ResumeRefused(
                        f"--resume: Ray could not restore the sweep state {guard.state_file} (it logged why above) "
                        f"and would start the sweep over; stopped before any trial ran")

        return _Guard()


# --------------------------------------------------------------------------------------------- rebuild
TRIAL_CONFIG = "config.json"  # trials/<id>/config.json: Ray's config of the trial, written at its first start
ASIDE_PREFIX = ".ray-unreadable-"


def config_key(config: dict) -> str:
    """A trial's identity as a configuration: its flat Ray config (dotted keys, grid values, __repeat__)."""
    return json.dumps({str(k): config[k] for k in sorted(config, key=str)}, sort_keys=True, default=str)


def can_rebuild(space) -> bool:
    """A grid (or a random search without sampled values) names each configuration by its values alone, so a new
    Ray experiment regenerates exactly the same configurations and each can be matched to the trial that ran it.
    Sampled values (random/optuna) and Optuna's study history cannot be regenerated: those are refused."""
    return space.search in ("grid", "random") and not space.sampled_dims and space.num_samples == 1


def grid_configs(space) -> list[dict]:
    """The flat Ray configs Ray's BasicVariantGenerator makes for a grid space (SearchSpace.grid_points)."""
    return space.grid_points()


def trial_config_of(sweep_dir: Path, trial_id: str) -> Optional[dict]:
    """The Ray config a trial ran: our trials/<id>/config.json, else Ray's <id>-*/params.json."""
    cands = [sweep_dir / "trials" / trial_id / TRIAL_CONFIG] + sorted(sweep_dir.glob(f"{trial_id}-*/params.json"))
    for p in cands:
        try:
            cfg = json.loads(p.read_text("utf-8"))
        except (OSError, ValueError):
            continue
        if isinstance(cfg, dict):
            return cfg
    return None


def _progress(sweep_dir: Path, trial_id: str) -> int:
    """Bytes of the trial's working checkpoint (a proxy for how far it got, without unpickling anything)."""
    try:
        return (sweep_dir / "trials" / trial_id / "state.pt").stat().st_size
    except OSError:
        return -1


def _same_param(logged: Optional[str], value) -> bool:
    if logged is None:
        return False
    want = json.dumps(value) if isinstance(value, (list, dict)) else str(value)
    if logged == want:
        return True
    try:
        return float(logged) == float(value)
    except (TypeError, ValueError):
        return False


def config_from_run(space, params: dict) -> Optional[dict]:
    """The grid configuration whose values (and seed) an MLflow child run's params show; None unless exactly one."""
    hits = [c for c in grid_configs(space)
            if all(_same_param(params.get(k), v) for k, v in space.trial_values(c).items())]
    return hits[0] if len(hits) == 1 else None


def plan_rebuild(sweep_dir: Path, space, why: str, children: list, known: Optional[dict] = None) -> dict:
    """Map each configuration that already ran to the trial id it ran as (its checkpoint folder trials/<id> and
    its MLflow child run, tag nr.trial): {config_key: trial_id}. Which configuration a trial is comes from its
    trials/<id>/config.json, else Ray's params.json, else its MLflow run's params. Raises ResumeRefused when a
    trial that got somewhere (a checkpoint or a run) cannot be placed."""
    sweep_dir = Path(sweep_dir)
    expected = {config_key(c) for c in grid_configs(space)}
    runs = {r.data.tags.get("nr.trial"): r for r in children if r.data.tags.get("nr.trial")}
    aliases: dict = dict(known or {})
    for tid in sorted(set(started_trials(sweep_dir)) | set(runs)):
        if tid in aliases.values():
            continue
        cfg = trial_config_of(sweep_dir, tid)
        if cfg is None and tid in runs:
            cfg = config_from_run(space, runs[tid].data.params)
        if cfg is None:
            if tid not in runs and _progress(sweep_dir, tid) < 0:
                continue  # it stopped before its run and its first checkpoint: nothing to continue
            raise ResumeRefused(f"--resume {sweep_dir}: Ray's sweep state {why}, and which configuration trial {tid} "
                                f"is cannot be told (no readable {TRIAL_CONFIG}, params.json or MLflow run params), "
                                f"so the sweep cannot be rebuilt from its run folder; nothing was resumed or changed")
        key = config_key(cfg)
        if key not in expected:
            raise ResumeRefused(f"--resume {sweep_dir}: Ray's sweep state {why}, and trial {tid} ran {cfg}, which "
                                f"is not a configuration of this search space; nothing was resumed or changed")
        if key not in aliases or _progress(sweep_dir, tid) > _progress(sweep_dir, aliases[key]):
            aliases[key] = tid
    return aliases


_RAY_TRIAL_DIR = re.compile(r"^[0-9a-f]+_\d+-")  # <Ray trial id>-<name>/: Ray's results and checkpoint copies


def set_aside(sweep_dir: Path, keep: Iterable[str] = ()) -> Optional[Path]:
    """Before a rebuild: move the old Ray experiment's files (states, tuner.pkl, searcher states) and its trial
    folders (<old id>-<name>/) into .ray-unreadable-<stamp>/, so the rebuilt experiment's own are the only ones
    beside our trials/ (kept there for inspection); and remove trials/<id>/ folders that hold neither a
    configuration nor a checkpoint (a trial that stopped before writing anything) unless `keep` names them. Each
    configuration then has one trial id: the one in trials/ and in its MLflow run's nr.trial tag."""
    import shutil
    import time

    sweep_dir = Path(sweep_dir)
    moved = [p for p in sweep_dir.iterdir()
             if (p.is_file() and (_SESSION.match(p.name) or p.name == TUNER_PKL))
             or (p.is_dir() and _RAY_TRIAL_DIR.match(p.name))]
    keep = set(keep)
    for tid in started_trials(sweep_dir):
        folder = sweep_dir / "trials" / tid
        if tid not in keep and not (folder / TRIAL_CONFIG).is_file() and _progress(sweep_dir, tid) < 0:
            shutil.rmtree(folder, ignore_errors=True)
    if not moved:
        return None
    aside = sweep_dir / f"{ASIDE_PREFIX}{time.strftime('%Y%m%d-%H%M%S')}"
    aside.mkdir(exist_ok=True)
    for p in moved:
        p.rename(aside / p.name)
    return aside
