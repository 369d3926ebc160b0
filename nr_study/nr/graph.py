"""The channel graph: which channels of a CNN can be judged, removed and regrown, and who reads them.

We trace the model with torch.fx and follow one thing through it: the *layout* of each tensor's channel
dimension, a tuple of segments ``(group, factor)``. A *group* is a channel space created by one producer
(conv or linear); ``factor`` is how many features each channel occupies (1, or H*W after a flatten).
Concatenation joins layouts; elementwise ops pass them through; an add or a multiply between two tensors
couples their groups, which makes them *fixed* (never penalised, removed or expanded: paper §4.3).
A group is *free* when its producer feeds exactly one BatchNorm (the *unit BN*, whose γ judges liveness)
and nothing made it fixed. Anything the walk does not understand is refused, naming the node.

A model may branch on ``self.training`` (auxiliary heads): we trace it in both modes, build the graph from
the training trace (it runs every weight) and require the eval trace to be a part of it, read the same way.
Every weight layer and BN is called once: a module applied twice (weight sharing) is refused.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass, field

import torch
import torch.fx
import torch.nn as nn
import torch.nn.functional as F
from torch.fx.passes.shape_prop import ShapeProp, TensorMetadata

from nr_study.errors import UnsupportedGraphError, one_line
from nr_study.nr.schemes import SPLIT_CONVS, CAConv

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
    # per free group: the channel index sets of the split convs' S/R sides over it; each keeps a channel
    sides: dict[int, list[torch.Tensor]] = field(default_factory=dict)

    def width(self, layout: Layout) -> int:
        return sum(self.groups[g].width * f for g, f in layout)

    def free_groups(self) -> list[Group]:
        return [g for g in self.groups.values() if g.free]

    def head_layers(self) -> list[Layer]:
        """The layers whose output no layer or BN reads: the model's outputs (a classifier, an auxiliary head)."""
        read = {g for layer in self.layers for g, _ in layer.in_layout} | {g for bn in self.bns for g, _ in bn.layout}
        return [layer for layer in self.layers if layer.out_group is not None and layer.out_group not in read]


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
    """Trace ``model`` in train and eval mode on a zero batch of ``input_shape`` and derive its channel graph."""
    was_training = model.training
    try:
        model.train(True)
        train_gm = trace(model)
        model.train(False)
        eval_gm = trace(model)
        graph = _walk(model, train_gm, input_shape, "train")
        if eval_gm.code != train_gm.code:  # forward branches on self.training
            graph = _merge_modes(graph, _walk(model, eval_gm, input_shape, "eval"))
    finally:
        model.train(was_training)
    _check_every_weight_is_traced(model, graph)
    graph.sides = split_sides(model, graph)
    return graph


def _walk(model: nn.Module, gm: torch.fx.GraphModule, input_shape, mode: str) -> ChannelGraph:
    """Shape-propagate ``gm`` (traced in ``mode``) on zeros and walk it; the model's buffers and RNG stay as they
    were."""
    param = next(model.parameters(), None)
    if param is None:
        raise UnsupportedGraphError(f"model {type(model).__name__} has no parameters")
    # a batch of two: train-mode BN needs more than one value per channel, and sizes coincide less often
    shape = (max(2, int(input_shape[0])),) + tuple(input_shape[1:])
    saved = {k: b.clone() for k, b in model.named_buffers()}
    devices = [param.device] if param.device.type == "cuda" else []
    gm.train(mode == "train")
    try:
        with torch.no_grad(), torch.random.fork_rng(devices=devices):
            ShapeProp(gm).propagate(torch.zeros(*shape, device=param.device, dtype=param.dtype))
    except Exception as exc:
        raise UnsupportedGraphError(f"model {type(model).__name__} cannot take an input of shape "
                                    f"{tuple(input_shape)} in {mode} mode: {one_line(exc)}") from exc
    finally:
        with torch.no_grad():
            for k, b in model.named_buffers():
                if k in saved:
                    b.copy_(saved[k])
    return _Walker(gm, tuple(input_shape)).run()


def _group_key(graph: ChannelGraph, gid: int) -> str:
    g = graph.groups[gid]
    return g.producer if g.producer is not None else f"input#{gid}"


def _merge_modes(train: ChannelGraph, ev: ChannelGraph) -> ChannelGraph:
    """The train-mode graph, restricted by what the eval-mode trace adds (more readers fix more groups).

    The eval trace must run a subset of the train trace's layers, each reading the same channels."""
    by_key = {_group_key(train, gid): gid for gid in train.groups}

    def mapped(layout: Layout, what: str) -> Layout:
        out = []
        for g, f in layout:
            key = _group_key(ev, g)
            if key not in by_key:
                raise UnsupportedGraphError(f"{what} reads channels of '{key}' only in eval mode; "
                                            "the channel analysis needs one graph for both modes")
            out.append((by_key[key], f))
        return tuple(out)

    train_layers = {layer.name: layer for layer in train.layers}
    for layer in ev.layers:
        ref = train_layers.get(layer.name)
        if ref is None:
            raise UnsupportedGraphError(f"layer '{layer.name}' runs only in eval mode; the channel analysis "
                                        "needs every weight layer in the training graph")
        if ref.kind != layer.kind or ref.in_layout != mapped(layer.in_layout, f"layer '{layer.name}'"):
            raise UnsupportedGraphError(f"layer '{layer.name}' reads different channels in train and eval mode")
    train_bns = {bn.name: bn for bn in train.bns}
    for bn in ev.bns:
        ref = train_bns.get(bn.name)
        if ref is None or ref.layout != mapped(bn.layout, f"BatchNorm '{bn.name}'"):
            raise UnsupportedGraphError(f"BatchNorm '{bn.name}' normalises different channels in train and "
                                        "eval mode")
    for gid, g in ev.groups.items():
        mine = train.groups[by_key[_group_key(ev, gid)]]
        if g.fixed_reason is not None and mine.fixed_reason is None:
            mine.fixed_reason = f"{g.fixed_reason} (in eval mode)"
        if g.bn != mine.bn and mine.fixed_reason is None:
            mine.fixed_reason = "its BatchNorm differs between train and eval mode"
        if g.rescale_reason is not None and mine.rescale_reason is None:
            mine.rescale_reason = f"{g.rescale_reason} (in eval mode)"
    return train


def _check_every_weight_is_traced(model: nn.Module, graph: ChannelGraph) -> None:
    """cost = Σ conv/linear weights needs every weight layer in the graph; an unused one is refused."""
    traced = {layer.name for layer in graph.layers}
    for name, m in model.named_modules():
        if isinstance(m, SPLIT_CONVS):
            continue
        if type(m) in (nn.Conv2d, nn.Linear) and name not in traced and not _inside_split(model, name):
            raise UnsupportedGraphError(f"module '{name}' ({type(m).__name__}) is never called by forward "
                                        "in train or eval mode; its weights would be missing from the cost")


def _inside_split(model: nn.Module, name: str) -> bool:
    parts = name.split(".")
    for i in range(1, len(parts)):
        if isinstance(model.get_submodule(".".join(parts[:i])), SPLIT_CONVS):
            return True
    return False


def split_sides(model: nn.Module, graph: ChannelGraph) -> dict[int, list[torch.Tensor]]:
    """Per free group, the index sets of every S or R side a split conv reads or writes over it.

    Pruning keeps at least one channel of each side, so no block of a split conv ever loses all its inputs
    or outputs (a zero-width conv is not a conv), and utilization counts the same channels."""
    sides: dict[int, list[torch.Tensor]] = {}

    def add(gid: int, idx: torch.Tensor) -> None:
        if graph.groups[gid].free and len(idx):
            sides.setdefault(gid, []).append(idx)

    def walk(m: nn.Module, in_pos: torch.Tensor, out_gid: int, out_pos: torch.Tensor) -> None:
        for part in (in_pos[m.s_idx], in_pos[m.r_idx]):
            for gid, idx in _by_group(part, owner):
                add(gid, idx)
        s_out, r_out = out_pos[: m.s_out], out_pos[m.s_out:]
        add(out_gid, s_out)
        add(out_gid, r_out)
        if isinstance(m, CAConv) and isinstance(m.inner, CAConv):
            walk(m.inner, in_pos[m.s_idx], out_gid, s_out)

    modules = dict(model.named_modules())
    for layer in graph.layers:
        m = modules.get(layer.name)
        if not isinstance(m, SPLIT_CONVS):
            continue
        owner = []  # (group, channel) of each position of the layer's input
        for g, f in layer.in_layout:
            owner.extend((g, c) for c in range(graph.groups[g].width) for _ in range(f))
        walk(m, torch.arange(len(owner)), layer.out_group, torch.arange(graph.groups[layer.out_group].width))
    return sides


def _by_group(positions: torch.Tensor, owner: list[tuple[int, int]]):
    out: dict[int, list[int]] = {}
    for p in positions.tolist():
        g, c = owner[p]
        out.setdefault(g, []).append(c)
    return [(g, torch.tensor(cs, dtype=torch.long)) for g, cs in out.items()]


def _is_stochastic_depth(fn) -> bool:
    """torchvision.ops.stochastic_depth: per-sample 0 or 1/(1-p) in training, identity in eval (homogeneous)."""
    return getattr(fn, "__name__", "") == "stochastic_depth" and \
        getattr(fn, "__module__", "").startswith("torchvision.ops")


def _arg(node, pos: int, name: str, default):
    return node.args[pos] if len(node.args) > pos else node.kwargs.get(name, default)


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
        self.called: set[str] = set()

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
        target = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", node.target)
        raise UnsupportedGraphError(f"node '{node.name}' ({node.op} {target}): {reason}")

    def tensor_inputs(self, node) -> list[torch.fx.Node]:
        return [a for a in node.all_input_nodes if a in self.layout]

    def first_layout(self, node) -> Layout:
        ins = self.tensor_inputs(node)
        if not ins:
            self.refuse(node, "no tensor input with a known channel layout")
        return self.layout[ins[0]]

    def passthrough(self, node, shape, rescale_reason: str | None = None) -> None:
        """An op that keeps the batch and channel dims in place: its output has its input's layout."""
        src = _shape(self.tensor_inputs(node)[0]) if self.tensor_inputs(node) else None
        lay = self.first_layout(node)
        if src is None or len(src) < 2 or len(shape) < 2 or tuple(shape[:2]) != tuple(src[:2]):
            self.refuse(node, f"expected an op keeping the (batch, channel) dims, got {src} -> {tuple(shape)}")
        if rescale_reason is not None:
            self.no_rescale(lay, rescale_reason)
        self.layout[node] = lay

    def called_once(self, node) -> None:
        if node.target in self.called:
            self.refuse(node, f"module '{node.target}' is called more than once (weight sharing / a reused "
                              "BatchNorm): its channels cannot be judged or resized per call")
        self.called.add(node.target)

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
                if node.op == "call_module":
                    self.refuse(node, "a module that does not return one tensor is not understood")
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
        if isinstance(m, (nn.Conv2d, *SPLIT_CONVS, nn.Linear, *_BN)):
            self.called_once(node)
        if isinstance(m, (nn.Conv2d, *SPLIT_CONVS)):
            lay = self.first_layout(node)
            if len(shape) != 4:
                self.refuse(node, f"a conv on an unbatched or non-2d input (output shape {shape})")
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
            self.passthrough(node, shape)
            self.bns.append(BNRef(name, self.layout[node]))
        elif isinstance(m, _HOMOGENEOUS_MODULES):
            self.passthrough(node, shape)
        elif isinstance(m, _OTHER_ELEMENTWISE_MODULES):
            self.passthrough(node, shape, f"passes through {type(m).__name__} '{name}', which is not "
                                          "positively homogeneous")
            if isinstance(m, nn.PReLU) and m.num_parameters > 1:
                self.fix(self.layout[node], f"read by PReLU '{name}' with one weight per channel")
        elif isinstance(m, nn.Flatten):
            self.flatten(node, m.start_dim, m.end_dim)
        else:
            self.refuse(node, f"module type {type(m).__name__} is not understood by the channel analysis")

    def visit_function(self, node, fn, shape) -> None:
        if fn in _HOMOGENEOUS_FUNCS or _is_stochastic_depth(fn):
            self.passthrough(node, shape)
        elif fn in _OTHER_ELEMENTWISE_FUNCS:
            self.passthrough(node, shape, f"passes through {getattr(fn, '__name__', fn)}, not positively "
                                          "homogeneous")
        elif fn in _ADD or fn in _MUL:
            self.binary(node, fn, shape)
        elif fn in _CAT:
            self.concat(node, shape)
        elif fn is torch.flatten:
            self.flatten(node, _arg(node, 1, "start_dim", 0), _arg(node, 2, "end_dim", -1))
        elif fn is torch.mean:
            self.reduce(node, shape)
        else:
            self.refuse(node, f"function {getattr(fn, '__name__', fn)} is not understood by the channel analysis")

    def visit_method(self, node, method: str, shape) -> None:
        if method in _HOMOGENEOUS_METHODS:
            self.passthrough(node, shape)
        elif method in _OTHER_ELEMENTWISE_METHODS:
            self.passthrough(node, shape, f"passes through .{method}(), not positively homogeneous")
        elif method in ("add", "add_", "sub", "mul", "mul_", "div"):
            self.binary(node, method, shape)
        elif method == "flatten":
            self.flatten(node, _arg(node, 1, "start_dim", 0), _arg(node, 2, "end_dim", -1))
        elif method in ("view", "reshape"):
            # a view keeps the memory order: to the same shape it is the identity, to (N, C·rest) a flatten
            src = _shape(node.args[0])
            if src is not None and len(src) >= 2 and len(shape) == 2 and src[0] == shape[0]:
                self.flatten(node, 1, -1)
            elif src == shape:
                self.passthrough(node, shape)
            else:
                self.refuse(node, f".{method}() from {src} to {shape}: only an identity or a flatten of every dim "
                                  "after the batch keeps the channels readable")
        elif method == "mean":
            self.reduce(node, shape)
        else:
            self.refuse(node, f"method .{method}() is not understood by the channel analysis")

    # -- structural ops --------------------------------------------------------------------------------
    def flatten(self, node, start, end) -> None:
        """Only a flatten of every dim after the batch is understood: channel c becomes a block of features."""
        src = _shape(node.args[0])
        lay = self.first_layout(node)
        if src is None or not isinstance(start, int) or not isinstance(end, int):
            self.refuse(node, "flatten with non-constant dims")
        start, end = start % len(src), end % len(src)
        if len(src) == 2 and start == 1:
            self.layout[node] = lay  # flattening (N, C) is the identity
            return
        if start != 1 or end != len(src) - 1:
            self.refuse(node, f"flatten of dims {start}..{end} of a {len(src)}-d tensor (only from dim 1 to the "
                              "last is supported)")
        per_channel = 1
        for d in src[2:]:
            per_channel *= d
        self.layout[node] = tuple((g, f * per_channel) for g, f in lay)

    def reduce(self, node, shape) -> None:
        """A mean over spatial dims keeps the channels; one over the batch or channel dim is refused."""
        src = _shape(node.args[0])
        dims = _arg(node, 1, "dim", None)
        if src is None or dims is None:
            self.refuse(node, "a mean over every dim reduces over channels")
        dims = [dims] if isinstance(dims, int) else list(dims)
        if not all(isinstance(d, int) for d in dims):
            self.refuse(node, f"mean over non-constant dims {dims}")
        dims = {d % len(src) for d in dims}
        if dims & {0, 1}:
            self.refuse(node, f"mean over dims {sorted(dims)} of {src} reduces over the batch or channel dim")
        self.passthrough(node, shape)

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
        if len({len(sh) for sh in shapes}) != 1 or len(shapes[0]) < 2 or any(
                sh[1] not in (1, shape[1]) or sh[0] not in (1, shape[0]) for sh in shapes):
            self.refuse(node, f"elementwise {name} of shapes {shapes}: operands must share the (batch, channel) "
                              "dims (or broadcast a size-1 dim)")
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
            if p not in self.layout or len(_shape(p) or ()) != len(shape):
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
                if getattr(self.modules[users[0].target], "weight", None) is None:
                    group.fixed_reason = group.fixed_reason or \
                        f"BatchNorm '{users[0].target}' has no learnable scale γ (affine=False)"
                    continue
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
