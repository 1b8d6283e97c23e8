"""The documents of a text corpus's files: a plain text file is one document; a JSON Lines file (.jsonl,
.ndjson) holds one document per record, as Hugging Face datasets and most LM fine-tuning data are written.
Either may be gzip-compressed (.gz).

A record's text is its `text_field` (data.text_field, default "text"); a chat record ({"messages": [{"role",
"content"}, ...]}) is rendered with the teacher's chat template, as the model sees a conversation; a
prompt-completion record ({"prompt", "completion"}) is the two joined. A line that is not JSON, or a
record with none of these, is a DataError naming the file and line."""
from __future__ import annotations

import bisect
import functools
import gzip
import json
import zlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from ..errors import DataError

__all__ = ["ChatRenderer", "Rendered", "Source", "document_texts", "is_records", "read_text", "record_count"]

RECORD_SUFFIXES = (".jsonl", ".ndjson")

ChatRenderer = Callable[[list], str]  # a chat record's messages as the text the model reads


class Rendered(str):
    """A chat record's text as the chat template wrote it: the template closes every turn with its own
    end-of-turn token, so no end-of-text token is added after it (as chat fine-tuning packs conversations)."""


@dataclass(frozen=True)
class Source:
    """Part of a file: some records of a JSON Lines file in the order given (a split cut by record), or a
    stretch of a text file's lines, `span` its start and end as fractions of the file's characters (a
    split cut by position; the cut falls at the line boundary nearest each fraction)."""

    path: Path
    records: tuple[int, ...] = ()
    span: tuple[float, float] | None = None

    def __str__(self) -> str:
        return str(self.path)


def _stretch(text: str, span: tuple[float, float]) -> str:
    """The lines of `text` from one fraction of its characters to another, cut at line boundaries."""
    ends = [i + 1 for i, c in enumerate(text) if c == "\n"]  # where each line ends
    if not ends or ends[-1] != len(text):
        ends.append(len(text))
    bounds = [0] + ends

    def at(fraction: float) -> int:
        target = fraction * len(text)
        i = bisect.bisect_left(bounds, target)  # the nearest line boundary: bounds[i - 1] or bounds[i]
        return min(bounds[max(i - 1, 0):i + 1], key=lambda b: abs(b - target))

    return text[at(span[0]):at(span[1])]


def _name(path: Path) -> str:
    return path.name[:-3] if path.name.endswith(".gz") else path.name


def is_records(path: Path) -> bool:
    """Whether the file holds one document per line (JSON Lines), by its name."""
    return _name(path).lower().endswith(RECORD_SUFFIXES)


def _bytes(path: Path) -> bytes:
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise DataError(f"data.files: cannot read {path}: {e.strerror or e}") from None
    if path.name.endswith(".gz"):
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as e:
            raise DataError(f"data.files: {path} is not a readable gzip file ({e})") from None
    return raw


def read_text(path: Path) -> str:
    """The file as text; a binary file (NUL bytes) or one that is mostly not UTF-8 is a DataError naming it,
    not tokens of garbage (a few undecodable bytes, as in a Latin-1 comment, are replaced)."""
    raw = _bytes(path)
    if b"\x00" in raw:
        raise DataError(f"data.files: {path} is not text (it holds NUL bytes); name text files only")
    text = raw.decode("utf-8", errors="replace")
    bad = text.count("\ufffd") - raw.decode("utf-8", errors="ignore").count("\ufffd")
    if bad > max(16, len(text) // 100):
        raise DataError(f"data.files: {path} is not UTF-8 text ({bad} undecodable bytes); name text files only")
    return text.replace("\r\n", "\n").replace("\r", "\n")  # universal newlines, as text-mode reading gives


def _lines(path: Path) -> list[tuple[int, str]]:
    """The non-blank lines of a JSON Lines file with their line numbers (from 1)."""
    return [(i, line) for i, line in enumerate(read_text(path).split("\n"), 1) if line.strip()]


def record_count(path: Path) -> int:
    """How many records a JSON Lines file holds (its non-blank lines)."""
    return len(_lines(path))


def _record_text(path: Path, line_no: int, line: str, field: str, chat: ChatRenderer | None) -> str:
    where = f"data.files: {path} line {line_no}"
    try:
        rec = json.loads(line)
    except json.JSONDecodeError as e:
        raise DataError(f"{where} is not JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(rec, dict):
        raise DataError(f"{where} is a JSON {type(rec).__name__}, not a record with a {field!r} field")
    if field in rec:
        value = rec[field]
        if not isinstance(value, str):
            raise DataError(f"{where}: field {field!r} is a JSON {type(value).__name__}, not text")
        return value
    if "messages" in rec:
        messages = rec["messages"]
        if not (isinstance(messages, list) and messages and all(
                isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                for m in messages)):
            raise DataError(f"{where}: 'messages' is not a list of {{'role', 'content'}} texts")
        if chat is None:
            raise DataError(f"{where} is a chat record, and the teacher's tokenizer has no chat template to "
                            "render it with")
        try:
            return Rendered(chat(messages))
        except Exception as e:  # noqa: BLE001 - a template raises what its author wrote (jinja2 errors)
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise DataError(f"{where}: the teacher's chat template refused its messages ({first[:160]})") from None
    if isinstance(rec.get("prompt"), str) and isinstance(rec.get("completion"), str):
        return rec["prompt"] + rec["completion"]
    keys = ", ".join(sorted(rec)[:8]) or "none"
    raise DataError(f"{where} has no {field!r} field (its keys: {keys}); set data.text_field, or write "
                    "'messages' (chat) or 'prompt' and 'completion'")


@functools.lru_cache(maxsize=4)
def _record_texts(path: Path, stamp: tuple, field: str, chat: ChatRenderer | None) -> tuple[str, ...]:
    """Every record's text, each one checked: read and rendered once per file, version (`stamp`: its mtime
    and size) and renderer, though a split by record reads the file for each of its three parts."""
    return tuple(_record_text(path, n, line, field, chat) for n, line in _lines(path))


def document_texts(source: Path | Source, field: str = "text", chat: ChatRenderer | None = None) -> Iterator[str]:
    """The documents of `source`, in order: the whole file, or a JSON Lines file's records (those a Source
    names, in its order). Every record of a JSON Lines file is checked, read or not, so a bad line stops a
    run whatever part of the file it uses."""
    path = source.path if isinstance(source, Source) else source
    if not is_records(path):
        text = read_text(path)
        yield _stretch(text, source.span) if isinstance(source, Source) and source.span else text
        return
    stat = path.stat()
    texts = _record_texts(path, (stat.st_mtime_ns, stat.st_size), field, chat)
    chosen: Sequence[int] = source.records if isinstance(source, Source) else range(len(texts))
    for i in chosen:
        yield texts[i]
