"""One Ray Tune trial (the trainable): resolve its config, find or create its MLflow run, train with checkpoints,
report each epoch to Ray. A retried or resumed trial continues the same run from its checkpoint."""
from __future__ import annotations

import functools
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from nr_study.files import write_json_atomic
from nr_study.names import FINISHED, TAG_GPUS, TAG_NODE, TAG_TRIAL
from nr_study.sweep.faults import check_disk
from nr_study.sweep.runs import own_run, wait_for_tracking
from nr_study.sweep.space import SearchSpace
from nr_study.tracking import client_for


@dataclass
class TrialContext:
    """What every trial needs from the driver (picklable; passed with tune.with_parameters)."""

    space: SearchSpace
    tracking_uri: str
    parent_run_id: str
    experiment_id: str
    sweep_dir: str           # absolute
    data_root: Optional[str]  # absolute default for data.root (trials run in their own working dir)
    aliases: Optional[dict] = None  # a rebuilt sweep: configuration key -> the trial id it first ran as
    store_dir: Optional[str] = None  # the tracking store's folder when it is on this machine's disk

    def identity(self, trial_id: str, config: dict) -> str:
        """The id a trial's checkpoint folder and MLflow run go by: the Ray trial id, or in a sweep rebuilt from
        its run folder (Ray's state unreadable) the id its configuration first ran as."""
        if self.aliases:
            from nr_study.sweep.state import config_key

            return self.aliases.get(config_key(config), trial_id)
        return trial_id


def _numeric(row: dict) -> dict:
    out = {}
    for k, v in row.items():
        if isinstance(v, bool):
            out[k] = int(v)
        elif isinstance(v, (int, float)):
            out[k] = v
    return out


def trial_fn(config: dict, ctx: TrialContext) -> None:
    """One Ray Tune trial: resolve the config, find/create its MLflow run, train with checkpoints."""
    from ray import tune

    from nr_study.errors import TrackingError
    from nr_study.train import CKPT_NAME, load_checkpoint

    import logging

    logging.getLogger("ray.train._internal.storage").setLevel(logging.WARNING)  # one line per checkpoint
    space = ctx.space
    tctx = tune.get_context()
    trial_id = ctx.identity(tctx.get_trial_id(), config)
    cfg, run_name, tags = space.resolve_trial(config, ctx.data_root)  # validated once, named, tagged
    tags[TAG_TRIAL] = trial_id
    try:
        import ray

        tags[TAG_NODE] = ray.get_runtime_context().get_node_id()
        gpus = ray.get_gpu_ids()
        tags[TAG_GPUS] = ",".join(str(g) for g in gpus) if gpus else "-"
    except Exception:
        pass

    check_disk(ctx.sweep_dir, ctx.store_dir)  # before anything is written or a run is created
    # The working checkpoint folder is stable across retries and resumes of this trial (absolute path).
    work = Path(ctx.sweep_dir) / "trials" / trial_id
    work.mkdir(parents=True, exist_ok=True)
    _write_trial_config(work, config)
    if trial_id != tctx.get_trial_id():
        tags["nr.ray_trial"] = tctx.get_trial_id()
    local = load_checkpoint(work)
    ray_ckpt = tune.get_checkpoint()
    ray_epoch = 0
    if ray_ckpt is not None:
        try:
            with ray_ckpt.as_directory() as d:
                src = Path(d) / CKPT_NAME
                if src.is_file():
                    import torch

                    st = torch.load(src, map_location="cpu", weights_only=True)
                    ray_epoch = int(st.get("epoch", 0))
                    if local is None or int(local.get("epoch", 0)) < ray_epoch:
                        shutil.copy2(src, work / CKPT_NAME)
                        local = st
        except Exception as exc:  # Ray's copy cut short (a full disk) or gone: the trainer's own file is atomic
            ray_epoch = int((local or {}).get("epoch", 0))
            print(f"trial {trial_id}: Ray's checkpoint copy is unreadable ({type(exc).__name__}: "
                  f"{str(exc).splitlines()[0][:160] if str(exc) else ''}); continuing from "
                  f"{work / CKPT_NAME if local else 'the start'}", file=sys.stderr, flush=True)
    # The tracking server down (killed, restarting, a network blip): wait for it here, bounded, and continue
    # from the checkpoint in this same process, instead of failing the trial and burning one of Ray's retries.
    reported = {"epoch": ray_epoch}  # the last epoch Ray has from this trial
    attempt = 0
    while True:
        try:
            return _trial_attempt(config, ctx, cfg, trial_id, run_name, tags, work, local, reported)
        except TrackingError as exc:
            check_disk(ctx.sweep_dir, ctx.store_dir)  # a store on a full disk answers 503 as if overloaded
            attempt += 1
            if attempt > 20 or not wait_for_tracking(ctx.tracking_uri, f"trial {trial_id}", exc):
                raise
            local = load_checkpoint(work)


def _trial_attempt(config: dict, ctx: TrialContext, cfg, trial_id: str, run_name: str, tags: dict, work: Path,
                   local: Optional[dict], reported: dict) -> None:
    from ray import tune

    from nr_study.train import train

    ray_epoch = reported["epoch"]
    resume = local is not None
    client = client_for(ctx.tracking_uri)
    run_id = own_run(client, ctx, trial_id, local, cfg, tags)

    # Epochs the local checkpoint holds beyond Ray's last persisted one (the worker died between the
    # trainer's checkpoint and its report): report them now so Ray's iteration count matches the run.
    if local is not None and int(local.get("epoch", 0)) > ray_epoch:
        rows = [r for r in local.get("history", []) if int(r["epoch"]) > ray_epoch]
        for i, row in enumerate(rows):
            last = i == len(rows) - 1
            tune.report(_numeric(row), checkpoint=tune.Checkpoint.from_directory(str(work)) if last else None)
            reported["epoch"] = int(row["epoch"])

    if (local is not None and int(local.get("epoch", 0)) >= int(local.get("end_epoch", cfg.train.epochs))
            and _status(client, run_id) == FINISHED):
        return  # finished (the driver died before Ray recorded it): nothing to re-run or re-log

    row_extras = None
    if ctx.space.pair_with:  # the paired baseline first: every epoch row then carries delta_test_err
        from nr_study.names import TAG_PAIR_RUN
        from nr_study.sweep.pairs import delta_row, train_pair

        pair = train_pair(ctx, cfg, client)
        client.set_tag(run_id, TAG_PAIR_RUN, pair["run_id"])
        row_extras = functools.partial(delta_row, pair_history=pair["history"], epochs=cfg.train.epochs)
    final: dict = {}

    def on_epoch_end(row: dict, checkpoint_dir: Optional[str]) -> None:
        if int(row["epoch"]) >= int(row.get("total_epochs", cfg.train.epochs)):  # more after a reset_epochs
            # The last epoch is reported after train() returns: a scheduler may stop a trial at its last
            # report (ASHA at max_t), and the trainer must first log the summary and the final model.
            final.update(row=row, checkpoint_dir=checkpoint_dir)
            return
        tune.report(_numeric(row), checkpoint=tune.Checkpoint.from_directory(checkpoint_dir))
        reported["epoch"] = int(row["epoch"])

    # Ray ends a trial it stops (ASHA, or a Ctrl-C of the sweep) with SystemExit from inside report(); the
    # driver, which knows which of the two it was, closes the run at the end of the sweep.
    summary = train(cfg, tracking_uri=ctx.tracking_uri, run_id=run_id, checkpoint_dir=str(work), resume=resume,
                    on_epoch_end=on_epoch_end, progress=False, tags=tags, parent_run_id=ctx.parent_run_id,
                    system_metrics=cfg.tracking.system_metrics is not False,  # on unless the space turns it off
                    row_extras=row_extras)
    if final:
        extra = {k: summary[k] for k in ("final_test_err", "best_test_err", "final_params", "final_flops")
                 if isinstance(summary.get(k), (int, float))}
        if ctx.space.pair_with:
            extra.update(_compute_pair(ctx, cfg, client, run_id, summary))
        tune.report(_numeric({**final["row"], **extra}),
                    checkpoint=tune.Checkpoint.from_directory(final["checkpoint_dir"]))


def _compute_pair(ctx: TrialContext, cfg, client, run_id: str, summary: dict) -> dict:
    """A trial that trained more epochs than train.epochs (reset_epochs: the paper's protocol) gets a second
    pair, BL for as many epochs as it trained (equal training compute), trained now (its total is known once it
    has rejuvenated) and shared by every trial with the same total: its id and the final difference to it are
    logged on the trial's run. Nothing for a trial that trained train.epochs (the first pair is both bases)."""
    import dataclasses

    from nr_study.names import DELTA_COMPUTE_METRIC, TAG_PAIR_RUN_COMPUTE
    from nr_study.sweep.pairs import train_pair

    total = int(summary["history"][-1].get("total_epochs", cfg.train.epochs))
    if total <= cfg.train.epochs or not isinstance(summary.get("final_test_err"), (int, float)):
        return {}
    longer = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, epochs=total))
    pair = train_pair(ctx, longer, client, basis="equal compute")
    delta = float(summary["final_test_err"]) - float(pair["history"][-1]["test_err"])
    client.set_tag(run_id, TAG_PAIR_RUN_COMPUTE, pair["run_id"])
    client.log_metric(run_id, DELTA_COMPUTE_METRIC, delta)
    return {DELTA_COMPUTE_METRIC: delta}


def _write_trial_config(work: Path, config: dict) -> None:
    """trials/<id>/config.json: which configuration this trial is (what a rebuild from the run folder reads)."""
    from nr_study.sweep.state import TRIAL_CONFIG

    path = work / TRIAL_CONFIG
    if path.is_file():
        return
    try:
        write_json_atomic(path, config, sort_keys=True, default=str)
    except OSError:  # a full disk: the checkpoint write right after says so; params.json is the fallback
        pass


def _status(client, run_id: str) -> Optional[str]:
    try:
        return client.get_run(run_id).info.status
    except Exception:
        return None
