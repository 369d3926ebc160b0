"""Labels and value formats of configurations: how a config key is shortened and a value printed in a trial's
name or a table's row, and the label that keeps configurations sharing one cell name apart.

Pure functions, no torch and no MLflow: the sweep (nr_study.sweep.space, which re-exports them) and the
analysis (nr_study.analysis.tables, which never imports the sweep) both use them.
"""
from __future__ import annotations

SHORT = {"method": "", "model.name": "", "seed": "s", "nr.tr": "tr", "nr.delta_r": "dr",
         "nr.delta_lambda": "dl", "nr.delta_t": "dt", "nr.max_rejuvenations": "nrej",
         "nr.target_ratio": "target", "nr.constraint": "", "nr.scheme": "scheme", "nr.rescale": "rescale",
         "nr.lambda_max": "lmax", "data.name": "", "optim.lr": "lr"}


def fmt_value(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def short_key(key: str) -> str:
    return SHORT.get(key, key.rsplit(".", 1)[-1])


def distinct_labels(items: list[tuple[str, dict]]) -> list[str]:
    """The row label of each (cell name, configuration) item: the cell name, or where configurations that differ
    share one cell name (a tags.cell template naming fewer keys than the sweep varies, an Optuna search), the
    name with the first keys they differ in, so that different configurations are never one row."""
    by_cell: dict[str, list[dict]] = {}
    for cell, conf in items:
        if conf not in by_cell.setdefault(cell, []):
            by_cell[cell].append(conf)
    labels = {}
    for cell, confs in by_cell.items():
        varying = varying_keys(confs)
        for i, conf in enumerate(confs):
            if len(confs) == 1:
                label = cell
            else:
                label = f"{cell} [" + ", ".join(f"{short_key(k) or k}={fmt_value(_num(conf.get(k, '-')))}"
                                                for k in varying[:4]) + (", ...]" if len(varying) > 4 else "]")
            labels[(cell, i)] = label if label not in labels.values() else f"{label} #{i + 1}"
    return [labels[(cell, by_cell[cell].index(conf))] for cell, conf in items]


def varying_keys(confs: list[dict]) -> list[str]:
    """The keys whose values differ between these configurations (a key one of them lacks counts)."""
    return sorted(k for k in set().union(*confs) if len({repr(c.get(k)) for c in confs}) > 1)


def _num(v):
    """A number in its own type (params come back from MLflow as strings), for fmt_value."""
    if isinstance(v, str):
        try:
            return int(v)
        except ValueError:
            try:
                return float(v)
            except ValueError:
                return v
    return v
