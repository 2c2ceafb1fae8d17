"""Triton decode kernels vs the fp64 reference.

CPU CI: the cases of interp_cases.py run under triton's interpreter in a subprocess (TRITON_INTERPRET=1
must be set before the kernels are decorated, which an in-process flag cannot guarantee).
GPU (marked gpu): full model shapes, every dtype, 1..16 tokens, determinism.
"""

import os
import subprocess
import sys

import pytest
import torch

HERE = os.path.dirname(__file__)
sys.path.insert(0, HERE)
from ffn_cases import TOL, check, deterministic, make_case, rel_err, run_kernel, triton_ffn  # noqa: E402

pytest.importorskip("triton")


@pytest.mark.skipif(torch.__version__ < "2.12.0a0", reason=(
    "the interpreter cases need torch >= 2.12 and the triton it installs: torch 2.11's wrap_triton refuses "
    "interpreted kernels, and triton 3.6's interpreter cannot loop to a tensor bound. On torch 2.11 the GPU "
    "tests (-m gpu) check the compiled kernels"))
def test_kernels_under_interpreter():
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=os.pathsep.join(
        [os.path.abspath(os.path.join(HERE, "..", "..")), os.environ.get("PYTHONPATH", "")]))
    env.pop("CUDA_VISIBLE_DEVICES", None)
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", os.path.join(HERE, "interp_cases.py"), "-q", "-p", "no:cacheprovider",
         "-x", "--no-header"], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
    assert " passed" in proc.stdout and "skipped" not in proc.stdout, proc.stdout[-2000:]


SHAPES = {"llama8b": (4096, 14336), "qwen14b": (5120, 13824), "gemma9b": (3584, 14336)}


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=["bf16", "fp16", "fp32"])
@pytest.mark.parametrize("M", [1, 2, 4, 8, 16])
@pytest.mark.parametrize("mode", ["up", "gate", "pred"])
def test_full_shape(mode, M, dtype):
    D, N = SHAPES["llama8b"]
    c = make_case(M, D, N, dtype, "cuda", mode, sparsity=0.7, rank=512, seed=M)
    density = check(c, *run_kernel(c))
    assert 0.2 < density < 0.4


@pytest.mark.gpu
@pytest.mark.parametrize("shape,act,mode,bias", [("gemma9b", "gelu_tanh", "up", False),
                                                 ("qwen14b", "silu", "coef", True),
                                                 ("qwen14b", "silu", "pred", True)])
@pytest.mark.parametrize("sparsity", [0.0, 0.9, 1.0])
def test_other_shapes(shape, act, mode, bias, sparsity):
    D, N = SHAPES[shape]
    c = make_case(3, D, N, torch.bfloat16, "cuda", mode, act=act, bias=bias, sparsity=sparsity, rank=256)
    check(c, *run_kernel(c))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("M", [1, 2, 3, 16])
@pytest.mark.parametrize("mode", ["up", "gate", "pred"])
def test_gather_side_full_shape(mode, M, dtype):
    """The sparse side as a gather over the compacted union (config sparse_side="gather"): correct,
    deterministic, and in agreement with the masked side (ops choose between them for speed only): the same
    mask; the same coefficients bit for bit where the gather runs tl.dot (a step of a few tokens sums its dots
    on the FMA units, CONFIG["gather_no_dot"]: within rounding); the output within rounding (the down kernel
    walks the union in another order)."""
    D, N = SHAPES["llama8b"]
    c = make_case(M, D, N, dtype, "cuda", mode, sparsity=0.9, rank=512, seed=M, bias=M == 16)
    y, a = run_kernel(c, config={"sparse_side": "gather"})
    check(c, y, a)
    with deterministic():
        y_fixed = run_kernel(c, config={"sparse_side": "gather"})[0]
        assert torch.equal(run_kernel(c, config={"sparse_side": "gather"})[0], y_fixed)
    assert rel_err(y_fixed, y) <= TOL[dtype]
    y_masked, a_masked = run_kernel(c, config={"sparse_side": "masked"})
    assert torch.equal(a_masked != 0, a != 0)
    if M > triton_ffn.CONFIG["gather_no_dot"]["max_tokens"]:
        assert torch.equal(a_masked, a)
    assert rel_err(a, a_masked) <= TOL[dtype] and rel_err(y, y_masked) <= TOL[dtype]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("M", [3, 5])
@pytest.mark.parametrize("mode", ["up", "pred"])
def test_no_dot_padded_token_tile_full_shape(mode, M, dtype):
    """The FMA gather and logits forced past the default max_tokens: token tiles of 4 and 8 with padding tokens
    (the interpreter covers them on small shapes; the default runs them at 1 and 2 tokens only): correct, and
    the same mask as the masked side."""
    D, N = SHAPES["llama8b"]
    c = make_case(M, D, N, dtype, "cuda", mode, sparsity=0.9, rank=512, seed=M, bias=True)
    limit = {"max_tokens": 8}
    y, a = run_kernel(c, config={"sparse_side": "gather", "gather_no_dot": limit, "coef_no_dot_pred": limit})
    check(c, y, a)
    y_masked, a_masked = run_kernel(c, config={"sparse_side": "masked"})
    assert torch.equal(a_masked != 0, a != 0)
    assert rel_err(a, a_masked) <= TOL[dtype] and rel_err(y, y_masked) <= TOL[dtype]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("M", [1, 2])
def test_lowrank_layouts_agree_full_shape(M, dtype):
    """h = x V in one FMA launch (V stored transposed, as the rewrite stores it) or split over d_model and
    reduced (V row-major): the same mask, the coefficients and output within rounding, each correct."""
    D, N = SHAPES["llama8b"]
    fma = make_case(M, D, N, dtype, "cuda", "pred", sparsity=0.9, rank=480, seed=M, v_layout="transposed")
    rows = dict(fma, pred_v=fma["pred_v"].contiguous())
    assert fma["pred_v"].stride(0) == 1 and rows["pred_v"].stride(1) == 1
    y, a = run_kernel(fma)
    check(fma, y, a)
    y_rows, a_rows = run_kernel(rows)
    check(rows, y_rows, a_rows)
    assert torch.equal(a != 0, a_rows != 0)
    assert rel_err(a, a_rows) <= TOL[dtype] and rel_err(y, y_rows) <= TOL[dtype]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("M", [1, 2, 4, 16])
@pytest.mark.parametrize("mode,side", [("up", "gather"), ("up", "masked"), ("pred", "gather"), ("pred", "masked")])
def test_atomic_sums_full_shape(mode, side, M, dtype):
    """CONFIG sum_splits "atomic" on the GPU (fp32 atomics from every share, the last share of a column block
    casts): against fp64, and against the reduce launch within the rounding of another summation order."""
    D, N = SHAPES["llama8b"]
    c = make_case(M, D, N, dtype, "cuda", mode, bias=True, sparsity=0.8, rank=512, seed=40 + M)
    y, a = run_kernel(c, config={"sparse_side": side, "sum_splits": "reduce"})
    for _ in range(3):
        y_atomic, a_atomic = run_kernel(c, config={"sparse_side": side, "sum_splits": "atomic"})
        check(c, y_atomic, a_atomic)
        assert torch.equal(a_atomic, a)
        assert rel_err(y_atomic, y) <= TOL[dtype]


@pytest.mark.gpu
def test_deterministic_gpu():
    """Under torch.use_deterministic_algorithms the output repeats bit for bit (the reduce launch sums the
    down launch's shares in a fixed order); the default (atomic sums) repeats within rounding."""
    c = make_case(8, 4096, 14336, torch.bfloat16, "cuda", "pred", sparsity=0.5, rank=512)
    with deterministic():
        y1, _ = run_kernel(c)
        for _ in range(3):
            assert torch.equal(run_kernel(c)[0], y1)
    assert triton_ffn.CONFIG["sum_splits"] == "atomic"
    for _ in range(3):
        assert rel_err(run_kernel(c)[0], y1) <= TOL[torch.bfloat16]


@pytest.mark.parametrize("config,named", [({"gather_one_token": None}, "gather_one_token"),
                                          ({"gather": {"BLOCK_RG": 16, "block_k": 64}}, "block_k")])
def test_unknown_config_keys_are_refused(config, named):
    """A misspelt or renamed kernel config override fails loudly instead of running the defaults."""
    c = make_case(1, 37, 97, torch.bfloat16, "cpu", "up", sparsity=0.5)
    with pytest.raises(ValueError, match=named):
        run_kernel(c, config=config)
