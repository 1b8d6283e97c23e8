"""An on-disk cache of a language-model teacher's top-k next-token distributions, batch by batch.

A causal LM's full logits are too large to keep (batch x seq x vocab, vocab ~ 10^5), so each target
token keeps its k most likely tokens: log-probabilities at temperature 1 as float16, token ids as
int32, and the probability of all other tokens (rest_mass = 1 - sum of the top-k probabilities) as
float32. lm_losses' `*_topk` losses consume them.

Layout, under one directory per cache:

    header.json                 {"version", "key", "k", "vocab", "dtypes"}
    batch-000000/values.npy     (batch, seq, k) float16    teacher log-probabilities, largest first
                 indices.npy    (batch, seq, k) int32      their token ids
                 rest_mass.npy  (batch, seq)    float32    probability outside the k tokens
                 mask.npy       (batch, seq)    bool       the target tokens that count

Each batch keeps its own (batch, seq) shape (sequences are padded per batch), recorded in its .npy
headers. A batch is written into a temporary folder and renamed into place in one step, so a batch
folder is either complete or absent. Arrays are read memory-mapped.

The key names what the teacher saw (a hash of its weights, the tokenised inputs and k: see
cache.model_hash and runs.hash_obj). Opening a directory whose header has another key, version, k or
vocab raises TopKCacheError, unless rebuild=True, which deletes its batches and starts afresh; a
cache is never silently reused for a different teacher or data. A batch whose files are missing,
truncated or inconsistent is reported by `has` as absent (so the caller recomputes it) and makes
`read` raise TopKCacheError naming the file. One writer at a time.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch

from ..errors import StageError
from ..runs import write_json
from .lm_losses import TopKTeacher, topk_teacher

__all__ = ["CACHE_VERSION", "DTYPES", "TopKCache", "TopKCacheError"]

CACHE_VERSION = "lm-topk-v1"
DTYPES = {"values": "float16", "indices": "int32", "rest_mass": "float32", "mask": "bool"}
HEADER = "header.json"


class TopKCacheError(StageError):
    """The top-k cache on disk cannot be used: another key, or a missing, truncated or corrupt file."""


class TopKCache:
    """Teacher top-k log-probabilities for the batches of one run, stored under `directory`.

    `reused` says whether an existing cache with the same key was opened (its batches stay readable)."""

    def __init__(self, directory: str | Path, key: str, *, k: int, vocab: int, rebuild: bool = False):
        if not 1 <= k <= vocab:
            raise ValueError(f"k must be in [1, vocab={vocab}], got {k}")
        if vocab > np.iinfo(np.int32).max:
            raise ValueError(f"vocab {vocab} does not fit the int32 token ids")
        self.directory = Path(directory)
        self.key, self.k, self.vocab = key, k, vocab
        self.header = {"version": CACHE_VERSION, "key": key, "k": k, "vocab": vocab, "dtypes": DTYPES}
        found = self._read_header()
        if found == self.header:
            self.reused = True
            return
        if found is not None and not rebuild:
            raise TopKCacheError(
                f"{self.directory}: holds a teacher top-k cache for another run "
                f"(key {found.get('key')!r}, k={found.get('k')}, vocab={found.get('vocab')}, "
                f"version {found.get('version')!r}; wanted key {key!r}, k={k}, vocab={vocab}): "
                "use another directory or pass rebuild=True")
        self.reused = False
        self.clear()
        write_json(self.directory / HEADER, self.header)

    def _read_header(self) -> dict | None:
        """The header on disk; None when there is none; {} (a mismatch) when it cannot be parsed."""
        path = self.directory / HEADER
        if not path.is_file():
            return None
        try:
            found = json.loads(path.read_text())
        except (OSError, ValueError):
            return {}
        return found if isinstance(found, dict) else {}

    def clear(self) -> None:
        """Delete every batch and the header (only this cache's own files)."""
        if self.directory.is_dir():
            for p in self.directory.glob("batch-*"):
                if p.is_dir():
                    shutil.rmtree(p)
                else:
                    p.unlink()
            for p in self.directory.glob(".batch-*"):  # temporary folders left by an interrupted write
                shutil.rmtree(p, ignore_errors=True)
            (self.directory / HEADER).unlink(missing_ok=True)

    def batch_dir(self, batch_index: int) -> Path:
        """The folder of one batch."""
        if batch_index < 0:
            raise ValueError(f"batch_index must be >= 0, got {batch_index}")
        return self.directory / f"batch-{batch_index:06d}"

    def write(self, batch_index: int, log_probs: torch.Tensor, mask: torch.Tensor | None = None) -> None:
        """Store one batch of teacher outputs (batch, seq, vocab): log-probabilities at temperature 1
        (raw logits work too: they are normalised here). Masked positions (mask == 0) are stored as
        zeros. Replaces the batch if it was written before."""
        if log_probs.dim() != 3 or log_probs.shape[-1] != self.vocab:
            raise ValueError(f"log_probs must be (batch, seq, {self.vocab}), got {tuple(log_probs.shape)}")
        if log_probs.shape[0] * log_probs.shape[1] == 0:
            raise ValueError("an empty batch cannot be cached")
        keep = torch.ones(log_probs.shape[:2], dtype=torch.bool) if mask is None else mask.detach().cpu() != 0
        if keep.shape != log_probs.shape[:2]:
            raise ValueError(f"mask must be {tuple(log_probs.shape[:2])}, got {tuple(keep.shape)}")
        with torch.no_grad():  # top-k where the teacher's outputs are (its GPU): only k per token come back
            top = TopKTeacher(*(x.cpu() for x in topk_teacher(log_probs.detach(), self.k)))
        arrays = {
            "values": top.values.masked_fill(~keep.unsqueeze(-1), 0.0).numpy().astype(DTYPES["values"]),
            "indices": top.indices.masked_fill(~keep.unsqueeze(-1), 0).numpy().astype(DTYPES["indices"]),
            "rest_mass": top.rest_mass.masked_fill(~keep, 0.0).numpy().astype(DTYPES["rest_mass"]),
            "mask": keep.numpy(),
        }
        self.directory.mkdir(parents=True, exist_ok=True)
        final = self.batch_dir(batch_index)
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=self.directory))
        try:
            for name, a in arrays.items():
                with open(tmp / f"{name}.npy", "wb") as f:
                    np.save(f, a)
                    f.flush()
                    os.fsync(f.fileno())
            if final.exists():
                shutil.rmtree(final)
            os.rename(tmp, final)  # one step: the batch folder is complete or absent
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)

    def arrays(self, batch_index: int) -> dict[str, np.ndarray]:
        """One batch's arrays, memory-mapped read-only and checked (dtypes, shapes, k); TopKCacheError if a
        file is missing, truncated or inconsistent."""
        folder = self.batch_dir(batch_index)
        if not folder.is_dir():
            raise TopKCacheError(f"{folder}: batch {batch_index} is not in the cache")
        out: dict[str, np.ndarray] = {}
        for name, dtype in DTYPES.items():
            path = folder / f"{name}.npy"
            try:
                a = np.load(path, mmap_mode="r", allow_pickle=False)
            except (OSError, ValueError, EOFError) as e:
                raise TopKCacheError(f"{path}: unreadable or truncated ({e})") from e
            if a.dtype != np.dtype(dtype):
                raise TopKCacheError(f"{path}: dtype {a.dtype}, expected {dtype}")
            out[name] = a
        tokens = out["mask"].shape
        if len(tokens) != 2 or out["rest_mass"].shape != tokens or \
                out["values"].shape != (*tokens, self.k) or out["indices"].shape != (*tokens, self.k):
            shapes = {n: a.shape for n, a in out.items()}
            raise TopKCacheError(f"{folder}: inconsistent shapes {shapes} for k={self.k}")
        return out

    def read(self, batch_index: int) -> tuple[TopKTeacher, torch.Tensor]:
        """One batch as (TopKTeacher of CPU tensors: float16 values, int32 indices, float32 rest mass;
        the bool mask (batch, seq)), copied out of the memory maps."""
        a = self.arrays(batch_index)
        t = {n: torch.from_numpy(np.array(v)) for n, v in a.items()}
        return TopKTeacher(t["values"], t["indices"], t["rest_mass"]), t["mask"]

    def has(self, batch_index: int) -> bool:
        """Whether the batch is stored and readable (a truncated or partial batch counts as absent)."""
        try:
            self.arrays(batch_index)
        except TopKCacheError:
            return False
        return True

    def batches(self) -> list[int]:
        """The indices of the stored batch folders, ascending (not checked: see `has`)."""
        found = []
        for p in self.directory.glob("batch-*"):
            suffix = p.name.removeprefix("batch-")
            if p.is_dir() and suffix.isdigit():
                found.append(int(suffix))
        return sorted(found)

    def nbytes(self) -> int:
        """Bytes on disk of the stored batches."""
        return sum(f.stat().st_size for f in self.directory.glob("batch-*/*.npy"))
