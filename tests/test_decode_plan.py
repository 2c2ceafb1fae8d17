"""The per-site decode plan: which sparse side a decode step uses, and when a site runs the dense FFN.

The plan comes from the union of masks measured at calibration (Calibration.site_union_by_batch) and
travels as two int arguments of the countdown op, so it is fixed at rewrite time and needs no sync.
"""

import copy
import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import countdown_fx
from countdown_fx.calibration import calibrate
from countdown_fx.config import CountDownConfig
from countdown_fx.kernels import ops, reference
from countdown_fx.meter import SparsityMeter, metered
from tiny_models import GptFastFeedForward, Stack

BATCHES = [1, 2, 4, 8, 16]


@settings(max_examples=200, deadline=None)
@given(st.lists(st.floats(0.0, 1.0), min_size=5, max_size=5), st.sampled_from(["threshold", "predictor"]))
def test_plan_stays_on_the_safe_side_of_both_bounds(steps, kind):
    union = dict(zip(BATCHES, sorted(steps)))  # the union of B tokens' masks grows with B
    plan = ops.decode_plan(kind, union)
    dense_bound = ops.DENSE_MIN_UNION[kind]
    gathered = [b for b in BATCHES if b <= plan.gather_max_tokens]
    assert all(union[b] <= ops.gather_max_union(kind, b) for b in gathered)
    # the first size past the plan is over its bound (the union grows with B, so is every later one)
    first_out = next((b for b in BATCHES if b > plan.gather_max_tokens), None)
    assert first_out is None or union[first_out] > ops.gather_max_union(kind, first_out)
    if plan.dense_min_tokens:
        assert union[plan.dense_min_tokens] >= dense_bound
        assert all(union[b] < dense_bound for b in BATCHES if b < plan.dense_min_tokens)
    else:
        assert all(union[b] < dense_bound for b in BATCHES)


def test_plan_of_typical_unions():
    # D-CountDown at s=0.9 on the benchmark layer: union 0.10 / 0.35 / 0.82 at B = 1 / 4 / 16
    union = {1: 0.10, 2: 0.19, 4: 0.35, 8: 0.6, 16: 0.82}
    assert ops.decode_plan("predictor", union) == ops.DecodePlan(gather_max_tokens=4, dense_min_tokens=16)
    assert ops.decode_plan("threshold", union) == ops.DecodePlan(gather_max_tokens=4, dense_min_tokens=0)
    # M-CountDown at s=0.7: union 0.30 at B = 1 -> gather; 0.5 at B = 2 -> masked; full at 16 -> masked
    union = {1: 0.30, 2: 0.5, 4: 0.68, 8: 0.9, 16: 0.995}
    assert ops.decode_plan("threshold", union) == ops.DecodePlan(gather_max_tokens=1, dense_min_tokens=16)
    # between the bounds (0.35 < 0.38 <= 0.4): D-CountDown still gathers at B=4, M-CountDown does not
    union = {1: 0.10, 2: 0.19, 4: 0.38, 8: 0.6, 16: 0.82}
    assert ops.decode_plan("predictor", union).gather_max_tokens == 4
    assert ops.decode_plan("threshold", union).gather_max_tokens == 2
    assert ops.decode_plan("predictor", {}) == ops.DecodePlan()  # nothing measured: masked side, never dense
    # one token at union 0.6: D-CountDown gathers (its one-token bound), M-CountDown does not
    union = {1: 0.6, 2: 0.75, 4: 0.85, 8: 0.9, 16: 0.99}
    assert ops.decode_plan("predictor", union).gather_max_tokens == 1
    assert ops.decode_plan("threshold", union).gather_max_tokens == 0


def _site(D=24, N=40, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s, scale=1.0: torch.randn(*s, generator=g) * scale  # noqa: E731
    ffn = (r(N, D, scale=D ** -0.5), r(N, D, scale=D ** -0.5), r(N, D, scale=N ** -0.5),
           r(N, scale=0.1) if bias else None, r(N, scale=0.1) if bias else None, r(D, scale=0.1) if bias else None)
    rule = {"threshold": ("silu", "up", torch.tensor([0.5])),
            "predictor": ("silu", r(D, 8, scale=D ** -0.5), r(N, 8), torch.tensor([0.3]))}
    return ffn, rule


@pytest.mark.parametrize("kind", ["threshold", "predictor"])
def test_steps_of_dense_min_tokens_or_more_run_the_dense_ffn(kind):
    ffn, rule = _site()
    op = getattr(torch.ops.countdown, f"{kind}_ffn").default
    sparse_ref = getattr(reference, f"{kind}_ffn")
    for tokens, seq, decode_only, dense in [(3, 1, True, False), (4, 1, True, True), (6, None, True, True),
                                            (4, 5, False, False)]:  # a 5-token prefill under apply_to="all"
        x = torch.randn(tokens, seq, 24) if seq else torch.randn(tokens, 24)
        got = op(x, *ffn, *rule[kind], decode_only, 2, 4)
        want = reference.dense_ffn(x, *ffn, "silu") if dense else sparse_ref(x, *ffn, *rule[kind])
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
        assert dense or (got - reference.dense_ffn(x, *ffn, "silu")).abs().max() > 1e-3  # really sparse there
        torch.library.opcheck(op, (x, *ffn, *rule[kind], decode_only, 2, 4))


@pytest.fixture(scope="module")
def d_calibration():
    torch.manual_seed(0)
    model = Stack(GptFastFeedForward).eval()
    batches = [torch.randn(4, 16, 32) for _ in range(3)]
    cfg = CountDownConfig(method="d-countdown", sparsity=0.7, regime="prac", predictor_steps=5,
                          predictor_batch_tokens=64)
    return model, calibrate(model, batches, cfg, progress=False)


def _nearly_full_from_4_tokens(cal):
    """A copy of `cal` as if calibration had seen nearly full unions from 4 tokens on."""
    cal = copy.deepcopy(cal)
    for key in cal.sites:
        cal.stats[key]["union_by_batch"] = {"2": 0.5, "4": 0.8, "8": 0.9, "16": 0.95}
        cal.stats[key]["realised_sparsity"] = 0.8
    return cal


def test_rewrite_carries_the_calibrated_plan_and_the_meter_counts_dense_steps(d_calibration):
    model, cal = d_calibration
    key = next(iter(cal.sites))
    assert cal.decode_plan(key) == ops.decode_plan("predictor", cal.site_union_by_batch(key))
    cal = _nearly_full_from_4_tokens(cal)
    assert {cal.decode_plan(key) for key in cal.sites} == {ops.DecodePlan(gather_max_tokens=1, dense_min_tokens=4)}
    assert "DENSE FFN" in cal.report() and "at least 4 tokens" in cal.report()

    meter = SparsityMeter()
    net = metered(model, {"calibration": cal}, meter)
    with torch.no_grad():
        small, large = torch.randn(2, 1, 32), torch.randn(4, 1, 32)
        sparse_out = net(small)
        assert meter.dense_calls["decode"] == 0 and meter.sparsity > 0.3
        assert (sparse_out - model(small)).abs().max() > 1e-3
        kept_small = meter.kept
        dense_out = net(large)  # 4 tokens: both sites run the dense FFN, and the meter says so
        torch.testing.assert_close(dense_out, model(large), rtol=1e-5, atol=1e-5)
    assert meter.dense_calls["decode"] == 2 and "2 of them dense" in meter.report()
    assert meter.kept == kept_small + 2 * 4 * 72 and meter.total == 2 * 6 * 72


def test_a_shifted_tau_forgets_the_measured_unions(d_calibration):
    _, cal = d_calibration
    shifted = cal.with_tau(0.0)
    assert all(shifted.site_union_by_batch(key) == {} for key in shifted.sites)
    assert {shifted.decode_plan(key) for key in shifted.sites} == {ops.DecodePlan()}
    assert "masked side) at every batch size" in shifted.report()


def _plans_in(program):
    calls = [ops.bound_args(n.target, n.args, n.kwargs) for n in program.graph.nodes if n.target in ops.COUNTDOWN_OPS]
    return {(a["gather_max_tokens"], a["dense_min_tokens"]) for a in calls}


def test_export_keeps_the_dense_rule_only_with_a_fixed_batch(d_calibration):
    """A program exported with a dynamic batch cannot branch on the batch size when it runs, so sparsify
    drops the dense rule there (with a warning) and keeps it when the batch is fixed, a dynamic sequence dim
    included (which gets its own warning: AOTInductor would build such a program's prefill branch only)."""
    from torch.export import Dim

    model, cal = d_calibration
    cal = _nearly_full_from_4_tokens(cal)
    x = torch.randn(4, 1, 32)
    fixed = countdown_fx.sparsify(torch.export.export(model, (x,)), cal)
    assert _plans_in(fixed) == {(1, 4)}
    torch.testing.assert_close(fixed.module()(x), model(x), rtol=1e-5, atol=1e-5)  # 4 tokens: dense
    with pytest.warns(UserWarning, match="dynamic sequence dim under apply_to='decode'"):
        seq_dynamic = countdown_fx.sparsify(
            torch.export.export(model, (torch.randn(4, 3, 32),), dynamic_shapes=({1: Dim.DYNAMIC},)), cal)
    assert _plans_in(seq_dynamic) == {(1, 4)}
    torch.testing.assert_close(seq_dynamic.module()(x), model(x), rtol=1e-5, atol=1e-5)  # 4 tokens: dense
    with pytest.warns(UserWarning, match="batch dim is dynamic"):
        dynamic = countdown_fx.sparsify(torch.export.export(model, (x,), dynamic_shapes=({0: Dim.DYNAMIC},)), cal)
    assert _plans_in(dynamic) == {(1, 0)}
    for batch in (2, 5):  # every batch size runs sparse, as the eager reference with no dense rule does
        other = torch.randn(batch, 1, 32)
        assert (dynamic.module()(other) - model(other)).abs().max() > 1e-3
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing to warn about where no site has a dense rule
        countdown_fx.sparsify(torch.export.export(model, (x,), dynamic_shapes=({0: Dim.DYNAMIC},)),
                              d_calibration[1].with_tau(0.0))
        # nor where no call is a decode step: a fixed sequence of 3 tokens (prefill only) with a dynamic batch
        prefill = countdown_fx.sparsify(
            torch.export.export(model, (torch.randn(4, 3, 32),), dynamic_shapes=({0: Dim.DYNAMIC},)), cal)
    assert _plans_in(prefill) == {(1, 0)}


def test_d_countdown_reports_what_its_predictor_reaches_on_tokens_it_never_saw():
    """The predictor trains on the first batches; tau and the report come from held-out batches. Here the
    predictor (trained far too briefly on few tokens) overfits: on held-out tokens the realised sparsity
    must be what the calibrated tau gives there, which a fresh evaluation reproduces exactly (one layer:
    calibration observes the dense model, so deeper sites would see other inputs once sparse)."""
    torch.manual_seed(0)
    model = Stack(GptFastFeedForward, n=1).eval()
    batches = [torch.randn(4, 16, 32) for _ in range(5)]
    cfg = CountDownConfig(method="d-countdown", sparsity=0.7, regime="prac", predictor_steps=5,
                          predictor_batch_tokens=64)
    cal = calibrate(model, batches, cfg, progress=False)
    assert all(st["measured_on_held_out"] and st["tokens"] == 64 for st in cal.stats.values())
    assert "held-out calibration batches" in cal.report()
    meter = SparsityMeter()
    with torch.no_grad():  # every token of the held-out batch, as single-token decode steps
        metered(model, {"calibration": cal, "apply_to": "all"}, meter)(batches[-1])
    assert meter.sparsity == pytest.approx(cal.overall_sparsity(), abs=1e-9)
    with pytest.warns(UserWarning, match="one batch"):
        calibrate(model, batches[:1], cfg, progress=False)


def test_a_sweep_measures_thresholds_on_all_batches_and_predictors_on_held_out_ones():
    """Mixing methods in one sweep must not change what M-CountDown reports (it has nothing to hold out)."""
    from countdown_fx.calibration import calibrate_sweep

    torch.manual_seed(0)
    model = Stack(GptFastFeedForward, n=1).eval()
    batches = [torch.randn(4, 16, 32) for _ in range(5)]
    m_cfg = CountDownConfig(method="m-countdown", sparsity=0.7, regime="prac")
    d_cfg = CountDownConfig(method="d-countdown", sparsity=0.7, regime="prac", predictor_steps=5,
                            predictor_batch_tokens=64)
    alone = calibrate(model, batches, m_cfg, progress=False)
    m_swept, d_swept = calibrate_sweep(model, batches, [m_cfg, d_cfg], progress=False)
    assert m_swept.stats == alone.stats and all(st["tokens"] == 320 for st in alone.stats.values())
    assert not any(st["measured_on_held_out"] for st in alone.stats.values())
    assert all(st["measured_on_held_out"] and st["tokens"] == 64 for st in d_swept.stats.values())


def test_a_held_out_batch_too_small_for_tau_is_refused():
    model = Stack(GptFastFeedForward, n=1).eval()
    batches = [torch.randn(4, 16, 32) for _ in range(4)] + [torch.randn(1, 3, 32)]
    cfg = CountDownConfig(method="d-countdown", sparsity=0.7, regime="prac", predictor_steps=5,
                          predictor_batch_tokens=64)
    with pytest.raises(ValueError, match="held-out batches"):
        calibrate(model, batches, cfg, progress=False)


def test_dense_fallback_off_keeps_every_decode_step_sparse(d_calibration):
    """dense_fallback=False (what a quality evaluation of batched decode wants): a step of 4 tokens, where the
    plan would run the dense FFN, runs sparse, as the reference with no plan does; the meter counts no dense
    call."""
    model, cal = d_calibration
    cal = _nearly_full_from_4_tokens(cal)
    meter = SparsityMeter()
    net = metered(model, {"calibration": cal, "dense_fallback": False}, meter)
    large = torch.randn(4, 1, 32)
    with torch.no_grad():
        got = net(large)
        assert (got - model(large)).abs().max() > 1e-3
    assert meter.dense_calls["decode"] == 0 and meter.calls["decode"] == 2 and meter.sparsity > 0.3
    with pytest.raises(ValueError, match=r"dense_fallback=1 is not allowed; it must be True or False"):
        CountDownConfig(dense_fallback=1)


class _FlatBlock(torch.nn.Module):
    """An FFN fed flattened tokens (a MoE shared expert's x.view(-1, d)), from a contiguous or a transposed
    [batch, seq, d] tensor (the transposed one is no source the rewrite can use)."""

    def __init__(self, transposed=False):
        super().__init__()
        self.transposed, self.ffn = transposed, GptFastFeedForward(32, 72)

    def forward(self, h):
        if self.transposed:
            return h + self.ffn(h.transpose(0, 1).reshape(-1, h.shape[-1])).view(h.shape[1], h.shape[0], -1
                                                                                  ).transpose(0, 1)
        return h + self.ffn(h.view(-1, h.shape[-1])).view(h.shape)


@pytest.mark.parametrize("transposed", [False, True])
def test_apply_to_all_keeps_a_flattened_prefill_sparse(transposed):
    """apply_to='all' means every token sparse. A prefill of 8 tokens through a flattened FFN input must not be
    taken for a decode step of 8 single tokens, which the plan's dense rule would run dense: with the source in
    the graph the op sees the sequence dim; without it the site drops the dense rule."""
    from countdown_fx.backend import eager_backend

    torch.manual_seed(0)
    model = _FlatBlock(transposed).eval()
    cfg = CountDownConfig(method="d-countdown", sparsity=0.7, regime="prac", predictor_steps=5,
                          predictor_batch_tokens=64, apply_to="all")
    cal = _nearly_full_from_4_tokens(calibrate(model, [torch.randn(4, 16, 32) for _ in range(3)], cfg,
                                               progress=False))
    prefill = torch.randn(1, 8, 32)
    with torch.no_grad():
        torch._dynamo.reset()
        got = torch.compile(model, backend=eager_backend({"calibration": cal}), dynamic=False)(prefill)
        torch._dynamo.reset()
        want = torch.compile(model, backend=eager_backend({"calibration": cal, "dense_fallback": False}),
                             dynamic=False)(prefill)
        torch._dynamo.reset()
        assert (got - model(prefill)).abs().max() > 1e-3
    torch.testing.assert_close(got, want, rtol=0, atol=0)
