"""Text corpora for the causal-LM task: files or globs (the embedded default: Python's standard library
sources), split by file into train/validation/test with a fixed seed, tokenised with the teacher's
tokenizer and cut into blocks of seq_len tokens.

A file belongs to exactly one split, so no test text is ever seen in training, not even a neighbouring
block of the same file. Within a split the files' tokens are joined with the end-of-text token between
them and cut into consecutive blocks; the tail shorter than a block is dropped. `max_tokens` bounds a
split (files are read in their shuffled order until it is reached), so a run's cost does not grow with a
large corpus."""
from __future__ import annotations

import glob
import os
import random
import sysconfig
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..errors import DataError

__all__ = ["TextSplits", "TokenBlocks", "build_text_splits", "resolve_text_files", "split_files", "stdlib_sources",
           "tokenize_blocks"]

# The standard library's own tests are left out of the default corpus: they are a third of its text and
# mostly repeated boilerplate, where the library itself is the code users write. So are generated files:
# the codec tables of `encodings` (cp1251.py, mac_greek.py, ...: 256-line character maps that a small
# model predicts as well as its teacher) and pydoc_data's dump of the documentation.
STDLIB_EXCLUDED = ("test", "tests", "idlelib", "site-packages", "dist-packages", "__pycache__", "lib2to3",
                   "encodings", "pydoc_data")


@dataclass
class TokenBlocks:
    """Token ids in blocks of seq_len (int64, shape (n, seq_len)) and the files they came from."""

    ids: torch.Tensor
    files: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return int(self.ids.shape[0])

    @property
    def tokens(self) -> int:
        return int(self.ids.numel())

    def prompts(self, count: int, length: int) -> list[list[int]]:
        """The first `length` tokens of `count` blocks spread evenly over the split (its first and last block
        included), so that every file of it contributes, not only the first few."""
        rows = np.linspace(0, len(self) - 1, min(count, len(self))).round().astype(int) if len(self) else []
        return [self.ids[int(i), :length].tolist() for i in rows]


@dataclass
class TextSplits:
    """The three splits of one corpus, tokenised for one tokenizer."""

    train: TokenBlocks
    val: TokenBlocks
    test: TokenBlocks
    seq_len: int
    vocab_size: int
    eos_token_id: int

    def summary(self) -> dict:
        return {name: {"files": len(b.files), "blocks": len(b), "tokens": b.tokens}
                for name, b in (("train", self.train), ("validation", self.val), ("test", self.test))}


def stdlib_sources() -> list[Path]:
    """Python's standard library sources (*.py) on this machine, its test suites and generated files excluded,
    sorted."""
    root = Path(sysconfig.get_paths()["stdlib"])
    found = []
    for path in sorted(root.rglob("*.py")):
        parts = path.relative_to(root).parts[:-1]
        if not any(p in STDLIB_EXCLUDED for p in parts):
            found.append(path)
    if not found:
        raise DataError(f"data: no Python sources found under the standard library at {root}")
    return found


def resolve_text_files(patterns: Sequence[str], root: str | Path | None = None) -> list[Path]:
    """The files the patterns name (paths or globs, `**` allowed; relative to `root` when given), sorted
    and without duplicates. A pattern that matches no file is a DataError naming it."""
    out: dict[str, Path] = {}
    for pattern in patterns:
        full = os.path.join(str(root), pattern) if root and not os.path.isabs(pattern) else pattern
        matches = [Path(m) for m in glob.glob(os.path.expanduser(full), recursive=True)]
        files = [m for m in matches if m.is_file()]
        if not files:
            raise DataError(f"data.files: {pattern!r} matches no file" + (f" under {root}" if root else ""))
        for f in files:
            out[str(f.resolve())] = f
    return [out[k] for k in sorted(out)]


def split_files(files: Sequence[Path], seed: int, val_fraction: float,
                test_fraction: float) -> tuple[list[Path], list[Path], list[Path]]:
    """Shuffle the files with `seed` and cut them into train/validation/test by count; each split gets at
    least one file (three files at least)."""
    if len(files) < 3:
        raise DataError(f"data.files: {len(files)} file(s) given; a text corpus needs at least 3 (one each for "
                        "train, validation and test)")
    order = list(files)
    random.Random(seed).shuffle(order)
    n_test = max(1, round(len(order) * test_fraction))
    n_val = max(1, round(len(order) * val_fraction))
    if n_test + n_val >= len(order):
        n_test, n_val = 1, 1
    return order[n_test + n_val:], order[n_test:n_test + n_val], order[:n_test]


def _read(path: Path) -> str:
    """The file as text; a binary file (NUL bytes) or one that is mostly not UTF-8 is a DataError naming it,
    not tokens of garbage (a few undecodable bytes, as in a Latin-1 comment, are replaced)."""
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise DataError(f"data.files: cannot read {path}: {e.strerror or e}") from None
    if b"\x00" in raw:
        raise DataError(f"data.files: {path} is not text (it holds NUL bytes); name text files only")
    text = raw.decode("utf-8", errors="replace")
    bad = text.count("\ufffd") - raw.decode("utf-8", errors="ignore").count("\ufffd")
    if bad > max(16, len(text) // 100):
        raise DataError(f"data.files: {path} is not UTF-8 text ({bad} undecodable bytes); name text files only")
    return text.replace("\r\n", "\n").replace("\r", "\n")  # universal newlines, as text-mode reading gives


def tokenize_blocks(files: Sequence[Path], encode: Callable[[str], list[int]], eos_token_id: int, seq_len: int,
                    max_tokens: int | None = None, split: str = "") -> TokenBlocks:
    """The files' tokens, joined with `eos_token_id` between files, in blocks of `seq_len` (the tail
    dropped); at most `max_tokens` tokens (whole blocks). `split` names them in an error."""
    stream: list[int] = []
    used: list[str] = []
    empty = 0
    limit = max_tokens
    for path in files:
        text = _read(path)
        if not text.strip():
            empty += 1
            continue
        stream.extend(encode(text))
        stream.append(eos_token_id)
        used.append(str(path))
        if limit is not None and len(stream) >= limit:
            break
    n = len(stream) // seq_len
    if limit is not None:
        n = min(n, limit // seq_len)
    if n == 0:
        where = f"the {split} split's {len(files)} file(s)" if split else f"{len(files)} file(s)"
        raise DataError(f"data: {where} give {len(stream)} tokens ({empty} of them empty), fewer "
                        f"than one block of data.seq_len {seq_len}")
    ids = torch.tensor(stream[:n * seq_len], dtype=torch.long).view(n, seq_len)
    return TokenBlocks(ids, used)


def build_text_splits(files: Sequence[Path], tokenizer, seq_len: int, seed: int, val_fraction: float,
                      test_fraction: float, max_train_tokens: int | None = None,
                      max_eval_tokens: int | None = None) -> TextSplits:
    """Split `files` by file and tokenise each split with `tokenizer` (a Hugging Face tokenizer: its
    `encode(text, add_special_tokens=False)`, `eos_token_id` and vocabulary size are used)."""
    eos = tokenizer.eos_token_id
    if eos is None:
        raise DataError("data: the teacher's tokenizer has no end-of-text token to join files with")

    def encode(text: str) -> list[int]:
        return tokenizer.encode(text, add_special_tokens=False)

    train, val, test = split_files(files, seed, val_fraction, test_fraction)
    return TextSplits(train=tokenize_blocks(train, encode, eos, seq_len, max_train_tokens, "training"),
                      val=tokenize_blocks(val, encode, eos, seq_len, max_eval_tokens, "validation"),
                      test=tokenize_blocks(test, encode, eos, seq_len, max_eval_tokens, "test"),
                      seq_len=seq_len, vocab_size=len(tokenizer), eos_token_id=int(eos))
