"""The countdown::* custom ops: one op per selection rule, each replacing a whole gated FFN site.

    countdown::topk_ffn       SP-Ideal, any method (score "gate" | "up" | "coef")
    countdown::threshold_ffn  SP-Prac, CATS ("gate") / M-CountDown ("up"): keep score > threshold
    countdown::predictor_ffn  SP-Prac, D-CountDown: keep (x V) U^T > tau

Every op has a fake (meta) implementation, so Dynamo, AOTAutograd and torch.export trace it, and an
autograd formula (the gradient of the reference with the mask held fixed), so a model whose parameters
require grad still compiles. `decode_only=True` runs the dense FFN on prefill inputs (see `is_decode_step`).

threshold_ffn and predictor_ffn are `torch.library.triton_op`s: on CUDA, a decode step of at most
`triton_ffn.MAX_TOKENS` tokens runs the Triton kernels of `triton_ffn` (launched through `wrap_triton`, so
Inductor sees them and they are captured by CUDA graphs); everything else (CPU, prefill, larger decode
batches, mixed dtypes) runs the PyTorch reference, which is also the fake (meta) implementation.
topk_ffn (SP-Ideal) is an accuracy oracle with no speed path: a plain custom op on the reference.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Optional

import torch
from torch import Tensor
from torch.fx.experimental.symbolic_shapes import guard_or_false

from . import reference

try:  # triton is an optional dependency: without it every device runs the reference
    from . import triton_ffn
except ImportError:  # pragma: no cover - exercised only where triton is missing
    triton_ffn = None

KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# Decode steps with more tokens than this run the reference (dense compute times the mask). Up to 16
# tokens the kernels themselves fall back to a dense walk when the union is dense (decided on the device);
# measured on the H100, M-CountDown/CATS are never slower than dense Inductor up to 16 tokens
# (benchmarks/speed/NOTES.md).
SPARSE_MAX_TOKENS = 16

# The three ops share their leading tensor arguments: x, w_gate, w_up, w_down_t, b_gate, b_up, b_down.
N_FFN_TENSORS = 7

# Per-call choices of threshold_ffn / predictor_ffn in a decode step, made on the host from the step's
# token count and the site's calibrated union of masks (Calibration.union_by_batch), measured on the H100
# (benchmarks/speed/NOTES.md, "sides" and "crossover"):
# - the gather sparse side beats the masked one up to a union of ~0.35 for M-CountDown / CATS (after the gather
#   launch the down kernel walks its flat list of the union's rows at any size: "flat walk"; B=2 union 0.34:
#   87.2 vs 90.5 us, 0.48: 99.4 vs 95.1) and ~0.4 for D-CountDown (B=2 union 0.36, FMA gather: 77.2 vs 83.2 us;
#   B=4 union 0.34, tl.dot gather: 79.8 vs 84.6; B=4 union 0.43: 87.2 vs 86.3; B=2 union 0.51: 95.8 vs 92.0;
#   `ffn_decode.py --compare` at 5853305 and 0cf3d52, NOTES.md "few-token gather", "plan bound"; M at B=4
#   union 0.36: 97.2 vs 91.6, so 0.35 is its edge);
#   the choice is speed only: the same coefficients up to fp32 summation order (bit for bit where the gather
#   runs tl.dot; a step of up to 2 tokens sums its dots on the FMA units, triton_ffn.CONFIG["gather_no_dot"],
#   and D-CountDown's logits too, so a neuron whose logit lies within that rounding of tau can flip); the output
#   within fp32 rounding (after the gather side the down kernel walks the union in compacted order).
# - D-CountDown is slower than the dense FFN from a union of ~0.8 on (the predictor's bytes and compute
#   come on top of a nearly dense read), M-CountDown / CATS by ~2% at a full union (B=16, union 0.99-1.0:
#   136.3-136.8 vs 134.3 us): such steps run the dense FFN. This changes the output (to the dense one) for
#   those batch sizes; Calibration.report() and SparsityMeter say where it happens.
GATHER_MAX_UNION = {"threshold": 0.35, "predictor": 0.4}
# A one-token step gathers D-CountDown's gate and up rows in one FMA loop (triton_ffn CONFIG "gather_no_dot"),
# which keeps the gather side ahead up to where D runs dense: at unions 0.5 / 0.6 / 0.7 / 0.8, 83.4 / 95.1 / 106.2
# / 117.8 us against 88.4 / 98.0 / 108.9 / 120.3 masked (NOTES.md "fused FMA gather"). M-CountDown ties or loses
# there (union 0.5: 94.2 vs 94.1; 0.8: 116.7 vs 114.9), so it keeps its bound.
# At one token the gather side also beats the dense FFN at 0.8 (117.8 vs 131.2 us): DENSE_MIN_UNION's 0.8 for D
# was measured with the masked side at B=8; a one-token dense bound near 0.9 (extrapolated) is not measured yet.
GATHER_MAX_UNION_ONE_TOKEN = {"threshold": 0.35, "predictor": 0.8}
DENSE_MIN_UNION = {"threshold": 0.99, "predictor": 0.8}


def gather_max_union(op_kind: str, tokens: int) -> float:
    """The largest calibrated union at which a decode step of `tokens` tokens takes the gather side."""
    return (GATHER_MAX_UNION_ONE_TOKEN if tokens == 1 else GATHER_MAX_UNION)[op_kind]


@dataclass(frozen=True)
class DecodePlan:
    """What a site's op does in a decode step of T tokens: gather sparse side for T <= gather_max_tokens,
    the dense FFN for T >= dense_min_tokens (0: never)."""

    gather_max_tokens: int = 0
    dense_min_tokens: int = 0

    def runs_dense(self, tokens: int) -> bool:
        return 0 < self.dense_min_tokens <= tokens

    def path(self, tokens: int) -> str:
        """What a decode step of `tokens` tokens runs: "dense", "gather" or "masked" (sparse side)."""
        if self.runs_dense(tokens):
            return "dense"
        # Speed only (both sides give the same output up to fp32 rounding): never add a guard on a dynamic batch
        # for it, so a graph compiled or exported for a range of batch sizes stays valid for all of them; such a
        # graph runs the masked side.
        return "gather" if guard_or_false(tokens <= self.gather_max_tokens) else "masked"


def decode_plan(op_kind: str, union_by_batch: Mapping[int, float]) -> DecodePlan:
    """The plan for a site of `op_kind` ("threshold" | "predictor") whose calibrated union of the masks of
    B tokens is union_by_batch[B]. Between measured batch sizes the plan stays on the safe side: gather up
    to the largest measured B under the bound, dense from the smallest measured B over it."""
    sizes = sorted(union_by_batch)
    gather = 0
    for b in sizes:  # the union grows with B; stop at the first size over the bound
        if union_by_batch[b] > gather_max_union(op_kind, b):
            break
        gather = b
    dense = next((b for b in sizes if union_by_batch[b] >= DENSE_MIN_UNION[op_kind]), 0)
    return DecodePlan(gather_max_tokens=gather, dense_min_tokens=dense)


def runs_dense(x: Tensor, dense_min_tokens: int) -> bool:
    """A decode step of at least dense_min_tokens tokens runs the dense FFN (see DENSE_MIN_UNION)."""
    return is_decode_step(x) and DecodePlan(dense_min_tokens=dense_min_tokens).runs_dense(x.numel() // x.shape[-1])


def is_decode_step(x: Tensor) -> bool:
    """A decode step has one token per sequence: [batch, 1, d_model]. A 2-D input is taken as a batch of
    single tokens (one per sequence), as serving frameworks lay out decode batches."""
    return x.dim() <= 2 or x.shape[-2] == 1


def _use_kernels(x: Tensor, w_gate: Tensor, *tensors: Optional[Tensor]) -> bool:
    """Shape/device/dtype facts only (known while tracing), never tensor values: no host sync. An FFN with no
    neurons (d_inter 0) or no features runs the reference (b_down alone)."""
    if triton_ffn is None or not x.is_cuda or x.dtype not in KERNEL_DTYPES or x.shape[-1] == 0 or w_gate.shape[0] == 0:
        return False
    tokens = x.numel() // x.shape[-1]
    if not 1 <= tokens <= min(SPARSE_MAX_TOKENS, triton_ffn.MAX_TOKENS):
        return False
    return all(t is None or (t.is_cuda and t.dtype == x.dtype) for t in (w_gate, *tensors))


def _run_kernels(x, w_gate, w_up, w_down_t, b_gate, b_up, b_down, activation, mode, thr, gather_max_tokens,
                 pred_v=None, pred_u=None):
    side = DecodePlan(gather_max_tokens=gather_max_tokens).path(x.numel() // x.shape[-1])
    y = triton_ffn.sparse_ffn(x.reshape(-1, x.shape[-1]), w_gate, w_up, w_down_t, b_gate, b_up, b_down,
                              activation, mode, thr, pred_v, pred_u, config={"sparse_side": side})
    return y.reshape(*x.shape[:-1], w_down_t.shape[1])


def _topk_impl(x, w_gate, w_up, w_down_t, b_gate, b_up, b_down, activation, score, sparsity, decode_only,
               kernels=True):
    if decode_only and not is_decode_step(x):
        return reference.dense_ffn(x, w_gate, w_up, w_down_t, b_gate, b_up, b_down, activation)
    return reference.topk_ffn(x, w_gate, w_up, w_down_t, b_gate, b_up, b_down, activation, score, sparsity)


def _threshold_impl(x, w_gate, w_up, w_down_t, b_gate, b_up, b_down, activation, score, threshold, decode_only,
                    gather_max_tokens=0, dense_min_tokens=0, kernels=True):
    if (decode_only and not is_decode_step(x)) or runs_dense(x, dense_min_tokens):
        return reference.dense_ffn(x, w_gate, w_up, w_down_t, b_gate, b_up, b_down, activation)
    if kernels and _use_kernels(x, w_gate, w_up, w_down_t, b_gate, b_up, b_down) and threshold.device == x.device:
        return _run_kernels(x, w_gate, w_up, w_down_t, b_gate, b_up, b_down, activation,
                            triton_ffn.MODE_OF_SCORE[score], threshold, gather_max_tokens)
    return reference.threshold_ffn(x, w_gate, w_up, w_down_t, b_gate, b_up, b_down, activation, score, threshold)


def _predictor_impl(x, w_gate, w_up, w_down_t, b_gate, b_up, b_down, activation, pred_v, pred_u, tau, decode_only,
                    gather_max_tokens=0, dense_min_tokens=0, kernels=True):
    if (decode_only and not is_decode_step(x)) or runs_dense(x, dense_min_tokens):
        return reference.dense_ffn(x, w_gate, w_up, w_down_t, b_gate, b_up, b_down, activation)
    if kernels and (_use_kernels(x, w_gate, w_up, w_down_t, b_gate, b_up, b_down) and tau.device == x.device
            and pred_v.is_cuda and pred_u.is_cuda):
        return _run_kernels(x, w_gate, w_up, w_down_t, b_gate, b_up, b_down, activation,
                            triton_ffn.MODE_PRED, tau, gather_max_tokens, pred_v, pred_u)
    return reference.predictor_ffn(x, w_gate, w_up, w_down_t, b_gate, b_up, b_down, activation, pred_v, pred_u, tau)


@torch.library.custom_op("countdown::topk_ffn", mutates_args=())
def topk_ffn(
    x: Tensor, w_gate: Tensor, w_up: Tensor, w_down_t: Tensor,
    b_gate: Optional[Tensor], b_up: Optional[Tensor], b_down: Optional[Tensor],
    activation: str, score: str, sparsity: float, decode_only: bool,
) -> Tensor:
    return _topk_impl(x, w_gate, w_up, w_down_t, b_gate, b_up, b_down, activation, score, sparsity, decode_only)


@torch.library.triton_op("countdown::threshold_ffn", mutates_args=())
def threshold_ffn(
    x: Tensor, w_gate: Tensor, w_up: Tensor, w_down_t: Tensor,
    b_gate: Optional[Tensor], b_up: Optional[Tensor], b_down: Optional[Tensor],
    activation: str, score: str, threshold: Tensor, decode_only: bool,
    gather_max_tokens: int = 0, dense_min_tokens: int = 0,
) -> Tensor:
    return _threshold_impl(x, w_gate, w_up, w_down_t, b_gate, b_up, b_down, activation, score, threshold, decode_only,
                           gather_max_tokens, dense_min_tokens)


@torch.library.triton_op("countdown::predictor_ffn", mutates_args=())
def predictor_ffn(
    x: Tensor, w_gate: Tensor, w_up: Tensor, w_down_t: Tensor,
    b_gate: Optional[Tensor], b_up: Optional[Tensor], b_down: Optional[Tensor],
    activation: str, pred_v: Tensor, pred_u: Tensor, tau: Tensor, decode_only: bool,
    gather_max_tokens: int = 0, dense_min_tokens: int = 0,
) -> Tensor:
    return _predictor_impl(x, w_gate, w_up, w_down_t, b_gate, b_up, b_down, activation, pred_v, pred_u, tau, decode_only,
                           gather_max_tokens, dense_min_tokens)


def _fake(x: Tensor, w_gate: Tensor, w_up: Tensor, w_down_t: Tensor, *rest) -> Tensor:
    return x.new_empty((*x.shape[:-1], w_down_t.shape[1]))


IMPLS = {topk_ffn: _topk_impl, threshold_ffn: _threshold_impl, predictor_ffn: _predictor_impl}

topk_ffn.register_fake(_fake)  # triton_op registers its own function as the fake implementation

for _op, _impl in IMPLS.items():

    def _setup_context(ctx, inputs, output):
        ctx.save_for_backward(*[t if isinstance(t, Tensor) else None for t in inputs])
        ctx.non_tensor = [None if isinstance(t, Tensor) else t for t in inputs]

    def _backward(ctx, grad, _impl=_impl):
        # Differentiate the reference; the selection (top-k, threshold, predictor) is piecewise constant,
        # so holding the mask fixed is the exact gradient almost everywhere.
        saved = ctx.saved_tensors
        args = [s if n is None else n for s, n in zip(saved, ctx.non_tensor)]
        wants = [isinstance(a, Tensor) and a.is_floating_point() and i < N_FFN_TENSORS for i, a in enumerate(args)]
        with torch.enable_grad():
            leaves = [a.detach().requires_grad_(True) if w else a for a, w in zip(args, wants)]
            out = _impl(*leaves, kernels=False)  # the Triton kernels have no autograd: use the reference
            inputs = [leaf for leaf, w in zip(leaves, wants) if w]
            grads = iter(torch.autograd.grad(out, inputs, grad, allow_unused=True))
        return tuple(next(grads) if w else None for w in wants)

    _op.register_autograd(_backward, setup_context=_setup_context)


def bound_args(func, args, kwargs=None) -> dict:
    """A countdown op call's arguments by name, defaults filled in (for code that inspects calls)."""
    kwargs = kwargs or {}
    bound = {}
    for i, arg in enumerate(func._schema.arguments):
        if i < len(args):
            bound[arg.name] = args[i]
        elif arg.name in kwargs:
            bound[arg.name] = kwargs[arg.name]
        else:
            bound[arg.name] = arg.default_value
    return bound


def op_kind(method: str) -> str:
    """Which SP-Prac op a method uses: "predictor" (D-CountDown) or "threshold" (CATS, M-CountDown)."""
    return "predictor" if method == "d-countdown" else "threshold"


def op_for(regime: str, method: str):
    """The OpOverload a site is rewritten to."""
    if regime == "ideal":
        return torch.ops.countdown.topk_ffn.default
    if method == "d-countdown":
        return torch.ops.countdown.predictor_ffn.default
    return torch.ops.countdown.threshold_ffn.default


COUNTDOWN_OPS = (
    torch.ops.countdown.topk_ffn.default,
    torch.ops.countdown.threshold_ffn.default,
    torch.ops.countdown.predictor_ffn.default,
)
