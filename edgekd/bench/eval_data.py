"""Eval data as the board runners read it: an .npz with x (samples first) and optionally y, one class index
per sample. It travels beside runner.py and the Jetson bundle's trt_runner.py, so it needs numpy alone and
stays importable on Python 3.8; what is wrong with the data raises EvalDataError with the line to show,
which each runner turns into its own exit 2.
"""
from __future__ import annotations

import zipfile

import numpy as np


class EvalDataError(ValueError):
    """Eval data that cannot be scored: the message names what is wrong and how to fix it."""


def _first_line(e: BaseException) -> str:
    text = str(e).strip() or type(e).__name__
    return text.splitlines()[0][:300]


def npz_shape(path: str, key: str = "x") -> tuple:
    """The shape of array `key` in an .npz, read from its header without loading the data."""
    try:
        with zipfile.ZipFile(path) as z, z.open(key + ".npy") as f:
            version = np.lib.format.read_magic(f)
            reader = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            return tuple(reader(f)[0])
    except (OSError, KeyError, ValueError, zipfile.BadZipFile) as e:
        raise EvalDataError(f"eval data {path}: cannot read array {key!r} ({_first_line(e)})") from None


def load_eval(path: str) -> tuple:
    """(x, y as int64 class indices or None) from an .npz holding x and optionally y."""
    try:
        with np.load(path, allow_pickle=False) as z:
            x = np.asarray(z["x"])
            y = np.asarray(z["y"]) if "y" in z.files else None
    except (OSError, KeyError, ValueError, zipfile.BadZipFile) as e:
        raise EvalDataError(f"eval data {path}: {_first_line(e)}") from None
    if x.ndim < 2 or len(x) == 0:
        raise EvalDataError(f"eval data {path}: x must hold at least one sample, got shape {x.shape}")
    return x, (None if y is None else labels(y, len(x), f"eval data {path}"))


def labels(y: np.ndarray, n: int, where: str) -> np.ndarray:
    """`y` as one int64 class index per sample of x; anything else is named with its shape or values."""
    if y.ndim == 2 and y.shape[1] == 1:
        y = y[:, 0]
    if y.ndim != 1 or len(y) != n:
        hint = "; one-hot labels: save y.argmax(1)" if y.ndim == 2 and len(y) == n else ""
        raise EvalDataError(f"{where}: y has shape {y.shape}; expected one class index per sample of x, ({n},){hint}")
    if not (np.issubdtype(y.dtype, np.integer) or (np.issubdtype(y.dtype, np.floating) and
                                                   np.array_equal(y, np.round(y)))):
        raise EvalDataError(f"{where}: y has dtype {y.dtype} with values that are not class indices")
    y = y.astype(np.int64)
    if n and y.min() < 0:
        raise EvalDataError(f"{where}: y holds a negative class index ({int(y.min())})")
    return y


def class_scores(out: np.ndarray) -> tuple:
    """(out as (batch, classes), None), or (None, why not): a (batch, classes, 1, 1) conv head counts. Not an
    error by itself: without labels a model of other outputs is still timed."""
    if out.ndim > 2 and all(d == 1 for d in out.shape[2:]):
        out = out.reshape(out.shape[:2])
    if out.ndim != 2 or out.shape[1] < 2:
        return None, f"the model's first output has shape {list(out.shape)}, not class scores (batch, classes)"
    return out, None


def check_classes(y: np.ndarray | None, classes: int, where: str) -> None:
    """Labels `y` must index the model's `classes` scores."""
    if y is not None and len(y) and y.max() >= classes:
        raise EvalDataError(f"{where}: y holds class {int(y.max())} but the model scores {classes} classes "
                            f"(0..{classes - 1})")
