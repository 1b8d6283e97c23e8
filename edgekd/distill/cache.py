"""The teacher-logit cache: the teacher's outputs for each (sample, augmentation draw), computed once
batch by batch in float16 (all classes, or the top k) and stored on disk under a key made of hashes
of the teacher's weights and of the exact inputs it saw (the data after preprocessing and
augmentation: the base images' fingerprint and every draw's offsets), so a change to either
invalidates it. Reused across epochs, temperature sweeps and prune rounds."""
from __future__ import annotations

import hashlib
import math
import time
from pathlib import Path

import torch
from torch import nn

from ..data.images import Images, fingerprint
from ..runs import atomic_path, cache_dir, hash_obj

CACHE_VERSION = "teacher-logits-v2"
TEACHER_BATCH = 256


def frozen(teacher: nn.Module) -> nn.Module:
    """The teacher in eval mode with gradients off (BatchNorm statistics and dropout must not move)."""
    teacher.eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher


def model_hash(model: nn.Module) -> str:
    """Hash of a model's architecture (its repr) and every parameter and buffer, by name."""
    h = hashlib.sha256(repr(model).encode())
    for name, t in model.state_dict().items():
        a = t.detach().cpu().contiguous()
        h.update(f"{name}{tuple(a.shape)}{a.dtype}".encode())
        h.update(a.reshape(-1).view(torch.uint8).numpy().tobytes() if a.numel() else b"")
    return h.hexdigest()[:20]


def tensors_hash(tensors: list[torch.Tensor | Images]) -> str:
    """Hash of a list of input sets (the teacher's inputs): a tensor's shape, dtype and bytes; an
    Images' fingerprint (its store and, for an augmentation draw, the offsets of every sample)."""
    h = hashlib.sha256()
    for t in tensors:
        h.update(fingerprint(t).encode())
    return h.hexdigest()[:20]


@torch.no_grad()
def teacher_outputs(teacher: nn.Module, x: torch.Tensor | Images, batch_size: int = TEACHER_BATCH,
                    device: torch.device | None = None) -> torch.Tensor:
    """The frozen teacher's logits for all of `x` (float32, on the CPU)."""
    frozen(teacher)
    dev = device or next(iter(teacher.parameters()), torch.empty(0)).device
    return torch.cat([teacher(x[i:i + batch_size].to(dev)).float().cpu() for i in range(0, len(x), batch_size)])


def compress_topk(logits: torch.Tensor, k: int) -> dict[str, torch.Tensor]:
    """Keep the k largest logits per row (float16) and one logit for the other classes, chosen so that
    at temperature 1 they keep their total probability: log(mean(exp(rest)))."""
    values, indices = logits.topk(k, dim=-1)
    c = logits.shape[-1]
    if k < c:
        mask = torch.ones_like(logits, dtype=torch.bool).scatter_(-1, indices, False)
        rest_logits = logits.masked_fill(~mask, float("-inf"))
        rest = torch.logsumexp(rest_logits, dim=-1) - math.log(c - k)
    else:
        rest = values[..., -1]
    index_dtype = torch.int16 if c <= torch.iinfo(torch.int16).max else torch.int32
    return {"values": values.half(), "indices": indices.to(index_dtype), "rest": rest.half()}


def expand_topk(values: torch.Tensor, indices: torch.Tensor, rest: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Full float32 logits rebuilt from compress_topk's output."""
    out = rest.float().unsqueeze(-1).expand(*rest.shape, num_classes).clone()
    return out.scatter_(-1, indices.long(), values.float())


class TeacherLogitCache:
    """Teacher logits for each (augmentation draw, sample), float16, optionally top-k, stored on disk.

    `views[d]` is draw d of the whole training set (as augmented_views makes them, per batch); `get(d, idx)`
    returns float32 logits. `hit` says whether they were read from disk rather than computed."""

    def __init__(self, teacher: nn.Module, views: list[torch.Tensor | Images], *, topk: int | None = None,
                 persist: bool = True, directory: Path | None = None, device: torch.device | None = None,
                 compute: bool = True):
        frozen(teacher)
        self.views = views
        self.topk = topk
        self.num_classes = 0
        t0 = time.perf_counter()
        self.key = hash_obj(CACHE_VERSION, {"teacher": model_hash(teacher), "inputs": tensors_hash(views),
                                            "topk": topk, "torch": torch.__version__})
        self.path = (directory or cache_dir() / "teacher-logits") / f"{self.key}.pt" if persist else None
        self.hit = False
        self._full: torch.Tensor | None = None
        self._topk: dict[str, torch.Tensor] | None = None
        if self.path is not None and self.path.is_file() and self._load(self.path):
            self.hit = True
        elif compute:
            self._compute(teacher, device)
            if self.path is not None:
                self.save()
        self.seconds = time.perf_counter() - t0

    def _compute(self, teacher: nn.Module, device: torch.device | None) -> None:
        home = next(iter(teacher.parameters()), torch.empty(0)).device
        if device is not None and device != home:
            teacher.to(device)  # one pass on the training device, then back where the caller keeps it
        try:
            for d, view in enumerate(self.views):  # batch by batch: only the table is held
                for i in range(0, len(view), TEACHER_BATCH):
                    self._store(d, i, teacher_outputs(teacher, view[i:i + TEACHER_BATCH], device=device))
        finally:
            teacher.to(home)

    def _store(self, draw: int, start: int, logits: torch.Tensor) -> None:
        """Write one batch of float32 logits into the table (allocated at the first batch)."""
        rows = slice(start, start + len(logits))
        if self.num_classes == 0:
            self.num_classes = int(logits.shape[-1])
            shape = (len(self.views), len(self.views[0]))
            if self.topk is not None and self.topk < self.num_classes:
                packed = compress_topk(logits[:1], self.topk)
                self._topk = {k: torch.empty((*shape, *v.shape[1:]), dtype=v.dtype) for k, v in packed.items()}
            else:
                self._full = torch.empty((*shape, self.num_classes), dtype=torch.float16)
        if self._topk is not None:
            for k, v in compress_topk(logits, self.topk).items():  # type: ignore[arg-type]
                self._topk[k][draw, rows] = v
        else:
            self._full[draw, rows] = logits.half()  # type: ignore[index]

    def save(self) -> None:
        """Write the table to its path atomically (weights-only loadable tensors)."""
        if self.path is None:
            return
        data = {"full": self._full} if self._full is not None else dict(self._topk or {})
        data["num_classes"] = torch.tensor(self.num_classes)
        with atomic_path(self.path) as tmp:
            torch.save(data, tmp)

    def _load(self, path: Path) -> bool:
        try:
            data = torch.load(path, map_location="cpu", weights_only=True)
            self.num_classes = int(data["num_classes"])
            if "full" in data:
                self._full = data["full"]
                rows = self._full.shape[:2]
            else:
                self._topk = {k: data[k] for k in ("values", "indices", "rest")}
                rows = self._topk["rest"].shape
        except Exception:  # noqa: BLE001 - an unreadable or truncated file is recomputed
            return False
        return tuple(rows) == (len(self.views), len(self.views[0]))

    def to(self, device: torch.device) -> TeacherLogitCache:
        """Move the table to `device` (the training device), so lookups need no copies."""
        if self._full is not None:
            self._full = self._full.to(device)
        if self._topk is not None:
            self._topk = {k: v.to(device) for k, v in self._topk.items()}
        return self

    def get(self, draw: int, idx: torch.Tensor) -> torch.Tensor:
        """Float32 teacher logits of draw `draw` for samples `idx`."""
        if self._full is not None:
            return self._full[draw][idx.to(self._full.device)].float()
        t = self._topk or {}
        i = idx.to(t["rest"].device)
        return expand_topk(t["values"][draw][i], t["indices"][draw][i], t["rest"][draw][i], self.num_classes)

    def all_logits(self, draw: int = 0) -> torch.Tensor:
        """Float32 teacher logits of one draw for every sample."""
        return self.get(draw, torch.arange(len(self.views[draw])))

    def nbytes(self) -> int:
        """Size of the stored table in bytes."""
        tensors = [self._full] if self._full is not None else list((self._topk or {}).values())
        return int(sum(t.numel() * t.element_size() for t in tensors if t is not None))
