"""Host cost of Dynamo's guard checks per decode step, unsharded vs DTensor-sharded (one gloo rank, CPU).

    PYTHONPATH=. torchrun --nproc-per-node 1 benchmarks/speed/guard_cost.py [--no-inline]

A tiny Llama (decode_e2e.TINY) with 2, 8 and 32 layers, compiled with backend="eager" (no Inductor, so the
step is the model's own eager ops); the guard cost is the time per step with guards minus the time under
torch.compiler.set_stance(skip_guard_eval_unsafe=True), the median of 5 rounds of 30 steps each. Explains why a
DTensor decode step on a GPU can be host-bound (benchmarks/results/speed_decode_tp2.md).
"""

import argparse
import os
import statistics
import sys
import time

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(__file__))
from decode_e2e import TINY, build  # noqa: E402
from decode_tp import shard  # noqa: E402


def per_step_us(step, tok, cache, steps=30) -> float:
    t0 = time.perf_counter()
    for i in range(steps):
        step(input_ids=tok, past_key_values=cache, cache_position=torch.tensor([8 + i]), use_cache=True)
    return (time.perf_counter() - t0) / steps * 1e6


def main() -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from transformers import StaticCache

    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--no-inline", action="store_true", help="torch._dynamo.config.inline_inbuilt_nn_modules=False "
                    "(torch 2.13 ignores this setting, with a FutureWarning: both runs then measure the same thing)")
    args = ap.parse_args()
    torch._dynamo.config.inline_inbuilt_nn_modules = not args.no_inline
    dist.init_process_group("gloo")
    mesh = init_device_mesh("cpu", (1,))
    print(f"torch {torch.__version__}; inline_inbuilt_nn_modules={not args.no_inline}")
    for layers in (2, 8, 32):
        for sharded in (False, True):
            torch._dynamo.reset()
            model = build(TINY, layers, 512, torch.device("cpu"), torch.float32)
            if sharded:
                shard(model, mesh)
            cache = StaticCache(config=model.config, max_cache_len=512)  # 8 + 3 + 5 x 60 steps
            step = torch.compile(model.forward, backend="eager", dynamic=False)
            tok = torch.randint(0, TINY["vocab_size"], (1, 1))
            with torch.no_grad():
                model(input_ids=torch.randint(0, TINY["vocab_size"], (1, 8)), past_key_values=cache, use_cache=True)
                per_step_us(step, tok, cache, 3)  # compile
                diffs = []
                for _ in range(5):
                    with_guards = per_step_us(step, tok, cache)
                    with torch.compiler.set_stance("default", skip_guard_eval_unsafe=True):
                        skipped = per_step_us(step, tok, cache)
                    diffs.append(with_guards - skipped)
            print(f"layers {layers:2d} {'DTensor ' if sharded else 'unsharded'}: guards {statistics.median(diffs):6.0f} "
                  f"us/step (rounds {min(diffs):.0f}-{max(diffs):.0f}); step {with_guards:.0f} us with them", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
