"""`countdown-fx` command line, end to end on a tiny checkpoint directory."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from _cal_helpers import tiny_llama
from countdown_fx.calibration import Calibration
from countdown_fx.cli import main
from countdown_fx.data import ByteTokenizer


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny")
    model = tiny_llama(layers=2)
    model.config.vocab_size = 258  # the byte tokenizer's vocabulary
    model.resize_token_embeddings(258)
    model.save_pretrained(path)
    ByteTokenizer().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    import random

    rng = random.Random(0)
    words = ["def", "return", "self", "import", "for", "in", "if", "else", "x", "y", "(", ")", ":", "\n"]
    path = tmp_path_factory.mktemp("data") / "calib.txt"
    path.write_text(" ".join(rng.choice(words) for _ in range(500)))
    return path


@pytest.mark.parametrize("method", ["m-countdown", "d-countdown"])
def test_calibrate_from_text(model_dir, text_file, tmp_path, capsys, method):
    out = tmp_path / "cal.safetensors"
    extra = ["--steps", "5", "--batch-tokens", "64"] if method == "d-countdown" else []
    code = main(["calibrate", "--model", str(model_dir), "--data", str(text_file), "--method", method,
                 "--sparsity", "0.8", "--seq-len", "64", "--batch-size", "4", "--no-progress", "--out", str(out),
                 *extra])
    assert code == 0
    cal = Calibration.load(out)
    assert cal.method == method and cal.sparsity == 0.8
    assert sorted(cal.sites) == ["model.layers.0.mlp", "model.layers.1.mlp"]
    n_tokens = len(text_file.read_text().encode()) + 1  # bytes + EOS
    all_tokens = (n_tokens // 64) * 64
    if method == "d-countdown":  # measured on the held-out last fifth of the batches only
        assert all(0 < s["tokens"] < all_tokens and s["tokens"] % 64 == 0 and s["measured_on_held_out"]
                   for s in cal.stats.values())
    else:
        assert all(s["tokens"] == all_tokens and not s["measured_on_held_out"] for s in cal.stats.values())
    printed = capsys.readouterr().out
    assert "model.layers.1.mlp" in printed and f"wrote {out}" in printed


def test_calibrate_from_token_ids(model_dir, tmp_path):
    ids = torch.randint(0, 258, (700,), generator=torch.Generator().manual_seed(0))
    as_text = tmp_path / "ids.txt"
    as_text.write_text(" ".join(map(str, ids.tolist())))
    as_pt = tmp_path / "ids.pt"
    torch.save(ids, as_pt)
    cals = []
    for data in (as_text, as_pt):
        out = tmp_path / f"{data.suffix}.safetensors"
        assert main(["calibrate", "--model", str(model_dir), "--data", str(data), "--method", "cats",
                     "--rule", "quantile", "--seq-len", "100", "--no-progress", "--out", str(out)]) == 0
        cals.append(Calibration.load(out))
    assert all(s["tokens"] == 700 for s in cals[0].stats.values())
    for key in cals[0].state:  # the same ids either way
        assert torch.equal(cals[0].state[key]["threshold"], cals[1].state[key]["threshold"])


def test_token_ids_as_a_json_list_are_ids_and_ids_with_stray_words_are_refused(tmp_path):
    """A JSON list is read as ids, not as the characters '[', '4', ','; a file of ids with a stray word is refused
    rather than tokenised as text character by character."""
    import json

    from countdown_fx.cli import CliError, read_token_ids

    ids = torch.randint(0, 258, (300,), generator=torch.Generator().manual_seed(0))
    as_json = tmp_path / "ids.json"
    as_json.write_text(json.dumps(ids.tolist()))
    assert torch.equal(read_token_ids(str(as_json), "unused"), ids)
    stray = tmp_path / "ids.txt"
    stray.write_text(" ".join(map(str, ids.tolist())) + " x")
    with pytest.raises(CliError, match="looks like token ids but holds 1 other word"):
        read_token_ids(str(stray), "unused")


def test_calibrate_says_what_it_leaves_out(model_dir, tmp_path, capsys):
    """Windows of --seq-len tokens: a tail shorter than one window is left out, and the command says so."""
    data = tmp_path / "ids.txt"
    data.write_text(" ".join(map(str, torch.randint(0, 258, (730,), generator=torch.Generator().manual_seed(1)).tolist())))
    out = tmp_path / "c.safetensors"
    assert main(["calibrate", "--model", str(model_dir), "--data", str(data), "--method", "cats", "--seq-len", "100",
                 "--no-progress", "--out", str(out)]) == 0
    said = capsys.readouterr().out
    assert "calibrating on 700 tokens of" in said and "the last 30 token(s), less than one --seq-len window, left out" in said
    assert all(s["tokens"] == 700 for s in Calibration.load(out).stats.values())


def cli_error(argv: list[str], capsys) -> str:
    """The error line of a refused command: argparse's way (SystemExit 2, one `countdown-fx <cmd>: error:`
    line on stderr), not a traceback (in-process, an uncaught exception would propagate here instead)."""
    with pytest.raises(SystemExit) as exc:
        main(argv)
    err = capsys.readouterr().err  # after the error line nothing; before it maybe a loading progress bar
    line = err.rstrip("\n").split("\n")[-1]
    assert exc.value.code == 2 and line.startswith(f"countdown-fx {argv[0]}: error: "), err
    assert "Traceback" not in err and err.count("error:") == 1, err
    return line


def test_an_existing_out_file_is_replaced_only_with_force(model_dir, text_file, tmp_path, capsys):
    out = tmp_path / "notes.safetensors"
    out.write_bytes(b"someone else's file")
    argv = ["calibrate", "--model", str(model_dir), "--data", str(text_file), "--seq-len", "64", "--no-progress",
            "--out", str(out)]
    assert "exists" in cli_error(argv, capsys) and "--force" in cli_error(argv, capsys)
    assert out.read_bytes() == b"someone else's file"  # refused before calibrating: nothing lost
    assert main([*argv, "--force"]) == 0
    assert Calibration.load(out).method == "m-countdown"


def test_bad_arguments_are_clear(model_dir, tmp_path, capsys):
    assert "does not exist" in cli_error(
        ["calibrate", "--model", str(model_dir), "--data", str(tmp_path / "nope.txt"), "--out", "x"], capsys)
    assert "no config.json" in cli_error(
        ["calibrate", "--model", str(tmp_path), "--data", str(tmp_path), "--out", "x"], capsys)
    with pytest.raises(SystemExit):
        main(["calibrate", "--model", str(model_dir), "--data", "x", "--method", "relu", "--out", "x"])
    assert "invalid choice" in capsys.readouterr().err


def _never_calibrate(monkeypatch):
    """Make calibrating fail the test: what is refused must be refused before the slow part."""
    import countdown_fx.calibration

    def calibrate(*args, **kwargs):
        raise AssertionError("calibrate() ran although the inputs should have been refused up front")

    monkeypatch.setattr(countdown_fx.calibration, "calibrate", calibrate)


def test_token_ids_beyond_the_vocabulary_are_refused_up_front(model_dir, tmp_path, capsys, monkeypatch):
    vocab = 258  # model_dir's embedding rows
    ids = torch.randint(0, vocab, (700,), generator=torch.Generator().manual_seed(0))
    ids[[5, 50]] = torch.tensor([vocab, vocab + 741])
    data = tmp_path / "ids.txt"
    data.write_text(" ".join(map(str, ids.tolist())))
    out = tmp_path / "cal.safetensors"
    _never_calibrate(monkeypatch)
    line = cli_error(["calibrate", "--model", str(model_dir), "--data", str(data), "--out", str(out)], capsys)
    assert f"{vocab}, {vocab + 741}" in line and f"vocabulary of {vocab}" in line  # the bad ids, the vocab size
    assert "tokenizer" in line and not out.exists()  # the fix; nothing written
    negative = tmp_path / "ids.pt"
    torch.save(torch.tensor([3, -1, 4]), negative)
    assert "-1" in cli_error(["calibrate", "--model", str(model_dir), "--data", str(negative), "--out", str(out)],
                             capsys)


def test_a_tokenizer_larger_than_the_model_vocabulary_is_refused(text_file, tmp_path, capsys, monkeypatch):
    """Text encoded by a tokenizer that does not belong to the model: the byte tokenizer (258 ids) beside a
    model of 120 ids gives ids the embedding cannot look up."""
    model = tiny_llama(layers=1)
    model.save_pretrained(tmp_path / "small")
    ByteTokenizer().save_pretrained(tmp_path / "small")
    _never_calibrate(monkeypatch)
    line = cli_error(["calibrate", "--model", str(tmp_path / "small"), "--data", str(text_file),
                      "--out", str(tmp_path / "cal.safetensors")], capsys)
    assert f"vocabulary of {model.config.vocab_size}" in line and "tokenizer" in line


def test_a_bad_option_value_is_an_argparse_style_error():
    """From a fresh interpreter, as a user runs it: exit code 2, one line naming the flag, no traceback."""
    res = subprocess.run([sys.executable, "-m", "countdown_fx.cli", "calibrate", "--model", "m", "--data", "d",
                          "--sparsity", "1.5", "--out", "x"], capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and res.stdout == "" and "Traceback" not in res.stderr
    assert res.stderr.strip().splitlines() == [res.stderr.strip()]
    assert res.stderr.startswith("countdown-fx calibrate: error: --sparsity") and "[0, 1)" in res.stderr


@pytest.mark.parametrize("extra, expected", [
    (["--sparsity", "1.5"], "--sparsity"),
    (["--sparsity", "nan"], "--sparsity"),
    (["--rank", "8"], "--rank"),  # a d-countdown option with the default method
    (["--method", "d-countdown", "--steps", "0"], "--steps"),
    (["--lr", "-1"], "--lr"),
    (["--seq-len", "0"], "argument --seq-len"),  # argparse's own refusal (type=positive_int)
    (["--batch-size", "0"], "argument --batch-size"),
    (["--max-tokens", "0"], "argument --max-tokens"),
    (["--device", "no-such-device"], "--device"),
])
def test_bad_calibrate_values_are_refused_before_any_work(model_dir, text_file, tmp_path, capsys, monkeypatch,
                                                           extra, expected):
    _never_calibrate(monkeypatch)
    line = cli_error(["calibrate", "--model", str(model_dir), "--data", str(text_file),
                      "--out", str(tmp_path / "cal.safetensors"), *extra], capsys)
    assert f"error: {expected}" in line


@pytest.mark.parametrize("command, option, value", [
    ("calibrate", "--seq-len", "0"), ("calibrate", "--batch-size", "-3"), ("calibrate", "--max-tokens", "0"),
    ("calibrate", "--seq-len", "abc"), ("inspect", "--seq-len", "0"),
])
def test_positive_int_options_are_refused_by_argparse(model_dir, text_file, tmp_path, capsys, monkeypatch,
                                                      command, option, value):
    """Refused while parsing, before any check or loading: argparse's one error line names the option."""
    from countdown_fx import cli

    def load_model(*args, **kwargs):
        raise AssertionError("the model was loaded although the options should have been refused")

    monkeypatch.setattr(cli, "load_model", load_model)
    rest = ["--data", str(text_file), "--out", str(tmp_path / "cal.safetensors")] if command == "calibrate" else []
    line = cli_error([command, "--model", str(model_dir), *rest, option, value], capsys)
    assert line == f"countdown-fx {command}: error: argument {option}: {value!r} is not a positive integer"


def test_max_tokens_is_optional():
    from countdown_fx.cli import build_parser

    base = ["calibrate", "--model", "m", "--data", "d", "--out", "o"]
    assert build_parser().parse_args(base).max_tokens is None
    assert build_parser().parse_args([*base, "--max-tokens", "300"]).max_tokens == 300


@pytest.mark.parametrize("command", ["calibrate", "inspect"])
def test_the_model_dir_is_checked_once_up_front(model_dir, text_file, tmp_path, capsys, monkeypatch, command):
    """A missing --model is refused with one line before the data is read (not as a missing tokenizer of the text
    file); a good one is checked exactly once per command."""
    from countdown_fx import cli

    rest = ["--data", str(text_file), "--out", str(tmp_path / "cal.safetensors")] if command == "calibrate" else []
    line = cli_error([command, "--model", str(tmp_path / "missing"), *rest], capsys)
    assert line.endswith("is not a Hugging Face checkpoint directory (no config.json)") and "tokenizer" not in line
    checked = []
    check_model_dir = cli.check_model_dir
    monkeypatch.setattr(cli, "check_model_dir", lambda path: (checked.append(path), check_model_dir(path)))
    extra = ["--method", "cats", "--seq-len", "100", "--max-tokens", "300", "--no-progress"] if rest else []
    assert main([command, "--model", str(model_dir), *rest, *extra]) == 0
    assert checked == [str(model_dir)]
    if command == "calibrate":  # --max-tokens given is used
        assert all(s["tokens"] == 300 for s in Calibration.load(tmp_path / "cal.safetensors").stats.values())


def test_inspect_draws_ids_the_embedding_can_look_up(model_dir, monkeypatch, capsys):
    """inspect's random input comes from the embedding's rows (the vocab_size helper calibrate checks its data
    with), not from config.vocab_size, which can be larger."""
    import countdown_fx.capture
    from countdown_fx import cli

    model = tiny_llama(layers=1).eval()
    rows = model.get_input_embeddings().num_embeddings
    model.config.vocab_size = rows * 100
    monkeypatch.setattr(cli, "load_model", lambda *args, **kwargs: model)
    got = []
    monkeypatch.setattr(countdown_fx.capture, "find_sites", lambda m, ids: got.append(ids) or "sites")
    assert main(["inspect", "--model", str(model_dir), "--seq-len", "64"]) == 0
    assert got[0].shape == (1, 64) and 0 <= int(got[0].min()) and int(got[0].max()) < rows


def test_inputs_that_do_not_fit_are_refused(model_dir, text_file, tmp_path, capsys, monkeypatch):
    def refused(data, *extra, model=model_dir, out=tmp_path / "cal.safetensors"):
        return cli_error(["calibrate", "--model", str(model), "--data", str(data), "--out", str(out), "--no-progress",
                          *extra], capsys)

    not_utf8 = tmp_path / "latin1.txt"
    not_utf8.write_bytes("caf\xe9 ".encode("latin-1") * 100)
    assert "not UTF-8" in refused(not_utf8)
    not_a_tensor = tmp_path / "junk.pt"
    not_a_tensor.write_text("not a torch.save file")
    assert "not a readable .pt" in refused(not_a_tensor)
    assert "not a file of token ids" in refused(text_file, "--data-format", "ids")
    negative = tmp_path / "negative.txt"
    negative.write_text("3 -1 4, 7\n" * 50)
    for fmt in ("auto", "ids"):  # integers with a negative one are bad ids, not text to tokenize
        assert "a negative one; token ids are >= 0" in refused(negative, "--data-format", fmt)
    blank = tmp_path / "blank.txt"
    blank.write_text("  \n\n ")
    assert "negative" not in refused(blank)
    assert "is not a file" in refused(tmp_path)
    assert "folder" in refused(text_file, out=tmp_path / "missing" / "cal.safetensors")
    no_weights = tmp_path / "no_weights"
    no_weights.mkdir()
    for f in model_dir.iterdir():  # config and tokenizer, no weights file
        if f.suffix != ".safetensors":
            (no_weights / f.name).write_bytes(f.read_bytes())
    assert "could not be loaded" in refused(text_file, model=no_weights)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert "no CUDA GPU" in refused(text_file, "--device", "cuda")
    short = tmp_path / "short.txt"
    short.write_text("def f(x): return x")  # fewer tokens than calibration needs: refused by calibrate()
    assert "too short" in refused(short)
    assert "positive" in cli_error(["inspect", "--model", str(model_dir), "--seq-len", "0"], capsys)
    assert "no config.json" in cli_error(["inspect", "--model", str(tmp_path)], capsys)


def test_evaluate_writes_into_the_current_folder_by_default(tmp_path, monkeypatch, capsys):
    """The harness's own default is the checkout's benchmarks/results (committed results): through the CLI it
    writes into ./countdown-results unless --out-dir says otherwise. The harness is replaced by a stand-in that
    records the options it gets, parsed as argparse parses them."""
    import argparse
    import runpy

    from countdown_fx import cli

    checkout = Path(cli.__file__).resolve().parents[1]
    got = []

    def harness(path, run_name):
        assert Path(path) == checkout / "benchmarks" / "quality" / "evaluate.py" and run_name == "__main__"
        parser = argparse.ArgumentParser()
        parser.add_argument("--model")
        parser.add_argument("--out-dir", default=str(checkout / "benchmarks" / "results"))
        got.append(Path(parser.parse_args(sys.argv[1:]).out_dir).resolve())

    monkeypatch.setattr(runpy, "run_path", harness)
    monkeypatch.chdir(tmp_path)
    argv_before = list(sys.argv)
    assert main(["evaluate", "--model", "m"]) == 0
    assert got[-1] == tmp_path / "countdown-results" and checkout not in got[-1].parents
    assert sys.argv == argv_before  # the harness's argv does not leak into the caller's
    for given in (["--out-dir", "elsewhere"], ["--out-dir=elsewhere"], ["--out", "elsewhere"]):
        assert main(["evaluate", "--model", "m", *given]) == 0
        assert got[-1] == tmp_path / "elsewhere"
    monkeypatch.undo()  # the real harness's help, which says where the CLI writes
    with pytest.raises(SystemExit) as exc:
        main(["evaluate", "--help"])
    assert exc.value.code == 0 and "./countdown-results" in capsys.readouterr().out


def test_evaluate_render_writes_where_asked_and_bad_counts_fail_before_any_work(tmp_path, capsys):
    """--render re-writes a saved run's .md / .png into --out-dir (not over the committed results beside the JSON);
    a count of 0 is refused by the argument parser, not after minutes of calibration."""
    import importlib.util

    from countdown_fx import cli

    checkout = Path(cli.__file__).resolve().parents[1]
    spec = importlib.util.spec_from_file_location("evaluate", checkout / "benchmarks" / "quality" / "evaluate.py")
    evaluate = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(evaluate)
    saved = checkout / "benchmarks" / "results" / "quality_llama-silu.json"
    before = (saved.with_suffix(".md").stat().st_mtime_ns, saved.with_suffix(".png").stat().st_mtime_ns)
    assert evaluate.main(["--render", str(saved), "--out-dir", str(tmp_path)]) == 0
    assert (tmp_path / "quality_llama-silu.md").is_file() and (tmp_path / "quality_llama-silu.png").is_file()
    assert (saved.with_suffix(".md").stat().st_mtime_ns, saved.with_suffix(".png").stat().st_mtime_ns) == before
    for flag in ("--decode-steps", "--prefix", "--batch-size"):
        with pytest.raises(SystemExit):
            evaluate.main(["--model", "unused", flag, "0"])
        assert "must be at least 1" in capsys.readouterr().err


def test_inspect_lists_sites(model_dir, capsys):
    assert main(["inspect", "--model", str(model_dir)]) == 0
    out = capsys.readouterr().out
    assert "2 gated FFN site(s)" in out and "model.layers.1.mlp" in out


def test_help_from_a_fresh_interpreter():
    res = subprocess.run([sys.executable, "-m", "countdown_fx.cli", "calibrate", "--help"], capture_output=True,
                         text=True, timeout=120)
    assert res.returncode == 0
    for flag in ("--model", "--data", "--method", "--sparsity", "--out", "--rule"):
        assert flag in res.stdout


def test_bench_says_clearly_when_there_is_no_gpu(capsys, monkeypatch):
    import torch

    from countdown_fx.cli import main

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # the CPU answer, on any machine
    assert main(["bench"]) == 1
    assert "no CUDA GPU here" in capsys.readouterr().err
