"""Training configuration: frozen dataclasses, YAML loading, validation, `--set` overrides.

A config is data. `load_config(path, overrides)` reads YAML (nr_study.files.read_yaml: an empty or non-UTF-8
file is refused), applies `a.b=value` overrides (each value parsed with yaml.safe_load) and validates. Every bad
field gives one line naming the key, the value and what is allowed; several bad fields give several lines in one
ConfigError.

The sweep works on plain dicts: `config_to_dict(cfg)` -> dict, `set_dotted(d, "nr.tr", 0.3)` (unknown keys are
refused with a suggestion), `config_from_dict(d)` -> Config. `flatten(d)` gives {"a.b": v} for MLflow params.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Optional

import yaml

from nr_study.errors import ConfigError
from nr_study.files import read_yaml
from nr_study.nr.settings import CONSTRAINTS, SCHEMES, NRCfg  # noqa: F401 (NR's settings live with the method)
from nr_study.schema import (F, build_section, choice, field_types, is_section, rng, show, show_key,
                             suggest, type_name, unwrap_optional)
from nr_study.tracking_uri import ALLOWED as URI_ALLOWED, scheme_ok


DATASETS = ("fashion_mnist", "cifar10", "cifar100", "imagenet", "synthetic")
SCHEDULES = ("step", "cosine", "constant")
DEVICES = ("auto", "cpu", "cuda")
AFTER_REJUVENATION = ("continue", "restart_schedule", "reset_epochs")
SEED_MAX = 2**32 - 1            # numpy's seed range (Ray and Optuna seeds too)
MAX_THREADS = 1024              # torch's OpenMP pool: 20,000 threads abort, 10**6 segfault
def _methods() -> dict:
    """The method registry (nr_study.methods), read when a config is checked: methods register themselves there,
    and a method's module may import this one."""
    from nr_study.methods import METHODS

    return METHODS


@dataclass(frozen=True)
class ModelCfg:
    name: str = F("vgg_small", doc="registry name (nr_study.models.list_models()) or tv:<torchvision name>")
    kwargs: dict = F({}, doc="extra keyword arguments for create_model")


@dataclass(frozen=True)
class SyntheticCfg:
    shape: tuple = F((1, 28, 28), doc="input shape C,H,W")
    num_classes: int = F(10, rng(2), doc="number of classes")
    noise: float = F(1.0, rng(0.0), doc="noise std around the class means (means have std 1)")


@dataclass(frozen=True)
class DataCfg:
    name: str = F("fashion_mnist", choice(DATASETS))
    root: Optional[str] = F(None, doc="data folder; default $NR_STUDY_DATA or <cwd>/data")
    download: bool = F(False, doc="let torchvision download a missing dataset into root")
    n_train: Optional[int] = F(None, rng(1), doc="seeded training subset size (synthetic: 1024 if unset)")
    n_test: Optional[int] = F(None, rng(1), doc="seeded test subset size (synthetic: 512 if unset)")
    subset_seed: int = F(0, rng(0, SEED_MAX))
    augment: Optional[bool] = F(None, doc="null: dataset default (cifar/imagenet yes, others no)")
    image_size: int = F(224, choice((224, 128)), doc="imagenet crop size")
    num_workers: int = F(4, rng(0, MAX_THREADS), doc="imagenet DataLoader workers")
    synthetic_stand_in: bool = F(False, doc="train on synthetic data of this dataset's shape and class count "
                                 "(data.synthetic.noise; n_train / n_test as set, else synthetic's defaults) "
                                 "instead of reading it: what nr-study sweep --smoke runs")
    synthetic: SyntheticCfg = field(default_factory=SyntheticCfg)


@dataclass(frozen=True)
class OptimCfg:
    lr: float = F(0.1, rng(0.0, lo_open=True))
    momentum: float = F(0.9, rng(0.0, 1.0, hi_open=True))
    weight_decay: float = F(5e-4, rng(0.0))
    nesterov: bool = F(False)
    schedule: str = F("step", choice(SCHEDULES))
    milestones: tuple = F((), doc="step schedule: epochs after which lr is multiplied by gamma")
    gamma: float = F(0.1, rng(0.0, 1.0, lo_open=True))
    restart_after_rejuvenation: Optional[bool] = F(None, doc="old name of train.after_rejuvenation: true = "
                                                      "restart_schedule, false = continue")


@dataclass(frozen=True)
class TrainCfg:
    epochs: int = F(10, rng(1))
    batch_size: int = F(128, rng(1))
    eval_batch_size: int = F(512, rng(1))
    max_steps_per_epoch: Optional[int] = F(None, rng(1), doc="cap steps per epoch (smoke runs)")
    device: str = F("auto", choice(DEVICES))
    threads: Optional[int] = F(None, rng(1, MAX_THREADS), doc="torch threads; default: CPUs available to the process")
    channels_last: bool = F(False, doc="NHWC layout of the model and its inputs, on any device "
                                         "(faster on CPU too: nr-study bench's step_channels_last rows)")
    bf16: bool = F(False, doc="bf16 autocast, on any device (on a CPU without native bf16 it can be slower: "
                                "nr-study bench's step_bf16 rows)")
    cuda_deterministic: bool = F(False, doc="CUDA: deterministic cuDNN, no cudnn.benchmark (CPU is always)")
    after_rejuvenation: str = F("continue", choice(AFTER_REJUVENATION),
                                doc="the lr schedule after a rejuvenation: continue it; restart_schedule: start it "
                                    "again over the epochs left; reset_epochs (the paper): reset the epoch counter, "
                                    "train.epochs more epochs from the rejuvenation's epoch on a fresh schedule")
    precise_bn_batches: int = F(0, rng(0), doc="before each evaluation, recompute the BN running statistics over "
                                "this many training batches (precise BN); 0 keeps the running averages (the paper). "
                                "Set it when a strong λ moves γ faster than the averages follow")


@dataclass(frozen=True)
class FSCfg:
    run_id: Optional[str] = F(None, doc="NR-FS: MLflow run whose final architecture is trained from scratch")
    tracking_uri: Optional[str] = F(None, doc="NR-FS: where that run lives (default: this run's URI)")
    architecture_file: Optional[str] = F(None, doc="NR-FS: exported final_widths.json / model.pt instead")


@dataclass(frozen=True)
class SlimCfg:
    l1: float = F(1e-4, rng(0.0), doc="fixed L1 strength on BN gamma before pruning")
    prune_ratio: float = F(0.5, rng(0.0, 1.0, True, True), doc="global |gamma| percentile pruned")
    prune_epoch: Optional[int] = F(None, rng(1), doc="prune after this epoch (default: epochs // 2)")
    restart_schedule: bool = F(True, doc="restart the lr schedule for fine-tuning")


@dataclass(frozen=True)
class ReDoCfg:
    """ReDo (Sokar et al. 2023): recycle the dormant units every `every` steps."""

    tau: float = F(0.1, rng(0.0), doc="a unit is dormant when its score (mean |activation| over a batch, over the "
                   "layer's mean) is <= tau; 0: only units that are exactly 0 on the batch (dopamine's default)")
    every: int = F(1000, rng(1), doc="score and recycle every this many optimizer steps (the training batch of "
                   "that step)")


@dataclass(frozen=True)
class CBPCfg:
    """Continual Backprop (Dohare et al. 2024): replace a fraction of the mature units of least utility each
    step."""

    replacement_rate: float = F(3e-4, rng(0.0, 1.0, lo_open=True), doc="ρ: units replaced per step, as a "
                                "fraction of a layer's mature units (accumulated across steps)")
    maturity: int = F(100, rng(0), doc="m: a unit is replaceable once older than this many steps")
    decay: float = F(0.99, rng(0.0, 1.0, hi_open=True), doc="η of the running average of the utility")


@dataclass(frozen=True)
class TrackingCfg:
    uri: Optional[str] = F(None, (scheme_ok, URI_ALLOWED), doc="default: $MLFLOW_TRACKING_URI or sqlite:///<runs>/mlflow.db")
    experiment: str = F("nr_study", ((lambda v: v is None or 0 < len(v.strip()) and len(v) <= 500),
                                     "a non-empty name of at most 500 characters (MLflow's limit)"))
    run_name: Optional[str] = F(None)
    tags: dict = F({}, doc="extra tags, e.g. nr.table / nr.cell")
    system_metrics: Optional[bool] = F(None, doc="MLflow system metrics (CPU, memory, GPU every 10 s); null: on "
                                               "in sweep trials, off for nr-study train")


@dataclass(frozen=True)
class FaultInjectionCfg:
    """The `testing:` section — for tests only, never for a real run: the trainer SIGKILLs its own process at a
    known point, so the fault tests can check what a kill leaves (checkpoints, runs, retries), or kills channels
    so that the smoke's NR trials rejuvenate at once. Kept apart from the training settings it has nothing to do
    with."""

    kill_at_epoch: Optional[int] = F(None, rng(1), doc="SIGKILL the training process at this epoch")
    kill_once_marker: Optional[str] = F(None, doc="kill only while this file is absent (it is created then)")
    kill_point: str = F("after_epoch", choice(("after_checkpoint", "after_epoch")))
    silence_fraction: Optional[float] = F(None, rng(0.0, 1.0, True, True),
                                          doc="NR methods: zero the γ of this fraction (more if r stays >= Tr) of "
                                              "every layer's weakest channels before each end-of-epoch check "
                                              "(the smoke)")


@dataclass(frozen=True)
class Config:
    method: str = F("BL", (lambda v: v is None or v in _methods(), lambda: "one of " + ", ".join(_methods())))
    seed: int = F(0, rng(0, SEED_MAX))
    model: ModelCfg = field(default_factory=ModelCfg)
    data: DataCfg = field(default_factory=DataCfg)
    optim: OptimCfg = field(default_factory=OptimCfg)
    train: TrainCfg = field(default_factory=TrainCfg)
    nr: NRCfg = field(default_factory=NRCfg)
    fs: FSCfg = field(default_factory=FSCfg)
    slim: SlimCfg = field(default_factory=SlimCfg)
    redo: ReDoCfg = field(default_factory=ReDoCfg)
    cbp: CBPCfg = field(default_factory=CBPCfg)
    tracking: TrackingCfg = field(default_factory=TrackingCfg)
    testing: FaultInjectionCfg = field(default_factory=FaultInjectionCfg)


# --------------------------------------------------------------------------------------------- helpers


def _cross_checks(cfg: Config, errors: list) -> None:
    if cfg.data.name == "synthetic":
        shp = cfg.data.synthetic.shape
        if len(shp) != 3 or not all(isinstance(s, int) and s >= 1 for s in shp):
            errors.append(f"data.synthetic.shape: {list(shp)!r} is not allowed; expected [C, H, W] positive ints")
    ms = cfg.optim.milestones
    if not all(isinstance(m, int) and not isinstance(m, bool) and m >= 1 for m in ms):
        errors.append(f"optim.milestones: {list(ms)!r} is not allowed; expected a list of epochs (ints >= 1)")
    errors.extend(_methods()[cfg.method].cls.check_config(cfg))  # what the method itself needs of the config


def _old_names(cfg: Config, d: dict, errors: list) -> Config:
    """optim.restart_after_rejuvenation (true/false) is read as train.after_rejuvenation restart_schedule/continue."""
    old = cfg.optim.restart_after_rejuvenation
    if old is None:
        return cfg
    new = "restart_schedule" if old else "continue"
    if "after_rejuvenation" in (d.get("train") or {}) and cfg.train.after_rejuvenation != new:
        errors.append(f"optim.restart_after_rejuvenation: {str(old).lower()} contradicts train.after_rejuvenation "
                      f"{cfg.train.after_rejuvenation!r}; drop the old key (true = restart_schedule, false = "
                      f"continue)")
        return cfg
    return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, after_rejuvenation=new))


def config_from_dict(d: dict | None) -> Config:
    """Validate a (possibly partial) nested dict and build a Config; raises ConfigError listing every bad key."""
    errors: list[str] = []
    cfg = build_section(Config, d or {}, "", errors)
    if not errors:
        cfg = _old_names(cfg, d or {}, errors)
    if not errors:
        _cross_checks(cfg, errors)
    if errors:
        raise ConfigError("\n".join(errors))
    return cfg


def _plain(v):
    if dataclasses.is_dataclass(v):
        return {f.name: _plain(getattr(v, f.name)) for f in dataclasses.fields(v)}
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    if isinstance(v, dict):
        return {k: _plain(x) for k, x in v.items()}
    return v


def config_to_dict(cfg: Config) -> dict:
    """Nested plain dict (lists, no tuples): YAML-dumpable and accepted back by config_from_dict."""
    return _plain(cfg)


def flatten(d: dict, prefix: str = "") -> dict:
    """{"a": {"b": 1}} -> {"a.b": 1}. Empty mappings stay as {} leaves."""
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def mapping_at(node: dict, part: str, path: str, key: str) -> dict:
    """node[part] as a mapping to set `key` below: created when absent; a list or a value the file has there is
    an error (replacing it with {} would hide the file's mistake and accept what was never written)."""
    child = node.get(part)
    if child is None:
        child = node[part] = {}
    elif not isinstance(child, dict):
        raise ConfigError(f"{path}: {show(child)} has type {type_name(child)}; expected a mapping (cannot set {key})")
    return child


def set_dotted(d: dict, key: str, value) -> dict:
    """Set `a.b.c = value` in the nested dict `d` (in place, returned). Keys are checked against the schema;
    below a free-form mapping (model.kwargs, tracking.tags) the rest of the key is one entry:
    set_dotted(d, "tracking.tags.nr.table", "t4") sets d["tracking"]["tags"]["nr.table"]."""
    if not isinstance(key, str) or not key or any(p == "" for p in key.split(".")):
        raise ConfigError(f"{key!r}: malformed key; expected dotted names like nr.tr")
    parts = key.split(".")
    cls: Any = Config
    node = d
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        path = ".".join(parts[: i + 1])
        if cls is not None:
            hints = field_types(cls)
            if part not in hints:
                prefix = ".".join(parts[:i])
                opts = [f"{prefix}.{n}" if prefix else n for n in hints]
                raise ConfigError(f"{show_key(path)}: unknown key{suggest(path, opts)}")
            tp = hints[part]
            nxt = tp if is_section(tp) else None
            free = unwrap_optional(tp)[0] is dict
            if not last and nxt is None and not free:
                raise ConfigError(f"{path}: is a value, not a section; cannot set {key}")
            if not last and free:  # free-form mapping: the rest of the key is one entry ("nr.table")
                mapping_at(node, part, path, key)[".".join(parts[i + 1:])] = value
                return d
        else:
            nxt = None
        if last:
            node[part] = value
        else:
            node = mapping_at(node, part, path, key)
            cls = nxt
    return d


def parse_override(pair: str) -> tuple[str, Any]:
    """'a.b=value' -> ("a.b", yaml.safe_load("value"))."""
    if not isinstance(pair, str) or "=" not in pair:
        raise ConfigError(f"--set {pair!r}: malformed override; expected KEY=VALUE, e.g. --set nr.tr=0.3")
    key, raw = pair.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"--set {pair!r}: malformed override; the key before '=' is empty")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as exc:
        raise ConfigError(f"--set {pair!r}: value is not valid YAML ({str(exc).splitlines()[0]})") from None
    return key, value


def apply_overrides(d: dict, overrides) -> dict:
    for pair in overrides or []:
        key, value = parse_override(pair)
        set_dotted(d, key, value)
    return d


def load_config(path, overrides=()) -> Config:
    d = read_yaml(path, "config file")
    apply_overrides(d, overrides)
    try:
        return config_from_dict(d)
    except ConfigError as exc:
        lines = str(exc).splitlines()
        raise ConfigError("\n".join(f"{path}: {ln}" for ln in lines)) from None
