"""sparsify(): the rewrite for fx GraphModules and torch.export programs, and the export round trip."""

import subprocess
import sys

import pytest
import torch
from torch import fx
from torch.export import Dim

import countdown_fx
from countdown_fx import CountDownConfig, sparsify
from countdown_fx.kernels.ops import COUNTDOWN_OPS
from tiny_models import N_LAYERS, BiasGeluMLP, GptFastFeedForward, ReluSplitMLP, Stack, hf_model

IDEAL = CountDownConfig(method="d-countdown", sparsity=0.5, regime="ideal", apply_to="all")


def _n_ops(gm) -> int:
    return sum(n.target in COUNTDOWN_OPS for n in gm.graph.nodes)


def _backend_output(model, *inputs, config=IDEAL):
    """The same rewrite through torch.compile (the reference way in) for comparison."""
    torch._dynamo.reset()
    with torch.no_grad():
        return torch.compile(model, backend=countdown_fx.backend.eager_backend({"config": config}))(*inputs)


@pytest.mark.parametrize("block", [GptFastFeedForward, BiasGeluMLP, ReluSplitMLP], ids=lambda c: c.__name__)
def test_graph_module_is_rewritten_in_place_and_matches_the_backend(block):
    torch.manual_seed(0)
    model = Stack(block).eval()
    x = torch.randn(2, 5, 32)
    gm = fx.symbolic_trace(model)
    assert sparsify(gm, IDEAL) is gm and _n_ops(gm) == N_LAYERS
    torch.testing.assert_close(gm(x), _backend_output(model, x), rtol=1e-5, atol=1e-5)
    assert (gm(x) - model(x)).abs().max() > 1e-3


def test_exported_program_keeps_dynamic_dims_and_matches_the_backend():
    torch.manual_seed(0)
    model = Stack(GptFastFeedForward).eval()
    ep = torch.export.export(model, (torch.randn(2, 5, 32),), dynamic_shapes=({0: Dim.DYNAMIC, 1: Dim.DYNAMIC},))
    sparse = sparsify(ep, IDEAL)
    assert isinstance(sparse, torch.export.ExportedProgram)
    assert _n_ops(sparse.graph_module) == N_LAYERS
    assert len(sparse.range_constraints) == 2  # batch and sequence stayed symbolic
    for shape in ((3, 7, 32), (1, 2, 32)):
        x = torch.randn(shape)
        torch.testing.assert_close(sparse.module()(x), _backend_output(model, x), rtol=1e-5, atol=1e-5)


def test_exported_hf_model_with_kwargs():
    model = hf_model("llama")
    ids = torch.randint(0, 97, (1, 6))
    ep = torch.export.export(model, (ids,), {"use_cache": False},
                             dynamic_shapes={"input_ids": {1: Dim.DYNAMIC}, "use_cache": None})
    sparse = sparsify(ep, IDEAL)
    assert _n_ops(sparse.graph_module) == N_LAYERS
    longer = torch.randint(0, 97, (1, 11))
    want = _backend_output(model, longer).logits
    torch.testing.assert_close(sparse.module()(longer, use_cache=False).logits, want, rtol=1e-4, atol=1e-4)


def test_saved_program_loads_and_runs_in_another_process(tmp_path):
    torch.manual_seed(0)
    model = Stack(BiasGeluMLP).eval()
    ep = torch.export.export(model, (torch.randn(2, 3, 32),), dynamic_shapes=({1: Dim.DYNAMIC},))
    sparse = sparsify(ep, IDEAL)
    x = torch.randn(2, 6, 32)
    torch.export.save(sparse, tmp_path / "model.pt2")
    torch.save({"x": x, "y": sparse.module()(x).detach()}, tmp_path / "io.pt")
    code = (
        "import sys, torch\n"
        "import countdown_fx  # registers the countdown ops the program uses\n"
        f"ep = torch.export.load({str(tmp_path / 'model.pt2')!r})\n"
        f"io = torch.load({str(tmp_path / 'io.pt')!r})\n"
        "torch.testing.assert_close(ep.module()(io['x']), io['y'], rtol=0, atol=0)\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-W", "ignore", "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]
    # without countdown_fx the loader refuses, naming the op to register
    code = f"import torch\ntorch.export.load({str(tmp_path / 'model.pt2')!r})\n"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode != 0 and "countdown.topk_ffn" in out.stderr


def test_wrong_object_and_no_site():
    with pytest.raises(TypeError, match="torch.compile"):
        sparsify(Stack(GptFastFeedForward), IDEAL)
    gm = fx.symbolic_trace(torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.GELU(), torch.nn.Linear(4, 4)))
    with pytest.warns(UserWarning, match="no gated FFN"):
        assert sparsify(gm, IDEAL) is gm
    # a graph sparsified before has countdown ops and no FFN left: said so, not "no gated FFN"
    sparse = sparsify(fx.symbolic_trace(Stack(GptFastFeedForward)), IDEAL)
    with pytest.warns(UserWarning, match="already holds countdown ops") as caught:
        assert sparsify(sparse, IDEAL) is sparse
    assert not any("no gated FFN" in str(w.message) for w in caught)


def test_w_down_t_storage_follows_the_way_in(monkeypatch):
    """Where the kernels read W_down^T row by row (CUDA; here CPU too, patched): an exported program is for
    inference, so sparsify stores it once even under grad mode (the default at top level) and says nothing; a
    GraphModule sparsified under grad mode may be trained, so its W_down keeps a gradient, with a warning;
    under torch.no_grad() it is stored. Either way the output is unchanged."""
    import warnings

    from countdown_fx.calibration import calibrate
    from countdown_fx.passes import rewrite

    torch.manual_seed(0)
    model = Stack(GptFastFeedForward).eval()
    cal = calibrate(model, [torch.randn(4, 8, 32) for _ in range(2)],
                    CountDownConfig(method="m-countdown", sparsity=0.5, regime="prac"), progress=False)
    x = torch.randn(2, 1, 32)
    with torch.no_grad():
        want = torch.compile(model, backend="countdown", options={"calibration": cal, "apply_to": "all"})(x)
    monkeypatch.setattr(rewrite, "ROW_MAJOR_DEVICE_TYPES", {"cuda", "cpu"})
    one_w_down = model.blocks[0].w2.weight.numel() * 4

    rewrite.counters.clear()
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        ep = sparsify(torch.export.export(model, (x,)), cal)
    assert rewrite.counters["w_down_t_bytes"] == N_LAYERS * one_w_down
    assert sum(name.endswith("__w_down_t") for name in ep.state_dict) == N_LAYERS
    torch.testing.assert_close(ep.module()(x), want, rtol=1e-5, atol=1e-5)

    rewrite.counters.clear()
    with pytest.warns(UserWarning, match=r"requires grad and grad mode is on"):
        gm = sparsify(fx.symbolic_trace(model), cal)
    assert rewrite.counters["w_down_t_bytes"] == 0
    out = gm(x)
    out.sum().backward()
    assert model.blocks[0].w2.weight.grad is not None
    torch.testing.assert_close(out.detach(), want, rtol=1e-5, atol=1e-5)

    rewrite.counters.clear()
    with torch.no_grad():
        gm = sparsify(fx.symbolic_trace(model), cal)
        torch.testing.assert_close(gm(x), want, rtol=1e-5, atol=1e-5)
    assert rewrite.counters["w_down_t_bytes"] == N_LAYERS * one_w_down


def test_a_default_valued_field_stated_against_the_calibration_wins_or_is_refused():
    """A calibration made with apply_to='all' brings it along; stating the default 'decode' against it, in an
    options dict or as a field passed to a CountDownConfig, makes prefill dense again, while the calibration
    alone makes it sparse. A default-valued method that contradicts the file is refused, not replaced by the
    file's in silence."""
    from countdown_fx.calibration import calibrate

    torch.manual_seed(0)
    model = Stack(GptFastFeedForward).eval()
    cal = calibrate(model, [torch.randn(4, 8, 32) for _ in range(2)],
                    CountDownConfig(method="cats", sparsity=0.5, regime="prac", apply_to="all"), progress=False)
    prefill = torch.randn(2, 5, 32)
    with torch.no_grad():
        dense = model(prefill)
        as_calibrated = sparsify(fx.symbolic_trace(model), cal)(prefill)
        decode_by_options = sparsify(fx.symbolic_trace(model), {"calibration": cal, "apply_to": "decode"})(prefill)
        decode_by_config = sparsify(fx.symbolic_trace(model),
                                    CountDownConfig(apply_to="decode", calibration=cal))(prefill)
        # fields left out come from the file
        left_out = sparsify(fx.symbolic_trace(model), CountDownConfig(sparsity=0.5, calibration=cal))(prefill)
    assert not torch.allclose(as_calibrated, dense, rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(decode_by_options, dense, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(decode_by_config, dense, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(left_out, as_calibrated, rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"option sparsity=0.9 contradicts the calibration"):
        sparsify(fx.symbolic_trace(model), {"calibration": cal, "sparsity": 0.9})
    with pytest.raises(ValueError, match=r"option method='m-countdown' contradicts the calibration.*method='cats'"):
        sparsify(fx.symbolic_trace(model), CountDownConfig(method="m-countdown", sparsity=0.5, calibration=cal))
    with pytest.raises(ValueError, match=r"option sparsity=0.7 contradicts the calibration"):
        sparsify(fx.symbolic_trace(model), CountDownConfig(method="cats", sparsity=0.7).replace(calibration=cal))


def test_none_in_place_of_a_calibration_is_refused_not_run_with_defaults():
    gm = torch.fx.symbolic_trace(Stack(GptFastFeedForward).eval())
    with pytest.raises(TypeError, match="was the result of calibrate\\(\\) assigned"):
        countdown_fx.sparsify(gm, None)
