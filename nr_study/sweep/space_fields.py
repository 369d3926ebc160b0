"""The fields of a search-space file (nr_study.sweep.space has the schema): the names, constants and the Dim
record they share, and one parser per field. Each parser takes the raw value and `err(key, message)`, reports
every problem it finds (one line each, all listed at once) and returns what it could read."""
from __future__ import annotations

import copy
import difflib
import math
import re
from dataclasses import dataclass
from typing import Any

from nr_study.config import SEED_MAX
from nr_study.errors import ConfigError
from nr_study.labels import fmt_value, short_key
from nr_study.names import DELTA_METRIC
from nr_study.schema import INT64, mlflow_name_ok, show, show_key


TOP_KEYS = ("name", "experiment", "description", "base", "space", "search", "scheduler", "num_samples",
            "max_concurrent", "resources_per_trial", "max_failures", "repeat", "tags", "pair_with", "reuse_actors")
SEARCHES = ("grid", "random", "optuna")
SAMPLERS = ("tpe", "nsga2")
SCHEDULERS = ("fifo", "asha")
KINDS = ("grid", "choice", "uniform", "loguniform", "randint")
METRICS = ("test_err", "test_err5", "train_err", "train_loss", "util_params", "util_flops", "lambda",
           "params", "flops", "rejuvenations", "epoch_time", "images_per_s", DELTA_METRIC)
PAIRED_METRICS = (DELTA_METRIC,)  # only with pair_with (nr_study.sweep.pairs)
MODES = ("min", "max")
ALIASES = {"model.arch": "model.name", "train.seed": "seed", "arch": "model.name", "dataset": "data.name"}
VARIANT_KEY = "variant"             # a grid over named bundles of settings (see module doc)
REPEAT_KEY = "__repeat__"          # grid dimension over 0..repeat-1 (grid/random search)
TRIAL_INDEX_KEY = "__trial_index__"  # Ray's Repeater index (optuna search)
_NAME_RE = re.compile(r"[A-Za-z0-9_.-]{1,200}")


@dataclass
class Dim:
    key: str            # canonical dotted config key
    kind: str           # one of KINDS
    values: list | None = None  # grid / choice
    low: float | None = None    # uniform / loguniform / randint
    high: float | None = None
    variants: dict | None = None  # key == "variant": label -> {dotted key: value}

    def describe(self) -> str:
        if self.variants is not None:
            return f"{self.kind}(" + "; ".join(self.values) + ")"
        if self.kind in ("grid", "choice"):
            return f"{self.kind}({', '.join(fmt_value(v) for v in self.values)})"
        return f"{self.kind}({fmt_value(self.low)}, {fmt_value(self.high)})"


_FIELD_RE = re.compile(r"\{([^{}:!]+)(?::([^{}]*))?\}")


def get_dotted(d: dict, key: str):
    node = d
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            raise KeyError(key)
        node = node[part]
    return node


def format_template(template: str, full: dict, where: str = "template") -> str:
    """'{model.name}/{nr.tr:.2f}' with dotted keys looked up in the nested config `full`."""

    def sub(m):
        key = ALIASES.get(m.group(1).strip(), m.group(1).strip())
        try:
            v = get_dotted(full, key)
        except KeyError:
            raise ConfigError(f"{where}: {show(template)} names unknown config key {show(m.group(1))}") from None
        spec = m.group(2)
        if spec and any(int(n) > 1000 for n in re.findall(r"\d+", spec)):  # '{seed:>2000000000}' is 2 GB
            raise ConfigError(f"{where}: format spec {show(spec)} is not allowed; allowed: widths and precisions "
                              f"up to 1000")
        if spec:
            try:
                return format(v, spec)
            except (ValueError, TypeError):
                raise ConfigError(f"{where}: format spec {show(spec)} does not fit {key}={show(v)}") from None
        return fmt_value(v)

    return _FIELD_RE.sub(sub, template)


def _parse_names(doc: dict, err) -> tuple[str, str, str]:
    name = doc.get("name")
    if not isinstance(name, str) or not _NAME_RE.fullmatch(name) or name in (".", ".."):
        err("name", f"{show(name)} is not allowed; required, 1 to 200 letters, digits, '_', '.', '-' (a folder "
                    f"name, not . or ..)")
        name = "sweep"
    experiment = doc.get("experiment", name)
    if not isinstance(experiment, str) or not experiment.strip() or len(experiment) > 500:
        err("experiment", f"{show(experiment)} is not allowed; a non-empty string of at most 500 characters "
                          f"(MLflow experiment)")
        experiment = name
    description = doc.get("description")  # absent or null: none; any other non-string is refused (0, [])
    description = "" if description is None else description
    if not isinstance(description, str):
        err("description", f"{show(description)} is not allowed; a string")
    return name, experiment, description


def _parse_base(base_raw, err, errors: list, path: str) -> dict:
    """The full training config every trial starts from, validated by the trainer's own code."""
    from nr_study.config import config_from_dict, config_to_dict

    if not isinstance(base_raw, dict):
        err("base", f"{show(base_raw)} is not allowed; required, a training config mapping (see nr_study.config)")
        return {}
    base: dict = {}
    try:
        base = config_to_dict(config_from_dict(copy.deepcopy(base_raw)))
    except ConfigError as exc:
        errors.extend(f"{path}: base.{line}" for line in str(exc).splitlines())
    _check_model_names([base_raw.get("model", {}).get("name")] if isinstance(base_raw.get("model"), dict)
                       else [], lambda m: err("base.model.name", m))
    return base


def _parse_dims(space_raw, search: str, base: dict, err) -> tuple[list[Dim], set]:
    """The `space:` mapping: one dimension per dotted config key (aliases resolved), each value checked against
    the trainer's config when the base is valid."""
    from nr_study.config import config_from_dict, set_dotted

    space_raw = {} if space_raw is None else space_raw
    if not isinstance(space_raw, dict):
        err("space", f"{show(space_raw)} is not allowed; a mapping of dotted config keys to distributions")
        return [], set()
    dims: list[Dim] = []
    seen = set()
    for raw_key, spec in space_raw.items():
        key = ALIASES.get(str(raw_key), str(raw_key))
        where = f"space.{show_key(raw_key)}"
        if key in seen:
            err(where, f"duplicate dimension {show(key)} (aliases: {ALIASES})")
            continue
        seen.add(key)
        if key == VARIANT_KEY:
            dim = _parse_variants(spec, where, err, base, config_from_dict, set_dotted)
        else:
            try:
                set_dotted({}, key, None)
            except ConfigError as exc:
                err(where, str(exc))
                continue
            dim = _parse_dim(key, spec, where, err)
        if dim is None:
            continue
        if search == "grid" and dim.kind != "grid":
            hint = "" if key == VARIANT_KEY else " (or use search: random/optuna)"
            err(where, f"{dim.kind} is not allowed with search: grid; allowed: grid{hint}")
            continue
        if key != VARIANT_KEY and base:
            _validate_dim_values(dim, base, where, err, config_from_dict, set_dotted)
        if key == "model.name":
            _check_model_names(dim.values or [], lambda m, where=where: err(where, m))
        dims.append(dim)
    return dims, seen


def _parse_counts(doc: dict, search: str, seen: set, base: dict, err) -> dict:
    """num_samples, max_concurrent, max_failures, repeat, reuse_actors."""
    out = {"num_samples": _int(doc, "num_samples", 1, 1, err), "max_concurrent": None,
           "max_failures": _int(doc, "max_failures", 1, 0, err), "repeat": _int(doc, "repeat", 1, 1, err)}
    if doc.get("max_concurrent") is not None:
        out["max_concurrent"] = _int(doc, "max_concurrent", None, 1, err)
    reuse_actors = doc.get("reuse_actors", True)
    if not isinstance(reuse_actors, bool):
        err("reuse_actors", f"{show(reuse_actors)} is not allowed; allowed: true, false")
        reuse_actors = True
    out["reuse_actors"] = reuse_actors
    num_samples, repeat = out["num_samples"], out["repeat"]
    if search == "grid" and num_samples not in (None, 1):
        err("num_samples", f"{show(num_samples)} is not allowed with search: grid; allowed: 1 (use repeat for seeds)")
    if repeat and repeat > 1 and "seed" in seen:
        err("repeat", f"{show(repeat)} is not allowed while seed is a space dimension; allowed: 1")
    if base and repeat and base["seed"] + repeat - 1 > SEED_MAX:
        err("repeat", f"{show(repeat)} is not allowed with base seed {base['seed']}: the seeds would pass {SEED_MAX}; "
                      f"allowed: repeat <= {SEED_MAX - base['seed'] + 1}")
    return out


def _check_device(base: dict, gpu: float, err) -> None:
    device = base["train"]["device"] if base else None
    if device == "cuda" and gpu == 0:
        err("resources_per_trial.gpu", "0 is not allowed with base train.device: cuda; allowed: a GPU share > 0 "
            "(fractions like 0.5 allowed), or train.device: auto/cpu")
    elif device == "cpu" and gpu > 0:
        err("resources_per_trial.gpu", f"{gpu:g} is not allowed with base train.device: cpu; allowed: 0 "
            "(or train.device: auto/cuda)")


def _parse_tags(tags_raw, base: dict, err, errors: list, path: str) -> tuple[dict, str | None]:
    """MLflow tags for every child run, and the per-trial cell template (checked against the base)."""
    tags_raw = {} if tags_raw is None else tags_raw
    if not isinstance(tags_raw, dict):
        err("tags", f"{show(tags_raw)} is not allowed; a mapping like {{table: table4, cell: '{{method}}'}}")
        return {}, None
    tags: dict = {}
    for k, v in tags_raw.items():
        tag = k if str(k).startswith(("nr.", "mlflow.")) else f"nr.{k}"  # as trial_tags names it
        if not str(k).strip() or not mlflow_name_ok(tag):
            err("tags", f"key {show(k)} is not allowed; allowed: an MLflow tag name (letters, digits, '_', "
                        f"'-', '.', ' ', ':', '/')")
            continue
        if not isinstance(v, (str, int, float, bool)):
            err(f"tags.{show_key(k)}", f"{show(v)} is not allowed; a string")
            continue
        tags[str(k)] = v
    cell = tags.get("cell")
    if cell is not None:
        cell = str(cell)
        if base:
            try:
                format_template(cell, base, where=f"{path}: tags.cell")
            except ConfigError as exc:
                errors.append(str(exc))
    return tags, cell


def _values_of(key: str, base: dict, dims: list[Dim]) -> list:
    """Every value a config key takes in this space's trials: a dimension's or base's, and each variant's."""
    plain = next((d for d in dims if d.key == key), None)
    vals = list(plain.values or []) if plain else [get_dotted(base, key)]
    for d in dims:
        if d.variants is not None:
            sets = [v[key] for v in d.variants.values() if key in v]
            if plain is None and len(sets) == len(d.variants):
                vals = []  # every variant sets it: base's value never trains
            vals += sets
    return vals


def _check_tr_below_target(base: dict, dims: list[Dim], err) -> None:
    """NR's hook refuses nr.tr above nr.target_ratio (a rejuvenation then would have to drop live channels to meet
    the target, and it keeps every live one): refuse the space now, naming the values, rather than each such trial
    when it starts. Exact per variant; a sampled dimension counts with its whole range."""
    from nr_study.methods import METHODS

    if not base:
        return

    def values(key: str, combo: dict) -> list:
        if key in combo:
            return [combo[key]]
        dim = next((d for d in dims if d.key == key), None)
        if dim is None:
            return [get_dotted(base, key)]
        return list(dim.values) if dim.values is not None else [dim.low, dim.high]

    variants = next((d.variants for d in dims if d.variants is not None), None) or {"": {}}
    for label, combo in variants.items():
        if not any(m in METHODS and METHODS[m].hook for m in map(str, values("method", combo))):
            continue
        nums = lambda key: [float(v) for v in values(key, combo) if isinstance(v, (int, float))]  # noqa: E731
        tr, target = max(nums("nr.tr"), default=0.0), min(nums("nr.target_ratio"), default=1.0)
        if tr > target:
            where = f" (variant {label})" if label else ""
            err("nr.tr", f"{tr:g} is above nr.target_ratio {target:g}{where}: a rejuvenation keeps every live "
                         f"channel, so it could not meet the target; allowed: nr.tr <= nr.target_ratio")
            return


def _largest(key: str, base: dict, dims: list[Dim]) -> int:
    """The largest value an integer config key takes in this space (a randint's upper end included)."""
    vals = [v for v in _values_of(key, base, dims) if isinstance(v, (int, float)) and not isinstance(v, bool)]
    vals += [d.high for d in dims if d.key == key and d.high is not None]
    return int(max(vals)) if vals else 0


def longest_trial(base: dict, dims: list[Dim]) -> tuple[int, str]:
    """The most epochs a trial of this space can train, and why. Under train.after_rejuvenation reset_epochs (the
    paper's protocol) each rejuvenation (or pruning) restarts the count: train.epochs more epochs after the one it
    happened in, so at most (1 + events) x train.epochs."""
    epochs = _largest("train.epochs", base, dims)
    if "reset_epochs" not in {str(v) for v in _values_of("train.after_rejuvenation", base, dims)}:
        return epochs, f"train.epochs {epochs}"
    events = max(1, _largest("nr.max_rejuvenations", base, dims))
    return (1 + events) * epochs, (f"train.epochs {epochs} x (1 + {events} rejuvenation(s)) under "
                                   f"train.after_rejuvenation reset_epochs")


def _fit_asha_horizon(scheduler: dict, raw, base, dims, err) -> None:
    """ASHA ends every trial at max_t epochs, as if it had trained to its end: a trial longer than max_t was cut
    short with no final metrics and no model yet looked finished. max_t defaults to the longest trial; a smaller
    one is refused."""
    if scheduler.get("type") != "asha" or not base:
        return
    longest, why = longest_trial(base, dims)
    if not (isinstance(raw, dict) and "max_t" in raw):
        scheduler["max_t"] = max(longest, scheduler["grace_period"])
    elif scheduler["max_t"] < longest:
        err("scheduler.max_t", f"{scheduler['max_t']} is not allowed; allowed: >= {longest} (the longest trial: "
                               f"{why}); ASHA would stop longer trials before their end")


def _parse_pair_with(raw, base, dims, objectives, scheduler, err) -> str | None:
    from nr_study.methods import METHODS

    used = [m for m, _ in objectives] + ([scheduler["metric"]] if scheduler.get("type") == "asha" else [])
    if raw is None:
        for m in used:
            if m in PAIRED_METRICS:
                err("search.objectives" if m in dict(objectives) else "scheduler.metric",
                    f"{m} is only allowed with pair_with (a method each trial is compared with, e.g. pair_with: BL)")
        return None
    if not isinstance(raw, str) or raw not in METHODS:
        err("pair_with", f"{show(raw)} is not allowed; allowed: one of {', '.join(METHODS)}")
        return None
    if base and raw in {str(v) for v in _values_of("method", base, dims)}:
        err("pair_with", f"{raw}: method {raw} is the paired baseline itself; sweep the methods compared with it")
    return raw


def _suggest(key: str, options) -> str:
    close = difflib.get_close_matches(key, list(options), n=1, cutoff=0.5)
    return f"; did you mean {close[0]!r}?" if close else f"; allowed: {', '.join(options)}"


def _is_int(v, lo: int, hi: int = INT64[1]) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and lo <= v <= hi


def _int(doc, key, default, lo, err):
    v = doc.get(key, default)
    if v is None:
        return default
    if not _is_int(v, lo):
        err(key, f"{show(v)} is not allowed; allowed: an integer >= {lo} (64-bit)")
        return default
    return v


def _number(v) -> float | None:
    """A finite number (YAML 1.1 reads 1e-5 as a string); None for anything else, NaN and infinities included."""
    if isinstance(v, bool) or not isinstance(v, (int, float, str)):
        return None
    try:
        x = float(v)
    except (ValueError, OverflowError):
        return None
    return x if math.isfinite(x) else None


def _parse_objectives(raw, err) -> list[tuple[str, str]]:
    items: list[tuple[Any, Any]] = []
    if isinstance(raw, dict):
        items = list(raw.items())
    elif isinstance(raw, str):
        items = [tuple(raw.split(":", 1)) if ":" in raw else (raw, "min")]
    elif isinstance(raw, list) and raw:
        for it in raw:
            if isinstance(it, dict) and len(it) == 1:
                items.append(next(iter(it.items())))
            elif isinstance(it, str):
                items.append(tuple(s.strip() for s in it.split(":", 1)) if ":" in it else (it, "min"))
            else:
                err("search.objectives", f"{show(it)} is not allowed; allowed: entries like test_err: min")
    else:
        err("search.objectives", f"{show(raw)} is not allowed; allowed: a list like [test_err: min, params: min]")
    out = []
    for metric, mode in items:
        metric, mode = str(metric).strip(), str(mode).strip()
        if metric not in METRICS:
            close = difflib.get_close_matches(metric, METRICS, 1, 0.5)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            err("search.objectives", f"{show(metric)} is not allowed; allowed: {', '.join(METRICS)}{hint}")
            continue
        if mode not in MODES:
            err(f"search.objectives.{metric}", f"{show(mode)} is not allowed; allowed: min, max")
            continue
        out.append((metric, mode))
    if len({m for m, _ in out}) != len(out):
        err("search.objectives", "a metric appears twice")
    return out or [("test_err", "min")]


def _parse_search(raw, err):
    sampler = None
    seed = None
    objectives = [("test_err", "min")]
    if isinstance(raw, str):
        kind = raw
        spec = {}
    elif isinstance(raw, dict):
        spec = dict(raw)
        kind = spec.pop("type", None)
        if kind is None:
            err("search.type", "missing; allowed: " + ", ".join(SEARCHES))
            return "grid", None, objectives, None
    else:
        err("search", f"{show(raw)} is not allowed; allowed: {', '.join(SEARCHES)} or a mapping with type")
        return "grid", None, objectives, None
    if kind not in SEARCHES:
        err("search" if isinstance(raw, str) else "search.type",
            f"{show(kind)} is not allowed; allowed: {', '.join(SEARCHES)}")
        kind = "grid"
    for k in list(spec):
        if k not in ("sampler", "objectives", "seed"):
            err(f"search.{show_key(k)}", "unknown key" + _suggest(str(k), ("type", "sampler", "objectives", "seed")))
    if "objectives" in spec:
        objectives = _parse_objectives(spec["objectives"], err)
    if "seed" in spec:
        seed = spec["seed"]
        if not _is_int(seed, 0, SEED_MAX):
            err("search.seed", f"{show(seed)} is not allowed; allowed: an integer 0 <= seed <= {SEED_MAX}")
            seed = None
    if kind == "optuna":
        default = "nsga2" if len(objectives) > 1 else "tpe"
        sampler = str(spec.get("sampler", default)).lower().replace("-", "").replace("_", "")
        if sampler not in SAMPLERS:
            err("search.sampler", f"{show(spec.get('sampler'))} is not allowed; allowed: tpe, nsga2 (NSGA-II)")
            sampler = default
    elif "sampler" in spec:
        err("search.sampler", f"{show(spec['sampler'])} is only allowed with type: optuna")
    return kind, sampler, objectives, seed


def _parse_dim(key, spec, where, err) -> Dim | None:
    if isinstance(spec, list):
        spec = {"grid": spec}
    if not isinstance(spec, dict) or len(spec) != 1:
        err(where, f"{show(spec)} is not allowed; allowed: one of {{grid|choice: [values]}}, "
                   "{uniform|loguniform|randint: [low, high]} (fixed values belong in base)")
        return None
    kind, arg = next(iter(spec.items()))
    if kind not in KINDS:
        err(where, f"{show(kind)} is not allowed; allowed: {', '.join(KINDS)}")
        return None
    if kind in ("grid", "choice"):
        if not isinstance(arg, list) or not arg:
            err(f"{where}.{kind}", f"{show(arg)} is not allowed; allowed: a non-empty list of values")
            return None
        return Dim(key, kind, values=list(arg))
    if not isinstance(arg, list) or len(arg) != 2:
        err(f"{where}.{kind}", f"{show(arg)} is not allowed; allowed: [low, high]")
        return None
    lo, hi = _number(arg[0]), _number(arg[1])
    if lo is None or hi is None or not (lo < hi):
        err(f"{where}.{kind}", f"{show(arg)} is not allowed; allowed: [low, high] numbers with low < high")
        return None
    if kind == "loguniform" and lo <= 0:
        err(f"{where}.{kind}", f"{show(arg)} is not allowed; allowed: 0 < low < high")
        return None
    if kind == "randint":
        if not (lo.is_integer() and hi.is_integer()):
            err(f"{where}.{kind}", f"{show(arg)} is not allowed; allowed: integers [low, high), high exclusive")
            return None
        return Dim(key, kind, low=int(lo), high=int(hi))
    return Dim(key, kind, low=lo, high=hi)


def _parse_variants(spec, where, err, base, config_from_dict, set_dotted) -> Dim | None:
    """`variant: [{method: BL}, {method: NR-CR, nr.tr: 0.5, name: nrcr-0.5}]` (a bare list is a grid)."""
    kind = "grid"
    if isinstance(spec, dict) and len(spec) == 1 and next(iter(spec)) in ("grid", "choice"):
        kind, spec = next(iter(spec.items()))
    if not isinstance(spec, list) or not spec or not all(isinstance(v, dict) and v for v in spec):
        err(where, f"{show(spec)} is not allowed; allowed: a non-empty list of mappings {{dotted config key: value}} "
                   "(optional 'name'), e.g. [{method: BL}, {method: NR-CR, nr.tr: 0.5}]")
        return None
    variants: dict[str, dict] = {}
    for i, raw in enumerate(spec):
        settings = {}
        for k, v in raw.items():
            if k == "name":
                continue
            ck = ALIASES.get(str(k), str(k))
            try:
                set_dotted({}, ck, None)
            except ConfigError as exc:
                err(f"{where}[{i}]", str(exc))
                continue
            settings[ck] = v
        label = raw.get("name")
        if label is None:
            label = ",".join(fmt_value(v) if k in ("method", "model.name", "data.name")
                             else f"{short_key(k) or k}={fmt_value(v)}" for k, v in settings.items())
        label = str(label)
        if label in variants:
            err(f"{where}[{i}]", f"duplicate variant {show(label)}; give each a distinct 'name'")
            continue
        if base:
            d = copy.deepcopy(base)
            for k, v in settings.items():
                set_dotted(d, k, v)
            try:
                config_from_dict(d)
            except ConfigError as exc:
                for line in str(exc).splitlines():
                    err(f"{where}[{i}]", line)
        variants[label] = settings
    return Dim(VARIANT_KEY, kind, values=list(variants), variants=variants)


def _validate_dim_values(dim: Dim, base: dict, where: str, err, config_from_dict, set_dotted) -> None:
    """Each grid/choice value (or each bound of a range) must give a valid training config."""
    if dim.kind in ("grid", "choice"):
        probes = list(enumerate(dim.values))
    elif dim.kind == "randint":
        probes = [(0, dim.low), (1, dim.high - 1)]
    else:
        probes = [(0, dim.low), (1, dim.high)]
    for i, v in probes:
        d = copy.deepcopy(base)
        set_dotted(d, dim.key, v)
        try:
            config_from_dict(d)
        except ConfigError as exc:
            for line in str(exc).splitlines():
                err(f"{where}.{dim.kind}[{i}]", line)


def _check_model_names(names, report) -> None:
    try:
        from nr_study.models import list_models
        known = list_models()
    except Exception:  # registry not importable: the trainer will refuse bad names
        return
    if not known:
        return
    for n in names:
        if isinstance(n, str) and not n.startswith("tv:") and n not in known:
            close = difflib.get_close_matches(n, known, 1, 0.5)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            report(f"{show(n)} is not allowed; allowed: a registered model ({', '.join(known)}) or tv:<name>{hint}")


def _parse_resources(raw, err) -> tuple[float, float]:
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        err("resources_per_trial", f"{show(raw)} is not allowed; allowed: a mapping {{cpu: 1, gpu: 0.5}}")
        return 1.0, 0.0
    for k in raw:
        if k not in ("cpu", "gpu"):
            err(f"resources_per_trial.{show_key(k)}", "unknown key; allowed: cpu, gpu")
    cpu = _number(raw.get("cpu", 1))
    gpu = _number(raw.get("gpu", 0))
    if cpu is None or cpu <= 0:
        err("resources_per_trial.cpu", f"{show(raw.get('cpu'))} is not allowed; allowed: a number > 0")
        cpu = 1.0
    if gpu is None or gpu < 0 or (gpu > 1 and not gpu.is_integer()):
        err("resources_per_trial.gpu",
            f"{show(raw.get('gpu'))} is not allowed; allowed: 0, a fraction 0 < x < 1, or a whole number")
        gpu = 0.0
    return cpu, gpu


def _parse_scheduler(raw, objectives, base, err) -> dict:
    if isinstance(raw, str):
        spec = {"type": raw}
    elif isinstance(raw, dict):
        spec = dict(raw)
    else:
        err("scheduler", f"{show(raw)} is not allowed; allowed: fifo, asha or a mapping with type")
        return {"type": "fifo"}
    kind = spec.get("type", "fifo")
    if kind not in SCHEDULERS:
        err("scheduler.type", f"{show(kind)} is not allowed; allowed: {', '.join(SCHEDULERS)}")
        return {"type": "fifo"}
    out = {"type": kind}
    allowed = ("type",) if kind == "fifo" else ("type", "metric", "mode", "grace_period", "reduction_factor",
                                                 "max_t", "brackets")
    for k in spec:
        if k not in allowed:
            err(f"scheduler.{show_key(k)}", f"unknown key for {kind}" + _suggest(str(k), allowed))
    if kind == "asha":
        metric = spec.get("metric", objectives[0][0])
        mode = spec.get("mode", dict(objectives).get(metric, "min"))
        if metric not in METRICS:
            err("scheduler.metric", f"{show(metric)} is not allowed; allowed: {', '.join(METRICS)}")
        if mode not in MODES:
            err("scheduler.mode", f"{show(mode)} is not allowed; allowed: min, max")
        epochs = int(base.get("train", {}).get("epochs", 1)) if base else 1
        out.update(metric=metric, mode=mode)
        for k, default, lo in (("grace_period", 1, 1), ("max_t", epochs, 1), ("brackets", 1, 1)):
            v = spec.get(k, default)
            if not _is_int(v, lo):
                err(f"scheduler.{k}", f"{show(v)} is not allowed; allowed: an integer >= {lo}")
                v = default
            out[k] = v
        rf = _number(spec.get("reduction_factor", 2))
        if rf is None or rf <= 1:
            err("scheduler.reduction_factor", f"{show(spec.get('reduction_factor'))} is not allowed; allowed: > 1")
            rf = 2.0
        out["reduction_factor"] = rf
        if out["grace_period"] > out["max_t"]:
            err("scheduler.grace_period", f"{out['grace_period']} is not allowed; allowed: <= max_t ({out['max_t']})")
    return out
