"""Run-directory paths, atomic writes, content hashes for stage cache keys, the resume lookup, and the
user cache (teachers, teacher logits, sysroots): where it is, what it holds, clearing it."""
from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .errors import BadInputError

if TYPE_CHECKING:  # annotations only: the config imports nothing from here at run time
    from .config import Config
    from .config.profiles import Profile


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


_UMASK = _umask()


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success rename it over `path` (atomic on POSIX)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        if tmp_path.exists():  # mkstemp's 0600 would stay: the mode a plain open() gives under the umask
            os.chmod(tmp_path, 0o666 & ~_UMASK)
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def write_bytes(path: str | Path, data: bytes) -> None:
    """Write bytes atomically."""
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())


def write_text(path: str | Path, text: str) -> None:
    """Write text atomically."""
    write_bytes(path, text.encode("utf-8"))


def write_json(path: str | Path, obj: Any) -> None:
    """Write JSON atomically, indented and key-ordered as given."""
    write_text(path, json.dumps(obj, indent=2, default=_json_default) + "\n")


def _json_default(o: Any) -> Any:
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def write_npz(path: str | Path, **arrays: np.ndarray) -> None:
    """Write a .npz atomically."""
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    write_bytes(path, buf.getvalue())


def link_or_copy(src: Path, dst: Path) -> None:
    """Hard-link `src` at `dst` (the run directory keeps one copy of a large model), else copy it."""
    dst.unlink(missing_ok=True)
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of a file's content."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def hash_obj(*parts: Any) -> str:
    """A stable short hash of JSON-serialisable parts (config sections, versions, file hashes)."""
    h = hashlib.sha256()
    for p in parts:
        h.update(json.dumps(p, sort_keys=True, default=_json_default).encode())
        h.update(b"\x00")
    return h.hexdigest()[:20]


def hash_arrays(*arrays: np.ndarray) -> str:
    """A stable short hash of numpy arrays' shapes, dtypes and bytes."""
    h = hashlib.sha256()
    for a in arrays:
        a = np.ascontiguousarray(a)
        h.update(f"{a.shape}{a.dtype}".encode())
        h.update(a.tobytes())
    return h.hexdigest()[:20]


def ensure_writable_dir(path: Path) -> Path:
    """Create `path` (and parents) and check a file can be written there."""
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / ".edgekd-write-probe"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise BadInputError(f"output directory {path} is not writable: {e.strerror or e}") from None
    return path


RUN_MARKER = ".edgekd-run.json"  # written at the start of every run: the folder holds edgekd's outputs
RUN_OUTPUTS = ("report.json", "report.md", "report.html", "*.onnx", "*.onnx.data", "*.npz", "model.*", "draft.*",
               "teacher.*", "target", "tokenizer")  # what a run writes at the top of its folder (stages/ resumes)


def clear_previous_run(run_dir: Path) -> list[str]:
    """Remove what an earlier run wrote in `run_dir` (RUN_OUTPUTS, where RUN_MARKER says a run was there),
    keeping stages/ for resuming: a rerun's folder then holds only its own models and report, never a stale
    one beside them. Other files are left alone. Returns the names removed."""
    if not (run_dir / RUN_MARKER).is_file():
        return []
    gone = sorted({p for pattern in RUN_OUTPUTS for p in run_dir.glob(pattern)})
    for p in gone:
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        else:
            p.unlink()
    return [p.name for p in gone]


RUN_REPORTS = ("report.json", "report.md", "report.html")


def check_output_file(path: str | Path, flag: str, inputs: tuple = ()) -> None:
    """BadInputError (one line naming `flag`) unless a file can be written at `path`: checked before any work,
    so a long run never ends on a path it cannot write; nor may it be one of the command's `inputs` or a run
    directory's report, which writing would destroy."""
    p = Path(path)
    if not str(path):
        raise BadInputError(f"{flag}: an empty path; give a file path")
    if p.is_dir():
        raise BadInputError(f"{flag} {p}: is a directory; give a file path")
    if p.is_symlink():  # a file is written beside and moved into place: that would replace the link itself
        raise BadInputError(f"{flag} {p}: is a symbolic link; give the path of the file itself")
    if p.exists() and not p.is_file():
        raise BadInputError(f"{flag} {p}: is not a regular file (a device, pipe or socket); give a file path")
    for given in inputs:
        if given is not None and Path(given).exists() and p.exists() and os.path.samefile(p, given):
            raise BadInputError(f"{flag} {p}: is the input {given} this command reads; give another file")
    if p.name in RUN_REPORTS and ((p.parent / RUN_MARKER).is_file() or _holds_a_report(p.parent / "report.json")):
        raise BadInputError(f"{flag} {p}: would overwrite a run directory's {p.name}; give another file")
    existing = next(q for q in (p.parent, *p.parent.parents) if q.exists())
    if not existing.is_dir():
        raise BadInputError(f"{flag} {p}: {existing} is a file, not a folder")
    try:  # a real write: permission bits do not tell for root, read-only mounts or /proc
        fd, probe = tempfile.mkstemp(prefix=".edgekd-probe-", dir=existing)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise BadInputError(f"{flag} {p}: {existing} is not writable ({e.strerror})") from None


def _holds_a_report(path: Path) -> bool:
    """Whether `path` is an edgekd report.json (a run directory copied without its hidden marker)."""
    try:
        with open(path, "rb") as f:
            head = f.read(4096)
    except OSError:
        return False
    return b'"schema_version"' in head and b'"edgekd_version"' in head


def cache_dir() -> Path:
    """The user's edgekd cache folder (EDGEKD_CACHE overrides)."""
    root = os.environ.get("EDGEKD_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "edgekd"
    )
    if os.path.exists(root) and not os.path.isdir(root):
        raise BadInputError(f"the user cache {root} (EDGEKD_CACHE, else $XDG_CACHE_HOME/edgekd) is a file, not a folder")
    return Path(root)


def default_run_dir(config: Config, profile: Profile, root: Path = Path("runs")) -> Path:
    """runs/<name>-<target>-<timestamp>/, or the newest unfinished run of the same config (resume)."""
    stem = f"{config.name}-{profile.name}"
    cfg_key = config_key(config, profile)
    if root.is_dir():
        for d in sorted(root.glob(f"{stem}-*"), reverse=True):
            meta = d / ".edgekd-run.json"
            if meta.is_file() and not (d / "report.json").exists():
                try:
                    if json.loads(meta.read_text()).get("config_key") == cfg_key:
                        return d
                except ValueError:
                    continue
    return root / f"{stem}-{datetime.now().strftime('%Y%m%d-%H%M%S')}"


def config_key(config: Config, profile: Profile) -> str:
    return hash_obj(config.model_dump(mode="json"), profile.model_dump(mode="json"))


# The user cache (cache_dir()): what edgekd writes there, by kind -> (pattern under the cache folder).
# Anything else in the folder (a virtual environment, other tools' files) is never listed or removed.
CACHE_KINDS = {"teachers": "teachers/*", "logits": "teacher-logits/*", "lm-topk": "lm-topk/*", "sysroots": "arm64-sysroot-*"}


@dataclass(frozen=True)
class CacheEntry:
    """One cached item: a file (teacher weights, a logit table) or a folder (a sysroot)."""

    kind: str
    path: Path
    size_bytes: int
    modified: float  # newest modification time of anything in it (seconds since the epoch)


def _size_and_mtime(path: Path) -> tuple[int, float]:
    if not path.is_dir() or path.is_symlink():
        st = path.lstat()
        return st.st_size, st.st_mtime
    size, newest = 0, path.lstat().st_mtime
    for f in path.rglob("*"):
        st = f.lstat()
        size += st.st_size if not f.is_dir() else 0
        newest = max(newest, st.st_mtime)
    return size, newest


def cache_entries(kind: str | None = None) -> list[CacheEntry]:
    """The entries of the user cache (of one kind when given), by kind then path."""
    root = cache_dir()
    out = []
    for k, pattern in CACHE_KINDS.items():
        if kind in (None, k):
            for p in sorted(root.glob(pattern)) if root.is_dir() else []:
                out.append(CacheEntry(k, p, *_size_and_mtime(p)))
    return out


def clear_cache(kind: str | None = None, older_than_days: float | None = None,
                now: float | None = None) -> list[CacheEntry]:
    """Remove the cache entries of `kind` (every kind when None) last written more than
    `older_than_days` days ago (all when None); returns what was removed."""
    import time

    cutoff = None if older_than_days is None else (now or time.time()) - older_than_days * 86400
    removed = []
    for e in cache_entries(kind):
        if cutoff is not None and e.modified >= cutoff:
            continue
        if e.path.is_dir() and not e.path.is_symlink():
            shutil.rmtree(e.path)
        else:
            e.path.unlink(missing_ok=True)
        removed.append(e)
    return removed
