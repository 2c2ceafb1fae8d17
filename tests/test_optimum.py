"""CountDownTransformation: optimum's reversible FX transformation API."""

import pytest
import torch
from torch import fx

pytest.importorskip("optimum.fx.optimization")
from optimum.fx.optimization import ChangeTrueDivToMulByInverse, compose  # noqa: E402

from countdown_fx import CountDownConfig  # noqa: E402
from countdown_fx.capture import capture_graphs  # noqa: E402
from countdown_fx.integrations.optimum import CountDownTransformation  # noqa: E402
from countdown_fx.kernels.ops import COUNTDOWN_OPS  # noqa: E402
from tiny_models import N_LAYERS, BiasGeluMLP, GptFastFeedForward, ReluSplitMLP, Stack, hf_model  # noqa: E402

CONFIG = CountDownConfig(method="cats", sparsity=0.6, regime="ideal", apply_to="all")


def _graphs(kind, model, x):
    if kind == "symbolic_trace":
        return fx.symbolic_trace(model), (x,)
    if kind == "export":
        return torch.export.export(model, (x,)).module(), (x,)
    (gm, example_inputs), = capture_graphs(model, x)  # Dynamo: weights arrive as placeholders
    return gm, tuple(example_inputs)


@pytest.mark.parametrize("kind", ["symbolic_trace", "export", "dynamo"])
@pytest.mark.parametrize("block", [BiasGeluMLP, ReluSplitMLP], ids=lambda c: c.__name__)
def test_apply_then_reverse_restores_identical_outputs(kind, block):
    torch.manual_seed(0)
    model = Stack(block).eval()
    gm, inputs = _graphs(kind, model, torch.randn(2, 5, 32))
    with torch.no_grad():
        original = gm(*inputs)
        transformation = CountDownTransformation(CONFIG)
        pipeline = compose(ChangeTrueDivToMulByInverse(), transformation)
        gm = pipeline(gm)
        assert sum(n.target in COUNTDOWN_OPS for n in gm.graph.nodes) == N_LAYERS
        assert len(transformation.get_transformed_nodes(gm)) == N_LAYERS
        sparse = gm(*inputs)
        assert (_first(sparse) - _first(original)).abs().max() > 1e-3
        gm = pipeline(gm, reverse=True)
        assert not any(n.target in COUNTDOWN_OPS for n in gm.graph.nodes)
        torch.testing.assert_close(_first(gm(*inputs)), _first(original), rtol=0, atol=0)


def _first(out):
    return out[0] if isinstance(out, (tuple, list)) else out


def test_hf_model_graph_and_reverse_without_transform_is_refused():
    model = hf_model("gemma")
    ids = torch.randint(0, 97, (1, 6))
    (gm, inputs), = capture_graphs(model, ids)
    gm = CountDownTransformation(CONFIG)(gm)
    assert sum(n.target in COUNTDOWN_OPS for n in gm.graph.nodes) == N_LAYERS
    with pytest.raises(ValueError, match="not transformed by CountDownTransformation"):
        CountDownTransformation(CONFIG)(fx.symbolic_trace(Stack(BiasGeluMLP)), reverse=True)


def test_a_second_transform_is_refused_and_reverse_still_restores_the_original():
    """Transforming twice would keep the rewritten graph as the one to restore (and reverse would then drop
    the state buffers that graph reads): refused, and the first transform still reverses exactly."""
    torch.manual_seed(0)
    x = torch.randn(2, 5, 32)
    gm, inputs = _graphs("export", Stack(BiasGeluMLP).eval(), x)
    with torch.no_grad():
        original = gm(*inputs)
        transformation = CountDownTransformation(CONFIG)
        gm = transformation(gm)
        with pytest.raises(ValueError, match="already transformed by CountDownTransformation; reverse it first"):
            transformation(gm)
        gm = transformation(gm, reverse=True)
        torch.testing.assert_close(_first(gm(*inputs)), _first(original), rtol=0, atol=0)


def test_a_module_that_is_not_a_graph_module_is_refused_naming_the_way_for_it():
    transformation = CountDownTransformation(CountDownConfig(sparsity=0.5))
    with pytest.raises(TypeError, match="rewrites an fx.GraphModule.*backend='countdown'"):
        transformation(Stack(ReluSplitMLP).eval())


@pytest.mark.gpu
@pytest.mark.parametrize("method", ["m-countdown", "d-countdown"])
def test_a_transformed_cuda_graph_runs_the_triton_kernels_and_reverses(monkeypatch, method):
    """On CUDA (bf16, decode-shaped input) the transformed graph's countdown ops launch the Triton kernels, which
    match the same graph run through the ops' PyTorch reference; reverse restores the dense outputs bit for bit."""
    from countdown_fx.calibration import calibrate
    from countdown_fx.kernels import ops

    torch.manual_seed(0)
    model = Stack(GptFastFeedForward, dim=256, hidden=704).eval().cuda().to(torch.bfloat16)
    batches = [torch.randn(4, 16, 256, device="cuda", dtype=torch.bfloat16) for _ in range(4)]
    cal = calibrate(model, batches, CountDownConfig(method=method, sparsity=0.7, regime="prac"), progress=False)
    x = torch.randn(2, 1, 256, device="cuda", dtype=torch.bfloat16)  # a union the plan runs sparse at 2 tokens
    gm, inputs = _graphs("export", model, x)
    with torch.no_grad():
        dense = gm(*inputs)
        transformation = CountDownTransformation(cal)
        gm = transformation(gm)
        assert sum(n.target in COUNTDOWN_OPS for n in gm.graph.nodes) == N_LAYERS
        launches = []
        sparse_ffn = ops.triton_ffn.sparse_ffn
        monkeypatch.setattr(ops.triton_ffn, "sparse_ffn", lambda *a, **k: launches.append(1) or sparse_ffn(*a, **k))
        got = gm(*inputs)
        assert len(launches) == N_LAYERS  # every site ran the kernels
        monkeypatch.setattr(ops, "triton_ffn", None)  # as without triton: the reference on the same device
        want = gm(*inputs)
        torch.testing.assert_close(got.float(), want.float(), rtol=2e-2, atol=2e-2)
        assert (got.float() - dense.float()).abs().max() > 1e-2  # really sparse
        gm = transformation(gm, reverse=True)
        torch.testing.assert_close(gm(*inputs), dense, rtol=0, atol=0)
