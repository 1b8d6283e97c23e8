"""Images made on demand from a compact store, indexed like a float32 NCHW tensor: uint8 pixels
(IDX files), image files decoded per batch through a bounded cache (image folders), subsets and
concatenations of those, and the deterministic augmentation draws of a set, made per batch instead
of stored. `x[key]` (an int, a slice or an index array) returns a tensor."""
from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import DataError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
TRANSLATE_PAD = 2  # augmentation: random translation by up to this many pixels


def as_index(key: Any, n: int) -> tuple[torch.Tensor, bool]:
    """`key` (int, slice, bool mask or index array) as a 1-D int64 index, and whether it was a scalar."""
    if isinstance(key, (int, np.integer)):
        i = int(key) + (n if int(key) < 0 else 0)
        if not 0 <= i < n:
            raise IndexError(f"index {int(key)} is out of range for {n} images")
        return torch.tensor([i]), True
    if isinstance(key, slice):
        return torch.arange(n)[key], False
    t = torch.as_tensor(np.asarray(key) if not isinstance(key, torch.Tensor) else key)
    if t.dim() == 0 and t.dtype != torch.bool:
        return as_index(int(t), n)
    if t.dtype == torch.bool:
        return t.nonzero().flatten(), False
    t = t.long().flatten()
    return torch.where(t < 0, t + n, t), False


class Images:
    """Float32 NCHW images made on demand. Subclasses implement `take` (a 1-D index -> a batch) and
    `fingerprint` (a hash that changes whenever the images do)."""

    shape: tuple[int, int, int, int]
    dtype = torch.float32

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, key: Any) -> torch.Tensor:
        idx, scalar = as_index(key, len(self))
        out = self.take(idx)
        return out[0] if scalar else out

    def take(self, idx: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def fingerprint(self) -> str:
        raise NotImplementedError

    def subset(self, idx: Any) -> Images:
        """The images at `idx`, sharing this store."""
        return IndexedImages(self, as_index(idx, len(self))[0])

    def numpy(self, batch: int = 1024) -> np.ndarray:
        """All images as one float32 array (for the held-out splits; training reads batches)."""
        out = np.empty(self.shape, np.float32)
        for i in range(0, len(self), batch):
            out[i:i + batch] = self[i:i + batch].numpy()
        return out


def fingerprint(x: Images | torch.Tensor) -> str:
    """Hash of a set of inputs: Images say it themselves; a tensor is hashed by shape, dtype and bytes."""
    if isinstance(x, Images):
        return x.fingerprint()
    a = np.ascontiguousarray(x.detach().cpu().numpy())
    h = hashlib.sha256(f"{a.shape}{a.dtype}".encode())
    h.update(a.tobytes())
    return h.hexdigest()[:20]


def _hash(*parts: Any) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(p if isinstance(p, bytes) else repr(p).encode())
        h.update(b"\x00")
    return h.hexdigest()[:20]


class PixelImages(Images):
    """uint8 pixels (N, C, H, W) kept as they are; a batch is scaled to [0, 1], resized to `size` x `size`
    (bilinear), normalised per channel with `mean` and `std`, and its channels repeated to `channels`."""

    def __init__(self, pixels: np.ndarray | torch.Tensor, size: int, channels: int,
                 mean: Sequence[float], std: Sequence[float]):
        self.pixels = torch.as_tensor(pixels)
        if self.pixels.dtype != torch.uint8 or self.pixels.dim() != 4:
            raise ValueError("PixelImages takes uint8 pixels shaped (N, C, H, W)")
        self.size, self.channels = size, channels
        self.mean = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
        self.shape = (len(self.pixels), channels, size, size)
        self._fingerprint: str | None = None

    def take(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.pixels[idx].float() / 255.0
        if tuple(x.shape[-2:]) != (self.size, self.size):
            x = torch.nn.functional.interpolate(x, size=(self.size, self.size), mode="bilinear", align_corners=False)
        x = (x - self.mean) / self.std
        if x.shape[1] != self.channels:
            x = x.repeat(1, self.channels // x.shape[1], 1, 1)
        return x.contiguous()

    def fingerprint(self) -> str:
        if self._fingerprint is None:
            self._fingerprint = _hash("pixels", tuple(self.pixels.shape), self.size, self.channels,
                                      self.mean.flatten().tolist(), self.std.flatten().tolist(),
                                      self.pixels.contiguous().numpy().tobytes())
        return self._fingerprint


class DecodedCache:
    """Decoded images (uint8 HWC) by path, at most `max_bytes` of them; the least recently used go first."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max(0, int(max_bytes))
        self.nbytes = 0
        self._items: OrderedDict[Path, np.ndarray] = OrderedDict()

    def __len__(self) -> int:
        return len(self._items)

    def get(self, key: Path) -> np.ndarray | None:
        a = self._items.get(key)
        if a is not None:
            self._items.move_to_end(key)
        return a

    def put(self, key: Path, a: np.ndarray) -> None:
        if a.nbytes > self.max_bytes or key in self._items:
            return
        self._items[key] = a
        self.nbytes += a.nbytes
        while self.nbytes > self.max_bytes:
            self.nbytes -= self._items.popitem(last=False)[1].nbytes


def decode_image(path: Path, size: int) -> np.ndarray:
    """Decode one image, resize its short side to `size` and centre-crop: uint8 HWC RGB."""
    from PIL import Image

    with Image.open(path) as im:
        im = im.convert("RGB")
        w, h = im.size
        s = size / min(w, h)
        im = im.resize((max(size, round(w * s)), max(size, round(h * s))), Image.BILINEAR)
        w, h = im.size
        left, top = (w - size) // 2, (h - size) // 2
        return np.asarray(im.crop((left, top, left + size, top + size)), dtype=np.uint8)


def readable_image(path: Path) -> bool:
    """Whether the file's header names an image format PIL can decode (the pixels are not read)."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            return im.size[0] > 0 and im.size[1] > 0
    except Exception:  # noqa: BLE001 - any decoder failure means the file is unreadable
        return False


class FileImages(Images):
    """Image files decoded per batch (resized, centre-cropped, ImageNet-normalised RGB), the decoded
    pixels kept in a bounded `DecodedCache` shared by every subset of the same folder."""

    def __init__(self, paths: Sequence[Path], size: int, cache: DecodedCache):
        self.paths = [Path(p) for p in paths]
        self.size, self.cache = size, cache
        self.shape = (len(self.paths), 3, size, size)
        self._fingerprint: str | None = None

    def _decoded(self, path: Path) -> np.ndarray:
        a = self.cache.get(path)
        if a is None:
            try:
                a = decode_image(path, self.size)
            except Exception as e:  # noqa: BLE001 - the header was readable, the pixels are not
                raise DataError(f"image {path}: cannot be decoded ({type(e).__name__}); remove or replace it") from None
            self.cache.put(path, a)
        return a

    def take(self, idx: torch.Tensor) -> torch.Tensor:
        out = np.empty((len(idx), self.size, self.size, 3), np.uint8)
        for j, i in enumerate(idx.tolist()):
            out[j] = self._decoded(self.paths[i])
        x = torch.from_numpy(out).permute(0, 3, 1, 2).float() / 255.0
        mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
        return ((x - mean) / torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)).contiguous()

    def subset(self, idx: Any) -> FileImages:
        return FileImages([self.paths[i] for i in as_index(idx, len(self))[0].tolist()], self.size, self.cache)

    def fingerprint(self) -> str:
        """Paths, sizes and modification times (a changed file changes it) and the image size."""
        if self._fingerprint is None:
            stats = []
            for p in self.paths:
                st = p.stat()
                stats.append((str(p), st.st_size, st.st_mtime_ns))
            self._fingerprint = _hash("files", self.size, stats)
        return self._fingerprint


class IndexedImages(Images):
    """The images of `base` at `idx` (a subset sharing the base's store)."""

    def __init__(self, base: Images, idx: torch.Tensor):
        self.base, self.idx = base, idx
        self.shape = (len(idx), *base.shape[1:])  # type: ignore[assignment]

    def take(self, idx: torch.Tensor) -> torch.Tensor:
        return self.base.take(self.idx[idx])

    def fingerprint(self) -> str:
        return _hash("subset", self.base.fingerprint(), self.idx.numpy().tobytes())


class ConcatImages(Images):
    """Several sets of images (tensors or Images of one shape) one after the other."""

    def __init__(self, parts: Sequence[Images | torch.Tensor]):
        self.parts = list(parts)
        self.offsets = np.cumsum([0] + [len(p) for p in self.parts])
        self.shape = (int(self.offsets[-1]), *tuple(self.parts[0].shape[1:]))  # type: ignore[assignment]

    def take(self, idx: torch.Tensor) -> torch.Tensor:
        out = torch.empty((len(idx), *self.shape[1:]), dtype=torch.float32)
        part = torch.as_tensor(np.searchsorted(self.offsets, idx.numpy(), side="right") - 1)
        for k, p in enumerate(self.parts):
            rows = (part == k).nonzero().flatten()
            if len(rows):
                out[rows] = p[idx[rows] - int(self.offsets[k])]
        return out

    def fingerprint(self) -> str:
        return _hash("concat", [fingerprint(p) for p in self.parts])


def translate(x: torch.Tensor, dx: torch.Tensor, dy: torch.Tensor, pad: int = TRANSLATE_PAD) -> torch.Tensor:
    """Each image of `x` shifted by its own offsets in [0, 2 pad] (pad = no shift), replicate padding."""
    n, c, h, w = x.shape
    padded = torch.nn.functional.pad(x, (pad, pad, pad, pad), mode="replicate").flatten(2)
    wide = w + 2 * pad
    window = (torch.arange(h)[:, None] * wide + torch.arange(w)[None, :]).flatten()  # offset (0, 0)
    start = dy.long() * wide + dx.long()
    index = (start[:, None] + window[None, :])[:, None, :].expand(n, c, h * w)
    return padded.gather(2, index).view(n, c, h, w)


class AugmentedView(Images):
    """One augmentation draw of a whole set, made per batch: sample i translated by (dx[i], dy[i]).

    The offsets of every sample are drawn up front from a generator seeded with `seed` (two bytes a
    sample), so the same draw gives the same inputs on every call, to the teacher-logit cache and to
    every training epoch alike."""

    def __init__(self, base: Images | torch.Tensor, seed: int, pad: int = TRANSLATE_PAD):
        g = torch.Generator().manual_seed(seed)
        n = len(base)
        self.base, self.pad, self.seed = base, pad, seed
        self.dx = torch.randint(0, 2 * pad + 1, (n,), generator=g).to(torch.uint8)
        self.dy = torch.randint(0, 2 * pad + 1, (n,), generator=g).to(torch.uint8)
        self.shape = tuple(base.shape)  # type: ignore[assignment]

    def take(self, idx: torch.Tensor) -> torch.Tensor:
        return translate(self.base[idx], self.dx[idx], self.dy[idx], self.pad)

    def fingerprint(self) -> str:
        return _hash("translate", fingerprint(self.base), self.pad, self.dx.numpy().tobytes(),
                     self.dy.numpy().tobytes())
