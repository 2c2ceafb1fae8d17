"""Attention implementations decode_e2e can give its Hugging Face model (`--attention`), so the dense baseline's
attention is as fast as a server's and the FFN's share of a step is not diluted by avoidable attention work.

Why: Hugging Face's "sdpa" attention, under torch.compile with a static KV cache (a mask is always passed), copies
K and V once per query head of their group (`repeat_kv`: 4 copies at Llama-3.1-8B's 32 query / 8 KV heads) every
decode step, then runs SDPA over the copies. In the session-20 profile of the 32-layer model that copy is a 6.5 µs
kernel twice per layer (~420 µs of a 7.4 ms dense step) and SDPA itself another ~10 µs per layer.

"packed-sdpa": for a one-token step, the query heads of a KV group become that group's query rows
([B, H, 1, D] -> [B, H_kv, H / H_kv, D]), so SDPA reads K and V as stored, once; the mask ([B, 1, 1, L]) broadcasts
over the rows. Other steps (prefill) take Hugging Face's sdpa. Same arithmetic, no copy.
"gqa-sdpa": for a one-token step, SDPA with `enable_gqa=True` and the mask (which SDPA backend takes it is torch's
choice; Hugging Face passes the flag only without a mask).
Measured (H100, 32 layers, dense, session 21; `benchmarks/results/speed_decode_e2e.md`): tokens/s at batch 1 / 4:
sdpa 132.5 / 454.9, packed-sdpa 132.7 / 522.9 (cuDNN picks a slower kernel for the packed rows), gqa-sdpa 144.5 /
553.2, so gqa-sdpa is decode_e2e's default.
Not offered: Hugging Face's "flex_attention", which gave NaN logits after a static-cache prefill on CPU (transformers
5.24, torch 2.13) and does not compile on CPU at the tiny model's shapes.
"""
import torch

CHOICES = ("sdpa", "packed-sdpa", "gqa-sdpa")
# the names registered with transformers' AttentionInterface
REGISTERED = {"packed-sdpa": "countdown_bench_packed_sdpa", "gqa-sdpa": "countdown_bench_gqa_sdpa"}


def _one_token_attention(gqa: bool):
    """A Hugging Face attention function (AttentionInterface) that handles one-token steps of a GQA model itself:
    packed query rows (gqa False) or SDPA's enable_gqa (gqa True); Hugging Face's sdpa otherwise."""
    def attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, is_causal=None,
                  **kwargs):
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        groups = getattr(module, "num_key_value_groups", 1)
        batch, heads, q_len, dim = query.shape
        if q_len != 1 or groups == 1 or kwargs.get("position_bias") is not None:
            return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                          scaling=scaling, is_causal=is_causal, **kwargs)
        sdpa = torch.nn.functional.scaled_dot_product_attention
        if gqa:
            out = sdpa(query, key, value, attn_mask=attention_mask, dropout_p=dropout, scale=scaling, enable_gqa=True)
        else:
            packed = query.reshape(batch, heads // groups, groups, dim)
            out = sdpa(packed, key, value, attn_mask=attention_mask, dropout_p=dropout, scale=scaling)
        return out.reshape(batch, heads, 1, dim).transpose(1, 2).contiguous(), None

    return attention


def use_attention(model, name: str) -> None:
    """Switch `model` (a transformers model) to the attention `name` (one of CHOICES)."""
    if name not in CHOICES:
        raise ValueError(f"unknown attention {name!r}: expected one of {CHOICES}")
    if name in REGISTERED:
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

        AttentionInterface.register(REGISTERED[name], _one_token_attention(gqa=name == "gqa-sdpa"))
        AttentionMaskInterface.register(REGISTERED[name], sdpa_mask)  # the same boolean mask as "sdpa"
    model.set_attn_implementation(REGISTERED.get(name, name))
