"""Text corpora for the causal-LM task: files or globs (the embedded default: Python's standard library
sources), split by file into train/validation/test with a fixed seed, or split as the user names them;
tokenised with the teacher's tokenizer and cut into blocks of seq_len tokens. Files are plain text or JSON
Lines records, either gzip-compressed (data/documents.py).

A file belongs to exactly one split, so no test text is ever seen in training, not even a neighbouring
block of the same file. Fewer than 3 files that are all JSON Lines are split by record instead (each
record a document of its own, as datasets are cut). Within a split the documents' tokens are joined with
the end-of-text token after each and cut into consecutive blocks; the tail shorter than a block is
dropped. `max_tokens` bounds a split (documents are read in their shuffled order until it is reached), so
a run's cost does not grow with a large corpus."""
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
from .documents import ChatRenderer, Rendered, Source, document_texts, is_records, record_count

__all__ = ["TextSplits", "TokenBlocks", "build_text_splits", "resolve_text_files", "split_corpus", "split_files",
           "split_records", "stdlib_sources", "tokenize_blocks"]

# The standard library's own tests are left out of the default corpus: they are a third of its text and
# mostly repeated boilerplate, where the library itself is the code users write. So are generated files:
# the codec tables of `encodings` (cp1251.py, mac_greek.py, ...: 256-line character maps that a small
# model predicts as well as its teacher) and pydoc_data's dump of the documentation.
STDLIB_EXCLUDED = ("test", "tests", "idlelib", "site-packages", "dist-packages", "__pycache__", "lib2to3",
                   "encodings", "pydoc_data")


@dataclass
class TokenBlocks:
    """Token ids in blocks of seq_len (int64, shape (n, seq_len)), the files they came from and how many
    documents (files, or JSON Lines records) were read into them (a split bounded by tokens stops early)."""

    ids: torch.Tensor
    files: list[str] = field(default_factory=list)
    documents: int = 0

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
    split: str = "by file, seeded"  # how the corpus was cut (split_corpus)

    def summary(self) -> dict:
        return {"split": self.split, **{
            name: {"files": len(b.files), "documents": b.documents, "blocks": len(b), "tokens": b.tokens}
            for name, b in (("train", self.train), ("validation", self.val), ("test", self.test))}}


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


def resolve_text_files(patterns: Sequence[str], root: str | Path | None = None,
                       key: str = "data.files") -> list[Path]:
    """The files the patterns name (paths or globs, `**` allowed; relative to `root` when given), sorted
    and without duplicates. A pattern that matches no file is a DataError naming it."""
    out: dict[str, Path] = {}
    for pattern in patterns:
        full = os.path.join(str(root), pattern) if root and not os.path.isabs(pattern) else pattern
        matches = [Path(m) for m in glob.glob(os.path.expanduser(full), recursive=True)]
        files = [m for m in matches if m.is_file()]
        if not files:
            raise DataError(f"{key}: {pattern!r} matches no file" + (f" under {root}" if root else ""))
        for f in files:
            out[str(f.resolve())] = f
    return [out[k] for k in sorted(out)]


def _carve(n: int, fraction: float) -> int:
    """How many of n items a fraction carves off: at least one, and one left."""
    return min(max(1, round(n * fraction)), n - 1)


def _cut(n: int, val_fraction: float, test_fraction: float) -> tuple[int, int]:
    """How many of n items go to test and to validation: each at least one, at least one left to train."""
    n_test = max(1, round(n * test_fraction))
    n_val = max(1, round(n * val_fraction))
    if n_test + n_val >= n:
        n_test, n_val = 1, 1
    return n_test, n_val


def split_files(files: Sequence[Path], seed: int, val_fraction: float,
                test_fraction: float) -> tuple[list[Path], list[Path], list[Path]]:
    """Shuffle the files with `seed` and cut them into train/validation/test by count; each split gets at
    least one file (three files at least)."""
    if len(files) < 3:
        raise DataError(f"data.files: {len(files)} file(s) given; a text corpus split by file needs at least 3 "
                        "(one each for train, validation and test), or JSON Lines records, or the splits named: "
                        "data.files: {train: [...], validation: [...], test: [...]}")
    order = list(files)
    random.Random(seed).shuffle(order)
    n_test, n_val = _cut(len(order), val_fraction, test_fraction)
    return order[n_test + n_val:], order[n_test:n_test + n_val], order[:n_test]


def split_records(files: Sequence[Path], seed: int, fractions: tuple[float, ...]) -> list[list[Source]]:
    """The records of JSON Lines `files`, shuffled with `seed` and cut by count: for fractions (val, test),
    [train, validation, test]; for (val,), [train, validation]. Each part gets at least one record."""
    pairs = [(f, i) for f in files for i in range(record_count(f))]
    parts = len(fractions) + 1
    if len(pairs) < parts:
        raise DataError(f"data.files: {', '.join(map(str, files))} hold {len(pairs)} record(s); splitting them "
                        f"by record needs at least {parts}")
    random.Random(seed).shuffle(pairs)
    if len(fractions) == 2:
        n_test, n_val = _cut(len(pairs), *fractions)
        cuts = [pairs[n_test + n_val:], pairs[n_test:n_test + n_val], pairs[:n_test]]
    else:
        n_val = _carve(len(pairs), fractions[0])
        cuts = [pairs[n_val:], pairs[:n_val]]
    out = []
    for cut in cuts:
        by_file: dict[Path, list[int]] = {}
        for f, i in cut:
            by_file.setdefault(f, []).append(i)
        out.append([Source(f, tuple(ix)) for f, ix in by_file.items()])
    return out


def split_corpus(files: Sequence[Path] | dict[str, list[Path]], seed: int, val_fraction: float,
                 test_fraction: float) -> tuple[list, list, list, str]:
    """train, validation and test sources and how they were cut. A list of files is split by file (seeded);
    fewer than 3 files, by record where they are all JSON Lines, by position where they are all text (the
    first lines of each to train, the last to test, as single-file corpora are cut). A mapping gives the
    splits as named; without validation files, validation is carved from the training files (by file, or
    a single file's records or last lines)."""
    if not isinstance(files, dict):
        if len(files) < 3 and files and all(is_records(f) for f in files):
            train, val, test = split_records(files, seed, (val_fraction, test_fraction))
            return train, val, test, "by record, seeded (fewer than 3 files)"
        if len(files) < 3 and files and not any(is_records(f) for f in files):
            cut = 1 - val_fraction - test_fraction
            train, val, test = ([Source(f, span=span) for f in files]
                                for span in ((0.0, cut), (cut, 1 - test_fraction), (1 - test_fraction, 1.0)))
            return (train, val, test, f"by position in each file (fewer than 3 files): the first {cut:.0%} of its "
                    f"lines to train, the next {val_fraction:.0%} to validation, the last {test_fraction:.0%} to test")
        if len(files) < 3 and files:
            raise DataError(f"data.files: {len(files)} files, JSON Lines and plain text mixed; fewer than 3 files are "
                            "split within each file, which needs one kind; give 3 files or more, or name the splits: "
                            "data.files: {train: [...], validation: [...], test: [...]}")
        return (*split_files(files, seed, val_fraction, test_fraction), "by file, seeded")
    seen: dict[Path, str] = {}
    for name in ("train", "validation", "test"):
        for f in files.get(name) or []:
            key = f.resolve()
            if key in seen:
                raise DataError(f"data.files: {f} is in both {seen[key]} and {name}; a file belongs to one split")
            seen[key] = name
    train, test, val = list(files["train"]), list(files["test"]), list(files.get("validation") or [])
    if val:
        return train, val, test, "as named in data.files"
    if len(train) >= 2:
        order = list(train)
        random.Random(seed).shuffle(order)
        n_val = _carve(len(order), val_fraction)
        return order[n_val:], order[:n_val], test, "as named; validation carved from the training files, seeded"
    if is_records(train[0]):
        train_part, val_part = split_records(train, seed, (val_fraction,))
        return train_part, val_part, test, "as named; validation carved from the training records, seeded"
    cut = 1 - val_fraction
    return ([Source(train[0], span=(0.0, cut))], [Source(train[0], span=(cut, 1.0))], test,
            f"as named; validation carved from the last {val_fraction:.0%} of the training file's lines")


def tokenize_blocks(files: Sequence[Path | Source], encode: Callable[[str], list[int]], eos_token_id: int,
                    seq_len: int, max_tokens: int | None = None, split: str = "", text_field: str = "text",
                    chat: ChatRenderer | None = None) -> TokenBlocks:
    """The documents' tokens, joined with `eos_token_id` after each document (a file, or a JSON Lines
    record; a chat record's template closes its turns itself), in blocks of `seq_len` (the tail dropped); at most `max_tokens` tokens (whole blocks). `split`
    names them in an error."""
    stream: list[int] = []
    used: list[str] = []
    empty = documents = 0
    limit = max_tokens
    for source in files:
        before = documents
        for text in document_texts(source, text_field, chat):
            if not text.strip():
                empty += 1
                continue
            stream.extend(encode(text))
            if not isinstance(text, Rendered):  # a chat template ends its turns itself
                stream.append(eos_token_id)
            documents += 1
            if limit is not None and len(stream) >= limit:
                break
        if documents > before and str(source) not in used:
            used.append(str(source))
        if limit is not None and len(stream) >= limit:
            break
    n = len(stream) // seq_len
    if limit is not None:
        n = min(n, limit // seq_len)
    if n == 0:
        where = f"the {split} split's {len(files)} file(s)" if split else f"{len(files)} file(s)"
        raise DataError(f"data: {where} give {len(stream)} tokens ({empty} document(s) empty), fewer "
                        f"than one block of data.seq_len {seq_len}")
    ids = torch.tensor(stream[:n * seq_len], dtype=torch.long).view(n, seq_len)
    return TokenBlocks(ids, used, documents)


def chat_renderer(tokenizer) -> ChatRenderer | None:
    """A chat record's messages as the tokenizer's chat template writes them (None: it has no template)."""
    if not getattr(tokenizer, "chat_template", None):
        return None

    def render(messages: list) -> str:
        return tokenizer.apply_chat_template(messages, tokenize=False)

    return render


def build_text_splits(files: Sequence[Path] | dict[str, list[Path]], tokenizer, seq_len: int, seed: int,
                      val_fraction: float, test_fraction: float, max_train_tokens: int | None = None,
                      max_eval_tokens: int | None = None, text_field: str = "text") -> TextSplits:
    """Split `files` (split_corpus) and tokenise each split with `tokenizer` (a Hugging Face tokenizer: its
    `encode(text, add_special_tokens=False)`, `eos_token_id`, vocabulary size and chat template are used)."""
    eos = tokenizer.eos_token_id
    if eos is None:
        raise DataError("data: the teacher's tokenizer has no end-of-text token to join documents with")

    def encode(text: str) -> list[int]:
        return tokenizer.encode(text, add_special_tokens=False)

    train, val, test, how = split_corpus(files, seed, val_fraction, test_fraction)
    chat = chat_renderer(tokenizer)

    def blocks(sources, bound, name):
        return tokenize_blocks(sources, encode, eos, seq_len, bound, name, text_field, chat)

    return TextSplits(train=blocks(train, max_train_tokens, "training"), val=blocks(val, max_eval_tokens, "validation"),
                      test=blocks(test, max_eval_tokens, "test"), seq_len=seq_len, vocab_size=len(tokenizer),
                      eos_token_id=int(eos), split=how)
