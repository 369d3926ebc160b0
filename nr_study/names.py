"""Tracking names, in one place: MLflow tags, metric names, run statuses, the runs folder and the default store.

No torch and no MLflow here: the trainer, the sweep, the MLflow server helper and the analysis all import it
(docs/architecture.md, "Tracking names").
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

# Run statuses (MLflow's names).
FINISHED, FAILED, KILLED, RUNNING = "FINISHED", "FAILED", "KILLED", "RUNNING"

# The runs folder: <runs>/mlflow.db is the default store; the sweep's MLflow server keeps it there too.
RUNS_ENV = "NR_STUDY_RUNS"
DB_NAME = "mlflow.db"

# Tags every training run gets (tracking.run_tags), then the sweep's and the user's.
TAG_METHOD, TAG_ARCH, TAG_DATASET, TAG_SEED = "nr.method", "nr.arch", "nr.dataset", "nr.seed"
TAG_SCHEME, TAG_CONSTRAINT = "nr.scheme", "nr.constraint"  # "-" where they do not apply
TAG_TABLE, TAG_CELL = "nr.table", "nr.cell"  # where a run lands in nr_study/analysis/tables.py
TAG_SWEEP, TAG_TRIAL = "nr.sweep", "nr.trial"  # the sweep's name, the trial's id
TAG_NODE, TAG_GPUS = "nr.node", "nr.gpus"  # the Ray node a trial ran on, its GPU ids ("-": none)
TAG_CODE_VERSION, TAG_ERROR = "nr.code_version", "nr.error"
# A paired sweep (pair_with): "true" on a pair's own run (no trial, in no table); on a trial's run, its pair's id.
TAG_PAIRED_BASELINE, TAG_PAIR_RUN = "nr.paired_baseline", "nr.pair_run"
DELTA_METRIC = "delta_test_err"  # a paired trial's test_err − its pair's at the same epoch (points)
# Under reset_epochs (the paper's protocol) a trial trains more epochs than train.epochs: its second pair, BL for
# as many epochs as it trained (equal training compute), its id and the final difference to it.
TAG_PAIR_RUN_COMPUTE, DELTA_COMPUTE_METRIC = "nr.pair_run_compute", "delta_test_err_compute"
# The code a run ran: MLflow's own git tag (the UI shows it on the run page) and the versions of the stack.
TAG_GIT_COMMIT = "mlflow.source.git.commit"
VERSION_TAGS = {"torch": "nr.version.torch", "ray": "nr.version.ray", "mlflow": "nr.version.mlflow",
                "nr_study": "nr.version.nr_study"}
# MLflow 3 opens an experiment on its GenAI overview unless this tag says it holds model training runs.
TAG_EXPERIMENT_KIND, EXPERIMENT_KIND = "mlflow.experimentKind", "custom_model_development"
# Dataset inputs (mlflow.log_input): the context tag of the training and the test subset.
DATA_CONTEXT_TRAIN, DATA_CONTEXT_TEST = "training", "evaluation"
# MLflow's system metrics monitor (psutil; pynvml when installed): metrics "system/...", one sample per interval.
SYSTEM_METRICS_PREFIX, SYSTEM_METRICS_INTERVAL_S = "system/", 10.0
# The final model as an MLflow LoggedModel: its name, type and the payload file (nr_study.checkpoint format).
# Not named "model": MLflow 3 reads runs:/<run>/model as a logged model of that name, and the run's plain
# model/model.pt artifact (what NR-FS reads) lives at that path.
MODEL_NAME, MODEL_TYPE, MODEL_FILE, MODEL_META = "final_model", "nr_study", "model.pt", "model.json"
# Optuna sweeps keep their study in the sweep folder (one writer: the driver); `make dashboard` opens it.
OPTUNA_DB = "optuna.db"

# Per-epoch metrics (step = epoch, 1-based): the same names for every method (tests/test_methods.py).
EPOCH_METRICS = ("train_loss", "train_err", "lr", "epoch_time", "images_per_s", "test_err", "test_err5",
                 "util_params", "util_flops", "params", "flops", "lambda", "rejuvenations", "recycled", "dormant",
                 "total_epochs", "train_flops")
# Per epoch as well, by runs that train two classifiers (NR-CR with nr.cr_heads separate once it has rejuvenated,
# BL-2H): each head's test error; test_err is their sum's.
HEAD_METRICS = ("test_err_s", "test_err_r")
# Logged once at the end (no step).
SUMMARY_METRICS = ("final_test_err", "best_test_err", "final_params", "final_flops")
EPOCH_KEY = "test_err"  # the metric whose history says which epochs a run already has


def runs_dir(path: Optional[str | os.PathLike] = None) -> Path:
    """The runs folder: `path`, else $NR_STUDY_RUNS, else ./runs; absolute, `~` expanded. Creates nothing."""
    return Path(path or os.environ.get(RUNS_ENV) or "runs").expanduser().resolve()
