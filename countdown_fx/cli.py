"""The `countdown-fx` command line: calibrate a local checkpoint, list its sites, run the quality harness.

    countdown-fx calibrate --model PATH --data FILE --method m-countdown --sparsity 0.7 --out cal.safetensors
    countdown-fx inspect   --model PATH
    countdown-fx evaluate  --model PATH [harness options]      (benchmarks/quality/evaluate.py of a checkout;
                                                             writes ./countdown-results unless --out-dir)

Each subcommand is one small function; `main(argv)` returns an exit code, so tests call it in-process. A bad
input (option value, missing file, data that does not fit the model) raises CliError, which main prints as
`countdown-fx <cmd>: error: ...` and exits with 2, as argparse does for a malformed option: no traceback.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

import torch

from .config import CountDownConfig

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# `countdown-fx evaluate` writes here (relative to the current folder) unless --out-dir is given: the script's own
# default is the checkout's benchmarks/results, where the committed results live
EVALUATE_OUT_DIR = "countdown-results"
# the calibrate flag of each CountDownConfig field, so that its validation errors name what the user typed
CONFIG_FLAGS = {"method": "--method", "sparsity": "--sparsity", "threshold_rule": "--rule", "predictor_rank": "--rank",
                "predictor_steps": "--steps", "predictor_lr": "--lr", "predictor_batch_tokens": "--batch-tokens",
                "tau": "--tau", "seed": "--seed", "apply_to": "--apply-to"}


class CliError(Exception):
    """A bad input of the command; main() prints it as one `countdown-fx <cmd>: error: ...` line and exits 2."""


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split())


def positive_int(text: str) -> int:
    """argparse `type=` of the integer options that must be >= 1: argparse itself refuses 0 or -3 as it refuses
    'abc', with `error: argument --seq-len: ...` and exit code 2."""
    try:
        value = int(text)
    except ValueError:
        value = None
    if value is None or value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive integer")
    return value


def check_model_dir(path: str) -> None:
    """Refuse a --model that is no checkpoint directory before any slow work."""
    if not (Path(path) / "config.json").is_file():
        raise CliError(f"--model {path!r} is not a Hugging Face checkpoint directory (no config.json)")


def check_device(device: str) -> None:
    """Refuse a --device torch does not know, or a CUDA device on a machine without one."""
    try:
        kind = torch.device(device).type
    except RuntimeError as e:
        raise CliError(f"--device {device!r} is not a torch device (e.g. cpu, cuda, cuda:1)") from e
    if kind == "cuda" and not torch.cuda.is_available():
        raise CliError(f"--device {device!r}: no CUDA GPU here (torch.cuda.is_available() is False); use --device cpu")


def check_model_options(args) -> None:
    """The options of every command that loads a model (--model, --device), checked once, up front: before the
    data is read (a text file needs the tokenizer in --model) and before the weights are loaded."""
    check_device(args.device)
    check_model_dir(args.model)


def check_out_file(out: str, force: bool) -> None:
    """Refuse an --out that cannot be written before calibrating, not after."""
    from .calibration import check_writable

    try:
        check_writable(out, overwrite=force)
    except OSError as e:
        raise CliError(f"--out: {e}") from e


def check_token_ids(ids: torch.Tensor, vocab_size: int, data: str) -> None:
    """Token ids the model's embedding cannot look up (they would fail deep inside the model with
    'IndexError: index out of range in self')."""
    bad = ids[(ids < 0) | (ids >= vocab_size)]
    if bad.numel():
        values = bad.unique().tolist()
        shown = ", ".join(map(str, values[:5])) + (", ..." if len(values) > 5 else "")
        raise CliError(
            f"--data {data!r} has {bad.numel()} token id(s) outside the model's vocabulary of {vocab_size} "
            f"(valid ids are 0..{vocab_size - 1}): {shown}. Pass token ids made with this model's tokenizer "
            "(for text, the tokenizer saved in --model must be the model's own)")


def vocab_size(model) -> int:
    """How many token ids the model's input embedding can look up: its rows, which config.vocab_size need not
    equal (the config is the fallback when there is no nn.Embedding to ask)."""
    from .calibration import embedding_rows

    rows = embedding_rows(model)
    return rows if rows is not None else model.config.vocab_size


def load_model(path: str, dtype: str = "float32", device: str = "cpu"):
    """A local Hugging Face causal LM directory, in eval mode. The command has checked --model up front
    (check_model_options); a directory that still fails to load is a CliError here."""
    try:
        from transformers import AutoModelForCausalLM
    except ImportError as e:  # the optional 'hf' extra
        raise CliError("countdown-fx needs transformers to load a checkpoint: pip install 'countdown-fx[hf]'") from e
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=DTYPES[dtype])
    except (OSError, ValueError) as e:  # bad config.json, unknown model type, missing weights
        raise CliError(f"--model {path!r} could not be loaded: {_one_line(e)}") from e
    return model.to(device).eval()


def read_token_ids(data: str, model_path: str, data_format: str = "auto") -> torch.Tensor:
    """A 1-D LongTensor of token ids from `data`: a .pt tensor, a file of integers, or text encoded with
    the tokenizer saved in `model_path` (countdown_fx.data.load_tokenizer)."""
    path = Path(data)
    if not path.exists():
        raise CliError(f"--data {data!r} does not exist")
    if not path.is_file():
        raise CliError(f"--data {data!r} is not a file (a text file, a file of token ids or a .pt tensor)")
    if path.suffix == ".pt":
        try:
            ids = torch.load(path, map_location="cpu")
        except Exception as e:  # not a torch.save file, or one holding more than tensors (weights_only refuses)
            raise CliError(f"--data {data!r} is not a readable .pt tensor ({type(e).__name__}); save the token ids "
                           "with torch.save(ids, path), ids an integer tensor") from e
        if not isinstance(ids, torch.Tensor) or ids.is_floating_point():
            raise CliError(f"--data {data!r}: a .pt file must hold an integer tensor of token ids")
        return ids.reshape(-1).long()
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise CliError(f"--data {data!r} is not UTF-8 text; pass text, whitespace-separated token ids or a .pt "
                       "tensor of token ids") from e
    if re.fullmatch(r"\s*\[[\s\d,-]*\]\s*", text):  # a JSON list of ids (json.dump)
        text = text.strip()[1:-1]
    words = [w for w in re.split(r"[\s,]+", text.strip()) if w]  # whitespace- or comma-separated
    others = [w for w in words if not re.fullmatch(r"-?\d+", w)]
    integers = not others  # blank text too
    if data_format == "auto" and not integers and len(words) >= 20 and len(others) <= len(words) // 20:
        raise CliError(f"--data {data!r} looks like token ids but holds {len(others)} other word(s) (first: "
                       f"{others[0][:20]!r}): read as text it would be tokenised character by character. Remove them, "
                       "or pass --data-format text if it is text")
    is_ids = integers and "-" not in text and text.strip() != ""
    if integers and "-" in text and data_format != "text":  # integers, one of them negative: ids, not prose
        raise CliError(f"--data {data!r} is a file of integers with a negative one; token ids are >= 0 "
                       "(for text made of numbers, pass --data-format text)")
    if data_format == "ids" and not is_ids:
        raise CliError(f"--data {data!r} is not a file of token ids (whitespace- or comma-separated integers); "
                       "for text use --data-format text or auto")
    if data_format == "ids" or (data_format == "auto" and is_ids):
        return torch.tensor([int(t) for t in words], dtype=torch.long)
    from .data import load_tokenizer, token_stream

    try:
        tokenizer = load_tokenizer(model_path)
    except FileNotFoundError as e:
        raise CliError(f"{e}; pass --data as token ids (a .pt tensor or whitespace-separated integers)") from e
    return token_stream([text], tokenizer)


def token_windows(ids: torch.Tensor, seq_len: int, batch_size: int, max_tokens: int | None) -> list[torch.Tensor]:
    """Consecutive [batch, seq_len] windows of `ids` (one shorter sequence when there is less than one)."""
    if max_tokens is not None:
        ids = ids[:max_tokens]
    n = ids.numel()
    if n == 0:
        raise CliError("the calibration data (--data) holds no tokens")
    if n < seq_len:
        return [ids.view(1, n)]
    windows = ids[: (n // seq_len) * seq_len].view(-1, seq_len)
    return list(windows.split(batch_size))


def calibration_config(args) -> CountDownConfig:
    """The CountDownConfig of the calibrate options; its validation errors name the flags, not the fields."""
    try:
        return CountDownConfig(
            method=args.method, sparsity=args.sparsity, regime="prac", threshold_rule=args.rule,
            predictor_rank=args.rank, predictor_steps=args.steps, predictor_lr=args.lr,
            predictor_batch_tokens=args.batch_tokens, tau=args.tau, seed=args.seed, apply_to=args.apply_to,
        )
    except ValueError as e:
        raise CliError(re.sub(r"CountDownConfig\.(\w+)", lambda m: CONFIG_FLAGS.get(m[1], m[0]), str(e))) from e


def cmd_calibrate(args) -> int:
    """Every input is checked before the model is calibrated (the slow part), so a bad one fails in seconds."""
    from .calibration import calibrate
    from .passes.observe import NoSiteReached

    config = calibration_config(args)
    check_model_options(args)
    check_out_file(args.out, args.force)
    ids = read_token_ids(args.data, args.model, args.data_format)
    model = load_model(args.model, args.dtype, args.device)
    check_token_ids(ids, vocab_size(model), args.data)
    batches = token_windows(ids, args.seq_len, args.batch_size, args.max_tokens)
    used, given = sum(b.numel() for b in batches), min(ids.numel(), args.max_tokens or ids.numel())
    print(f"calibrating on {used} tokens of {args.data}: {len(batches)} batch(es) of up to {args.batch_size} x "
          f"{batches[0].shape[1]}" + (f" (the last {given - used} token(s), less than one --seq-len window, left out)"
                                       if used < given else ""))
    try:
        cal = calibrate(model, batches, config, progress=not args.no_progress)
    except ValueError as e:  # calibrate's refusals: of its data (too few tokens) or the model (non-finite activations)
        raise CliError(f"calibrating {args.model!r} on {args.data!r}: {e}") from e
    except NoSiteReached as e:
        raise CliError(f"{args.model!r} has no gated FFN that countdown-fx can calibrate (countdown-fx inspect "
                       f"lists what it finds): {e}") from e
    cal.meta.update(model=str(args.model), data=str(args.data))
    cal.save(args.out, overwrite=args.force)
    print(cal.report())
    print(f"wrote {args.out}")
    return 0


def cmd_inspect(args) -> int:
    """Capture the forward on random token ids, drawn from the ids the model's embedding can look up."""
    from .capture import find_sites

    check_model_options(args)
    model = load_model(args.model, args.dtype, args.device)
    ids = torch.randint(0, vocab_size(model), (1, args.seq_len), generator=torch.Generator().manual_seed(0))
    ids = ids.to(args.device)
    print(find_sites(model, ids))
    return 0


def _run_checkout_script(command: str, relative: str, rest: list[str]) -> int:
    """Run a benchmark script of the source checkout (benchmarks/ is not installed with the package)."""
    script = Path(__file__).resolve().parents[1] / relative
    if not script.is_file():
        raise CliError(f"countdown-fx {command} runs {relative} of a source checkout, which is not at {script}; "
                       "clone the repository to use it")
    import runpy

    saved, sys.argv = sys.argv, [str(script), *rest]
    try:
        runpy.run_path(str(script), run_name="__main__")
    finally:
        sys.argv = saved
    return 0


def _gives_out_dir(rest: list[str]) -> bool:
    """Whether the harness options set --out-dir (argparse also takes --out-dir=X and prefixes such as --out)."""
    return any(len(opt) > 2 and "--out-dir".startswith(opt) for opt in (a.split("=", 1)[0] for a in rest))


def cmd_evaluate(args, rest: list[str]) -> int:
    """The quality harness, writing into ./countdown-results unless --out-dir is given: run directly, the script
    writes into the checkout's benchmarks/results, over the committed results."""
    if any(a in ("-h", "--help") for a in rest):
        print(f"countdown-fx evaluate writes its .md / .png / .json into ./{EVALUATE_OUT_DIR} of the current folder "
              "unless --out-dir is given (the benchmarks/results named below is the default of the script run "
              "directly from a checkout).\n")
    if not _gives_out_dir(rest):
        rest = [*rest, "--out-dir", EVALUATE_OUT_DIR]
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
    c.add_argument("--seq-len", type=positive_int, default=256, help="tokens per calibration sequence")
    c.add_argument("--batch-size", type=positive_int, default=8, help="sequences per forward pass")
    c.add_argument("--max-tokens", type=positive_int, default=None,
                   help="use at most this many tokens of --data (default: all)")
    c.add_argument("--dtype", choices=list(DTYPES), default="float32")
    c.add_argument("--device", default="cpu")
    c.add_argument("--no-progress", action="store_true", help="no progress bars")
    c.add_argument("--out", required=True, help="output .safetensors file")
    c.add_argument("--force", action="store_true", help="replace --out if it exists")
    c.set_defaults(func=cmd_calibrate)

    i = sub.add_parser("inspect", help="list the gated FFN sites the backend would rewrite",
                       description="Capture a checkpoint's forward through Dynamo and print its gated FFN sites.")
    i.add_argument("--model", required=True, help="Hugging Face checkpoint directory")
    i.add_argument("--seq-len", type=positive_int, default=8, help="length of the random example input")
    i.add_argument("--dtype", choices=list(DTYPES), default="float32")
    i.add_argument("--device", default="cpu")
    i.set_defaults(func=cmd_inspect)

    sub.add_parser("evaluate", help=f"quality harness (perplexity / accuracy vs sparsity), written to "
                                    f"./{EVALUATE_OUT_DIR} unless --out-dir; options: evaluate --help", add_help=False)
    sub.add_parser("bench", help="decode FFN speed benchmark on a CUDA GPU (kernels vs dense Inductor vs the "
                                 "bytes ceiling); options: bench --help", add_help=False)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    command = argv[0] if argv else None
    try:
        if command == "evaluate":
            return cmd_evaluate(None, argv[1:])
        if command == "bench":
            return cmd_bench(None, argv[1:])
        args = parser.parse_args(argv)
        if args.command is None:
            parser.print_help()
            return 2
        command = args.command
        return args.func(args)
    except CliError as e:  # exits 2 with one line, as argparse's own errors do
        parser.exit(2, f"countdown-fx {command}: error: {e}\n")


if __name__ == "__main__":
    sys.exit(main())
