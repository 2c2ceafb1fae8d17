"""The countdown::* custom ops: one op per selection rule, each replacing a whole gated FFN site.

    countdown::topk_ffn       SP-Ideal, any method (score "gate" | "up" | "coef")
    countdown::threshold_ffn  SP-Prac, CATS ("gate") / M-CountDown ("up"): keep score > threshold
    countdown::predictor_ffn  SP-Prac, D-CountDown: keep (x V) U^T > tau

Every op has a fake (meta) implementation, so Dynamo, AOTAutograd and torch.export trace it, and an
autograd formula (the gradient of the reference with the mask held fixed), so a model whose parameters
require grad still compiles. `decode_only=True` runs the dense FFN on prefill inputs (see `is_decode_step`).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import reference

# The three ops share their leading tensor arguments: x, w_gate, w_up, w_down_t, b_gate, b_up, b_down.
N_FFN_TENSORS = 7


def is_decode_step(x: Tensor) -> bool:
    """A decode step has one token per sequence: [batch, 1, d_model]. A 2-D input is taken as a batch of
    single tokens (one per sequence), as serving frameworks lay out decode batches."""
    return x.dim() <= 2 or x.shape[-2] == 1


def _topk_impl(x, w_gate, w_up, w_down_t, b_gate, b_up, b_down, activation, score, sparsity, decode_only):
    if decode_only and not is_decode_step(x):
        return reference.dense_ffn(x, w_gate, w_up, w_down_t, b_gate, b_up, b_down, activation)
    return reference.topk_ffn(x, w_gate, w_up, w_down_t, b_gate, b_up, b_down, activation, score, sparsity)


def _threshold_impl(x, w_gate, w_up, w_down_t, b_gate, b_up, b_down, activation, score, threshold, decode_only):
    if decode_only and not is_decode_step(x):
        return reference.dense_ffn(x, w_gate, w_up, w_down_t, b_gate, b_up, b_down, activation)
    return reference.threshold_ffn(x, w_gate, w_up, w_down_t, b_gate, b_up, b_down, activation, score, threshold)


def _predictor_impl(x, w_gate, w_up, w_down_t, b_gate, b_up, b_down, activation, pred_v, pred_u, tau, decode_only):
    if decode_only and not is_decode_step(x):
        return reference.dense_ffn(x, w_gate, w_up, w_down_t, b_gate, b_up, b_down, activation)
    return reference.predictor_ffn(x, w_gate, w_up, w_down_t, b_gate, b_up, b_down, activation, pred_v, pred_u, tau)


@torch.library.custom_op("countdown::topk_ffn", mutates_args=())
def topk_ffn(
    x: Tensor, w_gate: Tensor, w_up: Tensor, w_down_t: Tensor,
    b_gate: Optional[Tensor], b_up: Optional[Tensor], b_down: Optional[Tensor],
    activation: str, score: str, sparsity: float, decode_only: bool,
) -> Tensor:
    return _topk_impl(x, w_gate, w_up, w_down_t, b_gate, b_up, b_down, activation, score, sparsity, decode_only)


@torch.library.custom_op("countdown::threshold_ffn", mutates_args=())
def threshold_ffn(
    x: Tensor, w_gate: Tensor, w_up: Tensor, w_down_t: Tensor,
    b_gate: Optional[Tensor], b_up: Optional[Tensor], b_down: Optional[Tensor],
    activation: str, score: str, threshold: Tensor, decode_only: bool,
) -> Tensor:
    return _threshold_impl(x, w_gate, w_up, w_down_t, b_gate, b_up, b_down, activation, score, threshold, decode_only)


@torch.library.custom_op("countdown::predictor_ffn", mutates_args=())
def predictor_ffn(
    x: Tensor, w_gate: Tensor, w_up: Tensor, w_down_t: Tensor,
    b_gate: Optional[Tensor], b_up: Optional[Tensor], b_down: Optional[Tensor],
    activation: str, pred_v: Tensor, pred_u: Tensor, tau: Tensor, decode_only: bool,
) -> Tensor:
    return _predictor_impl(x, w_gate, w_up, w_down_t, b_gate, b_up, b_down, activation, pred_v, pred_u, tau, decode_only)


def _fake(x: Tensor, w_gate: Tensor, w_up: Tensor, w_down_t: Tensor, *rest) -> Tensor:
    return x.new_empty((*x.shape[:-1], w_down_t.shape[1]))


IMPLS = {topk_ffn: _topk_impl, threshold_ffn: _threshold_impl, predictor_ffn: _predictor_impl}

for _op, _impl in IMPLS.items():
    _op.register_fake(_fake)

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
            out = _impl(*leaves)
            inputs = [leaf for leaf, w in zip(leaves, wants) if w]
            grads = iter(torch.autograd.grad(out, inputs, grad, allow_unused=True))
        return tuple(next(grads) if w else None for w in wants)

    _op.register_autograd(_backward, setup_context=_setup_context)


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
