"""nr-study tables / plots over a real (temporary, sqlite) MLflow store filled with known values.

One store per test session (MLflow's sqlite schema setup costs a few seconds); each value below is chosen so
the expected table cells can be written down exactly.
"""
from __future__ import annotations

import csv
import json
import math
import time

import pytest

mlflow = pytest.importorskip("mlflow")
from mlflow.entities import Metric, Param  # noqa: E402
from mlflow.tracking import MlflowClient  # noqa: E402

from nr_study.analysis import plots as P  # noqa: E402
from nr_study.analysis import tradeoff_plots as TP  # noqa: E402
from nr_study.analysis.formats import to_csv, to_html, to_latex, to_markdown  # noqa: E402
from nr_study.analysis.report import write_index  # noqa: E402
from nr_study.analysis.runs import RunStore  # noqa: E402
from nr_study.analysis.stats import pareto_mask  # noqa: E402
from nr_study.analysis.tables import build_tables, write_tables  # noqa: E402
from nr_study.cli import main as cli  # noqa: E402

EXP = "nr_test"
OTHER = "nr_other"


try:  # log the way the trainer does when its tracking helpers are there
    from nr_study.tracking import RunTracker
except ImportError:  # pragma: no cover
    RunTracker = None


def _log(client, exp_id, *, tags, params=None, hist=None, summary=None, status="FINISHED", parent=None):
    """One run: tags, params, per-epoch histories {key: [v_epoch1, v_epoch2, ...]} (step = epoch, 1-based),
    summary metrics; through nr_study.tracking.RunTracker when it exists, else the raw MlflowClient."""
    if RunTracker is not None:
        t = RunTracker(client.tracking_uri, client.get_experiment(exp_id).name, tags=tags, parent_run_id=parent)
        t.start()
        if params:
            t.log_params(params)
        epochs = max((len(v) for v in (hist or {}).values()), default=0)
        for ep in range(epochs):
            t.log_epoch(ep + 1, {k: v[ep] for k, v in hist.items() if ep < len(v)})
        if summary:
            t.log_summary(summary)
        t.end(status)
        return t.run_id
    tags = dict(tags)
    if parent:
        tags["mlflow.parentRunId"] = parent
    run = client.create_run(exp_id, tags=tags)
    rid = run.info.run_id
    now = int(time.time() * 1000)
    metrics = [Metric(k, float(v), now + i, i + 1) for k, vals in (hist or {}).items() for i, v in enumerate(vals)]
    metrics += [Metric(k, float(v), now, 0) for k, v in (summary or {}).items()]
    for i in range(0, max(len(metrics), 1), 900):
        client.log_batch(rid, metrics=metrics[i:i + 900],
                         params=[Param(k, str(v)) for k, v in (params or {}).items()] if i == 0 else [])
    client.set_terminated(rid, status)
    return rid


def T(table=None, cell=None, method=None, arch=None, dataset=None, constraint=None, seed=None, sweep=None):
    names = {"nr.table": table, "nr.cell": cell, "nr.method": method, "nr.arch": arch, "nr.dataset": dataset,
             "nr.constraint": constraint, "nr.seed": seed, "nr.sweep": sweep}
    return {k: str(v) for k, v in names.items() if v is not None}


@pytest.fixture(scope="session")
def store_uri(tmp_path_factory):
    root = tmp_path_factory.mktemp("mlruns")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    c = MlflowClient(tracking_uri=uri)
    e = c.create_experiment(EXP)
    o = c.create_experiment(OTHER)
    ids = {}
    # Table 1, BL: three seeds, final top-1 32.0 / 32.5 / 33.0 (history goes down then up for the 'best' check)
    for s, fin in enumerate((32.0, 32.5, 33.0)):
        ids[f"bl{s}"] = _log(c, e, tags=T("table1", "BL", "BL", "vgg19_simplified_imagenet", "imagenet", "-", seed=s),
                             hist={"test_err": [40.0, 31.0 + s, fin], "test_err5": [15.0, 12.0, 12.0 + s]},
                             summary={"final_test_err": fin})
    # ... and runs that must NOT count: running, failed, another table's cell, a deleted-tag-less run
    _log(c, e, tags=T("table1", "BL", "BL", "vgg19_simplified", "imagenet"), hist={"test_err": [1.0]}, status="RUNNING")
    _log(c, e, tags=T("table1", "BL", "BL", "vgg19_simplified", "imagenet"), hist={"test_err": [2.0]}, status="FAILED")
    _log(c, e, tags=T("table4", "vgg19/cifar10/BL", "BL", "vgg19", "cifar10"), hist={"test_err": [3.0]})
    _log(c, e, tags=T(None, None, "BL", "vgg19_simplified", "imagenet"), hist={"test_err": [4.0]})
    # Table 1, NR-CA-BR matched on its tags alone (no nr.cell); only the summary metric
    _log(c, e, tags=T("table1", None, "NR-CA-BR", "vgg19_simplified_imagenet", "imagenet", "params"), summary={"final_test_err": 30.0})
    # Table 1, NR-FS matched on tags (constraint "-": the trainer tags no constraint for methods without NR)
    _log(c, e, tags=T("table1", "imagenet/vgg19_simplified_imagenet/NR-FS", "NR-FS", "vgg19_simplified_imagenet", "imagenet", "-"),
         hist={"test_err": [31.0]})
    # a sweep's parent run carries the sweep's nr.table tags but is no trial: not counted (even without children)
    _log(c, e, tags={**T("table1", "BL", "BL", "vgg19_simplified_imagenet", "imagenet"), "nr.role": "sweep"},
         hist={"test_err": [0.5]})
    # a table1 run that fits no cell: noted, not used
    _log(c, e, tags=T("table1", None, "NR", "resnet50", "imagenet", "params"), hist={"test_err": [5.0]})
    # Table 2, ResNet-50 NR Params: two runs in the OTHER experiment
    for s, (err, prm) in enumerate(((23.0, 26.0e6), (23.4, 26.2e6))):
        _log(c, o, tags=T("table2", "resnet50/NR-params", "NR-CA-BR", "resnet50", "imagenet", "params", seed=s),
             hist={"test_err": [30.0, err], "params": [25.6e6, prm], "flops": [4.0e9, 3.9e9]},
             summary={"final_params": prm, "final_flops": 3.9e9})
    _log(c, o, tags=T("table2", "resnet50/BL", "BL", "resnet50", "imagenet", seed=0),
         hist={"test_err": [24.0]}, summary={"final_params": 25.6e6, "final_flops": 4.1e9})
    # CPU analogue of Table 4 (Fashion-MNIST): BL x2, SLIM x1, NR-CR x2
    for m, errs, prm in (("BL", (8.0, 9.0), 1.0e5), ("SLIM", (8.8,), 5.0e4), ("NR-CR", (8.2, 8.4), 5.0e4)):
        for s, err in enumerate(errs):
            _log(c, e, tags=T("fmnist_table4", None, m, "vgg_small", "fashion_mnist", "params", seed=s),
                 params={"method": m, "model.name": "vgg_small", "nr.tr": 0.25},
                 hist={"test_err": [20.0, err]}, summary={"final_params": prm, "final_flops": prm * 100})
    # CPU analogue of Table 5: 0, 1, 2 rejuvenations (count from the metric), with NR histories for the plots
    for k, err in ((0, 10.0), (1, 9.0), (2, 8.5)):
        method = "BL" if k == 0 else "NR"
        hist = {"test_err": [20.0, 15.0, 12.0, err]}
        if k:
            hist |= {"util_params": [1.0, 0.6, 0.3 + 0.1 * k, 0.9], "util_flops": [1.0, 0.7, 0.4, 0.95],
                     "lambda": [0.0, 1e-4, 2e-4, 0.0], "rejuvenations": [0, 0, k - 1, k], "params": [1e5] * 4}
        _log(c, e, tags=T("fmnist_table5", None, method, "vgg_small", "fashion_mnist", "params", seed=0),
             params={"method": method, "nr.tr": 0.5, "nr.delta_lambda": 1e-4}, hist=hist, summary={"final_params": 1e5})
    # ... and one whose count comes from its nr.cell (a sweep's cell template), no rejuvenations metric
    _log(c, e, tags=T("fmnist_table5", "fashion_mnist/vgg_small/nrej3", "NR", "vgg_small", "fashion_mnist", "params"),
         hist={"test_err": [20.0, 8.0]})
    # Tr sweep: Tr in {0.25, 0.5} x delta_lambda in {5e-5, 1e-4} x 2 seeds; error = 10 + 4 Tr + 1e4 dl + seed
    for tr in (0.25, 0.5):
        for dl in (5e-5, 1e-4):
            for s in (0, 1):
                err = 10 + 4 * tr + 1e4 * dl + s
                _log(c, e, tags=T(None, None, "NR", "mlp", "fashion_mnist", "params", seed=s, sweep="trsweep"),
                     params={"nr.tr": tr, "nr.delta_lambda": dl, "nr.delta_r": 0.01},
                     hist={"test_err": [30.0, err]}, summary={"final_params": 1000 * (1 + tr + s)})
    # an NR run without nr.tr: skipped by the Tr sweep plot (with a note)
    _log(c, e, tags=T(None, None, "NR", "mlp", "fashion_mnist", "params", seed=9), hist={"test_err": [11.0]},
         summary={"final_params": 900})
    # Optuna sweep with 2 objectives: parent run records the search, children are the trials
    parent = _log(c, e, tags={"nr.sweep": "opt", "nr.role": "sweep"},
                  params={"sweep.search": "optuna", "sweep.objectives": "test_err:min,params:min"})
    ids["pareto"] = []
    for err, prm in ((10.0, 5000), (12.0, 3000), (11.0, 6000), (15.0, 2000), (13.0, 3500)):
        ids["pareto"].append(_log(c, e, tags=T(None, None, "NR", "mlp", "fashion_mnist", sweep="opt"), parent=parent,
                                  hist={"test_err": [err]}, summary={"final_params": prm}))
    return uri, ids


@pytest.fixture(scope="session")
def store(store_uri):
    return RunStore(store_uri[0])


@pytest.fixture(scope="session")
def tables(store):
    return {t.name: t for t in build_tables(store, "final")}


# ------------------------------------------------------------------------------------------- tables
def test_table1_cells_exact(tables):
    t = tables["table1"]
    bl = t.cell("BL", "", "top1")
    assert bl.n == 3  # RUNNING, FAILED, other-table and untagged runs are not picked up
    assert bl.mean == pytest.approx(32.5)
    assert bl.std == pytest.approx(0.5)
    assert bl.delta == pytest.approx(32.5 - 32.13)
    assert t.parts("BL", t.columns[0]) == ["32.13", "32.50 ± 0.50 (3)", "+0.37"]
    top5 = t.cell("BL", "", "top5")
    assert (top5.n, top5.mean, top5.std) == (3, pytest.approx(13.0), pytest.approx(1.0))
    fs = t.cell("NR-FS", "", "top1")
    assert (fs.n, fs.mean) == (1, 31.0)
    ca = t.cell("NR-CA-BR", "", "top1")  # matched on tags, summary metric only
    assert (ca.n, ca.mean, ca.std) == (1, 30.0, None)
    assert t.parts("NR-CA-BR", t.columns[0]) == ["29.98", "30.00 (1)", "+0.02"]
    empty = t.cell("NR-IP", "", "top1")
    assert empty.n == 0 and t.parts("NR-IP", t.columns[0]) == ["31.35", "—", "—"]
    assert any("matches no cell" in n for n in t.notes)
    assert any("FAILED 1" in n and "RUNNING 1" in n for n in t.notes)


def test_table2_params_flops_units_and_gain(tables):
    t = tables["table2"]
    nrp = {v: t.cell("ResNet-50", "NR Params", v) for v in ("top1", "params", "flops")}
    assert nrp["top1"].n == 2 and nrp["top1"].mean == pytest.approx(23.2)
    assert nrp["params"].mean == pytest.approx(26.1e6)
    assert nrp["params"].delta == pytest.approx(26.1e6 - 26.4e6)
    params_col = next(c for c in t.columns if c.group == "NR Params" and c.value == "params")
    assert t.parts("ResNet-50", params_col) == ["26.4M", "26.10M ± 0.14M (2)", "−0.30M"]
    flops_col = next(c for c in t.columns if c.group == "NR Params" and c.value == "flops")
    assert t.parts("ResNet-50", flops_col) == ["3.90G", "3.90G ± 0.00G (2)", "+0.00G"]
    gain = t.derived[("ResNet-50", "relative_gain")]
    assert gain[0] == "−6.21%"
    assert gain[1] == f"{(23.2 - 24.0) / 24.0 * 100:+.2f}%".replace("-", "−")
    assert t.derived[("ResNet-18", "relative_gain")][1] == "—"


def test_table_other_cells_empty(tables):
    for name in ("table3", "table5"):
        t = tables[name]
        assert all(c.n == 0 for c in t.cells.values()), name
    # Table 4's baseline-tagged run (vgg19/cifar10/BL) is in table4, not in table1
    assert tables["table4"].cell("VGG-19", "Baseline C10", "top1").n == 1


def test_best_metric(store):
    t = {b.name: b for b in build_tables(store, "best")}["table1"]
    bl = t.cell("BL", "", "top1")  # best epochs: 31, 32, 33
    assert (bl.n, bl.mean, bl.std) == (3, pytest.approx(32.0), pytest.approx(1.0))


def test_cpu_tables(tables):
    t4 = tables["fmnist_table4"]
    assert t4.rows == ["vgg_small / fashion_mnist"]
    assert [c.group for c in t4.columns if c.value == "top1"] == ["BL", "SLIM", "NR-CR"]
    row = "vgg_small / fashion_mnist"
    bl = t4.cell(row, "BL", "top1")
    assert (bl.n, bl.mean, bl.std) == (2, 8.5, pytest.approx(math.sqrt(0.5)))
    assert t4.parts(row, t4.columns[0]) == ["8.50 ± 0.71 (2)"]
    assert t4.parts(row, next(c for c in t4.columns if c.group == "SLIM" and c.value == "params")) == ["50.00K (1)"]
    ref = next(iter(t4.reference_rows.values()))
    assert ref[("NR-CR", "top1")].text == "4.19" and ref[("BL", "params")].text == "20.04M"
    t5 = tables["fmnist_table5"]
    cols = [c.group for c in t5.columns]
    assert cols == ["# of NR 0", "# of NR 1", "# of NR 2", "# of NR 3", "# of NR 4", "# of NR 5"]
    assert [t5.cell(row, g, "top1").mean for g in cols[:3]] == [10.0, 9.0, 8.5]
    assert (t5.cell(row, cols[3], "top1").n, t5.cell(row, cols[3], "top1").mean) == (1, 8.0)
    assert t5.cell(row, cols[4], "top1").n == 0
    assert next(iter(t5.reference_rows.values()))[("# of NR 5", "top1")].text == "3.62"


def test_write_tables_formats(tables, tmp_path):
    files = write_tables(list(tables.values()), tmp_path)
    assert {p.suffix for p in files} == {".md", ".tex", ".csv", ".html"}
    md = (tmp_path / "tables" / "table1.md").read_text()
    # the paper's layout: two side-by-side halves, BL beside BL-CA
    assert "| Method | Top-1 | Top-5 | Method | Top-1 | Top-5 |" in md
    assert ("| BL | 32.13 \\| 32.50 ± 0.50 (3) \\| +0.37 | 11.97 \\| 13.00 ± 1.00 (3) \\| +1.03 "
            "| BL-CA | 31.58 \\| — \\| — | 11.46 \\| — \\| — |") in md
    assert "| NR-IP | 31.35 \\| — \\| — |" in md
    tex = (tmp_path / "tables" / "table1.tex").read_text()
    assert "32.13 $\\mid$ 32.50 $\\pm$ 0.50 (3) $\\mid$ +0.37" in tex and "\\begin{tabular}" in tex
    rows = list(csv.DictReader((tmp_path / "tables" / "table1.csv").open()))
    bl = next(r for r in rows if r["cell"] == "BL" and r["value"] == "top1")
    assert (float(bl["mean"]), float(bl["std"]), int(bl["n"]), round(float(bl["delta"]), 6)) == (32.5, 0.5, 3, 0.37)
    assert len(bl["run_ids"].split()) == 3
    nrip = next(r for r in rows if r["cell"] == "NR-IP" and r["value"] == "top1")
    assert (nrip["mean"], nrip["n"], nrip["text"]) == ("", "0", "31.35 | — | —")


# ------------------------------------------------------------------------------------------- plots
@pytest.fixture(scope="session")
def plotted(store, tmp_path_factory):
    out = tmp_path_factory.mktemp("report")
    results = P.make_all(store, out)
    P.write_manifest(results, out)
    write_index(out)
    return out, {r.name: r for r in results}


def _files_ok(result):
    assert {p.suffix for p in result.files} == {".png", ".svg"}, result.name
    for p in result.files:
        assert p.stat().st_size > 1000, p


def test_plot_figure1_and_trajectories(plotted):
    _, r = plotted
    f1 = r["figure1"]
    _files_ok(f1)
    assert len(f1.data) == 3  # the two NR runs of fmnist_table5 and, dashed, that table's BL run
    (bl,) = [v for v in f1.data.values() if v["baseline"]]
    assert bl["top1_acc"] == [80.0, 85.0, 88.0, 90.0]
    s = next(v for k, v in f1.data.items() if "NR" in k and v["util_params"][2] == pytest.approx(0.4))
    assert s["epoch"] == [1, 2, 3, 4] and s["util_flops"] == [1.0, 0.7, 0.4, 0.95]
    assert s["top1_acc"] == [80.0, 85.0, 88.0, 91.0]
    tr = r["trajectories"]
    _files_ok(tr)
    lam = next(v for v in tr.data.values() if v["util_params"][2] == pytest.approx(0.5))  # the k=2 run
    assert lam["lambda"] == [0.0, 1e-4, 2e-4, 0.0] and lam["rejuvenation_epochs"] == [3, 4]


def test_plot_tradeoff(plotted):
    _, r = plotted
    tp = r["tradeoff_params"]
    _files_ok(tp)
    _files_ok(r["tradeoff_flops"])
    panel = tp.data["resnet50 / imagenet"]
    assert sorted(p["err"] for p in panel["runs"]) == [23.0, 23.4, 24.0]
    # the paper's ResNet-50 points (Table 2: BL, NR Params, NR FLOPs) are overlaid
    assert sorted(p["err"] for p in panel["paper"]) == [22.79, 22.93, 24.30]
    fm = tp.data["vgg_small / fashion_mnist"]
    assert {p["method"] for p in fm["runs"]} >= {"BL", "SLIM", "NR-CR"} and fm["paper"] == []


def test_plot_tr_sweep(plotted):
    _, r = plotted
    res = r["tr_sweep"]
    _files_ok(res)
    assert any("no param nr.tr" in n for n in res.notes)
    line = res.data["trsweep: Δλ=5e-05"]
    assert line["tr"] == [0.25, 0.5]
    assert line["err_mean"] == [pytest.approx(10 + 1 + 0.5 + 0.5), pytest.approx(10 + 2 + 0.5 + 0.5)]
    assert line["err_std"] == [pytest.approx(math.sqrt(0.5))] * 2
    assert line["n"] == [2, 2]
    assert line["params_mean"] == [pytest.approx(1750), pytest.approx(2000)]
    assert "trsweep: Δλ=0.0001" in res.data
    # the Fashion-MNIST table runs (no nr.sweep tag) form their own pool, per experiment
    assert any(k.startswith(f"{EXP}: ") for k in res.data)


def test_plot_rejuvenations_and_pareto(plotted, store_uri):
    _, r = plotted
    rj = r["rejuvenations"]
    _files_ok(rj)
    s = rj.data["runs"]["vgg_small / fashion_mnist"]
    assert (s["x"], s["mean"], s["n"]) == ([0, 1, 2, 3], [10.0, 9.0, 8.5, 8.0], [1, 1, 1, 1])
    assert rj.data["paper"]["paper: VGG-19 C10"]["y"] == [5.44, 4.19, 4.03, 3.79, 3.69, 3.62]
    pa = r["pareto_opt"]
    _files_ok(pa)
    assert pa.data["objectives"] == ["test_err", "params"]
    got = dict(zip(zip(pa.data["x"], pa.data["y"]), pa.data["pareto"]))
    assert got == {(5000, 10.0): True, (3000, 12.0): True, (6000, 11.0): False, (2000, 15.0): True, (3500, 13.0): False}
    assert pareto_mask([(1, 1), (1, 1), (2, 0)]) == [True, True, True]


def test_pareto_mask_is_the_pareto_front():
    """One definition (nr_study.analysis.stats.pareto_front): the plot's mask marks exactly the points the front
    holds, whatever the objectives' directions; equal points are both on it, a non-finite one is not."""
    import random

    from nr_study.analysis.stats import pareto_front

    rng = random.Random(0)
    for _ in range(200):
        pts = [(rng.randint(0, 5), rng.choice([rng.randint(0, 5), 0.5])) for _ in range(rng.randint(0, 8))]
        modes = (rng.choice(["min", "max"]), rng.choice(["min", "max"]))
        sign = [1 if m == "min" else -1 for m in modes]
        brute = [not any(all(s * q[i] <= s * p[i] for i, s in enumerate(sign)) and q != p for q in pts) for p in pts]
        assert pareto_mask(pts, modes) == brute, (pts, modes)
        dicts = [{"e": x, "p": y} for x, y in pts]
        front = pareto_front(dicts, [("e", modes[0]), ("p", modes[1])])
        assert sorted(map(tuple, (d.values() for d in front))) == sorted(p for p, m in zip(pts, brute) if m)
    assert pareto_mask([(1.0, math.nan), (2.0, 2.0)]) == [False, True]


def test_index_links_every_output(plotted, tables):
    out, results = plotted
    write_tables(list(tables.values()), out)
    write_index(out)
    md = (out / "report.md").read_text()
    page = (out / "index.html").read_text()
    outputs = [p for p in (out / "tables").iterdir() if p.suffix != ".json"] + list((out / "plots").glob("*.*[gv]"))
    assert len(outputs) >= 7 * 4 + 7 * 2
    for p in outputs:
        if p.suffix == ".json":
            continue
        rel = f"{p.parent.name}/{p.name}"
        assert f"({rel})" in md, rel
        assert f"href='{rel}'" in page, rel
    assert "<img src='plots/figure1.png'" in page
    assert json.loads((out / "plots" / "manifest.json").read_text())["figure1"]["files"]["svg"] == "figure1.svg"


# ------------------------------------------------------------------------------------------- CLI
def test_cli_tables_and_plots(store_uri, tmp_path, capsys):
    uri, _ = store_uri
    out = tmp_path / "rep"
    assert cli(["tables", "--tracking-uri", uri, "--experiment", OTHER, "--out", str(out)]) == 0
    md = (out / "tables" / "table2.md").read_text()
    assert "23.20 ± 0.28 (2)" in md
    assert "32.50" not in (out / "tables" / "table1.md").read_text()  # table1 runs are in the other experiment
    assert (out / "index.html").is_file() and "table2.md" in (out / "report.md").read_text()
    assert cli(["plots", "--tracking-uri", uri, "--experiment", OTHER, "--out", str(out)]) == 0
    assert (out / "plots" / "tradeoff_params.png").stat().st_size > 1000
    assert "tradeoff_params.png" in (out / "index.html").read_text()


@pytest.mark.parametrize("args,needle", [
    (["--experiment", "nope"], "unknown experiment 'nope'"),
    (["--metric", "median"], "--metric: unknown value 'median'"),
    (["--bogus"], "unrecognized arguments"),
    (["--out", "{tmp}/a_file/report"], "cannot write there"),  # a path under a regular file (root ignores modes)
])
def test_cli_bad_input_one_line_exit_2(store_uri, tmp_path, capsys, args, needle):
    uri, _ = store_uri
    (tmp_path / "a_file").write_text("")
    args = [a.format(tmp=tmp_path) for a in args]
    for cmd in ("tables", "plots"):
        rc = cli([cmd, "--tracking-uri", uri, "--out", str(tmp_path)] + args)
        err = capsys.readouterr().err
        assert rc == 2, (cmd, err)
        assert needle in err and err.count("\n") == 1 and err.startswith("error: ")


def test_cli_missing_store(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("NR_STUDY_RUNS", str(tmp_path / "empty"))
    assert cli(["tables"]) == 2
    err = capsys.readouterr().err
    assert "no MLflow database" in err and str(tmp_path / "empty" / "mlflow.db") in err
    assert not (tmp_path / "empty" / "mlflow.db").exists()


def test_cli_unreachable_server_fails_fast(tmp_path, capsys):
    assert cli(["plots", "--tracking-uri", "http://127.0.0.1:9", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --tracking-uri: no MLflow server answers at http://127.0.0.1:9") and err.count("\n") == 1


def test_analysis_never_imports_the_trainer(store_uri):
    """nr_study.analysis reads MLflow only: building tables and plots loads neither torch nor the trainer, nor
    the sweep (its label helpers are nr_study.labels)."""
    import subprocess
    import sys

    code = ("import sys, tempfile; from nr_study.analysis.runs import RunStore; "
            "from nr_study.analysis import tables, plots; "
            "s = RunStore(sys.argv[1]); tables.build_tables(s); plots.plot_tr_sweep(s.finished(), tempfile.mkdtemp()); "
            "bad = [m for m in ('torch', 'nr_study.train', 'nr_study.nr', 'nr_study.tracking', 'nr_study.sweep', "
            "'nr_study.cli') if m in sys.modules]; "
            "print(bad); sys.exit(1 if bad else 0)")
    out = subprocess.run([sys.executable, "-c", code, store_uri[0]], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr[-2000:]


# ------------------------------------------------------------------------------------- paired rows
def test_paired_rows_equal_epochs_and_equal_compute(tmp_path):
    """Each column minus its baseline, per seed, with a t interval; partners only at the table's basis."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    c = MlflowClient(tracking_uri=uri)
    e = c.create_experiment("paired")

    def run(table, method, seed, err, epochs, flops, cell=None, protocol="restart_schedule"):
        _log(c, e, tags=T(table, cell, method, "vgg_small", "fashion_mnist", "params", seed=seed),
             params={"method": method, "train.epochs": epochs, "train.after_rejuvenation": protocol},
             hist={"test_err": [30.0, err], "train_flops": [flops / 2, flops], "total_epochs": [epochs, epochs]})

    for s, err in enumerate((10.0, 11.0, 12.0)):
        run("fmnist_table4", "BL", s, err, 10, 1e12)
    run("fmnist_table4", "BL", 2, 14.0, 10, 1e12)  # a second seed-2 baseline: the seed's mean (13) is its partner
    for s, err in enumerate((11.0, 13.0, 15.0)):  # differences 1, 2, 2
        run("fmnist_table4", "NR-CR", s, err, 10, 0.6e12)
    run("fmnist_table4", "SLIM", 0, 12.0, 12, 1.2e12)  # trained 12 epochs: no equal-epochs partner
    run("fmnist_table4", "SLIM", 1, 10.0, 10, 1e12)  # difference -1, one seed: no interval
    for s in (0, 1):
        run("fmnist_table5", "NR-CR", s, 10.0, 12, 1.0e12, cell="fashion_mnist/nr0")
        run("fmnist_table5", "NR-CR", s, 9.0 + s, 12, 1.05e12, cell="fashion_mnist/nr1")  # within 10 % compute
    run("fmnist_table5", "NR-CR", 0, 12.0, 12, 1.3e12, cell="fashion_mnist/nr2")  # 30 % more compute
    for s, (bl, nr, half) in enumerate(((20.0, 21.0, 23.0), (22.0, 22.5, 23.5))):  # a sweep's own table: the demo's
        run("demo", "BL", s, bl, 8, 1e12, cell="BL")
        run("demo", "NR-CR", s, nr, 8, 0.9e12, cell="NR-CR,tr=0.5")
        run("demo", "BL", s, half, 8, 0.5e12, cell="BL,width=11")  # the width-scaled baseline
    tables = {t.name: t for t in build_tables(RunStore(uri), "final")}
    row = "vgg_small / fashion_mnist"

    demo = tables["demo"]
    assert demo.rows == ["BL", "BL,width=11", "NR-CR,tr=0.5"]
    assert [c.label for c in demo.columns] == ["Top-1", "Params", "FLOPs", "Rejuvenations", "Δ vs BL, paired",
                                               "Δ vs BL,width=11, paired"]
    assert demo.parts("NR-CR,tr=0.5", demo.columns[0]) == ["21.75 ± 1.06 (2)"]
    assert demo.parts("NR-CR,tr=0.5", demo.columns[-2]) == ["+0.75 [−2.43, +3.93] (2) · compute 0.90×"]
    assert demo.parts("NR-CR,tr=0.5", demo.columns[-1]) == ["−1.50 [−7.85, +4.85] (2) · compute 1.80×"]  # −2, −1: t(0.975, 1) = 12.71
    assert demo.parts("BL", demo.columns[-2]) == ["—"]
    assert demo.parts("BL", demo.columns[3]) == ["0.00 ± 0.00 (2)"]
    assert "| NR-CR,tr=0.5 | 21.75 ± 1.06 (2) |" in to_markdown(demo)
    (rec,) = [r for r in csv.DictReader(to_csv(demo).splitlines()) if r["kind"] == "paired" and r["row"] == "NR-CR,tr=0.5"
              and r["value"] == "paired:BL"]
    assert (float(rec["mean"]), rec["n"], float(rec["compute_ratio"])) == (0.75, "2", 0.9)
    assert all(to_csv(t) and to_latex(t) and to_html(t) for t in tables.values())

    t4 = tables["fmnist_table4"]
    assert list(t4.paired_rows) == [f"Δ vs BL, equal epochs: {row}"]
    paired = t4.paired_rows[f"Δ vs BL, equal epochs: {row}"]
    nr = paired[("NR-CR", "top1")]
    half = 4.302653 * math.sqrt(1 / 3) / math.sqrt(3)  # t(0.975, 2) · sd / √n, sd of (1, 2, 2) = √(1/3)
    assert (nr.n, nr.mean, nr.lo, nr.hi) == (3, pytest.approx(5 / 3), pytest.approx(5 / 3 - half, abs=1e-5),
                                             pytest.approx(5 / 3 + half, abs=1e-5))
    assert nr.compute_ratio == pytest.approx(0.6)
    assert nr.text() == "+1.67 [+0.23, +3.10] (3) · compute 0.60×"
    # the SLIM runs trained 10 and 12 epochs: two configurations, two columns, never one cell
    assert [c.group for c in t4.columns if c.value == "top1"] == ["BL", "SLIM [epochs=10]", "SLIM [epochs=12]", "NR-CR"]
    assert any("cell 'SLIM' holds 2 configurations (they differ in train.epochs): one column each" in n for n in t4.notes)
    slim = paired[("SLIM [epochs=10]", "top1")]
    assert (slim.n, slim.mean, slim.lo) == (1, -1.0, None) and slim.text() == "−1.00 (1) · compute 1.00×"
    assert paired[("SLIM [epochs=12]", "top1")].n == 0
    assert ("NR-CR", "params") not in paired and ("BL", "top1") not in paired
    assert any("seed 0): no baseline run at equal epochs of its configuration (the seed's baselines differ in "
               "train.epochs); not paired" in n for n in t4.notes)
    assert "training epochs by method: BL 10; NR-CR 10 (after_rejuvenation=restart_schedule); SLIM 10–12" in t4.notes
    md = to_markdown(t4)
    assert f"| Δ vs BL, equal epochs: {row} | — | — | −1.00 (1) · compute 1.00× | — | — | — | +1.67 [+0.23, +3.10] (3)" in md
    assert ("equal epochs (a baseline run with the same seed and the same configuration but the method's own settings: "
            "the same data, model, optimiser and train.epochs)") in t4.caption
    recs = [r for r in csv.DictReader(to_csv(t4).splitlines()) if r["kind"] == "paired" and r["column"] == "NR-CR"]
    assert len(recs) == 1 and float(recs[0]["ci_low"]) == pytest.approx(5 / 3 - half, abs=1e-5)

    t5 = tables["fmnist_table5"]
    epochs, compute = (t5.paired_rows[f"Δ vs # of NR 0, {b}: {row}"] for b in ("equal epochs", "equal compute"))
    assert (epochs[("# of NR 1", "top1")].mean, compute[("# of NR 1", "top1")].mean) == (-0.5, -0.5)
    assert epochs[("# of NR 2", "top1")].mean == 2.0 and compute[("# of NR 2", "top1")].n == 0
    assert compute[("# of NR 2", "top1")].text() == "—"
    assert any("no baseline run at equal compute" in n for n in t5.notes)


def test_paired_sweep_table_own_pair_column_data_and_early_stops(tmp_path):
    """A paired sweep's table: each run's own delta_test_err, per seed, rows sorted by it; a baseline on other
    data is never a partner; runs ASHA stopped early are left out and counted in a note."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    c = MlflowClient(tracking_uri=uri)
    e = c.create_experiment("study")

    def run(cell, method, seed, err, delta=None, n_train=5000, early=False, tr=None):
        tags = T("study", cell, method, "vgg_small", "fashion_mnist", "params", seed=seed)
        if early:
            tags["nr.early_stopped"] = "true"
        hist = {"test_err": [30.0, err]}
        if delta is not None:
            hist["delta_test_err"] = [9.0, delta]  # the last epoch's counts
        params = {"method": method, "train.epochs": 2, "data.n_train": n_train, "data.root": f"/somewhere/{seed}",
                  "seed": seed}
        if tr is not None:
            params["nr.tr"] = tr
        _log(c, e, tags=tags, params=params, hist=hist)

    for s, d in enumerate((-1.0, -2.0, -3.0)):
        run("NR-CR,w16", "NR-CR", s, 10.0, delta=d)
    run("NR,w8", "NR", 0, 12.0, delta=1.5)
    run("NR,w8", "NR", 0, 12.0, delta=0.5)  # the same seed twice: averaged, n = 1 seed
    run("NR,w24", "NR", 0, 15.0, delta=-9.0, early=True)  # stopped at a rung: not in the table
    run("NR-CA", "NR-CA", 0, 12.0, delta=4.0, tr=0.3)  # one cell name, two configurations: two rows
    run("NR-CA", "NR-CA", 0, 12.0, delta=3.0, tr=0.6123456)
    run("BL", "BL", 0, 11.0)
    run("BL", "BL", 1, 11.0, n_train=20000)  # other data: no partner for seed 1
    t = {t.name: t for t in build_tables(RunStore(uri), "final")}["study"]
    # baselines first, then by the own-pair difference
    assert t.rows == ["BL [n_train=20000]", "BL [n_train=5000]", "NR-CR,w16", "NR,w8", "NR-CA [tr=0.6123]",
                      "NR-CA [tr=0.3]"], t.rows
    assert any("cell 'NR-CA' holds 2 configurations (they differ in nr.tr): one row each, never averaged" in n
               for n in t.notes)
    own = [col for col in t.columns if col.value == "paired:own"][0]
    assert t.parts("NR-CR,w16", own) == ["−2.00 [−4.48, +0.48] (3)"]  # t(0.975, 2) · 1 / √3 = 2.484
    assert t.parts("NR,w8", own) == ["+1.00 (1)"]
    vs_bl = [col for col in t.columns if col.value == "paired:BL [n_train=5000]"][0]
    assert t.parts("NR-CR,w16", vs_bl) == ["−1.00 (1)"]  # seed 0 only: seed 1's BL trained on other data
    assert any("seed 1): no baseline run at equal epochs" in n for n in t.notes)
    assert any("STOPPED EARLY 1 (stopped early by the sweep's scheduler" in n for n in t.notes)
    assert "Δ vs its own paired BL is each run's test error minus" in t.caption


def test_line_labels_tell_runs_apart():
    """Legend labels: the cell, then what differs (Tr), the run id only where nothing else does."""
    from nr_study.analysis.runs import RunRecord

    def rec(rid, cell, tr, seed=0):
        return RunRecord(rid, "e", "FINISHED", tags=T(cell=cell, method="NR-CR", arch="vgg_small", seed=seed),
                         params={"nr.tr": str(tr)}, metrics={})

    runs = [rec("a1", "NR-CR", 0.3), rec("b2", "NR-CR", 0.5), rec("c3", "BL", 1.0), rec("d4", "X", 0.5),
            rec("e5", "X", 0.5)]
    assert P.line_labels(runs) == {"a1": "NR-CR, tr=0.3", "b2": "NR-CR, tr=0.5", "c3": "BL", "d4": "X [d4]",
                                   "e5": "X [e5]"}


def test_sweep_study_of_a_variant_sweep():
    """A `variant` list has no param of its name: the study ranks the config keys that vary (not the repeat's
    seed); a trial's `tracking.system_metrics` param is no objective."""
    from nr_study.analysis.runs import RunRecord

    members = [RunRecord(f"r{i}", "e", "FINISHED", tags={}, metrics={"test_err": 10.0 + tr * 10 + s},
                         params={"method": m, "nr.tr": str(tr), "seed": str(s), "tracking.system_metrics": "None"})
               for i, (m, tr, s) in enumerate([(m, tr, s) for m, tr in (("BL", 0.5), ("NR-CR", 0.5), ("NR-CR", 0.7))
                                               for s in (0, 1)])]
    parent = {"sweep.objectives": "test_err:min", "space.variant": "grid(BL; NR-CR,tr=0.5; NR-CR,tr=0.7)"}
    study, keys, objective, notes = TP.sweep_study(members, [parent] + [m.params for m in members])
    assert (keys, objective, notes) == (["method", "nr.tr"], "test_err", [])
    assert len(study.trials) == 6
