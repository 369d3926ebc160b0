"""Search-space files (`search_spaces/*.yaml`): schema, loading, validation and trial expansion.

Schema (every key but `name` and `base` optional):

    name: demo                      # [A-Za-z0-9_.-]+, names the sweep's folder and MLflow parent run
    experiment: nr-demo             # MLflow experiment (default: name)
    description: free text
    base: {...}                     # a full training config (nr_study.config), validated by the trainer's code
    space:                          # dotted config key -> distribution
      method: {grid: [BL, NR-CR]}           # every value is a trial dimension (cartesian product)
      nr.tr: [0.5, 0.25]                    # a bare list is a grid
      nr.delta_lambda: {loguniform: [1e-5, 1e-3]}
      nr.delta_r: {uniform: [0.005, 0.05]}
      nr.max_rejuvenations: {randint: [0, 6]}   # integers lo <= x < hi (Ray's convention)
      model.name: {choice: [vgg_small, vgg19_bn_cifar]}  # sampled (random/optuna) - not a grid
    search: grid | random | optuna          # or a mapping:
    search: {type: optuna, sampler: tpe | nsga2, objectives: [test_err: min, params: min], seed: 0}
    scheduler: fifo | asha                  # or {type: asha, metric, mode, grace_period, reduction_factor,
                                            #     max_t (default: base train.epochs), brackets}
    num_samples: 1      # grid: must be 1; random: samples per grid point; optuna: configurations proposed
    max_concurrent: 2   # trials at once (default: as many as the resources allow)
    resources_per_trial: {cpu: 1, gpu: 0.5} # fractional GPUs allowed; a trial runs torch with `cpu` threads
    max_failures: 1     # retries of a trial whose worker died/errored; it resumes from its last checkpoint
    reuse_actors: true  # the default: a finished trial's worker process runs the next trial (no process
                        # start-up, torch and MLflow already imported; see nr-study bench); false: a fresh
                        # process per trial
    repeat: 3           # seeds per configuration: base seed + 0..repeat-1 (tag nr.seed)
    pair_with: BL       # every trial also trains (or reuses) this method on the same configuration and seed
                        # and reports delta_test_err = its test_err - the pair's, per epoch (an objective,
                        # an ASHA metric); see nr_study.sweep.pairs
    tags:               # MLflow tags on every child run: `table` -> nr.table, other keys -> nr.<key>
      table: table4
      cell: "{data.name}/{model.name}/{method}"   # per-trial cell name from (swept) config values

Aliases accepted in `space` (and --set): model.arch -> model.name, train.seed -> seed, dataset -> data.name.
Every error names the file and the key, the value, and what is allowed; all errors are listed at once.
"""
from __future__ import annotations

import copy
import difflib
import itertools
import math
import re
from dataclasses import dataclass, field
from typing import Any

import yaml

from nr_study.config import INT64, SEED_MAX, mapping_at, mlflow_name_ok, show, show_key
from nr_study.errors import ConfigError
from nr_study.labels import fmt_value, short_key
from nr_study.names import DELTA_METRIC


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


@dataclass
class SearchSpace:
    path: str
    name: str
    experiment: str
    description: str
    base: dict                       # full, validated nested training config (config_to_dict form)
    dims: list[Dim]
    search: str = "grid"
    sampler: str | None = None
    objectives: list[tuple[str, str]] = field(default_factory=lambda: [("test_err", "min")])
    search_seed: int | None = None
    scheduler: dict = field(default_factory=lambda: {"type": "fifo"})
    num_samples: int = 1
    max_concurrent: int | None = None
    cpu: float = 1.0
    gpu: float = 0.0
    max_failures: int = 1
    repeat: int = 1
    tags: dict = field(default_factory=dict)
    cell: str | None = None
    document: dict = field(default_factory=dict)  # the (overridden) YAML document, as loaded
    base_raw: dict = field(default_factory=dict)  # `base` as written (what trials train: robust to new defaults)
    pair_with: str | None = None     # the method each trial is paired with (nr_study.sweep.pairs)
    reuse_actors: bool = True        # Ray Tune's: one worker process runs trial after trial

    # -- derived -----------------------------------------------------------------------------------
    @property
    def grid_dims(self) -> list[Dim]:
        return [d for d in self.dims if d.kind == "grid"]

    @property
    def sampled_dims(self) -> list[Dim]:
        return [d for d in self.dims if d.kind != "grid"]

    @property
    def swept_keys(self) -> list[str]:
        return [d.key for d in self.dims]

    @property
    def configurations(self) -> int:
        """Distinct configurations (before seeds)."""
        if self.search == "optuna":
            return self.num_samples
        return math.prod(len(d.values) for d in self.grid_dims) * self.num_samples

    @property
    def num_trials(self) -> int:
        return self.configurations * self.repeat

    @property
    def base_seed(self) -> int:
        return int(self.base.get("seed", 0))

    @property
    def multi_objective(self) -> bool:
        return len(self.objectives) > 1

    def param_space(self) -> dict:
        """Ray Tune param_space: flat {dotted key: domain}; `__repeat__` grid for seeds (grid/random)."""
        from ray import tune

        ps: dict[str, Any] = {}
        for d in self.dims:
            if d.kind == "grid":
                ps[d.key] = tune.choice(d.values) if self.search == "optuna" else tune.grid_search(d.values)
            elif d.kind == "choice":
                ps[d.key] = tune.choice(d.values)
            elif d.kind == "uniform":
                ps[d.key] = tune.uniform(d.low, d.high)
            elif d.kind == "loguniform":
                ps[d.key] = tune.loguniform(d.low, d.high)
            elif d.kind == "randint":
                ps[d.key] = tune.randint(int(d.low), int(d.high))
        if self.repeat > 1 and self.search != "optuna":
            ps[REPEAT_KEY] = tune.grid_search(list(range(self.repeat)))
        return ps

    # -- per trial ---------------------------------------------------------------------------------
    def trial_values(self, config: dict) -> dict:
        """The swept values of a trial config (Ray's), seed resolved: {dotted key: value}."""
        vals: dict = {}
        for d in self.dims:
            if d.key not in config:
                continue
            if d.key == VARIANT_KEY:
                vals.update({k: v for k, v in d.variants[config[d.key]].items()})
            else:
                vals[d.key] = config[d.key]
        if "seed" not in vals:
            idx = config.get(REPEAT_KEY, config.get(TRIAL_INDEX_KEY, 0)) or 0
            vals["seed"] = self.base_seed + int(idx)
        return vals

    def trial_config(self, config: dict, sparse: bool = False) -> dict:
        """The nested training config of a trial (a fresh dict): every field (for naming), or, with sparse,
        only what the file and the swept values set (what the trial trains; the trainer fills defaults)."""
        from nr_study.config import set_dotted

        d = copy.deepcopy(self.base_raw if sparse else self.base)
        for k, v in self.trial_values(config).items():
            set_dotted(d, k, v)
        return d

    def resolve_trial(self, config: dict, data_root: str | None = None):
        """A trial, resolved once: (Config, run name, tags) from Ray's `config`. The file's `base` as written plus
        the swept values is validated once (config_from_dict); the name and tags are read off that Config; the
        trial trains under this sweep's experiment, with train.threads = the trial's CPUs and data.root =
        `data_root` unless the file sets them. The namer, the trial function and the summary all use this."""
        import dataclasses

        from nr_study.config import config_from_dict, config_to_dict, set_dotted

        values = self.trial_values(config)
        d = copy.deepcopy(self.base_raw)
        for k, v in values.items():
            set_dotted(d, k, v)
        set_dotted(d, "tracking.experiment", self.experiment)
        cfg = config_from_dict(d)
        full = config_to_dict(cfg)
        variant = config.get(VARIANT_KEY) if any(dim.key == VARIANT_KEY for dim in self.dims) else None
        name = self.run_name(full, values)
        R = dataclasses.replace
        cfg = R(cfg, tracking=R(cfg.tracking, run_name=name),
                train=R(cfg.train, threads=cfg.train.threads or max(1, int(self.cpu))),
                data=R(cfg.data, root=cfg.data.root or data_root))
        return cfg, name, self.trial_tags(full, values, variant)

    def _outside_variant(self, values: dict, variant) -> dict:
        """The swept values a trial's variant label does not already say (all of them without a variant)."""
        if variant is None:
            return values
        inside = next(d for d in self.dims if d.key == VARIANT_KEY).variants.get(variant, {})
        return {k: v for k, v in values.items() if k not in inside}

    def cell_name(self, full: dict, values: dict, variant=None) -> str:
        """tags.cell's template, else the variant's label (its `name`) and the other swept values."""
        if self.cell:
            return format_template(self.cell, full, where=f"{self.path}: tags.cell")
        parts = [str(variant)] if variant is not None else []
        parts += [f"{short_key(k)}={fmt_value(v)}" if short_key(k) else fmt_value(v)
                  for k, v in self._outside_variant(values, variant).items() if k != "seed"]
        return ",".join(parts) or self.name

    def run_name(self, full: dict, values: dict) -> str:
        """Readable child-run name: method, arch, swept values, seed."""
        parts = [str(full.get("method")), str(full.get("model", {}).get("name"))]
        for k, v in values.items():
            if k in ("method", "model.name", "seed"):
                continue
            parts.append(f"{short_key(k)}{fmt_value(v)}" if short_key(k) else fmt_value(v))
        parts.append(f"s{values.get('seed', full.get('seed', 0))}")
        return "-".join(parts)

    def trial_tags(self, full: dict, values: dict, variant=None) -> dict:
        tags = {}
        for k, v in self.tags.items():
            if k == "cell":
                continue
            tags[k if k.startswith(("nr.", "mlflow.")) else f"nr.{k}"] = str(v)
        tags["nr.cell"] = self.cell_name(full, values, variant)
        tags["nr.sweep"] = self.name
        return tags


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


# --------------------------------------------------------------------------------------------- loading
def read_document(path) -> dict:
    from nr_study.files import read_yaml

    return read_yaml(path, "search space file")


def apply_space_overrides(doc: dict, overrides) -> dict:
    """`--set` on a search-space document. KEY is a dotted path into the document; `space.<config key>`
    replaces one dimension (a mapping/list value) or fixes it (a scalar: moved into base); a key whose first
    part is not a top-level key goes to `base` (so `--set train.epochs=1` works)."""
    from nr_study.config import parse_override

    for pair in overrides or []:
        key, value = parse_override(pair)
        head, _, rest = key.partition(".")
        if head == "space" and rest:
            rest = ALIASES.get(rest, rest)
            space = mapping_at(doc, "space", "space", key)
            for k in list(space):
                if ALIASES.get(k, k) == rest:
                    del space[k]
            if isinstance(value, (dict, list)):
                space[rest] = value
            else:
                _set_nested(doc.setdefault("base", {}), rest, value)
            continue
        if head not in TOP_KEYS:
            key = "base." + ALIASES.get(key, key)
        elif head == "base":
            key = "base." + ALIASES.get(rest, rest)
        _set_nested(doc, key, value)
    return doc


def _set_nested(d: dict, key: str, value) -> None:
    parts = key.split(".")
    for i, p in enumerate(parts[:-1]):
        d = mapping_at(d, p, ".".join(parts[: i + 1]), key)
    d[parts[-1]] = value


def load_search_space(path, overrides=()) -> SearchSpace:
    """Read, override and validate a search-space file; raises ConfigError listing every bad field."""
    doc = read_document(path)
    apply_space_overrides(doc, overrides)
    return parse_search_space(doc, str(path))


def parse_search_space(doc: dict, path: str = "<search space>") -> SearchSpace:
    from nr_study.config import config_from_dict, config_to_dict, set_dotted

    errors: list[str] = []

    def err(key: str, msg: str) -> None:
        errors.append(f"{path}: {key}: {msg}")

    if not isinstance(doc, dict):
        raise ConfigError(f"{path}: top level must be a mapping, got {type(doc).__name__}")
    for k in doc:
        if k not in TOP_KEYS:
            err(show_key(k), "unknown key" + _suggest(str(k), TOP_KEYS))

    # name / experiment / description
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

    # base
    base_raw = doc.get("base")
    base: dict = {}
    if not isinstance(base_raw, dict):
        err("base", f"{show(base_raw)} is not allowed; required, a training config mapping (see nr_study.config)")
    else:
        try:
            base = config_to_dict(config_from_dict(copy.deepcopy(base_raw)))
        except ConfigError as exc:
            errors.extend(f"{path}: base.{line}" for line in str(exc).splitlines())
        _check_model_names([base_raw.get("model", {}).get("name")] if isinstance(base_raw.get("model"), dict)
                           else [], lambda m: err("base.model.name", m))

    # search
    search, sampler, objectives, search_seed = _parse_search(doc.get("search", "grid"), err)

    # space
    dims: list[Dim] = []
    space_raw = doc.get("space")
    space_raw = {} if space_raw is None else space_raw
    if not isinstance(space_raw, dict):
        err("space", f"{show(space_raw)} is not allowed; a mapping of dotted config keys to distributions")
        space_raw = {}
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
            if dim is not None:
                if search == "grid" and dim.kind != "grid":
                    err(where, f"{dim.kind} is not allowed with search: grid; allowed: grid")
                    continue
                dims.append(dim)
            continue
        try:
            set_dotted({}, key, None)
        except ConfigError as exc:
            err(where, str(exc))
            continue
        dim = _parse_dim(key, spec, where, err)
        if dim is None:
            continue
        if search == "grid" and dim.kind != "grid":
            err(where, f"{dim.kind} is not allowed with search: grid; allowed: grid (or use search: random/optuna)")
            continue
        if base:
            _validate_dim_values(dim, base, where, err, config_from_dict, set_dotted)
        if key == "model.name":
            _check_model_names(dim.values or [], lambda m: err(where, m))
        dims.append(dim)

    # scalars
    num_samples = _int(doc, "num_samples", 1, 1, err)
    max_concurrent = doc.get("max_concurrent")
    if max_concurrent is not None:
        max_concurrent = _int(doc, "max_concurrent", None, 1, err)
    max_failures = _int(doc, "max_failures", 1, 0, err)
    repeat = _int(doc, "repeat", 1, 1, err)
    reuse_actors = doc.get("reuse_actors", True)
    if not isinstance(reuse_actors, bool):
        err("reuse_actors", f"{show(reuse_actors)} is not allowed; allowed: true, false")
        reuse_actors = True
    if search == "grid" and num_samples not in (None, 1):
        err("num_samples", f"{show(num_samples)} is not allowed with search: grid; allowed: 1 (use repeat for seeds)")
    if repeat and repeat > 1 and "seed" in seen:
        err("repeat", f"{show(repeat)} is not allowed while seed is a space dimension; allowed: 1")
    if base and repeat and base["seed"] + repeat - 1 > SEED_MAX:
        err("repeat", f"{show(repeat)} is not allowed with base seed {base['seed']}: the seeds would pass {SEED_MAX}; "
                      f"allowed: repeat <= {SEED_MAX - base['seed'] + 1}")

    # resources
    cpu, gpu = _parse_resources(doc.get("resources_per_trial", {}), err)

    if base:
        device = base["train"]["device"]
        if device == "cuda" and gpu == 0:
            err("resources_per_trial.gpu", "0 is not allowed with base train.device: cuda; allowed: a GPU share > 0 "
                "(fractions like 0.5 allowed), or train.device: auto/cpu")
        elif device == "cpu" and gpu > 0:
            err("resources_per_trial.gpu", f"{gpu:g} is not allowed with base train.device: cpu; allowed: 0 "
                "(or train.device: auto/cuda)")

    # scheduler
    scheduler = _parse_scheduler(doc.get("scheduler", "fifo"), objectives, base, err)

    # tags
    tags_raw = doc.get("tags")
    tags_raw = {} if tags_raw is None else tags_raw
    tags: dict = {}
    cell = None
    if not isinstance(tags_raw, dict):
        err("tags", f"{show(tags_raw)} is not allowed; a mapping like {{table: table4, cell: '{{method}}'}}")
    else:
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

    pair_with = _parse_pair_with(doc.get("pair_with"), base, dims, objectives, scheduler, err)
    _fit_asha_horizon(scheduler, doc.get("scheduler"), base, dims, err)

    if errors:
        raise ConfigError("\n".join(errors))
    return SearchSpace(path=path, name=name, experiment=experiment, description=description, base=base,
                       dims=dims, search=search, sampler=sampler, objectives=objectives,
                       search_seed=search_seed, scheduler=scheduler, num_samples=num_samples,
                       max_concurrent=max_concurrent, cpu=cpu, gpu=gpu, max_failures=max_failures,
                       repeat=repeat, tags=tags, cell=cell, document=doc,
                       base_raw=copy.deepcopy(base_raw) if isinstance(base_raw, dict) else {}, pair_with=pair_with,
                       reuse_actors=reuse_actors)


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
    if base and "reset_epochs" in {str(v) for v in _values_of("train.after_rejuvenation", base, dims)}:
        err("pair_with", f"{raw}: train.after_rejuvenation reset_epochs trains more epochs than its baseline, so no "
                         f"epoch pairs them; allowed with pair_with: continue, restart_schedule")
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


# --------------------------------------------------------------------------------------------- dry run
def expand_trials(space: SearchSpace) -> list[dict]:
    """The trials a grid/random sweep will run (sampled dims shown as their distribution); for optuna,
    one row per proposed configuration x seed with every dim shown as its distribution."""
    rows = []
    grid = space.grid_dims if space.search != "optuna" else []
    for sample in range(space.num_samples):
        for combo in itertools.product(*[d.values for d in grid]):
            for r in range(space.repeat):
                cfg = {d.key: v for d, v in zip(grid, combo)}
                if space.repeat > 1:
                    cfg[REPEAT_KEY if space.search != "optuna" else TRIAL_INDEX_KEY] = r
                values = space.trial_values(cfg)
                full = space.trial_config(cfg)
                shown = {d.key: cfg[d.key] if d.key in cfg else "~" + d.describe() for d in space.dims}
                shown["seed"] = values["seed"]
                variant = cfg.get(VARIANT_KEY)
                try:
                    cell = space.cell_name(full, values, variant)
                    if space.sampled_dims and space.cell:
                        cell += " (+ sampled values)"
                except ConfigError:
                    cell = "?"
                rows.append({"name": space.run_name(full, values), "values": shown, "cell": cell,
                             "sample": sample})
        if space.search == "optuna":
            break
    return rows


def dry_run_text(space: SearchSpace, cluster: dict | None = None) -> str:
    lines = [f"sweep {space.name} ({space.path}) -> MLflow experiment {space.experiment!r}"]
    if space.description:
        lines.append(f"  {space.description.strip()}")
    s = space.search
    if s == "optuna":
        objs = ", ".join(f"{m}: {md}" for m, md in space.objectives)
        s += f" (sampler {space.sampler.upper() if space.sampler == 'tpe' else 'NSGA-II'}; objectives {objs})"
    sch = space.scheduler["type"]
    if sch == "asha":
        sc = space.scheduler
        sch += (f" (metric {sc['metric']} {sc['mode']}, grace_period {sc['grace_period']}, "
                f"reduction_factor {sc['reduction_factor']:g}, max_t {sc['max_t']}, brackets {sc['brackets']})")
    lines.append(f"search: {s}; scheduler: {sch}")
    for d in space.dims:
        lines.append(f"  {d.key}: {d.describe()}")
    lines.append(f"trials: {space.num_trials} ({space.configurations} configurations x {space.repeat} seed(s)); "
                 f"max_failures {space.max_failures}")
    conc = space.max_concurrent
    res = f"resources per trial: {space.cpu:g} CPU, {space.gpu:g} GPU (torch threads {max(1, int(space.cpu))})"
    lines.append(res)
    if cluster:
        by_cpu = int(cluster.get("CPU", 0) // space.cpu) if space.cpu else 0
        by_gpu = int(cluster.get("GPU", 0) // space.gpu) if space.gpu else None
        fit = min(x for x in (by_cpu, by_gpu) if x is not None)
        at_once = min(fit, conc) if conc else fit
        lines.append(f"cluster: {cluster.get('CPU', 0):g} CPU, {cluster.get('GPU', 0):g} GPU -> "
                     f"{at_once} trial(s) at once (max_concurrent {conc or 'unset'}), needing "
                     f"{at_once * space.cpu:g} CPU, {at_once * space.gpu:g} GPU")
        if fit < 1:
            lines.append("WARNING: one trial needs more than the cluster has; trials would stay PENDING")
    elif conc:
        lines.append(f"max_concurrent: {conc}")
    lines.append(f"base: method {space.base.get('method')}, model {space.base['model']['name']}, data "
                 f"{space.base['data']['name']}, epochs {space.base['train']['epochs']}, batch "
                 f"{space.base['train']['batch_size']}, lr {space.base['optim']['lr']:g} "
                 f"({space.base['optim']['schedule']})")
    tag_txt = ", ".join(f"{k}={v}" for k, v in space.tags.items())
    if tag_txt:
        lines.append(f"tags: {tag_txt}")
    rows = expand_trials(space)
    if space.search == "optuna":
        lines.append(f"{space.num_trials} trial(s) proposed by Optuna one at a time ({space.num_samples} "
                     f"configurations x {space.repeat} seed(s)); values shown as distributions")
    keys = [d.key for d in space.dims] + (["seed"] if "seed" not in [d.key for d in space.dims] else [])
    header = ["#", "run name"] + keys + ["cell"]
    table = [header]
    for i, r in enumerate(rows, 1):
        table.append([str(i), r["name"]] + [fmt_value(r["values"].get(k, "")) for k in keys] + [r["cell"]])
    widths = [max(len(row[c]) for row in table) for c in range(len(header))]
    for row in table:
        lines.append("  " + "  ".join(x.ljust(w) for x, w in zip(row, widths)).rstrip())
    return "\n".join(lines)


def dump_document(doc: dict) -> str:
    return yaml.safe_dump(doc, sort_keys=False, default_flow_style=None)
