"""Site discovery on many architectures, by structure; dense equivalence of the rewrite at sparsity 0."""

import warnings

import pytest
import torch
from torch import fx

import countdown_fx
from countdown_fx.backend import NO_SITE_WARNING, eager_backend
from countdown_fx.kernels.ops import COUNTDOWN_OPS
from countdown_fx.passes.match import match_sites, normalize_module_path
from tiny_models import (HF_ARCHS, N_LAYERS, BiasGeluMLP, FusedSliceSigmoidMLP, GeluChain, GptFastFeedForward,
                         ReluSplitMLP, Stack, gpt2_model, hf_model)

IDEAL_DENSE = {"method": "m-countdown", "sparsity": 0.0, "regime": "ideal", "apply_to": "all"}


def _rewritten_op_count(model, *inputs, options=IDEAL_DENSE):
    """Run through the rewrite (no Inductor) and count countdown ops in the captured graphs."""
    graphs = []
    backend = eager_backend(options)

    def spy(gm, example_inputs):
        fn = backend(gm, example_inputs)
        graphs.append(gm)
        return fn

    with torch.no_grad():
        out = torch.compile(model, backend=spy)(*inputs)
    n_ops = sum(1 for gm in graphs for n in gm.graph.nodes if n.target in COUNTDOWN_OPS)
    return out, n_ops


@pytest.mark.parametrize("arch", list(HF_ARCHS))
def test_hf_architectures_one_site_per_layer_and_dense_at_sparsity_zero(arch):
    model = hf_model(arch)
    ids = torch.randint(0, 97, (2, 7), generator=torch.Generator().manual_seed(0))
    sites = countdown_fx.find_sites(model, ids)
    assert [s.key for s in sites] == [f"model.layers.{i}.mlp" for i in range(N_LAYERS)]
    assert {s.activation for s in sites} == {HF_ARCHS[arch][2]}
    assert all((s.d_model, s.d_inter) == (32, 72) for s in sites)
    assert {s.fused for s in sites} == ({"gate-up"} if arch == "phi3" else {None})
    with torch.no_grad():
        want = model(ids).logits
    out, n_ops = _rewritten_op_count(model, ids)
    assert n_ops == N_LAYERS
    torch.testing.assert_close(out.logits, want, rtol=1e-5, atol=1e-5)


HAND_WRITTEN = {
    GptFastFeedForward: ("silu", None, False),
    BiasGeluMLP: ("gelu", None, True),
    FusedSliceSigmoidMLP: ("silu", "up-gate", False),
    ReluSplitMLP: ("relu", "gate-up", True),
}


@pytest.mark.parametrize("block", list(HAND_WRITTEN), ids=lambda c: c.__name__)
def test_hand_written_ffns(block):
    torch.manual_seed(0)
    model = Stack(block).eval()
    x = torch.randn(3, 5, 32)
    act, fused, bias = HAND_WRITTEN[block]
    sites = countdown_fx.find_sites(model, x)
    assert [(s.key, s.activation, s.fused, s.has_bias) for s in sites] == [
        (f"blocks.{i}", act, fused, bias) for i in range(N_LAYERS)
    ]
    out, n_ops = _rewritten_op_count(model, x)
    assert n_ops == N_LAYERS
    torch.testing.assert_close(out, model(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("block", list(HAND_WRITTEN), ids=lambda c: c.__name__)
def test_symbolic_trace_and_export_graphs_are_matched_too(block):
    torch.manual_seed(0)
    model = Stack(block).eval()
    x = torch.randn(2, 4, 32)
    traced = fx.symbolic_trace(model)  # call_module linears, get_attr weights
    assert [s.key for s in match_sites(traced)] == [f"blocks.{i}" for i in range(N_LAYERS)]
    exported = torch.export.export(model, (x,))  # aten ops
    sites = countdown_fx.find_sites(exported)
    assert [s.key for s in sites] == [f"blocks.{i}" for i in range(N_LAYERS)]
    assert sites[0].activation == HAND_WRITTEN[block][0]


def test_gpt2_and_ungated_chains_have_no_site_and_run_unchanged_with_one_warning():
    assert len(countdown_fx.find_sites(gpt2_model(), torch.randint(0, 97, (1, 6)))) == 0
    model = Stack(GeluChain).eval()
    x = torch.randn(2, 3, 32)
    assert len(countdown_fx.find_sites(model, x)) == 0
    torch._dynamo.reset()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with torch.no_grad():
            out = torch.compile(model, backend="countdown", options=IDEAL_DENSE)(x)
    ours = [w for w in caught if str(w.message) == NO_SITE_WARNING]
    assert len(ours) == 1
    torch.testing.assert_close(out, model(x))


def test_site_table_is_readable():
    table = countdown_fx.find_sites(Stack(GptFastFeedForward).eval(), torch.randn(1, 2, 32))
    text = repr(table)
    assert "2 gated FFN site(s)" in text and "blocks.1" in text and "d_inter" in text and "silu" in text
    assert repr(countdown_fx.SiteTable()) == "SiteTable(no gated FFN found)"


@pytest.mark.parametrize(
    "raw, clean",
    [("L['self'].model.layers[0].mlp", "model.layers.0.mlp"), ("L['self']._modules['blocks']['3']", "blocks.3"),
     ("model.layers.2.mlp", "model.layers.2.mlp"), ("L['self']", "")],
)
def test_module_paths_are_normalised(raw, clean):
    assert normalize_module_path(raw) == clean
