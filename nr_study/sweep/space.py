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
import itertools
import math
from dataclasses import dataclass, field
from typing import Any

import yaml

from nr_study.config import mapping_at
from nr_study.errors import ConfigError
from nr_study.labels import fmt_value, short_key
from nr_study.schema import show_key
from nr_study.sweep.space_fields import (
    ALIASES, REPEAT_KEY, SAMPLERS, TOP_KEYS, TRIAL_INDEX_KEY, VARIANT_KEY, Dim, _check_device, _check_tr_below_target,
    _fit_asha_horizon,
    _parse_base, _parse_counts, _parse_dims, _parse_names, _parse_pair_with, _parse_resources, _parse_scheduler,
    _parse_search, _parse_tags, _suggest, format_template)

# What other modules take from here (the schema's field parsers live in space_fields).
__all__ = ["SearchSpace", "Dim", "REPEAT_KEY", "TRIAL_INDEX_KEY", "SAMPLERS", "load_search_space",
           "parse_search_space", "read_document", "apply_space_overrides", "format_template", "expand_trials",
           "dry_run_text", "dump_document"]


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

    def grid_points(self, repeat_key: str = REPEAT_KEY) -> list[dict]:
        """The flat configs of the grid's values x seeds (`repeat_key`: the seed index), in the order Ray's
        BasicVariantGenerator makes them; optuna grids nothing here (it proposes every value)."""
        grid = self.grid_dims if self.search != "optuna" else []
        out = []
        for combo in itertools.product(*[d.values for d in grid]):
            for r in range(self.repeat):
                cfg = {d.key: v for d, v in zip(grid, combo)}
                if self.repeat > 1:
                    cfg[repeat_key] = r
                out.append(cfg)
        return out

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
    """A search-space document as a SearchSpace; raises ConfigError listing every bad field, one line each."""
    errors: list[str] = []

    def err(key: str, msg: str) -> None:
        errors.append(f"{path}: {key}: {msg}")

    if not isinstance(doc, dict):
        raise ConfigError(f"{path}: top level must be a mapping, got {type(doc).__name__}")
    for k in doc:
        if k not in TOP_KEYS:
            err(show_key(k), "unknown key" + _suggest(str(k), TOP_KEYS))
    name, experiment, description = _parse_names(doc, err)
    base_raw = doc.get("base")
    base = _parse_base(base_raw, err, errors, path)
    search, sampler, objectives, search_seed = _parse_search(doc.get("search", "grid"), err)
    dims, seen = _parse_dims(doc.get("space"), search, base, err)
    counts = _parse_counts(doc, search, seen, base, err)
    cpu, gpu = _parse_resources(doc.get("resources_per_trial", {}), err)
    _check_device(base, gpu, err)
    scheduler = _parse_scheduler(doc.get("scheduler", "fifo"), objectives, base, err)
    tags, cell = _parse_tags(doc.get("tags"), base, err, errors, path)
    pair_with = _parse_pair_with(doc.get("pair_with"), base, dims, objectives, scheduler, err)
    _fit_asha_horizon(scheduler, doc.get("scheduler"), base, dims, err)
    _check_tr_below_target(base, dims, err)
    if errors:
        raise ConfigError("\n".join(errors))
    return SearchSpace(path=path, name=name, experiment=experiment, description=description, base=base,
                       dims=dims, search=search, sampler=sampler, objectives=objectives,
                       search_seed=search_seed, scheduler=scheduler, cpu=cpu, gpu=gpu, tags=tags, cell=cell,
                       document=doc, base_raw=copy.deepcopy(base_raw) if isinstance(base_raw, dict) else {},
                       pair_with=pair_with, **counts)


def expand_trials(space: SearchSpace) -> list[dict]:
    """The trials a grid/random sweep will run (sampled dims shown as their distribution); for optuna,
    one row per proposed configuration x seed with every dim shown as its distribution."""
    rows = []
    for sample in range(space.num_samples):
        for cfg in space.grid_points(REPEAT_KEY if space.search != "optuna" else TRIAL_INDEX_KEY):
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
    lines += protocol_lines(space)
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


def protocol_lines(space: SearchSpace) -> list[str]:
    """The base config's lr schedule and what follows a rejuvenation, and NR's settings where a trial's method
    runs NR's hook: what a full-scale space mirrors of the official commands (a variant's or a dimension's own
    values show in its label)."""
    from nr_study.methods import METHODS
    from nr_study.sweep.space_fields import _values_of

    o, t, nr = space.base["optim"], space.base["train"], space.base.get("nr") or {}
    sched = o["schedule"] + (f" (lr x{o['gamma']:g} after epochs {list(o['milestones'])})"
                             if o["schedule"] == "step" else "")
    lines = [f"schedule: {sched}, weight decay {o['weight_decay']:g}; after a rejuvenation: "
             f"{t['after_rejuvenation']}"]
    methods = {str(m) for m in _values_of("method", space.base, space.dims)}
    if nr and any(m in METHODS and METHODS[m].hook for m in methods):
        lam = (f"fixed {nr['lambda_fixed']:g}" if nr["lambda_mode"] == "fixed" else
               f"adaptive (+{nr['delta_lambda']:g} while r falls less than {nr['delta_r']:g} per "
               f"{nr['delta_t']} {nr['delta_t_unit']}(s))")
        window = f", NR window {nr['window_epochs']} epochs" if nr.get("window_epochs") else ""
        lines.append(f"nr: tr {nr['tr']:g}, lambda {lam}, target {nr['target_ratio']:g} x C ({nr['constraint']}), "
                     f"up to {nr['max_rejuvenations']} rejuvenation(s){window}")
    return lines


def dump_document(doc: dict) -> str:
    return yaml.safe_dump(doc, sort_keys=False, default_flow_style=None)
