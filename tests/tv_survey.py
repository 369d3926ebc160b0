"""Every torchvision classification model through the NR core: exact or refused, and is Tr = 0.5 reachable.

Used by tests/test_torchvision_models.py and, as a script, to write the table in docs/architecture.md:
    .venv/bin/python -m tests.tv_survey [NAME ...]   (all models by default; about 15 minutes on 2 cores)
"""
from __future__ import annotations

import sys
import time

import torch
import torch.nn as nn
import torchvision.models as tvm

from nr_study.errors import UnsupportedGraphError
from nr_study.nr import build_graph, rejuvenate, utilization
from nr_study.nr.cost import graph_utilization, min_reachable_ratio
from tests.nets import kill_channels, randomize_bn

SIZES = (64, 224, 299)  # the first input size the model takes (Inception's aux head needs 299)
SCHEMES = (("nr", "two"), ("cr", "two"), ("ca", "two"))


def names() -> list[str]:
    return sorted(tvm.list_models(module=tvm))


def build(name: str, device="cpu") -> nn.Module:
    kw = {"num_classes": 10}
    if name in ("googlenet", "inception_v3"):
        kw.update(aux_logits=True, init_weights=False)
    with torch.device(device):
        return tvm.get_model(name, weights=None, **kw)


def build_light(name: str) -> nn.Module:
    """On the meta device (no memory, no arithmetic) where the builder allows it."""
    try:
        return build(name, "meta")
    except (NotImplementedError, RuntimeError):  # a builder that computes widths from tensor data (RegNet)
        return build(name)


def analyse(name: str) -> dict:
    """The graph verdict on a light model: refused and why, or free groups / r_min."""
    model = build_light(name)
    last = None
    for size in SIZES:
        shape = (2, 3, size, size)
        try:
            graph = build_graph(model, shape)
        except UnsupportedGraphError as exc:
            last = exc
            if "cannot take an input" in str(exc):
                continue
            return {"model": name, "outcome": "refused", "reason": str(exc), "size": size}
        free = graph.free_groups()
        params = graph_utilization(model, graph, masks={}).total  # meta tensors: no γ to judge
        out = {"model": name, "outcome": "supported", "size": size, "params": params, "free_groups": len(free),
               "groups": sum(g.producer is not None for g in graph.groups.values())}
        out["r_min"] = min_reachable_ratio(model, graph) if free else 1.0
        if not free:
            out.update(outcome="refused", reason="no free channel group (nothing for NR to rejuvenate)")
        return out
    return {"model": name, "outcome": "refused", "reason": str(last), "size": SIZES[-1]}


def exercise(name: str, size: int) -> dict:
    """Real weights: cost = weights, then one rejuvenation per scheme preserving the function, and a step."""
    torch.manual_seed(0)
    shape = (2, 3, size, size)
    model = build(name)
    randomize_bn(model)
    model.eval()
    weights = sum(m.weight.numel() for m in model.modules() if type(m) in (nn.Conv2d, nn.Linear))
    assert utilization(model, shape).total == weights, f"{name}: cost != weights"
    kill_channels(model, build_graph(model, shape), 0.3, seed=1)
    x = torch.randn(shape)
    with torch.no_grad():
        before = model(x)
    changes = {}
    for scheme, impl in SCHEMES:
        new, rep = rejuvenate(model, shape, 1.0, scheme=scheme, impl=impl)
        new.eval()
        with torch.no_grad():
            after = new(x)
        changes[scheme] = float((after - before).norm() / before.norm())
        assert changes[scheme] < 1e-4, f"{name}/{scheme}: function changed by {changes[scheme]:.2e}"
        assert utilization(new, shape).total == rep.cost_after
        new.train()
        out = new(x)
        loss = sum(o.square().mean() for o in (out if isinstance(out, tuple) else (out,)))
        loss.backward()
        assert torch.isfinite(loss)
        del new
    return {"max_rel_change": max(changes.values())}


def main(argv: list[str]) -> int:
    rows = []
    for name in argv or names():
        t0 = time.perf_counter()
        row = analyse(name)
        if row["outcome"] == "supported":
            row.update(exercise(name, row["size"]))
        row["seconds"] = round(time.perf_counter() - t0, 1)
        rows.append(row)
        print(row, file=sys.stderr, flush=True)
    print("| model | outcome | input | params | free / all groups | min reachable r (params) | Tr = 0.5 |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        if r["outcome"] == "supported":
            ok = "reachable" if r["r_min"] < 0.5 else "**not reachable**"
            print(f"| {r['model']} | exact (NR, NR-CR, NR-CA) | {r['size']} | {r['params']:,} | "
                  f"{r['free_groups']} / {r['groups']} | {r['r_min']:.3f} | {ok} |")
        else:
            reason = r["reason"].replace("|", "\\|")
            print(f"| {r['model']} | refused: {reason[:160]} | {r['size']} | | | | |")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
