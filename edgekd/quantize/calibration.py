"""Calibration sets: deterministic class-stratified sampling from training data, streaming readers."""
from __future__ import annotations

import zipfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from ..errors import DataError


def stratified_sample(labels: np.ndarray, n: int, seed: int) -> np.ndarray:
    """Indices of `n` samples spread over classes in proportion to their counts (deterministic in seed).

    Unlabeled samples (label -1) form their own stratum. Returns sorted indices."""
    if n <= 0:
        raise DataError("quantize.calibration_samples must be at least 1")
    n = min(n, len(labels))
    rng = np.random.default_rng(seed)
    classes, counts = np.unique(labels, return_counts=True)
    quota = np.floor(counts / counts.sum() * n).astype(int)
    # Hand out the remainder to the classes with the largest fractional share, then by class id.
    frac = counts / counts.sum() * n - quota
    for i in np.argsort(-frac, kind="stable")[: n - quota.sum()]:
        quota[i] += 1
    chosen = []
    for c, q in zip(classes, quota, strict=True):
        ids = np.flatnonzero(labels == c)
        chosen.append(rng.choice(ids, min(q, len(ids)), replace=False))
    return np.sort(np.concatenate(chosen))


def _npy_member(zf: zipfile.ZipFile, key: str) -> zipfile.ZipInfo:
    name = f"{key}.npy"
    try:
        return zf.getinfo(name)
    except KeyError:
        raise DataError(f"{zf.filename}: no array named {key!r}") from None


def _read_header(f, version: tuple[int, int]):
    fmt = np.lib.format
    if version == (1, 0):
        return fmt.read_array_header_1_0(f)
    return fmt.read_array_header_2_0(f)


def npz_shape(path: str | Path, key: str = "x") -> tuple[tuple[int, ...], np.dtype]:
    """Shape and dtype of one array in a .npz, read from its header only."""
    with zipfile.ZipFile(path) as zf, zf.open(_npy_member(zf, key)) as f:
        version = np.lib.format.read_magic(f)
        shape, _, dtype = _read_header(f, version)
    return tuple(shape), np.dtype(dtype)


def iter_npz_batches(path: str | Path, batch_size: int, key: str = "x") -> Iterator[np.ndarray]:
    """Stream rows of array `key` from a .npz in batches, holding one batch in memory at a time."""
    with zipfile.ZipFile(path) as zf, zf.open(_npy_member(zf, key)) as f:
        version = np.lib.format.read_magic(f)
        shape, fortran, dtype = _read_header(f, version)
        if fortran:
            raise DataError(f"{path}: array {key!r} is Fortran-ordered; save it C-ordered")
        dtype = np.dtype(dtype)
        row = int(np.prod(shape[1:], dtype=np.int64)) * dtype.itemsize
        for start in range(0, shape[0], batch_size):
            n = min(batch_size, shape[0] - start)
            buf = f.read(row * n)
            if len(buf) != row * n:
                raise DataError(f"{path}: array {key!r} is truncated")
            yield np.frombuffer(buf, dtype=dtype).reshape((n, *shape[1:])).astype(np.float32)


class NpzCalibrationReader:
    """onnxruntime CalibrationDataReader over a .npz, streamed batch by batch.

    With `max_batches`, get_next() ends after that many batches although rows remain; `exhausted`
    tells the two apart, so a calibrator can be fed chunk by chunk (see ptq.calibrate)."""

    def __init__(self, path: str | Path, input_name: str, batch_size: int = 16, on_batch=None,
                 max_batches: int | None = None):
        self.path, self.input_name, self.batch_size = Path(path), input_name, batch_size
        self._it: Iterator[np.ndarray] | None = None
        self._next: np.ndarray | None = None
        self.on_batch = on_batch
        self.max_batches = max_batches
        self._given = 0
        self.exhausted = False

    def _peek(self) -> np.ndarray | None:
        if self._it is None:
            self._it = iter_npz_batches(self.path, self.batch_size)
        if self._next is None and not self.exhausted:
            self._next = next(self._it, None)
            self.exhausted = self._next is None
        return self._next

    def get_next(self) -> dict[str, np.ndarray] | None:
        """The next batch as {input name: array}, or None at the end of the data or of the chunk."""
        if self.max_batches is not None and self._given >= self.max_batches:
            return None
        batch = self._peek()
        if batch is None:
            return None
        self._next = None
        self._given += 1
        if self.on_batch:
            self.on_batch(len(batch))
        return {self.input_name: batch}

    def next_chunk(self) -> bool:
        """Start the next chunk of `max_batches`; False when no rows remain."""
        self._given = 0
        return self._peek() is not None

    def rewind(self) -> None:
        """Start again from the first row."""
        self._it, self._next, self._given, self.exhausted = None, None, 0, False


def calibration_plan(bytes_per_sample: int, memory_mb: float, batch_size: int = 16) -> tuple[int, int]:
    """(batch size, batches held at once) so that the intermediate outputs a calibrator keeps stay
    within `memory_mb`: histogram calibrators hold every output of a chunk before binning it."""
    budget = max(1, int(memory_mb * 2**20))
    per_sample = max(1, int(bytes_per_sample))
    batch = max(1, min(batch_size, budget // per_sample))
    return batch, max(1, budget // (per_sample * batch))
