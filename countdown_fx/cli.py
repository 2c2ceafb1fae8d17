"""The `countdown-fx` command line: calibrate a local checkpoint, list its sites, run the quality harness.

    countdown-fx calibrate --model PATH --data FILE --method m-countdown --sparsity 0.7 --out cal.safetensors
    countdown-fx inspect   --model PATH
    countdown-fx evaluate  --model PATH [harness options]      (benchmarks/quality/evaluate.py of a checkout)

Each subcommand is one small function; `main(argv)` returns an exit code, so tests call it in-process.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

import torch

from .config import CountDownConfig

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def load_model(path: str, dtype: str = "float32", device: str = "cpu"):
    """A local Hugging Face causal LM directory, in eval mode."""
    try:
        from transformers import AutoModelForCausalLM
    except ImportError as e:  # the optional 'hf' extra
        raise SystemExit("countdown-fx needs transformers to load a checkpoint: pip install 'countdown-fx[hf]'") from e
    if not (Path(path) / "config.json").is_file():
        raise SystemExit(f"--model {path!r} is not a Hugging Face checkpoint directory (no config.json)")
    model = AutoModelForCausalLM.from_pretrained(path, dtype=DTYPES[dtype])
    return model.to(device).eval()


def read_token_ids(data: str, model_path: str, data_format: str = "auto") -> torch.Tensor:
    """A 1-D LongTensor of token ids from `data`: a .pt tensor, a file of integers, or text encoded with
    the tokenizer saved in `model_path` (countdown_fx.data.load_tokenizer)."""
    path = Path(data)
    if not path.is_file():
        raise SystemExit(f"--data {data!r} does not exist")
    if path.suffix == ".pt":
        ids = torch.load(path, map_location="cpu")
        if not isinstance(ids, torch.Tensor) or ids.is_floating_point():
            raise SystemExit(f"--data {data!r}: a .pt file must hold an integer tensor of token ids")
        return ids.reshape(-1).long()
    text = path.read_text(encoding="utf-8")
    is_ids = re.fullmatch(r"[\s,]*(\d+[\s,]+)*\d*[\s,]*", text) is not None and text.strip() != ""
    if data_format == "ids" or (data_format == "auto" and is_ids):
        return torch.tensor([int(t) for t in re.split(r"[\s,]+", text.strip()) if t], dtype=torch.long)
    from .data import load_tokenizer, token_stream

    try:
        tokenizer = load_tokenizer(model_path)
    except FileNotFoundError as e:
        raise SystemExit(f"{e}; pass --data as token ids (a .pt tensor or whitespace-separated integers)") from e
    return token_stream([text], tokenizer)


def token_windows(ids: torch.Tensor, seq_len: int, batch_size: int, max_tokens: int | None) -> list[torch.Tensor]:
    """Consecutive [batch, seq_len] windows of `ids` (one shorter sequence when there is less than one)."""
    if max_tokens is not None:
        ids = ids[:max_tokens]
    n = ids.numel()
    if n == 0:
        raise SystemExit("the calibration data holds no tokens")
    if n < seq_len:
        return [ids.view(1, n)]
    windows = ids[: (n // seq_len) * seq_len].view(-1, seq_len)
    return list(windows.split(batch_size))


def cmd_calibrate(args) -> int:
    from .calibration import calibrate

    config = CountDownConfig(
        method=args.method, sparsity=args.sparsity, regime="prac", threshold_rule=args.rule,
        predictor_rank=args.rank, predictor_steps=args.steps, predictor_lr=args.lr,
        predictor_batch_tokens=args.batch_tokens, tau=args.tau, seed=args.seed, apply_to=args.apply_to,
    )
    model = load_model(args.model, args.dtype, args.device)
    batches = token_windows(read_token_ids(args.data, args.model, args.data_format), args.seq_len,
                            args.batch_size, args.max_tokens)
    cal = calibrate(model, batches, config, progress=not args.no_progress)
    cal.meta.update(model=str(args.model), data=str(args.data))
    cal.save(args.out)
    print(cal.report())
    print(f"wrote {args.out}")
    return 0


def cmd_inspect(args) -> int:
    from .capture import find_sites

    model = load_model(args.model, args.dtype, args.device)
    vocab = getattr(model.config, "vocab_size", 2) or 2
    ids = torch.randint(0, vocab, (1, args.seq_len), generator=torch.Generator().manual_seed(0)).to(args.device)
    print(find_sites(model, ids))
    return 0


def _run_checkout_script(command: str, relative: str, rest: list[str]) -> int:
    """Run a benchmark script of the source checkout (benchmarks/ is not installed with the package)."""
    script = Path(__file__).resolve().parents[1] / relative
    if not script.is_file():
        raise SystemExit(f"countdown-fx {command} runs {relative} of a source checkout, which is not at {script}; "
                         "clone the repository to use it")
    import runpy

    sys.argv = [str(script), *rest]
    runpy.run_path(str(script), run_name="__main__")
    return 0


def cmd_evaluate(args, rest: list[str]) -> int:
    return _run_checkout_script("evaluate", "benchmarks/quality/evaluate.py", rest)


def cmd_bench(args, rest: list[str]) -> int:
    if not torch.cuda.is_available() and not any(a in ("-h", "--help") for a in rest):
        print("countdown-fx bench: no CUDA GPU here (torch.cuda.is_available() is False). The speed benchmark "
              "times the Triton decode kernels against dense Inductor on a GPU; on a CPU the countdown ops run "
              "their PyTorch reference and there is nothing to measure. Results measured on an H100 are in "
              "benchmarks/results/speed_ffn_decode.md.", file=sys.stderr)
        return 1
    return _run_checkout_script("bench", "benchmarks/speed/ffn_decode.py", rest)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="countdown-fx", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", metavar="{calibrate,inspect,evaluate,bench}")

    c = sub.add_parser("calibrate", help="calibrate SP-Prac thresholds / predictors and save them",
                       description="Run a local checkpoint densely on calibration data and save per-site "
                                   "thresholds (cats, m-countdown) or predictors (d-countdown) to one "
                                   ".safetensors file for torch.compile(..., options={'calibration': FILE}).")
    c.add_argument("--model", required=True, help="Hugging Face checkpoint directory (config.json + weights)")
    c.add_argument("--data", required=True,
                   help="a text file (encoded with the tokenizer saved in --model), a file of whitespace- or "
                        "comma-separated token ids, or a .pt LongTensor of token ids")
    c.add_argument("--data-format", choices=["auto", "text", "ids"], default="auto",
                   help="how to read --data (auto: integers only -> token ids, else text)")
    c.add_argument("--method", choices=["cats", "m-countdown", "d-countdown"], default="m-countdown")
    c.add_argument("--sparsity", type=float, default=0.7, help="target fraction of FFN neurons skipped")
    c.add_argument("--rule", choices=["mean-kth", "quantile"], default="mean-kth",
                   help="threshold rule for cats / m-countdown (mean-kth: the paper; quantile: CATS)")
    c.add_argument("--rank", type=int, default=None, help="d-countdown predictor rank (default: <= 5%% of the FFN)")
    c.add_argument("--steps", type=int, default=CountDownConfig.predictor_steps, help="d-countdown predictor AdamW steps")
    c.add_argument("--lr", type=float, default=CountDownConfig.predictor_lr, help="d-countdown predictor peak learning rate")
    c.add_argument("--batch-tokens", type=int, default=CountDownConfig.predictor_batch_tokens,
                   help="d-countdown tokens per training step")
    c.add_argument("--tau", type=float, default=None, help="fixed d-countdown logit threshold (default: calibrated)")
    c.add_argument("--apply-to", choices=["decode", "all"], default="decode",
                   help="recorded in the file: where sparsity applies by default when it is used")
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--seq-len", type=int, default=256, help="tokens per calibration sequence")
    c.add_argument("--batch-size", type=int, default=8, help="sequences per forward pass")
    c.add_argument("--max-tokens", type=int, default=None, help="use at most this many tokens of --data")
    c.add_argument("--dtype", choices=list(DTYPES), default="float32")
    c.add_argument("--device", default="cpu")
    c.add_argument("--no-progress", action="store_true", help="no progress bars")
    c.add_argument("--out", required=True, help="output .safetensors file")
    c.set_defaults(func=cmd_calibrate)

    i = sub.add_parser("inspect", help="list the gated FFN sites the backend would rewrite",
                       description="Capture a checkpoint's forward through Dynamo and print its gated FFN sites.")
    i.add_argument("--model", required=True, help="Hugging Face checkpoint directory")
    i.add_argument("--seq-len", type=int, default=8, help="length of the random example input")
    i.add_argument("--dtype", choices=list(DTYPES), default="float32")
    i.add_argument("--device", default="cpu")
    i.set_defaults(func=cmd_inspect)

    sub.add_parser("evaluate", help="quality harness (perplexity / accuracy vs sparsity); options: evaluate --help",
                   add_help=False)
    sub.add_parser("bench", help="decode FFN speed benchmark on a CUDA GPU (kernels vs dense Inductor vs the "
                                 "bytes ceiling); options: bench --help", add_help=False)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    if argv[:1] == ["evaluate"]:
        return cmd_evaluate(None, argv[1:])
    if argv[:1] == ["bench"]:
        return cmd_bench(None, argv[1:])
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
