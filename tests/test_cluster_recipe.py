"""The README's Ray cluster recipe, run as written: real `ray start` processes, a real `mlflow server`, the CLI.

The test reads the recipe's lines from README.md (section "On a Ray cluster with GPU workers") and runs them
in order, each long-running command as its own process in its own session (process group). The comments say
where a line runs: "on the head node" lines run in the head's shell (its own HOME, where Ray keeps its token),
"on each worker node" lines in the worker's shell (another HOME: no token unless the recipe passes it), so one
machine plays two hosts:

- `ray get-auth-token --generate` — its output is the token the worker's `export` line receives;
- `ray start --head --port=P` — the head node, on the IP Ray picks (HEAD_IP, read from its output), 1 CPU;
- `mlflow server ...` — the shared tracking server, from the head's folder (`$PWD/runs/mlflow.db`);
- `export ...` then `ray start --address=HEAD_IP:P` — a second node, on 127.0.0.2 when this machine lets a
  socket bind there (Linux routes all of 127.0.0.0/8 to loopback), else on 127.0.0.1, with 1 CPU and a custom
  resource `node_b` that tells it apart;
- `nr-study sweep SPACE --address auto --tracking-uri http://HEAD_IP:PORT` — the driver, a third process.

What the test adds to the README's lines, and why: `--block` (each `ray start` stays in the foreground, so the
test owns its process and group), free ports instead of 6379 / 5000 / Ray's fixed defaults, and per host its own
HOME and `RAY_TMPDIR` (other Ray instances may run on this machine; `--address auto` reads the address the
head's `ray start` left in its RAY_TMPDIR, so it finds *this* cluster), `--num-cpus=1` per node (two concurrent
trials must use both nodes), a small object store, and `--allowed-hosts HEAD_IP:PORT` only when HEAD_IP is not
a private address (as the README says). The search space is a tiny synthetic one written into tmp_path.

Asserted: the sweep exits 0; the parent run and one child run per trial are FINISHED; each epoch is logged
once; the trials' `nr.node` tags (the Ray node id a trial ran on, set by the runner) name both nodes. Teardown
ends exactly the processes the test started: SIGTERM to each group it created, a wait, SIGKILL to what is
left of those groups (and of their sessions and recorded descendants); then nothing it started is alive.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml

from nr_study.mlflow_server import free_port
from tests.procs import with_signals

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
SECTION = "### On a Ray cluster with GPU workers"


def _tool(name: str) -> str | None:
    p = BIN / name
    return str(p) if p.exists() else shutil.which(name)


RAY = _tool("ray")
MLFLOW = _tool("mlflow")
NR_STUDY = _tool("nr-study")
if RAY is None:
    pytest.skip("the `ray` CLI is not installed (pip install 'ray[tune]')", allow_module_level=True)

SPACE = {
    "name": "recipe",
    "experiment": "test-cluster-recipe",
    "base": {
        "method": "BL",
        "model": {"name": "vgg_small", "kwargs": {"width": 4}},
        "data": {"name": "synthetic", "n_train": 256, "n_test": 64,
                 "synthetic": {"shape": [1, 16, 16], "noise": 0.5}},
        "train": {"epochs": 2, "batch_size": 16, "eval_batch_size": 64, "device": "cpu"},
        "optim": {"lr": 0.1},
    },
    "space": {"optim.lr": [0.05, 0.06, 0.07, 0.08]},
    "max_concurrent": 2,
    "resources_per_trial": {"cpu": 1},
    "max_failures": 1,
}


# ------------------------------------------------------------------------------------------- the recipe
def readme_recipe() -> list[tuple[str, list[str]]]:
    """(host, argv) for each command line of the README's cluster recipe; host is 'head' or 'worker', from the
    last comment line before it ("on the head node ...", "on each worker node ...")."""
    text = (REPO / "README.md").read_text(encoding="utf-8")
    assert SECTION in text, f"README.md has no section {SECTION!r}"
    block = re.search(r"```bash\n(.*?)```", text[text.index(SECTION):], re.S)
    assert block, f"no ```bash block under {SECTION!r}"
    out, host = [], "head"
    for ln in block.group(1).splitlines():
        ln = ln.strip()
        if ln.startswith("#"):
            if re.search(r"\bworker node", ln):
                host = "worker"
            elif re.search(r"\bon the head\b", ln):
                host = "head"
            continue
        if ln:
            out.append((host, shlex.split(ln)))
    return out


def _private_or_loopback(ip: str) -> bool:
    import ipaddress

    try:
        a = ipaddress.ip_address(ip)
    except ValueError:
        return ip == "localhost"
    return a.is_loopback or any(a in ipaddress.ip_network(n) for n in ("10.0.0.0/8", "172.16.0.0/12",
                                                                            "192.168.0.0/16"))


def _second_loopback_ip() -> str:
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind(("127.0.0.2", 0))
        return "127.0.0.2"
    except OSError:  # e.g. macOS: only 127.0.0.1 is configured on lo0
        return "127.0.0.1"


def _set_flag(cmd: list[str], flag: str, value: str) -> list[str]:
    """`cmd` with `flag` set to `value` (`--flag=v` or `--flag v`), which the recipe line must already have."""
    out, i, seen = [], 0, False
    while i < len(cmd):
        a = cmd[i]
        if a == flag:
            out += [flag, value]
            i, seen = i + 2, True
            continue
        if a.startswith(flag + "="):
            out.append(f"{flag}={value}")
            seen = True
        else:
            out.append(a)
        i += 1
    assert seen, f"the README's line `{shlex.join(cmd)}` has no {flag}"
    return out


def _ray_node_flags() -> list[str]:
    """What the test adds to a `ray start` line: own the process, stay off other Ray instances' ports."""
    flags = ["--block", "--num-cpus=1",
             "--object-store-memory=100000000", "--disable-usage-stats",
             f"--dashboard-agent-listen-port={free_port()}", f"--dashboard-agent-grpc-port={free_port()}",
             f"--runtime-env-agent-port={free_port()}", f"--metrics-export-port={free_port()}"]
    return flags


# ------------------------------------------------------------------------------------------- processes
class Started:
    """The processes this test starts, each the leader of its own session and process group."""

    def __init__(self, logs: Path):
        self.logs = logs
        self.procs: dict[str, subprocess.Popen] = {}
        self.seen: dict[int, float] = {}  # pid -> create_time of every descendant seen

    def start(self, name: str, cmd: list[str], *, cwd: Path, env: dict) -> subprocess.Popen:
        log = open(self.logs / f"{name}.log", "w")
        proc = subprocess.Popen(with_signals(cmd), cwd=str(cwd), env=env, stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
        log.close()
        self.procs[name] = proc
        return proc

    def log(self, name: str, tail: int = 4000) -> str:
        text = (self.logs / f"{name}.log").read_text(errors="replace")
        return text[-tail:]

    def record(self) -> None:
        """Remember every live descendant of what we started (a child that left our groups is still ours)."""
        import psutil

        for proc in self.procs.values():
            with contextlib.suppress(psutil.Error):
                for c in psutil.Process(proc.pid).children(recursive=True):
                    with contextlib.suppress(psutil.Error):
                        self.seen[c.pid] = c.create_time()

    def ours_alive(self) -> list:
        """Live processes that are ours: in a session/group we created, or a recorded descendant."""
        import psutil

        leaders = {p.pid for p in self.procs.values()}
        alive = []
        for p in psutil.process_iter(["pid", "create_time", "status"]):
            with contextlib.suppress(psutil.Error, OSError):
                if p.info["status"] == psutil.STATUS_ZOMBIE:
                    continue
                pid = p.info["pid"]
                if (pid in leaders or os.getsid(pid) in leaders or os.getpgid(pid) in leaders
                        or self.seen.get(pid) == p.info["create_time"]):
                    alive.append(p)
        return alive

    def _group_alive(self, leader: int) -> bool:
        for p in self.ours_alive():
            with contextlib.suppress(OSError):
                if p.pid != leader and leader in (os.getsid(p.pid), os.getpgid(p.pid)):
                    return True
        return False

    def stop_all(self, timeout: float = 60.0) -> list:
        """Last started first: SIGTERM to the leader (a `ray start --block` drains its node and stops its own
        processes; the head goes after the worker, so the worker's drain still reaches the head), a wait, then
        SIGTERM to what is left of its group; finally SIGKILL to anything of ours still alive. Returns the
        survivors (none expected)."""
        import psutil

        self.record()
        for proc in reversed(list(self.procs.values())):
            for sig_group in (False, True):
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    (os.killpg if sig_group else os.kill)(proc.pid, signal.SIGTERM)
                deadline = time.monotonic() + (timeout if not sig_group else 15.0)
                while time.monotonic() < deadline:
                    proc.poll()  # reap the leader
                    if proc.returncode is not None and not self._group_alive(proc.pid):
                        break
                    time.sleep(0.3)
        for p in self.ours_alive():
            with contextlib.suppress(psutil.Error):
                p.kill()
        for proc in self.procs.values():
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=10)
        time.sleep(0.5)
        return [f"{p.pid} {' '.join(p.cmdline())[:120]}" for p in self.ours_alive()]


def _wait_for(pred, timeout: float, what: str, started: Started, watch: list[str]):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = pred()
        if v:
            return v
        for name in watch:
            rc = started.procs[name].poll()
            assert rc is None, f"{name} exited {rc} while waiting for {what}:\n{started.log(name)}"
        time.sleep(0.5)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}:\n" +
                         "\n".join(f"--- {n}\n{started.log(n)}" for n in watch))


def _mlflow_healthy(url: str) -> bool:
    import urllib.request

    try:
        with urllib.request.urlopen(url + "/health", timeout=2) as r:
            return r.status == 200
    except OSError:
        return False


PROBE = """
import json, sys, time
import ray
addr = sys.argv[1]
kw = {}
if addr.startswith("127."):  # a loopback head: stay on loopback, as nr_study's runner does
    import ray._private.ray_constants as c
    c.ENABLE_RAY_CLUSTER = False
    kw["_node_ip_address"] = "127.0.0.1"
# "auto" (the cluster `ray start` left in $RAY_TMPDIR), as the recipe's sweep: Ray reads the token
# (~/.ray/auth_token) only for an address it finds itself, not for an explicit one
ray.init(address="auto", log_to_driver=False, **kw)
deadline = time.monotonic() + float(sys.argv[2])
while True:
    nodes = [n for n in ray.nodes() if n["Alive"]]
    if len(nodes) >= 2 or time.monotonic() > deadline:
        break
    time.sleep(0.5)
print("NODES " + json.dumps({n["NodeID"]: {"ip": n["NodeManagerAddress"], "resources": n["Resources"]}
                               for n in nodes}))
ray.shutdown()
"""


# ------------------------------------------------------------------------------------------- the test
def test_readme_cluster_recipe_runs_as_written(tmp_path):
    from mlflow.tracking import MlflowClient

    recipe = readme_recipe()
    kinds = [_kind(argv) for _, argv in recipe]
    assert None not in kinds, f"the recipe has a line this test does not know how to run: {recipe}"
    for k in ("head", "mlflow", "worker", "sweep"):
        assert kinds.count(k) == 1, f"the recipe should have one `{k}` line: {recipe}"

    homes = {h: tmp_path / f"home_{h}" for h in ("head", "worker")}  # two hosts: each its own ~/.ray
    work = tmp_path / "head"  # the head's working folder: the recipe's `$PWD`
    for d in (*homes.values(), work):
        d.mkdir()
    ray_tmp = Path(tempfile.mkdtemp(prefix="nrc", dir="/tmp" if Path("/tmp").is_dir() else None))
    logs = tmp_path / "logs"
    logs.mkdir()
    base_env = {k: v for k, v in os.environ.items()
                if not k.startswith(("RAY_", "NR_STUDY_")) and k not in ("MLFLOW_TRACKING_URI",
                                                                         "MLFLOW_EXPERIMENT_NAME")}
    base_env["PATH"] = f"{BIN}{os.pathsep}{base_env.get('PATH', '')}"
    base_env["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "1"  # Linux's default; macOS refuses a second node without it
    # each host its own HOME (Ray's token) and temp folder (RAY_TMPDIR: where `ray start` leaves the address
    # that `--address auto` reads, and Ray's sessions) -- short: Ray's unix sockets must fit in ~107 bytes
    envs = {}
    for h in homes:
        (ray_tmp / h).mkdir()
        envs[h] = dict(base_env, HOME=str(homes[h]), PWD=str(work), RAY_TMPDIR=str(ray_tmp / h))
    gcs_port, mlflow_port = free_port(), free_port()
    node_b_ip = _second_loopback_ip()
    head_ip = None
    token = None
    started = Started(logs)
    survivors: list = []
    marks = [("start", time.monotonic())]  # phase times, printed (never asserted)

    def subst(argv: list[str]) -> list[str]:
        out = []
        for a in argv:
            a = a.replace("$PWD", str(work)).replace("HEAD_IP:6379", f"{head_ip}:{gcs_port}")
            a = a.replace("HEAD_IP:5000", f"{head_ip}:{mlflow_port}").replace("TOKEN_FROM_THE_HEAD", token or "")
            assert "HEAD_IP" not in a, f"HEAD_IP is used before the head started: {argv}"
            out.append(a)
        return out

    try:
        for (host, argv), kind in zip(recipe, kinds):
            env = envs[host]
            if kind == "token":
                assert host == "head", argv
                got = subprocess.run([RAY, *argv[1:]], env=env, cwd=str(work), capture_output=True, text=True,
                                     timeout=120)
                assert got.returncode == 0, f"{shlex.join(argv)} failed:\n{got.stdout}\n{got.stderr}"
                token = got.stdout.strip().splitlines()[-1].strip()
                assert token and (homes["head"] / ".ray" / "auth_token").is_file()
            elif kind == "export":
                for kv in argv[1:]:
                    k, _, v = kv.partition("=")
                    env[k] = subst([v])[0]
            elif kind == "head":
                cmd = [RAY, *_set_flag(argv, "--port", str(gcs_port))[1:], *_ray_node_flags(),
                       f"--dashboard-port={free_port()}"]
                started.start("ray_head", cmd, cwd=work, env=env)
                _wait_for(lambda: "Ray runtime started" in started.log("ray_head", 100_000), 240,
                          "the head node", started, ["ray_head"])
                m = re.search(r"Local node IP: (\S+)", started.log("ray_head", 100_000))
                assert m, started.log("ray_head")
                head_ip = m.group(1)
                marks.append(("head up", time.monotonic()))
            elif kind == "mlflow":
                cmd = _set_flag(subst(argv), "--port", str(mlflow_port))
                cmd[0] = MLFLOW or "mlflow"
                if not _private_or_loopback(head_ip):  # what the README says to add for such a HEAD_IP
                    cmd += ["--allowed-hosts", f"{head_ip}:{mlflow_port}"]
                started.start("mlflow_server", cmd, cwd=work, env=env)
            elif kind == "worker":
                cmd = [RAY, *subst(argv)[1:], *_ray_node_flags(), f"--node-ip-address={node_b_ip}",
                       '--resources={"node_b": 1}']
                started.start("ray_worker", cmd, cwd=work, env=env)
                _wait_for(lambda: "Ray runtime started" in started.log("ray_worker", 100_000), 240,
                          "the second node", started, ["ray_head", "ray_worker"])
                marks.append(("worker up", time.monotonic()))
            elif kind == "sweep":
                url = f"http://{head_ip}:{mlflow_port}"
                _wait_for(lambda: _mlflow_healthy(url), 240, f"mlflow server at {url}/health", started,
                          ["mlflow_server"])
                nodes = _probe_nodes(f"{head_ip}:{gcs_port}", env, work)
                node_b = [nid for nid, n in nodes.items() if "node_b" in n["resources"]]
                assert len(node_b) == 1 and nodes[node_b[0]]["ip"] == node_b_ip, nodes
                started.record()
                marks.append(("mlflow up, 2 nodes seen", time.monotonic()))
                space_file = work / "recipe.yaml"
                space_file.write_text(yaml.safe_dump(SPACE))
                cmd = subst(argv)
                cmd[0] = NR_STUDY or "nr-study"
                cmd[2] = str(space_file)
                assert cmd[cmd.index("--address") + 1] == "auto", cmd
                assert cmd[cmd.index("--tracking-uri") + 1] == url, cmd
                proc = started.start("sweep", cmd, cwd=work, env=env)
                deadline = time.monotonic() + 900  # a hang guard, not a speed limit
                while proc.poll() is None and time.monotonic() < deadline:
                    started.record()
                    time.sleep(1.0)
                if proc.poll() is None:
                    pytest.fail(f"the sweep did not end within 900 s:\n{started.log('sweep')}")
                marks.append(("sweep done", time.monotonic()))
                assert proc.returncode == 0, f"sweep exited {proc.returncode}:\n{started.log('sweep', 8000)}"

        # every trial one FINISHED run, each epoch once, trials on both nodes
        client = MlflowClient(tracking_uri=url)
        exp = client.get_experiment_by_name(SPACE["experiment"])
        assert exp is not None
        parents = client.search_runs([exp.experiment_id], filter_string="tags.`nr.role` = 'sweep'")
        assert len(parents) == 1 and parents[0].info.status == "FINISHED", parents
        kids = client.search_runs([exp.experiment_id],
                                  filter_string=f"tags.mlflow.parentRunId = '{parents[0].info.run_id}'")
        n_trials = len(SPACE["space"]["optim.lr"])
        assert len(kids) == n_trials, [r.info.run_name for r in kids]
        assert len({r.data.tags["nr.trial"] for r in kids}) == n_trials
        for r in kids:
            assert r.info.status == "FINISHED", (r.info.run_name, r.info.status)
            steps = sorted(int(m.step) for m in client.get_metric_history(r.info.run_id, "test_err"))
            assert steps == [1, 2], (r.info.run_name, steps)
        used = {r.data.tags.get("nr.node") for r in kids}
        assert used <= set(nodes), f"trials ran on nodes {used}, the cluster has {set(nodes)}"
        assert used == set(nodes), f"trials ran on {used} only; both nodes {set(nodes)} should have had trials"
    finally:
        survivors = started.stop_all()
        shutil.rmtree(ray_tmp, ignore_errors=True)
        marks.append(("teardown done", time.monotonic()))
        print("cluster recipe phases: " + ", ".join(f"{name} +{t - marks[0][1]:.1f} s" for name, t in marks[1:]))
    assert not survivors, f"processes this test started are still alive: {survivors}"


def _kind(argv: list[str]) -> str | None:
    if argv[:2] == ["ray", "get-auth-token"]:
        return "token"
    if argv[:1] == ["export"]:
        return "export"
    if argv[:3] == ["ray", "start", "--head"]:
        return "head"
    if argv[:2] == ["ray", "start"] and any(a.startswith("--address") for a in argv):
        return "worker"
    if argv[:2] == ["mlflow", "server"]:
        return "mlflow"
    if Path(argv[0]).name == "nr-study" and argv[1:2] == ["sweep"]:
        return "sweep"
    return None


def _probe_nodes(address: str, env: dict, cwd: Path) -> dict:
    """Both nodes registered (a short driver of our own asks the cluster), and their ids, IPs and resources."""
    probe = subprocess.run([sys.executable, "-c", PROBE, address, "180"], env=env,
                           cwd=str(cwd), capture_output=True, text=True, timeout=300)
    m = re.search(r"^NODES (.*)$", probe.stdout, re.M)
    assert probe.returncode == 0 and m, f"node probe failed:\n{probe.stdout[-3000:]}\n{probe.stderr[-3000:]}"
    nodes = json.loads(m.group(1))
    assert len(nodes) == 2, f"expected 2 live nodes, got {nodes}"
    return nodes
