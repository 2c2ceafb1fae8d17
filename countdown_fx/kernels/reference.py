"""The semantics of every CountDown op, in plain PyTorch.

This module is the single source of truth: the CPU path of every op and the oracle every Triton kernel
is tested against. All functions take the gated FFN in one layout:

    x          [..., d_model]
    w_gate     [d_inter, d_model]     (a row per neuron)
    w_up       [d_inter, d_model]
    w_down_t   [d_inter, d_model]     (W_down transposed: a row per neuron, so a skipped neuron is a row)
    b_gate, b_up [d_inter] or None;  b_down [d_model] or None

and compute  y = (act(x W_gate^T + b_gate) * (x W_up^T + b_up) * keep) @ W_down^T + b_down,
where keep is the 0/1 mask of the neurons a method selects (a skipped neuron adds exactly 0, even where its
product overflows: torch.where, not a multiplication). Matmuls run in the input dtype (fp32
accumulation inside), exactly like the dense module, so sparsity 0 reproduces the dense FFN.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

ACTIVATIONS = ("silu", "gelu_tanh", "gelu", "relu")
SCORES = ("gate", "up", "coef")


def activation(g: torch.Tensor, name: str) -> torch.Tensor:
    if name == "silu":
        return F.silu(g)
    if name == "gelu_tanh":
        return F.gelu(g, approximate="tanh")
    if name == "gelu":
        return F.gelu(g)
    if name == "relu":
        return F.relu(g)
    raise ValueError(f"unknown activation {name!r}; supported: {list(ACTIVATIONS)}")


def keep_count(d_inter: int, sparsity: float) -> int:
    """Neurons kept per token at SP-Ideal: d_inter - round(s * d_inter), never fewer than one."""
    return max(1, d_inter - int(round(sparsity * d_inter)))


def gate_up(x, w_gate, w_up, b_gate=None, b_up=None, act="silu"):
    """The dense first half: returns (act(g), u)."""
    return activation(F.linear(x, w_gate, b_gate), act), F.linear(x, w_up, b_up)


def score(method_score: str, act_g: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """|act(g)| (CATS), |u| (M-CountDown) or |act(g) * u| (D-CountDown)."""
    if method_score == "gate":
        return act_g.abs()
    if method_score == "up":
        return u.abs()
    if method_score == "coef":
        return (act_g * u).abs()
    raise ValueError(f"unknown score {method_score!r}; supported: {list(SCORES)}")


def topk_mask(scores: torch.Tensor, keep: int) -> torch.Tensor:
    """Boolean mask keeping exactly `keep` largest scores along the last dim (ties: lowest index first)."""
    idx = torch.topk(scores.float(), keep, dim=-1, sorted=False).indices
    mask = torch.zeros(scores.shape, dtype=torch.bool, device=scores.device)
    return mask.scatter_(-1, idx, True)


def predictor_logits(x: torch.Tensor, pred_v: torch.Tensor, pred_u: torch.Tensor) -> torch.Tensor:
    """D-CountDown's low-rank predictor: (x V) U^T, V [d_model, r], U [d_inter, r]; fp32 logits."""
    return (x.float() @ pred_v.float()) @ pred_u.float().t()


def down(a: torch.Tensor, w_down_t: torch.Tensor, b_down=None) -> torch.Tensor:
    return F.linear(a, w_down_t.t(), b_down)


def masked_ffn(x, w_gate, w_up, w_down_t, b_gate, b_up, b_down, act, mask) -> torch.Tensor:
    """The FFN restricted to the neurons where mask is True (mask broadcastable to [..., d_inter]). A skipped
    neuron contributes exactly nothing, even where its act(g) * u overflows to inf or is NaN (the kernels never
    read its rows, so they cannot see it; a product with a 0/1 mask would turn inf into NaN)."""
    act_g, u = gate_up(x, w_gate, w_up, b_gate, b_up, act)
    return down(keep_only(act_g * u, mask), w_down_t, b_down)


def keep_only(a: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """a where mask is True, exactly 0 elsewhere (not a * mask: inf * 0 is NaN)."""
    return torch.where(mask, a, torch.zeros((), dtype=a.dtype, device=a.device))


def dense_ffn(x, w_gate, w_up, w_down_t, b_gate=None, b_up=None, b_down=None, act="silu") -> torch.Tensor:
    act_g, u = gate_up(x, w_gate, w_up, b_gate, b_up, act)
    return down(act_g * u, w_down_t, b_down)


def topk_ffn(x, w_gate, w_up, w_down_t, b_gate, b_up, b_down, act, method_score, sparsity) -> torch.Tensor:
    """SP-Ideal: per token, keep exactly keep_count(d_inter, s) neurons with the largest score."""
    act_g, u = gate_up(x, w_gate, w_up, b_gate, b_up, act)
    mask = topk_mask(score(method_score, act_g, u), keep_count(w_gate.shape[0], sparsity))
    return down(keep_only(act_g * u, mask), w_down_t, b_down)


def threshold_ffn(x, w_gate, w_up, w_down_t, b_gate, b_up, b_down, act, method_score, threshold) -> torch.Tensor:
    """SP-Prac for CATS / M-CountDown: keep neuron i when score_i > threshold (a per-site scalar)."""
    act_g, u = gate_up(x, w_gate, w_up, b_gate, b_up, act)
    mask = score(method_score, act_g, u).float() > threshold.float()
    return down(keep_only(act_g * u, mask), w_down_t, b_down)


def predictor_ffn(x, w_gate, w_up, w_down_t, b_gate, b_up, b_down, act, pred_v, pred_u, tau) -> torch.Tensor:
    """SP-Prac for D-CountDown: keep neuron i when its predicted logit > tau."""
    mask = predictor_logits(x, pred_v, pred_u) > tau.float()
    return masked_ffn(x, w_gate, w_up, w_down_t, b_gate, b_up, b_down, act, mask)


def selection_mask(x, w_gate, w_up, b_gate, b_up, act, method_score, *, sparsity=None, threshold=None,
                   pred_v=None, pred_u=None, tau=None) -> torch.Tensor:
    """The keep-mask any op above would use (for reports and tests): [..., d_inter] bool."""
    if pred_v is not None:
        return predictor_logits(x, pred_v, pred_u) > tau.float()
    act_g, u = gate_up(x, w_gate, w_up, b_gate, b_up, act)
    s = score(method_score, act_g, u)
    if threshold is not None:
        return s.float() > threshold.float()
    return topk_mask(s, keep_count(w_gate.shape[0], sparsity))
