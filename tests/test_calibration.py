"""Calibration: thresholds against brute force, save/load, mismatch errors, bad input, compiled use."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from _cal_helpers import dense_activations, random_batches, reference_logits, tiny_llama, tiny_phi3
from countdown_fx.backend import eager_backend
from countdown_fx.calibration import MIN_CALIBRATION_TOKENS, Calibration, calibrate, calibrate_sweep
from countdown_fx.capture import capture_graphs
from countdown_fx.config import CountDownConfig
from countdown_fx.kernels import reference
from countdown_fx.passes.match import match_sites
from countdown_fx.passes.thresholds import MeanKth, SelectionCounts, StreamingQuantile, drop_count


def prac(method, sparsity, **kw):
    return CountDownConfig(method=method, sparsity=sparsity, regime="prac", **kw)


# ---------------------------------------------------------------------------------------------- reducers
@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), q=st.floats(0.05, 0.95), scale=st.floats(1e-3, 1e3), signed=st.booleans())
def test_streaming_quantile_matches_torch_quantile(seed, q, scale, signed):
    g = torch.Generator().manual_seed(seed)
    values = torch.randn(20_000, generator=g).exp() * scale  # log-normal: a wide dynamic range
    if signed:
        values = values * torch.randn(values.shape, generator=g).sign()
    sq = StreamingQuantile()
    for part in values.split(3_001):  # streamed in uneven chunks
        sq.update(part)
    got = sq.quantile(q)
    assert sq.count == values.numel()
    # any value between the two order statistics around rank q * n is a q-quantile; allow 0.3% beyond them
    ordered = values.double().sort().values
    i = int(q * values.numel())
    lo, hi = ordered[max(i - 1, 0)].item(), ordered[min(i, values.numel() - 1)].item()
    assert lo - 3e-3 * abs(lo) <= got <= hi + 3e-3 * abs(hi)
    # what matters downstream: the fraction of values at or below it is q
    assert abs((values <= got).double().mean().item() - q) < 2e-3


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), s=st.floats(0.0, 0.99), d=st.integers(1, 70))
def test_mean_kth_matches_sorting(seed, s, d):
    scores = torch.rand(37, d, generator=torch.Generator().manual_seed(seed))
    r = MeanKth(d, s)
    for part in scores.split(10):
        r.update(part)
    k = drop_count(d, s)
    if k == 0:
        assert r.value() == -math.inf
    else:
        assert r.value() == pytest.approx(scores.sort(dim=-1).values[:, k - 1].double().mean().item(), rel=1e-6)


# ------------------------------------------------------------------------------------ thresholds, end to end
@pytest.fixture(scope="module")
def llama():
    return tiny_llama()


@pytest.fixture(scope="module")
def batches():
    return random_batches(4)


@pytest.fixture(scope="module")
def acts(llama, batches):
    return dense_activations(llama, batches)


@pytest.mark.parametrize("rule", ["mean-kth", "quantile"])
def test_thresholds_match_brute_force(llama, batches, acts, rule):
    configs = [prac(m, s, threshold_rule=rule) for m in ("cats", "m-countdown") for s in (0.5, 0.8)]
    cals = calibrate_sweep(llama, batches, configs, progress=False)
    for cfg, cal in zip(configs, cals):
        assert set(cal.sites) == set(acts)
        for key, (x, act_g, u) in acts.items():
            scores = reference.score(cfg.score, act_g, u).double()
            d_inter = scores.shape[-1]
            k = d_inter - reference.keep_count(d_inter, cfg.sparsity)
            if rule == "mean-kth":
                want = scores.sort(dim=-1).values[:, k - 1].mean().item()
                rel = 1e-5
            else:
                want = torch.quantile(scores.reshape(-1), cfg.sparsity).item()
                rel = 3e-3
            got = float(cal.state[key]["threshold"])
            assert got == pytest.approx(want, rel=rel), (cfg.method, key)
            realised = (scores <= got).double().mean().item()
            assert cal.stats[key]["realised_sparsity"] == pytest.approx(realised, abs=2e-3)
            assert cal.stats[key]["tokens"] == x.shape[0]
            if rule == "quantile":  # the pooled rule meets the target on calibration data by construction
                assert realised == pytest.approx(cfg.sparsity, abs=5e-3)


def test_padding_is_left_out(llama):
    ids = random_batches(1, batch=4, seq=40)[0]
    mask = torch.ones_like(ids)
    mask[1, 25:] = 0
    mask[3, 30:] = 0
    cal = calibrate(llama, [{"input_ids": ids, "attention_mask": mask}], prac("m-countdown", 0.7), progress=False)
    assert all(s["tokens"] == int(mask.sum()) for s in cal.stats.values())


# ------------------------------------------------------------------------------------------------ bad input
def test_empty_and_too_short_data_are_refused(llama):
    with pytest.raises(ValueError, match="no batches"):
        calibrate(llama, [], prac("cats", 0.7), progress=False)
    short = torch.randint(0, 100, (1, MIN_CALIBRATION_TOKENS // 2))
    with pytest.raises(ValueError, match="too short.*model.layers.0.mlp"):
        calibrate(llama, [short], prac("cats", 0.7), progress=False)


def test_short_held_out_data_is_refused_before_predictor_training(llama, monkeypatch):
    """D-CountDown holds out the last batches: too few tokens there is said before any predictor trains."""
    from countdown_fx import calibration

    def no_training(*args, **kwargs):
        raise AssertionError("a predictor was trained before the held-out data was checked")

    monkeypatch.setattr(calibration, "PredictorTrainer", no_training)
    long, short = torch.randint(0, 100, (4, 64)), torch.randint(0, 100, (1, MIN_CALIBRATION_TOKENS // 2))
    with pytest.raises(ValueError, match=r"too short: the held-out batches \(the last 1 of 2.*32 token"):
        calibrate(llama, [long, short], prac("d-countdown", 0.7), progress=False)
    four_d = {"input_ids": short, "attention_mask": torch.zeros(1, 1, short.shape[1], short.shape[1])}
    with pytest.raises(ValueError, match=r"held-out batches.*32 token"):  # another mask form: every id counts
        calibrate(llama, [long, four_d], prac("d-countdown", 0.7), progress=False)
    mask = torch.ones(1, 128, dtype=torch.long)
    mask[:, 40:] = 0  # padding does not count
    with pytest.raises(ValueError, match=r"held-out batches.*40 token"):
        calibrate(llama, [long, {"input_ids": torch.randint(0, 100, (1, 128)), "attention_mask": mask}],
                  prac("d-countdown", 0.7), progress=False)


def test_nan_activations_name_the_site(batches):
    model = tiny_llama(layers=3)
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight[5, 3] = float("nan")
    with pytest.raises(ValueError, match="non-finite.*model.layers.1.mlp"):
        calibrate(model, batches, prac("m-countdown", 0.7), progress=False)


def test_a_sparsity_the_calibration_was_not_made_for_is_refused(llama, batches, tmp_path):
    path = tmp_path / "d.safetensors"
    calibrate(llama, batches, prac("d-countdown", 0.7, predictor_steps=5, predictor_batch_tokens=64),
              progress=False).save(path)
    with pytest.raises(ValueError, match="sparsity"):
        eager_backend({"calibration": str(path), "sparsity": 0.5})


# ------------------------------------------------------------------------------------------------ inputs
@pytest.mark.parametrize("make, error, says", [
    (lambda ids: [ids.float()], ValueError, "integer tensor"),
    (lambda ids: [ids[None]], ValueError, r"\[batch, seq\]"),
    (lambda ids: [ids + 1000], ValueError, "embedding has"),
    (lambda ids: [-ids - 1], ValueError, "embedding has"),
    (lambda ids: [{"input_id": ids}], ValueError, "has no 'input_ids'"),
    (lambda ids: None, TypeError, "batches=None"),
])
def test_batches_the_model_cannot_take_are_refused_before_it_runs(llama, batches, make, error, says):
    with pytest.raises(error, match=says):
        calibrate(llama, make(batches[0]), prac("m-countdown", 0.7), progress=False)


def test_a_config_model_or_weights_calibration_cannot_use_are_refused(batches):
    with pytest.raises(TypeError, match="needs a countdown_fx.CountDownConfig"):
        calibrate(tiny_llama(), batches, {"method": "m-countdown"}, progress=False)
    with pytest.raises(TypeError, match="takes the nn.Module"):
        calibrate(None, batches, prac("m-countdown", 0.7), progress=False)
    with torch.device("meta"):
        on_meta = tiny_llama()
    with pytest.raises(ValueError, match="on the meta device"):
        calibrate(on_meta, batches, prac("m-countdown", 0.7), progress=False)
    compiled_forward = tiny_llama()
    compiled_forward.forward = torch.compile(compiled_forward.forward)
    with pytest.raises(ValueError, match=r"model.forward is already compiled"):
        calibrate(compiled_forward, batches, prac("m-countdown", 0.7), progress=False)
    with pytest.raises(ValueError, match=r"model.forward is already compiled"):
        capture_graphs(compiled_forward, batches[0])


def test_a_calibration_file_with_edited_metadata_is_refused_naming_it(llama, batches, tmp_path):
    import json

    from safetensors.torch import load_file, save_file

    path = tmp_path / "cal.safetensors"
    calibrate(llama, batches, prac("m-countdown", 0.7), progress=False).save(path)
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        header = json.loads(f.metadata()["countdown_fx"])
    tensors = load_file(str(path))
    for name, edit in {"no sites": lambda h: h.pop("sites"), "size as text": lambda h: h["sites"][
            "model.layers.0.mlp"].update(d_model="48"), "unknown field": lambda h: h["config"].update(foo=1),
                       "not json": None}.items():
        edited = json.loads(json.dumps(header))
        if edit is not None:
            edit(edited)
        bad = tmp_path / f"{name}.safetensors"
        save_file(tensors, str(bad), metadata={"countdown_fx": json.dumps(edited) if edit else "{not json"})
        with pytest.raises(ValueError, match=f"{bad.name}.*(consistent calibration|metadata is not)"):
            Calibration.load(bad)


# ------------------------------------------------------------------------------------------------ files
def test_save_refuses_to_replace_a_file_or_write_where_it_cannot(llama, batches, tmp_path):
    cal = calibrate(llama, batches, prac("m-countdown", 0.7), progress=False)
    path = tmp_path / "cal.safetensors"
    path.write_text("not a calibration")
    with pytest.raises(FileExistsError, match="overwrite=True"):
        cal.save(path)
    assert path.read_text() == "not a calibration"
    cal.save(path, overwrite=True)
    assert Calibration.load(path).sites == cal.sites
    with pytest.raises(IsADirectoryError, match="is a directory"):
        cal.save(tmp_path)
    with pytest.raises(FileNotFoundError, match="does not exist; create it first"):
        cal.save(tmp_path / "missing" / "cal.safetensors")


@pytest.mark.parametrize("method", ["cats", "d-countdown"])
def test_save_load_round_trip(llama, batches, tmp_path, method):
    cfg = prac(method, 0.7, **({"predictor_steps": 10, "predictor_batch_tokens": 64} if method == "d-countdown" else {}))
    cal = calibrate(llama, batches, cfg, progress=False)
    path = tmp_path / "cal.safetensors"
    cal.save(path)
    back = Calibration.load(path)
    assert back.config == cal.config
    assert back.sites == cal.sites and back.stats == cal.stats
    assert back.state.keys() == cal.state.keys()
    for key in cal.state:
        assert back.state[key].keys() == cal.state[key].keys()
        for name, t in cal.state[key].items():
            assert torch.equal(back.state[key][name], t)
    assert back.meta["library_version"] and back.meta["format_version"] == 1
    assert back.report().splitlines()[1:] == cal.report().splitlines()[1:]
    assert "realised" in back.report()
    union = back.union_by_batch()  # a decode step of 16 tokens reads more neurons than one of a single token
    assert list(union) == [1, 2, 4, 8, 16] and union[1] < union[16] <= 1.0
    assert union[1] == pytest.approx(1 - back.overall_sparsity()) and "B=16" in back.report()
    assert "the fit, not the deployment" in back.report()
    if method == "d-countdown":  # the predictor's share of the FFN's bytes as deployed: its rank padded
        from countdown_fx.passes.predictor import predictor_fraction
        from countdown_fx.passes.rewrite import stored_rank

        key, info = next(iter(cal.sites.items()))
        r = cal.state[key]["pred_v"].shape[-1]
        row = next(line for line in back.report().splitlines() if line.startswith(key))
        assert stored_rank(r) != r  # the tiny model's automatic rank is not a multiple of 16
        assert f"{predictor_fraction(stored_rank(r), info['d_model'], info['d_inter']):.1%}" in row.split()
        # and the stored stats say the same (one size for one predictor), next to the rank it was trained at
        st = back.stats[key]
        assert (st["rank"], st["stored_rank"]) == (r, stored_rank(r))
        assert st["predictor_fraction"] == predictor_fraction(stored_rank(r), info["d_model"], info["d_inter"])


def test_union_of_batch_masks():
    """Identical masks: the union is each token's fraction at every B. One neuron per token, all distinct:
    a group of B tokens reads exactly B neurons."""
    same = SelectionCounts()
    row = torch.rand(300) < 0.3
    same.update(row.expand(64, 300), row.expand(64, 300))
    assert all(u == pytest.approx(row.float().mean().item()) for u in same.summary()["union_by_batch"].values())
    distinct = SelectionCounts()
    one_hot = torch.eye(300, dtype=torch.bool)[:70]  # 70 tokens: 4 groups of 16, 35 of 2, ...
    distinct.update(one_hot, one_hot)
    assert distinct.summary()["union_by_batch"] == {str(b): pytest.approx(b / 300) for b in (2, 4, 8, 16)}


def test_load_refuses_other_files(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "other.safetensors"
    save_file({"w": torch.zeros(2)}, str(path))
    with pytest.raises(ValueError, match="not a countdown-fx calibration"):
        Calibration.load(path)
    with pytest.raises(FileNotFoundError):
        Calibration.load(tmp_path / "missing.safetensors")


def test_a_truncated_calibration_file_is_refused_naming_it(llama, batches, tmp_path):
    whole = tmp_path / "whole.safetensors"
    calibrate(llama, batches, prac("m-countdown", 0.7), progress=False).save(whole)
    data = whole.read_bytes()
    for name, part in (("half", data[: len(data) // 2]), ("tail", data[:-10]), ("empty", b"")):
        path = tmp_path / f"{name}.safetensors"
        path.write_bytes(part)
        with pytest.raises(ValueError, match=f"calibration file '{path}' cannot be read.*truncated, corrupt"):
            Calibration.load(path)


def test_mismatched_sites_are_named(llama, batches):
    cal = calibrate(llama, batches, prac("m-countdown", 0.7), progress=False)
    ids = batches[0]
    deeper = tiny_llama(layers=3)
    (gm, ex), = capture_graphs(deeper, ids)
    with pytest.raises(ValueError, match=r"no state for site 'model.layers.2.mlp'"):
        cal.check_sites(match_sites(gm, ex))
    wider = tiny_llama(inter=144)
    (gm, ex), = capture_graphs(wider, ids)
    with pytest.raises(ValueError, match=r"'model.layers.0.mlp'.*d_inter=136.*d_inter=144"):
        cal.check_sites(match_sites(gm, ex))
    # through the backend, as a user meets it
    with pytest.raises(Exception, match=r"model.layers.0.mlp"):
        torch.compile(wider, backend=eager_backend({"calibration": cal, "apply_to": "all"}))(ids)


@pytest.mark.parametrize("method", ["m-countdown", "d-countdown"])
def test_deployed_sparsity_is_what_the_compiled_model_reaches(method):
    """The report's deployed_sparsity (every layer sparse, last fifth of the batches) equals what the meter
    counts when the calibrated model runs those batches through the backend's rewrite, site by site; the fit
    (dense inputs at every layer) is another number."""
    from countdown_fx.meter import SparsityMeter, metered

    model = tiny_llama(layers=3)
    data = random_batches(5)
    cfg = prac(method, 0.8, **({"predictor_steps": 20, "predictor_batch_tokens": 64} if method == "d-countdown"
                               else {}))
    cal = calibrate(model, data, cfg, progress=False)
    torch._dynamo.reset()
    meter = SparsityMeter()
    with torch.no_grad():
        metered(model, {"calibration": cal, "apply_to": "all"}, meter)(data[-1])
    torch._dynamo.reset()
    deployed = cal.overall_sparsity("deployed_sparsity")
    assert deployed == pytest.approx(meter.sparsity, abs=1e-3)
    assert all("deployed_sparsity" in st for st in cal.stats.values())
    assert f"overall {deployed:.1%}" in cal.report()


def test_other_activation_is_refused(llama, batches):
    cal = calibrate(llama, batches, prac("m-countdown", 0.7), progress=False)
    (gm, ex), = capture_graphs(tiny_llama(act="gelu_pytorch_tanh"), batches[0])
    with pytest.raises(ValueError, match=r"'model.layers.0.mlp'.*activation 'silu'.*'gelu_tanh'"):
        cal.check_sites(match_sites(gm, ex))


class _Wrapper(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.inner = model

    def forward(self, ids):
        return self.inner(ids).logits


def test_a_part_or_a_wrapper_of_the_calibrated_model_finds_its_sites(llama, batches):
    """Compiling llama.model (site keys "layers.N.mlp") or a wrapper ("inner.model.layers.N.mlp") with a
    calibration of the whole model (keys "model.layers.N.mlp") reads each layer's own thresholds: the same
    output as compiling the whole model, and not the dense one."""
    cal = calibrate(llama, batches, prac("m-countdown", 0.7), progress=False)
    ids = batches[0]
    opts = {"calibration": cal, "apply_to": "all"}
    with torch.no_grad():
        dense = llama(ids).logits
        torch._dynamo.reset()
        whole = torch.compile(llama, backend=eager_backend(opts))(ids).logits
        torch._dynamo.reset()
        part = llama.lm_head(torch.compile(llama.model, backend=eager_backend(opts))(ids).last_hidden_state)
        torch._dynamo.reset()
        wrapped = torch.compile(_Wrapper(llama), backend=eager_backend(opts))(ids)
        torch._dynamo.reset()
    assert (whole - dense).abs().max() > 1e-3
    torch.testing.assert_close(part, whole, rtol=0, atol=0)
    torch.testing.assert_close(wrapped, whole, rtol=0, atol=0)
    assert cal.resolve_keys(["layers.1.mlp"]) == {"layers.1.mlp": "model.layers.1.mlp"}
    assert cal.resolve_keys(["inner.model.layers.1.mlp"]) == {"inner.model.layers.1.mlp": "model.layers.1.mlp"}
    # a layer compiled on its own names its FFN "mlp": which layer it is cannot be known
    with pytest.raises(ValueError, match=r"\('mlp'\) cannot be matched one to one.*a layer or an FFN is compiled"):
        cal.resolve_keys(["mlp"])


def test_one_mapping_of_keys_for_all_sites_of_a_graph(llama, batches):
    """Every site of a graph maps by the same path added or removed in front, one to one: a file made for one
    block is refused on a model of several such blocks, as is a wrapper of two models where the file was
    made for one; two possible mappings are refused rather than guessed."""
    cal = calibrate(llama, batches, prac("m-countdown", 0.7), progress=False)
    assert cal.resolve_keys(["inner.model.layers.0.mlp", "inner.model.layers.1.mlp"]) == {
        "inner.model.layers.0.mlp": "model.layers.0.mlp", "inner.model.layers.1.mlp": "model.layers.1.mlp"}
    with pytest.raises(ValueError, match="cannot be matched one to one"):  # two models of the same shape
        cal.resolve_keys(["text.model.layers.0.mlp", "vision.model.layers.0.mlp"])
    block = Calibration(cal.config, {"mlp": cal.sites["model.layers.0.mlp"]},
                        {"mlp": cal.state["model.layers.0.mlp"]})
    with pytest.raises(ValueError, match="cannot be matched one to one"):
        block.resolve_keys(["model.layers.0.mlp", "model.layers.1.mlp"])
    both = Calibration(cal.config, {"mlp": cal.sites["model.layers.0.mlp"], "inner.mlp": cal.sites["model.layers.1.mlp"]},
                       {"mlp": cal.state["model.layers.0.mlp"], "inner.mlp": cal.state["model.layers.1.mlp"]})
    with pytest.raises(ValueError, match="could be more than one"):  # the root's "mlp", or "inner.mlp"?
        both.resolve_keys(["mlp"])
    with pytest.raises(ValueError, match="no state for site 'other.mlp'"):
        cal.resolve_keys(["other.mlp"])


# --------------------------------------------------------------------------------------------- compiled use
@pytest.mark.parametrize("make,method", [(tiny_llama, "m-countdown"), (tiny_llama, "d-countdown"),
                                         (tiny_phi3, "cats")])
def test_compiled_with_saved_file_equals_reference_by_hand(make, method, tmp_path):
    model = make()
    batches = random_batches(3, seed=7)
    cfg = prac(method, 0.6, **({"predictor_steps": 20, "predictor_batch_tokens": 64, "predictor_rank": 8}
                               if method == "d-countdown" else {}))
    path = tmp_path / "cal.safetensors"
    calibrate(model, batches, cfg, progress=False).save(path)
    cal = Calibration.load(path)
    ids = random_batches(1, seed=99)[0]
    with torch.no_grad():
        dense = model(ids).logits
        got = torch.compile(model, backend=eager_backend({"calibration": str(path), "apply_to": "all"}))(ids).logits
    want = reference_logits(model, cal, ids)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert (got - dense).abs().max() > 1e-4  # sparsity changed something


def test_new_calibration_never_reuses_a_stale_compiled_graph(tmp_path):
    """Inductor end to end: cal A, then a new torch.compile with cal B (same shapes, other thresholds) must give
    B's outputs, also when Inductor's FX graph cache holds A's compiled graph."""
    from torch._dynamo.utils import counters
    from torch._inductor import config as inductor_config

    # config.patch, not monkeypatch: Inductor's config module refuses the delattr that monkeypatch undoes with
    with inductor_config.patch(fx_graph_cache=True):
        model = tiny_llama(layers=1)
        cal_a = calibrate(model, random_batches(3), prac("m-countdown", 0.5), progress=False)
        cal_b = Calibration(cal_a.config, cal_a.sites,
                            {k: {"threshold": v["threshold"] * 3} for k, v in cal_a.state.items()}, cal_a.stats)
        cal_a.save(tmp_path / "a.safetensors")
        cal_b.save(tmp_path / "b.safetensors")
        ids = random_batches(1, seed=5)[0]
        hits_before = counters["inductor"]["fxgraph_cache_hit"]
        outs = {}
        for name in ("a", "b", "a"):
            torch._dynamo.reset()
            compiled = torch.compile(model, backend="countdown",
                                     options={"calibration": str(tmp_path / f"{name}.safetensors"), "apply_to": "all"})
            with torch.no_grad():
                out = compiled(ids).logits
            if name in outs:
                torch.testing.assert_close(out, outs[name])
            outs[name] = out
        for name, cal in (("a", cal_a), ("b", cal_b)):
            torch.testing.assert_close(outs[name], reference_logits(model, cal, ids), rtol=1e-4, atol=1e-4)
        assert (outs["a"] - outs["b"]).abs().max() > 1e-3
        # B (and A again) have the same graph and buffer shapes as A: Inductor's FX graph cache serves the compiled
        # code, and the numbers above show it reads the thresholds at run time instead of baking them in
        assert counters["inductor"]["fxgraph_cache_hit"] > hits_before


def test_many_calibrations_in_one_process_do_not_exhaust_dynamo():
    """One observer backend for every calibrate() call: Dynamo reuses its graph instead of adding a cache entry
    per call (its recompile limit is 8), so the 10th calibration still observes the model."""
    model = tiny_llama(layers=1)
    data = random_batches(1)
    thresholds = [float(calibrate(model, data, prac("cats", s), progress=False).state["model.layers.0.mlp"]["threshold"])
                  for s in (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.85, 0.9)]
    assert thresholds == sorted(thresholds) and len(set(thresholds)) == 10


def test_incomplete_state_is_refused_naming_the_site():
    cfg = prac("d-countdown", 0.7)
    sites = {"a.mlp": {"d_model": 4, "d_inter": 6}, "b.mlp": {"d_model": 4, "d_inter": 6}}
    good = {"pred_v": torch.zeros(4, 2), "pred_u": torch.zeros(6, 2), "tau": torch.tensor(0.0)}
    with pytest.raises(ValueError, match=r"lacks \['tau'\] for site 'b.mlp'"):
        Calibration(cfg, sites, {"a.mlp": good, "b.mlp": {k: v for k, v in good.items() if k != "tau"}})
    with pytest.raises(ValueError, match=r"site 'b.mlp'.*\[d_inter=6, r\]"):
        Calibration(cfg, sites, {"a.mlp": good, "b.mlp": {**good, "pred_u": torch.zeros(7, 2)}})


def test_predictor_rank_is_padded_to_aligned_rows_without_changing_the_output(monkeypatch):
    """A rank that is not a multiple of 16 (here 8) is stored zero-padded, so the kernels' row loads are aligned
    (rewrite.RANK_ALIGN); V is stored transposed and reaches the op as a view whose columns are contiguous (what
    its one-launch h = x V needs on CUDA); the program's output equals the reference with the calibrated,
    unpadded factors."""
    from countdown_fx import sparsify
    from countdown_fx.kernels import ops
    from countdown_fx.passes.rewrite import RANK_ALIGN

    model = tiny_llama(layers=1)
    cfg = prac("d-countdown", 0.6, predictor_steps=10, predictor_batch_tokens=64, predictor_rank=8, apply_to="all")
    cal = calibrate(model, random_batches(3, seed=7), cfg, progress=False)
    ids = random_batches(1, seed=99)[0]
    sparse = sparsify(torch.export.export(model, (ids,), {"use_cache": False}), cal)
    factors = {n: b for n, b in sparse.named_buffers() if "pred_" in n}
    assert any(n.endswith("pred_v_t") for n in factors) and any(n.endswith("pred_u") for n in factors)
    for name, b in factors.items():
        b = b.t() if name.endswith("pred_v_t") else b  # V is stored transposed: [rank, d_model]
        assert b.shape[-1] == RANK_ALIGN and b[..., 8:].eq(0).all() and b[..., :8].ne(0).any()
    v_strides = []
    real = ops._predictor_impl

    def recording(*args, **kwargs):
        v_strides.append(args[8].stride())  # pred_v, as the op receives it at run time
        return real(*args, **kwargs)

    monkeypatch.setattr(ops, "_predictor_impl", recording)
    with torch.no_grad():
        got = sparse.module()(ids, use_cache=False).logits
    assert v_strides and all(stride[0] == 1 for stride in v_strides), v_strides
    torch.testing.assert_close(got, reference_logits(model, cal, ids), rtol=1e-5, atol=1e-5)


class _BrokenLayer(torch.nn.Module):
    """A decoder-like layer with a graph break inside: Dynamo compiles each layer as its own frame, where every
    layer's FFN has the path 'mlp'."""

    def __init__(self, scale):
        super().__init__()
        from tiny_models import GptFastFeedForward

        self.mlp = GptFastFeedForward(32, 72)
        with torch.no_grad():
            self.mlp.w3.weight.mul_(scale)

    def forward(self, x):
        x = x * 1.0
        torch._dynamo.graph_break()
        return x + self.mlp(x)


class _BrokenModel(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = torch.nn.ModuleList([_BrokenLayer(s) for s in (0.3, 1.0, 3.0)])

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return x


def test_a_graph_break_inside_layers_is_refused_not_pooled():
    """Before: every layer's FFN reported as 'mlp', one threshold fitted on their pooled tokens, per-layer
    sparsity 1.0 / 0.86 / 0.36 with a plausible mean. Now find_sites warns, calibration refuses (naming the
    graph break), and a calibration made without the break is refused by the broken model's graphs (which
    layer is 'mlp'?); the ideal regime runs."""
    from countdown_fx.capture import find_sites
    from countdown_fx.passes.observe import ObserveSession

    torch.manual_seed(0)
    model = _BrokenModel().eval()
    x = torch.randn(2, 6, 32)
    torch._dynamo.reset()
    # Dynamo may compile the layer once and reuse the graph for the others (then find_sites lists one 'mlp'), or
    # compile it per layer (Hugging Face layers: then it warns that the keys repeat)
    assert {s.key for s in find_sites(model, x)} == {"mlp"}
    torch._dynamo.reset()
    with pytest.raises(ValueError, match=r"two FFNs with other weights report the same site key 'mlp'.*graph break"):
        calibrate(model, [torch.randn(4, 16, 32) for _ in range(2)], prac("m-countdown", 0.7), progress=False)
    torch._dynamo.reset()
    whole = {f"layers.{i}.mlp" for i in range(len(model.layers))}
    # the same FFNs calibrated without the break
    _BrokenLayer.forward, saved = (lambda self, x: x + self.mlp(x * 1.0)), _BrokenLayer.forward
    try:
        cal = calibrate(model, [torch.randn(4, 16, 32) for _ in range(2)], prac("m-countdown", 0.7), progress=False)
    finally:
        _BrokenLayer.forward = saved
    assert sorted(cal.sites) == sorted(whole)
    torch._dynamo.reset()
    with pytest.raises(Exception, match=r"graph break inside a decoder layer"):
        torch.compile(model, backend=eager_backend({"calibration": cal, "apply_to": "all"}))(x)
    torch._dynamo.reset()
    with torch.no_grad():
        out = torch.compile(model, backend=eager_backend({"sparsity": 0.5, "apply_to": "all"}))(x)
    assert (out - model(x)).abs().max() > 1e-3
    torch._dynamo.reset()


def test_find_sites_says_when_keys_repeat_across_graphs(monkeypatch):
    """A Hugging Face decoder layer with a graph break inside compiles once per layer: find_sites then lists one
    'mlp' per layer, and says why those keys cannot tell the layers apart."""
    from transformers.models.llama import modeling_llama

    from countdown_fx.capture import find_sites

    original = modeling_llama.LlamaDecoderLayer.forward

    def broken(self, *args, **kwargs):
        torch._dynamo.graph_break()
        return original(self, *args, **kwargs)

    monkeypatch.setattr(modeling_llama.LlamaDecoderLayer, "forward", broken)
    torch._dynamo.reset()
    with pytest.warns(UserWarning, match=r"1 site key\(s\) appear in several captured graphs \(first: 'mlp'\)"):
        sites = find_sites(tiny_llama(), random_batches(1)[0])
    torch._dynamo.reset()
    assert [s.key for s in sites] == ["mlp", "mlp"]


def test_a_batch_compiled_with_a_graph_break_counts_toward_the_same_sites(llama, batches):
    """output_hidden_states=True breaks the graph in transformers 5: that batch compiles LlamaModel as its own
    frame, naming sites 'layers.N.mlp'. The same weights are the same site: its tokens count toward
    'model.layers.N.mlp' (one warning), and the file deploys on the model it was made for."""
    mixed = list(batches)
    mixed[1] = {"input_ids": batches[1], "output_hidden_states": True}
    with pytest.warns(UserWarning, match="under the key 'layers.0.mlp' in a later batch"):
        cal = calibrate(llama, mixed, prac("m-countdown", 0.7), progress=False)
    plain = calibrate(llama, batches, prac("m-countdown", 0.7), progress=False)
    assert list(cal.sites) == list(plain.sites) == ["model.layers.0.mlp", "model.layers.1.mlp"]
    for key in cal.sites:
        assert cal.stats[key]["tokens"] == plain.stats[key]["tokens"] == sum(b.numel() for b in batches)
        assert float(cal.state[key]["threshold"]) == pytest.approx(float(plain.state[key]["threshold"]), rel=1e-6)


class _DequantisedFFN(torch.nn.Module):
    """Weights computed in forward (int8 times a scale): new tensors, at new addresses, at every call."""

    def __init__(self, dim=32, hidden=72):
        super().__init__()
        for name, shape in (("q_gate", (hidden, dim)), ("q_up", (hidden, dim)), ("q_down", (dim, hidden))):
            self.register_buffer(name, torch.randint(-127, 127, shape, dtype=torch.int8))

    def forward(self, x):
        wg, wu, wd = (q.to(x.dtype) * 0.01 for q in (self.q_gate, self.q_up, self.q_down))
        F = torch.nn.functional
        return F.linear(F.silu(F.linear(x, wg)) * F.linear(x, wu), wd)


def test_weights_computed_in_forward_are_calibrated_per_site_without_a_graph_break_error():
    """An FFN is told apart by its weights' addresses only where they are stored; computed weights (dequantised)
    move at every batch, which is no sign of two FFNs under one key."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(_DequantisedFFN(), _DequantisedFFN()).eval()
    batches = [torch.randn(4, 16, 32) for _ in range(4)]
    cal = calibrate(model, batches, CountDownConfig(method="m-countdown", sparsity=0.5, regime="prac"),
                    progress=False)
    assert sorted(cal.sites) == ["0", "1"]
    for key in cal.sites:
        assert abs(cal.stats[key]["realised_sparsity"] - 0.5) < 0.1
