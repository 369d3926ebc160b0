"""Every command the README shows is run here (downsized where it would train for minutes) or by CI."""
from __future__ import annotations

import re
import shlex
import subprocess
from pathlib import Path

import pytest

from nr_study.cli import main

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
# the cluster recipe's lines need a cluster: tests/test_cluster_recipe.py runs them as written
CLUSTER_ONLY = ("ray start", "ray get-auth-token", "export RAY_AUTH", "mlflow server", "--address auto")


def blocks(lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", README, re.S)


def commands() -> list[str]:
    out = []
    for block in blocks("bash"):
        for line in block.splitlines():
            line = line.split("#")[0].strip()
            if line and not any(c in line for c in CLUSTER_ONLY):
                out.append(line)
    return out


def test_readme_shows_the_two_commands_first():
    first = blocks("bash")[0]
    assert "make demo" in first and "make test" in first


@pytest.mark.parametrize("line", [c for c in commands() if c.startswith("make")])
def test_make_targets_exist(line):
    target = shlex.split(line)[1]
    proc = subprocess.run(["make", "-n", target], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_nr_study_commands_run_in_order(tmp_path, monkeypatch):
    """In README order in one fresh folder: the training run fills runs/mlflow.db, tables and plots read it."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("NR_STUDY_RUNS", str(tmp_path / "runs"))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    lines = [c for c in commands() if c.startswith(".venv/bin/nr-study")]
    order = {"sweep": 0, "train": 1, "tables": 2, "plots": 2}
    lines.sort(key=lambda c: order[shlex.split(c)[1]])
    assert {shlex.split(c)[1] for c in lines} == set(order)
    for line in lines:
        argv = [str(ROOT / a) if (ROOT / a).exists() else a for a in shlex.split(line)[1:]]
        if argv[0] == "sweep":
            if "--resume" in argv:  # nothing to resume in a fresh folder: a clear error, not a traceback
                assert main(argv) == 2, line
                continue
            argv = [a for a in argv if a != "--dry-run"] + ["--dry-run"]  # real sweeps: tests/test_sweep*.py
        elif argv[0] == "train":  # the same command on a small subset, one epoch
            argv += ["--set", "train.epochs=1", "--set", "data.n_train=256", "--set", "data.n_test=128"]
        assert main(argv) == 0, line
    assert (tmp_path / "runs" / "report" / "index.html").is_file()


def test_library_snippet_runs():
    code = next(b for b in blocks("python") if "create_model" in b)
    exec(compile(code, "README.md", "exec"), {})
