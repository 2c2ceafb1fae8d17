"""Kernel-vs-reference cases run by triton's CPU interpreter.

Not collected on its own (the name does not match test_*.py): test_triton_ffn.py runs this file in a
subprocess with TRITON_INTERPRET=1, because the interpreter must be on before the kernels are decorated,
whatever else the main test process imported first.
"""

import itertools
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
from ffn_cases import TOL, ULP, check, make_case, rel_err, run_kernel, scores64  # noqa: E402

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="needs TRITON_INTERPRET=1")

# several chunks of d_model for the predictor's h = x V (summed by _reduce_kernel); the default chunk
# covers these small d_model in one, the other path
# (and the reduce over several tiles of 2 splits, the last one partial where the split count is odd)
SMALL_BLOCKS = {"coef": dict(BLOCK_N=16, BLOCK_K=16, BLOCK_R=16), "down": dict(BLOCK_R=16, BLOCK_D=16),
                "lowrank": dict(BLOCK_R=16, BLOCK_K=16, K_CHUNK=16), "reduce": dict(BLOCK_D=16, SPLIT_TILE=2)}
SMALL_GATHER = dict(BLOCK_RG=16, BLOCK_K=16, programs_per_sm=1)
# the FMA paths (no tl.dot) for steps of up to 3 tokens: every M the cases draw (1, 2 and 3)
NO_DOT = dict(max_tokens=3, BLOCK_RG=4, BLOCK_K=16, num_warps=4, num_stages=2, programs_per_sm=1)
NO_DOT_LOGITS = dict(max_tokens=3, BLOCK_N=16, BLOCK_R=8)  # several rank tiles (rank 13 in test_many_blocks)
# the ways the sparse side and the down kernel's row list can run (triton_ffn.CONFIG)
SIDE_VARIANTS = {
    "masked": {"sparse_side": "masked"},
    "gather": {"sparse_side": "gather", "gather": SMALL_GATHER, "gather_no_dot": None,  # tl.dot at any M
               "coef_no_dot_pred": None},
    "gather-no-dot": {"sparse_side": "gather", "gather": SMALL_GATHER, "gather_no_dot": NO_DOT,
                      "coef_no_dot_pred": NO_DOT_LOGITS},
}


@pytest.mark.parametrize("mode,M,dtype,sparsity,side", list(itertools.product(
    ["up", "gate", "coef", "pred"], [1, 3], [torch.float32, torch.bfloat16], [0.5, 0.0, 1.0],
    ["masked", "gather", "gather-no-dot"])))
def test_modes(mode, M, dtype, sparsity, side):
    """Prime sizes; all neurons active (0.0), none (1.0), a per-token quantile (0.5); biases on odd M;
    every implementation of the sparse side."""
    c = make_case(M, 37, 97, dtype, "cpu", mode, bias=M == 3, sparsity=sparsity, seed=M)
    y, a = run_kernel(c, config=SIDE_VARIANTS[side])
    density = check(c, y, a)
    if sparsity == 0.0:
        assert density == 1.0
    if sparsity == 1.0:
        assert density == 0.0


@pytest.mark.parametrize("act", ["gelu_tanh", "gelu", "relu"])
@pytest.mark.parametrize("mode", ["up", "gate", "pred"])
def test_activations(act, mode):
    c = make_case(3, 41, 67, torch.float32, "cpu", mode, act=act, bias=True, sparsity=0.7, seed=7)
    check(c, *run_kernel(c))


@pytest.mark.parametrize("mode,M,sparsity", [("up", 3, 0.8), ("gate", 3, 0.8), ("coef", 3, 0.8), ("pred", 3, 0.8),
                                             ("up", 1, 0.97), ("pred", 1, 0.97)])
@pytest.mark.parametrize("walk", [1.0, 0.0])
@pytest.mark.parametrize("side", list(SIDE_VARIANTS))
def test_many_blocks(mode, M, sparsity, walk, side):
    """Small blocks: several K steps, neuron blocks (some with an empty union at 0.97), column blocks,
    compacted rows spread over several down programs (searched per tile, or from a flat row list), split
    partials to reduce."""
    c = make_case(M, 53, 131, torch.bfloat16, "cpu", mode, bias=True, sparsity=sparsity, seed=11,
                  rank=13)  # pred: rank not a multiple of the lowrank BLOCK_R, d_model in 4 chunks
    y, a = run_kernel(c, config={**SMALL_BLOCKS, "compact_max_density": walk,
                                 **SIDE_VARIANTS[side]})
    check(c, y, a)
    if sparsity > 0.9:
        blocks = (a != 0).any(0)[:128].view(-1, 16).any(1)
        assert not blocks.all(), "case should have neuron blocks with nothing active"


@pytest.mark.parametrize("mode", ["up", "gate", "pred"])
def test_sides_agree(mode):
    """With tl.dot on both (the "gather" variant turns the few-token FMA paths off), the masked and gather sides
    compute the coefficients with the same arithmetic in the same order (bit for bit); the down kernel walks the union in another order after the gather side (its
    flat row list), so the outputs agree within rounding. ops pick a side per call for speed alone
    (ops.decode_plan): the output must not depend on the pick beyond that."""
    c = make_case(3, 53, 131, torch.bfloat16, "cpu", mode, bias=True, sparsity=0.85, seed=21)
    y, a = run_kernel(c, config={**SMALL_BLOCKS, **SIDE_VARIANTS["masked"]})
    check(c, y, a)
    for side in ("gather",):
        y_side, a_side = run_kernel(c, config={**SMALL_BLOCKS, **SIDE_VARIANTS[side]})
        torch.testing.assert_close(a_side, a, rtol=0, atol=0, msg=side)
        assert rel_err(y_side, y) <= 4 * ULP[torch.bfloat16], side


@pytest.mark.parametrize("sum_splits", ["reduce", "atomic"])
@pytest.mark.parametrize("side", ["masked", "gather", "gather-no-dot"])
@pytest.mark.parametrize("mode", ["up", "pred"])
def test_scratch_buffers_start_as_garbage(monkeypatch, mode, side, sum_splits):
    """Every scratch buffer comes from torch.empty: poison them (NaN floats, large ints) so a kernel that
    reads one before writing it, or an atomic sum or arrival count left unzeroed, shows."""
    empty = torch.empty

    def poisoned(*args, **kwargs):
        t = empty(*args, **kwargs)
        return t.fill_(float("nan") if t.is_floating_point() else 1 << 20)

    c = make_case(3, 53, 131, torch.bfloat16, "cpu", mode, bias=True, sparsity=0.8, seed=9)
    monkeypatch.setattr(torch, "empty", poisoned)
    y, a = run_kernel(c, config={**SMALL_BLOCKS, **SIDE_VARIANTS[side], "sum_splits": sum_splits})
    monkeypatch.undo()
    check(c, y, a)


@pytest.mark.parametrize("side", ["masked", "gather-no-dot"])
@pytest.mark.parametrize("M", [1, 3])
@pytest.mark.parametrize("mode", ["up", "gate", "coef", "pred"])
def test_atomic_sums_agree_with_the_reduce_launch(mode, M, side):
    """CONFIG sum_splits "atomic": the down launch's shares add into fp32 sums with atomics and the last share
    of each column block adds b_down and casts (small blocks: 7 column blocks of several shares each). The
    same coefficients; the output within fp32 summation order of the reduce launch's, rounded to bf16."""
    c = make_case(M, 107, 131, torch.bfloat16, "cpu", mode, bias=True, sparsity=0.6, seed=31 + M)
    config = {**SMALL_BLOCKS, **SIDE_VARIANTS[side]}
    y, a = run_kernel(c, config=config)
    y_atomic, a_atomic = run_kernel(c, config={**config, "sum_splits": "atomic"})
    check(c, y_atomic, a_atomic)
    assert torch.equal(a_atomic, a)
    assert rel_err(y_atomic, y) <= 4 * ULP[torch.bfloat16]


@pytest.mark.parametrize("M", [1, 2, 3])
@pytest.mark.parametrize("mode,fused", [("up", False), ("gate", False), ("pred", True), ("pred", False)])
def test_no_dot_gather_agrees_with_the_masked_side(mode, fused, M):
    """A step of a few tokens gathers (and D computes its logits) with FMA sums instead of tl.dot: same mask,
    and the same coefficients up to the fp32 summation order (one bf16 step at most), so the same output
    within bf16. M=2 runs a power-of-two token tile with no padding token, M=3 one with a padding token.
    fused: D's gate and up tiles in one loop (CONFIG gather_no_dot's fused_max_tokens; only D reads it)."""
    c = make_case(M, 53, 131, torch.bfloat16, "cpu", mode, bias=True, sparsity=0.85, seed=23 + M)
    variant = SIDE_VARIANTS["gather-no-dot"]
    y, a = run_kernel(c, config={**SMALL_BLOCKS, **variant,
                                 "gather_no_dot": {**variant["gather_no_dot"], "fused_max_tokens": 3 if fused else 0}})
    check(c, y, a)
    y_masked, a_masked = run_kernel(c, config={**SMALL_BLOCKS, **SIDE_VARIANTS["masked"]})
    assert torch.equal(a != 0, a_masked != 0)
    assert rel_err(a, a_masked) <= TOL[torch.bfloat16]
    assert rel_err(y, y_masked) <= TOL[torch.bfloat16]


def record_launches(monkeypatch) -> dict:
    """{kernel name: its launch's keyword arguments} for every launch sparse_ffn makes from now on."""
    from countdown_fx.kernels import triton_ffn

    launches = {}
    real = triton_ffn.wrap_triton

    def recording(kernel):
        launcher = real(kernel)

        class Recorder:
            def __getitem__(self, grid):
                def launch(*args, **kwargs):
                    launches[kernel.__name__] = kwargs
                    return launcher[grid](*args, **kwargs)
                return launch
        return Recorder()

    monkeypatch.setattr(triton_ffn, "wrap_triton", recording)
    return launches


@pytest.mark.parametrize("M,max_tokens", [(1, 1), (2, 1), (3, 4), (3, 2)])
def test_no_dot_max_tokens_picks_the_launch(monkeypatch, M, max_tokens):
    """At most max_tokens tokens: the gather and D's logits run their FMA path with a token tile of
    next_power_of_2(M); more: tl.dot with 16-token tiles. The output is right either way."""
    launches = record_launches(monkeypatch)
    c = make_case(M, 53, 131, torch.bfloat16, "cpu", "pred", bias=True, sparsity=0.6, seed=31)
    check(c, *run_kernel(c, config={**SMALL_BLOCKS, **SIDE_VARIANTS["gather-no-dot"],
                                    "gather_no_dot": {**NO_DOT, "max_tokens": max_tokens},
                                    "coef_no_dot_pred": {**NO_DOT_LOGITS, "max_tokens": max_tokens}}))
    no_dot = M <= max_tokens
    for name in ("_coef_kernel", "_gather_kernel"):
        assert launches[name]["NO_DOT"] == no_dot, name
        assert launches[name]["BLOCK_B"] == (1 << (M - 1).bit_length() if no_dot else 16), name


@pytest.mark.parametrize("v_layout", ["transposed", "rows"])
@pytest.mark.parametrize("M", [1, 2, 3])
def test_lowrank_launch_follows_tokens_and_layout(monkeypatch, M, v_layout):
    """h = x V runs in one FMA launch (no split, no reduce) for a step of at most lowrank_no_dot's max_tokens
    tokens with V stored transposed; otherwise split over d_model and reduced. The same V in the other layout
    (the other path where M <= 2) gives the same mask and the same output within rounding (fp32 sums in another
    order). Rank 13: a partial last group of columns."""
    c = make_case(M, 53, 131, torch.bfloat16, "cpu", "pred", bias=True, sparsity=0.7, seed=41 + M, rank=13,
                  v_layout=v_layout)
    fma = {"max_tokens": 2, "BLOCK_RG": 2, "BLOCK_K": 32, "num_warps": 2}  # 2 K steps over d_model 53
    launches = record_launches(monkeypatch)
    y, a = run_kernel(c, config={**SMALL_BLOCKS, "lowrank_no_dot": fma})
    check(c, y, a)
    expect_fma = M <= fma["max_tokens"] and v_layout == "transposed"
    assert ("_lowrank_no_dot_kernel" in launches) == expect_fma
    assert ("_lowrank_kernel" in launches) == (not expect_fma)
    if expect_fma:
        assert launches["_lowrank_no_dot_kernel"]["BLOCK_B"] == (1 << (M - 1).bit_length())
    v = c["pred_v"]
    other = dict(c, pred_v=v.contiguous() if v_layout == "transposed" else v.t().contiguous().t())
    assert other["pred_v"].stride() != v.stride() and torch.equal(other["pred_v"], v)
    y_other, a_other = run_kernel(other, config={**SMALL_BLOCKS, "lowrank_no_dot": fma})
    assert torch.equal(a != 0, a_other != 0)
    assert rel_err(a, a_other) <= TOL[torch.bfloat16] and rel_err(y, y_other) <= TOL[torch.bfloat16]


@pytest.mark.parametrize("mode", ["up", "pred"])
def test_long_rows_fp16_fused_views(mode):
    """d_model over one K block (the last one partial), fp16, gate/up as row slices of a fused weight."""
    c = make_case(2, 263, 71, torch.float16, "cpu", mode, sparsity=0.6, seed=5, fused=True)
    assert c["w_gate"].storage_offset() == 0 and c["w_up"].storage_offset() == 71 * 263
    check(c, *run_kernel(c))


def test_tokens_keep_their_own_masks():
    """Batched: a row in the union is read for all tokens, but only tokens that keep it use it."""
    c = make_case(3, 37, 97, torch.float32, "cpu", "up", sparsity=0.9, seed=3)
    y, a = run_kernel(c)
    check(c, y, a)
    keep = a != 0
    union = keep.any(0)
    assert (keep != union).any(), "case should have tokens with different masks"
    for m in range(3):  # each token alone gives the same row as in the batch
        single = dict(c, M=1, x=c["x"][m:m + 1])
        y1, a1 = run_kernel(single)
        torch.testing.assert_close(a1[0], a[m], rtol=0, atol=0)
        torch.testing.assert_close(y1[0], y[m], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("v_layout", ["transposed", "rows"])
@pytest.mark.parametrize("M", [1, 3])
def test_predictor_in_model_dtype(M, v_layout):
    """A bf16 predictor with bf16 activations (the native 16-bit dot for h = x V where it splits), V in
    either layout, one token (FMA h where V is transposed) and three (split)."""
    c = make_case(M, 53, 97, torch.bfloat16, "cpu", "pred", sparsity=0.6, seed=13, v_layout=v_layout)
    c["pred_v"], c["pred_u"] = c["pred_v"].to(torch.bfloat16), c["pred_u"].to(torch.bfloat16)
    assert (c["pred_v"].stride(0) == 1) == (v_layout == "transposed")
    c["thr"] = torch.quantile(scores64(c).flatten().float(), 0.6).reshape(())
    check(c, *run_kernel(c, config=SMALL_BLOCKS))


def test_deterministic():
    c = make_case(3, 37, 97, torch.bfloat16, "cpu", "pred", sparsity=0.5, seed=9)
    y1, _ = run_kernel(c, config=SMALL_BLOCKS)
    y2, _ = run_kernel(c, config=SMALL_BLOCKS)
    assert torch.equal(y1, y2)


def test_weight_without_contiguous_rows_is_copied_with_a_warning():
    """A W_down^T handed over as a transposed view (W_down's own storage) still gives the reference result,
    but the per-call copy it costs is announced, not silent; contiguous weights raise no warning."""
    import warnings

    c = make_case(1, 37, 97, torch.bfloat16, "cpu", "up", sparsity=0.5, seed=3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        y, a = run_kernel(c)
    c["w_down_t"] = c["w_down_t"].t().contiguous().t()  # same values, column-major
    with pytest.warns(UserWarning, match=r"w_down_t \(97, 37\) has no contiguous rows.*copied"):
        y_view, a_view = run_kernel(c)
    check(c, y_view, a_view)
    assert torch.equal(y_view, y)


@pytest.mark.parametrize("which", ["b_gate", "b_up", "b_down"])
@pytest.mark.parametrize("layout", ["every other", "broadcast"])
def test_biases_of_any_strides(which, layout):
    """The kernels index a bias by neuron (feature): one handed over as a strided view, or expanded from one
    value (stride 0), must give what its values say, not what the storage next to it holds."""
    c = make_case(2, 37, 97, torch.float32, "cpu", "up", bias=True, sparsity=0.5, seed=11)
    n = c[which].numel()
    if layout == "every other":
        wide = torch.full((2 * n,), float("nan"))  # NaN between the values: a wrong read shows
        wide[::2] = c[which]
        c[which] = wide[::2]
    else:
        c[which] = torch.tensor([0.25]).expand(n)
    check(c, *run_kernel(c))


@pytest.mark.parametrize("mode", ["gate", "pred"])
def test_a_skipped_neuron_that_overflows_adds_nothing(mode):
    """fp16: neuron 0's act(g) * u overflows to inf. Skipped, it must add exactly nothing, as in the reference
    (torch.where, not a product with a 0/1 mask, which would give inf * 0 = NaN), whether or not the kernel
    reads its rows (the predictor never does)."""
    from countdown_fx.kernels import reference

    c = make_case(1, 16, 32, torch.float16, "cpu", mode, sparsity=0.5, seed=2)
    c["x"] = torch.ones_like(c["x"])
    c["w_gate"][0], c["w_up"][0] = 20.0, 20.0  # g = u = 320 for every token: 320 * 320 > fp16's 65504
    c["thr"] = torch.tensor([1e9 if mode == "pred" else 400.0])  # keeps nothing (|act(g)| = 320 < 400)
    y, a = run_kernel(c)
    args = (c["x"], c["w_gate"], c["w_up"], c["w_down_t"], None, None, None, "silu")
    want = (reference.predictor_ffn(*args, c["pred_v"], c["pred_u"], c["thr"]) if mode == "pred"
            else reference.threshold_ffn(*args, "gate", c["thr"]))
    assert torch.isfinite(want).all() and torch.equal(y, want) and not a.any()
