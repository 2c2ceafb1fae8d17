"""Triton kernels for CountDown decode (1..16 tokens per step): sparse gated FFN, no host synchronisation.

Two launches per FFN call (one more with the "gather" sparse side, `_gather_kernel`; for D-CountDown's
h = x V first either `_lowrank_no_dot_kernel`, for 1-2 tokens with V stored transposed, or `_lowrank_kernel` over
chunks of d_model and, when d_model spans more than one chunk, `_reduce_kernel` to sum them), all with grids
known on the host, so a CUDA graph captures them:

1. `_coef_kernel`, one program per block of BLOCK_N neurons and all tokens of the step:
   the dense side (up for M-CountDown, gate for CATS, both for the "coef" score, the low-rank predictor
   for D-CountDown) -> per-token keep mask -> union of the masks over the tokens -> the sparse side reads
   only the rows in the union (masked loads of inactive rows issue no memory traffic; a block whose union
   is empty runs no sparse loop at all) -> a = act(g) * u * keep, stored per token in the input dtype,
   and the union as a compacted row list per block.
2. `_down_kernel`: a[:, rows] @ W_down^T[rows, :] over one share of the rows and one block of output
   columns; only rows of the union are read. A sparse union is walked through the compacted row lists
   (full tiles of active rows, balanced shares); a dense one through direct addresses with inactive rows
   masked off, which at full density is a dense GEMV (the dense fallback, decided on the device from the
   union's size). The shares add their fp32 partials with atomics, and the last share of each column
   block to arrive adds b_down, casts and stores y: the order of those additions varies, so the last bits
   of y may vary from call to call (CONFIG["sum_splits"] "atomic", the default).
3. Deterministic path, taken under torch.use_deterministic_algorithms(True) (or sum_splits "reduce"): each
   share stores its partial and `_reduce_kernel` sums them in a fixed order, adds b_down and casts: the
   same bits for the same inputs, for one launch more (~1.5-5 us, NOTES.md "atomic sums").
4. CONFIG["pdl"] (off by default): programmatic dependent launch. Each kernel waits for its predecessor's
   writes in its first lines, then lets the next launch start (_pdl_start); the launch attribute comes from
   triton on eager calls and from pdl_launch.py's hook under Inductor (not with triton <= 3.6, whose wait torch
   cannot analyse: pdl_launch.enabled). On the H100 it saved D ~2 µs per call and cost M 1-20 µs (NOTES.md, "PDL").

Each active row is read once for the whole batch while every token keeps its own coefficients, so the
output equals the per-token reference (`reference.threshold_ffn` / `reference.predictor_ffn`). Rounding
mirrors the reference: g and u are rounded to the input dtype, act() is computed in fp32 and rounded,
the product is rounded; dots accumulate in fp32 (fp32 inputs: 3xTF32 dots on the GPU, fp32-grade).
"""

from __future__ import annotations

import functools
import warnings

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

from . import pdl_launch

try:  # whether wrap_triton launches go straight to triton (an eager call of the op) or through tracing
    from torch._library.triton import is_wrap_triton_enabled
except ImportError:  # a torch without the switch: take every launch as traced (no launch_pdl keyword)
    def is_wrap_triton_enabled() -> bool:
        return True

MAX_TOKENS = 16  # tokens per decode step the kernels handle (tl.dot pads the token dim to 16)
ACT_IDS = {"silu": 0, "gelu_tanh": 1, "gelu": 2, "relu": 3}
MODE_GATE, MODE_UP, MODE_COEF, MODE_PRED = 0, 1, 2, 3  # which side is dense / what the mask is
MODE_OF_SCORE = {"gate": MODE_GATE, "up": MODE_UP, "coef": MODE_COEF}
SIDES = {"masked": 0, "gather": 1}  # where the sparse side of gate/up runs (CONFIG["sparse_side"])
SUM_SPLITS = ("reduce", "atomic")  # how the down launch's shares are summed (CONFIG["sum_splits"])


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
def _dot_f32(a, b, UPCAST: tl.constexpr):
    """fp32 x fp32 dot: 3xTF32 on the GPU (fp32-grade accuracy on tensor cores; an IEEE fp32 dot runs on
    FMA units and measured ~100 us for the predictor alone), IEEE in the interpreter."""
    if UPCAST:
        return tl.dot(a, b, input_precision="ieee")
    else:
        return tl.dot(a, b, input_precision="tf32x3")


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
def _pdl_start(PDL: tl.constexpr):
    """First thing in every kernel with PDL (CONFIG["pdl"], programmatic dependent launch): wait until the previous
    launch has finished and its writes are visible, before this program loads or stores anything, then let the
    next launch start (its programs wait in their own first lines, or, for a kernel launched without PDL, the
    launch waits for this one to end). Waiting first keeps the stream's order for every kernel after this one,
    Inductor's own PDL kernels included, which wait only for the accesses they share with their predecessor.
    Both are no-ops for a launch without the PDL attribute (pdl_launch.py gives it under Inductor)."""
    if PDL:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()


@triton.jit
def _gemv(x_ptr, stride_xm, w_ptr, stride_w, offs_b, b_mask, offs_n, rows, D, k_end,
          BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr,
          F32: tl.constexpr = False):
    """[BLOCK_B, BLOCK_N] fp32 = x[offs_b, :k_end] @ w[offs_n, :k_end]^T, reading only rows where `rows`.
    F32: x is fp32 (the predictor's h) and w is upcast to it, for an fp32-grade dot (_dot_f32)."""
    acc = tl.zeros((BLOCK_B, BLOCK_N), dtype=tl.float32)
    for k in range(0, k_end, BLOCK_K):
        offs_k = k + tl.arange(0, BLOCK_K)
        k_mask = offs_k < D
        xt = tl.load(x_ptr + offs_b[:, None] * stride_xm + offs_k[None, :],
                     mask=b_mask[:, None] & k_mask[None, :], other=0.0)
        wt = tl.load(w_ptr + offs_n[:, None] * stride_w + offs_k[None, :],
                     mask=rows[:, None] & k_mask[None, :], other=0.0)
        if F32:
            acc += _dot_f32(xt, tl.trans(wt.to(tl.float32)), UPCAST)
        else:
            acc += _dot(xt, tl.trans(wt), PREC, UPCAST)
    return acc


@triton.jit
def _proj(x_ptr, stride_xm, w_ptr, stride_w, bias, offs_b, b_mask, offs_n, rows, D, k_end, out_dtype: tl.constexpr,
          BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PREC: tl.constexpr,
          UPCAST: tl.constexpr):
    """x @ w[offs_n]^T + bias over the rows where `rows`, rounded to out_dtype and back to fp32, as the
    reference rounds g and u."""
    acc = _gemv(x_ptr, stride_xm, w_ptr, stride_w, offs_b, b_mask, offs_n, rows, D, k_end,
                BLOCK_B, BLOCK_N, BLOCK_K, PREC, UPCAST)
    return _cast(acc + bias[None, :], out_dtype, UPCAST).to(tl.float32)


@triton.jit
def _gated(x_ptr, stride_xm, wg_ptr, stride_wg, wu_ptr, stride_wu, bg, bu, offs_b, b_mask, offs_n, rows, D, k_end,
           out_dtype: tl.constexpr, ACT: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr,
           BLOCK_K: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr):
    """a = act(g) * u for the rows where `rows` (g, u, act(g) and the product rounded to out_dtype, as in the
    reference), both projections read in the coef kernel."""
    g = _proj(x_ptr, stride_xm, wg_ptr, stride_wg, bg, offs_b, b_mask, offs_n, rows, D, k_end, out_dtype,
              BLOCK_B, BLOCK_N, BLOCK_K, PREC, UPCAST)
    u = _proj(x_ptr, stride_xm, wu_ptr, stride_wu, bu, offs_b, b_mask, offs_n, rows, D, k_end, out_dtype,
              BLOCK_B, BLOCK_N, BLOCK_K, PREC, UPCAST)
    return _cast(_cast(_act(g, ACT), out_dtype, UPCAST).to(tl.float32) * u, out_dtype, UPCAST)


@triton.jit
def _gemv_no_dot(x_ptr, stride_xm, w_ptr, stride_w, rows, r_mask, M, D,
                 BLOCK_B: tl.constexpr, BLOCK_RG: tl.constexpr, BLOCK_K: tl.constexpr):
    """[BLOCK_B, BLOCK_RG] fp32 = x[:M, :D] @ w[rows, :D]^T without tl.dot (_gemv_no_dot_pair with one weight)."""
    acc, _ = _gemv_no_dot_pair(x_ptr, stride_xm, w_ptr, stride_w, w_ptr, stride_w, rows, r_mask, M, D,
                               BLOCK_B, BLOCK_RG, BLOCK_K, PAIR=False)
    return acc


@triton.jit
def _gemv_no_dot_pair(x_ptr, stride_xm, wa_ptr, stride_wa, wb_ptr, stride_wb, rows, r_mask, M, D,
                      BLOCK_B: tl.constexpr, BLOCK_RG: tl.constexpr, BLOCK_K: tl.constexpr, PAIR: tl.constexpr = True):
    """x[:M, :D] @ wa[rows, :D]^T and, with PAIR, x @ wb[rows, :D]^T ([BLOCK_B, BLOCK_RG] fp32 each; without PAIR
    the second is zeros and wb is never read) without tl.dot, for a step of a few tokens (BLOCK_B >= M, a power of
    two, as small as 1): fp32 products and sums on the FMA units, one token at a time over each weight tile. A
    dot pads the tokens to 16 rows and needs 16 rows of w per tile, which leaves a small union in too few programs
    (latency-bound, NOTES.md "one-token gather", "few-token gather"). With PAIR both tiles' loads are in flight
    together, so a program's chain of dependent memory round trips is half as long (D-CountDown's gate and up).
    x may be fp32 (the predictor's h) or the weights' dtype."""
    offs_b = tl.arange(0, BLOCK_B)
    acc_a = tl.zeros((BLOCK_B, BLOCK_RG), dtype=tl.float32)
    acc_b = tl.zeros((BLOCK_B, BLOCK_RG), dtype=tl.float32)
    for k in range(0, D, BLOCK_K):
        offs_k = k + tl.arange(0, BLOCK_K)
        k_mask = offs_k < D
        tile_mask = r_mask[:, None] & k_mask[None, :]
        wa = tl.load(wa_ptr + rows[:, None] * stride_wa + offs_k[None, :], mask=tile_mask, other=0.0).to(tl.float32)
        if PAIR:
            wb = tl.load(wb_ptr + rows[:, None] * stride_wb + offs_k[None, :], mask=tile_mask, other=0.0).to(tl.float32)
        for t in tl.static_range(BLOCK_B):
            # t < M as a tensor: triton's interpreter takes no scalar mask
            xt = tl.load(x_ptr + t * stride_xm + offs_k, mask=k_mask & (offs_k * 0 + t < M), other=0.0).to(tl.float32)
            acc_a = tl.where(offs_b[:, None] == t, acc_a + tl.sum(wa * xt[None, :], axis=1)[None, :], acc_a)
            if PAIR:
                acc_b = tl.where(offs_b[:, None] == t, acc_b + tl.sum(wb * xt[None, :], axis=1)[None, :], acc_b)
    return acc_a, acc_b


@triton.jit
def _rows_gemv(x_ptr, stride_xm, w_ptr, stride_w, offs_b, b_mask, rows, r_mask, M, D,
               BLOCK_B: tl.constexpr, BLOCK_RG: tl.constexpr, BLOCK_K: tl.constexpr, NO_DOT: tl.constexpr,
               PREC: tl.constexpr, UPCAST: tl.constexpr):
    if NO_DOT:
        acc = _gemv_no_dot(x_ptr, stride_xm, w_ptr, stride_w, rows, r_mask, M, D, BLOCK_B, BLOCK_RG, BLOCK_K)
    else:
        acc = _gemv(x_ptr, stride_xm, w_ptr, stride_w, offs_b, b_mask, rows, r_mask, D, D,
                    BLOCK_B, BLOCK_RG, BLOCK_K, PREC, UPCAST)
    return acc


@triton.jit
def _coef_kernel(x_ptr, wg_ptr, wu_ptr, bg_ptr, bu_ptr, h_ptr, pu_ptr, thr_ptr, a_ptr, idx_ptr, cnt_ptr, dv_ptr,
                 ws_ptr, M, D, N, R, n_ws, stride_xm, stride_wg, stride_wu, stride_h, stride_pu, stride_am, stride_dv,
                 MODE: tl.constexpr, ACT: tl.constexpr, HAS_BG: tl.constexpr, HAS_BU: tl.constexpr,
                 BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
                 PREC: tl.constexpr, UPCAST: tl.constexpr, SIDE: tl.constexpr, NO_DOT: tl.constexpr, PDL: tl.constexpr):
    """SIDE 0 ("masked"): the sparse side here, with masked row loads. SIDE 1 ("gather"): leave it to
    _gather_kernel: store the dense-side value (u, act(g) or the logit) in dv and zeros in a outside the
    union; the gather kernel walks the compacted union rows. NO_DOT (D-CountDown on the gather side, a few
    tokens, BLOCK_B >= M as small as 1): the logits as fp32 FMA sums over the rank instead of tl.dot, which
    pads the tokens to 16 rows. Also zeroes the n_ws floats of ws (the atomic sums and arrival counts of
    _down_kernel with SUM_SPLITS "atomic"; n_ws is 0 otherwise)."""
    _pdl_start(PDL)
    tl.static_assert(SIDE == 1 or not NO_DOT, "NO_DOT token tiles are below tl.dot's 16 rows: gather side only")
    pid = tl.program_id(0)
    for z in range(pid * BLOCK_N, n_ws, tl.num_programs(0) * BLOCK_N):
        offs_z = z + tl.arange(0, BLOCK_N)
        tl.store(ws_ptr + offs_z, tl.zeros((BLOCK_N,), dtype=tl.float32), mask=offs_z < n_ws)
    offs_b = tl.arange(0, BLOCK_B)
    offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    b_mask = offs_b < M
    n_mask = offs_n < N
    valid = b_mask[:, None] & n_mask[None, :]
    thr = tl.load(thr_ptr).to(tl.float32)
    out_dtype = a_ptr.dtype.element_ty

    bg = tl.zeros((BLOCK_N,), dtype=tl.float32)
    bu = tl.zeros((BLOCK_N,), dtype=tl.float32)
    if MODE != 3 or SIDE == 0:  # D-CountDown's gather side computes no projection here: no bias to read
        if HAS_BG:
            bg = tl.load(bg_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)
        if HAS_BU:
            bu = tl.load(bu_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)

    if MODE == 3:
        # D-CountDown: logits = h @ U^T with h = x V (fp32, from the h launch before this one); dense, fp32.
        if NO_DOT:
            logits = _gemv_no_dot(h_ptr, stride_h, pu_ptr, stride_pu, offs_n, n_mask, M, R, BLOCK_B, BLOCK_N, BLOCK_R)
        else:
            logits = _gemv(h_ptr, stride_h, pu_ptr, stride_pu, offs_b, b_mask, offs_n, n_mask, R, R,
                           BLOCK_B, BLOCK_N, BLOCK_R, PREC, UPCAST, F32=True)
        keep = (logits > thr) & valid
        dv = logits
        if SIDE == 0:
            union = tl.max(keep.to(tl.int32), axis=0) > 0
            a = _gated(x_ptr, stride_xm, wg_ptr, stride_wg, wu_ptr, stride_wu, bg, bu, offs_b, b_mask, offs_n, union,
                       D, _sparse_k_end(union, D), out_dtype, ACT, BLOCK_B, BLOCK_N, BLOCK_K, PREC, UPCAST)
        else:  # _gather_kernel computes a; no tl.dot here, so BLOCK_B may be below 16 (NO_DOT)
            a = tl.zeros((BLOCK_B, BLOCK_N), dtype=out_dtype)
    elif MODE == 2:
        # threshold on |act(g) * u|: both projections dense, only the down projection is sparse.
        a = _gated(x_ptr, stride_xm, wg_ptr, stride_wg, wu_ptr, stride_wu, bg, bu, offs_b, b_mask, offs_n, n_mask,
                   D, D, out_dtype, ACT, BLOCK_B, BLOCK_N, BLOCK_K, PREC, UPCAST)
        keep = (tl.abs(a.to(tl.float32)) > thr) & valid
    elif MODE == 1:
        # M-CountDown: dense up, keep |u| > t, gather the gate rows of the union.
        u = _proj(x_ptr, stride_xm, wu_ptr, stride_wu, bu, offs_b, b_mask, offs_n, n_mask, D, D, out_dtype,
                  BLOCK_B, BLOCK_N, BLOCK_K, PREC, UPCAST)
        keep = (tl.abs(u) > thr) & valid
        dv = u
        if SIDE == 0:
            union = tl.max(keep.to(tl.int32), axis=0) > 0
            g = _proj(x_ptr, stride_xm, wg_ptr, stride_wg, bg, offs_b, b_mask, offs_n, union, D,
                      _sparse_k_end(union, D), out_dtype, BLOCK_B, BLOCK_N, BLOCK_K, PREC, UPCAST)
            a = _cast(_cast(_act(g, ACT), out_dtype, UPCAST).to(tl.float32) * u, out_dtype, UPCAST)
        else:
            a = tl.zeros((BLOCK_B, BLOCK_N), dtype=out_dtype)
    else:
        # CATS: dense gate, keep |act(g)| > t, gather the up rows of the union.
        g = _proj(x_ptr, stride_xm, wg_ptr, stride_wg, bg, offs_b, b_mask, offs_n, n_mask, D, D, out_dtype,
                  BLOCK_B, BLOCK_N, BLOCK_K, PREC, UPCAST)
        ag = _cast(_act(g, ACT), out_dtype, UPCAST).to(tl.float32)
        keep = (tl.abs(ag) > thr) & valid
        dv = ag
        if SIDE == 0:
            union = tl.max(keep.to(tl.int32), axis=0) > 0
            u = _proj(x_ptr, stride_xm, wu_ptr, stride_wu, bu, offs_b, b_mask, offs_n, union, D,
                      _sparse_k_end(union, D), out_dtype, BLOCK_B, BLOCK_N, BLOCK_K, PREC, UPCAST)
            a = _cast(ag * u, out_dtype, UPCAST)
        else:
            a = tl.zeros((BLOCK_B, BLOCK_N), dtype=out_dtype)

    a = tl.where(keep, a, 0.0).to(out_dtype)
    used = (tl.max(keep.to(tl.int32), axis=0) > 0).to(tl.int32)
    n_used = tl.sum(used, axis=0)
    if SIDE == 0 or MODE == 2:
        tl.store(a_ptr + offs_b[:, None] * stride_am + offs_n[None, :], a, mask=valid)
    else:  # the gather kernel writes a for the union's rows; zeros elsewhere
        tl.store(dv_ptr + offs_b[:, None] * stride_dv + offs_n[None, :], dv, mask=valid)
        tl.store(a_ptr + offs_b[:, None] * stride_am + offs_n[None, :], a, mask=valid & (used == 0)[None, :])
    # The union, compacted per block: the gather and down kernels walk only these rows.
    # `used` first takes a round trip through this block's own idx slots. torch.export / AOTInductor find
    # what a kernel writes by walking back from each store's address through everything it depends on,
    # and through a helper call (_gemv) into all of the helper's pointers: scattering at positions that
    # depend on _gemv's output would mark x and the weights as written (inputs the program mutates). A
    # load ends that walk. (tests/kernels/test_kernel_writes.py checks every kernel's written arguments.)
    slots = idx_ptr + pid * BLOCK_N + tl.arange(0, BLOCK_N)
    tl.store(slots, used)
    tl.debug_barrier()
    used = tl.load(slots)
    tl.debug_barrier()
    pos = tl.cumsum(used, axis=0) - 1
    tl.store(idx_ptr + pid * BLOCK_N + pos, offs_n, mask=used > 0)
    tl.store(cnt_ptr + pid, n_used)


@triton.jit
def _sparse_k_end(union, D):
    """How far the coef kernel's masked sparse loop runs: D, or 0 when its block's union is empty."""
    n_used = tl.sum(union.to(tl.int32), axis=0)
    return tl.where(n_used > 0, D, 0)


@triton.jit
def _union_rows(idx_ptr, cnt_ptr, cum, offs_k, k_mask, BLOCK_N: tl.constexpr):
    """Rows of the union at global compacted positions offs_k (cum: inclusive prefix of block counts)."""
    before = cum[None, :] <= offs_k[:, None]  # [len(offs_k), n_blocks]: blocks entirely before entry k
    blk = tl.sum(before.to(tl.int32), axis=1)
    first = tl.max(tl.where(before, cum[None, :], 0), axis=1)  # compacted index of blk's first row
    return tl.load(idx_ptr + blk * BLOCK_N + (offs_k - first), mask=k_mask, other=0)


@triton.jit
def _gather_kernel(x_ptr, wg_ptr, wu_ptr, bg_ptr, bu_ptr, dv_ptr, thr_ptr, a_ptr, idx_ptr, cnt_ptr,
                   flat_ptr, M, D, NB, stride_xm, stride_wg, stride_wu, stride_dv, stride_am,
                   MODE: tl.constexpr, ACT: tl.constexpr, HAS_BG: tl.constexpr, HAS_BU: tl.constexpr,
                   BLOCK_B: tl.constexpr, BLOCK_RG: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr,
                   NB_P2: tl.constexpr, NO_DOT: tl.constexpr, FUSED: tl.constexpr, PREC: tl.constexpr,
                   UPCAST: tl.constexpr, PDL: tl.constexpr):
    """The sparse side over the compacted union rows of _coef_kernel (cnt_ptr: its per-block counts):
    each step takes BLOCK_RG active rows (full tiles, no masked-off rows) and all of d_model, then forms
    a = act(g) * u * keep for every token. It also leaves the union's rows as one flat list (flat_ptr), so
    _down_kernel need not search the per-block lists. FUSED: D-CountDown's FMA path reads gate and up in one loop."""
    _pdl_start(PDL)
    tl.static_assert(not FUSED or (MODE == 3 and NO_DOT), "FUSED is D-CountDown's FMA gather only")
    pid = tl.program_id(0)
    n_prog = tl.num_programs(0)
    offs_b = tl.arange(0, BLOCK_B)
    b_mask = offs_b < M
    offs_blk = tl.arange(0, NB_P2)
    cnts = tl.load(cnt_ptr + offs_blk, mask=offs_blk < NB, other=0)
    cum = tl.cumsum(cnts, axis=0)
    total = tl.sum(cnts, axis=0)
    thr = tl.load(thr_ptr).to(tl.float32)
    out_dtype = a_ptr.dtype.element_ty
    n_groups = (total + BLOCK_RG - 1) // BLOCK_RG
    for grp in range(pid, n_groups, n_prog):
        offs_k = grp * BLOCK_RG + tl.arange(0, BLOCK_RG)
        k_mask = offs_k < total
        rows = _union_rows(idx_ptr, cnt_ptr, cum, offs_k, k_mask, BLOCK_N)
        valid = b_mask[:, None] & k_mask[None, :]
        dv = tl.load(dv_ptr + offs_b[:, None] * stride_dv + rows[None, :], mask=valid, other=0.0)
        if FUSED:
            g, u = _gemv_no_dot_pair(x_ptr, stride_xm, wg_ptr, stride_wg, wu_ptr, stride_wu, rows, k_mask, M, D,
                                     BLOCK_B, BLOCK_RG, BLOCK_K)
        elif MODE == 3 or MODE == 1:
            g = _rows_gemv(x_ptr, stride_xm, wg_ptr, stride_wg, offs_b, b_mask, rows, k_mask, M, D,
                           BLOCK_B, BLOCK_RG, BLOCK_K, NO_DOT, PREC, UPCAST)
        if MODE == 3 or MODE == 1:
            if HAS_BG:
                g += tl.load(bg_ptr + rows, mask=k_mask, other=0.0).to(tl.float32)[None, :]
            ag = _cast(_act(_cast(g, out_dtype, UPCAST).to(tl.float32), ACT), out_dtype, UPCAST).to(tl.float32)
        else:
            ag = dv
        if MODE == 3 or MODE == 0:
            if not FUSED:
                u = _rows_gemv(x_ptr, stride_xm, wu_ptr, stride_wu, offs_b, b_mask, rows, k_mask, M, D,
                               BLOCK_B, BLOCK_RG, BLOCK_K, NO_DOT, PREC, UPCAST)
            if HAS_BU:
                u += tl.load(bu_ptr + rows, mask=k_mask, other=0.0).to(tl.float32)[None, :]
            u = _cast(u, out_dtype, UPCAST).to(tl.float32)
        else:
            u = dv
        if MODE == 3:
            keep = (dv > thr) & valid
        else:
            keep = (tl.abs(dv) > thr) & valid
        a = tl.where(keep, _cast(ag * u, out_dtype, UPCAST), 0.0).to(out_dtype)
        tl.store(a_ptr + offs_b[:, None] * stride_am + rows[None, :], a, mask=valid)
        tl.store(flat_ptr + offs_k, rows, mask=k_mask)


@triton.jit
def _lowrank_kernel(x_ptr, v_ptr, out_ptr, M, D, R, k_chunk, stride_xm, stride_vk, stride_vr, stride_split,
                    stride_om, BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
                    NATIVE: tl.constexpr, UPCAST: tl.constexpr, PDL: tl.constexpr):
    """out[split] = x[:, chunk] V[chunk, :] in fp32 for one chunk of k_chunk rows of d_model and BLOCK_R
    columns of V (the predictor's first factor, either layout). With one chunk out is h itself; with several,
    _reduce_kernel sums the chunks in a fixed order: V is only r columns wide, so without the split a few
    dozen programs would stream all of it (latency-bound: 16 programs read 4 MB at 0.29 TB/s, NOTES.md)."""
    _pdl_start(PDL)
    pid_r = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_b = tl.arange(0, BLOCK_B)
    offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    b_mask = offs_b < M
    r_mask = offs_r < R
    k_end = tl.minimum((pid_k + 1) * k_chunk, D)
    acc = tl.zeros((BLOCK_B, BLOCK_R), dtype=tl.float32)
    for k in range(pid_k * k_chunk, k_end, BLOCK_K):
        offs_k = k + tl.arange(0, BLOCK_K)
        k_mask = offs_k < k_end
        xt = tl.load(x_ptr + offs_b[:, None] * stride_xm + offs_k[None, :],
                     mask=b_mask[:, None] & k_mask[None, :], other=0.0)
        vt = tl.load(v_ptr + offs_k[:, None] * stride_vk + offs_r[None, :] * stride_vr,
                     mask=k_mask[:, None] & r_mask[None, :], other=0.0)
        if NATIVE:  # same 16-bit dtype: products are exact in fp32, as in the reference's upcast
            acc += _dot(xt, vt, "tf32", UPCAST)
        else:
            acc += _dot_f32(xt.to(tl.float32), vt.to(tl.float32), UPCAST)
    tl.store(out_ptr + pid_k * stride_split + offs_b[:, None] * stride_om + offs_r[None, :], acc,
             mask=b_mask[:, None] & r_mask[None, :])


@triton.jit
def _lowrank_no_dot_kernel(x_ptr, vt_ptr, h_ptr, M, D, R, stride_xm, stride_vt, stride_hm,
                           BLOCK_B: tl.constexpr, BLOCK_RG: tl.constexpr, BLOCK_K: tl.constexpr, PDL: tl.constexpr):
    """h = x V in fp32 for a step of a few tokens, from V stored transposed (each of its r columns one
    contiguous row of d_model, as the rewrite stores it): BLOCK_RG columns per program over all of d_model with
    FMA sums, so h needs no split over d_model and no reduce launch after it."""
    _pdl_start(PDL)
    rows = tl.program_id(0) * BLOCK_RG + tl.arange(0, BLOCK_RG)
    r_mask = rows < R
    offs_b = tl.arange(0, BLOCK_B)
    acc = _gemv_no_dot(x_ptr, stride_xm, vt_ptr, stride_vt, rows, r_mask, M, D, BLOCK_B, BLOCK_RG, BLOCK_K)
    tl.store(h_ptr + offs_b[:, None] * stride_hm + rows[None, :], acc, mask=(offs_b < M)[:, None] & r_mask[None, :])


@triton.jit
def _down_kernel(a_ptr, w_ptr, idx_ptr, cnt_ptr, flat_ptr, part_ptr, bd_ptr, y_ptr, M, N, D, NB, n_split,
                 compact_max_rows, stride_am, stride_w, stride_ym,
                 BLOCK_B: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
                 NB_P2: tl.constexpr, FLAT: tl.constexpr, ATOMIC: tl.constexpr, HAS_BD: tl.constexpr,
                 PREC: tl.constexpr, UPCAST: tl.constexpr, PDL: tl.constexpr):
    """part[split, :, cols] = a[:, rows] @ W_down^T[rows, cols] over one share of the rows.

    Two walks, chosen on the device from the size of the union (no host sync):
    - sparse union (<= compact_max_rows rows), or any union after _gather_kernel (FLAT: its flat row list
      costs no search, and measured no slower than the direct walk at any size, NOTES.md "flat walk"): an
      equal share of the union's global compacted order per program, rows read from the flat list or found
      from _coef_kernel's per-block lists (idx, cnt) through the prefix sum of the block counts (a few
      hundred ints, rebuilt by every program), so each W_down^T tile it loads holds active rows only and the
      work is balanced whatever the sparsity pattern;
    - dense union: a contiguous slice of rows with direct addresses; a row whose coefficients are all
      zero is masked off (no memory traffic). At full density this is a dense GEMV (the dense fallback).
    Without ATOMIC, each share stores its partial in part[split] for _reduce_kernel: deterministic. With
    ATOMIC, part is a zeroed fp32 [M, D] sum plus one arrival count per column block: each share adds its
    partial with fp32 atomics, and the last share of a column block to arrive adds b_down, casts and stores
    y (no reduce launch; the order of the additions, so the last bits of y, may vary from call to call).
    """
    _pdl_start(PDL)
    pid_d = tl.program_id(0)
    pid_s = tl.program_id(1)
    offs_b = tl.arange(0, BLOCK_B)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    b_mask = offs_b < M
    d_mask = offs_d < D
    offs_blk = tl.arange(0, NB_P2)
    cnts = tl.load(cnt_ptr + offs_blk, mask=offs_blk < NB, other=0)
    total = tl.sum(cnts, axis=0)
    acc = tl.zeros((BLOCK_B, BLOCK_D), dtype=tl.float32)
    if FLAT or total <= compact_max_rows:
        cum = tl.cumsum(cnts, axis=0)  # inclusive; padding blocks repeat the total
        share = (total + n_split - 1) // n_split
        share = (share + BLOCK_R - 1) // BLOCK_R * BLOCK_R
        k_start = pid_s * share
        k_end = tl.minimum(k_start + share, total)
        for k in range(k_start, k_end, BLOCK_R):
            offs_k = k + tl.arange(0, BLOCK_R)
            k_mask = offs_k < k_end
            if FLAT:  # _gather_kernel listed the union's rows in order
                rows = tl.load(flat_ptr + offs_k, mask=k_mask, other=0)
            else:
                rows = _union_rows(idx_ptr, cnt_ptr, cum, offs_k, k_mask, BLOCK_N)
            at = tl.load(a_ptr + offs_b[:, None] * stride_am + rows[None, :],
                         mask=b_mask[:, None] & k_mask[None, :], other=0.0)
            wt = tl.load(w_ptr + rows[:, None] * stride_w + offs_d[None, :],
                         mask=k_mask[:, None] & d_mask[None, :], other=0.0)
            acc += _dot(at, wt, PREC, UPCAST)
    else:
        share = (N + n_split - 1) // n_split
        share = (share + BLOCK_R - 1) // BLOCK_R * BLOCK_R
        r_start = pid_s * share
        r_end = tl.minimum(r_start + share, N)
        for r in range(r_start, r_end, BLOCK_R):
            offs_r = r + tl.arange(0, BLOCK_R)
            r_mask = offs_r < r_end
            at = tl.load(a_ptr + offs_b[:, None] * stride_am + offs_r[None, :],
                         mask=b_mask[:, None] & r_mask[None, :], other=0.0)
            active = tl.max((at != 0).to(tl.int32), axis=0) > 0  # != 0 keeps NaN rows, as the reference does
            wt = tl.load(w_ptr + offs_r[:, None] * stride_w + offs_d[None, :],
                         mask=active[:, None] & d_mask[None, :], other=0.0)
            acc += _dot(at, wt, PREC, UPCAST)
    mask = b_mask[:, None] & d_mask[None, :]
    if ATOMIC:
        sums = part_ptr + offs_b[:, None] * D + offs_d[None, :]
        tl.atomic_add(sums, acc, mask=mask, sem="relaxed", scope="gpu")
        # the barrier puts every thread's additions before the count, whose release/acquire orders them
        # for the share that sees the last count
        tl.debug_barrier()
        if tl.atomic_add(part_ptr + M * D + pid_d, 1.0, sem="acq_rel", scope="gpu") == n_split - 1:
            y_tile = tl.load(sums, mask=mask, other=0.0, cache_modifier=".cg")  # others' sums: bypass L1
            if HAS_BD:
                y_tile += tl.load(bd_ptr + offs_d, mask=d_mask, other=0.0).to(tl.float32)[None, :]
            tl.store(y_ptr + offs_b[:, None] * stride_ym + offs_d[None, :],
                     _cast(y_tile, y_ptr.dtype.element_ty, UPCAST), mask=mask)
    else:
        tl.store(part_ptr + (pid_s * M + offs_b[:, None]) * D + offs_d[None, :], acc, mask=mask)


@triton.jit
def _reduce_kernel(part_ptr, bd_ptr, y_ptr, M, D, n_split, stride_ym,
                   HAS_BD: tl.constexpr, BLOCK_D: tl.constexpr, SPLIT_TILE: tl.constexpr, UPCAST: tl.constexpr, PDL: tl.constexpr):
    """y[b] = sum over splits + b_down, cast to the output dtype. SPLIT_TILE splits are loaded as one tile and
    summed by tl.sum (a fixed tree; tiles in order): one round trip to L2 for all of a call's ~33 partials
    instead of one per split. The order is fixed by the launch config (n_split, SPLIT_TILE, BLOCK_D, warps):
    deterministic for the same shapes and config. SPLIT_TILE: a power of two (tl.arange)."""
    _pdl_start(PDL)
    pid_b = tl.program_id(0)
    offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    d_mask = offs_d < D
    acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
    for s in range(0, n_split, SPLIT_TILE):
        offs_s = s + tl.arange(0, SPLIT_TILE)
        tile = tl.load(part_ptr + (offs_s[:, None] * M + pid_b) * D + offs_d[None, :],
                       mask=(offs_s < n_split)[:, None] & d_mask[None, :], other=0.0)
        acc += tl.sum(tile, axis=0)
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
    return "tf32x3" if dtype == torch.float32 else "tf32"  # fp32: 3xTF32, fp32-grade; ignored for 16-bit


# Launch configuration. Chosen from benchmarks/speed/ffn_decode.py sweeps on an H100 (see NOTES.md).
CONFIG = {
    # BLOCK_R: the predictor's rank tile for D-CountDown's logits. num_stages_pred_masked: D-CountDown on the
    # masked side reads gate and up rows through masked loads after its logits; more stages keep more bytes in
    # flight there (measured -3 to -4 us at unions 0.4-0.6, neutral or worse for the other modes; NOTES.md)
    "coef": dict(BLOCK_N=64, BLOCK_K=128, BLOCK_R=64, num_warps=4, num_stages=3, num_stages_pred_masked=5),
    "down": dict(BLOCK_R=16, BLOCK_D=256, num_warps=4, num_stages=4, programs_per_sm=4),
    # Without the gather side's flat row list, the down kernel walks the compacted union when it holds at most
    # this fraction of d_inter (with it: always). Measured
    # on the H100 (NOTES.md, "crossover"): compacted wins at union 0.10 (79 vs 87 us), ties at 0.20,
    # loses from 0.29 on (99 vs 90 us); the direct walk is the dense fallback.
    "compact_max_density": 0.15,
    # Sparse side of gate/up: "masked" (in _coef_kernel, masked row loads over each neuron block) or
    # "gather" (_gather_kernel over the compacted union: full tiles of active rows). Same coefficients bit
    # for bit where tl.dot runs (fewer tokens: see gather_no_dot), the output within fp32 rounding (the down
    # kernel then walks the union in compacted order); gather is faster only for small unions, which the ops
    # choose per call from the calibrated union (ops.decode_plan), since the kernels' caller cannot see this
    # step's union without a sync.
    "sparse_side": "masked",
    "gather": dict(BLOCK_RG=16, BLOCK_K=256, num_warps=4, num_stages=4, programs_per_sm=4),
    # The gather launch of a step of at most max_tokens tokens, without tl.dot (None: tl.dot at any count):
    # 2-row groups give a small union 8x the programs of 16-row tiles. Measured at B=1 (NOTES.md, "one-token
    # gather"): D s=0.9 53.0 -> 43.3 us, M 68.8 -> 63.6; the tile shape sweep picked 2 rows x 2048 columns,
    # 2 warps. max_tokens from `ffn_decode.py --compare` (NOTES.md "few-token gather"): at 2 tokens it wins
    # (D s=0.9 62.1 -> 54.8 us with the logits below, M s=0.8 94.5 -> 87.2), at 4 it loses (D s=0.9 79.8 -> 90.9).
    # fused_max_tokens: up to this many tokens D-CountDown loads its gate and up tiles in one loop (NOTES.md
    # "fused FMA gather": at 1 token -0.6 us at union 0.1, -2.5 at 0.3; at 2 tokens +1.4 at 0.19).
    "gather_no_dot": dict(max_tokens=2, BLOCK_RG=2, BLOCK_K=2048, num_warps=2, num_stages=1, programs_per_sm=16,
                          fused_max_tokens=1),
    # D-CountDown's logits on the gather side for a step of at most max_tokens tokens, without tl.dot (None:
    # tl.dot at any count): merged over "coef"; smaller neuron blocks give more programs, each its whole rank
    # in one tile. Measured (NOTES.md, "one-token logits", "few-token gather"): D s=0.9 B=1 43.1 -> 39.5 us,
    # B=2 57.2 -> 54.8; neutral at B=4 (90.1 vs 90.9 with the FMA gather), so the same bound as the gather.
    "coef_no_dot_pred": dict(max_tokens=2, BLOCK_N=16, BLOCK_R=512, num_warps=4, num_stages=1),
    # h = x V of the predictor for 3+ tokens or a row-major V (else "lowrank_no_dot"): programs over BLOCK_R
    # columns of V and K_CHUNK rows of d_model each (Llama shape, r=480: 8 x 16 = 128 programs), chunks summed by
    # _reduce_kernel.
    "lowrank": dict(BLOCK_R=64, BLOCK_K=128, K_CHUNK=256, num_warps=4, num_stages=3),
    # h = x V for a step of at most max_tokens tokens when V is stored transposed (pred_v.stride(0) == 1, as
    # the rewrite stores it; None: never): FMA sums over all of d_model, BLOCK_RG of V's columns per program at
    # one token, BLOCK_RG / 2 at two (r=480: 240 programs; 480), no split and no reduce launch (NOTES.md
    # "lowrank FMA": B=1 s=0.9 D 39.6 -> 37.8 us; one column per program over 4096 columns was -0.4 to -0.8 us
    # at 2 tokens, +0.3 to +0.9 at 1; the 2-token setting, one column over 2048, was not timed on its own).
    "lowrank_no_dot": dict(max_tokens=2, BLOCK_RG=2, BLOCK_K=2048, num_warps=2),
    # How the down launch's shares of rows are summed: "reduce" (each stores its fp32 partial, _reduce_kernel
    # sums them in a fixed order: deterministic) or "atomic" (fp32 atomic adds, the last share of each column
    # block casts: one launch fewer, the last bits may vary). torch.use_deterministic_algorithms(True) takes
    # "reduce" whatever this says.
    # Measured (NOTES.md "atomic sums"): -1.4 to -4.8 us at every batch, sparsity and side (B=1 s=0.9 D
    # 36.3 -> 34.9, M s=0.7 78.5 -> 76.6; B=16 s=0.9 M 105.0 -> 100.6).
    "sum_splits": "atomic",
    # Programmatic dependent launch (NVIDIA compute capability 9.0 and later; elsewhere it stays off, with a
    # warning): every launch waits for the previous one's writes first thing and then lets the next one start
    # while it runs (_pdl_start). Eager calls of the ops get the launch attribute from triton; under Inductor,
    # pdl_launch.py's hook gives it (Inductor does not pass it to user kernels itself) and the backend compiles
    # in-process, without Inductor's on-disk caches. Measured on the FFN (NOTES.md "PDL in the FFN", launches
    # straight through triton): D -1.8 to -2.3 us per call on its gather side, M +1 to +22 us, hence off.
    "pdl": False,
    # the fixed-order sums of split partials (the output's, and h's chunks); SPLIT_TILE partials per load
    # (1: one split at a time, as before "reduce tiles" in NOTES.md)
    "reduce": dict(BLOCK_D=64, SPLIT_TILE=64, num_warps=4),
}


def _block_k(block_k: int, dtype: torch.dtype) -> int:
    """The d_model tile of a tl.dot launch: fp32 tiles (3xTF32 dots) take twice the registers and shared memory
    of 16-bit ones, so they stop at 128 columns. (The FMA paths hold fp32 tiles for every dtype: no cap.)"""
    return block_k if dtype != torch.float32 else min(block_k, 128)


def _no_dot(launch: dict | None, tokens: int) -> bool:
    """Whether a step of `tokens` tokens runs a launch's FMA path (CONFIG "gather_no_dot", "coef_no_dot_pred",
    "lowrank_no_dot"; None: never)."""
    return launch is not None and tokens <= launch["max_tokens"]


def _rows(w: torch.Tensor, name: str | None = None) -> torch.Tensor:
    """Kernels need unit stride along d_model; row slices of a fused gate_up weight already have it. A named
    weight without it is copied on every call, which can cost as much as the FFN itself: say so (once per
    trace or eager call site, not silently)."""
    if w.stride(-1) == 1:
        return w
    if name is not None:
        warnings.warn(
            f"countdown: the kernels' {name} {tuple(w.shape)} has no contiguous rows (strides {tuple(w.stride())}), "
            f"so it is copied ({w.numel() * w.element_size() / 1e6:.1f} MB) on every call. Store it once "
            f"row-major (the countdown backend does this for W_down^T on CUDA when no gradient is needed), or "
            f"pass .contiguous() weights.", stacklevel=3)
    return w.contiguous()


def _check_shapes(D, N, w_gate, w_up, w_down_t, b_gate, b_up, b_down, pred_v, pred_u) -> None:
    """The kernels index every tensor by (neuron, d_model) without bounds of their own: a mismatched shape
    would read the wrong rows silently, so refuse it here (shapes are known while tracing: no sync)."""
    want = {"w_gate": (w_gate, (N, D)), "w_up": (w_up, (N, D)), "w_down_t": (w_down_t, (N, D)),
            "b_gate": (b_gate, (N,)), "b_up": (b_up, (N,)), "b_down": (b_down, (D,))}
    if pred_v is not None:
        want.update(pred_v=(pred_v, (D, pred_v.shape[-1])), pred_u=(pred_u, (N, pred_v.shape[-1])))
    for name, (t, shape) in want.items():
        if t is not None and tuple(t.shape) != shape:
            raise ValueError(f"countdown kernels: {name} has shape {tuple(t.shape)}, expected {shape} for "
                             f"d_model={D}, d_inter={N}")


def _merged_config(config: dict | None) -> dict:
    """CONFIG with `config`'s overrides merged in (a dict entry key by key; None switches an optional launch
    off). A key CONFIG does not have is refused: a misspelt override would otherwise time or test the
    defaults without a word."""
    cfg = {k: (dict(v) if isinstance(v, dict) else v) for k, v in CONFIG.items()}
    for k, v in (config or {}).items():
        if k not in CONFIG:
            raise ValueError(f"countdown kernels: unknown config key {k!r}; expected one of {sorted(CONFIG)}")
        if isinstance(v, dict) and isinstance(CONFIG[k], dict):
            unknown = sorted(set(v) - set(CONFIG[k]))
            if unknown:
                raise ValueError(f"countdown kernels: unknown key(s) {unknown} in config[{k!r}]; expected some of "
                                 f"{sorted(CONFIG[k])}")
            v = {**cfg[k], **v}
        cfg[k] = v
    return cfg


def sparse_ffn(x2d: torch.Tensor, w_gate, w_up, w_down_t, b_gate, b_up, b_down, activation: str,
               mode: int, thr: torch.Tensor, pred_v=None, pred_u=None, config=None, return_coef=False):
    """The decode FFN for x2d [M <= 16, d_model]; returns y [M, d_model] in x's dtype (and the masked
    coefficients a [M, d_inter] with return_coef, for tests). `mode` is MODE_GATE / MODE_UP / MODE_COEF
    (score > thr) or MODE_PRED (predictor logit > thr). thr: a one-element tensor on x's device."""
    cfg = _merged_config(config)
    M, D = x2d.shape
    N = w_gate.shape[0]
    assert 1 <= M <= MAX_TOKENS, M
    _check_shapes(D, N, w_gate, w_up, w_down_t, b_gate, b_up, b_down, pred_v, pred_u)
    x2d = _rows(x2d)
    w_gate, w_up, w_down_t = _rows(w_gate, "w_gate"), _rows(w_up, "w_up"), _rows(w_down_t, "w_down_t")
    b_gate, b_up, b_down = (None if b is None else _rows(b) for b in (b_gate, b_up, b_down))  # kernels index b[i]
    dtype = x2d.dtype
    prec = _prec(dtype)
    upcast = x2d.device.type == "cpu"  # only the interpreter runs these kernels on CPU tensors
    BLOCK_B = 16  # tl.dot launches pad the tokens to 16 rows
    BLOCK_B_FMA = triton.next_power_of_2(M)  # the FMA (no tl.dot) launches' token tile
    dummy = x2d  # stands for absent optional pointers (never read: HAS_* flags are off)
    # PDL: the kernels' waits (constexpr PDL), and the launch attribute itself: from triton's launcher where the
    # kernels are launched directly (an eager call of the op), from pdl_launch's hook where Inductor compiles them
    traced = is_wrap_triton_enabled()
    pdl = pdl_launch.enabled(bool(cfg["pdl"]), x2d.device, traced)  # never on CPU: the interpreter runs no PTX
    if pdl:
        pdl_launch.install()
    pdl_args = dict(PDL=pdl, **({"launch_pdl": True} if pdl and not traced else {}))
    bg_arg, bu_arg, bd_arg = (dummy if b is None else b for b in (b_gate, b_up, b_down))

    a = torch.empty((M, N), dtype=dtype, device=x2d.device)
    h = dummy
    R = 0
    stride_h = stride_pu = 0
    if mode == MODE_PRED:
        R = pred_v.shape[1]
        pred_u = _rows(pred_u, "pred_u")
        h = torch.empty((M, R), dtype=torch.float32, device=x2d.device)
        if _no_dot(cfg["lowrank_no_dot"], M) and pred_v.stride(0) == 1:
            c = cfg["lowrank_no_dot"]
            block_rg = max(1, c["BLOCK_RG"] // BLOCK_B_FMA)  # the same products per program at any token count
            wrap_triton(_lowrank_no_dot_kernel)[(triton.cdiv(R, block_rg),)](
                x2d, pred_v, h, M, D, R, x2d.stride(0), pred_v.stride(1), h.stride(0),
                BLOCK_B=BLOCK_B_FMA, BLOCK_RG=block_rg, BLOCK_K=c["BLOCK_K"],
                **pdl_args, num_warps=c["num_warps"], num_stages=1)
        else:
            c = cfg["lowrank"]
            block_kv = _block_k(c["BLOCK_K"], dtype)
            k_chunk = triton.cdiv(c["K_CHUNK"], block_kv) * block_kv
            n_chunks = triton.cdiv(D, k_chunk)
            h_part = h if n_chunks == 1 else torch.empty((n_chunks, M, R), dtype=torch.float32, device=x2d.device)
            native = pred_v.dtype == dtype and dtype != torch.float32
            wrap_triton(_lowrank_kernel)[(triton.cdiv(R, c["BLOCK_R"]), n_chunks)](
                x2d, pred_v, h_part, M, D, R, k_chunk, x2d.stride(0), pred_v.stride(0), pred_v.stride(1), M * R, R,
                BLOCK_B=BLOCK_B, BLOCK_K=block_kv, BLOCK_R=c["BLOCK_R"], NATIVE=native, UPCAST=upcast,
                **pdl_args, num_warps=c["num_warps"], num_stages=c["num_stages"])
            if n_chunks > 1:
                r = cfg["reduce"]
                wrap_triton(_reduce_kernel)[(M, triton.cdiv(R, r["BLOCK_D"]))](
                    h_part, dummy, h, M, R, n_chunks, h.stride(0), HAS_BD=False, BLOCK_D=r["BLOCK_D"],
                    SPLIT_TILE=r["SPLIT_TILE"], UPCAST=upcast, **pdl_args, num_warps=r["num_warps"])
        stride_h, stride_pu = h.stride(0), pred_u.stride(0)

    if cfg["sparse_side"] not in SIDES:
        raise ValueError(f"sparse_side={cfg['sparse_side']!r}: expected one of {sorted(SIDES)}")
    side = SIDES[cfg["sparse_side"]] if mode != MODE_COEF else SIDES["masked"]  # "coef": both sides dense
    gather = side == SIDES["gather"]
    no_dot_logits = mode == MODE_PRED and gather and _no_dot(cfg["coef_no_dot_pred"], M)
    c = {**cfg["coef"], **cfg["coef_no_dot_pred"]} if no_dot_logits else cfg["coef"]
    block_k = _block_k(c["BLOCK_K"], dtype)
    block_n = c["BLOCK_N"]
    n_blocks = triton.cdiv(N, block_n)
    idx = torch.empty((n_blocks * block_n,), dtype=torch.int32, device=x2d.device)
    cnt = torch.empty((n_blocks,), dtype=torch.int32, device=x2d.device)
    dv = torch.empty((M, N), dtype=torch.float32, device=x2d.device) if gather else a
    # the union's rows in one list, written by _gather_kernel; without it the down kernel never reads `flat`
    flat = torch.empty((N,), dtype=torch.int32, device=x2d.device) if gather else idx
    nb_p2 = triton.next_power_of_2(n_blocks)
    if cfg["sum_splits"] not in SUM_SPLITS:
        raise ValueError(f"sum_splits={cfg['sum_splits']!r}: expected one of {list(SUM_SPLITS)}")
    atomic = cfg["sum_splits"] == "atomic" and not torch.are_deterministic_algorithms_enabled()
    # "atomic": the down launch's fp32 sums and one arrival count per column block, zeroed by the coef launch
    n_ws = M * D + triton.cdiv(D, cfg["down"]["BLOCK_D"]) if atomic else 0
    ws = torch.empty((max(n_ws, 1),), dtype=torch.float32, device=x2d.device)
    wrap_triton(_coef_kernel)[(n_blocks,)](
        x2d, w_gate, w_up,
        bg_arg, bu_arg, h, pred_u if pred_u is not None else dummy, thr, a, idx, cnt, dv, ws,
        M, D, N, R, n_ws, x2d.stride(0), w_gate.stride(0), w_up.stride(0), stride_h, stride_pu,
        a.stride(0), dv.stride(0),
        MODE=mode, ACT=ACT_IDS[activation], HAS_BG=b_gate is not None, HAS_BU=b_up is not None,
        BLOCK_B=BLOCK_B_FMA if no_dot_logits else BLOCK_B, BLOCK_N=block_n, BLOCK_K=block_k,
        BLOCK_R=c["BLOCK_R"], PREC=prec, UPCAST=upcast, SIDE=side, NO_DOT=no_dot_logits,
        **pdl_args, num_warps=c["num_warps"],
        num_stages=c["num_stages_pred_masked"] if mode == MODE_PRED and not gather else c["num_stages"])

    if gather:
        no_dot = _no_dot(cfg["gather_no_dot"], M)
        c = cfg["gather_no_dot"] if no_dot else cfg["gather"]
        grid = max(1, min(triton.cdiv(N, c["BLOCK_RG"]), c["programs_per_sm"] * _sm_count(x2d.device)))
        wrap_triton(_gather_kernel)[(grid,)](
            x2d, w_gate, w_up, bg_arg, bu_arg,
            dv, thr, a, idx, cnt, flat, M, D, n_blocks, x2d.stride(0), w_gate.stride(0), w_up.stride(0),
            dv.stride(0), a.stride(0), MODE=mode, ACT=ACT_IDS[activation], HAS_BG=b_gate is not None,
            HAS_BU=b_up is not None, BLOCK_B=BLOCK_B_FMA if no_dot else BLOCK_B,
            BLOCK_RG=c["BLOCK_RG"], BLOCK_K=c["BLOCK_K"] if no_dot else _block_k(c["BLOCK_K"], dtype),
            BLOCK_N=block_n, NB_P2=nb_p2,
            NO_DOT=no_dot, FUSED=mode == MODE_PRED and no_dot and M <= c["fused_max_tokens"], PREC=prec,
            UPCAST=upcast,
            **pdl_args, num_warps=c["num_warps"], num_stages=c["num_stages"])

    c = cfg["down"]
    col_blocks = triton.cdiv(D, c["BLOCK_D"])
    want_splits = max(1, c["programs_per_sm"] * _sm_count(x2d.device) // col_blocks)
    n_split = max(1, min(want_splits, triton.cdiv(N, c["BLOCK_R"])))
    y = torch.empty((M, D), dtype=dtype, device=x2d.device)
    part = ws if atomic else torch.empty((n_split, M, D), dtype=torch.float32, device=x2d.device)
    wrap_triton(_down_kernel)[(col_blocks, n_split)](
        a, w_down_t, idx, cnt, flat, part, bd_arg, y, M, N, D, n_blocks, n_split,
        int(cfg["compact_max_density"] * N), a.stride(0), w_down_t.stride(0), y.stride(0),
        BLOCK_B=BLOCK_B, BLOCK_R=c["BLOCK_R"], BLOCK_D=c["BLOCK_D"], BLOCK_N=block_n,
        NB_P2=nb_p2, FLAT=gather, ATOMIC=atomic, HAS_BD=b_down is not None, PREC=prec, UPCAST=upcast,
        **pdl_args, num_warps=c["num_warps"], num_stages=c["num_stages"])
    if not atomic:
        r = cfg["reduce"]
        wrap_triton(_reduce_kernel)[(M, triton.cdiv(D, r["BLOCK_D"]))](
            part, bd_arg, y, M, D, n_split, y.stride(0),
            HAS_BD=b_down is not None, BLOCK_D=r["BLOCK_D"], SPLIT_TILE=r["SPLIT_TILE"], UPCAST=upcast,
            **pdl_args, num_warps=r["num_warps"])
    return (y, a) if return_coef else y
