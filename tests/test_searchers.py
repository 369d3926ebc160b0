"""Every `search:` form the schema accepts builds a Tuner that Ray can pickle, run a step of and restore.

Ray pickles the search algorithm (and the Optuna sampler inside it) three times: into `tuner.pkl` when the Tuner is
built, into the searcher checkpoint while the sweep runs, and back out of both on `--resume`. Optuna 5's NSGA-II
sampler holds a thread lock, which made every `sampler: nsga2` sweep die in `Tuner(...)`; this file is the guard
against the next such drift. Not marked slow, so `make test-latest` (the newest releases) runs it.
"""
from __future__ import annotations

import copy
import pickle

import pytest

from nr_study.sweep.space import SAMPLERS, parse_search_space

MULTI = [{"test_err": "min"}, {"params": "min"}]
SEARCH_FORMS = {
    "grid": ("grid", {}),
    "random": ("random", {"num_samples": 3}),
    "random-seeded": ({"type": "random", "seed": 3}, {"num_samples": 3}),
    "optuna": ("optuna", {"num_samples": 3}),
    "optuna-tpe": ({"type": "optuna", "sampler": "tpe", "seed": 1}, {"num_samples": 3}),
    "optuna-tpe-multi": ({"type": "optuna", "sampler": "tpe", "objectives": MULTI}, {"num_samples": 3}),
    "optuna-nsga2": ({"type": "optuna", "sampler": "nsga2", "seed": 2}, {"num_samples": 3}),
    "optuna-nsga2-multi": ({"type": "optuna", "sampler": "nsga2", "objectives": MULTI, "seed": 1},
                           {"num_samples": 3}),
    "optuna-nsga2-repeat": ({"type": "optuna", "sampler": "nsga2", "objectives": MULTI},
                            {"num_samples": 2, "repeat": 2}),
    "optuna-asha": ({"type": "optuna", "sampler": "tpe"},
                    {"num_samples": 3, "scheduler": {"type": "asha", "metric": "test_err", "mode": "min"}}),
}


def space_for(name: str, search, extra: dict):
    doc = {"name": name, "experiment": f"test-{name}",
           "base": {"method": "BL", "model": {"name": "vgg_small", "kwargs": {"width": 4}},
                    "data": {"name": "synthetic", "n_train": 64, "n_test": 32},
                    "train": {"epochs": 2, "batch_size": 16, "device": "cpu"}},
           "space": {"model.kwargs.width": [2, 4, 8]} if search == "grid" else
                    {"model.kwargs.width": {"choice": [2, 4, 8]}, "optim.lr": {"loguniform": [0.01, 0.2]}},
           "search": copy.deepcopy(search), "resources_per_trial": {"cpu": 1}}
    doc.update(copy.deepcopy(extra))
    return parse_search_space(doc, f"{name}.yaml")


@pytest.fixture(scope="module")
def local_ray():
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=1, include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False)
    yield
    ray.shutdown()


def test_every_schema_sampler_has_a_picklable_builder():
    from nr_study.sweep.samplers import SAMPLERS as BUILT, make_sampler

    assert set(BUILT) == set(SAMPLERS)
    for name in SAMPLERS:
        sampler = make_sampler(name, 0)
        clone = pickle.loads(pickle.dumps(sampler))
        assert type(clone) is type(sampler)


def _drive(searcher, space, n: int) -> list[dict]:
    """What Tune does with a searcher: suggest configurations, then report each trial's result."""
    configs = []
    for i in range(n):
        cfg = searcher.suggest(f"t{i}")
        assert isinstance(cfg, dict), cfg
        configs.append(cfg)
    for i, cfg in enumerate(configs):
        searcher.on_trial_complete(f"t{i}", result={"test_err": 0.5 - 0.01 * i, "params": 100.0 + i,
                                                    "training_iteration": 2})
    return configs


@pytest.mark.parametrize("form", list(SEARCH_FORMS))
def test_tuner_builds_runs_a_step_and_restores(form, local_ray, tmp_path):
    import ray.cloudpickle as cloudpickle
    from ray import tune

    from nr_study.sweep.ray_setup import build_search_alg, build_trainable, build_tuner
    from nr_study.sweep.trial import TrialContext

    search, extra = SEARCH_FORMS[form]
    space = space_for(form.replace("-", "_"), search, extra)
    sweep_dir = tmp_path / "sweep"
    sweep_dir.mkdir()
    ctx = TrialContext(space=space, tracking_uri="http://127.0.0.1:1", parent_run_id="p", experiment_id="1",
                       sweep_dir=str(sweep_dir), data_root=None)

    # 1. building the Tuner writes tuner.pkl (Optuna 5.1's NSGA-II failed here)
    tuner = build_tuner(space, ctx, tmp_path, sweep_dir.name, verbose=0)
    assert (sweep_dir / "tuner.pkl").is_file()

    # 2. the searcher while the sweep runs: suggestions, results, then the checkpoint Ray writes
    searcher = build_search_alg(space, str(sweep_dir))
    if space.search != "optuna":  # grid / random: Ray's variant generator (seeded) or its default (None)
        assert searcher is None or cloudpickle.loads(cloudpickle.dumps(searcher)) is not None
    else:
        searcher.set_search_properties(None, None, space.param_space())
        configs = _drive(searcher, space, max(2, space.repeat))
        assert all(set(c) >= {"model.kwargs.width", "optim.lr"} for c in configs)
        searcher.save_to_dir(str(sweep_dir), session_str="test")
        # --resume: a fresh searcher of the same space reads the checkpoint back and keeps suggesting
        (tmp_path / "other").mkdir()
        fresh = build_search_alg(space, str(tmp_path / "other"))
        fresh.restore_from_dir(str(sweep_dir))
        fresh.set_search_properties(None, None, space.param_space())
        assert isinstance(fresh.suggest("after-restore"), dict)
        assert cloudpickle.loads(cloudpickle.dumps(searcher)) is not None

    # 3. --resume reads tuner.pkl back (Tuner.restore unpickles the search algorithm and scheduler)
    restored = tune.Tuner.restore(str(sweep_dir), trainable=build_trainable(space, ctx),
                                  resume_unfinished=True, resume_errored=True)
    assert restored is not None and tuner is not None
