"""Tiny random models and brute-force references shared by the calibration / predictor / CLI tests."""

from __future__ import annotations

import torch
from transformers import LlamaConfig, LlamaForCausalLM, Phi3Config, Phi3ForCausalLM

from countdown_fx.kernels import reference

VOCAB = 120


def tiny_llama(layers: int = 2, hidden: int = 48, inter: int = 136, seed: int = 0, act: str = "silu"):
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, hidden_act=act)
    return LlamaForCausalLM(cfg).eval()


def tiny_phi3(layers: int = 2, hidden: int = 48, inter: int = 136, seed: int = 0):
    torch.manual_seed(seed)
    cfg = Phi3Config(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                     num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256, pad_token_id=0)
    return Phi3ForCausalLM(cfg).eval()


def random_batches(n: int, batch: int = 4, seq: int = 32, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (batch, seq), generator=g) for _ in range(n)]


def mlp_modules(model):
    return {f"model.layers.{i}.mlp": layer.mlp for i, layer in enumerate(model.model.layers)}


def dense_activations(model, batches):
    """key -> (x, act(g), u) of every token, via forward hooks on the mlp modules (not the graph path)."""
    got = {k: [] for k in mlp_modules(model)}
    handles = []
    for key, mlp in mlp_modules(model).items():
        def hook(mod, inputs, output, key=key):
            x = inputs[0].reshape(-1, inputs[0].shape[-1])
            if hasattr(mod, "gate_up_proj"):
                g, u = mod.gate_up_proj(x).chunk(2, dim=-1)
            else:
                g, u = mod.gate_proj(x), mod.up_proj(x)
            got[key].append((x, mod.act_fn(g), u))
        handles.append(mlp.register_forward_hook(hook))
    try:
        with torch.no_grad():
            for b in batches:
                model(b)
    finally:
        for h in handles:
            h.remove()
    return {k: tuple(torch.cat(parts) for parts in zip(*v)) for k, v in got.items()}


def patch_mlps_with_reference(model, cal, apply_to_all: bool = True):
    """Make every mlp compute the SP-Prac reference op with `cal`'s state, by hand (for comparisons)."""
    originals = {}
    for key, mlp in mlp_modules(model).items():
        st = cal.state[key]
        def forward(x, mlp=mlp, st=st):
            if hasattr(mlp, "gate_up_proj"):
                w_gate, w_up = mlp.gate_up_proj.weight.chunk(2, dim=0)
            else:
                w_gate, w_up = mlp.gate_proj.weight, mlp.up_proj.weight
            act = "silu"
            args = (x, w_gate, w_up, mlp.down_proj.weight.t(), None, None, None, act)
            if "threshold" in st:
                return reference.threshold_ffn(*args, cal.config.score, st["threshold"])
            return reference.predictor_ffn(*args, st["pred_v"], st["pred_u"], st["tau"])
        originals[key] = mlp.forward
        mlp.forward = forward
    return originals


def unpatch(model, originals):
    for key, mlp in mlp_modules(model).items():
        mlp.forward = originals[key]


def reference_logits(model, cal, ids):
    """The logits of `model` on `ids` with every mlp computing the SP-Prac reference op with `cal`'s state."""
    originals = patch_mlps_with_reference(model, cal)
    try:
        with torch.no_grad():
            return model(ids).logits
    finally:
        unpatch(model, originals)
