"""Triton kernels for CountDown decode (1..16 tokens per step): sparse gated FFN, no host synchronisation.

Three launches per FFN call, all with shapes known on the host, so a CUDA graph captures them:

1. `_coef_kernel`, one program per block of BLOCK_N neurons and all tokens of the step:
   the dense side (up for M-CountDown, gate for CATS, both for the "coef" score, the low-rank predictor
   for D-CountDown) -> per-token keep mask -> union of the masks over the tokens -> the sparse side reads
   only the rows in the union (masked loads of inactive rows issue no memory traffic; a block whose union
   is empty runs no sparse loop at all) -> a = act(g) * u * keep, stored per token in the input dtype.
2. `_down_kernel`: y_partial[split] = a[:, rows] @ W_down^T[rows, :] over one slice of the neurons and
   one block of output columns; a row of W_down^T is read only when some token's a is non-zero (a zero
   coefficient contributes exactly zero, so skipping it is exact).
3. `_reduce_kernel`: sums the partials in a fixed order, adds b_down, casts. No atomics: the result is
   bitwise deterministic for the same inputs.

Each active row is read once for the whole batch while every token keeps its own coefficients, so the
output equals the per-token reference (`reference.threshold_ffn` / `reference.predictor_ffn`). Rounding
mirrors the reference: g and u are rounded to the input dtype, act() is computed in fp32 and rounded,
the product is rounded; dots accumulate in fp32 (IEEE fp32 dots for fp32 inputs, no tf32).
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

MAX_TOKENS = 16  # tokens per decode step the kernels handle (tl.dot pads the token dim to 16)
ACT_IDS = {"silu": 0, "gelu_tanh": 1, "gelu": 2, "relu": 3}
MODE_GATE, MODE_UP, MODE_COEF, MODE_PRED = 0, 1, 2, 3  # which side is dense / what the mask is
MODE_OF_SCORE = {"gate": MODE_GATE, "up": MODE_UP, "coef": MODE_COEF}


@triton.jit
def _act(g, ACT: tl.constexpr):
    if ACT == 0:
        return g * tl.sigmoid(g)
    elif ACT == 1:
        z = 0.7978845608028654 * (g + 0.044715 * g * g * g)
        e = tl.exp(-2.0 * tl.abs(z))  # tanh(|z|) = (1 - e) / (1 + e): no overflow for any z
        t = (1.0 - e) / (1.0 + e)
        return 0.5 * g * (1.0 + tl.where(z < 0, -t, t))
    elif ACT == 2:
        return 0.5 * g * (1.0 + tl.erf(g * 0.7071067811865476))
    else:
        return tl.maximum(g, 0.0)


@triton.jit
def _dot(a, b, PREC: tl.constexpr, UPCAST: tl.constexpr):
    """fp32-accumulated dot. UPCAST (CPU interpreter only): triton's interpreter computes 16-bit dots
    wrongly (seen with triton 3.9), and 16-bit values are exact in fp32, so upcasting changes nothing."""
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        return tl.dot(a, b, input_precision=PREC)


@triton.jit
def _cast(v, dtype: tl.constexpr, UPCAST: tl.constexpr):
    """fp32 -> dtype with round-to-nearest-even. UPCAST (CPU interpreter only): triton 3.9's interpreter
    truncates fp32 -> bf16, so round the bits by hand first (the cast that follows is then exact)."""
    if UPCAST and dtype == tl.bfloat16:
        bits = v.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        return bits.to(tl.float32, bitcast=True).to(dtype)
    else:
        return v.to(dtype)


@triton.jit
def _gemv(x_ptr, stride_xm, w_ptr, stride_w, offs_b, b_mask, offs_n, rows, D, k_end,
          BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr):
    """[BLOCK_B, BLOCK_N] fp32 = x[offs_b, :k_end] @ w[offs_n, :k_end]^T, reading only rows where `rows`."""
    acc = tl.zeros((BLOCK_B, BLOCK_N), dtype=tl.float32)
    for k in range(0, k_end, BLOCK_K):
        offs_k = k + tl.arange(0, BLOCK_K)
        k_mask = offs_k < D
        xt = tl.load(x_ptr + offs_b[:, None] * stride_xm + offs_k[None, :],
                     mask=b_mask[:, None] & k_mask[None, :], other=0.0)
        wt = tl.load(w_ptr + offs_n[:, None] * stride_w + offs_k[None, :],
                     mask=rows[:, None] & k_mask[None, :], other=0.0)
        acc += _dot(xt, tl.trans(wt), PREC, UPCAST)
    return acc


@triton.jit
def _gemv2(x_ptr, stride_xm, w1_ptr, stride_w1, w2_ptr, stride_w2, offs_b, b_mask, offs_n, rows, D, k_end,
           BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr):
    """Two GEMVs sharing x and the row set in one loop (twice the loads in flight per iteration)."""
    acc1 = tl.zeros((BLOCK_B, BLOCK_N), dtype=tl.float32)
    acc2 = tl.zeros((BLOCK_B, BLOCK_N), dtype=tl.float32)
    for k in range(0, k_end, BLOCK_K):
        offs_k = k + tl.arange(0, BLOCK_K)
        k_mask = offs_k < D
        xt = tl.load(x_ptr + offs_b[:, None] * stride_xm + offs_k[None, :],
                     mask=b_mask[:, None] & k_mask[None, :], other=0.0)
        wmask = rows[:, None] & k_mask[None, :]
        w1 = tl.load(w1_ptr + offs_n[:, None] * stride_w1 + offs_k[None, :], mask=wmask, other=0.0)
        w2 = tl.load(w2_ptr + offs_n[:, None] * stride_w2 + offs_k[None, :], mask=wmask, other=0.0)
        acc1 += _dot(xt, tl.trans(w1), PREC, UPCAST)
        acc2 += _dot(xt, tl.trans(w2), PREC, UPCAST)
    return acc1, acc2


@triton.jit
def _coef_kernel(x_ptr, wg_ptr, wu_ptr, bg_ptr, bu_ptr, h_ptr, pu_ptr, thr_ptr, a_ptr,
                 M, D, N, R, stride_xm, stride_wg, stride_wu, stride_h, stride_pu, stride_am,
                 MODE: tl.constexpr, ACT: tl.constexpr, HAS_BG: tl.constexpr, HAS_BU: tl.constexpr,
                 BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
                 PREC: tl.constexpr, UPCAST: tl.constexpr):
    pid = tl.program_id(0)
    offs_b = tl.arange(0, BLOCK_B)
    offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    b_mask = offs_b < M
    n_mask = offs_n < N
    valid = b_mask[:, None] & n_mask[None, :]
    thr = tl.load(thr_ptr).to(tl.float32)
    out_dtype = a_ptr.dtype.element_ty

    bg = tl.zeros((BLOCK_N,), dtype=tl.float32)
    bu = tl.zeros((BLOCK_N,), dtype=tl.float32)
    if HAS_BG:
        bg = tl.load(bg_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)
    if HAS_BU:
        bu = tl.load(bu_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)

    if MODE == 3:
        # D-CountDown: logits = h @ U^T with h = x V (fp32, from _lowrank_kernel); all of it dense, fp32.
        logits = tl.zeros((BLOCK_B, BLOCK_N), dtype=tl.float32)
        for r in range(0, R, BLOCK_R):
            offs_r = r + tl.arange(0, BLOCK_R)
            r_mask = offs_r < R
            ht = tl.load(h_ptr + offs_b[:, None] * stride_h + offs_r[None, :],
                         mask=b_mask[:, None] & r_mask[None, :], other=0.0)
            ut = tl.load(pu_ptr + offs_n[:, None] * stride_pu + offs_r[None, :],
                         mask=n_mask[:, None] & r_mask[None, :], other=0.0).to(tl.float32)
            logits += tl.dot(ht, tl.trans(ut), input_precision="ieee")
        keep = (logits > thr) & valid
        union = tl.max(keep.to(tl.int32), axis=0) > 0
        k_end = tl.where(tl.max(union.to(tl.int32), axis=0) > 0, D, 0)
        g, u = _gemv2(x_ptr, stride_xm, wg_ptr, stride_wg, wu_ptr, stride_wu, offs_b, b_mask, offs_n, union,
                      D, k_end, BLOCK_B, BLOCK_N, BLOCK_K, PREC, UPCAST)
        g = _cast(g + bg[None, :], out_dtype, UPCAST).to(tl.float32)
        u = _cast(u + bu[None, :], out_dtype, UPCAST).to(tl.float32)
        a = _cast(_cast(_act(g, ACT), out_dtype, UPCAST).to(tl.float32) * u, out_dtype, UPCAST)
    elif MODE == 2:
        # threshold on |act(g) * u|: both projections dense, only the down projection is sparse.
        g, u = _gemv2(x_ptr, stride_xm, wg_ptr, stride_wg, wu_ptr, stride_wu, offs_b, b_mask, offs_n, n_mask,
                      D, D, BLOCK_B, BLOCK_N, BLOCK_K, PREC, UPCAST)
        g = _cast(g + bg[None, :], out_dtype, UPCAST).to(tl.float32)
        u = _cast(u + bu[None, :], out_dtype, UPCAST).to(tl.float32)
        a = _cast(_cast(_act(g, ACT), out_dtype, UPCAST).to(tl.float32) * u, out_dtype, UPCAST)
        keep = (tl.abs(a.to(tl.float32)) > thr) & valid
    elif MODE == 1:
        # M-CountDown: dense up, keep |u| > t, gather the gate rows of the union.
        u = _gemv(x_ptr, stride_xm, wu_ptr, stride_wu, offs_b, b_mask, offs_n, n_mask, D, D,
                  BLOCK_B, BLOCK_N, BLOCK_K, PREC, UPCAST)
        u = _cast(u + bu[None, :], out_dtype, UPCAST).to(tl.float32)
        keep = (tl.abs(u) > thr) & valid
        union = tl.max(keep.to(tl.int32), axis=0) > 0
        k_end = tl.where(tl.max(union.to(tl.int32), axis=0) > 0, D, 0)
        g = _gemv(x_ptr, stride_xm, wg_ptr, stride_wg, offs_b, b_mask, offs_n, union, D, k_end,
                  BLOCK_B, BLOCK_N, BLOCK_K, PREC, UPCAST)
        g = _cast(g + bg[None, :], out_dtype, UPCAST).to(tl.float32)
        a = _cast(_cast(_act(g, ACT), out_dtype, UPCAST).to(tl.float32) * u, out_dtype, UPCAST)
    else:
        # CATS: dense gate, keep |act(g)| > t, gather the up rows of the union.
        g = _gemv(x_ptr, stride_xm, wg_ptr, stride_wg, offs_b, b_mask, offs_n, n_mask, D, D,
                  BLOCK_B, BLOCK_N, BLOCK_K, PREC, UPCAST)
        g = _cast(g + bg[None, :], out_dtype, UPCAST).to(tl.float32)
        ag = _cast(_act(g, ACT), out_dtype, UPCAST).to(tl.float32)
        keep = (tl.abs(ag) > thr) & valid
        union = tl.max(keep.to(tl.int32), axis=0) > 0
        k_end = tl.where(tl.max(union.to(tl.int32), axis=0) > 0, D, 0)
        u = _gemv(x_ptr, stride_xm, wu_ptr, stride_wu, offs_b, b_mask, offs_n, union, D, k_end,
                  BLOCK_B, BLOCK_N, BLOCK_K, PREC, UPCAST)
        u = _cast(u + bu[None, :], out_dtype, UPCAST).to(tl.float32)
        a = _cast(ag * u, out_dtype, UPCAST)

    a = tl.where(keep, a, 0.0).to(out_dtype)
    tl.store(a_ptr + offs_b[:, None] * stride_am + offs_n[None, :], a, mask=valid)


@triton.jit
def _lowrank_kernel(x_ptr, v_ptr, h_ptr, M, D, R, stride_xm, stride_v, stride_h,
                    BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr):
    """h = x V in fp32 (the predictor's first factor; V is [d_model, r], tiny next to the FFN)."""
    pid = tl.program_id(0)
    offs_b = tl.arange(0, BLOCK_B)
    offs_r = pid * BLOCK_R + tl.arange(0, BLOCK_R)
    b_mask = offs_b < M
    r_mask = offs_r < R
    acc = tl.zeros((BLOCK_B, BLOCK_R), dtype=tl.float32)
    for k in range(0, D, BLOCK_K):
        offs_k = k + tl.arange(0, BLOCK_K)
        k_mask = offs_k < D
        xt = tl.load(x_ptr + offs_b[:, None] * stride_xm + offs_k[None, :],
                     mask=b_mask[:, None] & k_mask[None, :], other=0.0).to(tl.float32)
        vt = tl.load(v_ptr + offs_k[:, None] * stride_v + offs_r[None, :],
                     mask=k_mask[:, None] & r_mask[None, :], other=0.0).to(tl.float32)
        acc += tl.dot(xt, vt, input_precision="ieee")
    tl.store(h_ptr + offs_b[:, None] * stride_h + offs_r[None, :], acc, mask=b_mask[:, None] & r_mask[None, :])


@triton.jit
def _down_kernel(a_ptr, w_ptr, part_ptr, M, N, D, rows_per_split, stride_am, stride_w,
                 BLOCK_B: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr):
    """part[split, :, cols] = a[:, rows of split] @ W_down^T[rows of split, cols], skipping all-zero rows."""
    pid_d = tl.program_id(0)
    pid_s = tl.program_id(1)
    offs_b = tl.arange(0, BLOCK_B)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    b_mask = offs_b < M
    d_mask = offs_d < D
    row_start = pid_s * rows_per_split
    row_end = tl.minimum(row_start + rows_per_split, N)
    acc = tl.zeros((BLOCK_B, BLOCK_D), dtype=tl.float32)
    for r in range(row_start, row_end, BLOCK_R):
        offs_r = r + tl.arange(0, BLOCK_R)
        r_mask = offs_r < row_end
        at = tl.load(a_ptr + offs_b[:, None] * stride_am + offs_r[None, :],
                     mask=b_mask[:, None] & r_mask[None, :], other=0.0)
        active = tl.max((at != 0).to(tl.int32), axis=0) > 0  # != 0 keeps NaN rows, as the reference does
        wt = tl.load(w_ptr + offs_r[:, None] * stride_w + offs_d[None, :],
                     mask=active[:, None] & d_mask[None, :], other=0.0)
        acc += _dot(at, wt, PREC, UPCAST)
    tl.store(part_ptr + (pid_s * M + offs_b[:, None]) * D + offs_d[None, :], acc,
             mask=b_mask[:, None] & d_mask[None, :])


@triton.jit
def _reduce_kernel(part_ptr, bd_ptr, y_ptr, M, D, n_split, stride_ym,
                   HAS_BD: tl.constexpr, BLOCK_D: tl.constexpr, UPCAST: tl.constexpr):
    """y[b] = sum over splits (fixed order) + b_down, cast to the output dtype."""
    pid_b = tl.program_id(0)
    offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    d_mask = offs_d < D
    acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
    for s in range(0, n_split):
        acc += tl.load(part_ptr + (s * M + pid_b) * D + offs_d, mask=d_mask, other=0.0)
    if HAS_BD:
        acc += tl.load(bd_ptr + offs_d, mask=d_mask, other=0.0).to(tl.float32)
    tl.store(y_ptr + pid_b * stride_ym + offs_d, _cast(acc, y_ptr.dtype.element_ty, UPCAST), mask=d_mask)


# ------------------------------------------------------------------------------------------------ launch

@functools.lru_cache(maxsize=None)
def _num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        return _num_sms(device.index if device.index is not None else torch.cuda.current_device())
    return 4  # interpreter (CPU tests): few programs keep it fast


def _prec(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"  # "tf32" is ignored for 16-bit operands


# Launch configuration. Chosen from benchmarks/speed/ffn_decode.py sweeps on an H100 (see NOTES.md).
CONFIG = {
    "coef": dict(BLOCK_N=32, BLOCK_K=256, num_warps=4, num_stages=3),
    "down": dict(BLOCK_R=32, BLOCK_D=128, num_warps=4, num_stages=3, programs_per_sm=4),
}


def _rows(w: torch.Tensor) -> torch.Tensor:
    """Kernels need unit stride along d_model; row slices of a fused gate_up weight already have it."""
    return w if w.stride(-1) == 1 else w.contiguous()


def sparse_ffn(x2d: torch.Tensor, w_gate, w_up, w_down_t, b_gate, b_up, b_down, activation: str,
               mode: int, thr: torch.Tensor, pred_v=None, pred_u=None, config=None, return_coef=False):
    """The decode FFN for x2d [M <= 16, d_model]; returns y [M, d_model] in x's dtype (and the masked
    coefficients a [M, d_inter] with return_coef, for tests). `mode` is MODE_GATE / MODE_UP / MODE_COEF
    (score > thr) or MODE_PRED (predictor logit > thr). thr: a one-element tensor on x's device."""
    cfg = {k: dict(v) for k, v in CONFIG.items()}
    for k, v in (config or {}).items():
        cfg[k].update(v)
    M, D = x2d.shape
    N = w_gate.shape[0]
    assert 1 <= M <= MAX_TOKENS, M
    x2d = _rows(x2d)
    w_gate, w_up, w_down_t = _rows(w_gate), _rows(w_up), _rows(w_down_t)
    dtype = x2d.dtype
    prec = _prec(dtype)
    upcast = x2d.device.type == "cpu"  # only the interpreter runs these kernels on CPU tensors
    BLOCK_B = 16
    dummy = x2d  # stands for absent optional pointers (never read: HAS_* flags are off)

    a = torch.empty((M, N), dtype=dtype, device=x2d.device)
    h = dummy
    R = 0
    stride_h = stride_pu = 0
    if mode == MODE_PRED:
        R = pred_v.shape[1]
        pred_u = _rows(pred_u)
        h = torch.empty((M, R), dtype=torch.float32, device=x2d.device)
        BLOCK_RV = 64
        wrap_triton(_lowrank_kernel)[(triton.cdiv(R, BLOCK_RV),)](
            x2d, pred_v, h, M, D, R, x2d.stride(0), pred_v.stride(0), h.stride(0),
            BLOCK_B=BLOCK_B, BLOCK_K=64, BLOCK_R=BLOCK_RV, num_warps=4, num_stages=2)
        stride_h, stride_pu = h.stride(0), pred_u.stride(0)

    c = cfg["coef"]
    block_k = c["BLOCK_K"] if dtype != torch.float32 else min(c["BLOCK_K"], 128)
    wrap_triton(_coef_kernel)[(triton.cdiv(N, c["BLOCK_N"]),)](
        x2d, w_gate, w_up,
        b_gate if b_gate is not None else dummy, b_up if b_up is not None else dummy,
        h, pred_u if pred_u is not None else dummy, thr, a,
        M, D, N, R, x2d.stride(0), w_gate.stride(0), w_up.stride(0), stride_h, stride_pu, a.stride(0),
        MODE=mode, ACT=ACT_IDS[activation], HAS_BG=b_gate is not None, HAS_BU=b_up is not None,
        BLOCK_B=BLOCK_B, BLOCK_N=c["BLOCK_N"], BLOCK_K=block_k, BLOCK_R=64, PREC=prec, UPCAST=upcast,
        num_warps=c["num_warps"], num_stages=c["num_stages"])

    c = cfg["down"]
    col_blocks = triton.cdiv(D, c["BLOCK_D"])
    want_splits = max(1, c["programs_per_sm"] * _sm_count(x2d.device) // col_blocks)
    rows_per_split = triton.cdiv(triton.cdiv(N, want_splits), c["BLOCK_R"]) * c["BLOCK_R"]
    n_split = triton.cdiv(N, rows_per_split)
    part = torch.empty((n_split, M, D), dtype=torch.float32, device=x2d.device)
    wrap_triton(_down_kernel)[(col_blocks, n_split)](
        a, w_down_t, part, M, N, D, rows_per_split, a.stride(0), w_down_t.stride(0),
        BLOCK_B=BLOCK_B, BLOCK_R=c["BLOCK_R"], BLOCK_D=c["BLOCK_D"], PREC=prec, UPCAST=upcast,
        num_warps=c["num_warps"], num_stages=c["num_stages"])

    y = torch.empty((M, D), dtype=dtype, device=x2d.device)
    BLOCK_DR = 256
    wrap_triton(_reduce_kernel)[(M, triton.cdiv(D, BLOCK_DR))](
        part, b_down if b_down is not None else dummy, y, M, D, n_split, y.stride(0),
        HAS_BD=b_down is not None, BLOCK_D=BLOCK_DR, UPCAST=upcast, num_warps=4)
    return (y, a) if return_coef else y
