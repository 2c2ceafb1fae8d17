"""Text every machine has, a tokenizer that needs no download, and the library's embedded demo model.

Why this module exists: the quality harness, the tests and the README demo need a language model and
held-out text, on machines with no network and no model hub. Every Python installation ships the
source of its standard library, so that is the corpus; a byte-level tokenizer (256 byte ids plus BOS
and EOS) covers any text with no vocabulary file to fetch. The small models trained on it live in
``countdown_fx/assets/tiny-llama`` (embedded demo) and ``benchmarks/quality/models`` (reference runs);
``benchmarks/quality/train_reference_lm.py`` made them.

Everything here is deterministic: files are read in sorted order, the train / held-out split is a hash
of each file's path relative to the stdlib root (so the same module is held out on every Python
version and no held-out file of one version is trained on under another), and batches come from a
seeded ``torch.Generator``.
"""

from __future__ import annotations

import hashlib
import json
import os
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import torch

__all__ = [
    "Corpus",
    "stdlib_corpus",
    "ByteTokenizer",
    "load_tokenizer",
    "token_stream",
    "token_batches",
    "default_model_path",
    "load_default_model",
]

# Directories of the stdlib tree left out of the corpus: installed third-party packages (not the
# stdlib, and they differ from machine to machine), caches, and the test suites (half the bytes,
# full of deliberately odd code).
TEST_DIRS = frozenset({"test", "tests", "idle_test"})
EXCLUDED_DIRS = frozenset({"site-packages", "dist-packages", "__pycache__"}) | TEST_DIRS

BYTE_TOKENIZER_FILE = "byte_tokenizer.json"
_BYTE_TOKENIZER_TYPE = "countdown_fx.ByteTokenizer"
_HF_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


# ----------------------------------------------------------------------------------------- corpus
@dataclass(frozen=True)
class Corpus:
    """Two lists of documents (one per source file) and the relative paths they came from."""

    train: tuple[str, ...]
    heldout: tuple[str, ...]
    train_files: tuple[str, ...]
    heldout_files: tuple[str, ...]
    root: str

    def split(self, name: str) -> tuple[str, ...]:
        """The documents of split ``name`` ("train" or "heldout")."""
        if name == "train":
            return self.train
        if name == "heldout":
            return self.heldout
        raise ValueError(f"unknown split {name!r}; choose 'train' or 'heldout'")

    def num_bytes(self, name: str) -> int:
        return sum(len(t.encode("utf-8")) for t in self.split(name))


def _is_heldout(rel_path: str, heldout_fraction: float) -> bool:
    """Held out iff the first 8 bytes of sha256(path) fall in the lowest ``heldout_fraction`` of the range.

    Hashing the *path* (not the content) keeps the assignment of a module stable across Python versions.
    """
    h = int.from_bytes(hashlib.sha256(rel_path.encode("utf-8")).digest()[:8], "big")
    return h < heldout_fraction * 2**64


def stdlib_corpus(
    max_bytes: int | None = 64 * 2**20,
    heldout_fraction: float = 0.05,
    root: str | os.PathLike | None = None,
    include_tests: bool = False,
) -> Corpus:
    """The Python standard library's own ``.py`` sources, split into train and held-out by file.

    max_bytes:        cap on the UTF-8 bytes of each split (files are taken in sorted path order until
                      the next one would pass the cap); None for no cap. The default is larger than the
                      whole stdlib without its tests (about 12 MB on CPython 3.11).
    heldout_fraction: expected fraction of files held out, in (0, 1).
    root:             the directory to read instead of ``sysconfig.get_paths()["stdlib"]``.
    include_tests:    also read the stdlib's test suites (``test``, ``tests``, ``idle_test``: about 1.6x
                      more text, for training without repeating the data as often). A file's split does
                      not depend on this flag, so held-out files stay held out either way.

    Files that are not valid UTF-8 are skipped (the byte tokenizer works on ``str``). The result depends
    on the Python version that runs it: record ``sys.version`` with any number computed on it.
    """
    if not 0.0 < heldout_fraction < 1.0:
        raise ValueError(f"heldout_fraction must be in (0, 1), got {heldout_fraction}")
    if max_bytes is not None and max_bytes <= 0:
        raise ValueError(f"max_bytes must be positive or None, got {max_bytes}")
    base = Path(root if root is not None else sysconfig.get_paths()["stdlib"])
    if not base.is_dir():
        raise FileNotFoundError(f"stdlib directory {str(base)!r} does not exist")

    excluded = EXCLUDED_DIRS - (TEST_DIRS if include_tests else frozenset())
    paths = []
    for dirpath, dirnames, filenames in os.walk(base):
        dirnames[:] = [d for d in dirnames if d not in excluded]  # prune: never walk site-packages
        for f in filenames:
            if f.endswith(".py"):
                path = Path(dirpath) / f
                paths.append((path.relative_to(base).as_posix(), path))
    paths.sort()
    docs: dict[str, list[tuple[str, str]]] = {"train": [], "heldout": []}
    used = {"train": 0, "heldout": 0}
    full = {"train": False, "heldout": False}
    for rel, path in paths:
        name = "heldout" if _is_heldout(rel, heldout_fraction) else "train"
        if full[name]:
            continue
        try:
            text = path.read_bytes().decode("utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        if not text.strip():
            continue
        size = len(text.encode("utf-8"))
        if max_bytes is not None and used[name] + size > max_bytes:
            full[name] = True  # stop at the first file that does not fit: a prefix of the sorted order
            continue
        docs[name].append((rel, text))
        used[name] += size

    for name in ("train", "heldout"):
        if not docs[name]:
            raise ValueError(
                f"the {name} split of {str(base)!r} is empty (found {len(paths)} .py files; "
                f"max_bytes={max_bytes}, heldout_fraction={heldout_fraction}): nothing to train or evaluate on"
            )
    return Corpus(
        train=tuple(t for _, t in docs["train"]),
        heldout=tuple(t for _, t in docs["heldout"]),
        train_files=tuple(r for r, _ in docs["train"]),
        heldout_files=tuple(r for r, _ in docs["heldout"]),
        root=str(base),
    )


# -------------------------------------------------------------------------------------- tokenizer
class ByteTokenizer:
    """UTF-8 bytes as token ids 0..255, plus BOS (256) and EOS (257); nothing to download.

    The interface is the part of a Hugging Face tokenizer the project uses (``encode``, ``decode``,
    ``__call__``, ``save_pretrained``, ``vocab_size``, ``bos/eos/pad_token_id``), so code can take either.
    """

    bos_token_id = 256
    eos_token_id = 257
    pad_token_id = 257
    vocab_size = 258

    def __len__(self) -> int:
        return self.vocab_size

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """Byte ids of ``text`` (UTF-8); with ``add_special_tokens`` a BOS first."""
        if not isinstance(text, str):
            raise TypeError(f"ByteTokenizer.encode takes a str, got {type(text).__name__}")
        ids = list(text.encode("utf-8"))
        return [self.bos_token_id, *ids] if add_special_tokens else ids

    def decode(self, ids: Sequence[int] | torch.Tensor, skip_special_tokens: bool = True) -> str:
        """Text of byte ids; BOS/EOS are dropped (or shown as <bos>/<eos>); invalid UTF-8 becomes U+FFFD."""
        if isinstance(ids, torch.Tensor):
            ids = ids.reshape(-1).tolist()
        out, chunk = [], bytearray()
        for i in ids:
            i = int(i)
            if 0 <= i < 256:
                chunk.append(i)
            elif i in (self.bos_token_id, self.eos_token_id):
                if not skip_special_tokens:
                    out.append(chunk.decode("utf-8", errors="replace"))
                    chunk = bytearray()
                    out.append("<bos>" if i == self.bos_token_id else "<eos>")
            else:
                raise ValueError(f"token id {i} is outside the byte tokenizer's vocabulary 0..{self.vocab_size - 1}")
        out.append(chunk.decode("utf-8", errors="replace"))
        return "".join(out)

    def __call__(self, text: str | list[str], return_tensors: str | None = None, add_special_tokens: bool = False):
        """``{"input_ids": ...}`` like a Hugging Face tokenizer; ``return_tensors="pt"`` needs equal lengths."""
        batch = [text] if isinstance(text, str) else list(text)
        ids = [self.encode(t, add_special_tokens=add_special_tokens) for t in batch]
        if return_tensors is None:
            return {"input_ids": ids[0] if isinstance(text, str) else ids}
        if return_tensors != "pt":
            raise ValueError(f"return_tensors={return_tensors!r} is not supported; use 'pt' or None")
        if len({len(x) for x in ids}) != 1:
            raise ValueError("texts encode to different lengths; encode them one by one or pad them yourself")
        t = torch.tensor(ids, dtype=torch.long)
        return {"input_ids": t, "attention_mask": torch.ones_like(t)}

    def save_pretrained(self, path: str | os.PathLike) -> None:
        """Write ``byte_tokenizer.json`` into ``path``, so a checkpoint directory is self-contained."""
        Path(path).mkdir(parents=True, exist_ok=True)
        spec = {
            "type": _BYTE_TOKENIZER_TYPE,
            "version": 1,
            "vocab_size": self.vocab_size,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "pad_token_id": self.pad_token_id,
            "note": "UTF-8 bytes are ids 0..255; load with countdown_fx.data.load_tokenizer(path)",
        }
        (Path(path) / BYTE_TOKENIZER_FILE).write_text(json.dumps(spec, indent=2) + "\n")

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike) -> "ByteTokenizer":
        f = Path(path) / BYTE_TOKENIZER_FILE
        spec = json.loads(f.read_text())
        if spec.get("type") != _BYTE_TOKENIZER_TYPE or spec.get("vocab_size") != cls.vocab_size:
            raise ValueError(f"{f} does not describe this byte tokenizer (vocab {cls.vocab_size}): {spec}")
        return cls()


def load_tokenizer(path: str | os.PathLike):
    """The tokenizer saved with a checkpoint: ours if ``byte_tokenizer.json`` is there, else transformers'.

    Raises FileNotFoundError when the directory holds neither kind.
    """
    p = Path(path)
    if (p / BYTE_TOKENIZER_FILE).is_file():
        return ByteTokenizer.from_pretrained(p)
    if any((p / f).is_file() for f in _HF_TOKENIZER_FILES):
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(p))
    raise FileNotFoundError(
        f"no tokenizer in {str(p)!r}: expected {BYTE_TOKENIZER_FILE} or one of {list(_HF_TOKENIZER_FILES)}"
    )


# ---------------------------------------------------------------------------------------- batches
def token_stream(texts: Sequence[str], tokenizer=None) -> torch.Tensor:
    """All documents as one 1-D LongTensor, each followed by the tokenizer's EOS id.

    With the byte tokenizer (default) this is a fast byte copy; any tokenizer with ``encode`` and
    ``eos_token_id`` works too (special tokens are not added inside documents).
    """
    tokenizer = tokenizer if tokenizer is not None else ByteTokenizer()
    texts = list(texts)
    if not texts:
        raise ValueError("token_stream got no documents")
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("the tokenizer has no eos_token_id to separate documents")
    if isinstance(tokenizer, ByteTokenizer):
        parts = []
        for t in texts:
            b = t.encode("utf-8")
            parts.append(torch.frombuffer(bytearray(b), dtype=torch.uint8).long() if b else torch.empty(0, dtype=torch.long))
            parts.append(torch.tensor([eos], dtype=torch.long))
        return torch.cat(parts)
    ids: list[int] = []
    for t in texts:
        ids.extend(tokenizer.encode(t, add_special_tokens=False))
        ids.append(eos)
    return torch.tensor(ids, dtype=torch.long)


def token_batches(
    stream: torch.Tensor,
    batch_size: int,
    seq_len: int,
    *,
    seed: int | None = None,
    num_batches: int | None = None,
) -> Iterator[torch.Tensor]:
    """Fixed-length batches, LongTensor [batch_size, seq_len], cut from a 1-D token stream.

    seed=None: consecutive non-overlapping windows from the start (for evaluation); stops when fewer
               than ``batch_size`` whole windows remain, or after ``num_batches``.
    seed=int:  windows at uniformly random offsets from a ``torch.Generator`` seeded with ``seed`` (for
               training); endless unless ``num_batches`` is given. Same seed, same batches.
    """
    if stream.dim() != 1:
        raise ValueError(f"stream must be 1-D, got shape {tuple(stream.shape)}")
    if batch_size <= 0 or seq_len <= 0:
        raise ValueError(f"batch_size and seq_len must be positive, got {batch_size} and {seq_len}")
    n = stream.numel()
    if n < seq_len * (batch_size if seed is None else 1):
        raise ValueError(
            f"the stream has {n} tokens, too few for batches of {batch_size} x {seq_len}"
            + (" without overlap" if seed is None else "")
        )
    stream = stream.long()
    if seed is None:
        windows = n // seq_len
        total = windows // batch_size if num_batches is None else min(num_batches, windows // batch_size)
        for b in range(total):
            start = b * batch_size * seq_len
            yield stream[start : start + batch_size * seq_len].view(batch_size, seq_len).clone()
        return
    gen = torch.Generator().manual_seed(seed)
    offsets = torch.arange(seq_len)
    produced = 0
    while num_batches is None or produced < num_batches:
        starts = torch.randint(0, n - seq_len + 1, (batch_size, 1), generator=gen)
        yield stream[starts + offsets]
        produced += 1


# ------------------------------------------------------------------------------------ demo model
def default_model_path() -> Path:
    """Directory of the embedded demo checkpoint (a ~1M-parameter Llama trained on the stdlib)."""
    return Path(__file__).resolve().parent / "assets" / "tiny-llama"


def load_default_model():
    """(model, tokenizer) of the embedded demo checkpoint: float32, CPU, eval mode. Needs transformers."""
    path = default_model_path()
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"the embedded demo model is missing from {str(path)!r}; "
            "train it with: python benchmarks/quality/train_reference_lm.py --arch tiny-demo --out " + str(path)
        )
    try:
        from transformers import AutoModelForCausalLM
    except ImportError as e:  # transformers is the optional 'hf' extra
        raise ImportError("load_default_model needs transformers: pip install 'countdown-fx[hf]'") from e
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)
    model.to("cpu").eval()
    return model, load_tokenizer(path)
