"""Hugging Face generate() with CountDown: static KV cache, forward compiled by backend="countdown",
sparse decode steps, dense prefill. Prints tokens/s against dense and the sparsity actually realised.

    python examples/generate.py                      # the embedded tiny Llama, CPU
    python examples/generate.py --model PATH --device cuda --dtype bfloat16 --method d-countdown
"""

import argparse
import time

import torch

import countdown_fx
from countdown_fx.calibration import calibrate
from countdown_fx.data import default_model_path, load_tokenizer, stdlib_corpus, token_batches, token_stream
from countdown_fx.meter import SparsityMeter, metered


def load(path, device, dtype):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype)).to(device).eval()
    return model, load_tokenizer(path)


def timed_generate(model, ids, new_tokens):
    # disable_compile: we compile the forward ourselves (dense: Inductor; sparse: countdown), same mode
    kwargs = dict(max_new_tokens=new_tokens, do_sample=False, cache_implementation="static", pad_token_id=0,
                  disable_compile=True)
    with torch.no_grad():
        model.generate(ids, **kwargs)  # compile + warm up (same cache length, so no recompilation below)
        if ids.is_cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        out = model.generate(ids, **kwargs)
        if ids.is_cuda:
            torch.cuda.synchronize()
    return out, new_tokens * ids.shape[0] / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(default_model_path()), help="local HF checkpoint directory")
    parser.add_argument("--method", default="m-countdown", choices=["cats", "m-countdown", "d-countdown"])
    parser.add_argument("--sparsity", type=float, default=0.7)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--new-tokens", type=int, default=48)
    parser.add_argument("--prompt", default="import os\nimport sys\n\n\ndef main(")
    args = parser.parse_args()

    model, tokenizer = load(args.model, args.device, args.dtype)
    config = countdown_fx.CountDownConfig(method=args.method, sparsity=args.sparsity, regime="prac")
    text = token_stream(stdlib_corpus(max_bytes=1_000_000).split("train"), tokenizer)
    batches = [b.to(args.device) for b in token_batches(text, batch_size=8, seq_len=128, seed=0, num_batches=8)]
    cal = calibrate(model, batches, config)  # once; cal.save(path) keeps it
    print(cal.report())

    ids = torch.tensor([tokenizer.encode(args.prompt)], device=args.device)
    mode = "reduce-overhead" if args.device == "cuda" else None  # CUDA graphs for the decode step
    plain_forward = model.forward
    model.forward = torch.compile(plain_forward, mode=mode)  # the baseline: dense Inductor
    dense_out, dense_tps = timed_generate(model, ids, args.new_tokens)
    options = {"calibration": cal, "apply_to": "decode", "mode": mode}
    torch._dynamo.reset()
    model.forward = torch.compile(plain_forward, backend="countdown", options=options)
    sparse_out, sparse_tps = timed_generate(model, ids, args.new_tokens)

    meter = SparsityMeter()  # the same generation once more, eagerly, to count what the ops keep
    model.forward = metered(plain_forward, options, meter)
    with torch.no_grad():
        model.generate(ids, max_new_tokens=args.new_tokens, do_sample=False, cache_implementation="static",
                       pad_token_id=0, disable_compile=True)

    print(f"\n{args.device}, {args.dtype}; tokens/s of batch-1 greedy decode after warm-up (CPU runs the reference "
          "ops: expect no speed-up there)")
    print(f"\ndense:     {dense_tps:8.1f} tokens/s\n{args.prompt}{tokenizer.decode(dense_out[0, ids.shape[1]:].tolist())}")
    print(f"\ncountdown: {sparse_tps:8.1f} tokens/s ({args.method}, target s={args.sparsity}, {meter.report()})\n"
          f"{args.prompt}{tokenizer.decode(sparse_out[0, ids.shape[1]:].tolist())}")


if __name__ == "__main__":
    main()
