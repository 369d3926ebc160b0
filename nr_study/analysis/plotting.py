"""What every plot of `nr-study plots` shares: matplotlib on the Agg backend, the PlotResult each plot returns,
saving a figure as PNG and SVG under <out>/plots, colours per line and per method, and the count units.

The plots themselves: nr_study.analysis.plots (figures and trajectories, and the command) and
nr_study.analysis.tradeoff_plots (trade-offs, Pareto fronts, sweep importances).
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from nr_study.analysis.runs import NR_METHODS, RunRecord  # noqa: E402
from nr_study.methods import METHODS  # noqa: E402

plt.rcParams.update({"font.size": 10, "axes.titlesize": 11, "legend.fontsize": 8, "figure.dpi": 100})
METHOD_ORDER = [*(m for m in METHODS if m not in NR_METHODS), *NR_METHODS]  # every registered method, baselines first
UNITS = (("G", 1e9), ("M", 1e6), ("K", 1e3), ("", 1.0))


@dataclass
class PlotResult:
    name: str
    title: str
    data: dict[str, Any]
    files: list[Path] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def count_unit(values: list[float]) -> tuple[str, float]:
    """(unit, scale) to print counts in: G, M, K or none, by the largest value."""
    top = max((abs(v) for v in values), default=0.0)
    for u, s in UNITS:
        if top >= s:
            return u, s
    return "", 1.0


def save_figure(fig, out_dir: str | Path, name: str) -> list[Path]:
    """Write <out>/plots/<name>.png and .svg and close the figure."""
    out = Path(out_dir) / "plots"
    out.mkdir(parents=True, exist_ok=True)
    files = [out / f"{name}.png", out / f"{name}.svg"]
    fig.tight_layout()
    fig.savefig(files[0], dpi=120)
    fig.savefig(files[1])
    plt.close(fig)
    return files


def line_color(i: int):
    """The i-th line's colour (tab10, cycling)."""
    return plt.get_cmap("tab10")(i % 10)


def integer_epochs(*axes) -> None:
    """Whole epochs on the x axis."""
    for ax in axes:
        ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))


def method_color(method: str):
    """A method's colour, the same in every plot ('NR-CR (params)' is NR-CR's)."""
    m = method.split(" ")[0].upper()
    return line_color(METHOD_ORDER.index(m) if m in METHOD_ORDER else len(METHOD_ORDER))


def is_nr(run: RunRecord) -> bool:
    return (run.get("method") or "").upper() in NR_METHODS


def file_name(name: str) -> str:
    """A sweep's name as a file name: anything but letters, digits, '_', '.', '-' becomes '_'."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)
