"""The sweep's MLflow runs: find, reopen and clear a trial's run (trials and paired baselines share these),
wait out a tracking server that is down, and the parent run's lifecycle (start, close every child at the end)."""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

from nr_study.errors import UserError
from nr_study.names import FAILED, FINISHED, KILLED, RUNNING
from nr_study.sweep.space import SearchSpace, dump_document
from nr_study.sweep.summary import count_finished

if TYPE_CHECKING:
    from nr_study.sweep.trial import TrialContext


def find_child(client, ctx: TrialContext, trial_id: str) -> Optional[str]:
    from nr_study.tracking import tracking_error

    try:
        runs = client.search_runs(
            [ctx.experiment_id],
            filter_string=f"tags.mlflow.parentRunId = '{ctx.parent_run_id}' and tags.`nr.trial` = '{trial_id}'",
            max_results=5)
    except Exception as exc:  # the trainer's one-line TrackingError, not a raw MlflowException
        raise tracking_error(ctx.tracking_uri, f"finding trial {trial_id}'s run", exc) from exc
    return runs[0].info.run_id if runs else None


def own_run(client, ctx: TrialContext, trial_id: str, local: Optional[dict], cfg, tags: dict) -> str:
    """The MLflow run a trial (or a paired baseline) trains into: the one its checkpoint names, else the one an
    earlier attempt opened under the parent (a retry, a resumed sweep: its tracking-outage error tag dropped, it
    continues), else a new child run — opened before training, so a retry before any checkpoint finds it."""
    from nr_study.tracking import open_run

    run_id = (local or {}).get("run_id") or find_child(client, ctx, trial_id)
    if run_id is not None:
        clear_tracking_error(client, run_id)
        return run_id
    return open_run(ctx.tracking_uri, cfg, tags=tags, parent_run_id=ctx.parent_run_id).run_id


def server_answers(uri: str, timeout: float = 3.0) -> bool:
    """The tracking server answers HTTP at all (its /health, or any reply below 500 from a proxy in front)."""
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout) as resp:
            return resp.status < 500
    except urllib.error.HTTPError as exc:
        return exc.code < 500
    except (urllib.error.URLError, OSError, ValueError):
        return False


def tracking_wait_s() -> float:
    try:
        return max(0.0, float(os.environ.get("NR_STUDY_TRACKING_WAIT_S", "300")))
    except ValueError:
        return 300.0


def wait_for_tracking(uri: str, who: str, exc: BaseException, budget: Optional[float] = None,
                       poll: float = 2.0) -> bool:
    """After a tracking failure: True when the server was (or is) down and answers again within `budget`
    seconds ($NR_STUDY_TRACKING_WAIT_S, default 300) — retry then; False for an error the server itself gave
    (it answers) or when it stays down (the caller fails as before). One line when it starts waiting, one when
    the server is back or the wait ends."""
    if not uri.startswith(("http://", "https://")):
        return False
    unreachable = "unreachable" in str(exc)
    if server_answers(uri):
        return unreachable  # it was down and is back already; any other error is the server's own answer
    budget = tracking_wait_s() if budget is None else budget
    t0 = time.monotonic()
    print(f"{who}: tracking server {uri} is not answering; waiting up to {budget:.0f} s for it "
          f"(NR_STUDY_TRACKING_WAIT_S) instead of failing; the checkpoint is kept", file=sys.stderr, flush=True)
    while time.monotonic() - t0 < budget:
        time.sleep(poll)
        if server_answers(uri):
            print(f"{who}: tracking server {uri} answers again after {time.monotonic() - t0:.0f} s; continuing",
                  file=sys.stderr, flush=True)
            return True
    print(f"{who}: tracking server {uri} still not answering after {budget:.0f} s; giving up", file=sys.stderr,
          flush=True)
    return False


def clear_tracking_error(client, run_id: str) -> None:
    """A run ended FAILED by a tracking outage the trial then waited out: drop that nr.error tag."""
    try:
        if client.get_run(run_id).data.tags.get("nr.error", "").startswith("TrackingError"):
            client.delete_tag(run_id, "nr.error")
    except Exception:
        pass


def tcall(uri: str, what: str, fn, *args, **kwargs):
    """A driver MLflow call: a failure is the trainer's one-line TrackingError (exit 1), not a raw exception."""
    from nr_study.tracking import tracking_error

    try:
        return fn(*args, **kwargs)
    except UserError:
        raise
    except Exception as exc:
        raise tracking_error(uri, what, exc) from exc


def ensure_tracking(uri: str, server) -> None:
    """Before the driver's own MLflow calls: the sweep's server may be restarting, a user's may be down."""
    if server is not None:
        server.wait_up(180.0)
    elif uri.startswith(("http://", "https://")) and not server_answers(uri):
        wait_for_tracking(uri, "sweep", Exception("unreachable"), budget=min(120.0, tracking_wait_s()))


def _param_items(space: SearchSpace) -> dict:
    from nr_study.config import flatten

    p: dict[str, Any] = {"sweep.name": space.name, "sweep.search": space.search,
                         "sweep.pair_with": space.pair_with or "-", "sweep.reuse_actors": space.reuse_actors,
                         "sweep.scheduler": space.scheduler["type"], "sweep.num_samples": space.num_samples,
                         "sweep.num_trials": space.num_trials, "sweep.repeat": space.repeat,
                         "sweep.max_concurrent": space.max_concurrent, "sweep.max_failures": space.max_failures,
                         "sweep.cpu": space.cpu, "sweep.gpu": space.gpu,
                         "sweep.objectives": ",".join(f"{m}:{md}" for m, md in space.objectives)}
    if space.sampler:
        p["sweep.sampler"] = space.sampler
    for d in space.dims:
        p[f"space.{d.key}"] = d.describe()
    for k, v in flatten(space.base).items():
        p[f"base.{k}"] = json.dumps(v) if isinstance(v, (list, dict)) else v
    return p


def start_parent(client, uri: str, space: SearchSpace, experiment_id: str, sweep_dir: Path,
                 source_text: str) -> str:
    from nr_study.tracking import RunTracker, version_tags

    tags = {"nr.sweep": space.name, "nr.sweep_dir": str(sweep_dir), **version_tags(), "nr.role": "sweep"}
    for k, v in space.tags.items():
        if k != "cell":
            tags[k if k.startswith("nr.") else f"nr.{k}"] = str(v)
    run = client.create_run(experiment_id, tags={**tags, "mlflow.runName": f"sweep:{space.name}"},
                            run_name=f"sweep:{space.name}")
    run_id = run.info.run_id
    tracker = RunTracker(uri, space.experiment, run_id=run_id)
    tracker.log_params(_param_items(space))
    client.log_text(run_id, source_text, f"search_space/{Path(space.path).name or 'search_space.yaml'}")
    client.log_text(run_id, dump_document(space.document), "search_space/resolved.yaml")
    return run_id


def _stopped_by_ray(run) -> bool:
    """The trainer ended this run FAILED only because Ray stopped the trial (SystemExit from report())."""
    return run.info.status == FAILED and run.data.tags.get("nr.error", "").startswith("SystemExit")


def finalize(client, space: SearchSpace, experiment_id: str, parent_run_id: str, trials: Optional[list],
             error: Optional[BaseException], causes: Optional[dict] = None,
             aliases: Optional[dict] = None) -> dict:
    """Close every child the sweep left open and the parent; returns counts by final status.

    `trials` are Ray's trials as last saved in the experiment state (taken before Ray's own cleanup, which
    marks interrupted trials TERMINATED): TERMINATED without final metrics = stopped early by the scheduler
    (FINISHED, tag nr.early_stopped), ERROR = FAILED, anything else = interrupted (KILLED; --resume continues it).
    """
    if aliases:  # a rebuilt sweep: Ray's new trials continue the runs of the trials their configurations ran as
        from nr_study.sweep.state import config_key

        by_trial = {aliases.get(config_key(t.config or {}), t.trial_id): t for t in trials or []}
    else:
        by_trial = {t.trial_id: t for t in trials or []}
    counts: dict[str, int] = {}
    children = client.search_runs([experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent_run_id}'",
                                  max_results=10000)
    for run in children:
        rid, status = run.info.run_id, run.info.status
        t = by_trial.get(run.data.tags.get("nr.trial"))
        tstatus = t.status if t is not None else None
        if causes is not None and tstatus == "ERROR" and run.data.tags.get("nr.error"):
            causes[run.data.tags["nr.trial"]] = run.data.tags["nr.error"]  # the trainer's one line
        new = None
        if tstatus == "TERMINATED":
            # The trainer logs final_test_err at its end only: without it the scheduler stopped the trial, whatever
            # its epoch count says (under reset_epochs a trial trains past train.epochs).
            if "final_test_err" not in run.data.metrics:
                client.set_tag(rid, "nr.early_stopped", "true")
                if status != FINISHED:
                    new = FINISHED
            elif status == RUNNING:
                new = FINISHED
        elif tstatus == "ERROR":
            if status == RUNNING:
                new = FAILED
        elif status == RUNNING or _stopped_by_ray(run):
            new = KILLED
        if new is not None:
            if _stopped_by_ray(run):
                try:
                    client.delete_tag(rid, "nr.error")
                except Exception:
                    pass
            client.set_terminated(rid, new)
            status = new
        if os.environ.get("NR_SWEEP_DEBUG"):
            print(f"finalize {rid} trial={run.data.tags.get('nr.trial')} tstatus={tstatus} was={run.info.status} "
                  f"now={status} err={run.data.tags.get('nr.error')!r}", file=sys.stderr)
        counts[status] = counts.get(status, 0) + 1
    unfinished = trials is None or any(t.status not in ("TERMINATED", "ERROR") for t in trials)
    errored = any(t.status == "ERROR" for t in (trials or []))
    missing = max(0, space.num_trials - count_finished(trials))  # never ran, errored, or still open
    if isinstance(error, KeyboardInterrupt) or unfinished:
        parent_status = KILLED
    elif error is not None or errored or missing:
        parent_status = FAILED
    else:
        parent_status = FINISHED
    if parent_status != FINISHED and missing:
        client.set_tag(parent_run_id, "nr.unfinished", f"{missing} of {space.num_trials} configurations")
    elif parent_status == FINISHED:
        try:
            client.delete_tag(parent_run_id, "nr.unfinished")
        except Exception:
            pass
    client.set_terminated(parent_run_id, parent_status)
    counts["parent"] = parent_status
    return counts
