"""What a kernel boundary costs inside a CUDA graph, against a grid-wide barrier inside one persistent launch.

Why: at batch 1 and high sparsity the decode FFN is a chain of 4-5 dependent launches (h, logits + mask, gather,
down, reduce), each a few µs above its bytes (NOTES.md). A persistent kernel would run the same phases in one
launch, separated by grid barriers (an atomic counter every program waits on). It can only pay if a barrier
costs less than a kernel boundary does in a graph; this measures both on the same work.

Each phase: every program reads its own CHUNK fp32 values (8 KB; 528 programs read 4.3 MB, a new region per
phase and per call, so L2 does not serve them), sums them, adds the value its neighbour program wrote in the
previous phase, and writes one value: the next phase depends on all programs of this one.
- launches:   K phases as K launches, captured in one CUDA graph.
- persistent: one launch, K phases, K - 1 grid barriers; the last program to leave resets the counter, so the
              graph replays without a memset.
- pdl:        K launches with programmatic dependent launch (Hopper; triton's `launch_pdl=True`): each kernel lets
              the next one launch at once (`gdc_launch_dependents`) and waits for the previous one's writes
              (`gdc_wait`) only before it reads them; its own 8 KB it loads before waiting, as an FFN launch could
              load weights before the previous launch's row list. Inductor (torch 2.11-2.13) does not pass
              `launch_pdl` to user kernels (`wrapper.define_user_defined_triton_kernel`), so this says what
              that would be worth, not what the FFN can use today.
All give the same bits (checked). Per-boundary cost = (time(K) - time(1)) / (K - 1).

    PYTHONPATH=. python3 benchmarks/speed/grid_barrier.py --out $OUT --commit SHA
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
import triton
import triton.language as tl

sys.path.insert(0, os.path.dirname(__file__))
from ffn_decode import git_commit, graph_time_us  # noqa: E402

CHUNK = 2048
ROT = 8  # calls per graph, each on its own regions of the buffer


@triton.jit
def _do_phase(buf_ptr, prev_ptr, next_ptr, region, pid, n_prog, CHUNK: tl.constexpr):
    offs = (region * n_prog + pid).to(tl.int64) * CHUNK + tl.arange(0, CHUNK)
    total = tl.sum(tl.load(buf_ptr + offs), 0)
    left = tl.load(prev_ptr + (pid + 1) % n_prog, cache_modifier=".cg")  # written by another program
    tl.store(next_ptr + pid, total + left)


@triton.jit
def _phase_kernel(buf_ptr, prev_ptr, next_ptr, region, n_prog, CHUNK: tl.constexpr):
    _do_phase(buf_ptr, prev_ptr, next_ptr, region, tl.program_id(0), n_prog, CHUNK)


@triton.jit
def _phase_kernel_pdl(buf_ptr, prev_ptr, next_ptr, region, n_prog, CHUNK: tl.constexpr):
    pid = tl.program_id(0)
    tl.extra.cuda.gdc_launch_dependents()
    offs = (region * n_prog + pid).to(tl.int64) * CHUNK + tl.arange(0, CHUNK)
    total = tl.sum(tl.load(buf_ptr + offs), 0)  # independent of the previous launch: before the wait
    tl.extra.cuda.gdc_wait()
    left = tl.load(prev_ptr + (pid + 1) % n_prog, cache_modifier=".cg")
    tl.store(next_ptr + pid, total + left)


@triton.jit
def _grid_barrier(counter_ptr, expected):
    """Every program arrives (one atomic each, release), then waits until `expected` have (acquire)."""
    tl.debug_barrier()
    tl.atomic_add(counter_ptr, 1, sem="release", scope="gpu")
    seen = tl.atomic_add(counter_ptr, 0, sem="acquire", scope="gpu")
    while seen < expected:
        seen = tl.atomic_add(counter_ptr, 0, sem="acquire", scope="gpu")
    tl.debug_barrier()


@triton.jit
def _persistent_kernel(buf_ptr, outs_ptr, counter_ptr, region0, n_prog, PHASES: tl.constexpr, CHUNK: tl.constexpr):
    pid = tl.program_id(0)
    for p in tl.static_range(PHASES):
        _do_phase(buf_ptr, outs_ptr + p * n_prog, outs_ptr + (p + 1) * n_prog, region0 + p, pid, n_prog, CHUNK)
        if p < PHASES - 1:
            _grid_barrier(counter_ptr, (p + 1) * n_prog)
    tl.debug_barrier()
    left = tl.atomic_add(counter_ptr + 1, 1, sem="acq_rel", scope="gpu")
    if left == n_prog - 1:  # every program has passed every barrier: reset for the next launch
        tl.atomic_xchg(counter_ptr, 0, sem="relaxed", scope="gpu")
        tl.atomic_xchg(counter_ptr + 1, 0, sem="relaxed", scope="gpu")


def run_launches(buf, outs, n_prog, phases, call):
    for p in range(phases):
        _phase_kernel[(n_prog,)](buf, outs[p], outs[p + 1], call * phases + p, n_prog, CHUNK=CHUNK, num_warps=4)


def run_pdl(buf, outs, n_prog, phases, call):
    for p in range(phases):
        _phase_kernel_pdl[(n_prog,)](buf, outs[p], outs[p + 1], call * phases + p, n_prog, CHUNK=CHUNK, num_warps=4,
                                     launch_pdl=True)


def run_persistent(buf, outs, counter, n_prog, phases, call):
    _persistent_kernel[(n_prog,)](buf, outs, counter, call * phases, n_prog, PHASES=phases, CHUNK=CHUNK, num_warps=4)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=None)
    ap.add_argument("--commit", default=None)
    ap.add_argument("--programs", default="132,528")
    ap.add_argument("--phases", default="1,2,3,5")
    args = ap.parse_args()
    commit = args.commit or git_commit()
    dev = torch.cuda.get_device_name()
    phases_list = [int(p) for p in args.phases.split(",")]
    rows = []
    for n_prog in (int(p) for p in args.programs.split(",")):
        regions = ROT * max(phases_list)
        buf = torch.randn(regions * n_prog * CHUNK, device="cuda")
        for phases in phases_list:
            outs_a = torch.zeros(phases + 1, n_prog, device="cuda")
            outs_a[0].normal_()
            outs_b = outs_a.clone()
            outs_c = outs_a.clone()
            counter = torch.zeros(2, dtype=torch.int32, device="cuda")
            run_launches(buf, outs_a, n_prog, phases, 0)
            run_persistent(buf, outs_b, counter, n_prog, phases, 0)
            run_pdl(buf, outs_c, n_prog, phases, 0)
            torch.cuda.synchronize()
            same = torch.equal(outs_a, outs_b) and torch.equal(outs_a, outs_c) and int(counter.abs().sum()) == 0
            t_launch = graph_time_us(lambda i: run_launches(buf, outs_a, n_prog, phases, i), rot=ROT)
            t_pers = graph_time_us(lambda i: run_persistent(buf, outs_b, counter, n_prog, phases, i), rot=ROT)
            t_pdl = graph_time_us(lambda i: run_pdl(buf, outs_c, n_prog, phases, i), rot=ROT)
            # the graph's own replay must also give the launches' bits (PDL edges kept in the graph)
            same = same and torch.equal(outs_a, outs_c)
            rows.append((n_prog, phases, t_launch, t_pers, t_pdl, same))
            print(f"programs {n_prog} phases {phases}: launches {t_launch:.2f} µs, persistent {t_pers:.2f} µs, "
                  f"pdl {t_pdl:.2f} µs, same bits {same}", flush=True)
    lines = ["# Kernel boundary in a CUDA graph vs grid barrier in one launch vs programmatic dependent launch", "",
             f"- device: {dev}; torch {torch.__version__}; triton {triton.__version__}; commit {commit}; command: "
             f"`PYTHONPATH=. python3 benchmarks/speed/grid_barrier.py --programs {args.programs} --phases {args.phases}`",
             f"- a phase: each program reads {CHUNK * 4 // 1024} KB (its own region, new per phase and call), sums it, "
             "adds its neighbour's value from the previous phase; µs per call (median, CUDA graph of "
             f"{ROT} calls); per boundary = (t(K) - t(1)) / (K - 1)", "",
             "| programs | phases K | K launches µs | 1 launch, K-1 barriers µs | K launches with PDL µs | same bits |",
             "|---|---|---|---|---|---|"]
    lines += [f"| {n} | {k} | {a:.2f} | {b:.2f} | {c:.2f} | {s} |" for n, k, a, b, c, s in rows]
    lines += ["", "| programs | per kernel boundary µs | per grid barrier µs | per PDL boundary µs |", "|---|---|---|---|"]
    for n_prog in sorted({r[0] for r in rows}):
        mine = {k: (a, b, c) for n, k, a, b, c, _ in rows if n == n_prog}
        k_max = max(mine)
        if 1 in mine and k_max > 1:
            per = [(mine[k_max][j] - mine[1][j]) / (k_max - 1) for j in range(3)]
            lines.append(f"| {n_prog} | {per[0]:.2f} | {per[1]:.2f} | {per[2]:.2f} |")
    text = "\n".join(lines) + "\n"
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, f"grid_barrier_{commit}.md"), "w") as f:
            f.write(text)
    print(text)


if __name__ == "__main__":
    main()
