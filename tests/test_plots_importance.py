"""`nr-study plots` for any sweep: parameter importances (Optuna fANOVA over an in-memory study built from the
trials' MLflow runs) and parallel coordinates. A real sqlite store; the runs are made as a sweep makes them
(a parent with space.<key> params, children tagged nr.sweep)."""
from __future__ import annotations

import random

from mlflow.entities import Metric, Param
from mlflow.tracking import MlflowClient

from nr_study.analysis import tradeoff_plots as TP
from nr_study.analysis.runs import RunStore


def _grid_sweep(uri: str) -> None:
    """16 trials of a random sweep over nr.tr (the objective is 50 - 40·tr exactly) and a useless key `junk`
    (seeded uniform draws), plus a categorical key method that does not matter either."""
    c = MlflowClient(uri)
    e = c.create_experiment("imp")
    parent = c.create_run(e, tags={"nr.sweep": "imp", "nr.role": "sweep"}).info.run_id
    c.log_batch(parent, params=[Param("space.nr.tr", "uniform(0.1, 0.9)"), Param("space.junk", "uniform(0, 1)"),
                                Param("space.method", "choice(BL, NR)"), Param("sweep.search", "random"),
                                Param("sweep.objectives", "test_err:min")])
    c.set_terminated(parent)
    rng = random.Random(0)
    for i in range(16):
        tr, junk, method = 0.1 + 0.05 * i, rng.random(), rng.choice(["BL", "NR"])
        rid = c.create_run(e, tags={"nr.sweep": "imp", "mlflow.parentRunId": parent}).info.run_id
        c.log_batch(rid, params=[Param("nr.tr", str(tr)), Param("junk", str(junk)), Param("method", method),
                                 Param("seed", str(i % 2))],
                    metrics=[Metric("final_test_err", 50.0 - 40.0 * tr, 0, 0)])
        c.set_terminated(rid)
    unfinished = c.create_run(e, tags={"nr.sweep": "imp", "mlflow.parentRunId": parent}).info.run_id
    c.log_batch(unfinished, params=[Param("nr.tr", "0.5"), Param("junk", "0.5"), Param("method", "BL")],
                metrics=[Metric("final_test_err", 1000.0, 0, 0)])  # RUNNING: not a finished trial


def test_importances_and_parallel_coordinates_of_a_random_sweep(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    _grid_sweep(uri)
    store = RunStore(uri)
    res = {r.name: r for r in TP.plot_importances(store.finished(), tmp_path / "out", store.parents)}
    assert set(res) == {"importance_imp", "parallel_imp"}
    for r in res.values():
        assert sorted(f.name for f in r.files) == [f"{r.name}.png", f"{r.name}.svg"]
        assert all(f.stat().st_size > 1000 for f in r.files)
    imp = res["importance_imp"].data
    assert imp["n_trials"] == 16 and imp["objective"] == "test_err"  # the RUNNING trial is not counted
    assert set(imp["importances"]) == {"nr.tr", "junk", "method"}  # seed is not a swept key
    assert abs(sum(imp["importances"].values()) - 1.0) < 1e-6
    # the objective is a function of nr.tr alone: it carries nearly all of it
    assert imp["importances"]["nr.tr"] > 0.8, imp
    par = res["parallel_imp"].data
    assert par["columns"] == ["junk", "method", "nr.tr", "test_err"] and len(par["rows"]) == 16
    assert sorted(row[-1] for row in par["rows"]) == sorted(50.0 - 40.0 * (0.1 + 0.05 * i) for i in range(16))


def test_an_objective_equal_in_every_trial_is_a_note_not_a_crash(tmp_path):
    """Optuna's fANOVA raised 'Encountered zero total variance in all trees' when every trial had the same
    objective (found by `nr-study sweep --smoke`: four test images give equal errors), and `nr-study plots`
    failed as a whole. Now that sweep's importances are a note."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    c = MlflowClient(uri)
    e = c.create_experiment("flat")
    parent = c.create_run(e, tags={"nr.sweep": "flat", "nr.role": "sweep"}).info.run_id
    c.log_batch(parent, params=[Param("space.method", "grid(BL, NR)"), Param("sweep.search", "grid")])
    c.set_terminated(parent)
    for method in ("BL", "NR", "BL", "NR"):
        rid = c.create_run(e, tags={"nr.sweep": "flat", "mlflow.parentRunId": parent}).info.run_id
        c.log_batch(rid, params=[Param("method", method)], metrics=[Metric("final_test_err", 75.0, 0, 0)])
        c.set_terminated(rid)
    store = RunStore(uri)
    (res,) = TP.plot_importances(store.finished(), tmp_path / "out", store.parents)
    assert res.name == "importance_flat" and not res.files
    assert any("test_err is 75 in every one of the 4 finished trials" in n for n in res.notes), res.notes
