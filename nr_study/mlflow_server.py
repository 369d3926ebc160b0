"""Start and stop a local `mlflow server` backed by the run folder's SQLite file.

SQLite takes one writer, so trials never open the file themselves: a sweep starts one `mlflow server`
(one worker process) on 127.0.0.1 and every process logs over HTTP. A lock file beside the database keeps
two servers from ever writing the same file; the second one is refused with the first one's URL.

    with MlflowServer.start(runs_dir) as server:
        ...  # server.url is http://127.0.0.1:PORT, artifacts are proxied (--serve-artifacts)
"""
from __future__ import annotations

import fcntl
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Optional

from nr_study.errors import UserError
from nr_study.files import check_sqlite_store, check_writable_dir
from nr_study.names import DB_NAME
from nr_study.names import runs_dir as _runs_dir

ARTIFACTS_NAME = "mlartifacts"
LOCK_NAME = "mlflow.db.lock"
INFO_NAME = "mlflow_server.json"
LOG_NAME = "mlflow_server.log"


def runs_dir(path: str | os.PathLike | None = None) -> Path:
    """The run folder (nr_study.names.runs_dir: `path`, else $NR_STUDY_RUNS, else ./runs), created if missing;
    one that cannot be (a file there or above it, no write access) is refused with one line."""
    p = _runs_dir(path)
    check_writable_dir(p, "run folder (--runs / $NR_STUDY_RUNS)")
    p.mkdir(parents=True, exist_ok=True)
    return p


def ui_url(url: str, experiment_id: Optional[str] = None) -> str:
    """The MLflow UI page of an experiment (or the experiment list) in its model-training mode. MLflow 3.17.2
    picks the GenAI or the model-training sidebar by the `workflowType` URL parameter, else by the browser's
    last choice (GenAI in a fresh one, where an experiment opens on the GenAI overview even when tagged
    mlflow.experimentKind = custom_model_development, as nr_study tags them): with this parameter it opens on
    the runs table (tests/test_mlflow_ui.py checks it in headless Chromium)."""
    page = f"experiments/{experiment_id}" if experiment_id else "experiments"
    return f"{url.rstrip('/')}/#/{page}?workflowType=machine_learning"


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def is_healthy(url: str, timeout: float = 2.0) -> bool:
    try:
        with urllib.request.urlopen(url.rstrip("/") + "/health", timeout=timeout) as resp:
            return resp.status == 200
    except (urllib.error.URLError, OSError, ValueError):
        return False


class MlflowServer:
    """A running `mlflow server` child process that owns the run folder's SQLite file."""

    def __init__(self, proc: subprocess.Popen, url: str, folder: Path, lock_fd: int, log_path: Path,
                 cmd: Optional[list] = None, env: Optional[dict] = None):
        self.proc = proc
        self.url = url
        self.folder = folder
        self.log_path = log_path
        self._lock_fd = lock_fd
        self._cmd = cmd
        self._env = env
        self._supervisor: Optional["_Supervisor"] = None
        self.restarts = 0

    # -- lifecycle ---------------------------------------------------------------------------------
    @classmethod
    def start(cls, folder: str | os.PathLike | None = None, *, port: int | None = None,
              timeout: float = 180.0, quiet: bool = True) -> "MlflowServer":
        """Start the server on 127.0.0.1 and return once /health answers (never a blind sleep).

        `folder` is the run folder (default $NR_STUDY_RUNS or ./runs): the SQLite file is
        `folder/mlflow.db`, artifacts go to `folder/mlartifacts` through the server's artifact proxy.
        """
        folder = runs_dir(folder)
        check_sqlite_store(f"sqlite:///{folder / DB_NAME}")  # a garbage file: one line, not a server that dies
        lock_fd = os.open(folder / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(lock_fd)
            other = _read_info(folder)
            where = f" at {other['url']}" if other.get("url") else ""
            raise UserError(
                f"another MLflow server already owns {folder / DB_NAME}{where} (SQLite takes one writer): "
                f"pass --tracking-uri {other.get('url', 'http://127.0.0.1:PORT')} to share it, "
                f"or set NR_STUDY_RUNS to another folder")
        try:
            port = port or free_port()
            url = f"http://127.0.0.1:{port}"
            artifacts = folder / ARTIFACTS_NAME
            artifacts.mkdir(exist_ok=True)
            log_path = folder / LOG_NAME
            cmd = [
                str(Path(sys.executable).with_name("mlflow")) if Path(sys.executable).with_name("mlflow").exists()
                else "mlflow",
                "server",
                "--host", "127.0.0.1",
                "--port", str(port),
                "--workers", "1",  # one process writes the SQLite file
                "--backend-store-uri", f"sqlite:///{folder / DB_NAME}",
                "--serve-artifacts",
                "--artifacts-destination", str(artifacts),
            ]
            env = dict(os.environ)
            env.pop("MLFLOW_TRACKING_URI", None)
            # No job runner: it forks a dozen huey consumers (CPU at start-up) that touch the SQLite file too.
            env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = "false"
            proc = _spawn(cmd, env, folder, log_path)
        except BaseException:
            _unlock(lock_fd)
            raise
        server = cls(proc, url, folder, lock_fd, log_path, cmd=cmd, env=env)
        try:
            server._wait_healthy(timeout)
        except BaseException:
            server.stop()
            raise
        (folder / INFO_NAME).write_text(json.dumps({"url": url, "pid": proc.pid}))
        if not quiet:
            print(f"MLflow server {url} (backend {folder / DB_NAME}, log {log_path})", file=sys.stderr)
        return server

    def _wait_healthy(self, timeout: float, stop: Optional[threading.Event] = None) -> None:
        deadline = time.monotonic() + timeout
        delay = 0.2
        while time.monotonic() < deadline and not (stop is not None and stop.is_set()):
            if self.proc.poll() is not None:
                raise UserError(f"mlflow server exited with code {self.proc.returncode} before it was healthy; "
                                f"see {self.log_path}: {_tail(self.log_path)}")
            if is_healthy(self.url, timeout=2.0):
                return
            time.sleep(delay)
            delay = min(delay * 1.5, 1.0)
        raise UserError(f"mlflow server at {self.url} not healthy after {timeout:.0f}s; see {self.log_path}")

    # -- supervision ---------------------------------------------------------------------------------
    def supervise(self, out=None, interval: float = 1.0) -> "MlflowServer":
        """Watch the server from a thread and restart it when it dies (same SQLite file, artifact root and
        address): whoever started it owns it, so a killed server must not fail the trials that log to it.
        The thread also holds the restarted server's parent-death signal, so it lives until stop()."""
        if self._supervisor is None and self._cmd is not None:
            self._supervisor = _Supervisor(self, out, interval)
            self._supervisor.start()
        return self

    def wait_up(self, timeout: float = 180.0) -> bool:
        """Wait until the server answers /health (a supervised one may be restarting); False after timeout."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if is_healthy(self.url, timeout=2.0):
                return True
            time.sleep(0.5)
        return False

    def _restart(self, stop: threading.Event) -> None:
        """Start the server again on the same port, backend and artifact root (the lock stays held)."""
        _kill_group(self.proc.pid)  # uvicorn may outlive a killed `mlflow server` and hold the port
        port = int(self.url.rsplit(":", 1)[1])
        deadline = time.monotonic() + 60
        while not _port_free(port) and time.monotonic() < deadline and not stop.is_set():
            time.sleep(0.5)
        self.proc = _spawn(self._cmd, self._env, self.folder, self.log_path)
        self._wait_healthy(180.0, stop)
        self.restarts += 1
        try:
            (self.folder / INFO_NAME).write_text(json.dumps({"url": self.url, "pid": self.proc.pid}))
        except OSError:
            pass

    def stop(self, timeout: float = 20.0) -> None:
        """Stop the server (its whole process group) and release the SQLite lock. Idempotent."""
        if self._supervisor is not None:
            self._supervisor.halt()
            self._supervisor = None
        proc = self.proc
        if proc is not None and proc.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGTERM)  # the group this server leads (start_new_session)
            except ProcessLookupError:
                pass
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                proc.wait(5)
        if self._lock_fd is not None:
            try:
                (self.folder / INFO_NAME).unlink(missing_ok=True)
            except OSError:
                pass
            _unlock(self._lock_fd)
            self._lock_fd = None

    def __enter__(self) -> "MlflowServer":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


class _Supervisor(threading.Thread):
    def __init__(self, server: MlflowServer, out, interval: float):
        super().__init__(name="mlflow-server-supervisor", daemon=True)
        self.server = server
        self.out = out
        self.interval = interval
        self._stop_ev = threading.Event()
        self.lock = threading.Lock()

    def _say(self, msg: str) -> None:
        try:
            print(msg, file=self.out or sys.stderr, flush=True)
        except (OSError, ValueError):
            pass

    def run(self) -> None:
        failures = 0
        while not self._stop_ev.wait(self.interval):
            s = self.server
            code = s.proc.poll()
            if code is None:
                continue
            how = f"signal {-code}" if code < 0 else f"exit code {code}"
            self._say(f"MLflow server {s.url} (pid {s.proc.pid}) died ({how}); restarting it on the same address, "
                      f"backend {s.folder / DB_NAME} and artifact root; trials wait for it")
            t0 = time.monotonic()
            with self.lock:
                try:
                    s._restart(self._stop_ev)
                except Exception as exc:  # keep watching: the next round tries again
                    failures += 1
                    self._say(f"MLflow server restart failed ({exc}); see {s.log_path}")
                    if failures >= 5:
                        self._say("MLflow server: 5 restarts failed; giving up (the sweep's trials will fail; "
                                  "continue it later with --resume)")
                        return
                    continue
            if not self._stop_ev.is_set():
                failures = 0
                self._say(f"MLflow server {s.url} is back (pid {s.proc.pid}) after {time.monotonic() - t0:.1f} s")

    def halt(self) -> None:
        self._stop_ev.set()
        self.join(30)


def _spawn(cmd: list, env: dict, folder: Path, log_path: Path) -> subprocess.Popen:
    with open(log_path, "ab") as log:
        return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                                cwd=str(folder), preexec_fn=_new_session_dying_with_parent)


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _port_free(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
            return True
        except OSError:
            return False


def _new_session_dying_with_parent() -> None:
    """In the child before exec: lead a new process group (so stop() ends uvicorn too) and get SIGTERM when
    the process that started us dies, even by SIGKILL — a killed sweep leaves no server holding the file."""
    os.setsid()
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except Exception:  # not Linux: the sweep's finally/atexit still stops the server
        pass


def _unlock(fd: int) -> None:
    try:
        fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def _read_info(folder: Path) -> dict:
    try:
        return json.loads((folder / INFO_NAME).read_text())
    except (OSError, ValueError):
        return {}


def _tail(path: Path, n: int = 600) -> str:
    try:
        return path.read_text(errors="replace")[-n:].strip().replace("\n", " | ")
    except OSError:
        return ""


def experiment_link(folder, port: int, experiment: Optional[str]) -> str:
    """The link `make ui` serves for an experiment of the run folder: its runs table, where MLflow's URL keeps no
    expanded rows or columns, so the line says what to click."""
    experiment_id = None
    if experiment and (_runs_dir(folder) / DB_NAME).is_file():
        from nr_study.tracking import client_for
        from nr_study.tracking_uri import default_tracking_uri

        found = client_for(default_tracking_uri(folder)).get_experiment_by_name(experiment)
        experiment_id = found.experiment_id if found else None
    link = ui_url(f"http://127.0.0.1:{port}", experiment_id)
    if experiment_id is None:
        return link
    return (f"{link}  (click + beside a sweep:<name> row to list its trials; Columns adds test_err, "
            f"util_params, params)")


def main(argv=None) -> int:
    """`python -m nr_study.mlflow_server [--port 5000] [--runs DIR]`: serve the run folder (UI + REST API +
    artifacts) in the foreground until Ctrl-C — what `make ui` needs to show the sweeps' artifacts too."""
    import argparse

    ap = argparse.ArgumentParser(prog="python -m nr_study.mlflow_server")
    ap.add_argument("--port", type=int, default=5000)
    ap.add_argument("--runs", default=None, help="run folder (default: $NR_STUDY_RUNS or ./runs)")
    ap.add_argument("--experiment", default=None, help="the experiment whose runs page the link opens")
    ap.add_argument("--print-url", action="store_true", help="print the UI link (on --port) and exit")
    args = ap.parse_args(argv)
    if args.print_url:
        print(experiment_link(args.runs, args.port, args.experiment))
        return 0
    try:
        server = MlflowServer.start(args.runs, port=args.port, quiet=False)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"MLflow UI at {ui_url(server.url)} (Ctrl-C stops it)", file=sys.stderr)
    try:
        server.proc.wait()
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
