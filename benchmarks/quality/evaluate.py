"""Quality of CountDown sparsity on a causal LM: perplexity and next-token accuracy on held-out text.

For dense and every method (cats, m-countdown, d-countdown) x regime (ideal, prac) x sparsity, in two
settings, each with the sparsity actually realised beside the numbers:

  all     every token of a sequence runs sparse (one forward pass; apply_to="all"); all next-token
          predictions are scored.
  decode  the paper's setting, done for real: a prefix of --prefix tokens is prefilled (dense: the ops run
          dense on multi-token inputs, apply_to="decode"), then the next --decode-steps tokens are fed one
          at a time through the KV cache (teacher forcing), each a sparse decode step; only the
          predictions of those decode steps are scored. Their K/V, computed sparse, stay in the cache.
          All sequences step together, with dense_fallback=False: a calibration's dense rule for big decode
          batches (a speed choice) would otherwise score the dense FFN.

The model runs through the library's own path: torch.compile with the countdown graph rewrite
(countdown_fx.backend.transform), executed eagerly instead of through Inductor (same ops, same semantics,
no C++ compile per configuration) under countdown_fx.meter.SparsityMeter, which counts the neurons every
countdown op call keeps. SP-Prac state comes from countdown_fx.calibration.calibrate_sweep on the *train*
split (random windows), never on the held-out text.

    python benchmarks/quality/evaluate.py --model benchmarks/quality/models/llama-silu
Writes benchmarks/results/quality_<name>.md, .png and .json.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

from countdown_fx.calibration import calibrate_sweep  # noqa: E402
from countdown_fx.config import CountDownConfig  # noqa: E402
from countdown_fx.data import load_tokenizer, stdlib_corpus, token_batches, token_stream  # noqa: E402
from countdown_fx.meter import SparsityMeter, metered  # noqa: E402

METHODS = ("cats", "m-countdown", "d-countdown")
REGIMES = ("ideal", "prac")
SETTINGS = ("all", "decode")
LABEL = {"cats": "CATS", "m-countdown": "M-CountDown", "d-countdown": "D-CountDown"}


# ------------------------------------------------------------------------------------------ measuring
def compiled(model, options, meter: SparsityMeter):
    """torch.compile with the countdown rewrite, run eagerly under `meter`, from a fresh Dynamo cache
    (no recompile limit across configurations, no stale graph)."""
    torch._dynamo.reset()
    return metered(model, options, meter)


# ------------------------------------------------------------------------------------------ scoring
def score_logits(logits: torch.Tensor, targets: torch.Tensor) -> tuple[float, int, int]:
    """(summed NLL, correct top-1 predictions, count) of logits [..., V] for targets [...]."""
    logits = logits.float().reshape(-1, logits.shape[-1])
    targets = targets.reshape(-1)
    nll = F.cross_entropy(logits, targets, reduction="sum").item()
    return nll, int((logits.argmax(-1) == targets).sum()), targets.numel()


def summarise(nll: float, correct: int, n: int, realised: float) -> dict:
    return {"ppl": math.exp(nll / n), "acc": correct / n, "tokens": n, "realised": realised}


@torch.no_grad()
def eval_all(model, seqs: torch.Tensor, options, batch_size: int) -> dict:
    meter = SparsityMeter() if options else None
    run = compiled(model, options, meter) if options else model
    nll = correct = n = 0
    for chunk in seqs.split(batch_size):
        logits = run(chunk).logits
        a, b, c = score_logits(logits[:, :-1], chunk[:, 1:])
        nll, correct, n = nll + a, correct + b, n + c
    return summarise(nll, correct, n, meter.sparsity if meter else 0.0)


@torch.no_grad()
def eval_decode(model, seqs: torch.Tensor, options, prefix: int, steps: int) -> dict:
    from transformers import DynamicCache

    meter = SparsityMeter() if options else None
    run = compiled(model, options, meter) if options else model
    cache = DynamicCache(config=model.config)
    out = run(seqs[:, :prefix], past_key_values=cache, use_cache=True)  # dense prefill: not scored
    nll = correct = n = 0
    for pos in range(prefix, prefix + steps):
        out = run(seqs[:, pos:pos + 1], past_key_values=out.past_key_values, use_cache=True)
        a, b, c = score_logits(out.logits[:, -1], seqs[:, pos + 1])
        nll, correct, n = nll + a, correct + b, n + c
    return summarise(nll, correct, n, meter.step_sparsity("decode") if meter else 0.0)  # decode steps only


# ------------------------------------------------------------------------------------------ the sweep
def calibrations(model, tokenizer, sparsities, args) -> dict:
    """(method, s) -> Calibration, all from shared passes over random train-split windows."""
    train = token_stream(stdlib_corpus(max_bytes=args.calib_corpus_bytes).train, tokenizer)
    batches = list(token_batches(train, args.calib_batch, args.seq_len, seed=1234, num_batches=args.calib_batches))
    configs = [CountDownConfig(method=m, sparsity=s, regime="prac", threshold_rule=args.rule,
                               predictor_steps=args.predictor_steps, predictor_lr=args.predictor_lr,
                               predictor_batch_tokens=args.predictor_batch_tokens, seed=0)
               for m in METHODS for s in sparsities]
    cals = calibrate_sweep(model, batches, configs, progress=not args.quiet)
    return {(c.method, c.sparsity): cal for c, cal in zip(configs, cals)}


def run_sweep(model, seqs, cals, sparsities, args) -> list[dict]:
    rows = []
    dense = {"all": eval_all(model, seqs, None, args.batch_size),
             "decode": eval_decode(model, seqs, None, args.prefix, args.decode_steps)}
    rows.append({"method": "dense", "regime": "-", "sparsity": 0.0, **_flat(dense)})
    for method in METHODS:
        for regime in REGIMES:
            for s in sparsities:
                t0 = time.time()
                res = {}
                for setting in SETTINGS:
                    # decode: all sequences step together, so a calibrated plan would run its dense FFN from
                    # some batch size on; the quality of the method is the quality of its sparse steps
                    opts = {"apply_to": setting} if setting == "all" else {"apply_to": setting, "dense_fallback": False}
                    if regime == "ideal":
                        opts.update(method=method, sparsity=s, regime="ideal")
                    else:
                        opts.update(calibration=cals[(method, s)])
                    res[setting] = (eval_all(model, seqs, opts, args.batch_size) if setting == "all" else
                                    eval_decode(model, seqs, opts, args.prefix, args.decode_steps))
                rows.append({"method": method, "regime": regime, "sparsity": s, **_flat(res)})
                if not args.quiet:
                    print(f"{method:12s} {regime:5s} s={s:.1f}  all ppl {res['all']['ppl']:.3f} "
                          f"(realised {res['all']['realised']:.3f})  decode ppl {res['decode']['ppl']:.3f} "
                          f"(realised {res['decode']['realised']:.3f})  [{time.time() - t0:.1f}s]", flush=True)
    return rows


def _flat(res: dict) -> dict:
    return {f"{setting}_{k}": v for setting, r in res.items() for k, v in r.items()}


# ------------------------------------------------------------------------------------------ reporting
def findings(rows: list[dict], sparsities) -> list[str]:
    """Plain statements about the numbers, checked against the paper's expectations."""
    get = {(r["method"], r["regime"], r["sparsity"]): r for r in rows}
    out = []
    for setting in SETTINGS:
        key = f"{setting}_ppl"
        best = []
        for s in sparsities:
            cands = {(m, g): get[(m, g, s)][key] for m in METHODS for g in REGIMES}
            best.append(min(cands, key=cands.get))
        d_best = [s for s, b in zip(sparsities, best) if b == ("d-countdown", "ideal")]
        out.append(f"[{setting}] lowest perplexity per s: " + ", ".join(
            f"s={s:g}: {LABEL[m]}-{g}" for s, (m, g) in zip(sparsities, best))
            + f" -> D-ideal best at {len(d_best)}/{len(sparsities)} sparsities (expected: all).")
        for regime in REGIMES:
            wins = [f"s={s:g}: {'M' if get[('m-countdown', regime, s)][key] < get[('cats', regime, s)][key] else 'CATS'}"
                    f" ({get[('m-countdown', regime, s)][key]:.3f} vs {get[('cats', regime, s)][key]:.3f})"
                    for s in sparsities]
            out.append(f"[{setting}] M-CountDown vs CATS, {regime}: " + ", ".join(wins) + ".")
    return out


def write_markdown(path: Path, rows, sparsities, meta: dict, notes: list[str]) -> None:
    dense = rows[0]
    lines = [f"# CountDown quality: {meta['model_name']}", "",
             f"- model: `{meta['model']}` ({meta['model_type']}, {meta['params'] / 1e6:.2f}M parameters, "
             f"{meta['sites']} gated FFN sites, d_model {meta['d_model']}, d_inter {meta['d_inter']}, "
             f"activation {meta['activation']}, layout {meta['layout']})",
             f"- device: {meta['device']}; torch {meta['torch']}; {meta['threads']} thread(s); fp32",
             f"- commit: `{meta['commit']}`; date {meta['date']}; total time {meta['seconds']:.0f} s",
             f"- command: `{meta['command']}`",
             f"- held-out text: {meta['heldout']}",
             f"- calibration (SP-Prac): {meta['calibration']}",
             "",
             "ppl = perplexity (lower is better), acc = next-token top-1 accuracy, real = sparsity actually "
             "realised (fraction of FFN neurons skipped, over the scored calls; ideal = exact by construction).",
             "*all*: every token sparse, one forward pass. *decode*: prefix prefilled dense, then each token a "
             "sparse decode step through the KV cache; only decode-step predictions scored.",
             "",
             "| method | regime | s | all ppl | Δppl | all acc | all real | decode ppl | Δppl | decode acc | decode real |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        def rel(setting):
            return "" if r["method"] == "dense" else f"{(r[f'{setting}_ppl'] / dense[f'{setting}_ppl'] - 1):+.1%}"
        name = "dense" if r["method"] == "dense" else LABEL[r["method"]]
        lines.append(f"| {name} | {r['regime']} | {r['sparsity']:g} | {r['all_ppl']:.3f} | {rel('all')} | "
                     f"{r['all_acc']:.3f} | {r['all_realised']:.3f} | {r['decode_ppl']:.3f} | {rel('decode')} | "
                     f"{r['decode_acc']:.3f} | {r['decode_realised']:.3f} |")
    lines += ["", "## Findings (computed from the table)", ""] + [f"- {n}" for n in notes]
    lines += ["", "What this means, across the reference models and against the expected results: "
              "[quality_summary.md](quality_summary.md)."]
    lines += ["", f"![quality vs sparsity]({path.with_suffix('.png').name})", ""]
    path.write_text("\n".join(lines))


def plot(path: Path, rows, sparsities, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker  # noqa: F401  (matplotlib.ticker.* below)

    fig, axes = plt.subplots(2, 2, figsize=(11, 8), sharex=True)
    colors = {"cats": "tab:orange", "m-countdown": "tab:blue", "d-countdown": "tab:green"}
    dense = rows[0]
    for col, setting in enumerate(SETTINGS):
        for row_i, (metric, label) in enumerate((("ppl", "perplexity (log)"), ("acc", "next-token accuracy"))):
            ax = axes[row_i, col]
            for m in METHODS:
                for regime, style in (("ideal", "-"), ("prac", "--")):
                    ys = [next(r for r in rows if (r["method"], r["regime"], r["sparsity"]) == (m, regime, s))
                          [f"{setting}_{metric}"] for s in sparsities]
                    ax.plot(sparsities, ys, style, marker="o", color=colors[m], label=f"{LABEL[m]} {regime}")
            ax.axhline(dense[f"{setting}_{metric}"], color="black", lw=1, ls=":", label="dense")
            if metric == "ppl":
                ax.set_yscale("log")
                ax.yaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%.1f"))
                ax.yaxis.set_minor_formatter(matplotlib.ticker.FormatStrFormatter("%.1f"))
            ax.set_title(f"{setting} tokens sparse" if setting == "all" else "decode steps sparse (prefill dense)")
            ax.set_ylabel(label)
            ax.grid(alpha=0.3)
            if row_i == 1:
                ax.set_xlabel("target sparsity s")
    axes[0, 0].legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def describe(model, seqs) -> dict:
    from countdown_fx.capture import find_sites

    sites = find_sites(model, seqs[:1, :8])
    if not sites:
        raise SystemExit("no gated FFN found in this model: nothing to evaluate")
    s0 = sites[0]
    return {"sites": len(sites), "d_model": s0.d_model, "d_inter": s0.d_inter, "activation": s0.activation,
            "layout": s0.layout}


def git_commit() -> str:
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                             check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True).stdout.strip()
        return sha + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def render(json_path: Path, out_dir: Path | None = None) -> int:
    """Re-write the markdown and plot of a finished run from its JSON (the numbers are not recomputed), into
    out_dir (default: beside the JSON)."""
    saved = json.loads(json_path.read_text())
    rows, meta = saved["rows"], saved["meta"]
    sparsities = sorted({r["sparsity"] for r in rows if r["method"] != "dense"})
    stem = (out_dir / json_path.name if out_dir is not None else json_path).with_suffix("")
    stem.parent.mkdir(parents=True, exist_ok=True)
    write_markdown(stem.with_suffix(".md"), rows, sparsities, meta, findings(rows, sparsities))
    plot(stem.with_suffix(".png"), rows, sparsities, f"{meta['model_name']}: quality vs FFN sparsity")
    print(f"re-wrote {stem}.md / .png")
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                epilog="Writes benchmarks/results/quality_<name>.{md,png,json}.")
    p.add_argument("--model", help="a local Hugging Face causal-LM checkpoint directory")
    p.add_argument("--render", metavar="JSON", help="only re-write the .md and .png of a saved quality_*.json")
    p.add_argument("--name", default=None, help="name in the output files (default: the directory name)")
    p.add_argument("--sparsities", type=float, nargs="+", default=[0.5, 0.7, 0.8, 0.9], help="target sparsities to evaluate")
    p.add_argument("--num-seqs", type=int, default=32, help="held-out sequences")
    p.add_argument("--seq-len", type=int, default=256, help="tokens per sequence (all setting)")
    p.add_argument("--batch-size", type=int, default=16, help="sequences per forward pass")
    p.add_argument("--prefix", type=int, default=128, help="decode setting: dense prefill length")
    p.add_argument("--decode-steps", type=int, default=64, help="decode setting: scored sparse decode steps")
    p.add_argument("--rule", choices=["mean-kth", "quantile"], default="mean-kth", help="SP-Prac threshold rule for CATS / M")
    p.add_argument("--calib-batches", type=int, default=16, help="calibration batches (training split)")
    p.add_argument("--calib-batch", type=int, default=8, help="sequences per calibration batch")
    p.add_argument("--calib-corpus-bytes", type=int, default=64 * 2**20, help="cap on the calibration text read")
    p.add_argument("--predictor-steps", type=int, default=CountDownConfig.predictor_steps, help="D-CountDown predictor AdamW steps")
    p.add_argument("--predictor-lr", type=float, default=CountDownConfig.predictor_lr, help="D-CountDown predictor peak learning rate")
    p.add_argument("--predictor-batch-tokens", type=int, default=CountDownConfig.predictor_batch_tokens, help="tokens per predictor training step")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--out-dir", default=None,
                   help="where the .md / .png / .json go (default: benchmarks/results; with --render, beside the JSON)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    args = p.parse_args(argv)
    if args.render:
        return render(Path(args.render), Path(args.out_dir) if args.out_dir else None)
    if not args.model:
        p.error("--model is required")
    for flag in ("num_seqs", "seq_len", "batch_size", "prefix", "decode_steps", "calib_batches", "calib_batch"):
        if getattr(args, flag) < 1:
            p.error(f"--{flag.replace('_', '-')} must be at least 1, got {getattr(args, flag)}")
    args.out_dir = args.out_dir or str(ROOT / "benchmarks" / "results")
    if args.prefix + args.decode_steps + 1 > args.seq_len:
        p.error("--prefix + --decode-steps must be < --seq-len")
    if args.threads:
        torch.set_num_threads(args.threads)
    from transformers import AutoModelForCausalLM

    t0 = time.time()
    name = args.name or Path(args.model).resolve().name
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    tokenizer = load_tokenizer(args.model)
    corpus = stdlib_corpus()
    held = token_stream(corpus.heldout, tokenizer)
    seqs = next(token_batches(held, args.num_seqs, args.seq_len))  # consecutive windows from the start
    info = describe(model, seqs)
    sparsities = sorted(args.sparsities)
    cals = calibrations(model, tokenizer, sparsities, args)
    rows = run_sweep(model, seqs, cals, sparsities, args)
    notes = findings(rows, sparsities)
    d_stats = [st for (m, s), cal in cals.items() if m == "d-countdown" for st in cal.stats.values()]
    rank = d_stats[0]["rank"] if d_stats else None
    recall = {s: sum(st["recall"] for st in cals[("d-countdown", s)].stats.values()) / info["sites"]
              for s in sparsities}
    meta = {
        "model_name": name, "model": args.model, "model_type": model.config.model_type,
        "params": sum(p.numel() for p in model.parameters()), **info,
        "device": f"CPU ({cpu_name()})", "torch": torch.__version__, "threads": torch.get_num_threads(),
        "commit": git_commit(), "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "command": "python " + " ".join([str(Path(sys.argv[0]))] + (argv if argv is not None else sys.argv[1:])),
        "heldout": f"{args.num_seqs} consecutive windows of {args.seq_len} tokens from the held-out split of the "
                   f"Python {platform.python_version()} stdlib corpus (countdown_fx.data); decode: prefix "
                   f"{args.prefix}, {args.decode_steps} scored steps per sequence",
        "calibration": f"{args.calib_batches} x {args.calib_batch} random train-split windows of {args.seq_len} "
                       f"tokens; thresholds rule {args.rule}; D predictor rank {rank} (default: the largest within 5% of the FFN, stored padded to a multiple of 16), "
                       f"{args.predictor_steps} AdamW steps x {args.predictor_batch_tokens} tokens, lr "
                       f"{args.predictor_lr}; mean per-site predictor recall vs oracle on calibration data: "
                       + ", ".join(f"s={s:g}: {r:.1%}" for s, r in recall.items()),
        "seconds": time.time() - t0,
    }
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"quality_{name}"
    write_markdown(stem.with_suffix(".md"), rows, sparsities, meta, notes)
    plot(stem.with_suffix(".png"), rows, sparsities, f"{name}: quality vs FFN sparsity")
    stem.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows, "findings": notes}, indent=1))
    print("\n".join(notes))
    print(f"wrote {stem}.md / .png / .json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
