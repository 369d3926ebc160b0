"""The lock is what is installed: every dependency pyproject.toml names is pinned in requirements.lock, and the
environment running the tests holds exactly that version (make setup installs from the lock only)."""
from __future__ import annotations

import os
import re
import tomllib
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def lock_pins() -> dict[str, str]:
    pins = {}
    for line in (ROOT / "requirements.lock").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            m = re.fullmatch(r"([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;]+)", line)
            assert m, f"requirements.lock: {line!r} is not NAME==VERSION"
            pins[canonical(m.group(1))] = m.group(2)
    return pins


def test_lock_is_well_formed():
    assert "optuna" in lock_pins() and "torch" in lock_pins()


@pytest.mark.skipif(os.environ.get("NR_STUDY_UNLOCKED") == "1", reason="make test-latest: newest releases, not the lock")
def test_every_dependency_is_pinned_and_installed_at_its_pin():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    wanted = list(project["dependencies"]) + [d for ds in project["optional-dependencies"].values() for d in ds]
    pins = lock_pins()
    for spec in wanted:
        name = canonical(re.match(r"[A-Za-z0-9._-]+", spec).group(0))
        assert name in pins, f"{name} (pyproject.toml) is not in requirements.lock: run make lock"
    for name, pinned in pins.items():
        try:
            installed = version(name)
        except PackageNotFoundError:
            raise AssertionError(f"{name}=={pinned} is locked but not installed: run make setup") from None
        assert installed == pinned, f"{name}: {installed} installed, {pinned} locked (run make setup)"
