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
from tiny_models import N_LAYERS, BiasGeluMLP, ReluSplitMLP, Stack, hf_model  # noqa: E402

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
