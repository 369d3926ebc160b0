"""What a researcher finds after a sweep: one tiny finished Optuna sweep (a real local Ray, a real `mlflow
server`), then its trial runs' system metrics, dataset inputs and logged models, the Optuna study in the sweep
folder (a resume continues it), and the MLflow UI itself in headless Chromium (Debian's package, driven over
the DevTools protocol): the runs table with the trial names, datasets, models and a metric column."""
from __future__ import annotations

import asyncio
import copy
import json
import shutil
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

from nr_study import names as N

pytestmark = pytest.mark.slow

BASE = {
    "method": "BL",
    "model": {"name": "vgg_small", "kwargs": {"width": 4}},
    "data": {"name": "synthetic", "n_train": 256, "n_test": 64, "synthetic": {"shape": [1, 16, 16], "noise": 0.5}},
    "train": {"epochs": 2, "batch_size": 16, "eval_batch_size": 64, "device": "cpu"},
    "optim": {"lr": 0.1},
}
DOC = {"name": "ui", "experiment": "test-ui", "base": BASE, "resources_per_trial": {"cpu": 1}, "max_concurrent": 2,
       "space": {"model.kwargs.width": {"choice": [4, 8]}, "optim.lr": {"loguniform": [0.01, 0.2]}},
       "search": {"type": "optuna", "objectives": [{"test_err": "min"}], "seed": 1}, "num_samples": 3}


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    """A finished 3-trial Optuna sweep logged to a real mlflow server, which stays up for the tests."""
    import ray
    from mlflow.tracking import MlflowClient

    from nr_study.mlflow_server import MlflowServer
    from nr_study.sweep.runner import run_sweep
    from nr_study.sweep.space import parse_search_space

    runs = tmp_path_factory.mktemp("ui_runs")
    server = MlflowServer.start(runs)
    try:
        ray.init(num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False)
        doc = copy.deepcopy(DOC)
        space = parse_search_space(doc, "ui.yaml")
        try:
            summary = run_sweep(space, source_text=yaml.safe_dump(doc), tracking_uri=server.url, runs=str(runs),
                                verbose=0)
        finally:
            ray.shutdown()
        client = MlflowClient(server.url)
        kids = client.search_runs([summary["experiment_id"]],
                                  filter_string=f"tags.mlflow.parentRunId = '{summary['parent_run_id']}'")
        assert len(kids) == 3 and all(k.info.status == "FINISHED" for k in kids)
        yield {"server": server, "summary": summary, "space": space, "client": client, "kids": kids}
    finally:
        server.stop()


def test_trial_runs_have_system_metrics_datasets_and_a_model(sweep):
    c = sweep["client"]
    exp = c.get_experiment(sweep["summary"]["experiment_id"])
    assert exp.tags[N.TAG_EXPERIMENT_KIND] == N.EXPERIMENT_KIND
    for r in sweep["kids"]:
        system = {k for k in r.data.metrics if k.startswith(N.SYSTEM_METRICS_PREFIX)}  # on by default in sweeps
        assert {"system/cpu_utilization_percentage", "system/system_memory_usage_megabytes"} <= system, system
        ctx = sorted({t.key: t.value for t in di.tags}["mlflow.data.context"] for di in r.inputs.dataset_inputs)
        assert ctx == sorted([N.DATA_CONTEXT_TRAIN, N.DATA_CONTEXT_TEST])
        assert len(r.outputs.model_outputs) == 1
        assert c.get_logged_model(r.outputs.model_outputs[0].model_id).source_run_id == r.info.run_id


def test_optuna_study_is_kept_in_the_sweep_folder_and_a_resume_continues_it(sweep):
    import optuna

    from nr_study.sweep.ray_setup import build_search_alg, optuna_storage

    sweep_dir = Path(sweep["summary"]["sweep_dir"])
    assert (sweep_dir / N.OPTUNA_DB).is_file()
    study = optuna.load_study(study_name=sweep["space"].name, storage=optuna_storage(sweep_dir))
    done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(done) == 3
    assert sorted(t.value for t in done) == pytest.approx(sorted(r.data.metrics["test_err"] for r in sweep["kids"]))
    # what Tuner.restore does on --resume: the searcher state Ray saved in the folder, then a new trial
    searcher = build_search_alg(sweep["space"], str(sweep_dir))
    searcher.restore_from_dir(str(sweep_dir))
    assert searcher.suggest("resumed") is not None
    again = optuna.load_study(study_name=sweep["space"].name, storage=optuna_storage(sweep_dir))
    assert [t.number for t in again.trials] == [0, 1, 2, 3]  # the same study, continued in the file


# ---------------------------------------------------------------------------------------------- the browser
EXPANDER = '[data-component-id$="runnamecellrenderer.tsx_46"]'  # MLflow 3.17.2: the +/- beside a parent run's name


async def _page_text(url: str, columns: list[str], timeout: float = 60.0) -> tuple[str, str]:
    """(title, innerText) of the MLflow UI at `url` in headless Chromium once its runs table has rendered, every
    parent row expanded, with `columns` added to the table as a user does with its Columns menu (MLflow keeps
    that choice in the browser's localStorage)."""
    import aiohttp

    from nr_study.mlflow_server import free_port

    port, profile = free_port(), tempfile.mkdtemp(prefix="nr_chromium_")
    proc = subprocess.Popen(["chromium", "--headless", "--no-sandbox", "--disable-gpu",
                             "--disable-background-networking", "--no-first-run", f"--user-data-dir={profile}",
                             f"--remote-debugging-port={port}", "--window-size=2400,1200", "about:blank"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        t0 = time.monotonic()
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=2) as resp:
                    tabs = [t for t in json.load(resp) if t["type"] == "page"]
                if tabs:
                    break
            except OSError:
                pass
            assert time.monotonic() - t0 < timeout and proc.poll() is None, "chromium did not start"
            await asyncio.sleep(0.2)
        async with aiohttp.ClientSession() as session, session.ws_connect(tabs[0]["webSocketDebuggerUrl"],
                                                                          max_msg_size=0) as ws:
            ids = iter(range(1, 10**6))

            async def js(expr: str):
                mid = next(ids)
                await ws.send_json({"id": mid, "method": "Runtime.evaluate",
                                    "params": {"expression": expr, "returnByValue": True}})
                while True:
                    msg = await ws.receive_json()
                    if msg.get("id") == mid:
                        return msg.get("result", {}).get("result", {}).get("value")

            async def rendered():
                t1 = time.monotonic()
                while not await js(f"!!document.querySelector('{EXPANDER}')"):
                    assert time.monotonic() - t1 < timeout, f"no runs table after {timeout} s: {await js('document.title')}"
                    await asyncio.sleep(0.3)

            mid = next(ids)
            await ws.send_json({"id": mid, "method": "Page.navigate", "params": {"url": url}})
            await rendered()
            await js("""(() => { const k = Object.keys(localStorage).find(k => k.endsWith('ReactComponentState'));
                const st = JSON.parse(localStorage.getItem(k));
                st.selectedColumns.push(...%s); localStorage.setItem(k, JSON.stringify(st)); location.reload(); })()"""
                     % json.dumps(columns))
            await asyncio.sleep(1.0)
            await rendered()
            await js(f"document.querySelectorAll('{EXPANDER}').forEach(b => b.click())")
            t1 = time.monotonic()
            while await js(f"document.querySelectorAll('{EXPANDER}').length") and time.monotonic() - t1 < timeout:
                text = await js("document.body.innerText")
                if text.count("final_model") >= 3:  # the three trial rows are there
                    break
                await asyncio.sleep(0.3)
            return await js("document.title"), await js("document.body.innerText")
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
        shutil.rmtree(profile, ignore_errors=True)


def test_mlflow_ui_shows_the_trials_in_headless_chromium(sweep):
    if shutil.which("chromium") is None:
        pytest.skip("Debian's chromium is not installed (make setup installs it where apt-get runs as root)")
    pytest.importorskip("aiohttp", reason="aiohttp (an MLflow dependency) speaks Chromium's DevTools protocol")
    from nr_study.mlflow_server import ui_url

    url = ui_url(sweep["server"].url, sweep["summary"]["experiment_id"])  # what `nr-study sweep` prints
    title, text = asyncio.run(_page_text(url, ["metrics.`test_err`"]))
    assert title.startswith("Runs - "), title  # the runs table, not the GenAI overview
    for absent in ("Token Usage", "Latency", "Tokens per Trace"):  # the GenAI overview's cards
        assert absent not in text
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    for r in sweep["kids"]:
        assert r.info.run_name in lines  # the trial rows, under the sweep's parent row
    assert "sweep:ui" in lines
    for header in ("Run Name", "Metrics", "test_err", "Dataset", "Models"):
        assert header in lines, header
    assert lines.count("final_model") == 3  # each trial's logged model in the Models column
    assert any(ln.startswith("synthetic (") for ln in lines)  # the dataset input with its digest
    for r in sweep["kids"]:  # the metric column's values (the UI rounds to 4 significant digits or fewer)
        v = r.data.metrics["test_err"]
        assert any(_close(ln, v) for ln in lines), (v, lines)


def _close(text: str, value: float) -> bool:
    try:
        return abs(float(text) - value) <= 1e-3 * max(1.0, abs(value))
    except ValueError:
        return False
