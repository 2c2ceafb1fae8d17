"""Hugging Face generate() with a static cache and the forward compiled by the countdown backend."""

import torch

from tiny_models import hf_model

GENERATE = dict(max_new_tokens=6, do_sample=False, cache_implementation="static", output_scores=True,
                return_dict_in_generate=True, pad_token_id=0)


def _generate(options=None, arch="llama"):
    torch._dynamo.reset()
    model = hf_model(arch)
    if options is not None:
        model.forward = torch.compile(model.forward, backend="countdown", options=options)
    ids = torch.randint(0, 97, (2, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return model.generate(ids, **GENERATE)


def test_greedy_output_at_sparsity_zero_is_identical_to_plain_generation():
    plain = _generate()
    ours = _generate({"sparsity": 0.0})
    assert torch.equal(ours.sequences, plain.sequences)


def test_decode_steps_are_sparse_and_prefill_is_dense():
    plain = _generate(arch="qwen2")
    ours = _generate({"method": "m-countdown", "sparsity": 0.8, "apply_to": "decode"}, arch="qwen2")
    # scores[0] comes from the prefill pass: dense, so equal; later scores come from one-token decode steps
    torch.testing.assert_close(ours.scores[0], plain.scores[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours.sequences[:, 8], plain.sequences[:, 8])
    assert all((o - p).abs().max() > 1e-2 for o, p in zip(ours.scores[1:], plain.scores[1:]))


def test_hugging_face_compile_config_with_the_countdown_backend():
    """generate(compile_config=CompileConfig(backend="countdown", mode=None, options=...)), as the README says,
    gives what compiling model.forward does. (HF compiles on CUDA only unless told otherwise: the private
    _compile_all_devices flag lets this CPU test take that path.)"""
    from transformers import CompileConfig

    options = {"method": "m-countdown", "sparsity": 0.8}
    ours = _generate(options, arch="qwen2")
    torch._dynamo.reset()
    model = hf_model("qwen2")
    config = CompileConfig(backend="countdown", mode=None, options=options)
    config._compile_all_devices = True
    ids = torch.randint(0, 97, (2, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        hf = model.generate(ids, compile_config=config, **GENERATE)
    torch._dynamo.reset()
    assert torch.equal(hf.sequences, ours.sequences)
    for a, b in zip(hf.scores, ours.scores):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
