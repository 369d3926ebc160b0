"""Search-space files: schema validation (one clear error per bad field), overrides, expansion, dry run."""
from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

from nr_study.errors import ConfigError
from nr_study.sweep.space import (REPEAT_KEY, expand_trials, format_template, load_search_space,
                                  parse_search_space)

REPO = Path(__file__).resolve().parents[1]
SHIPPED = sorted((REPO / "search_spaces").glob("*.yaml"))

DOC = {
    "name": "t",
    "base": {"method": "BL", "model": {"name": "vgg_small", "kwargs": {"width": 4}},
             "data": {"name": "synthetic"}, "train": {"epochs": 2}},
    "space": {"method": ["BL", "NR-CR"], "nr.tr": {"grid": [0.5, 0.25]}},
}


def doc(**kw) -> dict:
    d = copy.deepcopy(DOC)
    d.update(kw)
    return d


def errors_of(d: dict) -> list[str]:
    with pytest.raises(ConfigError) as ei:
        parse_search_space(d, "x.yaml")
    return str(ei.value).splitlines()


# ------------------------------------------------------------------------------------------ shipped files
def test_required_files_are_shipped():
    names = {p.name for p in SHIPPED}
    for n in ("demo.yaml", "fmnist_table4.yaml", "fmnist_table5.yaml", "tr_sweep.yaml", "pareto_optuna.yaml",
              "table1_ablation.yaml", "table2_imagenet.yaml", "table3_mobilenet.yaml",
              "table4_cifar_compression.yaml", "table5_multi_nr.yaml", "fig1_utilization.yaml"):
        assert n in names


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_shipped_search_spaces_validate_and_expand(path):
    space = load_search_space(path)
    rows = expand_trials(space)
    assert len(rows) == (space.num_trials if space.search != "optuna" else space.repeat)
    assert len({r["name"] for r in rows}) == len(rows) or space.search == "optuna"
    assert space.tags.get("table"), "every shipped sweep says which table it fills"


def test_cpu_tables_have_three_seeds():
    for n in ("fmnist_table4.yaml", "fmnist_table5.yaml"):
        space = load_search_space(REPO / "search_spaces" / n)
        assert space.repeat >= 3
        assert space.base["train"]["device"] == "cpu" and space.gpu == 0


def test_paper_settings_in_gpu_files():
    t4 = load_search_space(REPO / "search_spaces" / "table4_cifar_compression.yaml")
    assert t4.base["nr"]["tr"] == 0.25 and t4.base["nr"]["target_ratio"] == 0.5
    assert {k for d in t4.dims for v in (d.variants or {}).values() for k in v} >= {"data.name", "model.name", "method"}
    t1 = load_search_space(REPO / "search_spaces" / "table1_ablation.yaml")
    assert t1.base["nr"]["tr"] == 0.25 and t1.base["data"]["image_size"] == 128
    assert t1.base["model"]["name"] == "vgg19_simplified_imagenet"
    t2 = load_search_space(REPO / "search_spaces" / "table2_imagenet.yaml")
    assert t2.base["nr"]["delta_lambda"] == 5e-5 and t2.base["nr"]["window_epochs"] == 30
    t3 = load_search_space(REPO / "search_spaces" / "table3_mobilenet.yaml")
    assert t3.base["optim"]["schedule"] == "cosine" and t3.base["nr"]["constraint"] == "flops"
    t5 = load_search_space(REPO / "search_spaces" / "table5_multi_nr.yaml")
    assert [d for d in t5.dims if d.key == "nr.max_rejuvenations"][0].values == [0, 1, 2, 3, 4, 5]


# The official repository's README (joe-siyuan-qiao/NeuralRejuvenation-CVPR19): the fixed sparsity per dataset and
# architecture of its CIFAR commands and results table (docs/fidelity.md).
OFFICIAL_CIFAR_LAMBDA = {("cifar10", "vgg19_bn_cifar"): 1.5e-4, ("cifar10", "resnet164_cifar"): 1.5e-4,
                         ("cifar10", "densenet_bc_100_40"): 1e-4, ("cifar100", "vgg19_bn_cifar"): 3e-4,
                         ("cifar100", "resnet164_cifar"): 2.5e-4, ("cifar100", "densenet_bc_100_40"): 2e-4}


def _trials(name: str):
    """Every trial of a shipped space as the trainer gets it: (validated Config, run name)."""
    space = load_search_space(REPO / "search_spaces" / name)
    return space, [space.resolve_trial(point)[:2] for point in space.grid_points()]


def _official_cifar(cfg) -> None:
    """The authors' CIFAR command: 300 epochs after the rejuvenation, lr 0.1 / 10 at 150 and 225, batch 64,
    wd 1e-4, Tr 0.25, a fixed λ from step 1, utilization once per epoch."""
    o, t, nr = cfg.optim, cfg.train, cfg.nr
    assert (t.epochs, tuple(o.milestones), o.schedule, o.gamma, t.after_rejuvenation) == \
        (300, (150, 225), "step", 0.1, "reset_epochs"), cfg.tracking.run_name
    assert (t.batch_size, o.lr, o.momentum, o.weight_decay) == (64, 0.1, 0.9, 1e-4)
    assert (nr.tr, nr.lambda_mode, nr.delta_t, nr.delta_t_unit) == (0.25, "fixed", 1, "epoch")
    assert nr.lambda_fixed == OFFICIAL_CIFAR_LAMBDA[(cfg.data.name, cfg.model.name)], cfg.tracking.run_name


def test_table4_follows_the_official_cifar_protocol_and_slim_its_own(capsys):
    """table4: BL and NR-CR on the official CIFAR schedule (NR-CR with the README's λ for its dataset and
    architecture, one rejuvenation to 0.5 C); SLIM on Network Slimming's (160 epochs, 80/120, then 160 epochs of
    fine-tuning on a restarted schedule). The dry run prints the schedule, the protocol and each arm's λ."""
    space, trials = _trials("table4_cifar_compression.yaml")
    arms = {}
    for cfg, name in trials:
        arms.setdefault(cfg.method, set()).add((cfg.data.name, cfg.model.name))
        if cfg.method == "SLIM":
            assert (cfg.train.epochs, tuple(cfg.optim.milestones), cfg.slim.prune_epoch, cfg.slim.restart_schedule) \
                == (320, (80, 120), 160, True), name
            assert cfg.slim.l1 == (1e-4 if cfg.model.name.startswith("vgg") else 1e-5), name
            continue
        assert (cfg.train.epochs, tuple(cfg.optim.milestones), cfg.train.batch_size) == (300, (150, 225), 64), name
        if cfg.method == "NR-CR":
            _official_cifar(cfg)
            assert (cfg.nr.max_rejuvenations, cfg.nr.target_ratio, cfg.nr.constraint) == (1, 0.5, "params")
            assert cfg.nr.rescale in (None, False)  # the CIFAR script never rescales
    assert arms == {m: set(OFFICIAL_CIFAR_LAMBDA) for m in ("BL", "SLIM", "NR-CR")}

    from nr_study.cli import main

    assert main(["sweep", str(REPO / "search_spaces" / "table4_cifar_compression.yaml"), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "epochs 300, batch 64, lr 0.1 (step)" in out
    assert "schedule: step (lr x0.1 after epochs [150, 225]), weight decay 0.0001; after a rejuvenation: reset_epochs" in out
    assert "nr: tr 0.25, lambda fixed 0.00015, target 0.5 x C (params), up to 1 rejuvenation(s)" in out
    for lam in (0.00015, 0.0001, 0.0003, 0.00025, 0.0002):
        assert f"NR-CR,lambda_fixed={lam:g}" in out
    rows = [line for line in out.splitlines() if " SLIM-" in line]  # the trial rows of SLIM
    assert len(rows) == 6 and all("SLIM,epochs=320,milestones=[80, 120]" in line for line in rows)


def test_table5_follows_the_official_cifar_protocol(capsys):
    space, trials = _trials("table5_multi_nr.yaml")
    seen = set()
    for cfg, name in trials:
        assert cfg.method == "NR-CR" and cfg.model.name == "vgg19_bn_cifar" and cfg.nr.target_ratio == 1.0
        _official_cifar(cfg)
        seen.add((cfg.data.name, cfg.nr.max_rejuvenations))
    assert seen == {(d, k) for d in ("cifar10", "cifar100") for k in range(6)}

    from nr_study.cli import main

    assert main(["sweep", str(REPO / "search_spaces" / "table5_multi_nr.yaml"), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "after epochs [150, 225]" in out and "after a rejuvenation: reset_epochs" in out
    assert "cifar10,lambda_fixed=0.00015" in out and "cifar100,lambda_fixed=0.0003" in out


@pytest.mark.parametrize("name, tr, schedule", [("table1_ablation.yaml", 0.25, "step"),
                                                ("table2_imagenet.yaml", 0.5, "step"),
                                                ("table3_mobilenet.yaml", 0.5, "cosine")])
def test_imagenet_tables_follow_the_official_imagenet_protocol(name, tr, schedule, capsys):
    """The authors' ImageNet command: 100 epochs at batch 128 counted from the rejuvenation, lr 0.1 / 10 at 30, 60
    and 90 (Table 3: cosine, the paper's), wd 1e-4; λ adaptive from 0, +5e-5 after each epoch r fell by less than
    0.01; Tr 0.5 (Table 1: 0.25, its caption); one rejuvenation."""
    space, trials = _trials(name)
    for cfg, run in trials:
        o, t, nr = cfg.optim, cfg.train, cfg.nr
        assert (t.epochs, t.batch_size, t.after_rejuvenation) == (100, 128, "reset_epochs"), run
        assert (o.lr, o.momentum, o.weight_decay, o.schedule) == (0.1, 0.9, 1e-4, schedule), run
        if schedule == "step":
            assert (tuple(o.milestones), o.gamma) == ((30, 60, 90), 0.1), run
        assert (nr.lambda_mode, nr.delta_lambda, nr.delta_r, nr.delta_t, nr.delta_t_unit) == \
            ("adaptive", 5e-5, 0.01, 1, "epoch"), run
        assert (nr.tr, nr.max_rejuvenations, nr.target_ratio) == (tr, 1, 1.0), run

    from nr_study.cli import main

    assert main(["sweep", str(REPO / "search_spaces" / name), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "epochs 100, batch 128" in out and "after a rejuvenation: reset_epochs" in out
    assert f"nr: tr {tr:g}, lambda adaptive (+5e-05 while r falls less than 0.01 per 1 epoch(s))" in out
    assert ("after epochs [30, 60, 90]" in out) == (schedule == "step")


def _official_lrs(k: int, epochs: int = 300, schedule=(150, 225), lr: float = 0.1, gamma: float = 0.1) -> list:
    """The lr of each epoch as the authors' cifar.py / imagenet.py loop sets it, the rejuvenation after its k-th
    epoch: each epoch before it (that one included) adds one epoch to the total and shifts the milestones by one;
    the lr is multiplied by gamma at the start of an epoch that is a milestone."""
    total, ms, cur, out, e = epochs, list(schedule), lr, [], 0
    while e < total:
        if e in ms:
            cur *= gamma
        out.append(cur)
        e += 1
        if e <= k:
            total, ms = total + 1, [m + 1 for m in ms]
    return out


@pytest.mark.parametrize("k", [1, 7, 40, 150])
def test_reset_epochs_is_the_official_milestone_shift(k):
    """train.after_rejuvenation reset_epochs (run_state.adopt: the schedule's offset at the rejuvenation's step,
    train.epochs more epochs after its epoch; lr_at counts the milestones from the offset) gives every epoch the
    lr the official loop gives it, and as many epochs, wherever the rejuvenation falls before the first milestone
    (after it, nr_study's schedule would already have dropped: docs/fidelity.md; the spaces' windows avoid it)."""
    from nr_study.config import config_from_dict
    from nr_study.run_state import lr_at

    o = config_from_dict({"optim": {"lr": 0.1, "schedule": "step", "milestones": [150, 225], "gamma": 0.1}}).optim
    spe = 7  # steps per epoch: any
    total = k + 300  # what tests/test_train.py::test_after_rejuvenation_protocols checks of a reset_epochs run
    ours = [lr_at(o, total, spe, e * spe, 0 if e < k else k * spe) for e in range(total)]
    official = _official_lrs(k)
    assert len(official) == total
    assert ours == pytest.approx(official)
    late = [lr_at(o, 160 + 300, spe, e * spe, 0 if e < 160 else 160 * spe) for e in range(160 + 300)]
    assert late != pytest.approx(_official_lrs(160))  # a rejuvenation after epoch 150: the official lr is still 0.1


# ------------------------------------------------------------------------------------------ schema
def test_grid_expansion_names_cells_and_seeds():
    space = parse_search_space(doc(repeat=2, tags={"table": "table4", "cell": "{method}/tr{nr.tr}"}), "x.yaml")
    rows = expand_trials(space)
    assert space.num_trials == len(rows) == 8
    assert rows[0]["name"] == "BL-vgg_small-tr0.5-s0"
    assert {r["values"]["seed"] for r in rows} == {0, 1}
    assert {r["cell"] for r in rows} == {"BL/tr0.5", "BL/tr0.25", "NR-CR/tr0.5", "NR-CR/tr0.25"}
    cfg = space.trial_config({"method": "NR-CR", "nr.tr": 0.25, REPEAT_KEY: 1})
    assert cfg["method"] == "NR-CR" and cfg["nr"]["tr"] == 0.25 and cfg["seed"] == 1
    tags = space.trial_tags(cfg, space.trial_values({"method": "NR-CR", "nr.tr": 0.25, REPEAT_KEY: 1}))
    assert tags["nr.table"] == "table4" and tags["nr.cell"] == "NR-CR/tr0.25" and tags["nr.sweep"] == "t"


def test_resolve_trial_once():
    """One call gives the trial's validated Config (the file's base as written + the swept values, this sweep's
    experiment, its run name, the trial's CPUs as threads, the data root), its run name and its tags."""
    from nr_study.config import Config

    space = parse_search_space(doc(repeat=2, resources_per_trial={"cpu": 2}, tags={"table": "table4", "cell": "{method}/tr{nr.tr}"}),
                               "x.yaml")
    ray_config = {"method": "NR-CR", "nr.tr": 0.25, REPEAT_KEY: 1}
    cfg, name, tags = space.resolve_trial(ray_config, data_root="/data")
    assert isinstance(cfg, Config) and cfg.method == "NR-CR" and cfg.nr.tr == 0.25 and cfg.seed == 1
    assert name == "NR-CR-vgg_small-tr0.25-s1" == cfg.tracking.run_name and cfg.tracking.experiment == space.experiment
    assert cfg.train.threads == 2 and cfg.data.root == "/data" and cfg.model.kwargs == {"width": 4}
    assert tags == {"nr.table": "table4", "nr.cell": "NR-CR/tr0.25", "nr.sweep": "t"}
    pinned = parse_search_space(doc(base=dict(DOC["base"], train={"epochs": 2, "threads": 3},
                                              data={"name": "synthetic", "root": "/mine"})), "x.yaml")
    cfg, _, _ = pinned.resolve_trial({"method": "BL", "nr.tr": 0.5}, data_root="/data")
    assert cfg.train.threads == 3 and cfg.data.root == "/mine"  # what the file sets wins


def test_aliases_and_all_distributions():
    d = doc(search="random", num_samples=3, space={
        "model.arch": {"choice": ["vgg_small"]}, "train.seed": {"randint": [0, 10]},
        "nr.delta_lambda": {"loguniform": ["1e-5", 1e-3]}, "nr.delta_r": {"uniform": [0.005, 0.05]},
        "nr.max_rejuvenations": {"randint": [0, 6]}, "nr.target_ratio": {"uniform": [0.6, 1.0]},
        "nr.constraint": ["params", "flops"], "nr.scheme": {"choice": ["cr", "ca"]}, "nr.rescale": [True, False],
        "method": ["NR", "NR-CA"], "nr.tr": {"uniform": [0.2, 0.6]}})
    space = parse_search_space(d, "x.yaml")
    keys = {x.key for x in space.dims}
    assert {"model.name", "seed", "nr.delta_lambda"} <= keys
    assert space.num_trials == 3 * 2 * 2 * 2
    ps = space.param_space()
    assert "grid_search" in ps["method"] and "seed" in ps


def test_variants():
    d = doc(space={"variant": [{"method": "BL"}, {"method": "NR-CR", "nr.tr": 0.3, "name": "cr"}]})
    space = parse_search_space(d, "x.yaml")
    rows = expand_trials(space)
    assert [r["name"] for r in rows] == ["BL-vgg_small-s0", "NR-CR-vgg_small-tr0.3-s0"]
    assert space.trial_config({"variant": "cr"})["nr"]["tr"] == 0.3
    # a named variant is the trial's cell; an unnamed one is labelled by its settings
    assert space.resolve_trial({"variant": "cr"})[2]["nr.cell"] == "cr"
    assert space.resolve_trial({"variant": "BL"})[2]["nr.cell"] == "BL"
    assert errors_of(doc(space={"variant": [{"method": "XX"}]}))[0].startswith("x.yaml: space.variant[0]: method")


def test_search_forms():
    s = parse_search_space(doc(search={"type": "optuna", "objectives": [{"test_err": "min"}, {"params": "min"}]},
                               num_samples=5), "x.yaml")
    assert s.sampler == "nsga2" and s.objectives == [("test_err", "min"), ("params", "min")]
    assert s.num_trials == 5
    s = parse_search_space(doc(search={"type": "optuna", "sampler": "TPE", "objectives": {"test_err": "min"}},
                               num_samples=4, repeat=2), "x.yaml")
    assert s.sampler == "tpe" and s.num_trials == 8 and not s.multi_objective
    s = parse_search_space(doc(scheduler={"type": "asha", "grace_period": 1}), "x.yaml")
    assert s.scheduler == {"type": "asha", "metric": "test_err", "mode": "min", "grace_period": 1, "max_t": 2,
                           "brackets": 1, "reduction_factor": 2.0}
    s = parse_search_space(doc(resources_per_trial={"cpu": 2, "gpu": 0.25}), "x.yaml")
    assert (s.cpu, s.gpu) == (2.0, 0.25)


@pytest.mark.parametrize("bad, expect", [
    ({"nmae": "x"}, "x.yaml: nmae: unknown key; did you mean 'name'?"),
    ({"name": "a b"}, "x.yaml: name: 'a b' is not allowed"),
    ({"space": {"nr.tr": {"grid": [0.5, 1.5]}}}, "x.yaml: space.nr.tr.grid[1]: nr.tr: 1.5 is out of range"),
    ({"space": {"nr.tr": {"gird": [0.5]}}}, "x.yaml: space.nr.tr: 'gird' is not allowed; allowed: grid, choice"),
    ({"space": {"nr.tx": [0.5]}}, "x.yaml: space.nr.tx: nr.tx: unknown key; did you mean 'nr.tr'?"),
    ({"space": {"nr.tr": 0.5}}, "x.yaml: space.nr.tr: 0.5 is not allowed"),
    ({"space": {"nr.delta_lambda": {"loguniform": [0, 1e-3]}}}, "x.yaml: space.nr.delta_lambda.loguniform: [0, 0.001] is"),
    ({"space": {"nr.tr": {"uniform": [0.2, 0.5]}}}, "x.yaml: space.nr.tr: uniform is not allowed with search: grid"),
    ({"space": {"method": ["BL", "NR-XX"]}}, "x.yaml: space.method.grid[1]: method: 'NR-XX' is not allowed"),
    ({"space": {"model.arch": ["vgg_smal"]}}, "x.yaml: space.model.arch: 'vgg_smal' is not allowed"),
    ({"search": "bayes"}, "x.yaml: search: 'bayes' is not allowed; allowed: grid, random, optuna"),
    ({"search": {"type": "optuna", "sampler": "cmaes"}}, "x.yaml: search.sampler: 'cmaes' is not allowed"),
    ({"search": {"type": "optuna", "objectives": [{"tset_err": "min"}]}},
     "x.yaml: search.objectives: 'tset_err' is not allowed"),
    ({"search": {"type": "optuna", "objectives": [{"test_err": "low"}]}},
     "x.yaml: search.objectives.test_err: 'low' is not allowed; allowed: min, max"),
    ({"scheduler": "hyperband"}, "x.yaml: scheduler.type: 'hyperband' is not allowed; allowed: fifo, asha"),
    ({"scheduler": {"type": "asha", "grace_period": 5}}, "x.yaml: scheduler.grace_period: 5 is not allowed"),
    ({"num_samples": 0}, "x.yaml: num_samples: 0 is not allowed; allowed: an integer >= 1"),
    ({"num_samples": 2}, "x.yaml: num_samples: 2 is not allowed with search: grid"),
    ({"repeat": 2, "space": {"seed": [1, 2]}}, "x.yaml: repeat: 2 is not allowed while seed is a space dimension"),
    ({"resources_per_trial": {"cpu": 0}}, "x.yaml: resources_per_trial.cpu: 0 is not allowed"),
    ({"resources_per_trial": {"gpu": 1.5}}, "x.yaml: resources_per_trial.gpu: 1.5 is not allowed"),
    ({"resources_per_trial": {"tpu": 1}}, "x.yaml: resources_per_trial.tpu: unknown key"),
    ({"base": {"train": {"device": "cuda"}}}, "x.yaml: resources_per_trial.gpu: 0 is not allowed with base train"),
    ({"max_failures": -1}, "x.yaml: max_failures: -1 is not allowed"),
    ({"tags": {"cell": "{nr.nope}"}}, "x.yaml: tags.cell: '{nr.nope}' names unknown config key 'nr.nope'"),
    ({"base": {"train": {"epochs": 0}}}, "x.yaml: base.train.epochs: 0 is out of range"),
    ({"base": {"optim": {"lrr": 0.1}}}, "x.yaml: base.optim.lrr: unknown key; did you mean 'optim.lr'?"),
])
def test_bad_fields_give_one_clear_line(bad, expect):
    d = doc()
    d.update(bad)
    lines = errors_of(d)
    assert any(line.startswith(expect) for line in lines), lines


def test_several_errors_are_all_listed():
    lines = errors_of(doc(search="bayes", num_samples=0, space={"nr.tr": {"grid": [2]}}))
    assert len(lines) == 3
    assert all(line.startswith("x.yaml: ") for line in lines)


def test_overrides(tmp_path):
    p = tmp_path / "s.yaml"
    p.write_text(yaml.safe_dump(DOC))
    s = load_search_space(p, ["train.epochs=1", "repeat=3", "space.nr.tr=[0.1]", "space.method=NR-CR",
                              "base.optim.lr=0.01", "tags.table=x"])
    assert s.base["train"]["epochs"] == 1 and s.base["optim"]["lr"] == 0.01 and s.repeat == 3
    assert [d.key for d in s.dims] == ["nr.tr"] and s.base["method"] == "NR-CR"
    assert s.tags["table"] == "x"
    with pytest.raises(ConfigError, match="malformed override"):
        load_search_space(p, ["nonsense"])


def test_yaml_syntax_and_missing_file(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("name: x\nbase: [unclosed\n")
    with pytest.raises(ConfigError, match="bad.yaml:.*YAML syntax error"):
        load_search_space(p)
    with pytest.raises(ConfigError, match="not found"):
        load_search_space(tmp_path / "missing.yaml")


def test_format_template():
    full = {"method": "NR", "nr": {"tr": 0.25}, "model": {"name": "vgg_small"}}
    assert format_template("{model.arch}/{method}/{nr.tr:.2f}", full) == "vgg_small/NR/0.25"


# ------------------------------------------------------------------------------------------ CLI
def test_cli_dry_run_prints_trials_and_resources(capsys):
    from nr_study.cli import main

    rc = main(["sweep", str(REPO / "search_spaces" / "demo.yaml"), "--dry-run"])
    out = capsys.readouterr().out
    assert rc == 0
    assert "trials: 5" in out and "resources per trial: 1 CPU, 0 GPU" in out
    assert "NR-CA-vgg_small-tr0.7-s0" in out and "BL-vgg_small-s0" in out


def test_cli_dry_run_optuna_and_set(capsys):
    from nr_study.cli import main

    rc = main(["sweep", str(REPO / "search_spaces" / "pareto_optuna.yaml"), "--dry-run", "--set", "num_samples=3"])
    out = capsys.readouterr().out
    assert rc == 0 and "NSGA-II" in out and "proposed by Optuna" in out


def test_cli_bad_yaml_exits_2_with_one_line_per_field(tmp_path, capsys):
    from nr_study.cli import main

    p = tmp_path / "bad.yaml"
    p.write_text(yaml.safe_dump(doc(search="bayes", space={"nr.tr": [3]})))
    rc = main(["sweep", str(p), "--dry-run"])
    err = capsys.readouterr().err
    assert rc == 2
    assert f"{p}: search: 'bayes' is not allowed" in err and f"{p}: space.nr.tr.grid[0]: nr.tr: 3" in err
    assert "Traceback" not in err


def test_pareto_front():
    from nr_study.analysis.stats import pareto_front

    pts = [{"e": 10, "p": 5}, {"e": 8, "p": 9}, {"e": 12, "p": 6}, {"e": 8, "p": 9.5}, {"e": 20, "p": 1}]
    front = pareto_front(pts, [("e", "min"), ("p", "min")])
    assert front == [{"e": 8, "p": 9}, {"e": 10, "p": 5}, {"e": 20, "p": 1}]


# ------------------------------------------------------------------------------------------ paired baselines
def test_pair_with_is_validated_up_front():
    ok = parse_search_space(doc(space={"method": ["NR", "NR-CR"]}, pair_with="BL",
                                search={"type": "optuna", "objectives": ["delta_test_err: min"]}), "x.yaml")
    assert ok.pair_with == "BL" and ok.objectives == [("delta_test_err", "min")]
    # the pair itself among the trials (a dimension, or base's method when nothing sweeps it)
    assert any("pair_with: BL: method BL is the paired baseline itself" in e
               for e in errors_of(doc(pair_with="BL")))
    assert any("method BL is the paired baseline" in e
               for e in errors_of(doc(space={"variant": [{"method": "NR"}, {"method": "BL"}]}, pair_with="BL")))
    # every variant sets the method: base's BL never trains, so nothing to refuse
    parse_search_space(doc(space={"variant": [{"method": "NR"}, {"method": "NR-CR", "nr.tr": 0.3}]}, pair_with="BL"),
                       "x.yaml")
    # the paper's protocol pairs too: a reset_epochs trial gets a BL at equal epochs and one at equal compute
    parse_search_space(doc(space={"method": ["NR"], "train.after_rejuvenation": {"choice": ["continue", "reset_epochs"]}},
                           pair_with="BL", search="random"), "x.yaml")
    assert any("pair_with: 'BLX' is not allowed; allowed: one of BL" in e
               for e in errors_of(doc(space={"method": ["NR"]}, pair_with="BLX")))
    # the paired metric needs a pair
    for kw in ({"search": {"type": "optuna", "objectives": ["delta_test_err: min"]}},
               {"scheduler": {"type": "asha", "metric": "delta_test_err", "mode": "min"}}):
        assert any("delta_test_err is only allowed with pair_with" in e
                   for e in errors_of(doc(space={"method": ["NR"]}, **kw)))


def test_distinct_labels_never_merge_configurations():
    from nr_study.labels import distinct_labels

    items = [("NR", {"nr.tr": 0.5, "w": 8}), ("NR", {"nr.tr": 0.5, "w": 8}),  # one configuration, two seeds
             ("NR", {"nr.tr": 0.123456, "w": 8}), ("BL", {"w": 8}), ("BL", {"w": 16})]
    assert distinct_labels(items) == ["NR [tr=0.5]", "NR [tr=0.5]", "NR [tr=0.1235]", "BL [w=8]", "BL [w=16]"]
    # more keys than the label shows: still one label per configuration
    many = [("c", {f"k{i}": int(i == j) for i in range(6)}) for j in range(6)]
    labels = distinct_labels(many)
    assert len(set(labels)) == 6 and all(lab.endswith(("...]", "#5", "#6")) for lab in labels), labels


def test_reuse_actors_defaults_to_true_and_takes_only_booleans():
    assert parse_search_space(doc(), "x.yaml").reuse_actors is True
    assert parse_search_space(doc(reuse_actors=False), "x.yaml").reuse_actors is False
    assert any(line.startswith("x.yaml: reuse_actors: ") and "allowed: true, false" in line
               for line in errors_of(doc(reuse_actors="yes")))


@pytest.mark.parametrize("epochs,rejuvenations,protocol,want", [
    (2, None, "continue", 2), (2, None, "reset_epochs", 4), ({"choice": [2, 5]}, None, "reset_epochs", 10),
    (3, {"choice": [1, 3]}, "reset_epochs", 12), (3, 2, {"choice": ["continue", "reset_epochs"]}, 9),
    ({"randint": [2, 6]}, None, "restart_schedule", 6)])
def test_asha_horizon_covers_the_longest_trial(epochs, rejuvenations, protocol, want):
    """ASHA ends a trial at max_t epochs as if complete: max_t defaults to the most epochs any trial can train
    (reset_epochs restarts the count at each rejuvenation) and a smaller one is refused, one line."""
    space = {"method": ["BL", "NR"]}
    for key, v in (("train.epochs", epochs), ("nr.max_rejuvenations", rejuvenations),
                   ("train.after_rejuvenation", protocol)):
        if isinstance(v, dict):
            space[key] = v
        elif v is not None:
            space.setdefault("_base", {})[key] = v
    base = space.pop("_base", {})
    d = doc(space=space, search="random" if any(isinstance(v, dict) for v in space.values()) else "grid",
            scheduler={"type": "asha", "metric": "test_err", "mode": "min"})
    for key, v in base.items():
        section, name = key.split(".")
        d["base"].setdefault(section, {})[name] = v
    assert parse_search_space(d, "x.yaml").scheduler["max_t"] == want
    d["scheduler"]["max_t"] = want - 1
    with pytest.raises(ConfigError) as e:
        parse_search_space(d, "x.yaml")
    assert str(e.value).count("\n") == 0 and f"scheduler.max_t: {want - 1} is not allowed; allowed: >= {want}" \
        in str(e.value)


@pytest.mark.parametrize("base_nr,space,refused", [
    ({"target_ratio": 0.5}, {"method": ["NR-CR"], "nr.tr": [0.3, 0.6]}, True),
    ({"target_ratio": 0.5}, {"method": ["BL"], "nr.tr": [0.3, 0.6]}, False),  # BL never runs NR's hook
    ({"target_ratio": 0.5, "tr": 0.4}, {"method": ["NR", "SLIM"]}, False),
    ({}, {"method": ["NR"], "nr.target_ratio": {"uniform": [0.3, 1.0]}, "nr.tr": {"uniform": [0.2, 0.4]}}, True),
    ({}, {"method": ["NR"], "nr.target_ratio": {"uniform": [0.3, 1.0]}, "nr.tr": {"uniform": [0.1, 0.3]}}, False),
    ({}, {"variant": [{"method": "NR-CR", "nr.tr": 0.7, "nr.target_ratio": 1.0},
                      {"method": "NR-CR", "nr.tr": 0.2, "nr.target_ratio": 0.25}, {"method": "BL"}]}, False),
    ({}, {"variant": [{"method": "NR-CR", "nr.tr": 0.7, "nr.target_ratio": 1.0},
                      {"method": "NR-CA", "nr.tr": 0.5, "nr.target_ratio": 0.25}]}, True),
])
def test_tr_above_the_target_is_refused_up_front(base_nr, space, refused):
    """NR's hook refuses nr.tr above nr.target_ratio (a rejuvenation keeps every live channel): the space says so
    before anything runs, exactly per variant, over a sampled dimension's whole range, and only for NR methods."""
    d = doc(space=space, search="random" if any(isinstance(v, dict) and ("uniform" in v) for v in space.values())
            else "grid")
    d["base"]["nr"] = dict(base_nr)
    if not refused:
        parse_search_space(d, "x.yaml")
        return
    lines = errors_of(d)
    assert len(lines) == 1 and "nr.tr:" in lines[0] and "allowed: nr.tr <= nr.target_ratio" in lines[0], lines
