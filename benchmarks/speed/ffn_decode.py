"""One gated FFN layer at decode: CountDown Triton kernels vs dense Inductor vs the bytes ceiling.

    PYTHONPATH=. python3 benchmarks/speed/ffn_decode.py --out $OUT [--quick] [--sweep] [--commit SHA]

Every variant runs inside one CUDA graph that calls the FFN on ROT different token sets in a row (weights
are far larger than L2, and each set has its own per-token masks), so the time per call includes launch
gaps as a CUDA-graphed decode step sees them. Medians of triton.testing.do_bench after warm-up.

Activations look like an LLM's: RMS-normalised hidden states with a few high-variance channels, gate/up
rows with per-neuron gain (some neurons fire more often than others, so the masks of different tokens
overlap as they do in real models). Thresholds follow the CountDown calibration rule (mean over
calibration tokens of the k-th smallest score, k = s * d_inter) on separate calibration tokens, so the
realised sparsity varies per token. D-CountDown uses a random predictor at calibration's default rank
(padded to a multiple of RANK_ALIGN, as the rewrite stores it) with tau chosen the same way (its mask quality
is irrelevant to speed; its bytes are counted).

Baselines: dense FFN compiled by Inductor (cuBLAS GEMVs, same CUDA graph treatment); the ideal compact
dense FFN with (1 - s) * d_inter neurons; the bytes ceiling = bytes that must be read (measured union of
the batch's masks) / measured device-to-device copy bandwidth.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import time

import torch
import torch.nn.functional as F
import triton
from torch._library.triton import set_wrap_triton_enabled
from triton.testing import do_bench

from countdown_fx.kernels import ops, pdl_launch, triton_ffn
from countdown_fx.passes.predictor import default_rank
from countdown_fx.passes.rewrite import RANK_ALIGN, stored_rank

SHAPES = {"llama-3.1-8b": (4096, 14336), "qwen2.5-14b": (5120, 13824), "gemma-2-9b": (3584, 14336)}
ROT = 8  # token sets per graph replay


def predictor_rank(D, N) -> int:
    """The rank calibration gives D-CountDown's predictor at this shape by default, padded to a multiple of
    RANK_ALIGN as the rewrite stores it (Llama-3.1-8B: 477 -> 480)."""
    return stored_rank(default_rank(D, N))


def copy_bandwidth() -> float:
    """Bytes/s of a large device-to-device copy, counting bytes read plus written."""
    n = 1 << 29  # 1 GiB of bf16
    a = torch.empty(n, dtype=torch.bfloat16, device="cuda").normal_()
    b = torch.empty_like(a)
    ms = do_bench(lambda: b.copy_(a), warmup=50, rep=300, return_mode="median")
    del a, b
    return 2 * n * 2 / (ms * 1e-3)


def graph_time_us(fn, rot=ROT) -> float:
    """Median µs per call of fn(i) for i in range(rot), all captured in one CUDA graph."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for i in range(rot):
            fn(i)
    torch.cuda.current_stream().wait_stream(s)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for i in range(rot):
            fn(i)
    ms = do_bench(g.replay, warmup=20, rep=100, return_mode="median")
    del g
    return ms * 1e3 / rot


class Layer:
    def __init__(self, D, N, dtype=torch.bfloat16, seed=0):
        gen = torch.Generator(device="cuda").manual_seed(seed)
        dev = "cuda"
        gain = torch.exp(0.4 * torch.randn(N, 1, device=dev, generator=gen))  # per-neuron gain
        self.w_gate = (torch.randn(N, D, device=dev, generator=gen) * D ** -0.5 * gain).to(dtype)
        self.w_up = (torch.randn(N, D, device=dev, generator=gen) * D ** -0.5 * gain).to(dtype)
        self.w_down = (torch.randn(D, N, device=dev, generator=gen) * N ** -0.5).to(dtype)  # nn.Linear layout
        self.w_down_t = self.w_down.t().contiguous()
        self.rank = predictor_rank(D, N)
        # V [D, r] stored transposed and read through a transposed view, as the rewrite stores it
        v = (torch.randn(D, self.rank, device=dev, generator=gen) * D ** -0.5).to(dtype)
        self.pred_v = v.t().contiguous().t()
        self.pred_u = (torch.randn(N, self.rank, device=dev, generator=gen) * self.rank ** -0.5).to(dtype)
        # One copy of the predictor per rotating token set: a single 19 MB copy could stay in the 50 MB L2
        # between calls, which a model's 32 layers never allow. (Measured at 627b0c4: no change in the
        # launch times; the in-model gap was the rank's alignment, NOTES.md "predictor rank".)
        self.pred_copies = [(self.pred_v.clone(), self.pred_u.clone()) for _ in range(ROT)]
        # the same V stored row-major (what a caller of the op may pass): h = x V then always splits d_model
        self.pred_copies_rows = [(v.clone(), pu) for _, pu in self.pred_copies]
        self.chan = torch.exp(0.7 * torch.randn(D, device=dev, generator=gen))  # outlier-ish channels
        self.D, self.N, self.dtype, self.gen = D, N, dtype, gen

    def tokens(self, n):
        x = torch.randn(n, self.D, device="cuda", generator=self.gen) * self.chan
        return (x / x.pow(2).mean(-1, keepdim=True).sqrt()).to(self.dtype)  # RMSNorm-like

    def scores(self, x, method):
        if method == "m":
            return F.linear(x, self.w_up).float().abs()
        return (x.float() @ self.pred_v.float()) @ self.pred_u.float().t()

    def threshold(self, method, s, calib):
        if s <= 0:
            return torch.tensor(-1e30, device="cuda")
        k = max(1, int(round(s * self.N)))
        return self.scores(calib, method).kthvalue(k, dim=-1).values.mean()

    def bytes(self, method, union):
        """Weight bytes a step must read: dense side + union share of the sparse rows (+ predictor)."""
        row = self.D * self.w_gate.element_size()
        if method == "dense":
            return 3 * self.N * row
        if method == "m":
            return self.N * row + 2 * union * self.N * row
        return (self.pred_v.numel() + self.pred_u.numel()) * self.pred_v.element_size() + 3 * union * self.N * row


def dense_ffn(x, w_gate, w_up, w_down):
    return F.linear(F.silu(F.linear(x, w_gate)) * F.linear(x, w_up), w_down)


def git_commit():
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()
    except Exception:
        return "unknown"


def run_sparse(L, xs, thr, mode, config=None, v_rows=False):
    def call(i):
        copies = L.pred_copies_rows if v_rows else L.pred_copies
        pv, pu = copies[i] if mode == triton_ffn.MODE_PRED else (None, None)
        # launched as an eager call of the op launches them (straight through triton, not the tracing wrapper),
        # which is also the way CONFIG["pdl"] gets triton's launch attribute here
        with set_wrap_triton_enabled(False):
            return triton_ffn.sparse_ffn(xs[i], L.w_gate, L.w_up, L.w_down_t, None, None, None, "silu", mode, thr,
                                         pv, pu, config=config)
    return call


def check_once(L, x, thr, mode, config=None):
    """Correctness at full shape before timing: kernel vs the PyTorch reference in fp32 on the same mask."""
    pv, pu = (L.pred_v, L.pred_u) if mode == triton_ffn.MODE_PRED else (None, None)
    with set_wrap_triton_enabled(False):  # as run_sparse launches them
        y, a = triton_ffn.sparse_ffn(x, L.w_gate, L.w_up, L.w_down_t, None, None, None, "silu", mode, thr, pv, pu,
                                     config=config, return_coef=True)
    keep = a != 0
    g, u = F.linear(x.float(), L.w_gate.float()), F.linear(x.float(), L.w_up.float())
    ref = ((F.silu(g) * u) * keep) @ L.w_down_t.float()
    err = ((y.float() - ref).norm() / ref.norm()).item()
    assert err < 2e-2, f"kernel vs fp32 reference: relative error {err:.2e}"
    return err


SWEEP_COEF = [dict(BLOCK_N=16, BLOCK_K=256, num_warps=4, num_stages=3),
              dict(BLOCK_N=32, BLOCK_K=256, num_warps=4, num_stages=3),
              dict(BLOCK_N=32, BLOCK_K=128, num_warps=4, num_stages=4),
              dict(BLOCK_N=64, BLOCK_K=128, num_warps=4, num_stages=3),
              dict(BLOCK_N=32, BLOCK_K=512, num_warps=8, num_stages=2),
              dict(BLOCK_N=16, BLOCK_K=512, num_warps=4, num_stages=3)]
SWEEP_DOWN = [dict(BLOCK_R=32, BLOCK_D=128, num_warps=4, num_stages=3, programs_per_sm=4),
              dict(BLOCK_R=16, BLOCK_D=256, num_warps=4, num_stages=4, programs_per_sm=4),
              dict(BLOCK_R=64, BLOCK_D=128, num_warps=4, num_stages=3, programs_per_sm=2),
              dict(BLOCK_R=32, BLOCK_D=256, num_warps=8, num_stages=3, programs_per_sm=4),
              dict(BLOCK_R=32, BLOCK_D=64, num_warps=4, num_stages=4, programs_per_sm=8)]


def sweep(L, bw, log):
    """Launch configs at batch 1: coef kernel first (down fixed), then the down kernel."""
    calib = L.tokens(256)
    best = {}
    for B in (1, 8):
        xs = [L.tokens(B) for _ in range(ROT)]
        for s in (0.5, 0.9):
            for mode, name in ((triton_ffn.MODE_UP, "m"), (triton_ffn.MODE_PRED, "d")):
                thr = L.threshold(name, s, calib)
                for i, c in enumerate(SWEEP_COEF):
                    t = graph_time_us(run_sparse(L, xs, thr, mode, {"coef": c}))
                    log(f"sweep B={B} s={s} {name} coef[{i}] {c}: {t:.1f} us")
                    best.setdefault(("coef", i), []).append(t)
                for i, c in enumerate(SWEEP_DOWN):
                    t = graph_time_us(run_sparse(L, xs, thr, mode, {"down": c}))
                    log(f"sweep B={B} s={s} {name} down[{i}] {c}: {t:.1f} us")
                    best.setdefault(("down", i), []).append(t)
    for kind in ("coef", "down"):
        cands = {i: sum(v) for (k, i), v in best.items() if k == kind}
        i = min(cands, key=cands.get)
        log(f"best {kind}: [{i}] {(SWEEP_COEF if kind == 'coef' else SWEEP_DOWN)[i]} (sum {cands[i]:.1f} us)")
        # merged: the sweep's tiles leave the kind's other keys (coef's BLOCK_R, num_stages_pred_masked) as they were
        triton_ffn.CONFIG[kind] = {**triton_ffn.CONFIG[kind], **(SWEEP_COEF if kind == "coef" else SWEEP_DOWN)[i]}


def crossover(L, log, batches):
    """Both walks of the down kernel (compacted union vs direct rows) at every sparsity: where the
    compacted walk stops paying sets CONFIG['compact_max_density']."""
    for B, s, name, mode, xs, thr, union, _ in planned_cases(L, [b for b in (1, 4) if b in batches],
                                                             (0.5, 0.7, 0.8, 0.9)):
        t_c = graph_time_us(run_sparse(L, xs, thr, mode, {"compact_max_density": 1.0}))
        t_d = graph_time_us(run_sparse(L, xs, thr, mode, {"compact_max_density": 0.0}))
        log(f"crossover B={B} s={s} {name} union {union:.2f}: compacted {t_c:.1f} us, direct {t_d:.1f} us")


# Launch-config variants timed against the defaults by --compare (the defaults are the empty override;
# each variant runs the sparse side the plan picks unless it names one). Add the next kernel step's variant
# here; the variants of past sessions and their outcomes are in NOTES.md ("Variants").
LAUNCH_ATTRIBUTE = "launch attribute"  # a COMPARE key of this script's own, not a kernel config


@contextlib.contextmanager
def pdl_waits_only():
    """The launcher builds the kernels with PDL=True but passes no launch_pdl: it takes the launches as traced
    ones (whose attribute Inductor's hook would give) and PDL as allowed there."""
    saved = triton_ffn.is_wrap_triton_enabled, pdl_launch.traceable
    triton_ffn.is_wrap_triton_enabled, pdl_launch.traceable = (lambda: True), (lambda: True)
    try:
        yield
    finally:
        triton_ffn.is_wrap_triton_enabled, pdl_launch.traceable = saved


COMPARE = {
    "default": {},
    "masked side": {"sparse_side": "masked"},
    "gather side": {"sparse_side": "gather"},
    # h = x V split over d_model plus its reduce launch at every token count, as before "lowrank FMA"; one
    # column of V per program
    "h split": {"lowrank_no_dot": None},
    "h 1 col K4096": {"lowrank_no_dot": {"BLOCK_RG": 1, "BLOCK_K": 4096}},
    # the reduce summing one split at a time, as before "reduce tiles"
    "reduce loop": {"reduce": {"BLOCK_D": 256, "SPLIT_TILE": 1}},
    # D's FMA gather with gate and up in two loops, as before "fused FMA gather"; one d_model tile per row
    "unfused g+u": {"gather_no_dot": {"fused_max_tokens": 0}},
    "fused g+u 2 tokens": {"gather_no_dot": {"fused_max_tokens": 2}},
    "gather K4096 4w": {"gather_no_dot": {"BLOCK_K": 4096, "num_warps": 4}},
    # shorter FMA gather tiles: fewer registers per thread (ptx_registers.py, D fused at 1 token: 222 at K2048,
    # 127 at K1024, 138 at K512 with 1 warp), so more programs resident per SM and a small union's groups in one wave
    "gather K1024": {"gather_no_dot": {"BLOCK_K": 1024}},
    "gather K1024 RG4": {"gather_no_dot": {"BLOCK_K": 1024, "BLOCK_RG": 4}},
    "gather K512 1w": {"gather_no_dot": {"BLOCK_K": 512, "num_warps": 1}},
    # the down launch's shares summed by fp32 atomics, the last share of each column block casting: no reduce
    # launch; with atomics more shares cost no more partials to sum, so also 8 programs per SM
    "reduce": {"sum_splits": "reduce"},
    "atomic": {"sum_splits": "atomic"},
    "atomic 8/SM": {"sum_splits": "atomic", "down": {"programs_per_sm": 8}},
    # programmatic dependent launch: every launch waits for its predecessor first, then lets the next one start
    "pdl": {"pdl": True},
    # a diagnostic: the kernels with PDL's waits compiled in, launched without the attribute (what the code
    # costs apart from what the early launch gains)
    "pdl waits only": {"pdl": True, LAUNCH_ATTRIBUTE: False},
}
# D only: the variants above with V passed row-major instead of transposed (the split's loads of V^T vs V)
COMPARE_V_ROWS = {"h split, V rows": {"lowrank_no_dot": None}}


def compare_configs(L, log, batches, sps, labels=None):
    """Every COMPARE variant (or those named in `labels`) at each (batch, sparsity), M and D, each checked
    against the fp32 reference first: which launch configs (and sparse side) win, from one call."""
    variants = {k: v for k, v in COMPARE.items() if labels is None or k in labels}
    for B, s, name, mode, xs, thr, union, side in planned_cases(L, batches, sps):
        times = {}
        for label, override in variants.items():
            config = {"sparse_side": side, **override}
            with pdl_waits_only() if config.pop(LAUNCH_ATTRIBUTE, True) is False else contextlib.nullcontext():
                check_once(L, xs[0], thr, mode, config)
                times[label] = graph_time_us(run_sparse(L, xs, thr, mode, config))
        v_rows = {k: v for k, v in COMPARE_V_ROWS.items() if labels is None or k in labels}
        for label, override in (v_rows.items() if mode == triton_ffn.MODE_PRED else ()):
            config = {"sparse_side": side, **override}
            times[label] = graph_time_us(run_sparse(L, xs, thr, mode, config, v_rows=True))
        log(f"compare B={B} s={s} {name} union {union:.2f} (plan: {side}): "
            + ", ".join(f"{label} {t:.1f}" for label, t in times.items()) + " us")


def planned_cases(L, batches, sps):
    """(B, s, method name, kernel mode, ROT token sets, threshold, union, the side the plan picks) for M and
    D at every batch size and sparsity, thresholds from separate calibration tokens."""
    calib = L.tokens(256)
    for B in batches:
        xs = [L.tokens(B) for _ in range(ROT)]
        for s in sps:
            for name, mode in (("m", triton_ffn.MODE_UP), ("d", triton_ffn.MODE_PRED)):
                thr = L.threshold(name, s, calib)
                union = torch.stack([L.scores(x, name) > thr for x in xs]).any(1).float().mean().item()
                plan = ops.decode_plan(ops.op_kind("d-countdown" if name == "d" else "m-countdown"), {B: union})
                yield B, s, name, mode, xs, thr, union, "gather" if plan.path(B) == "gather" else "masked"


# launch names, matched as prefixes of the profiler's kernel names ("_lowrank": either h = x V launch)
KERNELS = ("_lowrank", "_coef_kernel", "_gather_kernel", "_down_kernel", "_reduce_kernel")


def kernel_bytes(L, name, side, union) -> dict:
    """Weight bytes each launch must read (what the ceiling counts), by kernel: the dense side and, on the
    masked side, the union's sparse rows in _coef_kernel; the union's rows in _gather_kernel and
    _down_kernel; the predictor's V in the h = x V launch and its U in _coef_kernel."""
    row = L.D * L.w_gate.element_size()
    sparse_rows = (1 if name == "m" else 2) * union * L.N * row
    pred = L.pred_u.element_size()
    coef = L.N * row if name == "m" else L.N * L.rank * pred
    out = {"_coef_kernel": coef + (sparse_rows if side == "masked" else 0), "_down_kernel": union * L.N * row}
    if side == "gather":
        out["_gather_kernel"] = sparse_rows
    if name == "d":
        out["_lowrank"] = L.D * L.rank * pred
    return out


def profile_kernels(L, log, batches, sps, bw, out, header):
    """Where one FFN call's time goes: each launch's GPU time (torch.profiler, 64 eager calls over the
    rotating token sets) against the bytes it must read, and the sum of the launches against the
    CUDA-graph time per call (the difference is launch gaps and tails between kernels)."""
    from torch.profiler import ProfilerActivity, profile

    lines = ["| method | B | s | side | union | graph µs/call | kernels µs | gaps µs | "
             + " | ".join(k.strip("_").replace("_kernel", "") + " µs (GB/s)" for k in KERNELS[:-1])
             + " | reduce µs (all its launches) |",
             "|---" * (9 + len(KERNELS) - 1) + "|"]
    for B, s, name, mode, xs, thr, union, side in planned_cases(L, batches, sps):
        fn = run_sparse(L, xs, thr, mode, {"sparse_side": side})
        t_graph = graph_time_us(fn)
        calls = 64
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for i in range(calls):
                fn(i % ROT)
            torch.cuda.synchronize()
        us = {k: 0.0 for k in KERNELS}
        for e in prof.key_averages():
            for k in KERNELS:
                if k in e.key:
                    us[k] += e.self_device_time_total / calls
        nbytes = kernel_bytes(L, name, side, union)
        total = sum(us.values())
        cells = [("-" if not us[k] else f"{us[k]:.1f} ({nbytes[k] / (us[k] * 1e3):.0f})" if k in nbytes
                  else f"{us[k]:.1f}") for k in KERNELS]
        lines.append(f"| {name.upper()} | {B} | {s} | {side} | {union:.2f} | {t_graph:.1f} | {total:.1f} | "
                     f"{t_graph - total:.1f} | " + " | ".join(cells) + " |")
        log(lines[-1])
    text = "\n".join(["# Per-launch GPU time of one FFN call (Llama-3.1-8B shape, bf16)", "", header,
                      f"- copy bandwidth {bw / 1e12:.2f} TB/s; GB/s = weight bytes the launch must read / its time "
                      "(the reduce launches read only fp32 partials: the output's splits, and for D h's chunks "
                      "where h = x V is split)",
                      "- kernels µs: torch.profiler over 64 eager calls; graph µs/call: the same calls in one CUDA "
                      "graph; gaps = the difference", ""] + lines)
    with open(os.path.join(out, "speed_ffn_profile.md"), "w") as f:
        f.write(text + "\n")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=".", help="folder for the .md / .json results")
    ap.add_argument("--shapes", default="", help="comma-separated shapes to time (default: all of them)")
    ap.add_argument("--quick", action="store_true", help="llama shape only")
    ap.add_argument("--sweep", action="store_true", help="sweep launch configs first (llama shape)")
    ap.add_argument("--crossover", action="store_true",
                    help="time the down kernel's compacted and direct walks first (llama shape, B 1 and 4; ~70 s)")
    ap.add_argument("--commit", default=None, help="commit named in the table header (default: git rev-parse)")
    ap.add_argument("--batches", default="1,2,4,8,16", help="comma-separated decode batch sizes (tokens per step)")
    ap.add_argument("--sparsities", default="0,0.5,0.7,0.8,0.9", help="comma-separated target sparsities")
    ap.add_argument("--compare", action="store_true",
                    help="only time the COMPARE launch-config variants against the defaults (Llama shape), no table")
    ap.add_argument("--variants", default="",
                    help="with --compare: comma-separated COMPARE labels to time (default: all of them)")
    ap.add_argument("--profile", action="store_true",
                    help="only time each launch against its bytes (Llama shape, torch.profiler), no table")
    args = ap.parse_args()
    if args.quick and args.shapes:
        ap.error("--quick times the llama shape only; give either --quick or --shapes")
    names = ["llama-3.1-8b"] if args.quick else (args.shapes.split(",") if args.shapes else list(SHAPES))
    unknown = sorted(set(names) - set(SHAPES))
    if unknown:
        ap.error(f"--shapes: unknown {unknown}; choose from {sorted(SHAPES)}")
    shapes = {name: SHAPES[name] for name in names}
    os.makedirs(args.out, exist_ok=True)
    # the dense baselines compile once per (batch, neuron count): past Dynamo's default limit of 8 they
    # would silently run eagerly
    torch._dynamo.config.recompile_limit = 256
    logf = open(os.path.join(args.out, "ffn_decode.log"), "w")

    def log(msg):
        print(msg, flush=True)
        logf.write(msg + "\n")
        logf.flush()

    dev = torch.cuda.get_device_name()
    commit = args.commit or git_commit()
    cmd = "PYTHONPATH=. python3 " + " ".join(sys.argv)
    bw = copy_bandwidth()
    log(f"device {dev}; torch {torch.__version__}; triton {triton.__version__}; copy bandwidth {bw / 1e12:.2f} TB/s")
    log(f"commit {commit}; command: {cmd}")  # every log, the --compare and --profile ones too, says what made it
    batches = [int(b) for b in args.batches.split(",")]
    sps = [float(s) for s in args.sparsities.split(",")]
    labels = args.variants.split(",") if args.variants else None
    unknown = sorted(set(labels or ()) - set(COMPARE) - set(COMPARE_V_ROWS))
    if unknown:
        ap.error(f"--variants: unknown {unknown}; choose from {sorted(COMPARE) + sorted(COMPARE_V_ROWS)}")
    if args.compare:
        compare_configs(Layer(*SHAPES["llama-3.1-8b"]), log, batches, sps, labels)
        return
    if args.profile:
        profile_kernels(Layer(*SHAPES["llama-3.1-8b"]), log, batches, sps, bw, args.out,
                        f"- device: {dev}; torch {torch.__version__}; triton {triton.__version__}; commit {commit}; "
                        f"command: `{cmd}`")
        return
    rows = []
    t0 = time.time()
    for si, (shape, (D, N)) in enumerate(shapes.items()):
        L = Layer(D, N, seed=list(SHAPES).index(shape))  # a shape's weights do not depend on --shapes
        if shape == "llama-3.1-8b":  # launch-config sweep and walk crossover: on the Llama shape only
            if args.sweep:
                sweep(L, bw, log)
            if args.crossover:
                crossover(L, log, batches)
        calib = L.tokens(512)
        dense_c = torch.compile(dense_ffn, dynamic=False)  # specialised per shape, as in a model
        for B in batches:
            xs = [L.tokens(B) for _ in range(ROT)]
            t_dense = graph_time_us(lambda i: dense_c(xs[i], L.w_gate, L.w_up, L.w_down))
            for s in sps:
                Nc = max(16, int(round((1 - s) * N)))
                wg, wu, wd = L.w_gate[:Nc], L.w_up[:Nc], L.w_down[:, :Nc].contiguous()
                t_compact = graph_time_us(lambda i: dense_c(xs[i], wg, wu, wd)) if s > 0 else t_dense
                row = dict(shape=shape, D=D, N=N, B=B, s=s, dense_us=t_dense, compact_us=t_compact,
                           dense_ceil_us=L.bytes("dense", 1) / bw * 1e6)
                for name, mode in (("m", triton_ffn.MODE_UP), ("d", triton_ffn.MODE_PRED)):
                    thr = L.threshold(name, s, calib)
                    sc = torch.stack([L.scores(x, name) for x in xs])  # [ROT, B, N]
                    keep = sc > thr
                    union = keep.any(1).float().mean().item()
                    density = keep.float().mean().item()
                    # what the op does at this B given this union as calibrated (ops.decode_plan)
                    plan = ops.decode_plan(ops.op_kind("d-countdown" if name == "d" else "m-countdown"), {B: union})
                    path = plan.path(B)
                    config = {"sparse_side": "gather" if path == "gather" else "masked"}
                    if B == batches[0] or s == 0.9:
                        check_once(L, xs[0], thr, mode, config)
                    t_kernels = graph_time_us(run_sparse(L, xs, thr, mode, config))
                    dense = path == "dense"
                    t = t_dense if dense else t_kernels
                    nbytes = L.bytes("dense", 1) if dense else L.bytes(name, union)
                    row.update({f"{name}_us": t, f"{name}_kernels_us": t_kernels, f"{name}_union": union,
                                f"{name}_density": density, f"{name}_side": path,
                                f"{name}_ceil_us": nbytes / bw * 1e6, f"{name}_gbs": nbytes / t / 1e3})
                rows.append(row)
                log(f"{shape} B={B:2d} s={s:.1f} dense {t_dense:6.1f} compact {t_compact:6.1f} | "
                    f"M {row['m_us']:6.1f} {row['m_side']} (ceil {row['m_ceil_us']:5.1f}, union {row['m_union']:.2f}) | "
                    f"D {row['d_us']:6.1f} {row['d_side']} (kernels {row['d_kernels_us']:6.1f}, ceil "
                    f"{row['d_ceil_us']:5.1f}, union {row['d_union']:.2f})  "
                    f"[{time.time() - t0:.0f}s]")
        del L
        torch.cuda.empty_cache()
        write_results(rows, list(shapes)[:si + 1], dev, commit, cmd, bw, args.out)

    print(write_results(rows, [sh for sh in shapes if any(r["shape"] == sh for r in rows)], dev, commit, cmd, bw,
                        args.out))


def write_results(rows, shapes, dev, commit, cmd, bw, out) -> str:
    """ffn_decode.json and speed_ffn_decode.md from the rows so far (after every shape: a run cut at its
    time limit keeps the shapes it finished)."""
    with open(os.path.join(out, "ffn_decode.json"), "w") as f:
        json.dump(dict(device=dev, commit=commit, command=cmd, copy_bw=bw, config=triton_ffn.CONFIG, rows=rows), f,
                  indent=1)
    md = ["# FFN decode layer: CountDown kernels vs dense (bf16)", "",
          f"- device: {dev}; torch {torch.__version__}; triton {triton.__version__}",
          f"- commit: {commit}; command: `{cmd}`",
          f"- measured copy bandwidth {bw / 1e12:.2f} TB/s (read + write); ceiling = bytes needed / that",
          "- M = M-CountDown (dense up, sparse gate/down), D = D-CountDown (predictor included, at calibration's "
          f"default rank padded to a multiple of {RANK_ALIGN}: " + ", ".join(f"{s} {predictor_rank(*SHAPES[s])}" for s in shapes) + ")",
          "- union: fraction of neurons active for at least one token of the step (measured on these inputs)",
          "- frac = ceiling time / measured time; speedup = dense Inductor (CUDA graph) time / variant time",
          "- side: what the op runs at this batch size given this union as calibrated (`ops.decode_plan`): the "
          "masked or gather sparse side, or the dense FFN where the union is so full that the sparse kernels "
          "lose (the µs column is then the dense baseline's time, not the op's dense path timed on its own; "
          "`D kernels µs` is what the sparse kernels would take)", ""]
    for shape in shapes:
        md += [f"## {shape} (d_model {SHAPES[shape][0]}, d_inter {SHAPES[shape][1]})", "",
               "| B | s | dense µs | compact µs | M µs | M side | M union | M GB/s | M frac | M speedup | D µs | D side "
               "| D kernels µs | D union | D GB/s | D frac | D speedup |",
               "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in rows:
            if r["shape"] != shape:
                continue
            md.append(f"| {r['B']} | {r['s']:.1f} | {r['dense_us']:.1f} | {r['compact_us']:.1f} | {r['m_us']:.1f} | "
                      f"{r['m_side']} | {r['m_union']:.2f} | {r['m_gbs']:.0f} | {r['m_ceil_us'] / r['m_us']:.2f} | "
                      f"{r['dense_us'] / r['m_us']:.2f}x | {r['d_us']:.1f} | {r['d_side']} | {r['d_kernels_us']:.1f} | "
                      f"{r['d_union']:.2f} | {r['d_gbs']:.0f} | {r['d_ceil_us'] / r['d_us']:.2f} | "
                      f"{r['dense_us'] / r['d_us']:.2f}x |")
        md.append("")
    text = "\n".join(md)
    with open(os.path.join(out, "speed_ffn_decode.md"), "w") as f:
        f.write(text + "\n")
    return text




if __name__ == "__main__":
    main()
