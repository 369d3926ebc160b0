"""Every table keeps configurations apart (issue 24): a cell averages runs of one configuration only, and a
paired Δ pairs a run with a baseline of its own seed and configuration, differing only in what the method
defines (method, nr.*, fs.*, slim.*, the after-rejuvenation protocol). Equal compute is measured relative to
the run: the baseline's train_flops within ±10 % of the run's.
"""
from __future__ import annotations

import random

import pytest

from nr_study.analysis.runs import NOT_CONFIG, NOT_CONFIG_PREFIXES, RunRecord, configuration, is_method_key
from nr_study.analysis.builders import build_cells_table, build_cpu_table, build_paper_table
from nr_study.analysis.pairing import paired_difference
from nr_study.analysis.paper import load_paper
from nr_study.analysis.tables import build_tables
from nr_study.config import Config, config_to_dict, flatten

DELTA = {"A": 2.0, "B": -3.0}  # NR-CR − its own BL, per seed, in each group: any blend shows as another number


class FakeStore:
    """The two RunStore calls the table builders make, over in-memory RunRecords."""

    def __init__(self, runs: list[RunRecord]):
        self.runs = runs

    def finished(self, where=None):
        return [r for r in self.runs if all(r.get(k) == v for k, v in (where or {}).items())]

    def not_finished(self, where=None):
        return []


def _config_keys() -> list[str]:
    """Every key of the trainer's config that is neither the method's own nor where/how a run ran: the
    model, data, optimiser and training settings two runs of one cell, or of one pair, must share."""
    keys = [k for k in flatten(config_to_dict(Config()))
            if not is_method_key(k) and k not in NOT_CONFIG and not k.startswith(NOT_CONFIG_PREFIXES)]
    return sorted({*keys, "model.kwargs.width"})


VALUES = ["16", "11", "0.05", "0.1", "cosine", "step", "True", "None", "[30, 60]", "4000", None]  # None: not logged


def _runs(key: str, table: str, rng: random.Random) -> list[RunRecord]:
    """Two groups of runs, A and B, whose configurations differ in `key` alone: per group and seed a BL run and an
    NR-CR run (rejuvenated once) NR-CR − BL = DELTA[group]. Everything a cell or a pair may ignore varies too:
    the seed's data.root, tracking.*, the method's own nr.* settings."""
    pool = [v for v in VALUES if v is not None or key != "train.epochs"]  # equal epochs needs the epochs logged
    vals = dict(zip("AB", rng.sample(pool, 2)))
    base = {k: str(v) for k, v in flatten(config_to_dict(Config())).items()}
    runs = []
    for g in "AB":
        for s in range(rng.randint(2, 4)):
            bl = rng.uniform(5.0, 30.0)
            for method, err in (("BL", bl), ("NR-CR", bl + DELTA[g])):
                params = {**base, "method": method, "seed": str(s), "data.root": f"/data/{rng.random()}",
                          "tracking.run_name": f"{method}-{g}-{s}", "nr.tr": "0.25" if method == "BL" else "0.7"}
                params.pop(key, None)
                if vals[g] is not None:
                    params[key] = vals[g]
                # a run trained longer logs more training compute
                flops = 1e12 * (1.5 if key == "train.epochs" and g == "B" else 1.0)
                rid = f"{g}{s}{method}{rng.random()}"
                runs.append(RunRecord(rid, "e", "FINISHED", params=params,
                                      tags={"nr.table": table, "nr.cell": method, "nr.method": method, "nr.seed": str(s),
                                            "nr.arch": "vgg_small", "nr.dataset": "fashion_mnist"},
                                      metrics={"test_err": err, "train_flops": flops, "total_epochs": 10,
                                               "rejuvenations": 1.0 if method == "NR-CR" else 0.0}))
    return runs


def _group(run: RunRecord) -> str:
    return run.run_id[0]


def _assert_cells_unmixed(built, runs):
    by_id = {r.run_id: r for r in runs}
    for where, cell in built.cells.items():
        confs = {tuple(sorted(configuration(by_id[i]).items())) for i in cell.run_ids}
        assert len(confs) <= 1, (built.name, where, "a cell averages configurations")
        assert len({_group(by_id[i]) for i in cell.run_ids}) <= 1, (built.name, where)


@pytest.mark.parametrize("key", _config_keys())
def test_no_table_mixes_or_pairs_configurations(key):
    """For every model / data / optimiser / training key: two groups of same-method runs that differ in it
    alone are never one cell and never one pair, in every table builder."""
    rng = random.Random(key)
    paper = load_paper()

    # the paper's layout (Table 1): a cell of two configurations is left empty, with a note
    runs = _runs(key, "table1", rng)
    t1 = build_paper_table(paper, "table1", FakeStore(runs))
    _assert_cells_unmixed(t1, runs)
    assert t1.cell("BL", "", "top1").n == 0 and t1.cell("NR-CR", "", "top1").n == 0
    assert any(f"cell 'BL' holds 2 configurations (they differ in {key}): not shown" in n for n in t1.notes)

    # the CPU analogues: one column per configuration, each paired with its own BL only
    for table, base_col in (("fmnist_table4", "BL"), ("fmnist_table5", "# of NR 0")):
        runs = _runs(key, table, rng)
        t = build_cpu_table(paper, table, FakeStore(runs))
        _assert_cells_unmixed(t, runs)
        row = "vgg_small / fashion_mnist"
        full = {c.group for c in t.columns if t.cell(row, c.group, "top1") and t.cell(row, c.group, "top1").n}
        assert len(full) == 4, (table, full)  # BL and NR-CR, each as two configurations
        assert any(f"cell '{'BL' if table == 'fmnist_table4' else '0'}' holds 2 configurations (they differ in {key})"
                   in n for n in t.notes), t.notes
        assert t.paired_rows
        for label, vals in t.paired_rows.items():
            for (group, value), pr in vals.items():
                if group.startswith(base_col) or value != "top1":
                    continue
                ids = t.cell(row, group, "top1").run_ids
                g = _group(next(r for r in runs if r.run_id == ids[0]))
                assert pr.n == t.cell(row, group, "top1").n, (table, label, group, pr)  # every seed has its pair
                assert (pr.mean, pr.lo, pr.hi) == (pytest.approx(DELTA[g]),) * 3, (table, label, group, pr.text())

    # a sweep's own table: one row per configuration; a Δ column pairs within a configuration only
    runs = _runs(key, "sweep_x", rng)
    t = build_cells_table(paper, "sweep_x", FakeStore(runs))
    _assert_cells_unmixed(t, runs)
    assert len(t.rows) == 4, t.rows
    for (row, col), pr in t.paired_cells.items():
        base = col.removeprefix("paired:")
        g_row = _group(next(r for r in runs if r.run_id == t.cell(row, "", "top1").run_ids[0]))
        g_base = _group(next(r for r in runs if r.run_id == t.cell(base, "", "top1").run_ids[0]))
        if g_row != g_base:
            assert pr.n == 0, (row, col, pr.text())  # another configuration: never a pair
        elif row.startswith("NR-CR"):
            assert pr.mean == pytest.approx(DELTA[g_row]) and pr.n == t.cell(row, "", "top1").n, (row, col)
    assert any("no baseline run at equal epochs of its configuration (the seed's baselines differ in " + key in n
               for n in t.notes), t.notes


def test_run_configuration_ignores_where_it_ran_and_a_baselines_unread_settings():
    def rec(method, **params):
        return RunRecord("r", "e", "FINISHED", tags={}, metrics={}, params={"method": method, **params})

    bl = rec("BL", **{"nr.tr": "0.3", "train.after_rejuvenation": "continue", "data.root": "/x", "seed": "1",
                      "train.device": "cpu", "tracking.run_name": "a", "optim.lr": "0.1"})
    assert configuration(bl) == {"method": "BL", "optim.lr": "0.1"}  # BL never reads nr.* nor the protocol
    nr = rec("NR-CR", **{"nr.tr": "0.3", "optim.lr": "0.1"})
    assert configuration(nr) == {"method": "NR-CR", "nr.tr": "0.3", "optim.lr": "0.1"}
    assert configuration(nr, method=False) == configuration(bl, method=False) == {"optim.lr": "0.1"}


# ------------------------------------------------------------------------------- the measured example
@pytest.fixture(scope="module")
def width_store(tmp_path_factory):
    """compression_fair's three arms under one table tag, as measured: BL at width 16 and width 11 and NR-CR
    at width 16, 3 seeds; NR-CR − its own width-16 BL = +2.00 per seed, the width-11 BL errs 10 points more."""
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    from nr_study.analysis.runs import RunStore
    from tests.test_analysis import T, _log

    uri = f"sqlite:///{tmp_path_factory.mktemp('widths') / 'mlflow.db'}"
    c = MlflowClient(tracking_uri=uri)
    e = c.create_experiment("widths")
    base = {"model.name": "vgg_small", "data.name": "fashion_mnist", "data.n_train": 4000, "optim.lr": 0.05,
            "optim.schedule": "cosine", "train.epochs": 10, "train.batch_size": 64, "nr.tr": 0.25,
            "train.after_rejuvenation": "restart_schedule"}
    for table in ("fmnist_table4", "compression_fair"):
        for s in range(3):
            for cell, method, width, err in (("BL", "BL", 16, 10.0 + s), ("BL,width=11", "BL", 11, 20.0 + s),
                                             ("NR-CR", "NR-CR", 16, 12.0 + s)):
                _log(c, e, tags=T(table, cell, method, "vgg_small", "fashion_mnist", "params", seed=s),
                     params={**base, "method": method, "seed": s, "model.kwargs.width": width,
                             "data.root": f"/worker{s}/data"},
                     hist={"test_err": [30.0, err], "train_flops": [1e12, 2e12 * width / 16]})
    return {t.name: t for t in build_tables(RunStore(uri), "final")}


def test_measured_width_example_cpu_table(width_store):
    """Before: one BL cell "16.00 ± 5.55 (6)" and NR-CR "−3.00 [−3.00, −3.00] (3)" (its width-16 self blended with
    the width-11 BL). Now: a BL column per width and NR-CR +2.00 against its own width-16 BL."""
    t = width_store["fmnist_table4"]
    row = "vgg_small / fashion_mnist"
    assert [c.group for c in t.columns if c.value == "top1"] == ["BL [width=11]", "BL [width=16]", "SLIM", "NR-CR"]
    assert t.parts(row, next(c for c in t.columns if c.group == "BL [width=16]")) == ["11.00 ± 1.00 (3)"]
    assert t.parts(row, next(c for c in t.columns if c.group == "BL [width=11]")) == ["21.00 ± 1.00 (3)"]
    nr = t.paired_rows[f"Δ vs BL, equal epochs: {row}"][("NR-CR", "top1")]
    assert nr.text() == "+2.00 [+2.00, +2.00] (3) · compute 1.00×"
    assert any("cell 'BL' holds 2 configurations (they differ in model.kwargs.width): one column each" in n
               for n in t.notes)
    ref = next(iter(t.reference_rows.values()))  # the paper's BL number stands over each BL configuration
    assert ref[("BL [width=11]", "top1")].text == ref[("BL [width=16]", "top1")].text == "5.44"


def test_measured_width_example_sweep_table_names_the_width_scaled_baseline(width_store):
    """A sweep's cell named 'BL,width=11' is a named comparison: its Δ column crosses the width, and says so."""
    t = width_store["compression_fair"]
    assert t.rows == ["BL", "BL,width=11", "NR-CR"]
    col = {c.value: c for c in t.columns}
    assert t.parts("NR-CR", col["paired:BL"]) == ["+2.00 [+2.00, +2.00] (3) · compute 1.00×"]
    assert t.parts("NR-CR", col["paired:BL,width=11"]) == ["−8.00 [−8.00, −8.00] (3) · compute 1.45×"]
    assert t.parts("BL,width=11", col["paired:BL"]) == ["+10.00 [+10.00, +10.00] (3) · compute 0.69×"]
    assert "Δ of 'NR-CR' vs 'BL,width=11' compares across model.kwargs.width, as the cells' names say" in t.notes


# ------------------------------------------------------------------------------------------ equal compute
@pytest.mark.parametrize("run_flops,base_flops,paired", [
    (100.0, 111.0, False),  # 11 % more than the run: not within 10 % of it (yet |run/base − 1| = 0.099)
    (111.0, 100.0, True),   # 9.9 % less than the run: within (yet |run/base − 1| = 0.11)
    (100.0, 110.0, True),
    (100.0, 90.0, True),
    (100.0, 89.0, False),
])
def test_equal_compute_is_within_ten_percent_of_the_run(run_flops, base_flops, paired):
    def rec(rid, method, err, flops):
        return RunRecord(rid, "e", "FINISHED", tags={"nr.method": method, "nr.seed": "0"},
                         params={"method": method, "train.epochs": "10"},
                         metrics={"test_err": err, "train_flops": flops})

    pr, notes = paired_difference([rec("run", "NR-CR", 9.0, run_flops)], [rec("base", "BL", 10.0, base_flops)],
                                  "equal_compute", "top1", "final")
    assert (pr.n == 1) is paired, (pr.text(), notes)
    assert (pr.mean == -1.0) if paired else any("no baseline run at equal compute" in n for n in notes)


@pytest.mark.parametrize("table", ["table1", "fmnist_table4", "fmnist_table5", "study"])
def test_runs_stopped_early_are_in_no_table(table, tmp_path):
    """A run a sweep's scheduler stopped closes FINISHED (tag nr.early_stopped); its last epoch is no final
    result, so no table of any kind averages or pairs it, and the table says it left it out."""
    from mlflow.tracking import MlflowClient

    from nr_study.analysis.runs import RunStore
    from nr_study.tracking import RunTracker

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    MlflowClient(uri).create_experiment("x")
    ids = {}
    for seed in (0, 1):
        for method, err, early in (("BL", 10.0, False), ("NR-CR", 12.0, False), ("NR-CR", 99.0, True)):
            tags = {"nr.table": table, "nr.cell": method, "nr.method": method, "nr.seed": str(seed),
                    "nr.arch": "vgg_small", "nr.dataset": "fashion_mnist"}
            if early:
                tags["nr.early_stopped"] = "true"
            t = RunTracker(uri, "x", tags=tags)
            t.start()
            t.log_params({"method": method, "seed": seed, "train.epochs": 2})
            t.log_epoch(1, {"test_err": err, "train_flops": 1e12})
            t.end("FINISHED")
            ids[t.run_id] = early
    built = {b.name: b for b in build_tables(RunStore(uri), "final")}[table]
    used = {i for cell in built.cells.values() for i in cell.run_ids}
    assert used and not any(ids[i] for i in used)
    assert any("STOPPED EARLY 2" in n for n in built.notes), built.notes
