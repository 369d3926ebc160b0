"""Surgery row: how long rejuvenate() takes on a network with ~30% dead channels (goal ≤ 0.5 s), and the helper
that kills those channels (also used by the nesting row)."""
from __future__ import annotations

import copy

import torch
import torch.nn as nn

from nr_study.bench.settings import GOALS, Sizes
from nr_study.bench.timing import error_row, row, spread, time_call


def kill_channels(model: nn.Module, graph, fraction: float = 0.3, seed: int = 0) -> int:
    """Zero γ of a random `fraction` of each free group's channels (dead by the 1% rule); returns how many."""
    g = torch.Generator().manual_seed(seed)
    modules = dict(model.named_modules())
    n = 0
    with torch.no_grad():
        for grp in graph.free_groups():
            bn = modules[grp.bn]
            k = int(round(fraction * grp.width))
            if k == 0 or k >= grp.width:
                continue
            idx = torch.randperm(grp.width, generator=g)[:k].to(bn.weight.device)
            bn.weight[idx] = 0.0
            n += k
    return n


def bench_surgery(sz: Sizes, device: torch.device) -> list[dict]:
    """rejuvenate() as the hook calls it (in place, on the cached graph), on fresh copies, after one warm-up:
    the seconds a run pauses at each rejuvenation."""
    from nr_study.models import create_model
    from nr_study.nr import build_graph, rejuvenate
    from nr_study.nr.surgery import base_cost

    rows = []
    for name, shape, ncls, scheme, rescale in sz.surgery_models:
        try:
            torch.manual_seed(0)
            model = create_model(name, num_classes=ncls, in_channels=3).to(device)
            graph = build_graph(model, shape)  # the hook's cached graph: traced once, not timed
            base_cost(model, graph)
            dead = kill_channels(model, graph, 0.3)
            total = sum(g.width for g in graph.free_groups())
            times, report = [], None
            for i in range(sz.surgery_reps + 1):  # the first one is a warm-up
                m, gr = copy.deepcopy(model), copy.deepcopy(graph)  # surgery edits both in place
                out = {}

                def run(m=m, gr=gr, out=out):
                    out["r"] = rejuvenate(m, shape, 1.0, "params", scheme, rescale, True, inplace=True, graph=gr)[1]

                t = time_call(run, device)
                report = out["r"]
                if i:
                    times.append(t)
                del m, gr
            med, lo, hi, kind = spread(times)
            rows.append(row(f"surgery_s[{name}]", med, GOALS["surgery"], "s",
                            f"{kind} {lo:.3f}–{hi:.3f}s, n={len(times)}; scheme {scheme}, rescale {rescale}, "
                            f"{dead}/{total} free channels dead, α={report.alpha:.3f}, input {list(shape)}, "
                            f"{device.type}"))
        except Exception as exc:
            rows.append(error_row(f"surgery_s[{name}]", GOALS["surgery"], "s", exc))
    return rows

