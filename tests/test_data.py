"""countdown_fx.data: the stdlib corpus, the byte tokenizer, batches, and the embedded demo model (CPU, fast)."""

from __future__ import annotations

import json
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from countdown_fx.data import (
    ByteTokenizer,
    default_model_path,
    load_tokenizer,
    stdlib_corpus,
    token_batches,
    token_stream,
)

SMALL = 2 * 2**20  # bytes per split: enough for every test here, and quick to read


@pytest.fixture(scope="module")
def corpus():
    return stdlib_corpus(max_bytes=SMALL)


# ------------------------------------------------------------------------------------- tokenizer
@settings(max_examples=200, deadline=None)
@given(st.text())
def test_byte_tokenizer_round_trip(text):
    tok = ByteTokenizer()
    ids = tok.encode(text)
    assert ids == list(text.encode("utf-8"))
    assert all(0 <= i < 256 for i in ids)
    assert tok.decode(ids) == text
    with_bos = tok.encode(text, add_special_tokens=True)
    assert with_bos[0] == tok.bos_token_id and tok.decode(with_bos) == text
    assert tok.decode(torch.tensor(ids + [tok.eos_token_id])) == text


def test_byte_tokenizer_edges():
    tok = ByteTokenizer()
    assert len(tok) == tok.vocab_size == 258
    assert tok.decode([0xFF]) == "\ufffd"  # invalid UTF-8 from a model is replaced, not an exception
    assert tok.decode([104, 257, 105], skip_special_tokens=False) == "h<eos>i"
    with pytest.raises(ValueError, match="outside"):
        tok.decode([258])
    with pytest.raises(TypeError):
        tok.encode(b"bytes")
    out = tok(["ab", "cd"], return_tensors="pt")
    assert out["input_ids"].tolist() == [[97, 98], [99, 100]]
    with pytest.raises(ValueError, match="different lengths"):
        tok(["a", "bcd"], return_tensors="pt")


def test_tokenizer_save_and_load(tmp_path):
    ByteTokenizer().save_pretrained(tmp_path)
    assert json.loads((tmp_path / "byte_tokenizer.json").read_text())["vocab_size"] == 258
    assert isinstance(load_tokenizer(tmp_path), ByteTokenizer)
    with pytest.raises(FileNotFoundError, match="no tokenizer"):
        load_tokenizer(tmp_path / "nowhere")


# ---------------------------------------------------------------------------------------- corpus
def test_corpus_is_deterministic_and_split_by_file(corpus):
    again = stdlib_corpus(max_bytes=SMALL)
    assert again == corpus
    assert corpus.train and corpus.heldout
    assert not set(corpus.train_files) & set(corpus.heldout_files)
    assert list(corpus.train_files) == sorted(corpus.train_files)
    assert corpus.num_bytes("train") <= SMALL and corpus.num_bytes("heldout") <= SMALL
    for f in corpus.train_files + corpus.heldout_files:
        assert not {"site-packages", "test", "__pycache__"} & set(f.split("/")[:-1]), f


def test_corpus_bad_input(tmp_path):
    with pytest.raises(ValueError, match="empty"):
        stdlib_corpus(root=tmp_path)  # no .py files at all
    with pytest.raises(FileNotFoundError):
        stdlib_corpus(root=tmp_path / "missing")
    with pytest.raises(ValueError, match="heldout_fraction"):
        stdlib_corpus(heldout_fraction=0.0)
    with pytest.raises(ValueError, match="max_bytes"):
        stdlib_corpus(max_bytes=0)


# --------------------------------------------------------------------------------------- batches
def test_batches(corpus):
    stream = token_stream(corpus.heldout)
    assert stream.dtype == torch.long and stream.dim() == 1
    assert int((stream == ByteTokenizer.eos_token_id).sum()) == len(corpus.heldout)
    a = list(token_batches(stream, 4, 32, seed=1, num_batches=3))
    b = list(token_batches(stream, 4, 32, seed=1, num_batches=3))
    c = list(token_batches(stream, 4, 32, seed=2, num_batches=3))
    assert len(a) == 3 and all(torch.equal(x, y) for x, y in zip(a, b))
    assert not all(torch.equal(x, y) for x, y in zip(a, c))
    for x in a:
        assert x.shape == (4, 32) and x.dtype == torch.long
        assert int(x.min()) >= 0 and int(x.max()) < ByteTokenizer.vocab_size
    seq = list(token_batches(stream[:1000], 2, 100))  # sequential: consecutive, non-overlapping
    assert len(seq) == 5 and torch.equal(torch.cat(seq).reshape(-1), stream[:1000])
    with pytest.raises(ValueError, match="too few"):
        next(token_batches(stream[:10], 2, 8))
    with pytest.raises(ValueError, match="no documents"):
        token_stream([])


# ----------------------------------------------------------------------------- embedded demo model
def test_default_model_loads_and_beats_uniform(corpus):
    pytest.importorskip("transformers")
    from countdown_fx.data import load_default_model

    path = default_model_path()
    assert (path / "model.safetensors").stat().st_size <= 3 * 2**20  # the README demo model stays a few MB
    model, tok = load_default_model()
    assert isinstance(tok, ByteTokenizer) and not model.training
    assert next(model.parameters()).dtype == torch.float32
    stream = token_stream(corpus.heldout, tok)
    nll, n = 0.0, 0
    with torch.no_grad():
        for x in token_batches(stream, 4, 256, num_batches=2):
            logits = model(input_ids=x).logits
            lp = torch.log_softmax(logits[:, :-1].float(), -1)
            nll -= lp.gather(-1, x[:, 1:, None]).sum().item()
            n += x[:, 1:].numel()
    ppl = math.exp(nll / n)
    assert ppl < 0.5 * 256, ppl
