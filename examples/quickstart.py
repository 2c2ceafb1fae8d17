"""Quickstart: CountDown on the embedded tiny Llama (no download), end to end on CPU.

1. find the gated FFN sites, 2. compile with backend="countdown" at a few sparsities and compare
held-out perplexity with the dense model, 3. greedy-generate with sparse decode steps.
"""

import math
import time

import torch

import countdown_fx
from countdown_fx.data import load_default_model, stdlib_corpus, token_batches, token_stream
from countdown_fx.meter import metered


def perplexity(model, batches) -> float:
    nll, count = 0.0, 0
    with torch.no_grad():
        for ids in batches:
            logits = model(ids).logits[:, :-1].float()
            nll += torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten(), reduction="sum").item()
            count += ids[:, 1:].numel()
    return math.exp(nll / count)


def main() -> None:
    torch.manual_seed(0)
    model, tokenizer = load_default_model()
    held_out = token_stream(stdlib_corpus(max_bytes=2_000_000).split("heldout"), tokenizer)
    batches = list(token_batches(held_out, batch_size=4, seq_len=128, num_batches=4))

    print(countdown_fx.find_sites(model, batches[0]))
    print(f"\nheld-out perplexity, {sum(b[:, 1:].numel() for b in batches)} tokens of stdlib source "
          "(SP-Ideal: each token keeps its top (1 - s) neurons by the method's score, all tokens sparse)")
    print(f"{'method':<14}{'sparsity':>9}{'perplexity':>12}")
    print(f"{'dense':<14}{0.0:>9.1f}{perplexity(model, batches):>12.3f}")
    for method in ("cats", "m-countdown", "d-countdown"):
        for sparsity in (0.5, 0.8):
            torch._dynamo.reset()
            compiled = torch.compile(model, backend="countdown", dynamic=False, options={
                "method": method, "sparsity": sparsity, "regime": "ideal", "apply_to": "all"})
            print(f"{method:<14}{sparsity:>9.1f}{perplexity(compiled, batches):>12.3f}")

    # SP-Prac: calibrate a per-layer threshold once on training text, then measure what it really reaches
    train = token_stream(stdlib_corpus(max_bytes=1_000_000).split("train"), tokenizer)
    config = countdown_fx.CountDownConfig(method="m-countdown", sparsity=0.8, regime="prac", apply_to="all")
    calibration = countdown_fx.calibrate(model, list(token_batches(train, 8, 128, seed=0, num_batches=8)), config)
    meter = countdown_fx.SparsityMeter()
    torch._dynamo.reset()
    ppl = perplexity(metered(model, {"calibration": calibration}, meter), batches)
    print(f"{'m-countdown':<14}{0.8:>9.1f}{ppl:>12.3f}   SP-Prac, calibrated threshold: {meter.report()}")

    prompt = "import os\nimport sys\n\n\ndef main("
    ids = torch.tensor([tokenizer.encode(prompt)])
    for label, options in (("dense", None), ("m-countdown s=0.5, sparse decode steps, dense prefill",
                                               {"method": "m-countdown", "sparsity": 0.5, "apply_to": "decode"})):
        torch._dynamo.reset()
        model, _ = load_default_model()
        if options is not None:  # compile the forward: generate() calls it once for prefill, then once per token
            model.forward = torch.compile(model.forward, backend="countdown", options=options)
        start = time.perf_counter()
        with torch.no_grad():
            out = model.generate(ids, max_new_tokens=48, do_sample=False, use_cache=True, pad_token_id=0)
        text = tokenizer.decode(out[0, ids.shape[1]:].tolist())
        note = "" if options is None else " (includes compilation)"
        print(f"\n[{label}] {time.perf_counter() - start:.1f}s{note}\n{prompt}{text}")

if __name__ == "__main__":
    main()
