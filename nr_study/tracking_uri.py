"""Where runs are tracked: the one home of the tracking URI — which schemes MLflow can use, the default store (the
runs folder's SQLite file), how a URI is chosen (flag, config, $MLFLOW_TRACKING_URI, default), and the checks each
use needs: any usable store to write a run, an existing store to read tables from, a server for a sweep (its
trials write at once). Imports neither MLflow nor torch: the config and the analysis use it too."""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Optional
from urllib.parse import urlparse

from nr_study.errors import ConfigError
from nr_study.files import check_sqlite_store
from nr_study.names import DB_NAME, runs_dir

SCHEMES = ("", "file", "sqlite", "http", "https", "postgresql", "mysql", "mssql", "databricks")
ALLOWED = "a path or a URI whose scheme is one of " + ", ".join(s for s in SCHEMES if s)


def scheme_ok(uri: Optional[str]) -> bool:
    """A path or a URI MLflow has a store for (None: unset, fine). MLflow fails deep in its client on others."""
    if uri is None:
        return True
    try:
        return bool(uri.strip()) and urlparse(uri).scheme in SCHEMES
    except ValueError:  # a broken IPv6 host in brackets
        return False


def check_scheme(uri: str, source: str) -> str:
    if not scheme_ok(uri):
        raise ConfigError(f"{source} {uri}: not a tracking store MLflow can use; allowed: {ALLOWED}")
    return uri


def default_tracking_uri(folder: Optional[str | os.PathLike] = None, create: bool = False) -> str:
    """sqlite:///<runs folder>/mlflow.db (the folder: `folder`, else $NR_STUDY_RUNS, else ./runs); `create`
    makes the folder, refusing one that cannot be made with one line."""
    d = runs_dir(folder)
    if create:
        try:
            d.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfigError(f"runs folder {d}: cannot create it ({exc.strerror or exc}); set $NR_STUDY_RUNS "
                              f"to a writable folder or pass --tracking-uri") from None
    return f"sqlite:///{d / DB_NAME}"


def resolve_tracking_uri(uri: Optional[str] = None, cfg_uri: Optional[str] = None, create: bool = True) -> str:
    """The URI to use: the flag, the config's tracking.uri, $MLFLOW_TRACKING_URI, else the runs folder's store
    (made unless `create` is False: a preflight or a reader); the scheme checked, naming where it came from."""
    for value, source in ((uri, "--tracking-uri"), (cfg_uri, "tracking.uri"),
                          (os.environ.get("MLFLOW_TRACKING_URI"), "$MLFLOW_TRACKING_URI")):
        if value:
            return check_scheme(value, source)
    return default_tracking_uri(create=create)


def local_store_dir(uri: str) -> Optional[Path]:
    """The folder a local store writes into (sqlite DB's folder, file store root), None for a server."""
    if uri.startswith("sqlite:///"):
        return Path(uri[len("sqlite:///"):]).parent
    if uri.startswith("file:"):
        return Path(urlparse(uri).path)
    if "://" not in uri:
        return Path(uri)
    return None


def check_readable_store(uri: str) -> str:
    """For reading runs (tables, plots): a sqlite or file store must exist (MLflow would silently create an empty
    one), a server must answer (MLflow's client retries for minutes against a dead one)."""
    check_scheme(uri, "--tracking-uri")
    if uri.startswith("sqlite:///"):
        path = Path(uri[len("sqlite:///"):])
        if not path.is_file():
            raise ConfigError(f"--tracking-uri: no MLflow database at {path} (run a sweep first, or pass --tracking-uri)")
        check_sqlite_store(uri)
    elif uri.startswith(("http://", "https://")):
        import urllib.error
        import urllib.request

        try:
            urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=5).close()
        except urllib.error.HTTPError:
            pass  # something answers (auth, proxy, no /health): let MLflow speak for itself
        except (urllib.error.URLError, OSError) as exc:
            raise ConfigError(f"--tracking-uri: no MLflow server answers at {uri} ({getattr(exc, 'reason', exc)})") from None
    elif uri.startswith("file:") or "://" not in uri:
        path = Path(uri[len("file://"):] if uri.startswith("file://") else uri.removeprefix("file:"))
        if not path.is_dir():
            raise ConfigError(f"--tracking-uri: no MLflow file store at {path}")
    return uri


def check_sweep_server(uri: str) -> str:
    """A sweep's --tracking-uri: a server (trials log concurrently; SQLite takes one writer)."""
    if uri.startswith("sqlite:"):
        raise ConfigError(f"--tracking-uri {uri}: SQLite takes one writer and trials log concurrently; omit "
                          "--tracking-uri (a local mlflow server is started on the run folder's SQLite file) or "
                          "pass an http:// server")
    if not re.match(r"https?://[^/\s]+", uri):
        raise ConfigError(f"--tracking-uri {uri}: not an MLflow server address; allowed: http://host:port or "
                          f"https://host[:port], or omit it (a local mlflow server is started)")
    return uri
