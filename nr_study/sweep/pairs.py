"""Paired baselines (`pair_with: BL` in a search space): each trial is compared with its own baseline.

A regime study asks "does NR beat BL *here*?" for configurations that differ in width, data size, epochs, seed
... so the objective has to be NR's error minus the error of a baseline trained on the same seed, the same data
subset and the same architecture and schedule. The trial trains that baseline first (or reuses it: every
trial whose configuration differs only in settings the baseline does not read shares one), then reports
`delta_test_err` = its test error − the baseline's at the same epoch, each epoch, so a scheduler (ASHA) and
the searcher (Optuna) work on the paired difference itself.

A pair is an ordinary training run: its own MLflow child run of the sweep (tag nr.paired_baseline, no
nr.table), its checkpoint in <sweep>/pairs/<key>/, resumed like a trial's when the worker dies, trained once
under a file lock while other trials that need it wait.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

from nr_study.files import write_json_atomic
from nr_study.names import DELTA_METRIC, FINISHED, TAG_CELL, TAG_PAIRED_BASELINE, TAG_SWEEP, TAG_TRIAL

PAIRS_DIR = "pairs"
RESULT_FILE = "result.json"


def pair_config(cfg, method: str):
    """The configuration `cfg` trained as `method`: everything but the method the same. The settings the method
    never reads (the method-owned sections, registry.SECTIONS, outside its `reads`; what follows a rejuvenation
    for a method that never changes the model) are reset to their defaults, so trials that differ only there
    share one pair."""
    from nr_study.methods import METHODS
    from nr_study.methods.registry import SECTIONS

    R = dataclasses.replace
    info = METHODS[method]
    out = R(cfg, method=method, tracking=R(cfg.tracking, run_name=None))
    out = R(out, **{s: type(getattr(cfg, s))() for s in SECTIONS if s not in info.reads})
    if not info.changes_model:
        out = R(out, train=R(out.train, after_rejuvenation="continue"))
    return out


def pair_key(cfg) -> str:
    """What identifies a pair: a digest of the whole training configuration but its tracking section."""
    from nr_study.config import config_to_dict

    d = config_to_dict(cfg)
    d.pop("tracking", None)
    return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:16]


def delta_row(row: dict, pair_history: list[dict], epochs: int) -> dict:
    """The paired difference for one of the trial's epoch rows (empty when the pair has no such epoch). Under
    reset_epochs the trial's epochs count again from its rejuvenation (total_epochs = that epoch + `epochs`), as
    its lr schedule does: its epoch t meets the pair's epoch t - (total_epochs - epochs), last with last."""
    by_epoch = {int(r["epoch"]): r for r in pair_history}
    other = by_epoch.get(int(row["epoch"]) - (int(row.get("total_epochs", epochs)) - epochs))
    if other is None:
        return {}
    return {DELTA_METRIC: float(row["test_err"]) - float(other["test_err"])}


def train_pair(ctx, cfg, client, basis: str = "equal epochs") -> dict:
    """The trial's pair, trained now or read back: {"run_id", "history": [{"epoch", "test_err"}, ...]}.

    One trial trains it under an exclusive lock on <sweep>/pairs/<key>.lock; the others wait on the lock and
    then read result.json. A worker killed while training it leaves the checkpoint: the retry continues it in
    the same run (found from the checkpoint, or by its nr.trial tag before the first one)."""
    import fcntl

    from nr_study.checkpoint import load_checkpoint
    from nr_study.files import read_json
    from nr_study.sweep.runs import own_run
    from nr_study.train import train

    pcfg = pair_config(cfg, ctx.space.pair_with)
    key = pair_key(pcfg)
    root = Path(ctx.sweep_dir) / PAIRS_DIR
    folder = root / key
    folder.mkdir(parents=True, exist_ok=True)
    result = folder / RESULT_FILE
    with open(root / f"{key}.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, also when the worker dies
        if result.is_file():
            return read_json(result, "paired baseline result")
        trial = f"pair-{key}"
        cell = f"{ctx.space.pair_with} (paired baseline" + (
            ")" if basis == "equal epochs" else f", {pcfg.train.epochs} epochs: {basis})")
        tags = {TAG_SWEEP: ctx.space.name, TAG_TRIAL: trial, TAG_PAIRED_BASELINE: "true", TAG_CELL: cell}
        pcfg = dataclasses.replace(pcfg, tracking=dataclasses.replace(
            pcfg.tracking, run_name=f"{ctx.space.pair_with}-pair-{key[:8]}-s{pcfg.seed}"))
        local = load_checkpoint(folder)
        run_id = own_run(client, ctx, trial, local, pcfg, tags)
        if local is not None and int(local.get("epoch", 0)) >= int(local.get("end_epoch", pcfg.train.epochs)) \
                and client.get_run(run_id).info.status == FINISHED:
            history = local["history"]  # trained to the end; the worker died before result.json was written
        else:
            history = train(pcfg, tracking_uri=ctx.tracking_uri, run_id=run_id, checkpoint_dir=str(folder),
                            resume=local is not None, progress=False, tags=tags, parent_run_id=ctx.parent_run_id,
                            system_metrics=False)["history"]
        out = {"run_id": run_id, "key": key,
               "history": [{"epoch": int(r["epoch"]), "test_err": float(r["test_err"])} for r in history]}
        write_json_atomic(result, out)
        return out

