"""The channel graph: which channels of a CNN can be judged, removed and regrown, and who reads them.

We trace the model with torch.fx and follow one thing through it: the *layout* of each tensor's channel
dimension, a tuple of segments ``(group, factor)``. A *group* is a channel space created by one producer
(conv or linear); ``factor`` is how many features each channel occupies (1, or H*W after a flatten).
Concatenation joins layouts; elementwise ops pass them through; an add or a multiply between two tensors
couples their groups, which makes them *fixed* (never penalised, removed or expanded: paper §4.3).
A group is *free* when its producer feeds exactly one BatchNorm (the *unit BN*, whose γ judges liveness)
and nothing made it fixed. Anything the walk does not understand is refused, naming the node.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
import torch.fx
import torch.nn as nn
import torch.nn.functional as F
from torch.fx.passes.shape_prop import ShapeProp, TensorMetadata

from nr_study.errors import UnsupportedGraphError
from nr_study.nr.schemes import SPLIT_CONVS

Segment = tuple[int, int]  # (group id, features per channel)
Layout = tuple[Segment, ...]

# Elementwise / per-channel ops. "Homogeneous" ones commute with a positive per-channel scale, which is what
# makes neural rescaling exact (paper §3.2); the others pass layouts through but forbid rescaling.
_HOMOGENEOUS_MODULES = (nn.ReLU, nn.LeakyReLU, nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d,
                        nn.AdaptiveMaxPool2d, nn.Dropout, nn.Dropout2d, nn.Identity, nn.MaxPool1d,
                        nn.AvgPool1d, nn.AdaptiveAvgPool1d)
_OTHER_ELEMENTWISE_MODULES = (nn.ReLU6, nn.Hardtanh, nn.Sigmoid, nn.Tanh, nn.SiLU, nn.GELU, nn.Hardswish,
                              nn.Hardsigmoid, nn.ELU, nn.Mish, nn.Softplus, nn.PReLU)
_HOMOGENEOUS_FUNCS = {F.relu, torch.relu, F.leaky_relu, F.max_pool2d, F.avg_pool2d, F.adaptive_avg_pool2d,
                      F.adaptive_max_pool2d, F.dropout, torch.nn.functional.dropout2d}
_OTHER_ELEMENTWISE_FUNCS = {F.relu6, torch.sigmoid, F.sigmoid, F.hardswish, F.silu, F.gelu, torch.tanh,
                            F.hardsigmoid, F.hardtanh, F.elu}
_HOMOGENEOUS_METHODS = {"relu", "relu_", "contiguous", "clone", "detach", "float", "to"}
_OTHER_ELEMENTWISE_METHODS = {"sigmoid", "sigmoid_", "tanh", "clamp", "clamp_"}
_ADD = {operator.add, operator.iadd, torch.add, operator.sub, torch.sub}
_MUL = {operator.mul, operator.imul, torch.mul, operator.truediv, torch.div}
_CAT = {torch.cat, torch.concat}
_BN = (nn.BatchNorm1d, nn.BatchNorm2d)


@dataclass
class Group:
    """A channel space produced by one conv/linear."""

    id: int
    width: int
    producer: str | None  # module name, None for the network input
    bn: str | None = None  # the unit BN right after the producer
    fixed_reason: str | None = None
    rescale_reason: str | None = None  # why neural rescaling is not exact here (None: it is)

    @property
    def fixed(self) -> bool:
        return self.fixed_reason is not None

    @property
    def free(self) -> bool:
        return not self.fixed and self.bn is not None


@dataclass
class Layer:
    """A weight layer (conv, linear or a split conv) and the channel layouts it reads and writes."""

    name: str
    kind: str  # "conv" | "linear" | "depthwise" | "grouped"
    in_layout: Layout
    out_group: int | None  # None for depthwise: its output channels are its input channels
    kernel: int  # kh * kw
    groups: int
    out_hw: int  # spatial positions of the output (FLOPs = params * out_hw)


@dataclass
class BNRef:
    name: str
    layout: Layout


@dataclass
class ChannelGraph:
    groups: dict[int, Group]
    layers: list[Layer]
    bns: list[BNRef]
    input_shape: tuple[int, ...]

    def width(self, layout: Layout) -> int:
        return sum(self.groups[g].width * f for g, f in layout)

    def free_groups(self) -> list[Group]:
        return [g for g in self.groups.values() if g.free]


class _Tracer(torch.fx.Tracer):
    """Keeps our split convolutions opaque: the graph treats them as one conv."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, SPLIT_CONVS) or super().is_leaf_module(m, qualname)


def trace(model: nn.Module) -> torch.fx.GraphModule:
    try:
        graph = _Tracer().trace(model)
    except Exception as exc:  # fx raises many kinds; all mean the same to a user
        raise UnsupportedGraphError(
            f"model {type(model).__name__}: torch.fx cannot trace it ({type(exc).__name__}: {exc})") from exc
    return torch.fx.GraphModule(model, graph)


def build_graph(model: nn.Module, input_shape: tuple[int, ...]) -> ChannelGraph:
    """Trace ``model`` once on a zero batch of ``input_shape`` and derive its channel graph."""
    gm = trace(model)
    was_training = model.training
    param = next(model.parameters())
    model.eval()
    try:
        with torch.no_grad():
            ShapeProp(gm).propagate(torch.zeros(*input_shape, device=param.device, dtype=param.dtype))
    except Exception as exc:
        raise UnsupportedGraphError(
            f"model {type(model).__name__} cannot take an input of shape {tuple(input_shape)}: {exc}") from exc
    finally:
        model.train(was_training)
    return _Walker(gm, tuple(input_shape)).run()


def _shape(node) -> tuple[int, ...] | None:
    meta = node.meta.get("tensor_meta") if isinstance(node, torch.fx.Node) else None
    return tuple(meta.shape) if isinstance(meta, TensorMetadata) else None


class _Walker:
    def __init__(self, gm: torch.fx.GraphModule, input_shape):
        self.gm = gm
        self.modules = dict(gm.named_modules())
        self.input_shape = input_shape
        self.groups: dict[int, Group] = {}
        self.layers: list[Layer] = []
        self.bns: list[BNRef] = []
        self.layout: dict[torch.fx.Node, Layout] = {}
        self.producer_node: dict[int, torch.fx.Node] = {}

    # -- helpers ---------------------------------------------------------------------------------
    def new_group(self, width: int, producer: str | None) -> int:
        gid = len(self.groups)
        self.groups[gid] = Group(gid, width, producer)
        return gid

    def fix(self, layout: Layout, reason: str) -> None:
        for g, _ in layout:
            if self.groups[g].fixed_reason is None:
                self.groups[g].fixed_reason = reason

    def no_rescale(self, layout: Layout, reason: str) -> None:
        for g, _ in layout:
            if self.groups[g].rescale_reason is None:
                self.groups[g].rescale_reason = reason

    def refuse(self, node, reason: str):
        raise UnsupportedGraphError(f"node '{node.name}' ({node.op} {node.target}): {reason}")

    def tensor_inputs(self, node) -> list[torch.fx.Node]:
        return [a for a in node.all_input_nodes if a in self.layout]

    def first_layout(self, node) -> Layout:
        ins = self.tensor_inputs(node)
        if not ins:
            self.refuse(node, "no tensor input with a known channel layout")
        return self.layout[ins[0]]

    # -- walk --------------------------------------------------------------------------------------
    def run(self) -> ChannelGraph:
        for node in self.gm.graph.nodes:
            shape = _shape(node)
            if node.op == "placeholder":
                if shape is None or len(shape) < 2:
                    self.refuse(node, "the input must be a batch tensor (N, C, ...)")
                gid = self.new_group(shape[1], None)
                self.groups[gid].fixed_reason = "network input"
                self.layout[node] = ((gid, 1),)
            elif node.op == "output":
                for a in node.all_input_nodes:
                    if a in self.layout:
                        self.fix(self.layout[a], "network output")
            elif shape is None:
                continue  # sizes, shapes, python values: they carry no channels
            elif node.op == "get_attr":
                self.refuse(node, "a parameter/buffer used directly in forward is not supported")
            elif node.op == "call_module":
                self.visit_module(node, self.modules[node.target], shape)
            elif node.op == "call_function":
                self.visit_function(node, node.target, shape)
            elif node.op == "call_method":
                self.visit_method(node, node.target, shape)
        self.mark_units()
        return ChannelGraph(self.groups, self.layers, self.bns, self.input_shape)

    def visit_module(self, node, m: nn.Module, shape) -> None:
        name = node.target
        if isinstance(m, (nn.Conv2d, *SPLIT_CONVS)):
            lay = self.first_layout(node)
            hw = shape[2] * shape[3]
            k = m.kernel_size[0] * m.kernel_size[1]
            if m.groups == 1:
                gid = self.new_group(m.out_channels, name)
                self.producer_node[gid] = node
                self.layers.append(Layer(name, "conv", lay, gid, k, 1, hw))
                self.layout[node] = ((gid, 1),)
            elif m.groups == m.in_channels == m.out_channels:
                # depthwise: channel c reads channel c only, so output channels are the input channels
                self.layers.append(Layer(name, "depthwise", lay, None, k, m.groups, hw))
                self.layout[node] = lay
            else:
                self.fix(lay, f"read by grouped conv '{name}' (groups={m.groups})")
                gid = self.new_group(m.out_channels, name)
                self.groups[gid].fixed_reason = f"output of grouped conv '{name}' (groups={m.groups})"
                self.layers.append(Layer(name, "grouped", lay, gid, k, m.groups, hw))
                self.layout[node] = ((gid, 1),)
        elif isinstance(m, nn.Linear):
            lay = self.first_layout(node)
            if len(shape) != 2:
                self.refuse(node, f"linear layers are supported on (N, features) inputs only, got {shape}")
            gid = self.new_group(m.out_features, name)
            self.producer_node[gid] = node
            self.layers.append(Layer(name, "linear", lay, gid, 1, 1, 1))
            self.layout[node] = ((gid, 1),)
        elif isinstance(m, _BN):
            lay = self.first_layout(node)
            self.bns.append(BNRef(name, lay))
            self.layout[node] = lay
        elif isinstance(m, _HOMOGENEOUS_MODULES):
            self.layout[node] = self.first_layout(node)
        elif isinstance(m, _OTHER_ELEMENTWISE_MODULES):
            lay = self.first_layout(node)
            self.no_rescale(lay, f"passes through {type(m).__name__} '{name}', which is not positively homogeneous")
            self.layout[node] = lay
        elif isinstance(m, nn.Flatten):
            if m.start_dim != 1:
                self.refuse(node, f"Flatten(start_dim={m.start_dim}) is not supported (only start_dim=1)")
            self.flatten(node)
        else:
            self.refuse(node, f"module type {type(m).__name__} is not understood by the channel analysis")

    def visit_function(self, node, fn, shape) -> None:
        if fn in _HOMOGENEOUS_FUNCS:
            self.layout[node] = self.first_layout(node)
        elif fn in _OTHER_ELEMENTWISE_FUNCS:
            lay = self.first_layout(node)
            self.no_rescale(lay, f"passes through {getattr(fn, '__name__', fn)}, not positively homogeneous")
            self.layout[node] = lay
        elif fn in _ADD or fn in _MUL:
            self.binary(node, fn, shape)
        elif fn in _CAT:
            self.concat(node, shape)
        elif fn is torch.flatten:
            start = node.args[1] if len(node.args) > 1 else node.kwargs.get("start_dim", 0)
            if start != 1:
                self.refuse(node, f"torch.flatten with start_dim={start} (only 1 is supported)")
            self.flatten(node)
        elif fn is torch.mean:
            self.reduce(node, shape)
        else:
            self.refuse(node, f"function {getattr(fn, '__name__', fn)} is not understood by the channel analysis")

    def visit_method(self, node, method: str, shape) -> None:
        if method in _HOMOGENEOUS_METHODS:
            self.layout[node] = self.first_layout(node)
        elif method in _OTHER_ELEMENTWISE_METHODS:
            lay = self.first_layout(node)
            self.no_rescale(lay, f"passes through .{method}(), not positively homogeneous")
            self.layout[node] = lay
        elif method in ("add", "add_", "sub", "mul", "mul_", "div"):
            self.binary(node, method, shape)
        elif method in ("flatten", "view", "reshape"):
            src = _shape(node.args[0])
            if len(shape) == 2 and src is not None and src[0] == shape[0]:
                self.flatten(node)
            elif src == shape:
                self.layout[node] = self.first_layout(node)
            else:
                self.refuse(node, f".{method}() from {src} to {shape} mixes channels")
        elif method == "mean":
            self.reduce(node, shape)
        else:
            self.refuse(node, f"method .{method}() is not understood by the channel analysis")

    # -- structural ops --------------------------------------------------------------------------------
    def flatten(self, node) -> None:
        src = _shape(node.args[0])
        lay = self.first_layout(node)
        per_channel = 1
        for d in src[2:]:
            per_channel *= d
        self.layout[node] = tuple((g, f * per_channel) for g, f in lay)

    def reduce(self, node, shape) -> None:
        src = _shape(node.args[0])
        if len(shape) >= 2 and src is not None and shape[1] == src[1] and shape[0] == src[0]:
            self.layout[node] = self.first_layout(node)  # a spatial mean keeps channels
        else:
            self.refuse(node, f"mean from {src} to {shape} reduces over channels")

    def binary(self, node, op, shape) -> None:
        ins = self.tensor_inputs(node)
        name = getattr(op, "__name__", op)
        if len(ins) == 1:
            lay = self.layout[ins[0]]
            if op in _ADD or op in ("add", "add_", "sub"):
                self.no_rescale(lay, f"a constant is added at '{node.name}'")
            self.layout[node] = lay
            return
        lays = [self.layout[a] for a in ins]
        shapes = [_shape(a) for a in ins]
        for lay in lays:
            self.fix(lay, f"coupled by elementwise {name} at '{node.name}' (residual/gating)")
        big = max(range(len(ins)), key=lambda i: shapes[i][1] if len(shapes[i]) > 1 else 0)
        self.layout[node] = lays[big]

    def concat(self, node, shape) -> None:
        dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
        parts = node.args[0]
        if dim < 0:
            dim += len(shape)
        if dim != 1:
            self.refuse(node, f"concatenation along dim {dim} (only the channel dim 1 is supported)")
        lay: list[Segment] = []
        for p in parts:
            if p not in self.layout:
                self.refuse(node, "concatenates a tensor with unknown channel layout")
            lay.extend(self.layout[p])
        self.layout[node] = tuple(lay)

    def mark_units(self) -> None:
        """A producer whose only reader is a BN over exactly its channels is a unit; others are fixed."""
        bn_by_input: dict[torch.fx.Node, str] = {}
        for node in self.gm.graph.nodes:
            if node.op == "call_module" and isinstance(self.modules[node.target], _BN):
                bn_by_input[node.args[0]] = node.target
        for gid, node in self.producer_node.items():
            group = self.groups[gid]
            users = list(node.users)
            if len(users) == 1 and users[0].op == "call_module" and users[0].target == bn_by_input.get(node):
                group.bn = users[0].target
            elif group.fixed_reason is None:
                group.fixed_reason = "no BatchNorm directly after its producer"
        for bn in self.bns:  # a BN over channels it does not own (depthwise, pre-activation) breaks rescaling
            for g, _ in bn.layout:
                if self.groups[g].bn != bn.name:
                    self.no_rescale(((g, 1),), f"also normalised by BatchNorm '{bn.name}'")
        for layer in self.layers:
            if layer.kind == "depthwise":
                self.no_rescale(layer.in_layout, f"read by depthwise conv '{layer.name}'")
