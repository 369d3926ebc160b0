"""The Neural Rejuvenation method as pure functions over an nn.Module (imports torch only)."""
from nr_study.nr.arch import apply_architecture, architecture_spec
from nr_study.nr.cost import CONSTRAINTS, LayerUtil, Utilization, graph_utilization, live_masks
from nr_study.nr.graph import ChannelGraph, build_graph
from nr_study.nr.hook import NeuralRejuvenation, NRConfig
from nr_study.nr.schemes import CAConv, CRConv
from nr_study.nr.sparsity import LambdaController, l1_subgradient_
from nr_study.nr.surgery import SCHEMES, RejuvenationReport, prune, rejuvenate, split_to_ca


def utilization(model, input_shape, constraint: str = "params", threshold: float = 0.01) -> Utilization:
    """c(A), U(θ) and r for ``model`` (traces it; the hook keeps its graph and skips this)."""
    return graph_utilization(model, build_graph(model, input_shape), constraint, threshold)


__all__ = ["CONSTRAINTS", "SCHEMES", "CAConv", "CRConv", "ChannelGraph", "LambdaController", "LayerUtil",
           "NRConfig", "NeuralRejuvenation", "RejuvenationReport", "Utilization", "apply_architecture",
           "architecture_spec", "build_graph", "graph_utilization", "l1_subgradient_", "live_masks", "prune",
           "rejuvenate", "split_to_ca", "utilization"]
