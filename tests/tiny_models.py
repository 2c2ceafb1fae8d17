"""Tiny random-weight decoders from transformers configs, and hand-written FFN modules, for tests."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

N_LAYERS = 2
COMMON = dict(vocab_size=97, hidden_size=32, intermediate_size=72, num_hidden_layers=N_LAYERS,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)

# architecture name -> (config class name, extra config kwargs, expected activation)
HF_ARCHS = {
    "llama": ("LlamaConfig", {}, "silu"),
    "mistral": ("MistralConfig", {}, "silu"),
    "qwen2": ("Qwen2Config", {}, "silu"),
    "qwen3": ("Qwen3Config", {"head_dim": 8}, "silu"),
    "gemma": ("GemmaConfig", {"head_dim": 8, "hidden_activation": "gelu_pytorch_tanh"}, "gelu_tanh"),
    "gemma2": ("Gemma2Config", {"head_dim": 8, "hidden_activation": "gelu_pytorch_tanh"}, "gelu_tanh"),
    "gemma3": ("Gemma3TextConfig", {"head_dim": 8, "hidden_activation": "gelu_pytorch_tanh"}, "gelu_tanh"),
    "phi3": ("Phi3Config", {"pad_token_id": 0}, "silu"),
    "olmo2": ("Olmo2Config", {"pad_token_id": 0}, "silu"),
    "granite": ("GraniteConfig", {}, "silu"),
    "stablelm": ("StableLmConfig", {}, "silu"),
    "cohere": ("CohereConfig", {"pad_token_id": 0}, "silu"),
}


def hf_model(arch: str, dtype=torch.float32, seed: int = 0) -> nn.Module:
    import transformers
    from transformers import AutoModelForCausalLM

    cls_name, extra, _ = HF_ARCHS[arch]
    config = getattr(transformers, cls_name)(**COMMON, **extra)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype).eval()
    with torch.no_grad():  # random, not init-scale-zero, weights everywhere (some inits zero biases/norms)
        for p in model.parameters():
            p.normal_(0, 0.3) if p.dim() > 1 else p.add_(0.1 * torch.randn_like(p))
    return model


def gpt2_model() -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(vocab_size=97, n_embd=32, n_layer=N_LAYERS, n_head=4, n_positions=64)
    torch.manual_seed(0)
    return GPT2LMHeadModel(config).eval()


class GptFastFeedForward(nn.Module):
    """gpt-fast style: w2(silu(w1(x)) * w3(x)), no biases."""

    def __init__(self, dim=32, hidden=72):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden, bias=False)
        self.w3 = nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class BiasGeluMLP(nn.Module):
    """Biases everywhere, exact GELU as a module, product written up-first."""

    def __init__(self, dim=32, hidden=72):
        super().__init__()
        self.gate = nn.Linear(dim, hidden)
        self.up = nn.Linear(dim, hidden)
        self.down = nn.Linear(hidden, dim)
        self.act = nn.GELU()

    def forward(self, x):
        return self.down(self.up(x) * self.act(self.gate(x)))


class FusedSliceSigmoidMLP(nn.Module):
    """One fused projection split by slicing with the UP half first, and SiLU written as x * sigmoid(x)."""

    def __init__(self, dim=32, hidden=72):
        super().__init__()
        self.hidden = hidden
        self.up_gate = nn.Linear(dim, 2 * hidden, bias=False)
        self.down = nn.Linear(hidden, dim, bias=False)

    def forward(self, x):
        h = self.up_gate(x)
        up, gate = h[..., : self.hidden], h[..., self.hidden :]
        return self.down(gate * torch.sigmoid(gate) * up)


class ReluSplitMLP(nn.Module):
    """torch.split into halves, relu as a method call."""

    def __init__(self, dim=32, hidden=72):
        super().__init__()
        self.hidden = hidden
        self.gate_up = nn.Linear(dim, 2 * hidden, bias=True)
        self.down = nn.Linear(hidden, dim, bias=True)

    def forward(self, x):
        gate, up = torch.split(self.gate_up(x), self.hidden, dim=-1)
        return self.down(gate.relu() * up)


class Stack(nn.Module):
    """A residual stack of FFN blocks, named so the site keys are predictable."""

    def __init__(self, block_cls, n=N_LAYERS, dim=32, hidden=72):
        super().__init__()
        self.blocks = nn.ModuleList([block_cls(dim, hidden) for _ in range(n)])
        self.norm = nn.LayerNorm(dim)

    def forward(self, x):
        for block in self.blocks:
            x = x + block(self.norm(x))
        return x


class GeluChain(nn.Module):
    """GPT-2 style fc -> gelu -> proj, and a product of two linears without activation: not gated FFNs."""

    def __init__(self, dim=32, hidden=72):
        super().__init__()
        self.fc = nn.Linear(dim, hidden)
        self.proj = nn.Linear(hidden, dim)
        self.a = nn.Linear(dim, hidden)
        self.b = nn.Linear(dim, hidden)

    def forward(self, x):
        return self.proj(F.gelu(self.fc(x))) + self.proj(self.a(x) * self.b(x))
