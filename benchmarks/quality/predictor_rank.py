"""How much of D-CountDown's SP-Prac gap is the predictor's size? Perplexity vs predictor rank at one sparsity.

The default rank keeps the predictor at <= 5% of the FFN's weights (the paper's budget); at small shapes
that is a rank of a few dozen. This trains predictors of several ranks from the same shared calibration
passes as evaluate.py and scores them on the same held-out windows (all tokens sparse), next to M-CountDown
SP-Prac and D-CountDown SP-Ideal at the same sparsity.

    python benchmarks/quality/predictor_rank.py --model benchmarks/quality/models/llama-silu --threads 1
Writes benchmarks/results/quality_predictor_rank_<name>.md.
"""

from __future__ import annotations

import argparse
import datetime
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import evaluate as ev  # noqa: E402  (this directory's harness: data, scoring, headers)

from countdown_fx.calibration import calibrate_sweep  # noqa: E402
from countdown_fx.config import CountDownConfig  # noqa: E402
from countdown_fx.data import load_tokenizer, stdlib_corpus, token_batches, token_stream  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True)
    p.add_argument("--sparsity", type=float, default=0.7)
    p.add_argument("--ranks", type=int, nargs="+", default=[29, 64, 128, 256])
    p.add_argument("--num-seqs", type=int, default=32)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--calib-batches", type=int, default=16)
    p.add_argument("--predictor-steps", type=int, default=400)
    p.add_argument("--predictor-lr", type=float, default=2e-2)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out-dir", default=str(ev.ROOT / "benchmarks" / "results"))
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from transformers import AutoModelForCausalLM

    t0 = time.time()
    name = Path(args.model).resolve().name
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    tok = load_tokenizer(args.model)
    corpus = stdlib_corpus()
    batches = list(token_batches(token_stream(corpus.train, tok), 8, args.seq_len, seed=1234,
                                 num_batches=args.calib_batches))
    seqs = next(token_batches(token_stream(corpus.heldout, tok), args.num_seqs, args.seq_len))
    s = args.sparsity
    configs = [CountDownConfig(method="d-countdown", sparsity=s, regime="prac", predictor_rank=r,
                               predictor_steps=args.predictor_steps, predictor_lr=args.predictor_lr,
                               predictor_batch_tokens=512) for r in args.ranks]
    configs.append(CountDownConfig(method="m-countdown", sparsity=s, regime="prac"))
    cals = calibrate_sweep(model, batches, configs, progress=False)
    dense = ev.eval_all(model, seqs, None, 16)
    rows = []
    for cfg, cal in zip(configs, cals):
        res = ev.eval_all(model, seqs, {"calibration": cal, "apply_to": "all"}, 16)
        stats = list(cal.stats.values())
        label = f"D-CountDown prac, r={cfg.predictor_rank}" if cfg.method == "d-countdown" else "M-CountDown prac"
        frac = f"{stats[0]['predictor_fraction']:.1%}" if cfg.method == "d-countdown" else "-"
        recall = sum(st["recall"] for st in stats) / len(stats)
        rows.append(f"| {label} | {frac} | {recall:.1%} | {res['ppl']:.3f} | {res['ppl'] / dense['ppl'] - 1:+.1%} | "
                    f"{res['acc']:.3f} | {res['realised']:.3f} |")
        print(rows[-1], flush=True)
    ideal = ev.eval_all(model, seqs, {"method": "d-countdown", "sparsity": s, "regime": "ideal", "apply_to": "all"}, 16)
    rows.append(f"| D-CountDown ideal (oracle) | - | 100.0% | {ideal['ppl']:.3f} | {ideal['ppl'] / dense['ppl'] - 1:+.1%} | "
                f"{ideal['acc']:.3f} | {ideal['realised']:.3f} |")
    cmd = "python " + " ".join([str(Path(sys.argv[0]))] + (argv if argv is not None else sys.argv[1:]))
    lines = [f"# D-CountDown SP-Prac vs predictor rank: {name}, s = {s:g}", "",
             f"- device: CPU ({ev.cpu_name()}); torch {torch.__version__}; {torch.get_num_threads()} thread(s); fp32",
             f"- commit: `{ev.git_commit()}`; date "
             f"{datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}; {time.time() - t0:.0f} s",
             f"- command: `{cmd}`",
             f"- same held-out windows ({args.num_seqs} x {args.seq_len}, all tokens sparse) and calibration data as "
             f"evaluate.py; {args.predictor_steps} AdamW steps x 512 tokens, lr {args.predictor_lr}",
             f"- dense perplexity {dense['ppl']:.3f}, accuracy {dense['acc']:.3f}", "",
             "| selection | predictor / FFN weights | mean recall vs oracle (calibration) | ppl | Δppl | acc | realised |",
             "|---|---|---|---|---|---|---|", *rows, ""]
    out = Path(args.out_dir) / f"quality_predictor_rank_{name}.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
