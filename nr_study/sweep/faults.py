"""Faults of the machine under a sweep (a full disk, a read-only or failing drive), named as such in one line:
checked before a trial or the driver writes, and recognised behind the errors Ray and MLflow raise."""
from __future__ import annotations

import errno
import shutil
from pathlib import Path
from typing import Optional

from nr_study.errors import FaultError


def local_store_dir(tracking_uri: Optional[str], runs_folder: Path) -> Optional[str]:
    """Where the tracking store lives on this machine: the run folder for the sweep's own server, else the
    store's own folder (tracking_uri.local_store_dir); None for a server elsewhere (its disk is not ours to measure)."""
    from nr_study.tracking_uri import local_store_dir as store_of

    store = store_of(tracking_uri) if tracking_uri else runs_folder
    return str(store) if store is not None else None


def check_disk(sweep_dir, store_dir: Optional[str], what: str = "sweep folder") -> None:
    """Stop at once, naming the folder, when the sweep folder or the tracking store has too little space left: a
    full SQLite store makes the server answer 503, which MLflow's client retries for minutes as if the server were
    overloaded."""
    from nr_study.files import SWEEP_FREE_BYTES, check_free_space

    check_free_space(Path(sweep_dir), SWEEP_FREE_BYTES, what, fix="free some space")
    if store_dir:
        check_free_space(Path(store_dir), SWEEP_FREE_BYTES, "tracking store folder", fix="free some space")


def store_full(store_dir: Optional[str]) -> bool:
    """The tracking store's disk has too little room: every MLflow write would be retried for minutes, then fail."""
    from nr_study.files import SWEEP_FREE_BYTES

    try:
        return store_dir is not None and shutil.disk_usage(store_dir).free < SWEEP_FREE_BYTES
    except OSError:
        return False


def full_disk(sweep_dir, store_dir: Optional[str]) -> Optional[str]:
    """check_disk's line, or None when there is room."""
    from nr_study.errors import DiskFullError

    try:
        check_disk(sweep_dir, store_dir)
    except DiskFullError as exc:
        return str(exc)
    return None


def _os_error(exc: BaseException) -> Optional[OSError]:
    seen = set()
    stack = [exc]
    while stack:
        e = stack.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno is not None:
            return e
        stack += [e.__cause__, e.__context__]
    return None


_MACHINE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EIO)


def machine_fault(exc: BaseException) -> Optional[str]:
    """An OSError of the machine (full disk, quota, read-only or failing drive) behind `exc`, as one line."""
    os_err = _os_error(exc)
    if os_err is None or os_err.errno not in _MACHINE_ERRNOS:
        return None
    where = f" ({os_err.filename})" if getattr(os_err, "filename", None) else ""
    return f"{os_err.strerror or os_err}{where}, errno {errno.errorcode.get(os_err.errno, os_err.errno)}"


def driver_fault(exc: BaseException, resume_cmd: str) -> Optional[FaultError]:
    """A fault of the machine under the sweep driver (full disk, lost folder, cut-short Ray file) as one line
    (exit 1) with the command that continues the sweep; None for anything else (a bug: the CLI says so)."""
    import pickle

    fault = machine_fault(exc)
    if fault is not None:
        return FaultError(f"sweep stopped: {fault}; the trials' checkpoints are kept: fix it (free space), then "
                          f"continue it with: {resume_cmd}")
    if isinstance(exc, (pickle.UnpicklingError, EOFError)):
        return FaultError(f"sweep stopped: a file Ray wrote cannot be read ({type(exc).__name__}: "
                          f"{str(exc)[:120]}; a full disk cuts files short); continue it with: {resume_cmd}")
    return None
