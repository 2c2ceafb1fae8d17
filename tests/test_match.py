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
     ("model.layers.2.mlp", "model.layers.2.mlp"), ("L['self']", ""),
     # a forward wrapped as wrapper(*args, **kwargs) (transformers' deprecate_kwarg): the model is args[0]
     ("L['args'][0].model.layers.0.mlp.gate_proj", "model.layers.0.mlp.gate_proj")],
)
def test_module_paths_are_normalised(raw, clean):
    assert normalize_module_path(raw) == clean


def test_a_forward_wrapped_on_the_instance_keeps_the_module_key():
    """Hook libraries replace module.forward on the instance; Dynamo then reaches the module through the
    wrapper's closure (mlp.forward.__kwdefaults__['_o'].__self__): the key is still the module's path, so its
    calibration fits."""
    import functools

    model = hf_model("llama")
    for layer in model.model.layers:
        wrapped = layer.mlp.forward
        layer.mlp.forward = functools.wraps(wrapped)(lambda *a, _o=wrapped, **k: _o(*a, **k))
    ids = torch.randint(0, 97, (1, 6), generator=torch.Generator().manual_seed(0))
    assert [s.key for s in countdown_fx.find_sites(model, ids)] == [f"model.layers.{i}.mlp" for i in range(N_LAYERS)]


class _InPlaceFFN(torch.nn.Module):
    """A gated FFN with one in-place write somewhere in its chain (or none)."""

    def __init__(self, form, dim=16, hidden=48):
        super().__init__()
        self.form = form
        self.gate, self.up = torch.nn.Linear(dim, hidden, bias=False), torch.nn.Linear(dim, hidden, bias=False)
        self.down = torch.nn.Linear(hidden, dim, bias=False)
        self.relu_ = torch.nn.ReLU(inplace=True)
        self.gate_up = torch.nn.Linear(dim, 2 * hidden, bias=False)

    def forward(self, x):
        g, u = self.gate(x), self.up(x)
        if self.form == "gate clamp_":  # a GPT-OSS style limit written in place
            g.clamp_(max=0.2)
            return self.down(torch.nn.functional.silu(g) * u)
        if self.form == "product mul_":
            h = torch.nn.functional.silu(g) * u
            h.mul_(0.5)
            return self.down(h)
        if self.form == "up setitem":
            u[..., :4] = 0.0
            return self.down(torch.nn.functional.silu(g) * u)
        if self.form == "input += before down":  # a parallel block updating its residual in place
            h = torch.nn.functional.silu(g) * u
            x += torch.tanh(x)
            x += self.down(h)
            return x
        if self.form == "in-place act, gate read again":
            return self.down(self.relu_(g) * u) + g.mean(-1, keepdim=True)
        if self.form == "in-place act, gate read once":  # part of the chain: still an FFN
            return self.down(self.relu_(g) * u)
        if self.form == "in-place act on a fused half":  # the other half is the up side: still an FFN
            g, u = self.gate_up(x).chunk(2, dim=-1)
            return self.down(torch.nn.functional.silu(g, inplace=True) * u)
        if self.form == "base of the input written before down":  # x is a view of h; h changes in between
            h = x.clone()
            xv = h.view(-1, h.shape[-1])
            g, u = self.gate(xv), self.up(xv)
            mid = torch.nn.functional.silu(g) * u
            h.mul_(3.0)
            return self.down(mid)
        if self.form == "input written after down":
            y = self.down(torch.nn.functional.silu(g) * u)
            x.mul_(2.0)
            return x + y
        h = None
        if self.form == "up.mT mul_":  # views no name list needs to hold: found by their storage
            u.mT.mul_(3.0)
        elif self.form == "up movedim mul_":
            u.movedim(-1, 0).mul_(3.0)
        elif self.form == "tensor_split of up zero_":
            torch.tensor_split(u, 2, dim=-1)[0].zero_()
        elif self.form == "_foreach_mul_ of up":
            torch._foreach_mul_([u], 3.0)
        elif self.form == "input .data mul_":
            x.data.mul_(2.0)
        elif self.form == "input is an in-place result":  # x2 = h.mul_(2) is h, written again before down
            h = x.clone()
            x2 = h.mul_(2.0)
            g, u = self.gate(x2), self.up(x2)
            mid = torch.nn.functional.silu(g) * u
            h.add_(1.0)
            return self.down(mid)
        elif self.form == "relu_ method on gate":  # an in-place activation, a step of the chain
            return self.down(g.relu_() * u)
        elif self.form == "W_down scaled in place before down":  # what down reads, not the chain
            w = self.down.weight * 1.0
            h = torch.nn.functional.silu(g) * u
            w.mul_(0.5)
            return torch.nn.functional.linear(h, w)
        return self.down(torch.nn.functional.silu(g) * u)


def _in_place_case(form, options):
    """(eager output, rewritten output, countdown ops in the graph) of an _InPlaceFFN on a fixed input."""
    torch.manual_seed(0)
    model = _InPlaceFFN(form).eval()
    x = torch.randn(2, 5, 16)
    with torch.no_grad():
        expected = model(x.clone())
    torch._dynamo.reset()
    return (expected, *_rewritten_op_count(model, x.clone(), options=options))


WRITES_INSIDE = ["gate clamp_", "product mul_", "up setitem", "input += before down", "in-place act, gate read again",
                 "base of the input written before down", "up.mT mul_", "up movedim mul_", "tensor_split of up zero_",
                 "_foreach_mul_ of up", "input .data mul_", "input is an in-place result"]


@pytest.mark.parametrize("form", WRITES_INSIDE)
def test_an_in_place_write_inside_the_ffn_leaves_it_dense_with_a_warning(form):
    """The op computes gate and up again from x where down is: a write between would be lost or read twice, so
    such an FFN is left dense, saying why, and the model computes what it did."""
    with pytest.warns(UserWarning, match="in place before the down projection"):
        expected, out, n_ops = _in_place_case(form, {**IDEAL_DENSE, "sparsity": 0.5})
    assert n_ops == 0
    torch.testing.assert_close(out, expected, rtol=0, atol=0)


@pytest.mark.parametrize("form", ["in-place act, gate read once", "in-place act on a fused half",
                                  "input written after down", "relu_ method on gate",
                                  "W_down scaled in place before down"])
def test_in_place_writes_that_do_not_change_the_ffn_keep_it_sparse(form):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        expected, out, n_ops = _in_place_case(form, IDEAL_DENSE)
    assert n_ops == 1
    torch.testing.assert_close(out, expected)


@pytest.mark.parametrize("form", ["up.mT mul_", "up movedim mul_", "tensor_split of up zero_", "input .data mul_",
                                  "input is an in-place result"])
def test_in_place_writes_are_found_in_graphs_without_traced_values(form):
    """fx.symbolic_trace records no fake values, so the matcher follows the view calls by name there."""
    gm = fx.symbolic_trace(_InPlaceFFN(form).eval())
    with pytest.warns(UserWarning, match="in place before the down projection"):
        countdown_fx.sparsify(gm, countdown_fx.CountDownConfig(**{**IDEAL_DENSE, "sparsity": 0.5}))
    assert not any(n.target in COUNTDOWN_OPS for n in gm.graph.nodes)


class _UnitScaledGate(torch.nn.Module):
    """Falcon-H1's FFN: silu(gate(x) * gate_multiplier), the multiplier 1.0 by default (a no-op Dynamo keeps)."""

    def __init__(self, dim=16, hidden=48):
        super().__init__()
        self.gate, self.up = torch.nn.Linear(dim, hidden, bias=False), torch.nn.Linear(dim, hidden, bias=False)
        self.down, self.gate_multiplier = torch.nn.Linear(hidden, dim, bias=False), 1.0

    def forward(self, x):
        return self.down(self.up(x) * torch.nn.functional.silu(self.gate(x) * self.gate_multiplier))


def test_a_gate_scaled_by_one_is_still_a_gated_ffn():
    torch.manual_seed(0)
    model, x = _UnitScaledGate().eval(), torch.randn(2, 5, 16)
    out, n_ops = _rewritten_op_count(model, x)
    assert n_ops == 1
    torch.testing.assert_close(out, model(x))
    model.gate_multiplier = 0.5  # not the identity: the op could not apply it, so no site
    torch._dynamo.reset()
    assert _rewritten_op_count(model, x)[1] == 0
    torch._dynamo.reset()


def test_ffns_back_to_back_are_both_rewritten():
    """One FFN's output is the next one's input: the second site reads the op that replaced the first."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(GptFastFeedForward(), GptFastFeedForward()).eval()
    x = torch.randn(2, 5, 32)
    out, n_ops = _rewritten_op_count(model, x)
    assert n_ops == 2
    torch.testing.assert_close(out, model(x))


def test_an_ffn_left_dense_is_not_also_reported_as_missing():
    """The in-place warning says why; the generic "no gated FFN was found" would contradict it."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _in_place_case("gate clamp_", IDEAL_DENSE)
    messages = [str(w.message) for w in caught]
    assert any("in place before the down projection" in m for m in messages)
    assert NO_SITE_WARNING not in messages


class _KeywordFFN(torch.nn.Module):
    """Inputs passed by keyword: F.silu(input=...), F.gelu(input=..., approximate=...), F.dropout(input=...)."""

    def __init__(self, act, dim=16, hidden=48):
        super().__init__()
        self.act = act
        self.gate, self.up = torch.nn.Linear(dim, hidden), torch.nn.Linear(dim, hidden)
        self.down = torch.nn.Linear(hidden, dim)

    def forward(self, x):
        F = torch.nn.functional
        g = self.gate(x)
        a = F.silu(input=g) if self.act == "silu" else F.gelu(input=g, approximate="tanh")
        return self.down(F.dropout(input=a * self.up(x), p=0.1, training=False))


@pytest.mark.parametrize("act", ["silu", "gelu_tanh"])
def test_activations_called_with_keyword_input_are_matched(act):
    torch.manual_seed(0)
    model = _KeywordFFN(act).eval()
    x = torch.randn(2, 5, 16)
    assert [s.activation for s in countdown_fx.find_sites(model, x)] == [act]
    torch._dynamo.reset()
    out, n_ops = _rewritten_op_count(model, x)
    assert n_ops == 1
    torch.testing.assert_close(out, model(x))


class _NarrowUpFFN(torch.nn.Module):
    """up: d -> 1, broadcast over the neurons: not a gated FFN a neuron mask can index."""

    def __init__(self, dim=16, hidden=48):
        super().__init__()
        self.gate, self.up = torch.nn.Linear(dim, hidden), torch.nn.Linear(dim, 1)
        self.down = torch.nn.Linear(hidden, dim)

    def forward(self, x):
        return self.down(torch.nn.functional.silu(self.gate(x)) * self.up(x))


def test_an_up_projection_of_another_width_is_not_a_site():
    torch.manual_seed(0)
    model = _NarrowUpFFN().eval()
    x = torch.randn(2, 5, 16)
    assert len(countdown_fx.find_sites(model, x)) == 0
    torch._dynamo.reset()
    with pytest.warns(UserWarning, match="no gated FFN"):
        out, n_ops = _rewritten_op_count(model, x, options={**IDEAL_DENSE, "sparsity": 0.5})
    assert n_ops == 0
    torch.testing.assert_close(out, model(x))


def test_under_autocast_the_op_computes_in_the_autocast_dtype():
    """Under torch.autocast the linears run in bf16 and return bf16: the rewritten FFN gets its input and weights
    cast the same way, so it returns bf16 and keeps the neurons a bf16 FFN would (not an fp32 FFN's)."""
    from countdown_fx.kernels import reference

    torch.manual_seed(0)
    model = BiasGeluMLP(16, 48).eval()
    x = torch.randn(2, 5, 16)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        expected_dense = model(x)
        torch._dynamo.reset()
        with pytest.warns(UserWarning, match="run under torch.autocast.*no faster than dense"):
            dense, _ = _rewritten_op_count(model, x)
        torch._dynamo.reset()
        sparse, n_ops = _rewritten_op_count(model, x, options={**IDEAL_DENSE, "sparsity": 0.5})
    assert n_ops == 1 and dense.dtype == sparse.dtype == torch.bfloat16
    torch.testing.assert_close(dense, expected_dense, rtol=0, atol=0)
    bf16 = [t.to(torch.bfloat16) for t in (x, model.gate.weight, model.up.weight, model.down.weight.t(),
                                             model.gate.bias, model.up.bias, model.down.bias)]
    expected = reference.topk_ffn(*bf16, "gelu", "up", 0.5)
    torch.testing.assert_close(sparse, expected, rtol=0, atol=0)


@pytest.mark.gpu
def test_under_cuda_autocast_the_kernels_run_in_bf16():
    """An fp32 model under torch.autocast("cuda", bf16), calibrated (prac: the Triton kernels at decode): the
    op gets bf16 input, weights and state, so it returns bf16 and keeps what a bf16 FFN would."""
    from countdown_fx import CountDownConfig, calibrate
    from countdown_fx.kernels import reference

    torch.manual_seed(0)
    ffn = GptFastFeedForward(64, 160).cuda().eval()
    cal = calibrate(ffn, [torch.randn(4, 32, 64, device="cuda")],
                    CountDownConfig(method="m-countdown", sparsity=0.7, regime="prac"), progress=False)
    step = torch.randn(4, 1, 64, device="cuda")
    torch._dynamo.reset()
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        out = torch.compile(ffn, backend="countdown", options={"calibration": cal})(step)
    assert out.dtype == torch.bfloat16
    bf16 = [t.to(torch.bfloat16) for t in (step, ffn.w1.weight, ffn.w3.weight, ffn.w2.weight.t())]
    want = reference.threshold_ffn(*bf16, None, None, None, "silu", "up", next(iter(cal.state.values()))["threshold"])
    torch.testing.assert_close(out, want, rtol=2e-2, atol=2e-2)
    torch._dynamo.reset()


class _DropoutFFN(torch.nn.Module):
    def __init__(self, dim=16, hidden=48):
        super().__init__()
        self.gate, self.up = torch.nn.Linear(dim, hidden), torch.nn.Linear(dim, hidden)
        self.down, self.drop = torch.nn.Linear(hidden, dim), torch.nn.Dropout(0.1)

    def forward(self, x):
        return self.down(self.drop(torch.nn.functional.silu(self.gate(x)) * self.up(x)))


class _DropoutProduct(torch.nn.Module):
    """down(dropout(silu(a) * b)) where a and b are inputs, not projections: no gated FFN."""

    def __init__(self, dim=16, hidden=48):
        super().__init__()
        self.down, self.drop = torch.nn.Linear(hidden, dim), torch.nn.Dropout(0.1)

    def forward(self, a, b):
        return self.down(self.drop(torch.nn.functional.silu(a) * b))


def test_a_dropout_warning_needs_a_gated_ffn_behind_it():
    a, b = torch.randn(2, 3, 48), torch.randn(2, 3, 48)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        countdown_fx.find_sites(_DropoutProduct().train(), a, b)
    assert not any("dropout in training mode" in str(w.message) for w in caught)


def test_a_dropout_of_probability_zero_is_the_identity_in_training_mode_too():
    model = _DropoutFFN()
    model.drop.p = 0.0
    x = torch.randn(2, 3, 16)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert len(countdown_fx.find_sites(model.train(), x)) == 1
        assert len(match_sites(fx.symbolic_trace(model.train()))) == 1


def test_a_dropout_in_training_mode_leaves_the_ffn_dense_and_says_so():
    model = _DropoutFFN()
    x = torch.randn(2, 3, 16)
    with pytest.warns(UserWarning, match=r"1 gated FFN\(s\) .* left dense: a dropout in training mode"):
        assert len(countdown_fx.find_sites(model.train(), x)) == 0
    torch._dynamo.reset()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert len(countdown_fx.find_sites(model.eval(), x)) == 1
