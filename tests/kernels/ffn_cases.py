"""Shared by the interpreter (CPU) and GPU kernel tests: random FFN cases and the check against fp64.

The check looks inside: `sparse_ffn(..., return_coef=True)` also returns the masked coefficients a, so
the test sees the kernel's own keep mask (a != 0). It asserts that
  1. the kernel keeps exactly the neurons the fp64 reference keeps, except where the fp64 score lies
     within a few ulps of the threshold (both answers are right there: the kernel's score is rounded to
     the input dtype like the reference's) or the coefficient is exactly zero (relu);
  2. a matches the fp64 coefficients on that mask, and y matches the fp64 FFN on that mask,
     within dtype tolerances (norm-wise relative error).
"""

from __future__ import annotations

import contextlib

import torch

from countdown_fx.kernels import reference, triton_ffn

TOL = {torch.float32: 1e-5, torch.float16: 3e-3, torch.bfloat16: 1e-2}
ULP = {torch.float32: 2.0 ** -23, torch.float16: 2.0 ** -10, torch.bfloat16: 2.0 ** -7}
MODES = {"gate": triton_ffn.MODE_GATE, "up": triton_ffn.MODE_UP, "coef": triton_ffn.MODE_COEF,
         "pred": triton_ffn.MODE_PRED}


def make_case(M, D, N, dtype, device, mode, act="silu", bias=False, sparsity=0.5, rank=16, seed=0,
              fused=False, v_layout="transposed"):
    """Random inputs, rounded to dtype; `sparsity` 0.0 keeps every neuron, 1.0 none, else a quantile of
    the fp64 scores of these very tokens (realistic per-token variation). The predictor's V [D, rank] is
    stored as the rewrite stores it (v_layout "transposed": a transposed view of a contiguous V^T) or
    row-major ("rows")."""
    g = torch.Generator(device=device).manual_seed(seed)  # on the GPU: full-shape cases in milliseconds

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, device=device) * scale).to(dtype)

    c = dict(M=M, D=D, N=N, dtype=dtype, mode=mode, act=act, x=rnd(M, D))
    if fused:  # gate and up as row slices of one [2N, D] weight (Phi-3 style): views with contiguous rows
        w = rnd(2 * N, D, scale=D ** -0.5)
        c["w_gate"], c["w_up"] = w[:N], w[N:]
    else:
        c["w_gate"], c["w_up"] = rnd(N, D, scale=D ** -0.5), rnd(N, D, scale=D ** -0.5)
    c["w_down_t"] = rnd(N, D, scale=N ** -0.5)
    c["b_gate"] = rnd(N, scale=0.1) if bias else None
    c["b_up"] = rnd(N, scale=0.1) if bias else None
    c["b_down"] = rnd(D, scale=0.1) if bias else None
    c["pred_v"] = c["pred_u"] = None
    if mode == "pred":
        v = torch.randn(D, rank, generator=g, device=device) * D ** -0.5  # fp32 predictor
        c["pred_v"] = {"transposed": v.t().contiguous().t(), "rows": v}[v_layout]
        c["pred_u"] = torch.randn(N, rank, generator=g, device=device)
    s = scores64(c)
    if sparsity <= 0.0:
        thr = -1e30
    elif sparsity >= 1.0:
        thr = 1e30
    else:
        thr = torch.quantile(s.flatten().float().cpu(), sparsity).item()
    c["thr"] = torch.tensor(thr, dtype=torch.float32, device=device)
    return c


@contextlib.contextmanager
def deterministic():
    """torch.use_deterministic_algorithms(True) meanwhile: the kernels then sum the down launch's shares in a
    fixed order (CONFIG sum_splits "reduce"), so repeated calls give the same bits. warn_only: the fp64
    references' cuBLAS calls would otherwise need CUBLAS_WORKSPACE_CONFIG."""
    was, was_warn = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(was, warn_only=was_warn)


def _d(t):
    return None if t is None else t.double()


def coefs64(c):
    act_g, u = reference.gate_up(c["x"].double(), c["w_gate"].double(), c["w_up"].double(), _d(c["b_gate"]),
                                 _d(c["b_up"]), c["act"])
    return act_g, u


def scores64(c):
    if c["mode"] == "pred":
        return reference.predictor_logits(c["x"].double(), c["pred_v"].double(), c["pred_u"].double())
    act_g, u = coefs64(c)
    return reference.score(c["mode"], act_g, u)


def run_kernel(c, config=None):
    mode = MODES[c["mode"]]
    return triton_ffn.sparse_ffn(c["x"], c["w_gate"], c["w_up"], c["w_down_t"], c["b_gate"], c["b_up"],
                                 c["b_down"], c["act"], mode, c["thr"], c["pred_v"], c["pred_u"],
                                 config=config, return_coef=True)


def rel_err(got, want):
    got, want = got.double(), want.double()
    scale = want.norm()
    if scale == 0:
        return got.abs().max().item()
    return ((got - want).norm() / scale).item()


def check(c, y, a):
    dtype = c["dtype"]
    assert y.shape == (c["M"], c["D"]) and y.dtype == dtype
    assert torch.isfinite(y).all() and torch.isfinite(a).all()
    act_g, u = coefs64(c)
    a64 = act_g * u
    s64 = scores64(c)
    thr = c["thr"].double()
    keep_ref = s64 > thr
    keep_k = a != 0
    disagree = keep_k != keep_ref
    # Scores within a few rounding steps of the threshold may fall either way (16-bit scores are rounded
    # like the reference's; predictor logits come from fp32-grade 3xTF32 dots).
    width = 8 * ULP[dtype] if c["mode"] != "pred" else 1e-4
    borderline = (s64 - thr).abs() <= width * (thr.abs() + s64.abs().mean())
    harmless = borderline | (a64 == 0)
    assert not (disagree & ~harmless).any(), f"{int((disagree & ~harmless).sum())} neurons wrongly kept/dropped"
    flips = (disagree & (a64 != 0)).sum().item()  # borderline flips: allowed, but must stay rare
    assert flips <= max(2, 0.02 * disagree.numel()), f"{flips} borderline flips"
    a_ref = a64 * keep_k
    tol = TOL[dtype]
    ea = rel_err(a, a_ref)
    y_ref = reference.down(a_ref, c["w_down_t"].double(), _d(c["b_down"]))
    ey = rel_err(y, y_ref)
    assert ea <= tol and ey <= tol, f"coefficient error {ea:.2e}, output error {ey:.2e}, tolerance {tol:.0e}"
    return keep_k.float().mean().item()
