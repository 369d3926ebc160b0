"""A small real filesystem for disk-full tests: a tmpfs of a few MiB (root and a working `mount` needed, else
the test is skipped), and a filler that takes its last byte."""
from __future__ import annotations

import contextlib
import os
import subprocess
from pathlib import Path

import pytest


@contextlib.contextmanager
def small_fs(path: Path, mb: int):
    """A tmpfs of `mb` MiB at `path`, unmounted on exit."""
    if os.geteuid() != 0:
        pytest.skip("a small filesystem needs root (mount -t tmpfs)")
    path.mkdir(parents=True, exist_ok=True)
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={mb}m", "tmpfs", str(path)], capture_output=True,
                       text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


def fill(path: Path, leave: int = 0) -> Path:
    """Fill the filesystem at `path` from outside the code under test, leaving about `leave` bytes."""
    filler = path / "filler"
    chunk = b"\1" * (1 << 16)
    try:
        with open(filler, "wb") as f:
            while True:
                f.write(chunk)
                f.flush()
    except OSError:
        pass
    if leave:
        with open(filler, "r+b") as f:
            f.truncate(max(0, filler.stat().st_size - leave))
    return filler
