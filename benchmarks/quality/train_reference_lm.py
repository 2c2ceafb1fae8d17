"""Train the small gated-FFN reference language models of the quality harness (no downloads).

Why: CountDown's quality numbers need real, trained gated FFNs whose activations have the structure of
an LLM's, and the harness must run where no model hub can be reached. These models are built from
transformers configs and trained on the Python standard library's source (countdown_fx.data), with the
byte-level tokenizer. One per FFN flavour, because results differ by activation and layout:

  llama-silu   LlamaConfig,  act = SiLU,              separate gate_proj / up_proj
  gemma-gelu   Gemma2Config, act = gelu_pytorch_tanh, separate gate_proj / up_proj
  phi3-fused   Phi3Config,   act = SiLU,              one fused gate_up_proj (chunked in two)
  tiny-demo    LlamaConfig,  ~1M parameters: the library's embedded README demo model (a few MB)

Training: AdamW (betas 0.9/0.95, weight decay 0.1 on matrices), linear warm-up then cosine decay to 10%,
seeded data and initialisation, bf16 autocast on CUDA and fp32 on CPU. ``--time-budget-s`` fixes the
number of steps once, after timing the first steps, so the cosine schedule still ends at its floor; the
step count used is written to train_log.json, and ``--steps N`` with no budget replays the same run.

Output directory: config.json + model.safetensors (``--save-dtype``, bf16 by default), byte_tokenizer.json
and train_log.json (loss curve, held-out perplexity of the saved weights, parameters, time, device).

    python benchmarks/quality/train_reference_lm.py --arch llama-silu --out benchmarks/quality/models/llama-silu \
        --device cuda --time-budget-s 120
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run from a checkout without installing

from countdown_fx.data import ByteTokenizer, load_tokenizer, stdlib_corpus, token_batches, token_stream  # noqa: E402

VOCAB = ByteTokenizer.vocab_size

# Shapes: d_inter / d_model = 3.5 as in Llama-3-8B; head_dim 64. ~5.8M parameters each for the reference
# models (about 11 MB in bf16); ~0.9M for the demo (under 2 MB).
ARCHS = {
    "llama-silu": dict(family="llama", hidden=256, inter=896, layers=6, heads=4, seq_len=512, batch=64, lr=2e-3),
    "gemma-gelu": dict(family="gemma2", hidden=256, inter=896, layers=6, heads=4, seq_len=512, batch=64, lr=2e-3),
    "phi3-fused": dict(family="phi3", hidden=256, inter=896, layers=6, heads=4, seq_len=512, batch=64, lr=2e-3),
    "tiny-demo": dict(family="llama", hidden=128, inter=384, layers=4, heads=4, seq_len=256, batch=16, lr=3e-3),
}


def build_config(arch: str, seq_len: int):
    """A transformers config for ``arch``; nothing is downloaded."""
    from transformers import Gemma2Config, LlamaConfig, Phi3Config

    a = ARCHS[arch]
    tok = ByteTokenizer()
    common = dict(
        vocab_size=VOCAB,
        hidden_size=a["hidden"],
        intermediate_size=a["inter"],
        num_hidden_layers=a["layers"],
        num_attention_heads=a["heads"],
        num_key_value_heads=a["heads"],
        head_dim=a["hidden"] // a["heads"],
        max_position_embeddings=max(2048, seq_len),
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        initializer_range=0.02,
        use_cache=True,
    )
    if a["family"] == "llama":
        return LlamaConfig(hidden_act="silu", tie_word_embeddings=False, **common)
    if a["family"] == "gemma2":
        hd = common["head_dim"]
        # Attention soft-capping is switched off so SDPA/flash attention computes exactly what is trained;
        # the final-logit soft-capping and the (1 + w) norms, sqrt(d) embedding scale and extra FFN norms of
        # Gemma-2 stay. Sliding window longer than any sequence used here.
        return Gemma2Config(
            hidden_activation="gelu_pytorch_tanh",
            attn_logit_softcapping=None,
            query_pre_attn_scalar=hd,
            sliding_window=max(2048, seq_len),
            layer_types=["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(a["layers"])],
            tie_word_embeddings=True,
            **common,
        )
    if a["family"] == "phi3":
        return Phi3Config(hidden_act="silu", tie_word_embeddings=False, **common)
    raise AssertionError(a["family"])


def lr_at(step: int, total: int, warmup: int, peak: float, floor_frac: float = 0.1) -> float:
    """Linear warm-up over ``warmup`` steps, then cosine from ``peak`` down to ``floor_frac * peak``."""
    if step < warmup:
        return peak * (step + 1) / warmup
    t = min(1.0, (step - warmup) / max(1, total - warmup))
    return peak * (floor_frac + (1 - floor_frac) * 0.5 * (1 + math.cos(math.pi * t)))


@torch.no_grad()
def heldout_perplexity(model, stream: torch.Tensor, seq_len: int, batch_size: int, max_tokens: int, device) -> dict:
    """exp(mean next-token NLL) over consecutive non-overlapping windows of the held-out stream (fp32)."""
    model.eval()
    nb = max(1, max_tokens // (seq_len * batch_size))
    nll, count, correct = 0.0, 0, 0
    for x in token_batches(stream, batch_size, seq_len, seed=None, num_batches=nb):
        x = x.to(device)
        logits = model(input_ids=x).logits.float()
        lp = torch.log_softmax(logits[:, :-1], dim=-1)
        tgt = x[:, 1:]
        nll -= lp.gather(-1, tgt.unsqueeze(-1)).sum().item()
        correct += (lp.argmax(-1) == tgt).sum().item()
        count += tgt.numel()
    if count == 0:
        raise ValueError("the held-out stream gave no evaluation windows")
    return {"perplexity": math.exp(nll / count), "nll": nll / count, "accuracy": correct / count, "tokens": count}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", required=True, choices=sorted(ARCHS))
    p.add_argument("--out", required=True, help="output directory (created)")
    p.add_argument("--steps", type=int, default=20000, help="training steps (an upper bound with --time-budget-s)")
    p.add_argument("--time-budget-s", type=float, default=None, help="seconds of training; fixes the step count")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--seq-len", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--warmup-steps", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (CPU runs)")
    p.add_argument("--save-dtype", choices=["bfloat16", "float16"], default="bfloat16")
    p.add_argument("--eval-tokens", type=int, default=1_000_000, help="held-out tokens for the final perplexity")
    p.add_argument("--max-corpus-bytes", type=int, default=64 * 2**20)
    p.add_argument("--log-every", type=int, default=25)
    p.add_argument("--eval-every", type=int, default=500,
                   help="steps between held-out losses in the log (on the first 64Ki held-out tokens); 0: off")
    p.add_argument("--with-stdlib-tests", action="store_true",
                   help="also train on the stdlib's test suites (about 1.6x more text: fewer repeats, less "
                        "memorisation); the held-out set is the same either way")
    args = p.parse_args(argv)

    a = ARCHS[args.arch]
    seq_len = args.seq_len or a["seq_len"]
    batch = args.batch_size or a["batch"]
    peak_lr = args.lr or a["lr"]
    if args.steps <= 0 or seq_len < 2 or batch <= 0:
        p.error("--steps, --batch-size must be positive and --seq-len at least 2")
    if args.time_budget_s is not None and args.time_budget_s <= 0:
        p.error("--time-budget-s must be positive")
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda but no CUDA device is available")
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    t0 = time.time()
    corpus = stdlib_corpus(max_bytes=args.max_corpus_bytes)
    train_corpus = stdlib_corpus(max_bytes=args.max_corpus_bytes, include_tests=True) if args.with_stdlib_tests else corpus
    assert not set(train_corpus.train_files) & set(corpus.heldout_files)
    train_stream, heldout_stream = token_stream(train_corpus.train), token_stream(corpus.heldout)
    print(f"[{args.arch}] corpus {corpus.root}: train {len(train_corpus.train)} files / {train_stream.numel()} tokens, "
          f"held-out {len(corpus.heldout)} files / {heldout_stream.numel()} tokens", flush=True)

    from transformers import AutoModelForCausalLM

    torch.manual_seed(args.seed)
    config = build_config(args.arch, seq_len)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).to(device)
    n_params = sum(p.numel() for p in model.parameters())
    n_ffn = sum(p.numel() for n, p in model.named_parameters() if ".mlp." in n)
    print(f"[{args.arch}] {type(model).__name__}: {n_params / 1e6:.2f}M parameters ({n_ffn / 1e6:.2f}M in FFNs)", flush=True)

    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
        lr=peak_lr, betas=(0.9, 0.95), eps=1e-8, fused=device.type == "cuda",
    )
    use_bf16 = device.type == "cuda"
    batches = token_batches(train_stream, batch, seq_len, seed=args.seed)

    total = args.steps
    warmup = min(args.warmup_steps, max(1, total // 10))
    probe_from, probe_to = 10, 60  # steps timed to turn the budget into a step count
    probe_t = None
    curve, eval_curve = [], []
    model.train()
    t_train = time.time()
    step = 0
    stopped_early = False
    while step < total:
        for g in opt.param_groups:
            g["lr"] = lr_at(step, total, warmup, peak_lr)
        x = next(batches).to(device, non_blocking=True)
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=use_bf16):
            loss = model(input_ids=x, labels=x).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        if step % args.log_every == 0 or step == total or step in (1, probe_to):
            lv = loss.item()  # syncs
            if not math.isfinite(lv):
                raise FloatingPointError(f"[{args.arch}] loss became {lv} at step {step}")
            curve.append({"step": step, "loss": round(lv, 5), "lr": opt.param_groups[0]["lr"], "t": round(time.time() - t_train, 2)})
            if step % (args.log_every * 8) == 0 or step == total:
                print(f"[{args.arch}] step {step}/{total} loss {lv:.4f} lr {opt.param_groups[0]['lr']:.2e} "
                      f"{time.time() - t_train:.0f}s", flush=True)
        if args.eval_every and (step % args.eval_every == 0 or step == total):
            ev_mid = heldout_perplexity(model, heldout_stream, seq_len, batch, 65536, device)
            eval_curve.append({"step": step, "heldout_nll": round(ev_mid["nll"], 5)})
            model.train()
        if args.time_budget_s is not None:
            if step == probe_from:
                if device.type == "cuda":
                    torch.cuda.synchronize()
                probe_t = time.time()
            elif step == probe_to and probe_t is not None:
                if device.type == "cuda":
                    torch.cuda.synchronize()
                per_step = (time.time() - probe_t) / (probe_to - probe_from)
                left = args.time_budget_s - (time.time() - t_train)
                total = max(step + 1, min(args.steps, step + int(0.97 * left / per_step)))
                print(f"[{args.arch}] {per_step * 1e3:.1f} ms/step: training for {total} steps", flush=True)
            if time.time() - t_train > 1.25 * args.time_budget_s:  # safety net only; the schedule is cut short
                stopped_early = True
                print(f"[{args.arch}] past 1.25x the time budget: stopping at step {step}", flush=True)
                break
    if device.type == "cuda":
        torch.cuda.synchronize()
    train_s = time.time() - t_train
    tokens_seen = step * batch * seq_len

    # Save in the storage dtype, then evaluate what was saved (reloaded, fp32 compute).
    save_dtype = getattr(torch, args.save_dtype)
    model.to(save_dtype)
    model.config.use_cache = True
    model.save_pretrained(str(out), safe_serialization=True)
    ByteTokenizer().save_pretrained(out)
    reloaded = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).to(device)
    assert isinstance(load_tokenizer(out), ByteTokenizer)
    ev = heldout_perplexity(reloaded, heldout_stream, seq_len, batch, args.eval_tokens, device)
    print(f"[{args.arch}] held-out perplexity {ev['perplexity']:.3f} (uniform: {VOCAB}), "
          f"next-byte accuracy {ev['accuracy']:.3f}, {step} steps in {train_s:.0f}s", flush=True)

    log = {
        "arch": args.arch,
        "model_type": config.model_type,
        "parameters": n_params,
        "ffn_parameters": n_ffn,
        "shape": {k: a[k] for k in ("hidden", "inter", "layers", "heads")},
        "tokenizer": "byte (countdown_fx.data.ByteTokenizer, vocab 258)",
        "heldout": {**ev, "seq_len": seq_len, "uniform_perplexity": VOCAB},
        "steps": step,
        "planned_steps": total,
        "stopped_early": stopped_early,
        "batch_size": batch,
        "seq_len": seq_len,
        "tokens_seen": tokens_seen,
        "peak_lr": peak_lr,
        "warmup_steps": warmup,
        "seed": args.seed,
        "save_dtype": args.save_dtype,
        "train_seconds": round(train_s, 1),
        "total_seconds": round(time.time() - t0, 1),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)",
        "precision": "bf16 autocast" if use_bf16 else "fp32",
        "corpus": {
            "source": "Python stdlib .py files (countdown_fx.data.stdlib_corpus)",
            "python": sys.version.split()[0],
            "with_stdlib_tests": args.with_stdlib_tests,
            "train_files": len(train_corpus.train_files),
            "train_tokens": int(train_stream.numel()),
            "heldout_files": len(corpus.heldout_files),
            "heldout_tokens": int(heldout_stream.numel()),
            "epochs": round(tokens_seen / train_stream.numel(), 2),
        },
        "versions": {"torch": torch.__version__, "transformers": __import__("transformers").__version__},
        "command": "python benchmarks/quality/train_reference_lm.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "loss_curve": curve,
        "heldout_curve": eval_curve,
    }
    (out / "train_log.json").write_text(json.dumps(log, indent=1) + "\n")
    return log


if __name__ == "__main__":
    main()
