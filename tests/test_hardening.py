"""Hardening: bad input, faults and safety, through the real CLI (`nr_study.cli.main`).

Bad input: exit code 2, stderr is exactly one line starting with "error:", and nothing was written (no runs/
folder or MLflow DB, no checkpoint folder). Faults while running: one line, exit 1, the run FAILED and the last
checkpoint intact. Ctrl-C: the run ends KILLED, exit 130. docs/reliability.md lists every case below.
"""
from __future__ import annotations

import contextlib

import errno
import os
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from mlflow.tracking import MlflowClient

from nr_study import cli
from nr_study import tracking as T
from nr_study import train as TR
from nr_study.errors import ConfigError
from tests.procs import with_signals

ROOT = Path(__file__).resolve().parents[1]
TINY = {
    "method": "BL",
    "model": {"name": "vgg_small", "kwargs": {"width": 8}},
    "data": {"name": "synthetic", "n_train": 64, "n_test": 32, "synthetic": {"shape": [1, 8, 8]}},
    "optim": {"lr": 0.05},
    "train": {"epochs": 2, "batch_size": 16, "threads": 1},
    "tracking": {"experiment": "hardening"},
}


def _deep(base: dict, **sections) -> dict:
    d = yaml.safe_load(yaml.safe_dump(base))
    for k, v in sections.items():
        if isinstance(v, dict) and isinstance(d.get(k), dict):
            d[k].update(v)
        else:
            d[k] = v
    return d


def _files(root: Path) -> set:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


@pytest.fixture
def sandbox(tmp_path, monkeypatch):
    """A fresh working folder: default runs/ and checkpoints resolve inside it, nothing from the environment."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("NR_STUDY_TRACEBACK", raising=False)
    monkeypatch.setenv("NR_STUDY_RUNS", str(tmp_path / "runs"))
    return tmp_path


def run_cli(capsys, *argv) -> tuple[int, list[str], str]:
    rc = cli.main(["train", *map(str, argv)])
    cap = capsys.readouterr()
    return rc, [ln for ln in cap.err.splitlines() if ln.strip()], cap.out


def expect_bad_input(sandbox: Path, capsys, cfg, *extra, needles=(), ckpt: bool = True) -> str:
    """Write `cfg` (dict or raw YAML text), run `nr-study train` on it; assert exit 2, one `error:` line
    containing every needle, and no new file anywhere in the sandbox. Returns the line."""
    path = sandbox / "cfg.yaml"
    if cfg is not None:
        path.write_text(cfg if isinstance(cfg, str) else yaml.safe_dump(cfg))
    args = [path, *extra] + (["--checkpoint-dir", sandbox / "ck"] if ckpt else [])
    before = _files(sandbox)
    rc, err, _ = run_cli(capsys, *args)
    assert rc == 2, err
    assert len(err) == 1 and err[0].startswith("error: "), err
    for n in needles:
        assert n in err[0], (n, err[0])
    assert _files(sandbox) == before  # no runs/, no mlflow.db, no checkpoint folder
    return err[0]


# ------------------------------------------------------------------------------------------ bad config values
CONFIG_CASES = [
    ("yaml_syntax", "method: BL\nnr:\n  tr: [0.5\n  delta_r: 0.01\n", (), ["YAML syntax error", "cfg.yaml:"]),
    ("top_level_list", "- method\n- BL\n", (), ["top level must be a mapping"]),
    ("unknown_key", _deep(TINY, modle={"name": "x"}), (), ["modle: unknown key; did you mean 'model'?"]),
    ("unknown_nested_key", _deep(TINY, nr={"trr": 0.3}), (), ["nr.trr: unknown key; did you mean 'nr.tr'?"]),
    ("wrong_type", _deep(TINY, train={"epochs": "ten"}), (), ["train.epochs: 'ten' has type str; expected int"]),
    ("wrong_type_bool", _deep(TINY, data={"download": "yes"}), (), ["data.download: 'yes' has type str"]),
    ("tr_above_1", _deep(TINY, nr={"tr": 1.5}), (), ["nr.tr: 1.5 is out of range; allowed: 0 < tr < 1"]),
    ("tr_zero", _deep(TINY, nr={"tr": 0}), (), ["nr.tr: 0.0 is out of range; allowed: 0 < tr < 1"]),
    ("delta_r_zero", _deep(TINY, nr={"delta_r": 0}), (), ["nr.delta_r: 0.0 is out of range; allowed: delta_r > 0"]),
    ("delta_lambda_negative", _deep(TINY, nr={"delta_lambda": -1e-4}), (),
     ["nr.delta_lambda: -0.0001 is out of range; allowed: delta_lambda >= 0"]),
    ("target_ratio_zero", _deep(TINY, nr={"target_ratio": 0}), (), ["nr.target_ratio: 0.0 is out of range",
                                                                     "0 < target_ratio <= 1"]),
    ("target_ratio_above_1", _deep(TINY, nr={"target_ratio": 1.5}), (), ["nr.target_ratio: 1.5 is out of range"]),
    ("negative_epochs", _deep(TINY, train={"epochs": -3}), (), ["train.epochs: -3 is out of range; allowed: "
                                                                 "epochs >= 1"]),
    ("batch_size_zero", _deep(TINY, train={"batch_size": 0}), (), ["train.batch_size: 0 is out of range"]),
    ("nan_lr", "method: BL\noptim: {lr: .nan}\n", (), ["optim.lr: nan is out of range"]),
    ("unknown_method", _deep(TINY, method="NR-XX"), (), ["method: 'NR-XX' is not allowed; allowed: one of BL"]),
    ("unknown_dataset", _deep(TINY, data={"name": "cifar11"}), (), ["data.name: 'cifar11' is not allowed",
                                                                     "did you mean 'cifar10'?"]),
    ("unknown_scheme", _deep(TINY, method="NR", nr={"scheme": "cx"}), (), ["nr.scheme: 'cx' is not allowed",
                                                                          "one of nr, cr, ca"]),
    ("nr_fs_without_source", _deep(TINY, method="NR-FS"), (), ["fs.run_id: null is not allowed for method NR-FS"]),
    ("set_without_equals", _deep(TINY), ("--set", "train.epochs"), ["--set 'train.epochs': malformed override; "
                                                                      "expected KEY=VALUE"]),
    ("set_empty_key", _deep(TINY), ("--set", "=3"), ["the key before '=' is empty"]),
    ("set_bad_yaml_value", _deep(TINY), ("--set", "optim.milestones=[2"), ["value is not valid YAML"]),
    ("set_unknown_key", _deep(TINY), ("--set", "optim.sched=cosine"), ["optim.sched: unknown key; did you mean "
                                                                       "'optim.schedule'?"]),
    ("set_out_of_range", _deep(TINY), ("--set", "nr.tr=2"), ["nr.tr: 2.0 is out of range"]),
    ("bad_command_line", _deep(TINY), ("--epochs", "3"), ["nr-study train: unrecognized arguments: --epochs 3"]),
    # found only when the model is built: the line still names the file
    ("unknown_model", _deep(TINY, model={"name": "nope"}), (), ["cfg.yaml: model: unknown architecture 'nope'"]),
    ("set_bad_model_kwargs", _deep(TINY), ("--set", "model.kwargs={width: -3}"),
     ["cfg.yaml: model: vgg_small width must be a positive integer, got -3"]),
]


@pytest.mark.parametrize("name, cfg, extra, needles", CONFIG_CASES, ids=[c[0] for c in CONFIG_CASES])
def test_bad_config_is_one_line_exit_2(name, cfg, extra, needles, sandbox, capsys):
    expect_bad_input(sandbox, capsys, cfg, *extra, needles=needles)


def test_yaml_syntax_error_names_the_line(sandbox, capsys):
    line = expect_bad_input(sandbox, capsys, "method: BL\nnr:\n  tr: [0.5\n  delta_r: 0.01\n")
    assert re.search(r"cfg\.yaml:[3-5]: YAML syntax error", line), line


def test_config_file_missing(sandbox, capsys):
    before = _files(sandbox)
    rc, err, _ = run_cli(capsys, sandbox / "nope.yaml")
    assert rc == 2 and err == [f"error: {sandbox / 'nope.yaml'}: config file not found"]
    assert _files(sandbox) == before


def test_several_bad_fields_one_error_line_each(sandbox, capsys):
    (sandbox / "cfg.yaml").write_text(yaml.safe_dump(_deep(TINY, nr={"tr": 0, "delta_r": -1})))
    rc, err, _ = run_cli(capsys, sandbox / "cfg.yaml")
    assert rc == 2 and len(err) == 2 and all(e.startswith("error: ") for e in err)
    assert sorted(e.split(": ")[2] for e in err) == ["nr.delta_r", "nr.tr"]


# --------------------------------------------------------------------------------- bad input found at build time
def test_unknown_architecture(sandbox, capsys):
    expect_bad_input(sandbox, capsys, _deep(TINY, model={"name": "vgg_smal", "kwargs": {}}),
                     needles=["unknown architecture 'vgg_smal'", "did you mean 'vgg_small'?"])


def test_unknown_torchvision_architecture(sandbox, capsys):
    expect_bad_input(sandbox, capsys, _deep(TINY, model={"name": "tv:resnet19", "kwargs": {}}),
                     needles=["'tv:resnet19' is not a torchvision classification model"])


def test_architecture_option_unknown(sandbox, capsys):
    expect_bad_input(sandbox, capsys, _deep(TINY, model={"name": "vgg_small", "kwargs": {"depth": 3}}),
                     needles=["architecture 'vgg_small' has no option 'depth'"])


def test_missing_dataset_path(sandbox, capsys):
    expect_bad_input(sandbox, capsys, _deep(TINY, data={"name": "cifar10", "root": str(sandbox / "nodata")}),
                     needles=["cifar10:", "nodata", "data.download=true"])


def test_input_too_small_for_the_model_bl(sandbox, capsys):
    # vgg_small pools 4 times: a 2x2 input cannot pass; BL has no NR hook, the forward check catches it
    expect_bad_input(sandbox, capsys, _deep(TINY, data={"synthetic": {"shape": [1, 2, 2]}}),
                     needles=["model.name 'vgg_small' cannot take data.name 'synthetic' inputs of shape 1x2x2"])


def test_input_too_small_for_the_model_nr_core(sandbox, capsys):
    # a 128 px ImageNet VGG given 8x8 images: the NR core's graph tracing raises UnsupportedGraphError
    line = expect_bad_input(sandbox, capsys, _deep(TINY, method="NR", model={"name": "vgg19_simplified_imagenet",
                                                                            "kwargs": {}}),
                            needles=["'vgg19_simplified_imagenet' cannot take data.name 'synthetic' inputs of shape "
                                     "1x8x8"])
    assert "Output size is too small" in line


def test_nr_on_model_with_nothing_prunable(sandbox, capsys):
    # SqueezeNet has no BatchNorm: every channel group is fixed, NR could never do anything
    cfg = _deep(TINY, method="NR", model={"name": "tv:squeezenet1_1", "kwargs": {}},
                data={"synthetic": {"shape": [1, 32, 32]}})
    expect_bad_input(sandbox, capsys, cfg, needles=["method NR: model 'tv:squeezenet1_1' has no prunable channels",
                                                    "allowed here: method BL"])


def test_nr_tr_out_of_reach(sandbox, capsys):
    # even with every free channel dead but one per layer, vgg_small (width 8) keeps r(params) at 0.4%: refused
    expect_bad_input(sandbox, capsys, _deep(TINY, method="NR", nr={"tr": 0.001}),
                     needles=["method NR on model 'vgg_small': nr.tr: 0.001 cannot be reached", "allowed: tr > 0.00"])


def test_slim_on_model_with_nothing_prunable(sandbox, capsys):
    cfg = _deep(TINY, method="SLIM", model={"name": "tv:squeezenet1_1", "kwargs": {}},
                data={"synthetic": {"shape": [1, 32, 32]}})
    expect_bad_input(sandbox, capsys, cfg, needles=["method SLIM: model 'tv:squeezenet1_1' has no prunable"])


def test_cuda_requested_without_cuda(sandbox, capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    expect_bad_input(sandbox, capsys, _deep(TINY, train={"device": "cuda"}),
                     needles=["train.device: 'cuda' is not available"])


# ------------------------------------------------------------------------- files that are not what they should be
GARBAGE = bytes(range(256)) * 8  # not UTF-8 (0x80 at offset 128), not JSON, not SQLite, not a torch file
NR_FS = ["--set", "method=NR-FS", "--set", "fs.architecture_file={f}"]
# (id, file name, content, argv ({f}: that file, {cfg}: a good TINY config, {space}: a good search space,
#  {d}: the sandbox), needles)
FILE_CASES = [
    ("train_binary", "cfg.yaml", GARBAGE, ["train", "{f}"],
     ["{f}: not UTF-8 text YAML (byte 0x80 at offset 128); allowed: a UTF-8 text YAML config file"]),
    ("train_empty", "cfg.yaml", b"", ["train", "{f}"], ["{f}: empty config file (only whitespace or comments)"]),
    ("train_only_comments", "cfg.yaml", b"# to do\n\n   \n# method: NR\n", ["train", "{f}"],
     ["{f}: empty config file"]),
    ("train_empty_mapping", "cfg.yaml", b"{}\n", ["train", "{f}"], ["{f}: empty config file ({{}})"]),
    ("train_folder", "cfgdir", None, ["train", "{f}"], ["{f}: is a folder; allowed: a text YAML config file"]),
    ("sweep_binary", "space.yaml", GARBAGE, ["sweep", "{f}"],
     ["{f}: not UTF-8 text YAML", "allowed: a UTF-8 text YAML search space file"]),
    ("sweep_empty", "space.yaml", b"", ["sweep", "{f}"], ["{f}: empty search space file"]),
    ("sweep_only_comments_dry_run", "space.yaml", b"# name: x\n", ["sweep", "{f}", "--dry-run"],
     ["{f}: empty search space file"]),
    ("sweep_store_not_sqlite", "mlflow.db", GARBAGE, ["sweep", "{space}", "--runs", "{d}"],
     ["{f}: not an SQLite database"]),
    ("train_store_not_sqlite", "mlflow.db", GARBAGE, ["train", "{cfg}", "--tracking-uri", "sqlite:///{f}"],
     ["{f}: not an SQLite database; allowed: an MLflow database"]),
    ("tables_store_not_sqlite", "mlflow.db", GARBAGE, ["tables", "--tracking-uri", "sqlite:///{f}", "--out",
                                                       "{d}/report"], ["{f}: not an SQLite database"]),
    ("plots_store_not_sqlite", "mlflow.db", GARBAGE, ["plots", "--tracking-uri", "sqlite:///{f}", "--out",
                                                      "{d}/report"], ["{f}: not an SQLite database"]),
    ("nr_fs_widths_binary", "final_widths.json", GARBAGE, ["train", "{cfg}", *NR_FS],
     ["{f}: not UTF-8 text", "allowed: a UTF-8 text JSON final_widths.json architecture file"]),
    ("nr_fs_widths_not_json", "final_widths.json", b'{"architecture": [1,', ["train", "{cfg}", *NR_FS],
     ["{f}: not valid JSON (line 1: "]),
    ("nr_fs_model_pt_garbage", "model.pt", GARBAGE, ["train", "{cfg}", *NR_FS],
     ["{f}: not a readable nr_study model file ("]),
    ("nr_fs_model_pt_other_torch_file", "model.pt", "tensor", ["train", "{cfg}", *NR_FS],
     ["holds no architecture spec; allowed: the model.pt of an NR run"]),
]


@pytest.mark.parametrize("name, fname, content, argv, needles", FILE_CASES, ids=[c[0] for c in FILE_CASES])
def test_bad_file_is_one_line_exit_2(name, fname, content, argv, needles, sandbox, capsys):
    """Every command that reads a user file: a binary, empty, malformed or foreign file is one line naming it,
    exit 2, and nothing is written (no runs/, no checkpoint folder, no report folder)."""
    bad = sandbox / fname
    if content is None:
        bad.mkdir()
    elif content == "tensor":
        torch.save(torch.zeros(3), bad)
    else:
        bad.write_bytes(content)
    (sandbox / "tiny.yaml").write_text(yaml.safe_dump(TINY))
    (sandbox / "sweep.yaml").write_text(yaml.safe_dump({"name": "x", "base": TINY}))
    fill = dict(f=bad, cfg=sandbox / "tiny.yaml", space=sandbox / "sweep.yaml", d=sandbox)
    before = _files(sandbox)
    rc = cli.main([a.format(**fill) for a in argv])
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert rc == 2 and len(err) == 1 and err[0].startswith("error: "), err
    for n in needles:
        assert n.format(**fill) in err[0], (n, err[0])
    assert _files(sandbox) == before


def test_sweep_resume_of_a_garbage_state_file(sandbox, capsys):
    (sandbox / "space.yaml").write_text(yaml.safe_dump({"name": "x", "base": TINY}))
    (sandbox / "old").mkdir()
    (sandbox / "old" / "nr_sweep.json").write_bytes(b'["not", "a sweep"]')
    rc = cli.main(["sweep", str(sandbox / "space.yaml"), "--resume", str(sandbox / "old")])
    err = capsys.readouterr().err.splitlines()
    assert rc == 2 and err == [f"error: {sandbox / 'old' / 'nr_sweep.json'}: not an nr-study sweep state (no "
                               f"'document' mapping); allowed: the nr_sweep.json a sweep wrote"], err


def test_paper_results_file_goes_through_the_same_loader(sandbox):
    from nr_study.analysis.tables import load_paper

    (sandbox / "paper.yaml").write_bytes(GARBAGE)
    with pytest.raises(ConfigError, match=r"paper\.yaml: not UTF-8 text YAML .*allowed: a UTF-8 text YAML paper"):
        load_paper(sandbox / "paper.yaml")


# ------------------------------------------------------------------------------------------------ output folders
def test_checkpoint_folder_cannot_be_created(sandbox, capsys):
    (sandbox / "afile").write_text("x")
    (sandbox / "cfg.yaml").write_text(yaml.safe_dump(TINY))
    before = _files(sandbox)
    rc, err, _ = run_cli(capsys, sandbox / "cfg.yaml", "--checkpoint-dir", sandbox / "afile" / "sub")
    assert rc == 2 and len(err) == 1
    assert err[0].startswith("error: checkpoint folder") and "afile is a file, not a folder" in err[0]
    assert _files(sandbox) == before


def test_runs_folder_cannot_be_created(sandbox, capsys, monkeypatch):
    (sandbox / "afile").write_text("x")
    monkeypatch.setenv("NR_STUDY_RUNS", str(sandbox / "afile" / "runs"))
    line = expect_bad_input(sandbox, capsys, TINY, needles=["tracking store folder", "is a file, not a folder"])
    assert "afile" in line


@pytest.mark.parametrize("where", ["afile", "afile/sub"])
def test_sweep_runs_folder_that_cannot_be_made(where, sandbox, capsys):
    """`nr-study sweep --runs X` where X is a file, or lies under one: one line naming the run folder, exit 2,
    before Ray or MLflow start (it was an 'internal error' FileExistsError / NotADirectoryError)."""
    (sandbox / "afile").write_text("x")
    space = sandbox / "space.yaml"
    space.write_text(yaml.safe_dump({"name": "s", "base": TINY, "space": {"seed": [0]}}))
    before = _files(sandbox)
    rc = cli.main(["sweep", str(space), "--runs", str(sandbox / where)])
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert rc == 2 and len(err) == 1, err
    assert err[0].startswith("error: run folder (--runs / $NR_STUDY_RUNS)") and str(sandbox / where) in err[0], err
    assert _files(sandbox) == before


@pytest.mark.parametrize("flag, value, says", [
    ("--address", "notaport", "not a Ray address; allowed: auto"),
    ("--address", "127.0.0.1:99999", "not a Ray address; allowed: auto"),
    ("--address", "127.0.0.1:{free}", "nothing answers at 127.0.0.1:{free} (Connection refused)"),
    ("--address", "no-such-host.invalid:6379", "nothing answers at no-such-host.invalid:6379"),
    ("--tracking-uri", "ftp://x", "not an MLflow server address; allowed: http://host:port"),
    ("--tracking-uri", "http://", "not an MLflow server address"),
    ("--tracking-uri", "sqlite:///x.db", "SQLite takes one writer"),
])
def test_sweep_address_and_tracking_uri_refused_before_anything_is_written(flag, value, says, sandbox, capsys):
    """A Ray address nothing answers at used to hang in ray.init for minutes (a wrong host) or end in an
    'internal error' after the sweep folder, the MLflow server and the parent run existed (auto, no cluster)."""
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        free = s.getsockname()[1]
    space = sandbox / "space.yaml"
    space.write_text(yaml.safe_dump({"name": "s", "base": TINY, "space": {"seed": [0]}}))
    before = _files(sandbox)
    rc = cli.main(["sweep", str(space), flag, value.format(free=free)])
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert rc == 2 and len(err) == 1, err
    assert err[0].startswith(f"error: {flag} {value.format(free=free)}: {says.format(free=free)}"), err
    assert _files(sandbox) == before


@pytest.mark.parametrize("argv, env", [
    (["train", "{cfg}", "--tracking-uri", "ftp://x"], None),
    (["train", "{cfg}"], "ftp://x"),
    (["tables", "--experiment", "e", "--tracking-uri", "ftp://x"], None),
    (["plots", "--experiment", "e", "--tracking-uri", "ftp://x"], None),
    (["export", "abc", "{sandbox}/out", "--tracking-uri", "ftp://x"], None),
], ids=["train_flag", "train_env", "tables", "plots", "export"])
def test_tracking_uri_of_a_scheme_mlflow_lacks(argv, env, sandbox, capsys, monkeypatch):
    """--tracking-uri / $MLFLOW_TRACKING_URI get the check the config's tracking.uri has (an ftp:// one was an
    internal error from deep inside MLflow's client)."""
    (sandbox / "cfg.yaml").write_text(yaml.safe_dump(TINY))
    if env:
        monkeypatch.setenv("MLFLOW_TRACKING_URI", env)
    before = _files(sandbox)
    rc = cli.main([a.format(cfg=sandbox / "cfg.yaml", sandbox=sandbox) for a in argv])
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    source = "$MLFLOW_TRACKING_URI" if env else "--tracking-uri"
    assert rc == 2 and err == [f"error: {source} ftp://x: not a tracking store MLflow can use; allowed: a path or a "
                               f"URI whose scheme is one of file, sqlite, http, https, postgresql, mysql, mssql, "
                               f"databricks"], err
    assert _files(sandbox) == before


def test_sweep_address_check_passes_a_listening_head():
    from nr_study.sweep.ray_setup import check_address

    with socket_listening() as port:
        check_address(f"127.0.0.1:{port}")
        check_address(f"ray://localhost:{port}")
    check_address(None)


def test_sweep_address_auto_asks_ray_then_probes(monkeypatch):
    """--address auto: Ray's own discovery says where the cluster is (or that there is none); what it names is
    probed like any address. Ray's answer is fixed here: this machine may run anyone's Ray."""
    import ray._private.services as services

    from nr_study.errors import ConfigError
    from nr_study.sweep.ray_setup import check_address

    def none_here(addr, temp_dir):
        raise ConnectionError("Could not find any running Ray instance.")

    monkeypatch.setattr(services, "get_ray_address_from_environment", none_here)
    with pytest.raises(ConfigError, match=r"^--address auto: no Ray cluster runs on this machine"):
        check_address("auto")
    with socket_listening() as port:
        monkeypatch.setattr(services, "get_ray_address_from_environment", lambda addr, temp_dir: f"127.0.0.1:{port}")
        check_address("auto")
    with pytest.raises(ConfigError, match=rf"^--address auto: nothing answers at 127.0.0.1:{port} "):
        check_address("auto")  # the same address, its head gone


@contextlib.contextmanager
def socket_listening():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield s.getsockname()[1]


@pytest.mark.parametrize("verbose", ["-1", "4"])
def test_sweep_verbose_out_of_range(verbose, sandbox, capsys):
    space = sandbox / "space.yaml"
    space.write_text(yaml.safe_dump({"name": "s", "base": TINY, "space": {"seed": [0]}}))
    rc = cli.main(["sweep", str(space), "--dry-run", "--verbose", verbose])
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert rc == 2 and err == [f"error: --verbose {verbose}: not allowed; allowed: 0, 1, 2 or 3 (Ray Tune's verbosity)"]


def test_disk_too_full_for_a_checkpoint(sandbox, capsys, monkeypatch):
    import collections

    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr("shutil.disk_usage", lambda p: usage(10 << 20, 10 << 20, 1000))
    expect_bad_input(sandbox, capsys, TINY, needles=["checkpoint folder", "MiB free, a checkpoint needs about"])


# -------------------------------------------------------------------------------------------------- checkpoints
@pytest.fixture(scope="module")
def real_checkpoint(tmp_path_factory) -> Path:
    """A real 1-epoch checkpoint of TINY (vgg_small width 8 on 1x8x8), written by train()."""
    d = tmp_path_factory.mktemp("hard_ck")
    TR.train(_deep(TINY, train={"epochs": 1}), tracking_uri=f"sqlite:///{d / 'mlflow.db'}",
             checkpoint_dir=d / "ck", progress=False)
    return d / "ck" / TR.CKPT_NAME


def _resume_case(sandbox, capsys, content, cfg=TINY, needles=()):
    ck = sandbox / "ck"
    ck.mkdir()
    if isinstance(content, (bytes, bytearray)):
        (ck / TR.CKPT_NAME).write_bytes(content)
    else:
        torch.save(content, ck / TR.CKPT_NAME)
    return expect_bad_input(sandbox, capsys, cfg, "--resume", needles=needles)


def test_resume_garbage_checkpoint(sandbox, capsys):
    _resume_case(sandbox, capsys, b"this is not a checkpoint\x00\x01" * 10,
                 needles=["state.pt: not a readable nr_study checkpoint", "another --checkpoint-dir"])


def test_resume_truncated_checkpoint(sandbox, capsys, real_checkpoint):
    _resume_case(sandbox, capsys, real_checkpoint.read_bytes()[:3000], needles=["not a readable nr_study checkpoint"])


def test_resume_torch_file_of_another_kind(sandbox, capsys):
    _resume_case(sandbox, capsys, {"weight": torch.zeros(3), "epoch": 4},
                 needles=["a torch file but not an nr_study training checkpoint", "keys epoch, weight"])


def test_resume_plain_tensor_file(sandbox, capsys):
    _resume_case(sandbox, capsys, torch.zeros(2, 2), needles=["not an nr_study training checkpoint (it holds a Tensor)"])


def test_resume_unsafe_pickle_refused(sandbox, capsys):
    class Evil:  # weights_only=True refuses arbitrary classes: nothing is executed
        def __reduce__(self):
            return (os.system, ("touch pwned",))

    _resume_case(sandbox, capsys, {"format": 1, "x": Evil()}, needles=["not a readable nr_study checkpoint"])
    assert not (sandbox / "pwned").exists()


def test_resume_checkpoint_of_another_architecture(sandbox, capsys, real_checkpoint):
    cfg = _deep(TINY, model={"name": "vgg_small", "kwargs": {"width": 16}})
    _resume_case(sandbox, capsys, real_checkpoint.read_bytes(), cfg=cfg,
                 needles=["written for model.kwargs {'width': 8}, but this config has {'width': 16}"])


def test_resume_checkpoint_of_another_dataset_shape(sandbox, capsys, real_checkpoint):
    cfg = _deep(TINY, data={"synthetic": {"shape": [3, 8, 8]}})
    _resume_case(sandbox, capsys, real_checkpoint.read_bytes(), cfg=cfg,
                 needles=["written for input shape [1, 8, 8], but this config has [3, 8, 8]"])


def test_resume_without_checkpoint(sandbox, capsys):
    expect_bad_input(sandbox, capsys, TINY, "--resume", needles=["--resume: no checkpoint at"])


# ----------------------------------------------------------------------------------------------------- faults
def _closed_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def test_http_client_fails_fast_by_default():
    assert int(T.HTTP_DEFAULTS["MLFLOW_HTTP_REQUEST_MAX_RETRIES"]) <= 3
    assert int(T.HTTP_DEFAULTS["MLFLOW_HTTP_REQUEST_TIMEOUT"]) <= 30
    for k in T.HTTP_DEFAULTS:  # set at import unless the user had set them
        assert k in os.environ


@pytest.mark.timeout(120)
def test_tracking_server_unreachable_at_start(sandbox, capsys):
    (sandbox / "cfg.yaml").write_text(yaml.safe_dump(TINY))
    uri = f"http://127.0.0.1:{_closed_port()}"
    before = _files(sandbox)
    rc, err, _ = run_cli(capsys, sandbox / "cfg.yaml", "--tracking-uri", uri, "--checkpoint-dir", sandbox / "ck")
    assert rc == 1 and len(err) == 1, err
    assert err[0].startswith(f"error: tracking server {uri} unreachable") and "Connection refused" in err[0]
    assert _files(sandbox) == before


@pytest.mark.timeout(180)
def test_tracking_server_lost_mid_run_then_resume(sandbox, capsys, monkeypatch, tracking_uri):
    """The server dies after epoch 1: the run fails with one line, the epoch-2 checkpoint is intact, and
    --resume (server back) logs the missing epoch: every epoch appears once."""
    dead = MlflowClient(f"http://127.0.0.1:{_closed_port()}")
    real = T.RunTracker.log_epoch

    def dies_at_2(self, epoch, metrics):
        if epoch == 2:
            self.client = dead  # every call from now on meets a closed port (real HTTP failures)
        return real(self, epoch, metrics)

    monkeypatch.setattr(T.RunTracker, "log_epoch", dies_at_2)
    cfgp = sandbox / "cfg.yaml"
    cfgp.write_text(yaml.safe_dump(_deep(TINY, train={"epochs": 3})))
    args = [cfgp, "--tracking-uri", tracking_uri, "--checkpoint-dir", sandbox / "ck"]
    rc, err, _ = run_cli(capsys, *args)
    assert rc == 1 and len(err) == 1, err
    assert "unreachable during logging epoch 2" in err[0] and "rerun with --resume" in err[0]
    ck = TR.load_checkpoint(sandbox / "ck")
    assert ck["epoch"] == 2
    c = MlflowClient(tracking_uri)
    rid = ck["run_id"]
    assert [m.step for m in c.get_metric_history(rid, "test_err")] == [1]

    monkeypatch.setattr(T.RunTracker, "log_epoch", real)
    rc, err, out = run_cli(capsys, *args, "--resume")
    assert rc == 0, err
    assert c.get_run(rid).info.status == "FINISHED"
    assert [m.step for m in c.get_metric_history(rid, "test_err")] == [1, 2, 3]


def test_disk_full_mid_run_keeps_previous_checkpoint(sandbox, capsys, monkeypatch, tracking_uri):
    real_save = torch.save
    calls = []

    def full_disk(obj, f, *a, **kw):
        calls.append(f)
        if len(calls) == 2:  # the epoch-2 checkpoint: write a partial file, then the disk is full
            Path(f).write_bytes(b"partial")
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, f, *a, **kw)

    monkeypatch.setattr(TR.torch, "save", full_disk)
    (sandbox / "cfg.yaml").write_text(yaml.safe_dump(_deep(TINY, train={"epochs": 3})))
    rc, err, _ = run_cli(capsys, sandbox / "cfg.yaml", "--tracking-uri", tracking_uri,
                         "--checkpoint-dir", sandbox / "ck")
    assert rc == 1 and len(err) == 1, err
    assert "cannot write checkpoint" in err[0] and "No space left on device" in err[0]
    assert "previous checkpoint is intact" in err[0]
    monkeypatch.setattr(TR.torch, "save", real_save)
    assert TR.load_checkpoint(sandbox / "ck")["epoch"] == 1
    assert sorted(p.name for p in (sandbox / "ck").iterdir()) == [TR.CKPT_NAME]  # no temporary left behind
    run = MlflowClient(tracking_uri).get_run(TR.load_checkpoint(sandbox / "ck")["run_id"])
    assert run.info.status == "FAILED" and run.data.tags["nr.error"].startswith("CheckpointWriteError")


def test_divergence_is_one_line_and_failed(sandbox, capsys, tracking_uri):
    (sandbox / "cfg.yaml").write_text(yaml.safe_dump(_deep(TINY, optim={"lr": 1e30})))
    rc, err, _ = run_cli(capsys, sandbox / "cfg.yaml", "--tracking-uri", tracking_uri,
                         "--checkpoint-dir", sandbox / "ck")
    assert rc == 1 and len(err) == 1 and re.match(r"error: epoch 1 step \d+: loss is (nan|inf)", err[0]), err
    c = MlflowClient(tracking_uri)
    exp = c.get_experiment_by_name("hardening")
    last = c.search_runs([exp.experiment_id], order_by=["attributes.start_time DESC"], max_results=1)[0]
    assert last.info.status == "FAILED" and last.data.tags["nr.error"].startswith("TrainingDivergedError")


def test_bad_input_marks_a_given_run_failed(tracking_uri, tmp_path):
    """A sweep trial hands train() a run it created: bad input must end that run FAILED, not leave it RUNNING."""
    t = T.RunTracker(tracking_uri, "hardening")
    rid = t.start()
    with pytest.raises(Exception, match="unknown architecture"):
        TR.train(_deep(TINY, model={"name": "nope", "kwargs": {}}), tracking_uri=tracking_uri, run_id=rid,
                 checkpoint_dir=tmp_path / "ck", progress=False)
    run = MlflowClient(tracking_uri).get_run(rid)
    assert run.info.status == "FAILED" and "unknown architecture" in run.data.tags["nr.error"]
    assert not (tmp_path / "ck").exists()


def test_internal_error_is_one_line(sandbox, capsys, monkeypatch):
    def bug(*a, **kw):
        raise ValueError("something\nmulti-line")

    monkeypatch.setattr(TR, "load_config", bug)
    rc, err, _ = run_cli(capsys, sandbox / "x.yaml")
    assert rc == 1 and err == ["error: internal error in nr-study train: ValueError: something "
                               "(set NR_STUDY_TRACEBACK=1 for the traceback)"]


# ------------------------------------------------------------------------------------------------- processes
def _script() -> str:
    exe = Path(sys.executable).parent / "nr-study"
    return str(exe) if exe.exists() else ""


def test_console_script_bad_config_exit_2_one_line(tmp_path):
    exe = _script()
    if not exe:
        pytest.skip("nr-study console script not installed in this environment")
    p = tmp_path / "bad.yaml"
    p.write_text("method: NR\nnr: {tr: 1.5}\n")
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    env["NR_STUDY_RUNS"] = str(tmp_path / "runs")
    r = subprocess.run([exe, "train", str(p)], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert r.returncode == 2
    assert r.stderr.splitlines() == [f"error: {p}: nr.tr: 1.5 is out of range; allowed: 0 < tr < 1"]
    assert sorted(x.name for x in tmp_path.iterdir()) == ["bad.yaml"]


def _start_long_train(tmp_path: Path, tracking_uri: str, sigint: str) -> subprocess.Popen:
    """`nr-study train` on a 200-epoch TINY run in its own process group, SIGINT at `sigint` (tests/procs.py)."""
    cfg = _deep(TINY, data={"n_train": 256}, train={"epochs": 200})
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    env = dict(os.environ, NR_STUDY_RUNS=str(tmp_path / "runs"), PYTHONUNBUFFERED="1")
    cmd = with_signals([_script(), "train", tmp_path / "cfg.yaml", "--tracking-uri", tracking_uri,
                        "--checkpoint-dir", tmp_path / "ck"], sigint=sigint)
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=tmp_path,
                            start_new_session=True)


def _wait_epoch_line(p: subprocess.Popen) -> str:
    line = "x"
    while line and not line.startswith("epoch "):
        line = p.stdout.readline()
    assert line.startswith("epoch "), p.stderr.read()[-2000:]
    return line


@pytest.mark.slow
@pytest.mark.timeout(400)
@pytest.mark.parametrize("sig, code, what", [(signal.SIGINT, 130, "interrupted"),
                                             (signal.SIGTERM, 143, "terminated (SIGTERM)")], ids=["int", "term"])
def test_ctrl_c_ends_killed_exit_130_no_strays(sig, code, what, tmp_path, tracking_uri):
    """Started with default dispositions whatever the test runner inherited (a background job ignores SIGINT)."""
    if not _script():
        pytest.skip("nr-study console script not installed in this environment")
    p = _start_long_train(tmp_path, tracking_uri, sigint="default")
    try:
        _wait_epoch_line(p)
        os.killpg(p.pid, sig)  # Ctrl-C in a terminal signals the whole foreground group; a scheduler sends TERM
        rc = p.wait(timeout=120)
    finally:
        if p.poll() is None:
            p.kill()
    err = [ln for ln in p.stderr.read().splitlines() if ln.startswith("error:")]
    assert rc == code and len(err) == 1 and err[0].startswith(f"error: {what}: the run ended KILLED"), err
    assert "--resume" in err[0]
    with pytest.raises(ProcessLookupError):  # nothing of that process group is left
        os.killpg(p.pid, 0)
    rid = TR.load_checkpoint(tmp_path / "ck")["run_id"]
    assert MlflowClient(tracking_uri).get_run(rid).info.status == "KILLED"


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_ignored_sigint_is_respected_sigterm_still_stops(tmp_path, tracking_uri):
    """Started with SIGINT ignored (`nohup`, a background job), nr-study keeps it ignored: a Ctrl-C to the group
    does not stop the run (it finishes two more epochs), SIGTERM still ends it KILLED with exit 143."""
    if not _script():
        pytest.skip("nr-study console script not installed in this environment")
    p = _start_long_train(tmp_path, tracking_uri, sigint="ignore")
    try:
        _wait_epoch_line(p)
        os.killpg(p.pid, signal.SIGINT)
        # the checkpoint is written before an epoch's line: lines past this epoch + 1 come after the Ctrl-C
        after = TR.load_checkpoint(tmp_path / "ck")["epoch"]
        epoch = 0
        while epoch < after + 2:
            epoch = int(_wait_epoch_line(p).split()[1].split("/")[0])
        os.killpg(p.pid, signal.SIGTERM)
        rc = p.wait(timeout=120)
    finally:
        if p.poll() is None:
            p.kill()
    err = [ln for ln in p.stderr.read().splitlines() if ln.startswith("error:")]
    assert rc == 143 and len(err) == 1 and err[0].startswith("error: terminated (SIGTERM): the run ended KILLED"), err
    rid = TR.load_checkpoint(tmp_path / "ck")["run_id"]
    assert MlflowClient(tracking_uri).get_run(rid).info.status == "KILLED"


# ------------------------------------------------------------------------------------------------------ safety
def _source_files():
    yield from sorted((ROOT / "nr_study").rglob("*.py"))  # nr_study.analysis included


def test_source_has_no_unsafe_calls():
    bad = []
    for f in _source_files():
        for i, line in enumerate(f.read_text().splitlines(), 1):
            code = line.split("#", 1)[0]
            where = f"{f.relative_to(ROOT)}:{i}: {line.strip()}"
            if "shell=True" in code or "os.system" in code or "os.popen" in code:
                bad.append(where)
            if re.search(r"\byaml\.load\(", code) and "SafeLoader" not in code:
                bad.append(where)
            if re.search(r"\byaml\.(unsafe_load|full_load)\(|\bpickle\.loads?\(", code):
                bad.append(where)
            if re.search(r"\btorch\.load\(", code) and "weights_only=True" not in code:
                bad.append(where)
    assert not bad, "\n".join(bad)


def test_no_downloads_at_run_time():
    """Only torchvision's dataset download (when data.download=true) and the user's tracking server are
    contacted: no model weights, no other URLs."""
    bad = []
    for f in _source_files():
        text = f.read_text()
        for m in re.finditer(r"https?://[^\s'\"]+", text):
            url = m.group(0)
            if not re.match(r"https?://(127\.0\.0\.1|localhost|x:|host|head|\{)", url):
                bad.append(f"{f.relative_to(ROOT)}: {url}")
        if re.search(r"weights\s*=\s*['\"]", text) or "load_state_dict_from_url" in text:
            bad.append(f"{f.relative_to(ROOT)}: pretrained weights")
    assert not bad, "\n".join(bad)


def test_core_refuses_the_graph_one_line(sandbox, capsys):
    """A model torch.fx cannot trace (data-dependent control flow) under NR: the core's UnsupportedGraphError
    becomes one line naming the model and the data shape."""
    from torch import nn

    from nr_study.models import registry

    class Branchy(nn.Module):
        def __init__(self, num_classes=10, in_channels=3):
            super().__init__()
            self.conv, self.bn = nn.Conv2d(in_channels, 8, 3, padding=1), nn.BatchNorm2d(8)
            self.head = nn.Linear(8, num_classes)

        def forward(self, x):
            x = self.bn(self.conv(x))
            if x.sum() > 0:  # fx cannot trace a branch on a tensor's value
                x = x.relu()
            return self.head(x.mean((2, 3)))

    registry.register_model("_hard_branchy")(lambda num_classes=10, in_channels=3: Branchy(num_classes, in_channels))
    try:
        line = expect_bad_input(sandbox, capsys, _deep(TINY, method="NR", model={"name": "_hard_branchy",
                                                                                "kwargs": {}}),
                                needles=["model.name '_hard_branchy' on data.name 'synthetic' (inputs 1x8x8)",
                                         "torch.fx cannot trace it"])
        assert "\n" not in line
    finally:
        registry._REGISTRY.pop("_hard_branchy", None)


# ------------------------------------------------------------------------------------------ sweep: tracking faults
def test_sweep_with_an_unreachable_tracking_server_is_one_line(sandbox, capsys, monkeypatch):
    """The sweep driver's own MLflow calls (experiment, parent run) fail as the one-line TrackingError, exit 1."""
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    (sandbox / "space.yaml").write_text(yaml.safe_dump({"name": "x", "base": TINY}))
    uri = f"http://127.0.0.1:{_closed_port()}"
    rc = cli.main(["sweep", str(sandbox / "space.yaml"), "--tracking-uri", uri, "--runs", str(sandbox / "r")])
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert rc == 1 and len(err) == 1, err
    assert err[0].startswith(f"error: tracking server {uri} unreachable during opening the experiment"), err


def test_trial_finding_its_run_raises_tracking_error_not_mlflow_exception(monkeypatch):
    """A trial that never got its MLflow run (server down when it looks its run up) fails with TrackingError."""
    from nr_study.errors import TrackingError
    from nr_study.sweep.runs import find_child
    from nr_study.tracking import client_for
    from nr_study.sweep.trial import TrialContext

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    uri = f"http://127.0.0.1:{_closed_port()}"
    ctx = TrialContext(space=None, tracking_uri=uri, parent_run_id="p", experiment_id="1", sweep_dir=".",
                       data_root=None)
    with pytest.raises(TrackingError, match=f"tracking server {uri} unreachable during finding trial t1's run"):
        find_child(client_for(uri), ctx, "t1")


@pytest.mark.parametrize("section, sections", [
    ("data", {"data": {"name": "synthetic", "n_train": 64, "n_test": 32,
                       "synthetic": {"shape": [1, 2 ** 40, 2 ** 40]}}}),  # overflows torch's storage size
    ("model", {"model": {"name": "vgg_small", "kwargs": {"width": 2 ** 40}}}),  # ~4e13 bytes: the allocator refuses
], ids=["data_shape", "model_width"])
def test_valid_but_too_large_to_allocate(section, sections, sandbox, capsys):
    """Within every range and still more than the machine holds: one line naming the section, not an internal
    error, and nothing written."""
    expect_bad_input(sandbox, capsys, _deep(TINY, **sections),
                     needles=[f"error: {section} (", "too large to allocate on this machine"])


@pytest.mark.parametrize("command", sorted(cli.COMMANDS))
def test_bad_command_line_is_one_line_for_every_command(command, sandbox, capsys):
    """Every subcommand parses with nr_study.cli_parser.CommandParser: an unknown option is one `error:` line, exit 2."""
    positionals = {"train": ["c.yaml"], "sweep": ["s.yaml"], "export": ["RUN", "DIR"]}.get(command, [])
    rc = cli.main([command, *positionals, "--no-such-option"])
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert rc == 2 and len(err) == 1, err
    assert err[0].startswith(f"error: nr-study {command}: ") and "--no-such-option" in err[0], err
