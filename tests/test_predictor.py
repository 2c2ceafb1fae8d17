"""D-CountDown predictors: rank rule, oracle mask, streaming training, tau, determinism."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from _cal_helpers import dense_activations, random_batches, tiny_llama
from countdown_fx.calibration import calibrate
from countdown_fx.config import CountDownConfig
from countdown_fx.kernels import reference
from countdown_fx.passes.predictor import PredictorTrainer, default_rank, oracle_mask, predictor_fraction


def d_config(sparsity=0.7, **kw):
    kw = {"predictor_steps": 150, "predictor_batch_tokens": 128, "predictor_lr": 1e-2, "predictor_rank": 32, **kw}
    return CountDownConfig(method="d-countdown", sparsity=sparsity, regime="prac", **kw)


@settings(max_examples=50, deadline=None)
@given(d_model=st.integers(1, 6000), ratio=st.floats(0.5, 6.0))
def test_default_rank_is_the_largest_within_five_percent(d_model, ratio):
    d_inter = max(1, int(d_model * ratio))
    r = default_rank(d_model, d_inter)
    budget = 0.05 * 3 * d_model * d_inter
    largest = max([0] + [k for k in range(1, 513) if k * (d_model + d_inter) <= budget])
    assert r == max(1, largest)
    if largest >= 1:
        assert predictor_fraction(r, d_model, d_inter) <= 0.05 + 1e-12


def test_default_rank_at_llama_8b_shapes():
    assert default_rank(4096, 14336) == int(0.15 * 4096 * 14336 // (4096 + 14336))  # 477: below the 512 cap
    assert default_rank(8192, 28672) == 512


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), s=st.floats(0.0, 0.95))
def test_oracle_mask_keeps_the_largest_coefficients(seed, s):
    g = torch.Generator().manual_seed(seed)
    act_g, u = torch.randn(9, 50, generator=g), torch.randn(9, 50, generator=g)
    mask = oracle_mask(act_g, u, s)
    keep = reference.keep_count(50, s)
    assert (mask.sum(-1) == keep).all()
    a = (act_g * u).abs()
    kept_min = torch.where(mask, a, torch.inf).min(-1).values
    dropped_max = torch.where(mask, -torch.inf, a).max(-1).values
    assert (kept_min >= dropped_max).all()


def test_trainer_streams_with_a_bounded_buffer():
    g = torch.Generator().manual_seed(0)
    t = PredictorTrainer("k", 16, 40, 4, steps=1000, lr=1e-3, batch_tokens=50, seed=0)
    fed = 0
    for n in (7, 130, 1, 49, 200, 13):
        x = torch.randn(n, 16, generator=g)
        t.feed(x, torch.rand(n, 40, generator=g) > 0.5)
        fed += n
        assert t.step_count == fed // 50
        assert (0 if t._x is None else t._x.shape[0]) == fed % 50 < 50


def test_trainer_learns_a_low_rank_rule():
    """Data whose oracle is exactly low-rank predictable: recall must approach 1."""
    g = torch.Generator().manual_seed(1)
    w = torch.randn(24, 3, generator=g) @ torch.randn(3, 60, generator=g)
    t = PredictorTrainer("k", 24, 60, 6, steps=400, lr=3e-2, batch_tokens=256, seed=0)
    for _ in range(40):
        x = torch.randn(2560, 24, generator=g)
        t.feed(x, x @ w > 0.8)
    x = torch.randn(4000, 24, generator=g)
    truth = x @ w > 0.8
    pred = reference.predictor_logits(x, *t.state().values()) > 0
    recall = (pred & truth).sum() / truth.sum()
    assert t.done and recall > 0.9
    assert t.losses[-1] < t.losses[0] / 2


@pytest.fixture(scope="module")
def model():
    return tiny_llama(layers=2, hidden=48, inter=136, seed=3)


@pytest.fixture(scope="module")
def batches():
    return random_batches(10, batch=4, seq=64, seed=11)  # the predictor trains on 8, the last 2 are held out


@pytest.fixture(scope="module")
def trained(model, batches):
    """D-CountDown calibrations at two sparsities, from shared passes (calibrate_sweep)."""
    from countdown_fx.calibration import calibrate_sweep

    sparsities = (0.5, 0.8)
    return dict(zip(sparsities, calibrate_sweep(model, batches, [d_config(s) for s in sparsities], progress=False)))


@pytest.mark.parametrize("sparsity", [0.5, 0.8])
def test_predictor_on_a_tiny_model_beats_chance_and_meets_the_target(model, batches, trained, sparsity):
    """Recall and sparsity are measured on the held-out batches, which the predictor never trained on."""
    cal = trained[sparsity]
    chance = 1 - sparsity  # a random mask of the same density recalls this fraction of the oracle
    for key, stats in cal.stats.items():
        assert stats["steps"] == 150 and stats["rank"] == 32
        assert stats["measured_on_held_out"] and stats["tokens"] == 2 * 4 * 64
        assert stats["recall"] > chance + 0.1, (key, stats)
        assert stats["realised_sparsity"] == pytest.approx(sparsity, abs=0.01)  # tau chosen on these batches
    # independent check of one site's stats, from hooks rather than the graph path
    acts = dense_activations(model, batches[-2:])
    key = "model.layers.1.mlp"
    x, act_g, u = acts[key]
    st_ = cal.state[key]
    kept = reference.predictor_logits(x, st_["pred_v"], st_["pred_u"]) > st_["tau"]
    oracle = oracle_mask(act_g, u, sparsity)
    assert cal.stats[key]["recall"] == pytest.approx(((kept & oracle).sum() / oracle.sum()).item(), abs=1e-3)
    assert cal.stats[key]["precision"] == pytest.approx(((kept & oracle).sum() / kept.sum()).item(), abs=1e-3)
    assert "pred/FFN" in cal.report() and "recall" in cal.report()


def test_training_is_deterministic_and_seeded(model, batches):
    a = calibrate(model, batches[:2], d_config(predictor_steps=10), progress=False)
    b = calibrate(model, batches[:2], d_config(predictor_steps=10), progress=False)
    c = calibrate(model, batches[:2], d_config(predictor_steps=10, seed=1), progress=False)
    for key in a.state:
        for name in ("pred_v", "pred_u", "tau"):
            assert torch.equal(a.state[key][name], b.state[key][name])
        assert not torch.equal(a.state[key]["pred_v"], c.state[key]["pred_v"])


def test_fixed_tau_is_kept(model, batches):
    cal = calibrate(model, batches[:2], d_config(predictor_steps=5, tau=0.25), progress=False)
    assert all(float(s["tau"]) == 0.25 for s in cal.state.values())
    assert cal.config.tau == 0.25


def test_few_tokens_for_many_steps_warns(model, batches):
    few = batches[0][:1]  # 64 tokens, for 2 steps of 1024 tokens: 33 epochs over the same tokens
    with pytest.warns(UserWarning, match="epochs over the same tokens"):
        cal = calibrate(model, few, d_config(predictor_steps=2, predictor_batch_tokens=1024), progress=False)
    assert all(s["steps"] == 2 for s in cal.stats.values())


def test_with_tau_shifts_every_site(model, batches):
    cal = calibrate(model, batches[:2], d_config(predictor_steps=5), progress=False)
    shifted = cal.with_tau(1.5)
    assert shifted.config.tau == 1.5 and all(float(st_["tau"]) == 1.5 for st_ in shifted.state.values())
    assert all(torch.equal(shifted.state[k]["pred_v"], cal.state[k]["pred_v"]) for k in cal.state)
    assert "realised_sparsity" not in next(iter(shifted.stats.values()))  # no stale measurement is reported
    said = shifted.report()
    assert "tau set to 1.5 after calibration" in said and "nothing was measured" in said
    assert "overall realised sparsity" not in said  # no figure for a tau nothing measured
    with pytest.raises(ValueError, match="d-countdown"):
        calibrate(model, batches[:1], CountDownConfig(method="cats", sparsity=0.5, regime="prac"),
                  progress=False).with_tau(0.0)
