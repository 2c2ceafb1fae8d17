"""`countdown-fx` command line, end to end on a tiny checkpoint directory."""

from __future__ import annotations

import subprocess
import sys

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


def test_bad_arguments_are_clear(model_dir, tmp_path, capsys):
    with pytest.raises(SystemExit, match="does not exist"):
        main(["calibrate", "--model", str(model_dir), "--data", str(tmp_path / "nope.txt"), "--out", "x"])
    with pytest.raises(SystemExit, match="no config.json"):
        main(["calibrate", "--model", str(tmp_path), "--data", str(tmp_path), "--out", "x"])
    with pytest.raises(SystemExit):
        main(["calibrate", "--model", str(model_dir), "--data", "x", "--method", "relu", "--out", "x"])
    assert "invalid choice" in capsys.readouterr().err


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
