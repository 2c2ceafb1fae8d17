"""The reference semantics against independent computations written here, in float64."""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from countdown_fx.kernels import reference as R

ACTS = {"silu": F.silu, "gelu_tanh": lambda g: F.gelu(g, approximate="tanh"), "gelu": F.gelu, "relu": F.relu}


def _weights(d_model, d_inter, bias, seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    w = [torch.randn(d_inter, d_model, generator=g) / d_model**0.5 for _ in range(3)]
    b = [0.1 * torch.randn(n, generator=g) if bias else None for n in (d_inter, d_inter, d_model)]
    return [t.to(dtype) for t in w], [t.to(dtype) if t is not None else None for t in b]


def _per_token_topk_ffn64(x, w, b, act, score_name, sparsity):
    """Independent SP-Ideal: loop over tokens, sort the score, keep the first (1 - s) * d_inter."""
    x, w = x.double(), [t.double() for t in w]
    b = [t.double() if t is not None else torch.zeros(()) for t in b]
    d_inter = w[0].shape[0]
    n_keep = d_inter - round(sparsity * d_inter)
    out = []
    for tok in x.reshape(-1, x.shape[-1]):
        a_g = ACTS[act](w[0] @ tok + b[0])
        u = w[1] @ tok + b[1]
        s = {"gate": a_g.abs(), "up": u.abs(), "coef": (a_g * u).abs()}[score_name]
        keep = torch.argsort(s, descending=True)[:n_keep]
        out.append((a_g[keep] * u[keep]) @ w[2][keep] + b[2])
    return torch.stack(out).reshape(*x.shape[:-1], -1)


@pytest.mark.parametrize("score_name", ["gate", "up", "coef"])
@pytest.mark.parametrize("act", list(ACTS))
@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.9])
def test_topk_matches_independent_per_token_selection(score_name, act, sparsity):
    w, b = _weights(24, 53, bias=True, seed=1)
    x = torch.randn(2, 3, 24)
    got = R.topk_ffn(x, *w, *b, act, score_name, sparsity)
    want = _per_token_topk_ffn64(x, w, b, act, score_name, sparsity)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)


@settings(max_examples=40, deadline=None)
@given(d_inter=st.integers(1, 97), sparsity=st.floats(0.0, 0.99), tokens=st.integers(1, 5), seed=st.integers(0, 99))
def test_topk_keeps_exactly_one_minus_s_per_token(d_inter, sparsity, tokens, seed):
    scores = torch.randn(tokens, d_inter, generator=torch.Generator().manual_seed(seed))
    mask = R.topk_mask(scores, R.keep_count(d_inter, sparsity))
    expected = max(1, d_inter - round(sparsity * d_inter))
    assert mask.sum(-1).tolist() == [expected] * tokens
    # every kept score is >= every dropped score, per token
    for row, m in zip(scores, mask):
        if (~m).any():
            assert row[m].min() >= row[~m].max()


def test_sparsity_zero_is_the_dense_ffn():
    w, b = _weights(16, 40, bias=False, seed=2)
    x = torch.randn(5, 16)
    dense = F.linear(F.silu(F.linear(x, w[0])) * F.linear(x, w[1]), w[2].t())
    torch.testing.assert_close(R.topk_ffn(x, *w, *b, "silu", "up", 0.0), dense, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(R.dense_ffn(x, *w, *b, "silu"), dense, rtol=1e-6, atol=1e-6)


def test_threshold_and_predictor_keep_exactly_what_exceeds():
    w, b = _weights(16, 40, bias=True, seed=3)
    x = torch.randn(4, 16)
    t = torch.tensor(0.3)
    u = F.linear(x, w[1], b[1])
    a = F.silu(F.linear(x, w[0], b[0])) * u
    want = F.linear(a * (u.abs() > 0.3), w[2].t(), b[2])
    torch.testing.assert_close(R.threshold_ffn(x, *w, *b, "silu", "up", t), want)
    v, uu, tau = torch.randn(16, 4), torch.randn(40, 4), torch.tensor(0.1)
    want = F.linear(a * (((x @ v) @ uu.t()) > 0.1), w[2].t(), b[2])
    torch.testing.assert_close(R.predictor_ffn(x, *w, *b, "silu", v, uu, tau), want)
    # none kept -> only the down bias; all kept -> dense
    torch.testing.assert_close(R.threshold_ffn(x, *w, *b, "silu", "up", torch.tensor(1e9)), b[2].expand(4, -1))
    torch.testing.assert_close(R.threshold_ffn(x, *w, *b, "silu", "up", torch.tensor(-1.0)), R.dense_ffn(x, *w, *b, "silu"))


@pytest.mark.parametrize("score_name", ["gate", "up", "coef"])
def test_bf16_follows_fp32_within_bf16_rounding(score_name):
    w, b = _weights(64, 96, bias=False, seed=4)
    x = torch.randn(3, 64)
    ref = R.topk_ffn(x, *w, *b, "silu", score_name, 0.0)
    got = R.topk_ffn(x.bfloat16(), *[t.bfloat16() for t in w], *b, "silu", score_name, 0.0)
    # bf16 has an 8-bit mantissa: relative error ~2^-8 per rounding, a few roundings deep
    torch.testing.assert_close(got.float(), ref, rtol=3e-2, atol=3e-2 * ref.abs().max().item())
