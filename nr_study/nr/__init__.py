"""The Neural Rejuvenation method as pure functions over an nn.Module. The core imports torch and nothing of the
app (its settings, nr_study.nr.settings, are plain dataclasses the config imports). Names load on first use
(PEP 562), so importing nr_study.nr.settings, as the config does, does not import torch."""
import importlib

_EXPORTS = {
    "apply_architecture": "arch", "architecture_spec": "arch",
    "CONSTRAINTS": "settings", "SCHEMES": "settings", "NRConfig": "settings",
    "LayerUtil": "cost", "Utilization": "cost", "graph_utilization": "cost", "live_masks": "cost",
    "ChannelGraph": "graph", "build_graph": "graph",
    "NeuralRejuvenation": "hook",
    "CAConv": "schemes", "CRConv": "schemes",
    "LambdaController": "sparsity", "l1_subgradient_": "sparsity", "zero_optimizer_state": "optim_state",
    "RejuvenationReport": "surgery", "prune": "surgery", "rejuvenate": "surgery", "split_to_ca": "splits",
    "split_halves": "splits",
}


def utilization(model, input_shape, constraint: str = "params", threshold: float = 0.01):
    """c(A), U(θ) and r for ``model`` (traces it; the hook keeps its graph and skips this)."""
    from nr_study.nr.cost import graph_utilization
    from nr_study.nr.graph import build_graph

    return graph_utilization(model, build_graph(model, input_shape), constraint, threshold)


def __getattr__(name):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f"nr_study.nr.{_EXPORTS[name]}"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'nr_study.nr' has no attribute {name!r}")


def __dir__():
    return sorted([*globals(), *_EXPORTS])


__all__ = sorted([*_EXPORTS, "utilization"])
