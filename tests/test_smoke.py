"""`nr-study sweep --smoke` (nr_study.sweep.smoke, smoke_run): the rule that makes a space small, what it may change,
what it refuses up front, and real smokes: one end to end as the command runs it (a launch in a child process,
the forced worker kill and its retry, Ctrl-C, --resume, the tables) over a space with deliberate errors, and one
per shipped full-scale space over one of its trials (the whole space is the command's job: README times).
"""
from __future__ import annotations

import copy
import io
from pathlib import Path

import pytest
import yaml

from nr_study.config import config_from_dict, config_to_dict, flatten
from nr_study.sweep.smoke import (SMOKE_BATCH, SMOKE_EPOCHS, SMOKE_SILENCED, SMOKE_STEPS, SMOKE_TEST_IMAGES,
                                  smoke_variant)
from nr_study.sweep.space import load_search_space

REPO = Path(__file__).resolve().parents[1]
FULL_SCALE = ["table1_ablation.yaml", "table2_imagenet.yaml", "table3_mobilenet.yaml",
              "table4_cifar_compression.yaml", "table5_multi_nr.yaml", "fig1_utilization.yaml"]
CPU_SCALE = ["fmnist_table4.yaml", "fmnist_table5.yaml", "demo.yaml"]
# Every key a smoke trial may train differently from the trial it stands for (the module doc of smoke.py says why).
MAY_CHANGE = {"train.epochs", "train.batch_size", "train.device", "train.threads", "data.n_train", "data.n_test",
              "data.synthetic_stand_in", "nr.delta_t", "nr.delta_t_unit", "slim.prune_epoch",
              "tracking.experiment", "tracking.run_name",  # the run name shows a variant's smoke value
              "testing.kill_at_epoch", "testing.kill_point", "testing.kill_once_marker", "testing.silence_fraction"}
MACHINE = (2, False)  # 2 CPUs, no GPU: what the smoke's trials get here


def _imagenet_nr() -> dict:
    return {"method": "NR-CA-BR", "model": {"name": "resnet50"},
            "data": {"name": "imagenet", "image_size": 224, "num_workers": 8},
            "train": {"epochs": 90, "batch_size": 256, "device": "cuda", "after_rejuvenation": "reset_epochs"},
            "nr": {"tr": 0.5, "delta_t": 1, "delta_t_unit": "epoch", "window_epochs": 30}}


# ------------------------------------------------------------------------------------------ the rule
def test_smoke_variant_changes_only_what_a_laptop_needs_and_says_what():
    cfg = _imagenet_nr()
    before = copy.deepcopy(cfg)
    out, changed = smoke_variant(cfg, "cpu")
    assert cfg == before  # pure
    assert changed == {"train.epochs": (90, SMOKE_EPOCHS), "train.batch_size": (256, SMOKE_BATCH),
                       "data.n_train": (None, SMOKE_BATCH * SMOKE_STEPS), "data.n_test": (None, SMOKE_TEST_IMAGES),
                       "train.device": ("cuda", "cpu"), "data.synthetic_stand_in": (False, True),
                       "testing.silence_fraction": (None, SMOKE_SILENCED)}  # Δt is already 1 epoch
    full = config_to_dict(config_from_dict(out))
    # what a cluster run could trip over is kept: architecture, input size, method, NR's own settings
    assert (full["model"]["name"], full["data"]["name"], full["data"]["image_size"], full["method"]) == \
        ("resnet50", "imagenet", 224, "NR-CA-BR")
    assert (full["nr"]["tr"], full["nr"]["window_epochs"], full["train"]["after_rejuvenation"]) == \
        (0.5, 30, "reset_epochs")
    assert smoke_variant(out, "cpu")[1] == {}  # a smoke config is its own smoke


def test_smoke_variant_sets_only_the_keys_the_method_reads():
    bl = dict(_imagenet_nr(), method="BL")
    assert not [k for k in smoke_variant(bl)[1] if k.startswith(("nr.", "slim.", "testing."))]
    nr0 = dict(_imagenet_nr(), method="NR-CR", nr={"max_rejuvenations": 0, "delta_t": 20, "delta_t_unit": "step"})
    assert not [k for k in smoke_variant(nr0)[1] if k.startswith(("nr.", "testing."))]  # nothing to rejuvenate
    nr = dict(nr0, nr={"delta_t": 20, "delta_t_unit": "step"})
    assert {k: v for k, v in smoke_variant(nr)[1].items() if k.startswith(("nr.", "testing."))} == {
        "nr.delta_t": (20, 1), "nr.delta_t_unit": ("step", "epoch"), "testing.silence_fraction": (None, SMOKE_SILENCED)}
    slim = dict(_imagenet_nr(), method="SLIM", slim={"prune_epoch": 60})
    assert smoke_variant(slim)[1]["slim.prune_epoch"] == (60, 1)
    small = {"method": "BL", "data": {"name": "synthetic"}, "train": {"epochs": 1, "batch_size": 2}}
    assert set(smoke_variant(small)[1]) == {"data.n_train", "data.n_test", "train.device"}  # nothing grows


def test_a_stand_in_has_the_datasets_shape_and_classes_and_reads_no_file(tmp_path):
    from nr_study.data import build_data

    for data, shape, classes in (({"name": "imagenet", "image_size": 128}, (3, 128, 128), 1000),
                                 ({"name": "cifar100"}, (3, 32, 32), 100),
                                 ({"name": "fashion_mnist"}, (1, 28, 28), 10)):
        cfg = config_from_dict({"data": {**data, "root": str(tmp_path / "nothing"), "synthetic_stand_in": True,
                                         "n_train": 6, "n_test": 3}})
        d = build_data(cfg.data)
        assert (d.input_shape, d.num_classes, d.n_train, d.n_test) == (shape, classes, 6, 3)
        assert int(d.y_train.max()) < classes
    assert not (tmp_path / "nothing").exists()


def test_synthetic_means_made_per_drawn_class_are_the_same_data():
    """make_synthetic interpolates only the drawn classes' means now (ImageNet's 1000 at 224 px were 600 MB): the
    same tensors as interpolating every class's first."""
    import torch
    import torch.nn.functional as F

    from nr_study.data import make_synthetic

    shape, k = (3, 20, 12), 7
    got = make_synthetic(shape, k, 50, 10, 0.5, 3)
    g = torch.Generator().manual_seed(3 + 12345)
    low = torch.randn(k, 3, 4, 4, generator=g)
    means = F.interpolate(low, size=shape[1:], mode="bilinear", align_corners=False)
    means = means / means.flatten(1).std(dim=1).clamp_min(1e-6).view(-1, 1, 1, 1)
    want = []
    for n in (50, 10):
        y = torch.randint(0, k, (n,), generator=g)
        want += [means[y] + 0.5 * torch.randn(n, *shape, generator=g), y]
    assert all(torch.equal(a, b) for a, b in zip(got, want))


@pytest.mark.parametrize("name", FULL_SCALE + CPU_SCALE)
def test_every_shipped_space_has_a_smoke_that_keeps_its_trials(name, tmp_path):
    """Every trial of the space, each as it was but for MAY_CHANGE: cell, tags, architecture, input size, method
    (a run name shows a smoke value where a variant sets such a key: Table 4's SLIM epochs); nothing written until
    it runs."""
    from nr_study.sweep.smoke_run import describe, prepare

    path = REPO / "search_spaces" / name
    space = load_search_space(path)
    sm = prepare(path, runs=tmp_path, machine=MACHINE)
    assert not tmp_path.joinpath("smoke").exists()
    smoke = sm.smoke
    assert smoke.num_trials == space.num_trials and smoke.experiment == space.experiment + "-smoke"
    assert smoke.max_failures == 1 and smoke.cpu <= 2 and smoke.gpu == 0
    for point in space.grid_points():
        cfg, _, tags = space.resolve_trial(point)
        scfg, _, stags = smoke.resolve_trial(point)
        assert {k: v for k, v in stags.items() if k != "nr.sweep"} == {**{k: v for k, v in tags.items()
                                                                          if k != "nr.sweep"}, "nr.smoke": "true"}
        a, b = flatten(config_to_dict(cfg)), flatten(config_to_dict(scfg))
        differ = {k for k in a.keys() | b.keys() if a.get(k) != b.get(k)}
        assert differ <= MAY_CHANGE, differ - MAY_CHANGE
        assert b["data.synthetic_stand_in"] is True and b["train.epochs"] <= SMOKE_EPOCHS
    text = "\n".join(describe(sm))
    assert "changed, every trial: train.epochs" in text and "testing.kill_at_epoch -> 1" in text


# ------------------------------------------------------------------------------------------ refused up front
def _cli(capsys, *argv) -> tuple[int, list[str], str]:
    from nr_study.cli import main

    rc = main(["sweep", *map(str, argv)])
    cap = capsys.readouterr()
    return rc, [ln for ln in cap.err.splitlines() if ln.strip()], cap.out


@pytest.mark.parametrize("table,hint", [("table6", ""), ("tabel4", "did you mean 'table4'?"),
                                         ("Fig2", "")])
def test_smoke_refuses_a_table_no_table_reads(table, hint, tmp_path, capsys):
    """A table tag like the paper's that is none: `nr-study tables` would put a day of runs into a sweep table of
    their own. One line naming the file, the key, the value and what is allowed; nothing written."""
    doc = yaml.safe_load((REPO / "search_spaces" / "table3_mobilenet.yaml").read_text())
    doc["tags"]["table"] = table
    path = tmp_path / "space.yaml"
    path.write_text(yaml.safe_dump(doc))
    rc, err, out = _cli(capsys, path, "--smoke", "--runs", tmp_path / "runs")
    assert rc == 2 and len(err) == 1, err
    assert err[0].startswith(f"error: {path}: tags.table: '{table}' is no table nr-study tables or plots knows")
    assert "allowed: fig1, figure1, fmnist_table4, fmnist_table5, table1" in err[0] and hint in err[0]
    assert not (tmp_path / "runs").exists() and not out


def test_smoke_keeps_a_sweep_table_of_its_own(tmp_path, capsys):
    doc = yaml.safe_load((REPO / "search_spaces" / "demo.yaml").read_text())
    path = tmp_path / "space.yaml"
    path.write_text(yaml.safe_dump(doc))
    rc, err, out = _cli(capsys, path, "--smoke", "--dry-run", "--runs", tmp_path / "runs")
    assert rc == 0 and not err, err
    assert "changed, NR methods, to rejuvenate after epoch 1: nr.delta_t_unit step -> epoch, nr.delta_t 20 -> 1, " \
           "testing.silence_fraction null -> 0.9" in out
    assert "demo-smoke" in out and not (tmp_path / "runs").exists()


@pytest.mark.parametrize("flag", [["--address", "auto"], ["--tracking-uri", "http://127.0.0.1:5000"], ["--resume"]])
def test_smoke_refuses_flags_that_would_leave_this_machine_or_its_store(flag, tmp_path, capsys):
    rc, err, _ = _cli(capsys, REPO / "search_spaces" / "demo.yaml", "--smoke", *flag, "--runs", tmp_path)
    assert rc == 2 and len(err) == 1 and err[0].startswith(f"error: --smoke with {flag[0]}: not allowed"), err
    assert not list(tmp_path.iterdir())


# ------------------------------------------------------------------------------------------ real smokes
ERRORS = {
    "name": "smoke_errors", "experiment": "test-smoke-errors",
    "base": {"method": "NR-CR", "model": {"name": "vgg_small", "kwargs": {"width": 8}},
             "data": {"name": "cifar10"}, "optim": {"lr": 0.05},
             "train": {"epochs": 10, "batch_size": 64, "device": "cpu", "after_rejuvenation": "reset_epochs"},
             "nr": {"tr": 0.5}},
    "space": {"variant": [{"name": "good"},
                          {"name": "refused-architecture", "model.name": "tv:convnext_tiny", "model.kwargs": {}},
                          {"name": "diverging-schedule", "method": "BL", "optim.lr": 1.0e+6}]},
    "max_concurrent": 1, "tags": {"table": "smoke_errors"},
}


@pytest.mark.slow
def test_smoke_end_to_end_names_each_broken_trial(tmp_path, monkeypatch):
    """The command's path: a launch in a child process whose first trial to finish epoch 1 gets a SIGKILL of its
    worker and a retry, then Ctrl-C, then --resume; the tables. A good trial passes; a refused architecture and
    a diverging learning rate each fail with one line naming the error; exit 2. The smoke writes only below
    <runs>/smoke (its own MLflow store): the runs folder's own store stays untouched."""
    from nr_study.sweep.smoke_run import run_smoke

    import ray

    ray.shutdown()  # the launch and the resume start Ray of their own
    path = tmp_path / "errors.yaml"
    path.write_text(yaml.safe_dump(ERRORS))
    runs = tmp_path / "runs"
    monkeypatch.setenv("NR_STUDY_RUNS", str(runs))
    out = io.StringIO()
    rc = run_smoke(path, runs=runs, out=out)
    text = out.getvalue()
    lines = text.splitlines()
    assert rc == 2, text
    assert any(ln.startswith("launch: interrupted (Ctrl-C) after the forced worker kill") for ln in lines), text
    assert "resume: exit 1" in lines, text  # two trials still fail: the resume says so
    good = [ln for ln in lines if ln.startswith("ok      NR-CR-vgg_small-")]
    assert len(good) == 1, text
    assert "3 epochs, 1 rejuvenation(s) from epoch 1" in good[0], good
    assert "retried from its checkpoint (1x)" in good[0], good
    assert "table smoke_errors cell good" in good[0], good
    refused = [ln for ln in lines if ln.startswith("FAILED  NR-CR-tv:convnext_tiny-")]
    assert len(refused) == 1 and "UnsupportedGraphError" in refused[0] and "permute" in refused[0], text
    diverged = [ln for ln in lines if ln.startswith("FAILED  BL-vgg_small-")]
    assert len(diverged) == 1 and "TrainingDivergedError" in diverged[0] and "diverged" in diverged[0], text
    assert lines[-1].startswith("smoke FAILED: 1 of 3 trial(s) ok"), text
    folder = Path(lines[0].rsplit(" in ", 1)[1])
    assert folder.parent == runs / "smoke" and (folder / "mlflow.db").is_file()
    assert (folder / "report" / "index.html").is_file() and (folder / "report" / "tables" / "smoke_errors.md").is_file()
    assert not (runs / "mlflow.db").exists()


# One trial of each full-scale space (its cheapest model's most involved method): the full space is the command's
# (README: minutes per space), the suite's budget is not.
TEST_TRIALS = {
    "table1_ablation.yaml": {"method": "NR-CA-BR"},
    "table2_imagenet.yaml": {"model.name": "resnet18", "method": "NR-CA-BR", "nr.constraint": "flops"},
    "table3_mobilenet.yaml": {"model.name": "mobilenet_v1_025", "method": "NR-CA-BR"},
    "table4_cifar_compression.yaml": {"data.name": "cifar10", "model.name": "vgg19_bn_cifar", "method": "NR-CR"},
    "table5_multi_nr.yaml": {"data.name": "cifar100", "nr.max_rejuvenations": 2},
    "fig1_utilization.yaml": {"model.name": "resnet50"},
}


@pytest.fixture(scope="module")
def smoke_server(tmp_path_factory):
    from nr_study.mlflow_server import MlflowServer

    server = MlflowServer.start(tmp_path_factory.mktemp("smoke_mlflow"))
    yield server
    server.stop()


@pytest.mark.slow
@pytest.mark.parametrize("name", FULL_SCALE)
def test_smoke_of_a_shipped_full_scale_space(name, smoke_server, local_ray, tmp_path, monkeypatch):
    """One trial of the space through the smoke's own checks: its real architecture at its real input size, its
    method (an NR variant rejuvenates after epoch 1 and its retry reloads the rejuvenated network from the
    checkpoint: the forced kill lands there), the run complete and in a cell of the space's table. Steps of 2
    images (the command's: SMOKE_BATCH): what a cluster run trips over is the same."""
    from nr_study.sweep import smoke
    from nr_study.sweep.runner import run_sweep
    from nr_study.sweep.smoke_run import check, drop_checkpoints, prepare, write

    monkeypatch.setattr(smoke, "SMOKE_BATCH", 2)
    monkeypatch.setattr(smoke, "SMOKE_TEST_IMAGES", 2)

    path = REPO / "search_spaces" / name
    space = load_search_space(path)
    want = TEST_TRIALS[name]
    picks = [i for i, p in enumerate(space.grid_points())
             if all(space.trial_values(p).get(k) == v for k, v in want.items())]
    assert len(picks) == 1, (name, want, picks)
    sm = prepare(path, runs=tmp_path, select=picks, machine=MACHINE)
    write(sm)
    summary = run_sweep(sm.smoke, source_text=sm.file.read_text(), tracking_uri=smoke_server.url,
                        runs=str(sm.folder), verbose=0)
    verdicts, overall = check(sm, smoke_server.url, Path(summary["sweep_dir"]), sm.folder / "report")
    assert not overall and len(verdicts) == 1 and verdicts[0].problem is None, (overall, verdicts)
    done = ", ".join(verdicts[0].done)
    assert "retried from its checkpoint (1x)" in done and f"table {space.tags['table']} cell " in done, done
    if space.trial_config(space.grid_points()[picks[0]])["method"] != "BL":
        assert "rejuvenation(s) from epoch 1" in done, done
    assert drop_checkpoints(sm).startswith(" after its checkpoints (")  # what a passed smoke does; tmp stays small
    assert not list(sm.folder.glob("sweeps/*/trials/*/state.pt"))
    assert not list(sm.folder.glob("sweeps/*/*/checkpoint_*"))


@pytest.mark.parametrize("seed", range(40))
def test_silencing_leaves_every_layers_strongest_channels_and_nothing_else_live(seed):
    """testing.silence_fraction (the smoke's way to make NR rejuvenate at once), on random graphs: every free
    group keeps live exactly its w - min(floor(f w), w - 1) channels of largest |γ|, so each layer keeps
    survivors (the regrowth follows the architecture) and r falls."""
    import random

    import torch

    from nr_study.nr import build_graph, live_masks
    from nr_study.nr.cost import graph_utilization, silence_weakest
    from tests.randnets import randomize, random_net

    model, shape, _ = random_net(seed, allow_refused=False)
    randomize(model, seed)
    graph = build_graph(model, shape)
    fraction = random.Random(seed).uniform(0.5, 0.95)
    before = {g.id: model.get_submodule(g.bn).weight.detach().abs().clone() for g in graph.free_groups()}
    silence_weakest(model, graph, fraction)
    masks = live_masks(model, graph, 0.01)
    for gid, gamma in before.items():
        keep = len(gamma) - min(int(fraction * len(gamma)), len(gamma) - 1)
        assert set(torch.nonzero(masks[gid]).flatten().tolist()) == set(gamma.topk(keep).indices.tolist()), gid
    if before:
        assert graph_utilization(model, graph, "params", masks=masks).ratio < 1.0
