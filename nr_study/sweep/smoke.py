"""What `nr-study sweep FILE --smoke` runs: the search space made small enough for one machine, and nothing else.

A smoke trial keeps what a cluster run could trip over — its architecture, its input size and class count, its
method and options, the sweep's search and pairs, tags and table — and changes only what it must to finish in
minutes on this machine (the keys, old -> new, are printed before it starts):

- every trial: SMOKE_EPOCHS epochs of SMOKE_STEPS steps, the batch at most SMOKE_BATCH (the full-scale spaces'
  256 ImageNet images at 224 px do not fit a laptop), SMOKE_TEST_IMAGES test images, synthetic data of the
  dataset's shape and class count (data.synthetic_stand_in: no dataset needed), this machine's device;
- NR methods (those running NR's hook with a rejuvenation to make) rejuvenate at the end of the first epoch,
  so the surgery runs on the real graph: r is measured after every epoch (nr.delta_t 1 epoch, the ImageNet
  spaces' own) and before that the trainer zeroes the γ of the weakest SMOKE_SILENCED of every layer's channels
  (testing.silence_fraction; 99 %, then all but one a layer, where r would stay at or above nr.tr), so r is
  under any nr.tr the hook accepts and every layer keeps survivors as after a real run's L1: the regrown widths
  follow the architecture's. (Raising nr.dead_threshold instead left one channel a layer and a uniform regrowth:
  VGG-16's 224 px layers at 580 channels, still in the trial's second epoch after 20 CPU-minutes.) nr.tr, the
  target, the window and the dead threshold stay as written, so their checks run;
- SLIM prunes after epoch 1 (slim.prune_epoch);
- the sweep: its own name and MLflow experiment (`<name>-smoke`, `<experiment>-smoke`, tag nr.smoke), the
  CPUs/GPU this machine has, FIFO (every trial runs to its end), one retry per trial, and the test-only fault
  injection: the first trial to finish epoch 1 is SIGKILLed once, so the sweep's retry runs (it reloads the
  epoch-1 checkpoint, after an NR trial's surgery). It is killed between the checkpoint and the epoch's logging,
  the hardest moment: the resumed run must still log that epoch and its rejuvenation report (the report travels
  in the checkpoint; the per-trial check fails a trial that rejuvenated without one).

`smoke_variant(config) -> (config, {key: (old, new)})` is the rule for one training config; `smoke_document`
applies it to a search-space document (its base for every method, and any dimension over a key it sets) and
checks that every trial of the result is its own smoke variant. `check_table_name` refuses a table tag that
looks like one of the paper's but is none (its runs would land in a sweep table of their own). The driver
that runs the result is nr_study.sweep.smoke_run.
"""
from __future__ import annotations

import copy
import difflib
import re
from typing import Any

from nr_study.errors import ConfigError

SMOKE_EPOCHS = 2           # a reset_epochs trial that rejuvenates in epoch 1 trains 1 + 2
SMOKE_STEPS = 3            # steps per epoch: a handful
SMOKE_BATCH = 4            # images per step at most (memory and time on a laptop CPU)
SMOKE_TEST_IMAGES = 4      # one evaluation batch
SMOKE_SILENCED = 0.9       # the fraction of every layer's channels that dies before each epoch's r (see above)
SMOKE_MARK = "-smoke"

NR_GROUP, SLIM_GROUP = "NR methods, to rejuvenate after epoch 1", "SLIM, to prune after epoch 1"


def _get(d: dict, key: str):
    for part in key.split("."):
        d = d.get(part) if isinstance(d, dict) else None
    return d


def config_overrides(full: dict, device: str, every_method: bool = False) -> dict[str, Any]:
    """The smoke's value of each key it sets in a full training config (config_to_dict form). `every_method`:
    also the NR and SLIM keys when this config's method reads none of them (a space's base, whose trials may
    sweep the method: the keys are inert for a method that does not read them)."""
    from nr_study.methods import METHODS

    batch = min(int(full["train"]["batch_size"]), SMOKE_BATCH)
    out: dict[str, Any] = {"train.epochs": min(int(full["train"]["epochs"]), SMOKE_EPOCHS),
                           "train.batch_size": batch, "data.n_train": batch * SMOKE_STEPS,
                           "data.n_test": SMOKE_TEST_IMAGES, "train.device": device}
    if full["data"]["name"] != "synthetic":
        out["data.synthetic_stand_in"] = True
    info = METHODS.get(full.get("method"))
    if every_method or (info is not None and info.hook and int(full["nr"]["max_rejuvenations"]) > 0):
        out.update({"nr.delta_t_unit": "epoch", "nr.delta_t": 1, "testing.silence_fraction": SMOKE_SILENCED})
    if every_method or (info is not None and "slim" in info.reads):
        out["slim.prune_epoch"] = 1
    return out


def smoke_variant(cfg: dict, device: str = "cpu") -> tuple[dict, dict[str, tuple]]:
    """A training config (nested dict, sparse or full) as the smoke trains it, and {dotted key: (old, new)} for
    every key whose value it changed. Pure: `cfg` is left as it was."""
    from nr_study.config import config_from_dict, config_to_dict, set_dotted

    full = config_to_dict(config_from_dict(cfg))
    out, changed = copy.deepcopy(cfg), {}
    for key, new in config_overrides(full, device).items():
        old = _get(full, key)
        if old != new:
            set_dotted(out, key, new)
            changed[key] = (old, new)
    return out, changed


def _fmt(v) -> str:
    """A value as YAML writes it (0.99999, not fmt_value's rounded 1; null, true, [a, b])."""
    import yaml

    text = yaml.safe_dump(v, default_flow_style=True, width=10**6).strip()
    return text[:-4].strip() if text.endswith("\n...") else text


def _group(key: str) -> str:
    if key.startswith("nr.") or key == "testing.silence_fraction":
        return NR_GROUP
    if key.startswith("slim."):
        return SLIM_GROUP
    return "every trial"


def smoke_document(doc: dict, space, *, cpus: int, cuda: bool, marker: str) -> tuple[dict, dict[str, list]]:
    """The search-space document `doc` (already parsed as `space`) as the smoke runs it, and the changes it made,
    grouped ({group: ["key: old -> new", ...]}). `marker`: the file the fault injection creates when it kills."""
    from nr_study.config import set_dotted
    from nr_study.sweep.space_fields import ALIASES, VARIANT_KEY

    out = copy.deepcopy(doc)
    device = "cuda" if cuda and space.gpu > 0 else "cpu"
    groups: dict[str, list] = {}

    def note(group: str, key: str, old, new) -> None:
        groups.setdefault(group, []).append(f"{key} {_fmt(old)} -> {_fmt(new)}")

    values = config_overrides(space.base, device, every_method=True)
    read = set()  # the keys some trial's method reads (the others are set too, and inert: not listed)
    for point in space.grid_points():
        read |= set(smoke_variant(space.trial_config(point), device)[1])
    base = out.setdefault("base", {})
    for key, new in values.items():
        old = _get(space.base, key)
        if old != new:
            set_dotted(base, key, new)
            if key in read or _group(key) == "every trial":
                note(_group(key), key, old, new)
    for raw_key, spec in list((out.get("space") or {}).items()):
        key = ALIASES.get(str(raw_key), str(raw_key))
        if key == VARIANT_KEY:
            entries = spec if isinstance(spec, list) else next(iter(spec.values()))
            labels = next(d.values for d in space.dims if d.key == VARIANT_KEY)
            for entry, label in zip(entries, labels):
                entry.setdefault("name", label)  # a variant keeps its label (its trial's name) when values change
                own = _variant_overrides(space, entry, device)  # its own values: min(its epochs, 2), ...
                for k in list(entry):
                    ck = ALIASES.get(str(k), str(k))
                    if ck in own and entry[k] != own[ck]:
                        note(_group(ck), f"space.variant[{entry.get('name', '')}].{k}", entry[k], own[ck])
                        entry[k] = own[ck]
        elif key in values:  # a dimension over a key the smoke sets: one value (those trials are one smoke trial)
            out["space"][raw_key] = [values[key]]
            note(_group(key), f"space.{raw_key}", spec, [values[key]])
    sweep = "the sweep"
    for key, new in (("name", space.name + SMOKE_MARK), ("experiment", space.experiment + SMOKE_MARK)):
        note(sweep, key, out.get(key, space.name), new)
        out[key] = new
    out["description"] = f"smoke run of {space.path}: " + (space.description or space.name)
    cpu = min(space.cpu, float(cpus))
    gpu = space.gpu if device == "cuda" else 0
    if (cpu, gpu) != (space.cpu, space.gpu):
        groups.setdefault(sweep, []).append(f"resources_per_trial {{cpu: {space.cpu:g}, gpu: {space.gpu:g}}} -> "
                                            f"{{cpu: {cpu:g}, gpu: {gpu:g}}}")
    out["resources_per_trial"] = {"cpu": cpu, "gpu": gpu}
    if space.max_failures != 1:
        note(sweep, "max_failures", space.max_failures, 1)
    out["max_failures"] = 1  # the one forced restart needs one retry; a trial that fails on its own fails fast
    if space.scheduler["type"] != "fifo":
        note(sweep, "scheduler", space.scheduler["type"], "fifo")
        out["scheduler"] = "fifo"  # every trial runs to its end: a table leaves out what a scheduler stopped
    tags = dict(out.get("tags") or {})
    tags["smoke"] = "true"
    out["tags"] = tags
    testing = {"kill_at_epoch": 1, "kill_point": "after_checkpoint", "kill_once_marker": str(marker)}
    base.setdefault("testing", {}).update(testing)
    groups["fault injection (once, the first trial to finish epoch 1; its retry continues it)"] = [
        f"testing.{k} -> {_fmt(v)}" for k, v in testing.items()]
    _check_every_trial(out, space.path, device)
    return out, groups


def _variant_overrides(space, entry: dict, device: str) -> dict:
    """The smoke's values for a variant's own settings (its epochs or batch, not the base's)."""
    from nr_study.config import config_from_dict, config_to_dict, set_dotted
    from nr_study.sweep.space_fields import ALIASES

    d = copy.deepcopy(space.base)
    for k, v in entry.items():
        if k != "name":
            set_dotted(d, ALIASES.get(str(k), str(k)), v)
    return config_overrides(config_to_dict(config_from_dict(d)), device, every_method=True)


def _check_every_trial(doc: dict, path: str, device: str) -> None:
    """Every trial of the smoke space is its own smoke variant: no dimension undoes what the smoke set."""
    from nr_study.sweep.space import parse_search_space

    smoke = parse_search_space(copy.deepcopy(doc), f"{path} (smoke)")
    for point in smoke.grid_points():
        changed = smoke_variant(smoke.trial_config(point), device)[1]
        if changed:
            key, (old, new) = next(iter(changed.items()))
            raise ConfigError(f"{path}: {key}: a trial of the smoke keeps {old!r}; the smoke needs {new!r} "
                              f"(a dimension sets it in a form the smoke does not rewrite)")


def subset_document(doc: dict, space, picks: list[int]) -> dict:
    """The grid space `doc` (parsed as `space`) narrowed to some of its trials (indices in the order of
    SearchSpace.grid_points / --dry-run), each trial as it was: its values, seed, run name and cell. What the tests
    smoke of each full-scale space when every trial would take too long."""
    from nr_study.sweep.space_fields import VARIANT_KEY

    if space.search != "grid" or space.sampled_dims:
        raise ConfigError(f"{space.path}: search: {space.search}: a subset of trials needs a grid")
    points = space.grid_points()
    entries, labels = [], set()
    for i in picks:
        cfg = points[i]
        values = space.trial_values(cfg)
        label = space.cell_name(space.trial_config(cfg), values, cfg.get(VARIANT_KEY))
        if label in labels or space.cell:
            label = space.run_name(space.trial_config(cfg), values)
        labels.add(label)
        entries.append({**values, "name": label})
    out = copy.deepcopy(doc)
    out["space"] = {VARIANT_KEY: entries}
    out["repeat"] = 1
    return out


def known_tables() -> set[str]:
    """Every table or figure name `nr-study tables` and `plots` build from an nr.table tag as the paper's (or a
    CPU analogue's) rather than as a sweep's own table."""
    from nr_study.analysis.paper import FIGURE1_TABLES, load_paper

    paper = load_paper()
    return set(paper.tables) | set(paper.cpu_tables) | set(FIGURE1_TABLES)


def check_table_name(space) -> None:
    """A table tag that looks like the paper's (table7, fig2, tabel4) but is none: refused, one line. Its runs would
    fill a sweep table of their own, and a day of GPU runs would be missing from the table it was meant for."""
    table = space.tags.get("table", space.tags.get("nr.table"))
    if table is None:
        return
    known = known_tables()
    table = str(table)
    if table in known:
        return
    close = difflib.get_close_matches(table, sorted(known), 1, 0.75)
    if re.fullmatch(r"(table|fig|figure)\d+", table, re.IGNORECASE) or close:
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ConfigError(f"{space.path}: tags.table: {table!r} is no table nr-study tables or plots knows: its "
                          f"runs would fill a sweep table of their own, not the paper's; allowed: "
                          f"{', '.join(sorted(known))}, or a name of your own unlike these{hint}")
