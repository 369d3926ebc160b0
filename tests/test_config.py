"""Config: defaults, round trip, one-line errors (through the CLI: exit code 2), overrides, dotted keys."""
from __future__ import annotations

import pytest
import yaml

from nr_study import cli
from nr_study.config import (
    Config, apply_overrides, config_from_dict, config_to_dict, flatten, load_config, parse_override, set_dotted,
)
from nr_study.errors import ConfigError
from nr_study.methods import METHODS, resolved_nr


def test_defaults_and_round_trip():
    cfg = config_from_dict({})
    assert cfg == Config()
    d = config_to_dict(cfg)
    assert config_from_dict(yaml.safe_load(yaml.safe_dump(d))) == cfg
    assert d["nr"]["tr"] == 0.5 and d["nr"]["delta_lambda"] == 5e-5 and d["data"]["synthetic"]["shape"] == [1, 28, 28]


def test_flatten_and_yaml_float_strings():
    cfg = config_from_dict({"nr": {"delta_lambda": "5e-5"}, "model": {"kwargs": {"width": 4}}})
    assert cfg.nr.delta_lambda == 5e-5  # YAML 1.1 reads 5e-5 as a string; accepted for float fields
    flat = flatten(config_to_dict(cfg))
    assert flat["nr.delta_lambda"] == 5e-5 and flat["model.kwargs.width"] == 4 and flat["fs.run_id"] is None


@pytest.mark.parametrize("d, expected", [
    ({"model": {"nmae": "x"}}, "model.nmae: unknown key; did you mean 'model.name'?"),
    ({"nr": {"tr": 1.0}}, "nr.tr: 1.0 is out of range; allowed: 0 < tr < 1"),
    ({"nr": {"delta_r": 0}}, "nr.delta_r: 0.0 is out of range; allowed: delta_r > 0"),
    ({"nr": {"delta_lambda": -1e-5}}, "nr.delta_lambda: -1e-05 is out of range; allowed: delta_lambda >= 0"),
    ({"nr": {"target_ratio": 1.5}}, "nr.target_ratio: 1.5 is out of range; allowed: 0 < target_ratio <= 1"),
    ({"train": {"epochs": 0}}, "train.epochs: 0 is out of range; allowed: epochs >= 1"),
    ({"train": {"batch_size": "big"}}, "train.batch_size: 'big' has type str; expected int"),
    ({"method": "NRX"}, "method: 'NRX' is not allowed; allowed: one of " + ", ".join(METHODS) + "; did you mean 'NR'?"),
    ({"data": {"name": "cifar"}}, "data.name: 'cifar' is not allowed; allowed: one of fashion_mnist, cifar10, "
                                  "cifar100, imagenet, synthetic; did you mean 'cifar10'?"),
    ({"optim": {"schedule": "cos"}}, "optim.schedule: 'cos' is not allowed; allowed: one of step, cosine, "
                                     "constant; did you mean 'cosine'?"),
    ({"train": {"channels_last": "yes"}}, "train.channels_last: 'yes' has type str; expected bool"),
    ({"method": "NR-FS"}, "fs.run_id: null is not allowed for method NR-FS; set fs.run_id or fs.architecture_file"),
])
def test_one_line_errors(d, expected):
    with pytest.raises(ConfigError) as ei:
        config_from_dict(d)
    assert str(ei.value) == expected


def test_several_errors_one_line_each():
    with pytest.raises(ConfigError) as ei:
        config_from_dict({"nr": {"tr": 0, "delta_r": -1}, "train": {"epochs": 0}})
    lines = str(ei.value).splitlines()
    assert len(lines) == 3 and lines[0].startswith("nr.tr:") and lines[2].startswith("train.epochs:")


def test_set_dotted_and_overrides():
    d = {}
    set_dotted(d, "nr.tr", 0.3)
    set_dotted(d, "model.kwargs.width", 4)  # free-form mapping: any sub-key
    set_dotted(d, "tracking.tags.nr.table", "t1")
    assert d == {"nr": {"tr": 0.3}, "model": {"kwargs": {"width": 4}}, "tracking": {"tags": {"nr.table": "t1"}}}
    with pytest.raises(ConfigError, match=r"^nr\.trr: unknown key; did you mean 'nr\.tr'\?$"):
        set_dotted(d, "nr.trr", 1)
    with pytest.raises(ConfigError, match="is a value, not a section"):
        set_dotted(d, "nr.tr.x", 1)
    assert parse_override("optim.milestones=[5, 8]") == ("optim.milestones", [5, 8])
    assert parse_override("nr.lambda_max=null") == ("nr.lambda_max", None)
    cfg = config_from_dict(apply_overrides({}, ["method=NR-CA-BR", "nr.rescale=false"]))
    assert resolved_nr(cfg) == {"nr": True, "scheme": "ca", "rescale": False, "realloc": True}
    with pytest.raises(ConfigError, match="malformed override; expected KEY=VALUE"):
        parse_override("nr.tr")
    with pytest.raises(ConfigError, match="the key before '=' is empty"):
        parse_override("=3")


def test_yaml_syntax_error_has_line(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("method: NR\nnr:\n  tr: [0.5\n  delta_r: 0.01\n")
    with pytest.raises(ConfigError) as ei:
        load_config(p)
    msg = str(ei.value)
    assert msg.startswith(f"{p}:") and "YAML syntax error" in msg and len(msg.splitlines()) == 1
    line = int(msg.split(":")[1])
    assert 3 <= line <= 5


def _cli(tmp_path, capsys, text, *extra):
    p = tmp_path / "c.yaml"
    p.write_text(text)
    rc = cli.main(["train", str(p), *extra])
    return rc, capsys.readouterr().err.strip().splitlines()


@pytest.mark.parametrize("text, extra, needle", [
    ("method: NR\nnr:\n  tr: 1.5\n", (), "nr.tr: 1.5 is out of range; allowed: 0 < tr < 1"),
    ("method: BL\nmodle: {name: x}\n", (), "modle: unknown key; did you mean 'model'?"),
    ("method: BL\n", ("--set", "train.epochs=0"), "train.epochs: 0 is out of range; allowed: epochs >= 1"),
    ("method: BL\n", ("--set", "train.epochs"), "--set 'train.epochs': malformed override; expected KEY=VALUE"),
    ("method: BL\n", ("--set", "optim.sched=cosine"), "optim.sched: unknown key; did you mean 'optim.schedule'?"),
    ("method: [\n", (), "YAML syntax error"),
])
def test_cli_config_errors_exit_2(tmp_path, capsys, text, extra, needle):
    rc, err = _cli(tmp_path, capsys, text, *extra)
    assert rc == 2
    assert len(err) == 1 and err[0].startswith("error: ") and needle in err[0]


def test_example_configs_load():
    from pathlib import Path

    files = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))
    assert files
    for f in files:
        load_config(f)


def test_after_rejuvenation_and_its_old_name():
    """optim.restart_after_rejuvenation still works: true is train.after_rejuvenation restart_schedule."""
    assert config_from_dict({}).train.after_rejuvenation == "continue"
    assert config_from_dict({"optim": {"restart_after_rejuvenation": True}}).train.after_rejuvenation == \
        "restart_schedule"
    assert config_from_dict({"optim": {"restart_after_rejuvenation": False}}).train.after_rejuvenation == "continue"
    cfg = config_from_dict({"train": {"after_rejuvenation": "reset_epochs"}})
    assert config_from_dict(config_to_dict(cfg)) == cfg
    with pytest.raises(ConfigError) as ei:
        config_from_dict({"optim": {"restart_after_rejuvenation": True}, "train": {"after_rejuvenation": "reset_epochs"}})
    assert str(ei.value) == ("optim.restart_after_rejuvenation: true contradicts train.after_rejuvenation "
                             "'reset_epochs'; drop the old key (true = restart_schedule, false = continue)")
    with pytest.raises(ConfigError, match=r"train.after_rejuvenation: 'reset' is not allowed; allowed: one of "
                                          r"continue, restart_schedule, reset_epochs; did you mean 'reset_epochs'\?"):
        config_from_dict({"train": {"after_rejuvenation": "reset"}})
