"""End-to-end decode: tokens/s of a Llama-3.1-8B-shaped model (random bf16 weights), static KV cache,
CUDA graphs (mode="reduce-overhead"), dense Inductor vs the countdown backend, against the bytes ceiling.

    PYTHONPATH=. python3 benchmarks/speed/decode_e2e.py --out $OUT [--layers 8] [--batches 1,4]
    PYTHONPATH=. python3 benchmarks/speed/decode_e2e.py --tiny --variants dense,m0.7   # CPU smoke test

Prefill (context tokens) runs eagerly and densely, once per measurement; only the decode steps are
compiled and timed, fed random tokens (--greedy: their own argmax; see forced_tokens). Calibration (thresholds; predictors for D) runs on random token ids through
countdown_fx.calibrate. The full 32-layer model needs ~16 GB of weights; --layers picks fewer layers to
keep compile time inside a device call (the table says how many). lm_head (128256 x 4096) is included.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import os
import sys
import time

import torch

import countdown_fx
from countdown_fx.calibration import calibrate_sweep

sys.path.insert(0, os.path.dirname(__file__))
import decode_attention  # noqa: E402
from ffn_decode import copy_bandwidth, git_commit  # noqa: E402

LLAMA8B = dict(hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8,
               vocab_size=128256, rope_theta=500000.0, tie_word_embeddings=False)
TINY = dict(hidden_size=64, intermediate_size=256, num_attention_heads=4, num_key_value_heads=2, vocab_size=512,
            tie_word_embeddings=False)


def build(shape: dict, layers: int, max_len: int, device, dtype):
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(**shape, num_hidden_layers=layers, max_position_embeddings=max_len)
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype).eval()
    return model


# A variant name may end in "+PRESET": the same calibration as the plain name, run with these kernel launch
# settings merged into triton_ffn.CONFIG (e.g. "d0.9+atomic"), so one run times both against one dense row.
# "pdl": programmatic dependent launch of the FFN kernels (triton_ffn.CONFIG["pdl"]; the backend then compiles
# in-process).
KERNEL_PRESETS = {"atomic": {"sum_splits": "atomic"}, "pdl": {"pdl": True}}
# ... or Inductor options for the variant's graphs (dense too: "dense+ipdl"). "ipdl": Inductor's own programmatic
# dependent launch for its kernels, as TORCHINDUCTOR_ENABLE_PDL=1 gives it; the countdown backend turns it off in
# the graphs it rewrites unless the options ask for it, as this does (sessions 19-20, five H100s: the countdown
# graphs -4.9% to -7.5% on three, +2% to +3% on the two where dense gained 2-6%).
# (Inductor's freezing, which would concatenate q/k/v into one GEMV, is not offered: with the static cache it
# skips CUDA graphs, "mutated inputs", and ran at half speed, dense and sparse alike; session 21.)
INDUCTOR_PRESETS = {"ipdl": {"triton.enable_pdl": True}}


def preset_of(name: str) -> str | None:
    """'d0.9+ipdl' -> 'ipdl'; None for a plain variant."""
    return name.split("+")[1] if "+" in name else None


def inductor_preset(name: str) -> dict:
    """'d0.9+ipdl' -> the Inductor options its graphs compile with ({} for none)."""
    return dict(INDUCTOR_PRESETS.get(preset_of(name), {}))


def base_variant(name: str) -> str:
    """'d0.9+atomic' -> 'd0.9' (what is calibrated and metered)."""
    return name.split("+")[0]


@contextlib.contextmanager
def kernel_preset(name: str):
    """triton_ffn.CONFIG with the preset a variant names, for its compile and its timed steps. The compile
    caches are off meanwhile: they key on the graph, which names the countdown ops, not the launches that
    CONFIG picks inside them, so a cached plain variant would be served for its preset."""
    from countdown_fx.kernels import triton_ffn

    preset = KERNEL_PRESETS.get(preset_of(name), {})
    saved = dict(triton_ffn.CONFIG)
    triton_ffn.CONFIG.update(preset)
    try:
        with torch._inductor.config.patch(fx_graph_cache=not preset), \
                torch._functorch.config.patch(enable_autograd_cache=not preset):
            yield
    finally:
        triton_ffn.CONFIG.clear()
        triton_ffn.CONFIG.update(saved)


def variant_config(name: str):
    """'m0.7' -> M-CountDown at s=0.7, 'd0.9' -> D-CountDown at s=0.9, 'cats0.7' -> CATS."""
    methods = {"m": "m-countdown", "d": "d-countdown", "cats": "cats"}
    name = base_variant(name)
    key = name.rstrip("0123456789.")
    # the predictor must generalise to decode tokens, or it keeps far more neurons than calibration reports
    # (session 4: 50 steps on 1 k tokens); 200 steps is the most a device call affords for 32 layers
    return countdown_fx.CountDownConfig(method=methods[key], sparsity=float(name[len(key):]), regime="prac",
                                        predictor_steps=200)


def decode_tokens_per_s(model, step, batch: int, context: int, new: int, device, prompts: int = 1,
                        greedy: bool = True, profile: bool = False,
                        skip_guard_eval: bool = False) -> tuple[float, list[torch.Tensor]]:
    """Prefill `context` random tokens eagerly, then `new` decode steps through `step`, for each of
    `prompts` prompts; tokens/s over all of them (a first, untimed run compiles and records the CUDA
    graphs). Several prompts, because the neurons a step keeps vary with the context: one prompt can sit
    far from the calibrated sparsity. One cache serves every run (reset by prefill): a new cache would be
    new static addresses, re-recorded graphs inside the timed runs.
    greedy=False feeds random tokens instead of the argmax (see forced_tokens); the work is the same.
    profile: also print where a decode step's time goes (GPU kernel time vs wall time, top kernels).
    skip_guard_eval: after the warm-up, run the steps under torch.compiler.set_stance(skip_guard_eval_unsafe=
    True): Dynamo then checks only the guards that tell its compiled entries apart (tensor checks on inputs and
    buffers such as the KV cache remain; those on parameters go), as a server that calls its captured step
    directly would skip them all. There is one compiled entry per function here, so nothing else can be picked.
    On a DTensor-parallel model the guards cost milliseconds per step (guard_cost.py), enough to make a decode
    step host-bound (benchmarks/results/speed_decode_tp2.md)."""
    from transformers import StaticCache

    cache = StaticCache(config=model.config, max_cache_len=context + new)
    positions = [torch.tensor([context + i], device=device) for i in range(new)]
    elapsed, outputs = 0.0, []
    runs = [("warm-up", 0)] + [("timed", p) for p in range(prompts)] + ([("profile", 0)] if profile else [])
    for kind, prompt in runs:
        with torch.no_grad():
            tok = prefill(model, cache, batch, context, device, prompt)
            forced = None if greedy else forced_tokens(model, batch, new, prompt, device)
            out = [tok]
            if device.type == "cuda":
                torch.cuda.synchronize()
            prof = _profiler() if kind == "profile" else contextlib.nullcontext()
            stance = (torch.compiler.set_stance("default", skip_guard_eval_unsafe=True)
                      if skip_guard_eval and kind != "warm-up" else contextlib.nullcontext())
            with prof, stance:
                start = time.perf_counter()
                for i in range(new - 1):
                    logits = step(input_ids=tok, past_key_values=cache, cache_position=positions[i],
                                  use_cache=True).logits
                    tok = logits[:, -1:].argmax(-1)
                    out.append(tok)
                    if forced is not None:
                        tok = forced[i]
                if device.type == "cuda":
                    torch.cuda.synchronize()
                took = time.perf_counter() - start
        if kind == "profile":
            _print_profile(prof, new - 1, took)
        elif kind == "timed":
            elapsed += took
            outputs.append(torch.cat(out, 1))
    return batch * (new - 1) * prompts / elapsed, outputs


def prefill(model, cache, batch: int, context: int, device, prompt: int = 0) -> torch.Tensor:
    """Reset `cache`, fill it with `context` random tokens (prompt number `prompt` of this batch size: the
    same in every run, eager and dense), and return the first greedy token [batch, 1]."""
    gen = torch.Generator().manual_seed(1000 * batch + prompt)
    ids = torch.randint(0, model.config.vocab_size, (batch, context), generator=gen).to(device)
    cache.reset()
    logits = model(input_ids=ids, past_key_values=cache, cache_position=torch.arange(context, device=device),
                   use_cache=True).logits
    return logits[:, -1:].argmax(-1)


def forced_tokens(model, batch: int, new: int, prompt: int, device) -> torch.Tensor:
    """[new, batch, 1] random token ids to feed as decode inputs (teacher forcing). A random-weight model's
    greedy tokens are atypical: on them D-CountDown's predictor kept no neuron at all (session 5), far
    from the random-token calibration; random inputs keep decode in the calibrated regime, as text the
    model was calibrated on would in a trained model."""
    gen = torch.Generator().manual_seed(7919 * batch + prompt)
    return torch.randint(0, model.config.vocab_size, (new, batch, 1), generator=gen).to(device)


def measured_decode_sparsity(model, cal, batch: int, context: int, steps: int, device, prompts: int = 1,
                             greedy: bool = True) -> tuple[list[float], list[float]]:
    """Per prompt, the (sparsity, union) its decode steps really reach, counted by SparsityMeter over
    the first `steps` decode steps of the same prompts as the timed runs, run eagerly (with greedy=True
    the eager argmax may drift from the compiled run's): the calibrated union is only
    a prediction of the second number, and the plan (sides, dense rule) was chosen from that prediction."""
    from transformers import StaticCache

    from countdown_fx.meter import SparsityMeter, metered

    sparsity, union = [], []
    cache = StaticCache(config=model.config, max_cache_len=context + steps + 1)
    torch._dynamo.reset()
    meters = [SparsityMeter() for _ in range(prompts)]
    current = [meters[0]]  # the meter of the prompt running now: one trace serves every prompt

    class Current(SparsityMeter):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            return current[0].__torch_dispatch__(func, types, args, kwargs)

    step = metered(model, {"calibration": cal, "apply_to": "decode"}, Current())
    for prompt in range(prompts):
        current[0] = meters[prompt]
        with torch.no_grad():
            tok = prefill(model, cache, batch, context, device, prompt)
            forced = None if greedy else forced_tokens(model, batch, steps, prompt, device)
            for i in range(steps):
                logits = step(input_ids=tok, past_key_values=cache,
                              cache_position=torch.tensor([context + i], device=device), use_cache=True).logits
                tok = logits[:, -1:].argmax(-1) if forced is None else forced[i]
        sparsity.append(meters[prompt].step_sparsity("decode"))
        union.append(meters[prompt].step_union("decode"))
    return sparsity, union


def _profiler():
    from torch.profiler import ProfilerActivity, profile

    return profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA])


def _print_profile(prof, steps: int, elapsed: float) -> None:
    """GPU kernel time per step against wall time per step: a gap means launch/CPU overhead."""
    events = [e for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA]
    kernel_us = sum(e.self_device_time_total for e in events) / steps
    print(f"  profile: wall {elapsed / steps * 1e6:.0f} us/step, GPU kernels {kernel_us:.0f} us/step, "
          f"{sum(e.count for e in events) / steps:.0f} kernels/step", flush=True)
    for e in sorted(events, key=lambda e: -e.self_device_time_total)[:10]:
        print(f"    {e.self_device_time_total / steps:8.1f} us/step  x{e.count / steps:.0f}  {e.key[:90]}", flush=True)
    cpu = [e for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CPU]
    for e in sorted(cpu, key=lambda e: -e.self_cpu_time_total)[:6]:  # where a gap's host time goes
        print(f"    cpu {e.self_cpu_time_total / steps:8.1f} us/step  x{e.count / steps:.0f}  {e.key[:86]}", flush=True)
    from torch._dynamo.utils import counters

    skips = {k: v for k, v in counters["inductor"].items() if "cudagraph" in k}
    print(f"  cudagraph counters: {skips}", flush=True)


def step_bytes(model, batch: int, context: int, variant: str) -> float:
    """Bytes a decode step must read at batch 1: all weights but the embedding table (one row each), the
    FFNs at the bytes fraction of the variant (union = 1 - s at batch 1), and the KV cache."""
    cfg = model.config
    total = sum(p.numel() * p.element_size() for n, p in model.named_parameters() if "embed_tokens" not in n)
    size = next(model.parameters()).element_size()
    ffn = 3 * cfg.hidden_size * cfg.intermediate_size * size * cfg.num_hidden_layers
    if base_variant(variant) != "dense":
        c = variant_config(variant)
        u = 1 - c.sparsity
        if c.method == "d-countdown":
            from countdown_fx.passes.predictor import default_rank
            from countdown_fx.passes.rewrite import stored_rank

            # the rank the model reads: zero-padded to aligned rows (477 -> 480 at this shape)
            rank = stored_rank(c.predictor_rank or default_rank(cfg.hidden_size, cfg.intermediate_size))
            frac = u + rank * (cfg.hidden_size + cfg.intermediate_size) / (3 * cfg.hidden_size * cfg.intermediate_size)
        else:
            frac = (1 + 2 * u) / 3
        total -= ffn * (1 - frac)
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    kv = 2 * cfg.num_hidden_layers * batch * context * cfg.num_key_value_heads * head_dim * size
    return total + kv


def spread(values: list[float]) -> str:
    """"0.91 (0.85-1.00)": the mean over prompts and its range; "-" for none."""
    if not values:
        return "-"
    mean = sum(values) / len(values)
    return f"{mean:.2f}" if len(values) == 1 else f"{mean:.2f} ({min(values):.2f}-{max(values):.2f})"


def write_table(rows, args, device, dtype, layers, context, new) -> str:
    """The markdown table of the rows so far (written after every row: a timed-out run keeps its rows)."""
    dense = {}  # the fastest dense row of each batch ("dense" or a preset of it): the baseline to beat
    for r in rows:
        if base_variant(r["variant"]) == "dense":
            dense[r["batch"]] = max(dense.get(r["batch"], 0.0), r["tps"])
    commit = args.commit or git_commit()
    dev = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    md = ["# End-to-end decode, static KV cache" + ("" if args.tiny else ", CUDA graphs"), "",
          f"- device: {dev}; commit {commit}; command: `PYTHONPATH=. python3 {' '.join(sys.argv)}`",
          f"- model: {'tiny Llama (smoke test)' if args.tiny else 'Llama-3.1-8B shapes'} with {layers} layers "
          f"(random weights, {dtype}), context {context}, "
          f"{new} new tokens, prefill dense and untimed; attention `{args.attention}` (`decode_attention.py`)",
          "- ceiling (batch 1): copy bandwidth / bytes a step must read (weights, FFNs at the variant's bytes "
          "fraction with union = 1 - s, KV cache)",
          "- union (calibrated): fraction of FFN neurons a step of this batch reads (union of its tokens' masks) "
          "as calibration predicted it on its own random tokens (held-out batches for D; "
          "`Calibration.union_by_batch`); the plan below was chosen from it",
          f"- tokens/s over {args.prompts} prompt(s) of random tokens per row (the same prompts for every variant); "
          + ("each step fed the greedy token" if args.greedy else
             "each step fed a random token (teacher forcing; a random-weight model's greedy tokens are atypical, "
             "see `forced_tokens`), the same work as greedy decode"),
          "- sparsity / union (decode): what decode really reaches, counted by `SparsityMeter` over the first "
          f"{min(args.metered_steps, new - 1)} of the {new - 1} timed steps of the same prompts, run again eagerly: mean over "
          "prompts (range)",
          "- sites run: how many FFN sites run the masked or gather sparse side, or the dense FFN, at this batch "
          "(`Calibration.decode_plan`, from that union)",
          "- speed-up: against the fastest dense row of the batch (`dense`, or a preset of it such as `dense+ipdl`)",
          "",
          "| variant | batch | union (calibrated) | sites run | sparsity (decode) | union (decode) | tokens/s | "
          "speed-up vs dense | ceiling tokens/s | fraction of ceiling |",
          "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        has_ceil = r["ceil_tps"] == r["ceil_tps"]  # computed at batch 1 only (step_bytes)
        ceil = f"{r['ceil_tps']:.1f} | {r['tps'] / r['ceil_tps']:.2f}" if has_ceil else "- | -"
        union = "-" if r["union"] != r["union"] else f"{r['union']:.2f}"
        sparsity, used = spread(r["sparsity"]), spread(r["used"])
        md.append(f"| {r['variant']} | {r['batch']} | {union} | {r['plan']} | {sparsity} | {used} | {r['tps']:.1f} | "
                  f"{r['tps'] / dense.get(r['batch'], float('nan')):.2f}x"
                  f" | {ceil} |")
    text = "\n".join(md)
    with open(os.path.join(args.out, "speed_decode_e2e.md"), "w") as f:
        f.write(text + "\n")
    return text


def decode_arg_parser(description: str, layers: int, variants: str, tiny_help: str) -> argparse.ArgumentParser:
    """The flags decode_e2e and decode_tp share."""
    ap = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=".")
    ap.add_argument("--layers", type=int, default=layers)
    ap.add_argument("--context", type=int, default=1024)
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--batches", default="1,4")
    ap.add_argument("--variants", default=variants)
    ap.add_argument("--tiny", action="store_true", help=tiny_help)
    ap.add_argument("--commit", default=None)
    ap.add_argument("--greedy", action="store_true",
                    help="feed each step the argmax token (default: random tokens, see forced_tokens)")
    ap.add_argument("--prompts", type=int, default=4,
                    help="prompts timed per row: what a step keeps varies with the context")
    ap.add_argument("--profile", action="store_true", help="print GPU kernel time vs wall time per step")
    ap.add_argument("--skip-guard-eval", action="store_true",
                    help="time the steps with Dynamo's guard checks skipped, dense and sparse alike (see "
                         "decode_tokens_per_s)")
    return ap


def compile_step(forward, calibration, mode, inductor_options: dict | None = None):
    """A fresh static-shape compile of `forward`: dense Inductor (calibration None) or the countdown backend
    with `calibration`, sparse in decode steps only; `inductor_options` for either (inductor_preset). Call it once
    per batch size, as servers capture one CUDA graph per batch size: a second batch size in the same compiled
    function would make Dynamo mark the batch dim dynamic."""
    torch._dynamo.reset()
    if calibration is None:
        if not inductor_options:
            return torch.compile(forward, mode=mode, dynamic=False)
        # torch.compile takes a mode or options, not both: the mode's options first
        options = {**(torch._inductor.list_mode_options(mode) if mode else {}), **inductor_options}
        return torch.compile(forward, dynamic=False, options=options)
    return torch.compile(forward, backend="countdown", dynamic=False,
                         options={"calibration": calibration, "apply_to": "decode", "mode": mode,
                                  "inductor_options": dict(inductor_options or {})})


def calibrate_variants(model, variants, device) -> dict:
    """Calibrations of every sparse variant from one sweep (shared passes: device time is scarce), on random
    token ids; Dynamo is reset afterwards so no calibration graph is reused by a decode step."""
    sparse = list(dict.fromkeys(base_variant(v) for v in variants if base_variant(v) != "dense"))
    if not sparse:
        return {}
    # 5 batches: D-CountDown trains its predictors on 4 and chooses tau on the held-out last one
    ids = [torch.randint(0, model.config.vocab_size, (4, 256), generator=torch.Generator().manual_seed(s))
           .to(device) for s in range(5)]
    calibrations = dict(zip(sparse, calibrate_sweep(model, ids, [variant_config(v) for v in sparse],
                                                    progress=False)))
    torch._dynamo.reset()
    return calibrations


def plan_at(cal, batch: int) -> str:
    """What the sites run in a decode step of `batch` tokens (Calibration.decode_plan), e.g. "gather 32"."""
    paths = collections.Counter(cal.decode_plan(key).path(batch) for key in cal.sites)
    return ", ".join(f"{path} {n}" for path, n in sorted(paths.items()))


def check_sites_rewritten(variant: str, rewritten: int, layers: int) -> None:
    if base_variant(variant) != "dense" and rewritten < layers:
        raise RuntimeError(f"{variant}: only {rewritten} FFN sites rewritten for {layers} layers")


def main():
    ap = decode_arg_parser(__doc__, 8, "dense,m0.7,m0.9,d0.7,d0.9", "CPU smoke test: tiny model, no CUDA graphs")
    ap.add_argument("--attention", choices=decode_attention.CHOICES, default="gqa-sdpa",
                    help="the model's attention (decode_attention.py); the default, SDPA on the KV heads, is the "
                         "fastest measured (session 21): Hugging Face's sdpa copies K and V per query head")
    ap.add_argument("--metered-steps", type=int, default=8,
                    help="decode steps run eagerly under SparsityMeter for the measured sparsity and union")
    args = ap.parse_args()
    variants = args.variants.split(",")
    unknown = sorted({preset_of(v) for v in variants} - {None} - set(KERNEL_PRESETS) - set(INDUCTOR_PRESETS))
    if unknown:
        ap.error(f"unknown variant preset(s) {unknown}: expected one of "
                 f"{sorted(KERNEL_PRESETS) + sorted(INDUCTOR_PRESETS)}")
    os.makedirs(args.out, exist_ok=True)

    device = torch.device("cpu" if args.tiny else "cuda")
    dtype = torch.float32 if args.tiny else torch.bfloat16
    shape = TINY if args.tiny else LLAMA8B
    context, new = (32, 8) if args.tiny else (args.context, args.new)
    mode = None if args.tiny else "reduce-overhead"
    model = build(shape, 2 if args.tiny else args.layers, context + new + 8, device, dtype)
    decode_attention.use_attention(model, args.attention)
    print(f"model: {sum(p.numel() for p in model.parameters()) / 1e9:.2f} B parameters on {device}", flush=True)
    batches = [int(b) for b in args.batches.split(",")]
    bw = copy_bandwidth() if device.type == "cuda" else None

    from countdown_fx.passes.rewrite import counters

    layers = 2 if args.tiny else args.layers
    rows = []
    plain = model.forward
    t_start = time.time()
    calibrations = calibrate_variants(model, variants, device)
    print(f"calibration: {time.time() - t_start:.0f}s", flush=True)
    for b in batches:  # batch sizes outer: a run cut at its time limit has every variant at the first one
        for variant in variants:
            before = counters["sites_rewritten"]
            cal = calibrations.get(base_variant(variant))
            t0 = time.time()
            with kernel_preset(variant):
                step = compile_step(plain, cal, mode, inductor_preset(variant))
                tps, _ = decode_tokens_per_s(model, step, b, context, new, device, args.prompts, args.greedy,
                                             args.profile, args.skip_guard_eval)
            ceil = bw / step_bytes(model, b, context, variant) if bw else float("nan")
            sites = counters["sites_rewritten"] - before
            check_sites_rewritten(variant, sites, layers)
            nan = float("nan")
            dense = base_variant(variant) == "dense"
            union = cal.union_by_batch().get(b, nan) if not dense else nan
            metered = [r for r in rows if r["batch"] == b and base_variant(r["variant"]) == base_variant(variant)]
            if dense:
                sparsity, used = [], []
            elif metered:  # a preset changes launches, not masks: the plain variant's meter holds
                sparsity, used = metered[0]["sparsity"], metered[0]["used"]
            else:
                sparsity, used = measured_decode_sparsity(model, cal, b, context, args.metered_steps, device,
                                                          args.prompts, args.greedy)
            rows.append(dict(variant=variant, batch=b, tps=tps, ceil_tps=ceil * b if b == 1 else nan,
                             union=union, plan=plan_at(cal, b) if not dense else "-",
                             sparsity=sparsity, used=used))
            print(f"{variant:6s} B={b}: {tps:9.1f} tokens/s  ({time.time() - t0:.0f}s incl. compile and meter; "
                  f"{time.time() - t_start:.0f}s since start; "
                  f"{sites} sites rewritten; decode sparsity {spread(sparsity)}, union {spread(used)} vs "
                  f"calibrated {union:.3f})", flush=True)
            write_table(rows, args, device, dtype, layers, context, new)

    print(write_table(rows, args, device, dtype, layers, context, new))


if __name__ == "__main__":
    main()
