"""Every temp-then-rename write (JSON state, checkpoints) leaves the previous file whole and nothing beside it
when it fails: on a real filesystem that fills up mid-write, and on an interrupt (Ctrl-C) mid-write."""
from __future__ import annotations

import json
import random

import pytest
import torch

from nr_study.checkpoint import atomic_save
from nr_study.errors import CheckpointWriteError
from nr_study.files import write_atomic, write_json_atomic
from tests.disks import fill, small_fs

WRITERS = {
    "json": (lambda path, n: write_json_atomic(path, {"x": "y" * n}), (OSError,)),
    "checkpoint": (lambda path, n: atomic_save({"w": torch.zeros(n // 4)}, path), (CheckpointWriteError,)),
}


def _previous(path):
    return path.read_bytes() if path.is_file() else None


@pytest.mark.parametrize("kind", list(WRITERS))
def test_a_full_disk_leaves_the_previous_file_and_no_temp_file(kind, tmp_path):
    write, errors = WRITERS[kind]
    rng = random.Random(kind)
    with small_fs(tmp_path / "disk", 4) as disk:
        target = disk / "state.json"
        write(target, 1000)
        before = _previous(target)
        filler = fill(disk, leave=rng.randint(0, 200_000))  # the next write runs out somewhere in the middle
        for n in (300_000, 1_000_000, 3_000_000):
            with pytest.raises(errors):
                write(target, n)
            assert sorted(p.name for p in disk.iterdir()) == ["filler", "state.json"]
            assert _previous(target) == before
        filler.unlink()
        write(target, 2000)  # space again: the write goes through
        assert sorted(p.name for p in disk.iterdir()) == ["state.json"] and _previous(target) != before


@pytest.mark.parametrize("when", ["during", "after"])
def test_an_interrupt_mid_write_leaves_no_temp_file(when, tmp_path):
    target = tmp_path / "state.json"
    write_json_atomic(target, {"v": 1})

    def interrupted(tmp):
        tmp.write_text('{"v": 2')
        if when == "during":
            raise KeyboardInterrupt
        tmp.write_text('{"v": 2}')
        raise OSError(28, "No space left on device")

    with pytest.raises((KeyboardInterrupt, OSError)):
        write_atomic(target, interrupted)
    assert [p.name for p in tmp_path.iterdir()] == ["state.json"]
    assert json.loads(target.read_text()) == {"v": 1}
