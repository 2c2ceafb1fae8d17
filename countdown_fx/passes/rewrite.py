"""Replace each gated FFN site by one countdown::* op whose state lives in the graph.

Per-site state (thresholds, predictor weights, and W_down^T when a CUDA kernel reads it and W_down needs no
gradient) is registered as buffers on the GraphModule and read through get_attr nodes, so it is data the compiled
code reads, not constants baked into it, and it travels with the graph into export.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import re
import warnings
from typing import Mapping, Sequence

import torch
from torch import fx
from torch._subclasses.fake_tensor import FakeTensor

from ..config import CountDownConfig
from ..kernels import ops
from .match import Site, WeightRef, call_input, is_dtensor, node_rank, node_value, weight_value
from .weights import site_sample

log = logging.getLogger(__name__)
aten = torch.ops.aten

# What the passes did, for tests and reports: sites_rewritten, graphs_without_sites, ...
counters: collections.Counter = collections.Counter()

STATE_PREFIX = "countdown_"


def state_attr(key: str, name: str) -> str:
    """The GraphModule attribute holding state `name` of site `key`."""
    return STATE_PREFIX + re.sub(r"\W", "_", key) + "__" + name


def rewrite_sites(
    gm: fx.GraphModule,
    sites: Sequence[Site],
    config: CountDownConfig,
    calibration=None,
    example_inputs: Sequence | None = None,
    exported: bool = False,
    keep_grad: bool | None = None,
) -> fx.GraphModule:
    """Rewrite `sites` (found in `gm` by match_sites) in place and return `gm`.

    regime "ideal" needs no state; regime "prac" takes each site's state from `calibration` (an object
    with `check_sites(sites, samples) -> {site key: its key in the calibration}`, where samples are the sites'
    weight samples (passes.weights) or None when config.check_weights is off, and `state_for(key) -> dict[str, Tensor]`
    and `decode_plan(key)` for such a key).
    exported: the graph is for torch.export (sparsify), where a dim left dynamic is symbolic and AOTInductor
    compiles the op for every size of it at once. A site whose decode batch is symbolic there drops the plan's
    dense rule (steps of many tokens running the dense FFN; the package cannot branch on the batch size), with a
    warning; under apply_to "decode" a symbolic sequence dim gets a warning (AOTInductor assumes a dynamic dim is
    at least 2 and compiles only the prefill branch). The dense rule is also dropped where config.dense_fallback is
    off, and for a 2-D FFN input under apply_to "all" whose [batch, seq, d_model] source the graph does not hold
    (a prefill would look like a decode step of many tokens).
    keep_grad: whether a W_down that requires grad must keep its gradient (None: whether grad mode is on now;
    the backend runs in its caller's grad mode, and Dynamo recompiles when that changes). See _down_transposed.
    """
    if config.regime == "prac":
        if calibration is None:
            raise ValueError(
                f"regime='prac' with method={config.method!r} needs calibration state (per-site thresholds"
                + (" and predictors" if config.method == "d-countdown" else "")
                + "). Run countdown_fx.calibrate(model, batches, config) once, save it, and pass "
                "options={'calibration': <Calibration or path>}; or use regime='ideal' (oracle top-k)."
            )
        samples = ({site.key: site_sample(gm, site, example_inputs) for site in sites
                    if not (site.shard or site.dtensor_group)}  # a shard is not the matrix calibration sampled
                   if config.check_weights else None)
        calibrated_key = calibration.check_sites(sites, samples)
    op = ops.op_for(config.regime, config.method)
    keep_grad = torch.is_grad_enabled() if keep_grad is None else keep_grad
    kernels_read_rows = config.regime == "prac"  # the Triton kernels run the prac ops; "ideal" is the reference
    copied_per_call = []  # (site key, MB) of the W_down^T that stay views because W_down keeps its gradient
    dropped_dense = []
    decode_only = config.apply_to == "decode"
    flat_inputs = []  # keys of sites whose 2-D input has no [batch, seq, d_model] form in the graph
    symbolic_seq = []  # exported sites under apply_to "decode" whose sequence dim is dynamic
    autocast = []  # sites computing in another dtype than their weights' (under torch.autocast)
    graph = gm.graph
    for site in sites:
        with graph.inserting_before(site.output):
            x, w_gate, w_up, w_down, b_gate, b_up, b_down = site_input_nodes(gm, site)
            tokens = token_source(x, site.d_model)
            if tokens is not None:  # the op sees the sequence dim, so it can tell prefill from decode; the
                # data stays x's (the source may have been written in place since x was made from it)
                x = graph.call_method("view_as", (x, tokens))
            flat = tokens is None and node_rank(x) == 2  # every call looks like a decode step of single tokens
            if flat:
                flat_inputs.append(site.key)
            shaped = tokens if tokens is not None else x  # what says the call's batch and sequence dims
            batch_symbolic, seq_symbolic = _symbolic_token_dims(shaped)
            if exported and seq_symbolic and decode_only:
                symbolic_seq.append(site.key)
            w_down_t = _down_transposed(gm, site, w_down, example_inputs, kernels_read_rows, keep_grad,
                                        copied_per_call)
            ffn = (x, w_gate, w_up, w_down_t, b_gate, b_up, b_down)
            dtype = compute_dtype(site)
            if dtype != site.dtype or dtype != getattr(node_value(site.x), "dtype", dtype):  # autocast
                ffn = tuple(None if n is None else graph.call_method("to", (n, dtype)) for n in ffn)
                autocast.append(site.key)
            ffn = (*ffn, site.activation)
            if config.regime == "ideal":
                args = (*ffn, config.score, config.sparsity, decode_only)
            else:
                device = _device(gm, site, example_inputs)
                key = calibrated_key[site.key]
                state = {name: _state(gm, site, name, t, device, dtype)
                         for name, t in calibration.state_for(key).items()}
                plan = calibration.decode_plan(key)
                if plan.dense_min_tokens and (not config.dense_fallback or (flat and not decode_only)):
                    # stated; or sparse prefill (apply_to "all") the op would take for a decode step, and run dense
                    plan = dataclasses.replace(plan, dense_min_tokens=0)
                elif plan.dense_min_tokens and exported and batch_symbolic:
                    if not _prefill_only(shaped):  # else no decode step to lose it
                        dropped_dense.append((site.key, plan.dense_min_tokens))
                    plan = dataclasses.replace(plan, dense_min_tokens=0)
                rule = ((state["pred_v"], state["pred_u"], state["tau"]) if config.method == "d-countdown"
                        else (config.score, state["threshold"]))
                args = (*ffn, *rule, decode_only, plan.gather_max_tokens, plan.dense_min_tokens)
            new = graph.call_function(op, args)
            out = new if tokens is None else graph.call_function(aten.reshape.default, (new, [-1, site.d_model]))
            replace_site(gm, site, out, sites)
        for node in {new, out}:
            node.meta.update({k: v for k, v in site.output.meta.items() if k in ("nn_module_stack", "stack_trace")})
        new.meta["countdown_site"] = site.key
        erase_unused(graph, site.output, stop=site.x)
        counters["sites_rewritten"] += 1
        log.info("countdown: rewrote %s (%s, d_model=%d, d_inter=%d, %s) -> %s", site.key, site.activation,
                 site.d_model, site.d_inter, site.layout, op)
    if copied_per_call:
        warnings.warn(
            f"countdown: W_down of {len(copied_per_call)} site(s) (first: {copied_per_call[0][0]}) requires grad "
            "and grad mode is on, so it keeps its gradient: the ops read it through a transposed view, and the "
            f"decode steps that the CUDA kernels run copy it on every call ({sum(mb for _, mb in copied_per_call):.0f}"
            " MB over these sites). For inference, compile (or sparsify) and run under torch.no_grad() or "
            "torch.inference_mode(), or call model.requires_grad_(False): W_down^T is then stored once.",
            stacklevel=3)
    if flat_inputs:
        consequence = ("with apply_to='decode' every call counts as a decode step of single tokens and runs sparse, "
                       "prefill included. If these sites see prefill, give them [batch, seq, d_model] input (reshape "
                       "after the FFN), or pass apply_to='all' to make sparse prefill the stated choice."
                       if decode_only else
                       "every call runs sparse, as apply_to='all' asks, but SparsityMeter counts each call as a "
                       "decode step of single tokens, prefill included, and the calibration's dense rule for big "
                       "decode batches is dropped there (a prefill would trigger it). Give these sites [batch, seq, "
                       "d_model] input (reshape after the FFN) to have prefill told apart.")
        warnings.warn(
            f"countdown: the FFN input of {len(flat_inputs)} site(s) (first: {flat_inputs[0]}) is 2-D [tokens, "
            "d_model], and this graph does not hold the [batch, seq, d_model] tensor it came from, so prefill cannot "
            f"be told from decode there: {consequence}", stacklevel=3)
    if autocast:
        warnings.warn(
            f"countdown: {len(autocast)} site(s) (first: {autocast[0]}) run under torch.autocast: their input and "
            "weights are cast to the autocast dtype on every call, as autocast casts a linear's, so each step reads "
            "all of the FFN's weights and decode gets no faster than dense. The output is right; to serve sparse, "
            "cast the model itself (model.to(torch.bfloat16)).", stacklevel=3)
    if symbolic_seq:
        warnings.warn(
            f"countdown: {len(symbolic_seq)} site(s) (first: {symbolic_seq[0]}) of this exported program have a "
            "dynamic sequence dim under apply_to='decode'. The program itself, run from Python, tells prefill from "
            "a one-token decode step at each call; AOTInductor does not: it assumes a dynamic dim is at least 2, so "
            "a package built from this program runs every step dense, decode steps included. For AOTInductor, "
            "export the decode step with the sequence dim fixed at 1 (and prefill as a program of its own), or "
            "use apply_to='all'.", stacklevel=3)
    if dropped_dense:
        warnings.warn(
            f"countdown: {len(dropped_dense)} site(s) would run the dense FFN in decode steps of at "
            f"least {min(b for _, b in dropped_dense)} tokens (their calibrated union is nearly full there), "
            "but their batch dim is dynamic in this exported program, and its compiled form (AOTInductor) cannot "
            "branch on the batch size when it runs, so it runs them sparse at every batch size: same quality as "
            "calibrated, slower than dense at those sizes. Export with a fixed decode batch to keep the dense "
            "rule.", stacklevel=3)
    graph.lint()
    gm.recompile()
    return gm


def _symbolic_token_dims(node: fx.Node) -> tuple[bool, bool]:
    """(batch dims symbolic, sequence dim symbolic) of an FFN input in [..., seq, d_model] form, or of a 2-D
    [tokens, d_model] one (its tokens are the batch); (False, False) where the graph has no value for it."""
    value = node_value(node)
    if not isinstance(value, torch.Tensor) or value.dim() < 2:
        return False, False
    lead = value.shape[:-1] if value.dim() == 2 else value.shape[:-2]
    batch = any(isinstance(d, torch.SymInt) for d in lead)
    return batch, value.dim() > 2 and isinstance(value.shape[-2], torch.SymInt)


def _prefill_only(node: fx.Node) -> bool:
    """An FFN input [..., seq, d_model] whose sequence dim is fixed above 1: no call of it is a decode step."""
    value = node_value(node)
    return (isinstance(value, torch.Tensor) and value.dim() > 2 and not isinstance(value.shape[-2], torch.SymInt)
            and value.shape[-2] != 1)


# Calls that only reshape a tensor (the same elements in the same order).
_RESHAPE_METHODS = {"view", "reshape", "flatten", "contiguous"}
_RESHAPE_FUNCTIONS = {torch.reshape, torch.flatten, aten.view.default, aten.reshape.default, aten._unsafe_view.default,
                      aten.flatten.using_ints}


def token_source(x: fx.Node, d_model: int) -> fx.Node | None:
    """The [..., seq, d_model] tensor that a 2-D FFN input [tokens, d_model] was only reshaped from (a MoE
    shared expert's `x.view(-1, d)`), if the graph holds it: its rows are the same tokens in the same order, so
    x viewed in its shape lets the op see the sequence dim that tells prefill from decode (ops.is_decode_step).
    A source that is not contiguous, or that a transpose or permute made (e.g. sequence first), is not taken: its
    dim -2 need not be the sequence."""
    if node_rank(x) != 2:
        return None
    node = x
    while _only_reshapes(node):
        node = call_input(node)
        value = node_value(node) if isinstance(node, fx.Node) else None
        if isinstance(value, torch.Tensor) and value.dim() >= 3 and value.shape[-1] == d_model:
            return node if value.is_contiguous() and not _reordered(node) else None
    return None


def _calls(node, methods: set, functions: set) -> bool:
    """Whether `node` calls one of `methods` (on a tensor) or one of `functions`."""
    return isinstance(node, fx.Node) and ((node.op == "call_method" and node.target in methods)
                                          or (node.op == "call_function" and node.target in functions))


def _only_reshapes(node) -> bool:
    return _calls(node, _RESHAPE_METHODS, _RESHAPE_FUNCTIONS)


def _reordered(node) -> bool:
    """Whether `node`, or a tensor it was only reshaped or copied from (`.contiguous()` after a transpose), had its
    dims reordered."""
    while isinstance(node, fx.Node):
        if _calls(node, _REORDER_METHODS, _REORDER_FUNCTIONS):
            return True
        if not (_only_reshapes(node) or _calls(node, {"clone"}, set())):
            return False
        node = call_input(node)
    return False


# Calls that reorder dims: their result's dim -2 need not be the sequence, contiguous or not (a batch of one
# sequence transposed to sequence first is contiguous: dims of size 1 do not count in the strides).
_REORDER_METHODS = {"transpose", "permute", "swapaxes", "swapdims", "movedim", "moveaxis", "t"}
_REORDER_FUNCTIONS = {torch.transpose, torch.permute, torch.swapaxes, torch.swapdims, torch.movedim, torch.moveaxis,
                      aten.transpose.int, aten.permute.default, aten.movedim.int}


def compute_dtype(site: Site) -> torch.dtype:
    """The dtype the FFN computes in: its weights' dtype, or under autocast the dtype its output has there
    (the graph's example value); the op is then handed its input and weights cast to it, as autocast would."""
    out = node_value(site.output)
    return out.dtype if isinstance(out, torch.Tensor) and out.dtype.is_floating_point else site.dtype


def site_input_nodes(gm: fx.GraphModule, site: Site) -> tuple:
    """(x, w_gate, w_up, w_down, b_gate, b_up, b_down) of a site as graph nodes, inserted at the current
    insertion point: a fused gate_up split into row views, W_down as stored [d_model, d_inter], and DTensor
    shards as their local tensors (the op and the observers work on this rank's neurons). Under DTensor TP
    b_down is None here: the replicated bias is added once, after the all-reduce (`replace_site`)."""
    w_gate, w_up = gate_up_nodes(gm, site, site.gate_weight, site.up_weight)
    b_gate, b_up = gate_up_nodes(gm, site, site.gate_bias, site.up_bias)
    b_down = None if site.dtensor_group else weight_node(gm, site.down_bias)
    tensors = [w_gate, w_up, weight_node(gm, site.down_weight), b_gate, b_up, b_down]
    if site.dtensor_group:
        tensors = [_to_local(gm, n) for n in tensors]
    w_gate, w_up, w_down, b_gate, b_up, b_down = tensors
    return site.x, w_gate, w_up, w_down, b_gate, b_up, b_down


def _to_local(gm: fx.GraphModule, node):
    return gm.graph.call_method("to_local", (node,)) if node is not None else None


def replace_site(gm: fx.GraphModule, site: Site, new: fx.Node, sites: list[Site]) -> None:
    """Route the users of the site's output to `new`, which computes the FFN (under DTensor TP, the shard's
    partial sums, all-reduced here as the row-parallel down projection would have done, plus its bias).
    A site of `sites` whose input is this site's output (FFNs back to back) is given the new node as its input:
    the output node goes when the site is erased."""
    result = new
    if site.dtensor_group:
        reduced = gm.graph.call_function(torch.ops._c10d_functional.all_reduce.default, (new, "sum", site.dtensor_group))
        result = gm.graph.call_function(torch.ops._c10d_functional.wait_tensor.default, (reduced,))
        if site.down_bias is not None:
            bias = _to_local(gm, weight_node(gm, site.down_bias))
            result = gm.graph.call_function(torch.ops.aten.add.Tensor, (result, bias))
    for node in {new, result}:
        node.meta.update({k: v for k, v in site.output.meta.items() if k in ("val", "example_value", "tensor_meta")})
    site.output.replace_all_uses_with(result)
    for i, other in enumerate(sites):
        if other.x is site.output:
            sites[i] = dataclasses.replace(other, x=result)


def erase_unused(graph: fx.Graph, root: fx.Node, stop: fx.Node | None) -> None:
    """Erase `root` (a replaced site, an unread weight) and whatever it alone used, back to `stop` (the FFN's
    input; placeholders are never erased).
    Not a graph-wide dead-code elimination, which would also drop unused in-place ops (KV cache writes)."""
    pending = [root]
    while pending:
        node = pending.pop()
        if node._erased or node.users or node is stop or node.op in ("placeholder", "output"):
            continue
        inputs = node.all_input_nodes
        graph.erase_node(node)
        pending.extend(inputs)


def weight_node(gm: fx.GraphModule, ref: WeightRef | None):
    """An fx.Node for a weight reference (a call_module's parameter becomes a get_attr)."""
    if ref is None or isinstance(ref, fx.Node):
        return ref
    return gm.graph.get_attr(ref)


def gate_up_nodes(gm, site: Site, gate_ref, up_ref):
    """(gate, up) tensors as nodes; a fused [2I, ...] weight or bias is sliced into row views (no copy)."""
    if gate_ref is None and up_ref is None:
        return None, None
    if site.fused is None:
        return weight_node(gm, gate_ref), weight_node(gm, up_ref)
    fused, d_inter = weight_node(gm, gate_ref), site.d_inter
    first = gm.graph.call_function(aten.slice.Tensor, (fused, 0, 0, d_inter))
    second = gm.graph.call_function(aten.slice.Tensor, (fused, 0, d_inter, 2 * d_inter))
    return (first, second) if site.fused == "gate-up" else (second, first)


# Devices whose kernels read W_down^T row by row, so it pays to store it once row-major (a test adds "cpu").
ROW_MAJOR_DEVICE_TYPES = {"cuda"}


def _down_transposed(gm, site: Site, w_down: fx.Node, example_inputs, kernels_read_rows: bool, keep_grad: bool,
                     copied_per_call: list):
    """W_down^T [d_inter, d_model]. Where the kernels read it (the prac ops on CUDA) it is materialised once as a
    contiguous graph buffer (they read a skipped neuron as one contiguous row); elsewhere a transposed view
    costs nothing. A W_down that requires grad keeps the view when keep_grad: a stored copy is cut off from
    autograd, so the model would train with no gradient for W_down, silently (appended to copied_per_call)."""
    value = weight_value(gm, site.down_weight, example_inputs)
    if site.dtensor_group:  # this rank's shard (the kernels would copy a transposed view of it every call)
        value = value.to_local() if is_dtensor(value) else None
    if (kernels_read_rows and isinstance(value, torch.Tensor) and not isinstance(value, FakeTensor)
            and value.device.type in ROW_MAJOR_DEVICE_TYPES):
        if value.requires_grad and keep_grad:
            counters["w_down_t_views_for_grad"] += 1
            copied_per_call.append((site.key, value.numel() * value.element_size() / 1e6))
        else:
            counters["w_down_t_bytes"] += value.numel() * value.element_size()
            source = _weight_source(gm, site.down_weight) if not site.dtensor_group else None
            # the stored W_down is read no more: drop its get_attr (and, for a shard, the to_local after it)
            erase_unused(gm.graph, w_down, stop=None)
            attr = state_attr(site.key, "w_down_t")
            node = _register_state(gm, attr, value.detach().t().contiguous())
            if source is not None:
                gm.meta.setdefault(DOWN_T_COPIES, []).append(DownTCopy(attr, source, _stamp(value)))
            return node
    return gm.graph.call_function(aten.t.default, (w_down,))


# GraphModule.meta key: the W_down^T copies stored in the graph, with where their W_down comes from.
DOWN_T_COPIES = "countdown_w_down_t_copies"


@dataclasses.dataclass
class DownTCopy:
    attr: str  # the buffer holding W_down^T
    source: tuple  # ("input", placeholder index) or ("attr", parameter name) of W_down
    stamp: tuple  # (data_ptr, _version) of the W_down it was copied from


def _weight_source(gm, ref) -> tuple | None:
    if isinstance(ref, str):
        return ("attr", ref)
    if ref.op == "get_attr":
        return ("attr", ref.target)
    if ref.op == "placeholder":
        return ("input", [n for n in gm.graph.nodes if n.op == "placeholder"].index(ref))
    return None


def _stamp(w: torch.Tensor) -> tuple:
    """What says a W_down is the one its W_down^T was copied from. An inference tensor (made under
    torch.inference_mode) has no version counter: its data pointer alone, so an in-place write to it inside
    inference mode is not seen."""
    return w.data_ptr(), None if w.is_inference() else w._version


def _refresh_down_t(gm: fx.GraphModule, args: Sequence, kwargs: Mapping | None = None) -> None:
    """Copy each stored W_down^T again whose W_down changed since (see keep_down_t_fresh); `args` / `kwargs`:
    the graph's call arguments, where weights are placeholders."""
    placeholders = None
    for copy in gm.meta.get(DOWN_T_COPIES, ()):
        kind, where = copy.source
        if kind == "input":
            if where < len(args):
                w = args[where]
            else:
                placeholders = placeholders or [n.target for n in gm.graph.nodes if n.op == "placeholder"]
                w = (kwargs or {})[placeholders[where]]
        else:
            w = weight_value(gm, where)
        if _stamp(w) != copy.stamp:
            with torch.no_grad():
                gm.get_buffer(copy.attr).copy_(w.t())
            copy.stamp = _stamp(w)


def keep_down_t_fresh(gm: fx.GraphModule, fn):
    """fn (the compiled graph) behind a check that each stored W_down^T still copies its W_down: a W_down
    written in place since (an optimizer step, load_state_dict) or another tensor in its place (Dynamo reuses a
    graph for another instance of the same model) is copied again before the call. Changes made through
    `.data` bypass the version counter and are not seen. The check costs ~1 µs per site and call."""
    if not gm.meta.get(DOWN_T_COPIES):
        return fn

    def run(*args):
        _refresh_down_t(gm, args)
        return fn(*args)

    return run


def refresh_down_t_on_call(gm: fx.GraphModule) -> fx.GraphModule:
    """The same check as keep_down_t_fresh for a rewritten GraphModule the caller runs itself (sparsify,
    CountDownTransformation): a forward pre-hook, registered once; it reads gm.meta at each call, so a graph
    whose copies are gone (reversed) costs nothing. Skipped while Dynamo traces the module."""
    if gm.meta.get(DOWN_T_COPIES) and not gm.meta.get(_REFRESH_HOOK):
        def hook(module, args, kwargs):
            if not torch.compiler.is_compiling():
                _refresh_down_t(module, args, kwargs)

        gm.register_forward_pre_hook(hook, with_kwargs=True)
        gm.meta[_REFRESH_HOOK] = True
    return gm


_REFRESH_HOOK = "countdown_down_t_refresh_hook"


def _device(gm, site: Site, example_inputs) -> torch.device:
    value = weight_value(gm, site.gate_weight, example_inputs)
    return value.device if isinstance(value, torch.Tensor) else torch.device("cpu")


# Predictor factors are stored in the site's dtype when that is 16-bit: calibration keeps them in fp32,
# which would double the predictor's bytes and make the kernels compute x V in 3xTF32 (the end-to-end
# benchmark showed no measurable difference at s=0.9, 148.9 vs 148.3 tokens/s; the bytes saving stands).
# The reference reads the same rounded factors, so CPU and GPU agree.
LOW_PRECISION_STATE = ("pred_v", "pred_u")
# ... and with their rank padded by zero columns to a multiple of RANK_ALIGN: Triton vectorises a row's loads
# only when its stride is a multiple of 16 elements. The default rank at the Llama-3.1-8B shape is 477; its
# predictor launches ran ~1.6x their time at rank 512 in the 32-layer model (NOTES.md, "predictor rank").
# Zero columns add exact zeros to x V and to the logits.
RANK_ALIGN = 16
# V [d_model, r] is stored transposed ([r, d_model], the buffer state_attr(key, "pred_v_t")) and handed to the
# op as a transposed view: each of its r columns is then one contiguous row, which lets a decode step of one or
# two tokens compute h = x V in one launch without a split over d_model and its reduce (CONFIG "lowrank_no_dot").


def stored_rank(rank: int) -> int:
    """The rank a predictor of `rank` columns is stored with: padded up to a multiple of RANK_ALIGN."""
    return -(-rank // RANK_ALIGN) * RANK_ALIGN


def _state(gm, site: Site, name: str, tensor: torch.Tensor, device: torch.device, dtype: torch.dtype) -> fx.Node:
    """Scalars (thresholds, tau) are stored with shape [1]: Inductor lowers a 0-d constant of a graph to an
    inline immediate, which a Triton kernel cannot take as its pointer argument (AOTInductor failed so).
    Predictor weights are stored in the FFN's compute dtype (bf16 / fp16 ones as such; fp32 kept)."""
    tensor = tensor.detach().to(device)
    if name in LOW_PRECISION_STATE and dtype in (torch.float16, torch.bfloat16):
        tensor = tensor.to(dtype)
    if name in LOW_PRECISION_STATE and stored_rank(tensor.shape[-1]) != tensor.shape[-1]:
        tensor = torch.nn.functional.pad(tensor, (0, stored_rank(tensor.shape[-1]) - tensor.shape[-1]))
    if name == "pred_v":  # stored as V^T, handed to the op as a transposed view (comment above stored_rank)
        stored = _register_state(gm, state_attr(site.key, "pred_v_t"), tensor.t().contiguous())
        return gm.graph.call_function(aten.t.default, (stored,))
    return _register_state(gm, state_attr(site.key, name), tensor.reshape(1) if tensor.dim() == 0 else tensor)


def _register_state(gm: fx.GraphModule, attr: str, tensor: torch.Tensor) -> fx.Node:
    """A buffer of the GraphModule read by a get_attr node. A Dynamo graph also maps each of its
    attributes to a source (AOTAutograd asserts on it and marks them static inputs for CUDA graphs), so
    the new buffer gets one there too."""
    gm.register_buffer(attr, tensor, persistent=True)
    sources = getattr(gm, "_param_name_to_source", None)
    if sources is not None:
        from torch._dynamo.source import ConstantSource

        sources[attr] = ConstantSource(attr)
    return gm.graph.get_attr(attr)
