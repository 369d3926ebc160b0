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
import difflib
import math
import posixpath
import re
import typing
from dataclasses import dataclass, field
from typing import Any, Optional

import yaml

from nr_study.errors import ConfigError
from nr_study.files import read_yaml



DATASETS = ("fashion_mnist", "cifar10", "cifar100", "imagenet", "synthetic")
SCHEDULES = ("step", "cosine", "constant")
SCHEMES = ("nr", "cr", "ca")
CONSTRAINTS = ("params", "flops")
DEVICES = ("auto", "cpu", "cuda")
AFTER_REJUVENATION = ("continue", "restart_schedule", "reset_epochs")
INT64 = (-(2**63), 2**63 - 1)   # every integer of a config: what torch and numpy can hold
SEED_MAX = 2**32 - 1            # numpy's seed range (Ray and Optuna seeds too)
MAX_THREADS = 1024              # torch's OpenMP pool: 20,000 threads abort, 10**6 segfault
TRACKING_URI_SCHEMES = ("", "file", "sqlite", "http", "https", "postgresql", "mysql", "mssql", "databricks")
_MLFLOW_NAME = re.compile(r"[/\w.\- :]*")  # MLflow's rule for param, metric and tag names
MLFLOW_NAME_RULE = "letters, digits, '_', '-', '.', ' ', ':', '/' (a relative path, at most 250 characters)"


def mlflow_name_ok(name) -> bool:
    """MLflow's own check of a param/tag name (validate_param_and_metric_name + path_not_unique): a config key
    or tag it refuses would fail the run after it started, not up front."""
    return (isinstance(name, str) and 0 < len(name) <= 250 and _MLFLOW_NAME.fullmatch(name) is not None
            and posixpath.normpath(name) == name and not name.startswith(("/", "..")) and name != ".")


def show(v, limit: int = 100) -> str:
    """A value as an error line shows it: its repr, cut when long (a fuzzed 10 kB string, a 400-digit int)."""
    try:
        r = repr(v)
    except ValueError:  # an int beyond Python's str-conversion digit limit
        return f"an integer of more than {limit} digits"
    return r if len(r) <= limit else f"{r[:limit]}... ({len(r)} characters)"


def show_key(k) -> str:
    """A key as an error line shows it: as written when printable, else its repr (a newline in a key must not
    split the line)."""
    s = str(k)
    return s if s.isprintable() else repr(s)


def _rng(lo=None, hi=None, lo_open=False, hi_open=False):
    """A range check for field metadata: returns (predicate, text)."""

    def ok(v):
        if v is None:
            return True
        if lo is not None and (v <= lo if lo_open else v < lo):
            return False
        if hi is not None and (v >= hi if hi_open else v > hi):
            return False
        return True

    def num(x):
        return str(x) if isinstance(x, int) else f"{x:g}"

    if hi is None and lo is not None:
        return ok, f"{{k}} {'>' if lo_open else '>='} {num(lo)}"
    text = "{k}"
    if lo is not None:
        text = f"{num(lo)} {'<' if lo_open else '<='} " + text
    if hi is not None:
        text += f" {'<' if hi_open else '<='} {num(hi)}"
    return ok, text


def _uri_ok(v) -> bool:
    from urllib.parse import urlparse

    if v is None:
        return True
    try:
        return bool(v.strip()) and urlparse(v).scheme in TRACKING_URI_SCHEMES
    except ValueError:  # a broken IPv6 host in brackets
        return False


URI_ALLOWED = "a path or a URI whose scheme is one of " + ", ".join(s for s in TRACKING_URI_SCHEMES if s)


def check_tracking_uri_scheme(uri: str, source: str) -> str:
    """A tracking URI from the command line or the environment gets the config's check (`tracking.uri`): MLflow
    raised an internal error deep in its client on a scheme it lacks (ftp://)."""
    if not _uri_ok(uri):
        raise ConfigError(f"{source} {uri}: not a tracking store MLflow can use; allowed: {URI_ALLOWED}")
    return uri


def _methods() -> dict:
    """The method registry (nr_study.methods), read when a config is checked: methods register themselves there,
    and a method's module may import this one."""
    from nr_study.methods import METHODS

    return METHODS


def _choice(options):
    return (lambda v: v is None or v in options), "one of " + ", ".join(map(str, options))


def F(default, check=None, doc=""):
    """A dataclass field with an optional (predicate, allowed-text) check."""
    md = {"doc": doc}
    if check is not None:
        md["check"] = check
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata=md)
    return field(default=default, metadata=md)


@dataclass(frozen=True)
class ModelCfg:
    name: str = F("vgg_small", doc="registry name (nr_study.models.list_models()) or tv:<torchvision name>")
    kwargs: dict = F({}, doc="extra keyword arguments for create_model")


@dataclass(frozen=True)
class SyntheticCfg:
    shape: tuple = F((1, 28, 28), doc="input shape C,H,W")
    num_classes: int = F(10, _rng(2), doc="number of classes")
    noise: float = F(1.0, _rng(0.0), doc="noise std around the class means (means have std 1)")


@dataclass(frozen=True)
class DataCfg:
    name: str = F("fashion_mnist", _choice(DATASETS))
    root: Optional[str] = F(None, doc="data folder; default $NR_STUDY_DATA or <cwd>/data")
    download: bool = F(False, doc="let torchvision download a missing dataset into root")
    n_train: Optional[int] = F(None, _rng(1), doc="seeded training subset size (synthetic: 1024 if unset)")
    n_test: Optional[int] = F(None, _rng(1), doc="seeded test subset size (synthetic: 512 if unset)")
    subset_seed: int = F(0, _rng(0, SEED_MAX))
    augment: Optional[bool] = F(None, doc="null: dataset default (cifar/imagenet yes, others no)")
    image_size: int = F(224, _choice((224, 128)), doc="imagenet crop size")
    num_workers: int = F(4, _rng(0, MAX_THREADS), doc="imagenet DataLoader workers")
    synthetic: SyntheticCfg = field(default_factory=SyntheticCfg)


@dataclass(frozen=True)
class OptimCfg:
    lr: float = F(0.1, _rng(0.0, lo_open=True))
    momentum: float = F(0.9, _rng(0.0, 1.0, hi_open=True))
    weight_decay: float = F(5e-4, _rng(0.0))
    nesterov: bool = F(False)
    schedule: str = F("step", _choice(SCHEDULES))
    milestones: tuple = F((), doc="step schedule: epochs after which lr is multiplied by gamma")
    gamma: float = F(0.1, _rng(0.0, 1.0, lo_open=True))
    restart_after_rejuvenation: Optional[bool] = F(None, doc="old name of train.after_rejuvenation: true = "
                                                      "restart_schedule, false = continue")


@dataclass(frozen=True)
class TrainCfg:
    epochs: int = F(10, _rng(1))
    batch_size: int = F(128, _rng(1))
    eval_batch_size: int = F(512, _rng(1))
    max_steps_per_epoch: Optional[int] = F(None, _rng(1), doc="cap steps per epoch (smoke runs)")
    device: str = F("auto", _choice(DEVICES))
    threads: Optional[int] = F(None, _rng(1, MAX_THREADS), doc="torch threads; default: CPUs available to the process")
    channels_last: bool = F(False, doc="NHWC layout of the model and its inputs, on any device "
                                         "(faster on CPU too: nr-study bench's step_channels_last rows)")
    bf16: bool = F(False, doc="bf16 autocast, on any device (on a CPU without native bf16 it can be slower: "
                                "nr-study bench's step_bf16 rows)")
    cuda_deterministic: bool = F(False, doc="CUDA: deterministic cuDNN, no cudnn.benchmark (CPU is always)")
    after_rejuvenation: str = F("continue", _choice(AFTER_REJUVENATION),
                                doc="the lr schedule after a rejuvenation: continue it; restart_schedule: start it "
                                    "again over the epochs left; reset_epochs (the paper): reset the epoch counter, "
                                    "train.epochs more epochs from the rejuvenation's epoch on a fresh schedule")
    precise_bn_batches: int = F(0, _rng(0), doc="before each evaluation, recompute the BN running statistics over "
                                "this many training batches (precise BN); 0 keeps the running averages (the paper). "
                                "Set it when a strong λ moves γ faster than the averages follow")


@dataclass(frozen=True)
class NRCfg:
    """NR's settings: the `nr:` section of a config and, as nr_study.nr.NRConfig, what the NeuralRejuvenation
    hook takes — one definition, torch-free. Built directly (NRConfig(tr=0.3)) it checks the same ranges
    (ValueError naming the field); scheme / rescale / realloc left null take a method's defaults
    (`with_method_defaults`; NR's: nr, no rescaling, reallocation)."""

    tr: float = F(0.5, _rng(0.0, 1.0, True, True), doc="utilization threshold Tr: rejuvenate when r < tr")
    delta_r: float = F(0.01, _rng(0.0, lo_open=True))
    delta_lambda: float = F(5e-5, _rng(0.0))
    delta_t: int = F(1, _rng(1))
    delta_t_unit: str = F("epoch", _choice(("epoch", "step")))
    lambda_mode: str = F("adaptive", _choice(("adaptive", "fixed")))
    lambda_fixed: float = F(1.5e-4, _rng(0.0))
    lambda_max: Optional[float] = F(None, _rng(0.0))
    window_epochs: Optional[int] = F(None, _rng(1), doc="NR active only during the first K epochs")
    max_rejuvenations: int = F(1, _rng(0))
    target_ratio: float = F(1.0, _rng(0.0, 1.0, lo_open=True))
    constraint: str = F("params", _choice(CONSTRAINTS), doc="the resource r(θ) and the budget are measured in")
    scheme: Optional[str] = F(None, _choice(SCHEMES), doc="null: the method's scheme")
    rescale: Optional[bool] = F(None, doc="null: the method's default")
    realloc: Optional[bool] = F(None, doc="null: the method's default")
    gamma0: float = F(1.0, _rng(0.0, lo_open=True), doc="γ of a rejuvenated channel (a fresh BN's)")
    dead_threshold: float = F(0.01, _rng(0.0, 1.0, True, True))
    impl: str = F("two", _choice(("two", "four")), doc="CA convolutions: two or four per layer")
    round_to: Optional[int] = F(None, _rng(1), doc="rejuvenated widths in multiples of this, filling the budget "
                                "(refused where they cannot meet it); 1: the paper's exact floor(α·w'); null: on "
                                "CUDA 8 where they meet the budget, else exact; on CPU exact")

    def __post_init__(self):
        errors = _check_section(self, "nr.")
        if errors:
            raise ValueError("\n".join(errors))

    def with_method_defaults(self, scheme: str = "nr", rescale: bool = False, realloc: bool = True) -> "NRCfg":
        """These settings with an unset scheme / rescale / realloc taken from a method (default: NR's)."""
        return dataclasses.replace(self, scheme=scheme if self.scheme is None else self.scheme,
                                   rescale=rescale if self.rescale is None else self.rescale,
                                   realloc=realloc if self.realloc is None else self.realloc)


@dataclass(frozen=True)
class FSCfg:
    run_id: Optional[str] = F(None, doc="NR-FS: MLflow run whose final architecture is trained from scratch")
    tracking_uri: Optional[str] = F(None, doc="NR-FS: where that run lives (default: this run's URI)")
    architecture_file: Optional[str] = F(None, doc="NR-FS: exported final_widths.json / model.pt instead")


@dataclass(frozen=True)
class SlimCfg:
    l1: float = F(1e-4, _rng(0.0), doc="fixed L1 strength on BN gamma before pruning")
    prune_ratio: float = F(0.5, _rng(0.0, 1.0, True, True), doc="global |gamma| percentile pruned")
    prune_epoch: Optional[int] = F(None, _rng(1), doc="prune after this epoch (default: epochs // 2)")
    restart_schedule: bool = F(True, doc="restart the lr schedule for fine-tuning")


@dataclass(frozen=True)
class TrackingCfg:
    uri: Optional[str] = F(None, (_uri_ok, URI_ALLOWED), doc="default: $MLFLOW_TRACKING_URI or sqlite:///<runs>/mlflow.db")
    experiment: str = F("nr_study", ((lambda v: v is None or 0 < len(v.strip()) and len(v) <= 500),
                                     "a non-empty name of at most 500 characters (MLflow's limit)"))
    run_name: Optional[str] = F(None)
    tags: dict = F({}, doc="extra tags, e.g. nr.table / nr.cell")
    system_metrics: Optional[bool] = F(None, doc="MLflow system metrics (CPU, memory, GPU every 10 s); null: on "
                                               "in sweep trials, off for nr-study train")


@dataclass(frozen=True)
class FaultInjectionCfg:
    """The `testing:` section — for tests only, never for a real run: the trainer SIGKILLs its own process at a
    known point, so the fault tests can check what a kill leaves (checkpoints, runs, retries). Kept apart from
    the training settings it has nothing to do with."""

    kill_at_epoch: Optional[int] = F(None, _rng(1), doc="SIGKILL the training process at this epoch")
    kill_once_marker: Optional[str] = F(None, doc="kill only while this file is absent (it is created then)")
    kill_point: str = F("after_epoch", _choice(("after_checkpoint", "after_epoch")))


@dataclass(frozen=True)
class Config:
    method: str = F("BL", (lambda v: v is None or v in _methods(), lambda: "one of " + ", ".join(_methods())))
    seed: int = F(0, _rng(0, SEED_MAX))
    model: ModelCfg = field(default_factory=ModelCfg)
    data: DataCfg = field(default_factory=DataCfg)
    optim: OptimCfg = field(default_factory=OptimCfg)
    train: TrainCfg = field(default_factory=TrainCfg)
    nr: NRCfg = field(default_factory=NRCfg)
    fs: FSCfg = field(default_factory=FSCfg)
    slim: SlimCfg = field(default_factory=SlimCfg)
    tracking: TrackingCfg = field(default_factory=TrackingCfg)
    testing: FaultInjectionCfg = field(default_factory=FaultInjectionCfg)


# --------------------------------------------------------------------------------------------- helpers
def _hints(cls) -> dict:
    return typing.get_type_hints(cls)


def _is_section(tp) -> bool:
    return dataclasses.is_dataclass(tp)


def _unwrap_optional(tp):
    args = typing.get_args(tp)
    if typing.get_origin(tp) in (typing.Union, getattr(__import__("types"), "UnionType", None)) and type(
        None
    ) in args:
        rest = [a for a in args if a is not type(None)]
        return rest[0], True
    return tp, False


def _suggest(key: str, options) -> str:
    close = difflib.get_close_matches(key, list(options), n=1, cutoff=0.5)
    return f"; did you mean {close[0]!r}?" if close else f"; allowed keys: {', '.join(options)}"


def _tname(v) -> str:
    return type(v).__name__


def _int_error(v, key: str) -> str | None:
    if INT64[0] <= v <= INT64[1]:
        return None
    return f"{key}: {show(v)} is out of range; allowed: a 64-bit integer ({INT64[0]} to {INT64[1]})"


def _free_form_error(value, key: str, depth: int = 0) -> str | None:
    """The first problem inside a free-form value (model.kwargs, tracking.tags, a list): a mapping key MLflow
    cannot log as (part of) a param name, or an integer beyond 64 bits; None when there is none."""
    if depth > 16:
        return f"{key}: nested deeper than 16 levels; allowed: plain values, lists and mappings"
    if isinstance(value, dict):
        for k, v in value.items():
            if not (mlflow_name_ok(k) and len(f"{key}.{k}") <= 250):
                return f"{key}: key {show(k)} is not allowed; allowed: keys of {MLFLOW_NAME_RULE}"
            bad = _free_form_error(v, f"{key}.{k}", depth + 1)
            if bad:
                return bad
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            bad = _free_form_error(v, f"{key}[{i}]", depth + 1)
            if bad:
                return bad
    elif isinstance(value, int) and not isinstance(value, bool):
        return _int_error(value, key)
    elif isinstance(value, str) and "\x00" in value:
        return f"{key}: {show(value)} contains a NUL character; allowed: text without NUL"
    elif not isinstance(value, (str, int, float, type(None))):  # !!binary bytes, a date, a set: not JSON
        return f"{key}: {show(value)} has type {_tname(value)}; allowed: text, numbers, booleans, null, lists, mappings"
    return None


def _coerce(value, tp, key: str, errors: list):
    """Check/convert a leaf value against its annotation; append an error line when it does not fit."""
    base, optional = _unwrap_optional(tp)
    if value is None:
        if optional:
            return None
        errors.append(f"{key}: null is not allowed; expected {base.__name__}")
        return None
    if base is bool:
        if isinstance(value, bool):
            return value
    elif base is int:
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if isinstance(value, int) and not isinstance(value, bool):
            bad = _int_error(value, key)
            if bad is None:
                return value
            errors.append(bad)
            return None
    elif base is float:
        num = value
        if isinstance(value, str):  # YAML 1.1 reads 5e-5 as a string
            try:
                num = float(value)
            except ValueError:
                pass
        if isinstance(num, (int, float)) and not isinstance(num, bool):
            try:
                return float(num)
            except OverflowError:  # an int of hundreds of digits
                errors.append(f"{key}: {show(value)} is out of range; allowed: a finite float")
                return None
    elif base in (str, tuple, dict):
        if isinstance(value, {str: str, tuple: (list, tuple), dict: dict}[base]):
            bad = _free_form_error(value, key)
            if bad is None:
                return base(value)
            errors.append(bad)
            return None
    else:  # pragma: no cover - schema error
        raise TypeError(f"unsupported annotation {tp} for {key}")
    expected = {tuple: "list", dict: "mapping"}.get(base, base.__name__)
    errors.append(f"{key}: {show(value)} has type {_tname(value)}; expected {expected}{' or null' if optional else ''}")
    return None


def _check_value(cls, name: str, val, key: str, errors: list, verdict: str = "is out of range") -> bool:
    """The field's (predicate, allowed-text) check; appends one error line and returns False when it fails."""
    check = {f.name: f for f in dataclasses.fields(cls)}[name].metadata.get("check")
    if check is None:
        return True
    pred, allowed = check
    allowed = allowed() if callable(allowed) else allowed  # a registry's names: read when the error is written
    ok = pred(val) and not (isinstance(val, float) and not math.isfinite(val))
    if ok:
        return True
    if isinstance(val, str):
        opts = [o for o in allowed.removeprefix("one of ").split(", ")]
        m = difflib.get_close_matches(val, opts, n=1, cutoff=0.5)
        close = f"; did you mean {m[0]!r}?" if m else ""
        errors.append(f"{key}: {show(val)} is not allowed; allowed: {allowed}{close}")
    else:
        errors.append(f"{key}: {show(val)} {verdict}; allowed: {allowed.format(k=name)}")
    return False


def _check_section(obj, prefix: str) -> list[str]:
    """Type and range errors of a section built directly (not through config_from_dict), one line each."""
    errors: list[str] = []
    hints = _hints(type(obj))
    for f in dataclasses.fields(obj):
        val, key, n = getattr(obj, f.name), prefix + f.name, len(errors)
        _coerce(val, hints[f.name], key, errors)
        if len(errors) == n:
            _check_value(type(obj), f.name, val, key, errors, verdict="is not allowed")
    return errors


def _build(cls, d, prefix: str, errors: list):
    if d is None:
        d = {}
    if not isinstance(d, dict):
        errors.append(f"{prefix.rstrip('.') or 'config'}: {show(d)} has type {_tname(d)}; expected a mapping")
        return cls()
    hints = _hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for k, v in d.items():
        key = f"{prefix}{show_key(k)}"
        if k not in fields:
            errors.append(f"{key}: unknown key{_suggest(key, [prefix + n for n in fields])}")
            continue
        tp = hints[k]
        if _is_section(tp):
            kwargs[k] = _build(tp, v, key + ".", errors)
            continue
        n_before = len(errors)
        val = _coerce(v, tp, key, errors)
        if len(errors) > n_before:
            continue
        if _check_value(cls, k, val, key, errors):
            kwargs[k] = val
    try:
        return cls(**kwargs)
    except TypeError as exc:  # pragma: no cover
        errors.append(f"{prefix or 'config'}: {exc}")
        return cls()


def _cross_checks(cfg: Config, errors: list) -> None:
    if cfg.data.name == "synthetic":
        shp = cfg.data.synthetic.shape
        if len(shp) != 3 or not all(isinstance(s, int) and s >= 1 for s in shp):
            errors.append(f"data.synthetic.shape: {list(shp)!r} is not allowed; expected [C, H, W] positive ints")
    ms = cfg.optim.milestones
    if not all(isinstance(m, int) and not isinstance(m, bool) and m >= 1 for m in ms):
        errors.append(f"optim.milestones: {list(ms)!r} is not allowed; expected a list of epochs (ints >= 1)")
    if cfg.method == "NR-FS" and not (cfg.fs.run_id or cfg.fs.architecture_file):
        errors.append("fs.run_id: null is not allowed for method NR-FS; set fs.run_id or fs.architecture_file")
    if cfg.method == "SLIM" and cfg.slim.prune_epoch is not None and cfg.slim.prune_epoch > cfg.train.epochs:
        errors.append(
            f"slim.prune_epoch: {cfg.slim.prune_epoch} is out of range; allowed: 1 <= x <= train.epochs "
            f"({cfg.train.epochs})"
        )


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
    cfg = _build(Config, d or {}, "", errors)
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
        raise ConfigError(f"{path}: {show(child)} has type {_tname(child)}; expected a mapping (cannot set {key})")
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
            hints = _hints(cls)
            if part not in hints:
                prefix = ".".join(parts[:i])
                opts = [f"{prefix}.{n}" if prefix else n for n in hints]
                raise ConfigError(f"{show_key(path)}: unknown key{_suggest(path, opts)}")
            tp = hints[part]
            nxt = tp if _is_section(tp) else None
            free = _unwrap_optional(tp)[0] is dict
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
