"""Shared MLflow query helpers for the analysis: which store, which runs, which values.

Reads MLflow only (never the trainer). Names come from nr_study.names (docs/architecture.md, "Tracking
names"): tags `nr.table`, `nr.cell`, `nr.method`, `nr.arch`, `nr.dataset`, `nr.constraint`, `nr.seed`,
`nr.sweep`; the per-epoch metrics (step = epoch) and the summaries. Run params are the flattened trainer config
with dotted keys (`method`, `model.name`, `nr.tr`, ...); ATTR_KEYS reads only keys the trainer writes. Every
lookup tolerates a missing key (returns None) so callers can skip and say so.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any, Iterable

from nr_study import names as N
from nr_study.errors import ConfigError
from nr_study.methods import METHODS
from nr_study.methods.registry import SECTIONS
from nr_study.tracking_uri import check_readable_store, resolve_tracking_uri

FINISHED = N.FINISHED

# Where a value may live, in order of preference: the tag (the contract), then the flattened config's param.
ATTR_KEYS: dict[str, tuple[tuple[str, str], ...]] = {
    "method": (("tag", N.TAG_METHOD), ("param", "method")),
    "arch": (("tag", N.TAG_ARCH), ("param", "model.name")),
    "dataset": (("tag", N.TAG_DATASET), ("param", "data.name")),
    "constraint": (("tag", N.TAG_CONSTRAINT), ("param", "nr.constraint")),
    "seed": (("tag", N.TAG_SEED), ("param", "seed")),
    "scheme": (("tag", N.TAG_SCHEME), ("param", "nr.scheme")),
    "table": (("tag", N.TAG_TABLE),),
    "cell": (("tag", N.TAG_CELL),),
    "sweep": (("tag", N.TAG_SWEEP),),
    "trial": (("tag", N.TAG_TRIAL),),
    "tr": (("param", "nr.tr"),),
    "delta_lambda": (("param", "nr.delta_lambda"),),
    "delta_r": (("param", "nr.delta_r"),),
    "max_rejuvenations": (("param", "nr.max_rejuvenations"),),
    "target_ratio": (("param", "nr.target_ratio"),),
    "after_rejuvenation": (("param", "train.after_rejuvenation"),),
}

NR_METHODS = tuple(m for m, info in METHODS.items() if info.hook)  # the registry's NR variants


def to_float(value: Any) -> float | None:
    """Parse a param/tag string to float; None for missing or unparsable ("None", "", "auto")."""
    if value is None:
        return None
    if isinstance(value, (int, float)):
        return None if isinstance(value, float) and math.isnan(value) else float(value)
    try:
        out = float(str(value).strip())
    except ValueError:
        return None
    return None if math.isnan(out) else out


def norm(name: Any) -> str:
    """Normalise a name for matching: lower case, no 'tv:' prefix, alphanumerics only ('ResNet-50' -> 'resnet50')."""
    s = str(name).strip().lower()
    if s.startswith("tv:"):
        s = s[3:]
    return re.sub(r"[^a-z0-9.]", "", s).replace(".", "")


@dataclass
class RunRecord:
    """One MLflow run as the analysis sees it. `metrics` holds MLflow's latest value per key (= the value
    at the highest step, i.e. the final epoch for per-epoch metrics)."""

    run_id: str
    experiment: str
    status: str
    tags: dict[str, str]
    params: dict[str, str]
    metrics: dict[str, float]
    start_time: int = 0
    name: str = ""
    _client: Any = field(default=None, repr=False)
    _history: dict[str, list[tuple[int, float]]] = field(default_factory=dict, repr=False)

    # --- attributes -------------------------------------------------------------------------
    @property
    def complete(self) -> bool:
        """FINISHED and trained to its end: a run a scheduler (ASHA) stopped early closes FINISHED too, tagged
        nr.early_stopped; its last epoch is no final result."""
        return self.status == FINISHED and self.tags.get("nr.early_stopped") != "true"

    @property
    def outcome(self) -> str:
        """What a note calls a run that is not complete."""
        return "STOPPED EARLY" if self.status == FINISHED and not self.complete else self.status

    def get(self, attr: str) -> str | None:
        """A named attribute (see ATTR_KEYS) or, for an unknown name, the tag then the param of that name."""
        for kind, key in ATTR_KEYS.get(attr, (("tag", attr), ("param", attr))):
            src = self.tags if kind == "tag" else self.params
            val = src.get(key)
            if val not in (None, "", "None", "null", "-"):  # the trainer tags "-" where a field does not apply
                return str(val)
        return None

    def get_float(self, attr: str) -> float | None:
        return to_float(self.get(attr))

    @property
    def label(self) -> str:
        bits = [self.get("arch") or "?", self.get("method") or "?"]
        seed = self.get("seed")
        if seed is not None:
            bits.append(f"seed {seed}")
        return " ".join(bits)

    # --- metrics ------------------------------------------------------------------------------
    def history(self, key: str) -> list[tuple[int, float]]:
        """[(step, value)] sorted by step; one value per step (the last logged wins)."""
        if key not in self._history:
            points: dict[int, tuple[int, float]] = {}
            if self._client is not None and key in self.metrics:
                for m in self._client.get_metric_history(self.run_id, key):
                    prev = points.get(m.step)
                    if prev is None or m.timestamp >= prev[0]:
                        points[m.step] = (m.timestamp, m.value)
            self._history[key] = sorted((s, v) for s, (_, v) in points.items())
        return self._history[key]

    def final(self, key: str, summary: str | None = None) -> float | None:
        """Value at the final epoch: latest of the per-epoch metric `key`, else the summary metric."""
        if key in self.metrics:
            return float(self.metrics[key])
        if summary and summary in self.metrics:
            return float(self.metrics[summary])
        return None

    def best(self, key: str, summary: str | None = None) -> float | None:
        """Lowest value over the per-epoch history of `key`, else the summary metric."""
        hist = self.history(key)
        if hist:
            return min(v for _, v in hist)
        if summary and summary in self.metrics:
            return float(self.metrics[summary])
        return None

    def error(self, mode: str = "final", top: int = 1) -> float | None:
        """Top-1 (or top-5) error in % at the final epoch, or the best over epochs (mode='best')."""
        if top == 1:
            key, final_s, best_s = "test_err", "final_test_err", "best_test_err"
        else:
            key, final_s, best_s = "test_err5", "final_test_err5", "best_test_err5"
        if mode == "best":
            return self.best(key, best_s)
        return self.final(key, final_s)

    def n_params(self) -> float | None:
        """Final parameter count: summary `final_params`, else the last per-epoch `params`."""
        return self.final("final_params", "params")

    def n_flops(self) -> float | None:
        """Final FLOPs (multiply-adds): summary `final_flops`, else the last per-epoch `flops`."""
        return self.final("final_flops", "flops")

    def n_rejuvenations(self) -> float | None:
        return self.final("rejuvenations")


class RunStore:
    """Runs of one tracking store, optionally restricted to some experiments."""

    def __init__(self, tracking_uri: str | None = None, experiments: Iterable[str] | None = None, *, check: bool = True):
        from mlflow.tracking import MlflowClient  # imported here: mlflow is slow to import

        self.tracking_uri = tracking_uri or resolve_tracking_uri(create=False)
        if check:
            check_readable_store(self.tracking_uri)
        self.client = MlflowClient(tracking_uri=self.tracking_uri)
        try:
            known = {e.experiment_id: e.name for e in self._all_experiments()}
        except Exception as exc:  # unreachable server, unreadable store: one line, not a traceback
            msg = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
            raise ConfigError(f"--tracking-uri: cannot read MLflow at {self.tracking_uri} ({msg})") from None
        wanted = list(experiments or [])
        if wanted:
            by_name = {name: eid for eid, name in known.items()}
            missing = [w for w in wanted if w not in by_name]
            if missing:
                raise ConfigError(
                    f"--experiment: unknown experiment {missing[0]!r}; known: {', '.join(sorted(by_name)) or '(none)'}"
                )
            self.experiments = {by_name[w]: w for w in wanted}
        else:
            self.experiments = known
        self._all: list[RunRecord] | None = None
        self.parents: list[RunRecord] = []

    def _all_experiments(self):
        out, token = [], None
        while True:
            page = self.client.search_experiments(max_results=1000, page_token=token)
            out.extend(page)
            token = page.token
            if not token:
                return out

    def all_runs(self) -> list[RunRecord]:
        """Every active run of the chosen experiments, any status, sweep parent runs excluded."""
        if self._all is None:
            records: list[RunRecord] = []
            ids = list(self.experiments)
            token = None
            while ids:
                page = self.client.search_runs(ids, max_results=5000, page_token=token)
                for r in page:
                    records.append(
                        RunRecord(
                            run_id=r.info.run_id,
                            experiment=self.experiments.get(r.info.experiment_id, r.info.experiment_id),
                            status=r.info.status,
                            tags=dict(r.data.tags),
                            params=dict(r.data.params),
                            metrics=dict(r.data.metrics),
                            start_time=r.info.start_time or 0,
                            name=r.info.run_name or "",
                            _client=self.client,
                        )
                    )
                token = page.token
                if not token:
                    break
            # sweep parent runs: parents of other runs, or tagged nr.role = sweep (a parent without children yet)
            parents = {r.tags.get("mlflow.parentRunId") for r in records} - {None}
            parents |= {r.run_id for r in records if r.tags.get("nr.role") == "sweep"}
            self.parents = [r for r in records if r.run_id in parents]
            self._all = [r for r in records if r.run_id not in parents]
        return self._all

    def finished(self, where: dict[str, str] | None = None) -> list[RunRecord]:
        """Runs that trained to their end (complete) whose attributes equal `where` (e.g. {"table": "table1"})."""
        return [r for r in self.all_runs() if r.complete and not (where and any(r.get(k) != v for k, v in where.items()))]

    def not_finished(self, where: dict[str, str] | None = None) -> list[RunRecord]:
        """The others: failed, killed, running, or stopped early by a sweep's scheduler."""
        return [r for r in self.all_runs()
                if not r.complete and not (where and any(r.get(k) != v for k, v in where.items()))]


# Where and how a run ran, not what it trained: runs of one configuration may differ here (and in tracking.*).
NOT_CONFIG = ("seed", "name", "data.root", "data.download", "data.num_workers", "train.device", "train.threads",
              "train.eval_batch_size", "train.channels_last", "train.cuda_deterministic")
NOT_CONFIG_PREFIXES = ("tracking.", "testing.")
# What a method itself defines (nr_study.sweep.pairs.pair_config): the only keys a paired comparison may differ in.
METHOD_KEYS = ("method", "train.after_rejuvenation", "optim.restart_after_rejuvenation")
METHOD_PREFIXES = tuple(f"{s}." for s in SECTIONS)  # nr., fs., slim., redo., cbp.


def is_method_key(key: str) -> bool:
    return key in METHOD_KEYS or key.startswith(METHOD_PREFIXES)


def configuration(run: RunRecord, method: bool = True) -> dict[str, str]:
    """The run's configuration, from its logged params: what runs averaged in one table cell must share
    (method=True), or, without the method's own keys, what a run and its paired baseline must share
    (method=False). A baseline's nr/fs/slim/after-rejuvenation params are left out: it never reads them."""
    info = METHODS.get(run.get("method") or "")
    plain = info is not None and not info.reads and not info.changes_model  # BL: reads no nr/fs/slim, no protocol
    return {k: v for k, v in run.params.items()
            if k not in NOT_CONFIG and not k.startswith(NOT_CONFIG_PREFIXES)
            and not (is_method_key(k) and (not method or (plain and k != "method")))}


def rejuvenation_count(run: RunRecord) -> tuple[int | None, str | None]:
    """How many rejuvenations a run stands for: its `nr.cell` tag ("nr3", "cifar10/nr3"), else its final
    `rejuvenations` metric, else the param `nr.max_rejuvenations`, else 0 for a BL run.
    Returns (count or None, a note when the tag and the logged count disagree)."""
    logged = run.n_rejuvenations()
    cell = run.get("cell")
    m = re.search(r"(?:^|[/_:.-])nr(?:ej)?[=_]?(\d+)(?:$|[/_:.-])", cell or "", flags=re.I)
    if m:
        count = int(m.group(1))
        if logged is not None and int(logged) != count:
            return count, f"run {run.run_id[:8]} is tagged {cell!r} but logged {int(logged)} rejuvenations"
        return count, None
    if logged is not None:
        return int(logged), None
    mx = run.get_float("max_rejuvenations")
    if mx is not None:
        return int(mx), None
    if (run.get("method") or "").upper() == "BL":
        return 0, None
    return None, None
