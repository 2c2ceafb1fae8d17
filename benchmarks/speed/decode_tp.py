"""Tensor-parallel decode: tokens/s of a Llama-3.1-8B-shaped model (random bf16 weights) sharded over
the GPUs of one host, dense Inductor vs the countdown backend, both with CUDA graphs and a static KV cache.

    NCCL_NVLS_ENABLE=0 PYTHONPATH=. torchrun --nproc-per-node 2 benchmarks/speed/decode_tp.py --out $OUT
    PYTHONPATH=. torchrun --nproc-per-node 2 benchmarks/speed/decode_tp.py --tiny      # CPU smoke test (gloo)

The model is sharded with torch.distributed.tensor.parallel (Megatron layout): q/k/v and gate/up
column-parallel, o and down row-parallel (an all-reduce after each), embeddings and lm_head replicated.
CountDown is shard-local: each rank calibrates and skips its own neurons (state keyed `...@tp<rank>of<n>`).
Every rank runs the same steps; rank 0 writes the table. The decode loop is decode_e2e's.
"""

from __future__ import annotations

import os
import sys
import time

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(__file__))
from decode_e2e import (LLAMA8B, TINY, build, calibrate_variants, check_sites_rewritten,  # noqa: E402
                        compile_step, decode_arg_parser, decode_tokens_per_s, measured_decode_sparsity, spread)
from ffn_decode import git_commit  # noqa: E402

from countdown_fx.distributed import destroy_process_group  # noqa: E402


def shard(model, mesh) -> None:
    """Megatron-style tensor parallelism on every decoder layer, in place."""
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    col, row = ColwiseParallel(), RowwiseParallel()
    plan = {"self_attn.q_proj": col, "self_attn.k_proj": col, "self_attn.v_proj": col, "self_attn.o_proj": row,
            "mlp.gate_proj": col, "mlp.up_proj": col, "mlp.down_proj": row}
    for layer in model.model.layers:
        parallelize_module(layer, mesh, plan)


def main() -> None:
    ap = decode_arg_parser(__doc__, 32, "dense,m0.7,d0.9", "CPU smoke test on gloo: tiny model, no CUDA graphs")
    ap.add_argument("--metered-steps", type=int, default=8,
                    help="decode steps run eagerly under SparsityMeter for the sparsity and union each rank reaches")
    args = ap.parse_args()

    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")  # NVLink multicast off (device README)
    cuda = not args.tiny
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    try:
        from torch.distributed.device_mesh import init_device_mesh

        from countdown_fx.passes.rewrite import counters

        if cuda:
            torch.cuda.set_device(rank)
        device = torch.device(f"cuda:{rank}" if cuda else "cpu")
        dtype = torch.bfloat16 if cuda else torch.float32
        shape, layers = (LLAMA8B, args.layers) if cuda else (TINY, 2)
        context, new = (args.context, args.new) if cuda else (32, 8)
        model = build(shape, layers, context + new + 8, device, dtype)  # same seed: same weights on every rank
        shard(model, init_device_mesh(device.type, (world,)))
        mode = "reduce-overhead" if cuda else None
        variants = args.variants.split(",")
        calibrations = calibrate_variants(model, variants, device)
        rows = []
        for b in (int(b) for b in args.batches.split(",")):  # batch outer: a cut run has every variant at the first
            for variant in variants:
                before = counters["sites_rewritten"]
                cal = calibrations.get(variant)
                if cal is not None:
                    assert all(key.endswith(f"@tp{rank}of{world}") for key in cal.state), list(cal.state)[:2]
                step = compile_step(model.forward, cal, mode)  # one per batch size
                t0 = time.time()
                tps, toks = decode_tokens_per_s(model, step, b, context, new, device, args.prompts, args.greedy,
                                                args.profile, args.skip_guard_eval)  # on every rank (collectives)
                check_sites_rewritten(variant, counters["sites_rewritten"] - before, layers)
                same = [None] * world
                dist.all_gather_object(same, [t.cpu() for t in toks])  # every prompt's tokens
                assert all(len(o) == len(same[0]) and all(torch.equal(x, y) for x, y in zip(o, same[0]))
                           for o in same), "ranks decoded different tokens"
                # what each rank's shards really reached (every rank runs the metered steps: collectives)
                metered = ([], []) if cal is None else measured_decode_sparsity(
                    model, cal, b, context, min(args.metered_steps, new - 1), device, args.prompts, args.greedy)
                by_rank = [None] * world
                dist.all_gather_object(by_rank, metered)
                sparsity = [v for per_rank, _ in by_rank for v in per_rank]
                used = [v for _, per_rank in by_rank for v in per_rank]
                rows.append((variant, b, tps, sparsity, used))
                if rank == 0:  # the table so far after every row: a run cut off by a time limit keeps its rows
                    print(f"{variant:6s} B={b}: {tps:9.1f} tokens/s ({time.time() - t0:.0f}s incl. compile and meter; "
                          f"decode sparsity {spread(sparsity)}, union {spread(used)})", flush=True)
                    write_table(rows, args, device, dtype, layers, context, new, world)
        if rank == 0:
            print(write_table(rows, args, device, dtype, layers, context, new, world))
    finally:
        destroy_process_group()  # frees the CUDA graphs first: NCCL captured in one hangs a plain destroy


def write_table(rows, args, device, dtype, layers, context, new, world) -> str:
    commit = args.commit or git_commit()
    dev = f"{world} x {torch.cuda.get_device_name()}" if device.type == "cuda" else f"{world} CPU processes (gloo)"
    dense = {b: tps for v, b, tps, _, _ in rows if v == "dense"}
    md = ["# Tensor-parallel decode, static KV cache" + (", CUDA graphs" if device.type == "cuda" else ""), "",
          f"- device: {dev}; torch {torch.__version__}; commit {commit}",
          f"- command: `{' '.join(sys.argv)}`",
          f"- model: {'Llama-3.1-8B shapes' if device.type == 'cuda' else 'tiny Llama (smoke test)'}, {layers} "
          f"layers, random {dtype} weights, tensor-parallel over {world} ranks (q/k/v, gate/up column-parallel; "
          f"o, down row-parallel); context {context}, {new} new tokens, prefill dense and untimed",
          f"- tokens/s over {args.prompts} prompt(s) of random tokens per row; each step fed "
          + ("the greedy token" if args.greedy else "a random token (decode_e2e.forced_tokens)"),
          "- countdown: shard-local thresholds (and predictors) calibrated on the sharded model",
          f"- sparsity / union (decode): what each rank's shards really reach, counted by `SparsityMeter` over the "
          f"first {min(args.metered_steps, new - 1)} decode steps of the same prompts, run again eagerly: mean over "
          "ranks and prompts (range)", "",
          "| variant | batch | sparsity (decode) | union (decode) | tokens/s | speed-up vs dense |",
          "|---|---|---|---|---|---|"]
    md += [f"| {v} | {b} | {spread(sparsity)} | {spread(used)} | {tps:.1f} | {tps / dense.get(b, float('nan')):.2f}x |"
           for v, b, tps, sparsity, used in rows]
    text = "\n".join(md)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, f"speed_decode_tp{world}.md"), "w") as f:
        f.write(text + "\n")
    return text


if __name__ == "__main__":
    main()
