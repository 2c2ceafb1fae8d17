"""The countdown::* ops: opcheck on every op, CUDA dispatch to the kernels, torch.compile with CUDA graphs."""

import os
import sys
import warnings

import pytest
import torch
from torch._dynamo.utils import counters

from countdown_fx.kernels import ops, reference

sys.path.insert(0, os.path.dirname(__file__))
from ffn_cases import deterministic  # noqa: E402


def _ffn(M, D, N, dtype=torch.float32, device="cpu", bias=False, seq=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s, scale=1.0: (torch.randn(*s, generator=g) * scale).to(dtype=dtype, device=device)  # noqa: E731
    x = r(M, D) if seq is None else r(M, seq, D)
    return (x, r(N, D, scale=D ** -0.5), r(N, D, scale=D ** -0.5), r(N, D, scale=N ** -0.5),
            r(N, scale=0.1) if bias else None, r(N, scale=0.1) if bias else None, r(D, scale=0.1) if bias else None)


def _args(op, ffn, device="cpu", decode_only=True, D=None, N=None):
    D, N = ffn[1].shape[1], ffn[1].shape[0]
    if op == "topk":
        return (*ffn, "silu", "up", 0.7, decode_only)
    if op == "threshold":
        return (*ffn, "silu", "up", torch.tensor(0.5, device=device), decode_only)
    g = torch.Generator().manual_seed(1)
    pv = (torch.randn(D, 8, generator=g) * D ** -0.5).to(device)
    pu = torch.randn(N, 8, generator=g).to(device)
    return (*ffn, "silu", pv, pu, torch.tensor(0.3, device=device), decode_only)


OPS = {"topk": torch.ops.countdown.topk_ffn.default, "threshold": torch.ops.countdown.threshold_ffn.default,
       "predictor": torch.ops.countdown.predictor_ffn.default}
REFS = {"threshold": reference.threshold_ffn, "predictor": reference.predictor_ffn}


@pytest.mark.parametrize("op", list(OPS))
@pytest.mark.parametrize("bias,seq,decode_only", [(False, None, True), (True, 1, True), (False, 5, True),
                                                  (True, 5, False)])
def test_opcheck_cpu(op, bias, seq, decode_only):
    ffn = _ffn(3, 24, 40, bias=bias, seq=seq)
    torch.library.opcheck(OPS[op], _args(op, ffn, decode_only=decode_only))


@pytest.mark.gpu
@pytest.mark.parametrize("op", list(OPS))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("seq", [None, 1, 5])
def test_opcheck_cuda(op, dtype, seq):
    ffn = _ffn(2, 256, 512, dtype=dtype, device="cuda", bias=True, seq=seq)
    torch.library.opcheck(OPS[op], _args(op, ffn, "cuda"))


@pytest.mark.gpu
@pytest.mark.parametrize("op", ["threshold", "predictor"])
@pytest.mark.parametrize("M,seq", [(1, 1), (4, 1), (16, None), (17, None), (2, 7)])
@pytest.mark.parametrize("gather_max_tokens", [0, 16])
def test_cuda_op_matches_reference(op, M, seq, gather_max_tokens):
    """fp32 (IEEE dots: no borderline flips at this size): the op equals the reference for decode with
    the kernels (either sparse side), decode batches over the kernel limit, and prefill (dense)."""
    ffn = _ffn(M, 384, 1000, device="cuda", bias=True, seq=seq, seed=M)
    args = _args(op, ffn, "cuda")
    got = OPS[op](*args, gather_max_tokens, 0)
    if seq is not None and seq > 1:
        want = reference.dense_ffn(*ffn, "silu")
    else:
        want = REFS[op](*args[:-1])
    torch.testing.assert_close(got, want, rtol=2e-5, atol=2e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("op", ["threshold", "predictor"])
def test_cuda_op_without_neurons_is_its_down_bias(op):
    """d_inter = 0 (no neuron to keep): the op is b_down, from the reference (the kernels need one neuron)."""
    x, w = torch.randn(2, 1, 64, device="cuda"), torch.empty(0, 64, device="cuda")
    ffn = (x, w, w, w, torch.empty(0, device="cuda"), torch.empty(0, device="cuda"), torch.randn(64, device="cuda"))
    got = OPS[op](*_args(op, ffn, "cuda"), 16, 0)
    torch.testing.assert_close(got, ffn[-1].expand_as(got))


@pytest.mark.gpu
@pytest.mark.parametrize("op", ["threshold", "predictor"])
def test_cuda_backward_matches_reference(op):
    """The forward runs the kernels, the backward differentiates the reference with the mask held fixed."""
    ffn = [t.requires_grad_(True) if t is not None else None
           for t in _ffn(2, 96, 160, device="cuda", bias=True, seq=1)]
    args = _args(op, ffn, "cuda")
    grads = torch.autograd.grad(OPS[op](*args).square().sum(), [t for t in ffn if t is not None])
    ref = [t.detach().clone().requires_grad_(True) if t is not None else None for t in ffn]
    rargs = _args(op, ref, "cuda")
    want = torch.autograd.grad(REFS[op](*rargs[:-1]).square().sum(), [t for t in ref if t is not None])
    for g, w in zip(grads, want):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("op", ["threshold", "predictor"])
def test_compiled_cudagraphs(op):
    """Inductor sees the Triton kernels (no fallback op in the graph) and CUDA-graph replays stay right."""
    from torch._inductor.utils import run_and_get_code

    ffn = _ffn(4, 512, 1536, dtype=torch.bfloat16, device="cuda", seq=1)
    args = list(_args(op, ffn, "cuda"))

    def f(x, *rest):
        return OPS[op](x, *rest)

    cf = torch.compile(f, mode="reduce-overhead", fullgraph=True)
    _, code = run_and_get_code(cf, *args)
    src = "\n".join(code)
    assert "_coef_kernel" in src and "_down_kernel" in src
    assert "countdown.threshold_ffn" not in src and "countdown.predictor_ffn" not in src
    if op == "threshold":  # (the predictor's h = x V has a reduce launch of its own at 4 tokens)
        assert "def _reduce_kernel(" not in src
    for seed in range(4):  # replays on fresh inputs; atomic sums (the default): within rounding
        args[0] = torch.randn(4, 1, 512, generator=torch.Generator().manual_seed(seed)).to("cuda", torch.bfloat16)
        want = OPS[op](*args)
        torch.testing.assert_close(cf(*args), want, rtol=1e-2, atol=1e-2)
    # deterministic algorithms: a compile of its own (Dynamo guards on the flag) with the reduce launch, the
    # same bits as eager
    with deterministic():
        _, code = run_and_get_code(cf, *args)
        assert "def _reduce_kernel(" in "\n".join(code)
        for seed in range(4):
            args[0] = torch.randn(4, 1, 512, generator=torch.Generator().manual_seed(seed)).to("cuda", torch.bfloat16)
            assert torch.equal(cf(*args), OPS[op](*args))


@pytest.mark.gpu
@pytest.mark.parametrize("op", ["threshold", "predictor"])
def test_pdl_launches_match_the_plain_ones(op, monkeypatch):
    """CONFIG["pdl"]: eager calls launch the kernels with the PDL attribute through triton, compiled ones through
    Inductor and pdl_launch's hook (compiled in this process, as the countdown backend asks); under CUDA graphs
    both give the plain launches' bits (fixed-order sums, so an ordering bug cannot hide in a tolerance)."""
    from countdown_fx.kernels import pdl_launch, triton_ffn

    given = []
    with_launch_pdl = pdl_launch.with_launch_pdl

    def spy(compile_meta, fn):
        out = with_launch_pdl(compile_meta, fn)
        given.append((pdl_launch.kernel_name(fn), out.get("launch_pdl", False)))
        return out

    monkeypatch.setattr(pdl_launch, "with_launch_pdl", spy)
    monkeypatch.setitem(triton_ffn.CONFIG, "sum_splits", "reduce")
    ffn = _ffn(4, 512, 1536, dtype=torch.bfloat16, device="cuda", seq=1)
    args = list(_args(op, ffn, "cuda"))
    plain = OPS[op](*args)
    monkeypatch.setitem(triton_ffn.CONFIG, "pdl", True)
    torch._dynamo.reset()
    assert torch.equal(OPS[op](*args), plain)  # eager: triton's launch_pdl

    def f(x, *rest):
        return OPS[op](x, *rest)

    monkeypatch.setattr(pdl_launch, "_untraceable_warned", False)
    counters.clear()
    with torch._inductor.config.patch(compile_threads=1, fx_graph_cache=False), \
            warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cf = torch.compile(f, mode="reduce-overhead", fullgraph=True)
        cf(*args)  # compiles here, in this process
    assert not counters["inductor"]["cudagraph_skips"]  # no kernel argument taken as written
    with_pdl = {name for name, pdl in given if pdl}
    if pdl_launch.traceable():
        assert {"_coef_kernel", "_down_kernel", "_reduce_kernel"} <= with_pdl, given
        assert not {name for name, pdl in given if not pdl} & pdl_launch.KERNELS, given
    else:  # triton <= 3.6: compiled without PDL, said once
        assert not with_pdl, given
        assert [w for w in caught if "gdc_wait" in str(w.message)]
    for seed in range(4):
        args[0] = torch.randn(4, 1, 512, generator=torch.Generator().manual_seed(seed)).to("cuda", torch.bfloat16)
        monkeypatch.setitem(triton_ffn.CONFIG, "pdl", False)
        want = OPS[op](*args)
        monkeypatch.setitem(triton_ffn.CONFIG, "pdl", True)
        assert torch.equal(cf(*args), want)
    torch._dynamo.reset()


class _FixedCalibration:
    """Duck-typed calibration for the backend: fixed thresholds, random predictors (no calibration run)."""

    def __init__(self, config):
        self.config = config

    def check_sites(self, sites, samples=None):
        self.sites = {site.key: site for site in sites}
        return {key: key for key in self.sites}

    def state_for(self, key):
        site = self.sites[key]
        if self.config.method != "d-countdown":
            return {"threshold": torch.tensor(0.4)}
        g = torch.Generator().manual_seed(len(site.key))
        return {"pred_v": torch.randn(site.d_model, 8, generator=g) / site.d_model ** 0.5,
                "pred_u": torch.randn(site.d_inter, 8, generator=g), "tau": torch.tensor(0.0)}

    def decode_plan(self, key):
        return ops.DecodePlan(gather_max_tokens=2)  # the 2-token steps below read gate/up by gather


@pytest.mark.gpu
@pytest.mark.parametrize("method", ["m-countdown", "d-countdown"])
def test_tiny_llama_reduce_overhead(method):
    pytest.importorskip("transformers")
    backend = pytest.importorskip("countdown_fx.backend")
    from torch._inductor.utils import run_and_get_code

    from countdown_fx.config import CountDownConfig
    from tiny_models import hf_model

    cal = _FixedCalibration(CountDownConfig(method=method, sparsity=0.5, regime="prac"))
    opts = {"method": method, "sparsity": 0.5, "regime": "prac", "calibration": cal}
    model = hf_model("llama")  # fp32: the CPU reference path and the CUDA kernels agree to rounding
    ids = [torch.randint(0, 97, (2, 1), generator=torch.Generator().manual_seed(s)) for s in range(3)]
    with torch.no_grad():
        cpu_ref = torch.compile(model, backend=backend.eager_backend(opts))
        want = [cpu_ref(input_ids=i, use_cache=False).logits for i in ids]
        dense = [model(input_ids=i, use_cache=False).logits for i in ids]
        torch._dynamo.reset()
        model = model.cuda()
        before = backend.counters["sites_rewritten"]
        compiled = torch.compile(model, backend="countdown", options={**opts, "mode": "reduce-overhead"})
        _, code = run_and_get_code(compiled, input_ids=ids[0].cuda(), use_cache=False)
        for _ in range(3):  # warm-up, record, replay
            got = [compiled(input_ids=i.cuda(), use_cache=False).logits.cpu() for i in ids]
    assert backend.counters["sites_rewritten"] - before >= 2
    src = "\n".join(code)
    assert "_coef_kernel" in src
    if method == "d-countdown":  # V stored transposed reaches the kernels so: h = x V in one launch at 2 tokens
        assert "_lowrank_no_dot_kernel" in src and "_lowrank_kernel" not in src
    for g_, w_, d_ in zip(got, want, dense):
        assert not torch.allclose(w_, d_, rtol=1e-3, atol=1e-3)  # sparsity changed the output
        torch.testing.assert_close(g_, w_, rtol=1e-4, atol=1e-4)


def test_kernel_launcher_refuses_mismatched_shapes():
    """The kernels have no bounds checks of their own: a bias or weight of the wrong size is refused before
    launch, naming the tensor (checked without launching anything, so it runs on CPU)."""
    from countdown_fx.kernels import triton_ffn

    D, N = 8, 12
    w = torch.randn(N, D)
    x = torch.randn(2, D)
    thr = torch.zeros(1)
    with pytest.raises(ValueError, match=r"b_gate has shape \(24,\), expected \(12,\)"):
        triton_ffn.sparse_ffn(x, w, w, w, torch.zeros(2 * N), None, None, "silu", triton_ffn.MODE_UP, thr)
    with pytest.raises(ValueError, match=r"w_down_t has shape \(8, 12\)"):
        triton_ffn.sparse_ffn(x, w, w, w.t(), None, None, None, "silu", triton_ffn.MODE_UP, thr)
