"""Reading the files a user hands us: configs, search spaces, architecture files, sweep state, SQLite stores.

One place turns a missing, unreadable, binary, empty or malformed file into one ConfigError line that names
the file and says what is allowed (exit 2), so no command ends in a UnicodeDecodeError or a silent default
run. No torch or MLflow import here: `nr_study.analysis` uses it too.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import yaml

from nr_study.errors import CheckpointError, ConfigError, DiskFullError, one_line

SQLITE_MAGIC = b"SQLite format 3\x00"


def read_text(path, what: str = "file", form: str = "text") -> str:
    """The file's text, decoded as UTF-8; anything else is one line naming the file. `form` says what the
    text should be ("text YAML")."""
    p = Path(path)
    if p.is_dir():
        raise ConfigError(f"{path}: is a folder; allowed: a {form} {what}")
    if not p.is_file():
        raise ConfigError(f"{path}: {what} not found")
    try:
        data = p.read_bytes()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the {what} ({exc.strerror or exc})") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 {form} (byte {data[exc.start]:#04x} at offset {exc.start}); "
                          f"allowed: a UTF-8 {form} {what}") from None


def read_yaml(path, what: str = "config file") -> dict:
    """A YAML file whose top level is a non-empty mapping. An empty file (or only comments) is refused: it is
    almost always a mistake, and reading it as "all defaults" would start a full-size run."""
    text = read_text(path, what, "text YAML")
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark is not None else str(path)
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"{where}: YAML syntax error: {problem}") from None
    except RecursionError:
        raise ConfigError(f"{path}: YAML nested too deeply to read; allowed: a {what} of at most "
                          f"{MAX_DEPTH} levels") from None
    except (ValueError, TypeError, AttributeError, OverflowError) as exc:
        # PyYAML's constructors raise these for a value they cannot build: `!!int x`, `!!float x`, `0x_`,
        # a 5000-digit integer (Python's str-to-int limit), a malformed `!!timestamp`
        raise ConfigError(f"{path}: YAML value cannot be read ({type(exc).__name__}: {one_line(exc, 160)}); "
                          f"allowed: plain YAML values") from None
    _check_tree(data, path, what)
    if data is None:
        raise ConfigError(f"{path}: empty {what} (only whitespace or comments); allowed: a YAML mapping of keys")
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping of keys, got {type(data).__name__}")
    if not data:
        raise ConfigError(f"{path}: empty {what} ({{}}); allowed: a YAML mapping of keys")
    return data


MAX_DEPTH = 100           # levels of nesting in a YAML file we read
MAX_NODES = 1_000_000     # values in it once its aliases are expanded


def _check_tree(data, path, what: str) -> None:
    """A document every later step can walk: no cycle (`a: &x [*x]`), at most MAX_DEPTH levels and MAX_NODES
    values with aliases expanded (a "billion laughs" file is a few lines). Sizes are memoised per object, so
    the check is linear in the file, not in its expansion."""
    seen: dict[int, tuple[int, int]] = {}  # id -> (values below and including it, levels below it)
    above: set[int] = set()

    def measure(node, depth: int) -> tuple[int, int]:
        if not isinstance(node, (dict, list, tuple, set)):
            return 1, 0
        key = id(node)
        if key in above:
            raise ConfigError(f"{path}: YAML refers to itself (an alias inside its own anchor); allowed: a {what} "
                              f"without cycles")
        if key not in seen:
            if depth >= MAX_DEPTH:
                raise ConfigError(f"{path}: YAML nested more than {MAX_DEPTH} levels; allowed: a {what} of at most "
                                  f"{MAX_DEPTH} levels")
            above.add(key)
            parts = [measure(c, depth + 1) for c in ([*node.keys(), *node.values()] if isinstance(node, dict)
                                                     else node)]
            above.discard(key)
            seen[key] = (1 + sum(n for n, _ in parts), 1 + max((h for _, h in parts), default=0))
        size, height = seen[key]
        if depth + height > MAX_DEPTH:
            raise ConfigError(f"{path}: YAML nested more than {MAX_DEPTH} levels; allowed: a {what} of at most "
                              f"{MAX_DEPTH} levels")
        return size, height

    if measure(data, 0)[0] > MAX_NODES:
        raise ConfigError(f"{path}: YAML expands to more than {MAX_NODES:,} values (through its aliases); allowed: "
                          f"a {what} of at most {MAX_NODES:,} values")


def read_json(path, what: str = "JSON file") -> Any:
    text = read_text(path, what, "text JSON")
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path}: not valid JSON (line {exc.lineno}: {exc.msg}); allowed: a {what}") from None


def read_torch(path, what: str = "torch file", hint: str = "") -> Any:
    """torch.load(weights_only=True): a pickle that would run code is refused like any garbage, in one line."""
    import torch

    p = Path(path)
    if not p.is_file():
        raise CheckpointError(f"{path}: {what} not found")
    try:
        return torch.load(p, map_location="cpu", weights_only=True)
    except Exception as exc:  # garbage, truncated, or a pickle that weights_only refuses
        raise CheckpointError(f"{path}: not a readable {what} ({type(exc).__name__}: {one_line(exc, 160)})"
                              + (f"; {hint}" if hint else "")) from None


def check_sqlite_store(uri: str) -> None:
    """A `sqlite:///` tracking URI naming an existing file must name an SQLite database; otherwise MLflow's
    'file is not a database' would surface as an internal error. A missing or empty file is a new store."""
    if not uri.startswith("sqlite:///"):
        return
    path = Path(uri[len("sqlite:///"):])
    if not path.is_file() or path.stat().st_size == 0:
        return
    try:
        with path.open("rb") as f:
            head = f.read(len(SQLITE_MAGIC))
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the MLflow database ({exc.strerror or exc})") from None
    if head != SQLITE_MAGIC:
        raise ConfigError(f"{path}: not an SQLite database; allowed: an MLflow database (mlflow.db) or a path "
                          f"where none exists yet")


# What a sweep needs free to go on writing: a trial's config and first checkpoint, Ray's state files, a few MLflow
# rows and artifacts (SQLite answers "database or disk is full" well before the last byte is taken).
SWEEP_FREE_BYTES = 16 << 20


def check_free_space(folder, need_bytes: int, what: str, needs: str = "the sweep needs",
                     error: type = DiskFullError, fix: str = "free some space or use another folder") -> None:
    """Refuse to start writing where too little space is left, with one line naming the folder and the free space
    (its nearest existing parent is measured when the folder is not made yet)."""
    folder = Path(folder)
    probe = next((p for p in (folder, *folder.parents) if p.exists()), folder)
    try:
        free = shutil.disk_usage(probe).free
    except OSError:
        return
    if free < need_bytes:
        raise error(f"{what} {folder}: disk full, only {free / 2**20:.1f} MiB free, {needs} about "
                    f"{need_bytes / 2**20:.1f} MiB; {fix}")


def check_writable_dir(path, what: str) -> Path:
    """Raise ConfigError unless `path` is a writable folder or can be created as one. Creates nothing;
    returns the nearest existing folder (for the free-space check)."""
    p = Path(path).absolute()
    probe = p
    while not probe.exists() and probe.parent != probe:
        probe = probe.parent
    if p.exists() and not p.is_dir():
        raise ConfigError(f"{what} {p}: exists but is not a folder")
    if not probe.is_dir():
        raise ConfigError(f"{what} {p}: cannot be created, {probe} is a file, not a folder")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise ConfigError(f"{what} {p}: {probe} is not writable (read-only file system or permissions)")
    return probe


def write_atomic(path, write) -> None:
    """`write(tmp)` fills a temp file beside `path`, which is then renamed over it: the file is whole or not
    there (a full disk or a kill mid-write leaves the previous file, never half of one). On any failure the temp
    file is removed, so nothing is left beside it."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass
        raise


def write_json_atomic(path, obj, **dumps_kw) -> None:
    """`obj` as JSON at `path`, whole or not at all (write_atomic)."""
    text = json.dumps(obj, **dumps_kw)
    write_atomic(path, lambda tmp: tmp.write_text(text))
