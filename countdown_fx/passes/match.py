"""Find gated FFN sites in an FX graph by structure, never by module names.

A site is   down( act(gate(x)) * up(x) )   where gate/up/down are linear projections (two separate
linears or one fused linear split in halves), act is silu / gelu(tanh) / gelu / relu written as a
function, a method, a module or a decomposition (x * sigmoid(x)), and the product may be written in
either operand order. Works on Dynamo graphs (torch-level functions, weights as placeholders), on
symbolic_trace graphs (call_module) and on torch.export graphs (aten ops, weights as get_attr).
"""

from __future__ import annotations

import logging
import operator
import re
import warnings
from dataclasses import dataclass
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.multiprocessing.reductions import StorageWeakRef

log = logging.getLogger(__name__)
aten = torch.ops.aten

WeightRef = Any  # an fx.Node, or a str naming a parameter of the GraphModule (from a call_module linear)

_LINEAR_FNS = {F.linear, torch._C._nn.linear, aten.linear.default}
_MUL_FNS = {operator.mul, torch.mul, aten.mul.Tensor}
_SIGMOID_FNS = {torch.sigmoid, F.sigmoid, aten.sigmoid.default}
_SILU_FNS = {F.silu, aten.silu.default}
_GELU_FNS = {F.gelu, torch._C._nn.gelu, aten.gelu.default}
_RELU_FNS = {F.relu, torch.relu, torch.relu_, aten.relu.default, aten.relu_.default}
_BMM_FNS = {torch.bmm, aten.bmm.default}
_DROPOUT_FNS = {F.dropout, torch.dropout, aten.dropout.default}
_CHUNK_FNS = {torch.chunk, aten.chunk.default}
_SPLIT_FNS = {torch.split, aten.split.Tensor, aten.split_with_sizes.default}
_SLICE_FNS = {aten.slice.Tensor}


@dataclass(frozen=True)
class Site:
    """One gated FFN found in a graph, with everything the rewrite needs."""

    key: str  # module path, e.g. "model.layers.3.mlp"; keys calibration state
    x: fx.Node  # the FFN input
    gate_weight: WeightRef  # [d_inter, d_model]; the fused [2*d_inter, d_model] weight when fused
    up_weight: WeightRef
    down_weight: WeightRef  # [d_model, d_inter]
    gate_bias: WeightRef | None
    up_bias: WeightRef | None
    down_bias: WeightRef | None
    activation: str  # "silu" | "gelu_tanh" | "gelu" | "relu"
    fused: str | None  # None (separate gate/up), "gate-up" (gate = first half) or "up-gate"
    d_model: int
    d_inter: int
    dtype: torch.dtype
    output: fx.Node  # the down projection's node; the rewrite replaces it
    shard: str | None = None  # "tp<rank>of<world>" when the output is all-reduced (a tensor-parallel shard)
    dtensor_group: str | None = None  # DTensor TP: the rewrite works on local shards, then all-reduces here

    @property
    def layout(self) -> str:
        return f"fused {self.fused}" if self.fused else "separate"

    @property
    def has_bias(self) -> bool:
        return any(b is not None for b in (self.gate_bias, self.up_bias, self.down_bias))

    def describe(self) -> dict:
        """A plain-data summary (for tables, logs and calibration metadata)."""
        return {"key": self.key, "d_model": self.d_model, "d_inter": self.d_inter, "activation": self.activation,
                "layout": self.layout, "bias": self.has_bias, "dtype": str(self.dtype).replace("torch.", ""),
                "shard": self.shard or "-"}


class SiteTable(list):
    """The sites of a model: a list of Site with a readable table as its repr. left_dense: the down nodes of
    gated FFNs found but left dense (an in-place write, a dropout in training mode), each warned about."""

    def __init__(self, *args):
        super().__init__(*args)
        self.left_dense: list[str] = []

    def __repr__(self) -> str:
        if not self and self.left_dense:
            return f"SiteTable(no gated FFN rewritable: {len(self.left_dense)} left dense, see the warnings)"
        if not self:
            return "SiteTable(no gated FFN found)"
        rows = [s.describe() for s in self]
        cols = ["key", "d_model", "d_inter", "activation", "layout", "bias", "dtype"]
        if any(s.shard for s in self):
            cols.append("shard")
        widths = {c: max(len(c), *(len(str(r[c])) for r in rows)) for c in cols}
        line = lambda r: "  ".join(str(r[c]).ljust(widths[c]) for c in cols)  # noqa: E731
        header = line({c: c for c in cols})
        return "\n".join([f"{len(self)} gated FFN site(s):", header, "-" * len(header), *map(line, rows)])

    __str__ = __repr__


# --------------------------------------------------------------------------------------------------------
# Recognisers for single nodes. Each returns None when the node is not what it looks for.


def _arg(node: fx.Node, i: int, name: str, default=None):
    if len(node.args) > i:
        return node.args[i]
    return node.kwargs.get(name, default)


def call_input(node: fx.Node):
    """A call's first argument (`self` of a method), passed by position or as `input=` / `self=`."""
    return _arg(node, 0, "input", node.kwargs.get("self"))


def _module(gm: fx.GraphModule, node: fx.Node) -> nn.Module | None:
    if node.op != "call_module":
        return None
    try:
        return gm.get_submodule(node.target)
    except AttributeError:
        return None


def _as_linear(gm, node):
    """-> (input, weight, bias) for F.linear / aten.linear / a call to nn.Linear."""
    if not isinstance(node, fx.Node):
        return None
    if node.op == "call_function" and node.target in _LINEAR_FNS:
        return _arg(node, 0, "input"), _arg(node, 1, "weight"), _arg(node, 2, "bias")
    mod = _module(gm, node)
    if isinstance(mod, nn.Linear):
        return call_input(node), f"{node.target}.weight", (f"{node.target}.bias" if mod.bias is not None else None)
    return None


def _is_one(a) -> bool:
    return type(a) in (int, float) and a == 1  # not True, which equals 1 too


def _skip_identity(gm, node):
    """Look through nodes that are the identity at inference (dropout in eval or of p=0, a no-op clone, a
    multiplication by 1: Falcon-H1's default gate multiplier)."""
    while isinstance(node, fx.Node):
        mod = _module(gm, node)
        if _is_mul(node) and len(node.args) == 2 and any(map(_is_one, node.args)):
            node = next(a for a in node.args if not _is_one(a))
        elif node.op == "call_function" and node.target in _DROPOUT_FNS:
            training = _arg(node, 2, "training", _arg(node, 2, "train", True))
            if training is not False and _arg(node, 1, "p", 0.5) != 0:
                return node
            node = call_input(node)
        elif isinstance(mod, nn.Identity) or (isinstance(mod, nn.Dropout) and (not mod.training or mod.p == 0)):
            node = call_input(node)
        else:
            return node
    return node


def _is_mul(node) -> bool:
    return isinstance(node, fx.Node) and (
        (node.op == "call_function" and node.target in _MUL_FNS) or (node.op == "call_method" and node.target == "mul")
    )


def _is_sigmoid_of(node, x) -> bool:
    if not isinstance(node, fx.Node) or call_input(node) is not x:
        return False
    return (node.op == "call_function" and node.target in _SIGMOID_FNS) or (
        node.op == "call_method" and node.target == "sigmoid"
    )


def _as_activation(gm, node):
    """-> (input, name) for a recognised activation applied to `input`."""
    if not isinstance(node, fx.Node):
        return None
    name = _activation_name(gm, node)
    if name is None:
        return None
    if isinstance(name, tuple):  # x * sigmoid(x)
        return name
    return (call_input(node), name) if isinstance(call_input(node), fx.Node) else None


def _activation_name(gm, node):
    """The activation `node` applies, or (input, "silu") for x * sigmoid(x), or None."""
    if node.op == "call_function":
        if node.target in _SILU_FNS:
            return "silu"
        if node.target in _RELU_FNS:
            return "relu"
        if node.target in _GELU_FNS:
            return "gelu_tanh" if _arg(node, 1, "approximate", "none") == "tanh" else "gelu"
    if node.op == "call_method" and node.target in ("relu", "relu_"):
        return "relu"
    if _is_mul(node) and len(node.args) == 2:  # x * sigmoid(x), either order
        a, b = node.args
        if _is_sigmoid_of(b, a):
            return a, "silu"
        if _is_sigmoid_of(a, b):
            return b, "silu"
    mod = _module(gm, node)
    if isinstance(mod, nn.SiLU):
        return "silu"
    if isinstance(mod, nn.ReLU):
        return "relu"
    if isinstance(mod, nn.GELU):
        return "gelu_tanh" if mod.approximate == "tanh" else "gelu"
    return None


def node_value(node: fx.Node):
    """The (fake) tensor a traced node stands for, where the tracer recorded one (Dynamo, export; not
    fx.symbolic_trace)."""
    return node.meta.get("val", node.meta.get("example_value"))


def node_rank(node: fx.Node) -> int | None:
    val = node_value(node)
    return val.dim() if isinstance(val, torch.Tensor) else None


def _is_last_dim(dim, node) -> bool:
    rank = node_rank(node)
    return dim == -1 or (rank is not None and dim == rank - 1)


def _as_half(gm, node):
    """-> (fused_linear_node, half) where node is half 0 or 1 of a linear's output split on its last dim."""
    if not isinstance(node, fx.Node) or node.op != "call_function":
        return None
    if node.target is operator.getitem:
        src, index = node.args
        # gu[..., :I] / gu[:, :, I:]
        if isinstance(index, tuple) and isinstance(src, fx.Node) and _as_linear(gm, src) and isinstance(index[-1], slice):
            if any(i not in (Ellipsis, slice(None)) for i in index[:-1]):
                return None
            if index[0] is not Ellipsis and node_rank(src) not in (None, len(index)):
                return None
            return _half_from_slice(gm, src, index[-1].start, index[-1].stop, index[-1].step)
        # chunk(2, -1)[i] / split(I, -1)[i]
        if isinstance(src, fx.Node) and isinstance(index, int) and index in (0, 1):
            lin = _split_source(gm, src)
            return (lin, index) if lin is not None else None
    if node.target in _SLICE_FNS:  # aten.slice.Tensor(gu, dim, start, end)
        src = call_input(node)
        if _as_linear(gm, src) and _is_last_dim(_arg(node, 1, "dim", 0), src):
            return _half_from_slice(gm, src, _arg(node, 2, "start"), _arg(node, 3, "end"), _arg(node, 4, "step", 1))
    return None


def _half_from_slice(gm, src, start, stop, step):
    width = _out_features(gm, src)
    if width is None or width % 2 or step not in (None, 1):
        return None
    half = width // 2
    if start in (None, 0) and stop == half:
        return src, 0
    if start == half and (stop is None or (isinstance(stop, int) and stop >= width)):
        return src, 1
    return None


def _out_features(gm, node: fx.Node) -> int | None:
    """Width of a linear's output: from node meta, else from its weight (symbolic_trace has no meta)."""
    val = node_value(node)
    if isinstance(val, torch.Tensor):
        return int(val.shape[-1])
    lin = _as_linear(gm, node)
    weight = weight_value(gm, lin[1]) if lin else None
    return int(weight.shape[0]) if isinstance(weight, torch.Tensor) else None


def _split_source(gm, node):
    """The fused linear whose output `node` splits into two equal halves on the last dim, else None."""
    if node.op == "call_function" and node.target in _CHUNK_FNS or node.op == "call_method" and node.target == "chunk":
        src, chunks, dim = call_input(node), _arg(node, 1, "chunks"), _arg(node, 2, "dim", 0)
        if chunks == 2 and _as_linear(gm, src) and _is_last_dim(dim, src):
            return src
    if node.op == "call_function" and node.target in _SPLIT_FNS or node.op == "call_method" and node.target == "split":
        src = _arg(node, 0, "tensor", call_input(node))
        size = _arg(node, 1, "split_size_or_sections", _arg(node, 1, "split_size", _arg(node, 1, "split_sizes")))
        dim = _arg(node, 2, "dim", 0)
        width = _out_features(gm, src) if isinstance(src, fx.Node) else None
        if width is None or not _as_linear(gm, src) or not _is_last_dim(dim, src):
            return None
        if size == width // 2 and width % 2 == 0 or (isinstance(size, (list, tuple)) and list(size) == [width // 2] * 2):
            return src
    return None


def _projection(gm, node):
    """-> (linear_node, half) where half is None for a plain linear, 0/1 for a half of a fused one."""
    node = _dtensor_source(_skip_identity(gm, node))
    if _as_linear(gm, node):
        return node, None
    return _as_half(gm, node)


# --------------------------------------------------------------------------------------------------------
# Weights, shapes and module paths.


def weight_value(gm: fx.GraphModule, ref: WeightRef, example_inputs: Sequence | None = None):
    """The tensor (real, or fake from node meta) behind a weight reference, or None."""
    if ref is None:
        return None
    if isinstance(ref, str):
        return _get_attr(gm, ref)
    if ref.op == "get_attr":
        return _get_attr(gm, ref.target)
    if ref.op == "placeholder" and example_inputs is not None:
        placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
        idx = placeholders.index(ref)
        if idx < len(example_inputs) and isinstance(example_inputs[idx], torch.Tensor):
            return example_inputs[idx]
    return node_value(ref)


def _get_attr(gm, target: str):
    obj = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


# The traced frame's local that holds the model: L['self'] for a module's own forward; L['args'][0] where a
# decorator wraps forward as wrapper(*args, **kwargs) (transformers >= 5.2x: deprecate_kwarg on every forward).
_DYNAMO_ROOT = re.compile(r"^L\[['\"](?:args['\"]\]\[0\]|\w+['\"]\])\.?")


def normalize_module_path(path: str) -> str:
    """"L['self'].model.layers[0]._modules['mlp']" (or "L['args'][0].model...") -> "model.layers.0.mlp"."""
    path = _DYNAMO_ROOT.sub("", path)
    path = re.sub(r"\[['\"]?([^\]'\"]+)['\"]?\]", r".\1", path)
    parts = [p for p in path.split(".") if p and p not in ("_modules",)]
    if "__self__" in parts and "forward" in parts[: _last(parts, "__self__")]:
        # a forward replaced on the instance (hook libraries: mlp.forward = wrap(mlp.forward)) reaches the module
        # as mlp.forward.<the wrapper's closure>.__self__: the module is the one whose forward it is
        start, end = parts.index("forward"), _last(parts, "__self__")
        parts = parts[:start] + parts[end + 1:]
    return ".".join(parts)


def _last(parts: list[str], name: str) -> int:
    return len(parts) - 1 - parts[::-1].index(name)


def _module_path(gm, node: fx.Node) -> list[str] | None:
    if node.op == "call_module":
        return str(node.target).split(".")
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return None
    path, _ = list(stack.values())[-1]
    return [p for p in normalize_module_path(str(path)).split(".") if p]


def _site_key(gm, nodes: list[fx.Node]) -> str | None:
    paths = [_module_path(gm, n) for n in nodes]
    if any(p is None for p in paths):
        return None
    common = []
    for parts in zip(*paths):
        if len(set(parts)) != 1:
            break
        common.append(parts[0])
    return ".".join(common) or "<root>"


# --------------------------------------------------------------------------------------------------------
# The matcher.


def routed_experts(gm: fx.GraphModule) -> list[str]:
    """Module paths of the grouped matmuls in `gm` (torch._grouped_mm, transformers' grouped_mm fallback): how
    Hugging Face models run mixture-of-experts layers whose experts are routed per token. The matcher does not
    rewrite those, and a model that also has dense gated FFNs (a shared expert) would otherwise not say so."""
    paths = []
    for node in gm.graph.nodes:
        if node.op != "call_function":
            continue
        name = f"{getattr(node.target, '__name__', '')} {node.target}"
        path = ".".join(_module_path(gm, node) or []) or "<root>"
        # grouped_mm; or a batched matmul over stacked expert weights (transformers' "batched_mm" experts, Llama 4)
        batched = node.target in _BMM_FNS and "expert" in path.lower()
        if ("grouped_mm" in name or batched) and path not in paths:
            paths.append(path)
    return paths


def match_sites(gm: fx.GraphModule, example_inputs: Sequence | None = None) -> SiteTable:
    """All gated FFN sites of `gm`, in graph order. Pure: `gm` is not modified."""
    sites = SiteTable()
    dropout_blocked = []
    for node in gm.graph.nodes:
        site = _match_at(gm, node, example_inputs, index=len(sites))
        if site is _LEFT_DENSE:
            sites.left_dense.append(node.name)
        elif site is not None:
            sites.append(site)
        elif _blocked_by_dropout(gm, node):
            dropout_blocked.append(node.name)
            sites.left_dense.append(node.name)
    if dropout_blocked:
        warnings.warn(
            f"countdown: {len(dropout_blocked)} gated FFN(s) (first at {dropout_blocked[0]!r}) left dense: a dropout "
            "in training mode sits between the product and down, which the countdown op would drop. Call "
            "model.eval() before compiling for inference.", stacklevel=3)
    _dedupe_keys(sites)
    log.info("countdown: %d gated FFN site(s) found in a graph of %d nodes", len(sites), len(gm.graph.nodes))
    return sites


def _blocked_by_dropout(gm, down) -> bool:
    """`down` is a linear whose input is an active dropout of act(gate projection) * up projection: a gated FFN
    that training mode keeps from being a site."""
    lin = _as_linear(gm, down)
    dropout = _skip_identity(gm, lin[0]) if lin is not None else None
    if not isinstance(dropout, fx.Node) or not (
            (dropout.op == "call_function" and dropout.target in _DROPOUT_FNS)
            or isinstance(_module(gm, dropout), nn.Dropout)):
        return False
    return next(_gated_products(gm, _local(_skip_identity(gm, call_input(dropout)))), None) is not None


def _gated_products(gm, product):
    """(activation name, gate, up) for each way `product` reads as act(gate projection) * up projection (either
    order): what makes a gated FFN of a down projection whose input it is."""
    if not _is_mul(product) or len(product.args) != 2:
        return
    for act_side, up_side in (product.args, product.args[::-1]):
        act = _as_activation(gm, act_side)
        if act is None:
            continue
        gate, up = _projection(gm, act[0]), _projection(gm, up_side)
        if gate is not None and up is not None:
            yield act[1], gate, up


# _build_site's answer for a gated FFN it found and left dense with a warning (SiteTable.left_dense).
_LEFT_DENSE = object()


def _match_at(gm, down, example_inputs, index) -> Site | None:
    lin = _as_linear(gm, down)
    if lin is None:
        return None
    product, w_down, b_down = _local(_skip_identity(gm, lin[0])), lin[1], lin[2]
    for act_name, gate, up in _gated_products(gm, product):
        site = _build_site(gm, down, act_name, gate, up, w_down, b_down, example_inputs, index)
        if site is not None:  # a Site, or _LEFT_DENSE
            return site
    return None


def _build_site(gm, down, act_name, gate, up, w_down, b_down, example_inputs, index) -> Site | None:
    (gate_lin, gate_half), (up_lin, up_half) = gate, up
    gate_x, w_gate, b_gate = _as_linear(gm, gate_lin)
    up_x, w_up, b_up = _as_linear(gm, up_lin)
    if (gate_half is None) != (up_half is None):
        return None
    if gate_half is None:
        fused = None
        if gate_lin is up_lin or _local(gate_x) is not _local(up_x):
            return None
    else:
        if gate_lin is not up_lin or gate_half == up_half:
            return None
        fused = "gate-up" if gate_half == 0 else "up-gate"
    wg, wu, wd = (weight_value(gm, w, example_inputs) for w in (w_gate, w_up, w_down))
    if not all(isinstance(w, torch.Tensor) and w.dim() == 2 for w in (wg, wu, wd)):
        log.info("countdown: skipping a gated FFN at %s: weight shapes unknown", down.name)
        return None
    output, shard, group = down, _tensor_parallel_shard(down), None
    if is_dtensor(wg):
        biases = [weight_value(gm, b, example_inputs) if b is not None else None for b in (b_gate, b_up, b_down)]
        if any(b is not None and v is None for b, v in zip((b_gate, b_up, b_down), biases)):
            log.info("countdown: skipping the DTensor FFN at %s: a bias of unknown layout", down.name)
            return None
        tp = _dtensor_tensor_parallel(down, wg, wu, wd, fused, *biases)
        if tp is None:
            return None
        output, shard, group = tp
        wg, wu, wd = wg.to_local(), wu.to_local(), wd.to_local()
    d_inter = wg.shape[0] // 2 if fused else wg.shape[0]
    d_model = wg.shape[1]
    if tuple(wd.shape) != (d_model, d_inter) or tuple(wu.shape) != tuple(wg.shape):
        log.info("countdown: skipping %s: gate %s / up %s / down %s do not chain", down.name,
                 tuple(wg.shape), tuple(wu.shape), tuple(wd.shape))
        return None
    if not _biases_fit(gm, example_inputs, (b_gate, b_up, b_down), (wg.shape[0], wu.shape[0], d_model)):
        log.info("countdown: skipping %s: a bias does not have its projection's width", down.name)
        return None
    writer = _written_in_place(gm, _local(gate_x), {gate_lin, up_lin}, down)
    if writer is not None:
        warnings.warn(
            f"countdown: left the gated FFN at {down.name!r} dense: {writer.format_node()} writes its input or an "
            "intermediate (gate, up, act or their product) in place before the down projection. The countdown op "
            "computes gate and up again from the input where down is, so it would miss that write (or see a later "
            "one). Write it out of place (x = x.clamp(...) instead of x.clamp_(...)) to have the FFN sparsified.",
            stacklevel=2)
        return _LEFT_DENSE
    key = _site_key(gm, [gate_lin, up_lin, down]) or f"site{index}"
    if shard:
        key = f"{key}@{shard}"
    return Site(shard=shard, dtensor_group=group, key=key, x=_local(gate_x), gate_weight=w_gate, up_weight=w_up,
                down_weight=w_down, gate_bias=b_gate, up_bias=b_up, down_bias=b_down, activation=act_name,
                fused=fused, d_model=int(d_model), d_inter=int(d_inter), dtype=wg.dtype, output=output)


def _biases_fit(gm, example_inputs, biases, widths) -> bool:
    """Each bias present is a vector of its projection's width (a broadcast bias would not index by neuron)."""
    for ref, width in zip(biases, widths):
        value = weight_value(gm, ref, example_inputs) if ref is not None else None
        if is_dtensor(value):  # widths are the local shard's
            value = value.to_local()
        if isinstance(value, torch.Tensor) and tuple(value.shape) != (width,):
            return False
    return True


# Calls whose result may share its input's storage: a write into it writes the input.
# Graphs without traced values (fx.symbolic_trace) are walked by these names; Dynamo's and export's graphs are
# checked by the storage of each node's fake value (_storage), which no list has to keep complete.
_VIEW_METHODS = {"view", "view_as", "reshape", "reshape_as", "flatten", "unflatten", "squeeze", "unsqueeze",
                 "transpose", "permute", "t", "expand", "expand_as", "narrow", "chunk", "split", "unbind", "select",
                 "__getitem__", "contiguous", "detach", "to", "type", "type_as", "float", "half", "bfloat16",
                 "movedim", "moveaxis", "swapaxes", "swapdims", "diagonal", "unfold", "as_strided", "tensor_split",
                 "split_with_sizes", "view_as_real", "view_as_complex", "expand_copy"}
_VIEW_FNS = {operator.getitem, torch.chunk, torch.split, torch.narrow, torch.reshape, torch.flatten, torch.squeeze,
             torch.unsqueeze, torch.transpose, torch.permute, torch.t, torch.unbind, torch.select, torch.detach,
             torch.movedim, torch.moveaxis, torch.swapaxes, torch.swapdims, torch.diagonal, torch.as_strided,
             torch.tensor_split, torch.split_with_sizes, torch.view_as_real, torch.view_as_complex}
_VIEW_ATTRS = {"T", "mT", "H", "mH", "data", "real", "imag"}  # getattr(u, "mT") as symbolic_trace records it
# x[i] = v and augmented assignments (x += y), as Dynamo records them.
_IN_PLACE_OPERATORS = {operator.setitem, operator.iadd, operator.isub, operator.imul, operator.itruediv,
                       operator.ifloordiv, operator.imod, operator.ipow, operator.iand, operator.ior, operator.ixor,
                       operator.ilshift, operator.irshift, operator.imatmul}
# Functions taking inplace= at this position.
_INPLACE_ARG = {F.silu: 1, F.relu: 1, F.relu6: 1, F.selu: 1, F.mish: 1, F.hardswish: 1, F.hardsigmoid: 1,
                F.elu: 2, F.celu: 2, F.leaky_relu: 2, F.hardtanh: 3, F.threshold: 3, F.dropout: 3}


def _writes_first_arg(gm, node: fx.Node) -> bool:
    """`node` writes its first argument in place: x.clamp_(...), x[i] = v, F.silu(x, inplace=True), an aten
    op with a mutable schema, nn.ReLU(inplace=True)(x), ..."""
    if node.op == "call_method":
        return node.target.endswith("_") and not node.target.startswith("_")
    if node.op == "call_module":
        return getattr(_module(gm, node), "inplace", False) is True
    if node.op != "call_function":
        return False
    if node.target in _IN_PLACE_OPERATORS:
        return True
    if isinstance(node.target, torch._ops.OpOverload):
        first = node.target._schema.arguments[:1]
        return bool(first) and first[0].alias_info is not None and first[0].alias_info.is_write
    if node.target in _INPLACE_ARG:
        return _arg(node, _INPLACE_ARG[node.target], "inplace", False) is True
    if getattr(node.target, "__module__", None) in ("_operator", "operator"):  # and_, or_: not in place
        return False
    name = getattr(node.target, "__name__", "")
    return name.endswith("_") and (not name.startswith("_") or name.startswith("_foreach_"))


def _written_args(gm, node: fx.Node) -> list[fx.Node]:
    """The tensors `node` writes in place: its first argument (each of them for torch._foreach_*_), out=."""
    written = []
    if _writes_first_arg(gm, node):
        first = call_input(node)
        written.extend(first if isinstance(first, (list, tuple)) else [first])
    out = node.kwargs.get("out")
    written.extend(out if isinstance(out, (list, tuple)) else [out])
    return [w for w in written if isinstance(w, fx.Node)]


def _may_alias(node: fx.Node) -> bool:
    if node.op == "call_method":
        return node.target in _VIEW_METHODS
    if node.op != "call_function":
        return False
    if isinstance(node.target, torch._ops.OpOverload):
        return any(r.alias_info is not None for r in node.target._schema.returns)
    if node.target is getattr:
        return len(node.args) > 1 and node.args[1] in _VIEW_ATTRS
    return node.target in _VIEW_FNS or getattr(node.target, "__name__", "") == "_get_data_attr"


def _storage(node) -> StorageWeakRef | None:
    """The storage of the fake tensor a traced node holds (Dynamo's example_value, export's val): views and
    in-place results share their base's. None where the graph holds no such value (fx.symbolic_trace)."""
    if not isinstance(node, fx.Node):
        return None
    value = node_value(node)
    if not isinstance(value, torch.Tensor) or is_dtensor(value) or value.layout != torch.strided:
        return None
    try:
        return StorageWeakRef(value.untyped_storage())
    except (RuntimeError, NotImplementedError, TypeError):
        return None


def _in_place_writes(gm, node: fx.Node, candidates: Sequence[fx.Node]) -> list[fx.Node]:
    """The nodes that write `node`'s data in place, directly or through a view of it: found among `candidates` by
    storage where the graph holds fake values, else by walking the calls that return views (_VIEW_METHODS, ...)."""
    storage = _storage(node)
    if storage is not None:
        return [n for n in candidates if any(_storage(w) == storage for w in _written_args(gm, n))]
    writes, pending, seen = [], [node], set()
    while pending:
        current = pending.pop()
        if current in seen:
            continue
        seen.add(current)
        for user in current.users:
            if current in _written_args(gm, user):
                writes.append(user)
                pending.append(user)  # x.clamp_() returns x itself
            elif call_input(user) is current and _may_alias(user):
                pending.append(user)
    return writes


def _a_step_of_the_chain(write: fx.Node, chain: set) -> bool:
    """An in-place write that is itself a step of the FFN (an in-place activation) on a tensor nothing outside
    the FFN reads, nor what that tensor is a view of (a fused gate_up whose other half is the up side)."""
    if write not in chain:
        return False
    node = call_input(write)
    while isinstance(node, fx.Node):
        if any(user not in chain for user in node.users):
            return False
        if not _may_alias(node):
            return True
        node = call_input(node)
    return True


def _written_in_place(gm, x: fx.Node, projections: set, down: fx.Node) -> fx.Node | None:
    """A node writing the FFN's input x (or the tensor x is a view of), or anything between the projections and
    down, in place before down runs; None where there is none. The countdown op replaces the whole chain by one
    call at down, computed from x there: a write to an intermediate would be lost, a write to x after the
    projections would be read.
    An in-place activation on a gate projection nothing else reads is part of the chain, not such a write."""
    nodes = list(gm.graph.nodes)
    order = {n: i for i, n in enumerate(nodes)}
    first, end = min(order[p] for p in projections), order[down]
    between = nodes[first + 1:end]  # where a write that matters can be
    product = call_input(down)  # down's input side only: a write to W_down (a dequantised weight) is read at down
    chain, pending = set(), [product] if isinstance(product, fx.Node) else list(down.all_input_nodes)
    while pending:  # the nodes from the projections to down
        node = pending.pop()
        if node in chain or order[node] < first:
            continue
        chain.add(node)
        if node not in projections:
            pending.extend(node.all_input_nodes)
    for node in chain:
        for write in _in_place_writes(gm, node, between):
            if order[write] < end and not _a_step_of_the_chain(write, chain):
                return write
    base = x  # x, or the tensor x is a view of: a write to either changes what the op would read at down
    while (_may_alias(base) or _writes_first_arg(gm, base)) and isinstance(call_input(base), fx.Node):
        base = call_input(base)  # through views and in-place results (x = h.mul_(2) is h)
    for write in _in_place_writes(gm, base, between):
        if first < order[write] < end:
            return write
    return None


# --------------------------------------------------------------------------------------------------------
# Tensor parallelism: hand-sharded modules (an all-reduce after down) and DTensor parallelize_module graphs,
# where every linear is wrapped: from_local(x) -> linear(DTensor weight) -> redistribute -> to_local.
# Dynamo writes those three calls in one of two forms: torch >= 2.12 as DTensor.from_local and the
# methods .redistribute / .to_local; torch 2.11 as call_functions of closures it made around them
# (placements baked in), named below.
_DTENSOR_CLOSURES = {"from_local": "handle_from_local.<locals>.fn_with_prim_types",
                     "redistribute": "redistribute_fn_with_prim_types",
                     "to_local": "to_local_fn_with_prim_types"}


def _is_dtensor_call(node, name: str) -> bool:
    """node is DTensor's `name` (from_local, redistribute or to_local) in either of Dynamo's forms."""
    if not isinstance(node, fx.Node):
        return False
    if node.op == "call_method":
        return node.target == name
    if node.op != "call_function":
        return False
    if name == "from_local" and getattr(node.target, "__name__", "") == "from_local":
        return True
    return getattr(node.target, "__qualname__", "").endswith(_DTENSOR_CLOSURES[name])


def _local(node):
    """The local tensor behind DTensor.from_local(...) wrappers."""
    while _is_dtensor_call(node, "from_local"):
        node = node.args[0]
    return node


def _dtensor_source(node):
    """The DTensor op behind `.redistribute(...).to_local()` (a parallel linear's output hook)."""
    if _is_dtensor_call(node, "to_local"):
        node = node.args[0]
    if _is_dtensor_call(node, "redistribute"):
        node = node.args[0]
    return node


def is_dtensor(t) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def _placements(node: fx.Node):
    """The placements of the DTensor a graph node produces (Dynamo's example value), None when unknown."""
    value = node.meta.get("example_value")
    return tuple(value.placements) if is_dtensor(value) else None


def _dtensor_tensor_parallel(down, wg, wu, wd, fused, bg, bu, bd):
    """(output node, shard, group name) of a DTensor column/row-parallel FFN, or None (logged) when the
    layout is another one: gate/up weights and biases Shard(0) (each rank holds its neurons' biases), down
    weight Shard(1), a down bias replicated (the rewrite adds it once, after the all-reduce), output
    redistributed to Replicate (an all-reduce) and made local, no fusion (a fused gate_up weight split by rows
    would put all gate rows on one rank and all up rows on the other)."""
    from torch.distributed.tensor import Replicate, Shard

    placements = [w.placements for w in (wg, wu, wd)]
    redistribute = next(iter(down.users), None) if len(down.users) == 1 else None
    to_local = next(iter(redistribute.users), None) if _is_dtensor_call(redistribute, "redistribute") and len(
        redistribute.users) == 1 else None
    reason = None
    if placements != [(Shard(0),), (Shard(0),), (Shard(1),)]:
        reason = f"placements {placements} are not column-parallel gate/up and row-parallel down"
    elif fused:
        reason = "a fused gate_up weight under DTensor TP is not supported"
    elif any(b is not None and not (is_dtensor(b) and tuple(b.placements) == (Shard(0),)) for b in (bg, bu)):
        reason = "a gate/up bias is not sharded with its rows (Shard(0))"
    elif bd is not None and not (is_dtensor(bd) and tuple(bd.placements) == (Replicate(),)):
        reason = "its down bias is not a replicated DTensor"
    elif not _is_dtensor_call(to_local, "to_local"):
        reason = "its output is not redistributed to a local tensor"
    elif _placements(redistribute) != (Replicate(),):
        # e.g. RowwiseParallel(output_layouts=Shard(1)) (sequence parallel): a reduce-scatter, not the all-reduce
        # the rewrite inserts
        reason = f"its output is redistributed to {_placements(redistribute)}, not replicated (all-reduced)"
    if reason:
        log.info("countdown: skipping the DTensor FFN at %s: %s", down.name, reason)
        return None
    mesh = wg.device_mesh
    return to_local, f"tp{mesh.get_local_rank()}of{mesh.size()}", mesh.get_group().group_name


_ALL_REDUCE = {torch.ops._c10d_functional.all_reduce.default, torch.ops._c10d_functional.all_reduce}


def _tensor_parallel_shard(down: fx.Node) -> str | None:
    """"tp<rank>of<world>" when the FFN output goes into an all-reduce: the gate/up rows and down columns
    here are one rank's shard (column-parallel gate/up, row-parallel down). Per-shard calibration state
    is keyed with it, so a calibration loads only on the same sharding."""
    for user in down.users:
        if user.op == "call_function" and user.target in _ALL_REDUCE:
            from torch.distributed.distributed_c10d import _resolve_process_group

            group = _resolve_process_group(user.args[2])
            return f"tp{torch.distributed.get_rank(group)}of{torch.distributed.get_world_size(group)}"
    return None


def _dedupe_keys(sites: list[Site]) -> None:
    """The same module called twice in one graph gives two sites; number the repeats."""
    seen: dict[str, int] = {}
    for i, site in enumerate(sites):
        n = seen.get(site.key, 0)
        seen[site.key] = n + 1
        if n:
            object.__setattr__(sites[i], "key", f"{site.key}#{n}")
