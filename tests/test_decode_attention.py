"""benchmarks/speed/decode_attention.py: the attention choices decode_e2e offers compute what Hugging Face's
sdpa does, on one-token decode steps (their own path) and on the prefill before them (Hugging Face's path),
eager and under torch.compile, against a float64 eager reference."""

import os
import sys

import pytest
import torch

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.join(ROOT, "benchmarks", "speed"))

import decode_attention  # noqa: E402


def _gqa_llama(layers: int, hidden: int, heads: int, kv_heads: int, dtype, device):
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(hidden_size=hidden, intermediate_size=2 * hidden, num_attention_heads=heads,
                         num_key_value_heads=kv_heads, num_hidden_layers=layers, vocab_size=256,
                         max_position_embeddings=128)
    torch.manual_seed(0)
    with torch.device(device):
        return AutoModelForCausalLM.from_config(config, dtype=dtype).eval()


def _decode_logits(model, attention: str, ids, steps: int, compiled: bool, mode: str | None = None) -> torch.Tensor:
    """Prefill `ids` into a static cache, then `steps` one-token steps fed fixed tokens (compiled: through
    torch.compile with `mode`); their logits stacked."""
    from transformers import StaticCache

    decode_attention.use_attention(model, attention)
    batch, context = ids.shape
    cache = StaticCache(config=model.config, max_cache_len=context + steps + 3)  # unfilled slots stay masked
    step = torch.compile(model.forward, mode=mode, dynamic=False) if compiled else model.forward
    tokens = torch.randint(0, model.config.vocab_size, (steps, batch, 1), generator=torch.Generator().manual_seed(1))
    logits = []
    with torch.no_grad():
        model(input_ids=ids, past_key_values=cache, use_cache=True,
              cache_position=torch.arange(context, device=ids.device))
        for i in range(steps):
            out = step(input_ids=tokens[i].to(ids.device), past_key_values=cache, use_cache=True,
                       cache_position=torch.tensor([context + i], device=ids.device))
            logits.append(out.logits.to(torch.float32, copy=True))  # CUDA graphs reuse their output buffers
    torch._dynamo.reset()
    return torch.stack(logits)


@pytest.mark.parametrize("attention", ["packed-sdpa", "gqa-sdpa"])
@pytest.mark.parametrize("compiled", [False, True])
def test_one_token_attention_matches_hugging_face_sdpa(attention, compiled):
    model = _gqa_llama(2, 96, 6, 2, torch.float32, "cpu")  # 3 query heads per KV head
    ids = torch.randint(0, 256, (3, 13), generator=torch.Generator().manual_seed(0))
    ref = _decode_logits(model.double(), "sdpa", ids, 4, compiled=False)
    got = _decode_logits(model.float(), attention, ids, 4, compiled)
    assert ref.abs().max() > 0.1  # the steps compute something
    torch.testing.assert_close(got, ref.float(), rtol=1e-4, atol=1e-4)


def test_unknown_attention_is_refused():
    model = _gqa_llama(1, 32, 2, 1, torch.float32, "cpu")
    with pytest.raises(ValueError, match="unknown attention 'flash'.*packed-sdpa"):
        decode_attention.use_attention(model, "flash")


@pytest.mark.gpu
@pytest.mark.parametrize("attention", ["packed-sdpa", "gqa-sdpa"])
def test_one_token_attention_on_cuda_bf16(attention):
    """Llama-3.1-8B's head layout (32 query / 8 KV heads of 128), 2 layers, bf16 under CUDA graphs."""
    model = _gqa_llama(2, 4096, 32, 8, torch.bfloat16, "cuda")
    ids = torch.randint(0, 256, (2, 300), generator=torch.Generator().manual_seed(0)).cuda()
    ref = _decode_logits(model, "sdpa", ids, 4, compiled=False)
    got = _decode_logits(model, attention, ids, 4, compiled=True, mode="reduce-overhead")
    ref64 = _decode_logits(model.double(), "sdpa", ids, 4, compiled=False)  # the bf16 weights, exactly
    # bf16 against float64: no further from it than Hugging Face's own sdpa path is
    assert (got - ref64).abs().max() <= 2 * (ref - ref64).abs().max() + 1e-3
