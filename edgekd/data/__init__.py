"""Datasets (the embedded digits demo, Fashion-MNIST and other IDX files, image folders, .npz arrays),
preprocessing and splits. Small sets are float32 tensors; large ones stay compact (uint8 pixels, or
image files decoded per batch) and make their float32 inputs per batch (images.py)."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from ..bench.eval_data import EvalDataError, labels
from ..config import DataConfig
from ..errors import DataError
from .idx import idx_dataset
from .images import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    ConcatImages,
    DecodedCache,
    FileImages,
    Images,
    decode_image,
    readable_image,
    translate,
)

SPLIT_SEED = 20240601  # fixed: the held-out test set must not move with the run's seed
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".pgm", ".tif", ".tiff", ".webp")
UNIT_RANGE_DATASETS = ("digits", "fashion-mnist", "idx")  # normalised to [-1, 1]; image folders: ImageNet's

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "SPLIT_SEED", "UNIT_RANGE_DATASETS", "ArrayDataset", "Images", "Splits",
           "augment_batch", "build_splits", "digits_arrays", "load_image", "load_npz", "shared_rows", "transfer_set"]


class ArrayDataset(Dataset):
    """Preprocessed float32 NCHW inputs with int64 labels (-1 marks an unlabeled sample). `x` is a
    tensor, or for large sets `Images` that make each batch on demand (indexed the same way)."""

    def __init__(self, x: np.ndarray | Images, y: np.ndarray):
        self.x = x if isinstance(x, Images) else torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
        self.y = torch.from_numpy(np.asarray(y, dtype=np.int64))

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.x[i], self.y[i]


@dataclass
class Splits:
    """Train/val/test splits of one dataset, with what the rest of the pipeline needs to know."""

    train: ArrayDataset
    val: ArrayDataset
    test: ArrayDataset
    num_classes: int
    class_names: list[str]
    input_shape: tuple[int, int, int]
    description: str
    skipped_files: list[str] = field(default_factory=list)
    unlabeled: ArrayDataset | None = None


def _stratified_split(y: np.ndarray, val_fraction: float, test_fraction: float) -> tuple[np.ndarray, ...]:
    from sklearn.model_selection import train_test_split

    idx = np.arange(len(y))
    rest, test = train_test_split(idx, test_size=test_fraction, stratify=y, random_state=SPLIT_SEED)
    rel_val = val_fraction / (1 - test_fraction)
    train, val = train_test_split(rest, test_size=rel_val, stratify=y[rest], random_state=SPLIT_SEED)
    return np.sort(train), np.sort(val), np.sort(test)


def digits_arrays(image_size: int) -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's bundled 8x8 digits, upsampled to image_size, 3 channels, normalised to [-1, 1]."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.from_numpy(d.images.astype(np.float32) / 16.0).unsqueeze(1)
    x = torch.nn.functional.interpolate(x, size=(image_size, image_size), mode="bilinear", align_corners=False)
    x = ((x - 0.5) / 0.5).repeat(1, 3, 1, 1)
    return x.numpy().astype(np.float32), d.target.astype(np.int64)


def _list_images(root: Path) -> tuple[list[tuple[Path, int]], list[str]]:
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise DataError(f"data.root {root}: no class folders (expected ROOT/CLASS/image.jpg)")
    items = []
    for ci, c in enumerate(classes):
        for f in sorted((root / c).rglob("*")):
            if f.suffix.lower() in IMAGE_EXTENSIONS and f.is_file():
                items.append((f, ci))
    if not items:
        raise DataError(f"data.root {root}: class folders hold no images ({', '.join(IMAGE_EXTENSIONS)})")
    return items, classes


def load_image(path: Path, image_size: int) -> np.ndarray:
    """Decode, resize the short side, centre-crop and normalise one image to float32 CHW."""
    a = decode_image(path, image_size).astype(np.float32) / 255.0
    a = (a - np.array(IMAGENET_MEAN, np.float32)) / np.array(IMAGENET_STD, np.float32)
    return a.transpose(2, 0, 1).copy()


def imagefolder_images(root: Path, image_size: int, cache: DecodedCache
                       ) -> tuple[FileImages, np.ndarray, list[str], list[str]]:
    """ROOT/CLASS/*.jpg as images decoded per batch; files whose header no decoder reads are skipped
    and listed (the pixels are read only when a batch needs them)."""
    if not root.is_dir():
        raise DataError(f"data.root {root} does not exist or is not a folder")
    items, classes = _list_images(root)
    paths, ys, skipped = [], [], []
    for f, c in items:
        if readable_image(f):
            paths.append(f)
            ys.append(c)
        else:
            skipped.append(str(f))
    if not paths:
        raise DataError(f"data.root {root}: none of the {len(items)} images could be read")
    return FileImages(paths, image_size, cache), np.asarray(ys, np.int64), classes, skipped


def unlabeled_images(root: Path, image_size: int, cache: DecodedCache) -> tuple[FileImages, list[str]]:
    """Every image under `root` (any depth) as an unlabeled transfer set, decoded per batch."""
    if not root.is_dir():
        raise DataError(f"data.unlabeled_root {root} does not exist or is not a folder")
    files = sorted(f for f in root.rglob("*") if f.suffix.lower() in IMAGE_EXTENSIONS and f.is_file())
    paths = [f for f in files if readable_image(f)]
    if not paths:
        raise DataError(f"data.unlabeled_root {root}: no readable images")
    return FileImages(paths, image_size, cache), sorted(set(map(str, files)) - set(map(str, paths)))


def _take(x: np.ndarray | Images, idx: np.ndarray) -> np.ndarray | Images:
    return x.subset(idx) if isinstance(x, Images) else x[idx]


def _enough_per_class(y: np.ndarray, classes: list[str], need: int) -> None:
    if len(classes) < 2:
        raise DataError(f"data: one class ({', '.join(classes)}); a classifier needs images of at least 2 classes")
    counts = np.bincount(y, minlength=len(classes))
    if (counts < need).any():
        thin = [classes[i] for i in np.flatnonzero(counts < need)]
        raise DataError(f"data: class(es) {', '.join(thin)} have fewer than {need} images; cannot split")


def build_splits(cfg: DataConfig, seed: int = 0) -> Splits:
    """Load the configured dataset and split it, stratified with a fixed split seed. The digits demo and
    image folders are split into train/val/test (data.val_fraction, data.test_fraction); IDX sets
    (fashion-mnist, idx) keep their official test set and carve the validation split from their
    training set (data.val_fraction)."""
    skipped: list[str] = []
    cache = DecodedCache(int(cfg.decoded_cache_mb * 2**20))
    if cfg.dataset in ("fashion-mnist", "idx"):
        x, y, x_te, y_te, classes, desc = idx_dataset(cfg)
        _enough_per_class(y, classes, 2)
        from sklearn.model_selection import train_test_split

        tr, va = (np.sort(a) for a in train_test_split(np.arange(len(y)), test_size=cfg.val_fraction, stratify=y,
                                                         random_state=SPLIT_SEED))
    else:
        if cfg.dataset == "digits":
            x, y = digits_arrays(cfg.image_size)
            classes = [str(i) for i in range(10)]
            desc = f"scikit-learn digits, {len(y)} images upsampled to {cfg.image_size}x{cfg.image_size} RGB"
        else:
            root = Path(cfg.root or "")
            x, y, classes, skipped = imagefolder_images(root, cfg.image_size, cache)
            desc = f"image folder {root}, {len(y)} images, {len(classes)} classes, decoded per batch"
        _enough_per_class(y, classes, 3)
        tr, va, te = _stratified_split(y, cfg.val_fraction, cfg.test_fraction)
        x_te, y_te = _take(x, te), y[te]
    y_train = y[tr].copy()
    if cfg.labeled_fraction < 1.0:
        rng = np.random.default_rng(seed)
        keep = np.zeros(len(tr), bool)
        for c in range(len(classes)):
            ids = np.flatnonzero(y_train == c)
            n = max(1, round(len(ids) * cfg.labeled_fraction))
            keep[rng.choice(ids, n, replace=False)] = True
        y_train[~keep] = -1
    unlabeled = None
    if cfg.unlabeled_root:
        ux, uskipped = unlabeled_images(Path(cfg.unlabeled_root), cfg.image_size, cache)
        skipped += uskipped
        unlabeled = ArrayDataset(ux, np.full(len(ux), -1, np.int64))
    x_tr = _take(x, tr)
    return Splits(
        train=ArrayDataset(x_tr, y_train), val=ArrayDataset(_take(x, va), y[va]), test=ArrayDataset(x_te, y_te),
        num_classes=len(classes), class_names=classes, input_shape=tuple(x_tr.shape[1:]),  # type: ignore[arg-type]
        description=desc, skipped_files=skipped, unlabeled=unlabeled,
    )


def augment_batch(x: torch.Tensor, generator: torch.Generator, pad: int = 2) -> torch.Tensor:
    """Random translation by up to `pad` pixels (replicate padding), per sample."""
    n = len(x)
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=generator)
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=generator)
    return translate(x, dx, dy, pad)


def load_npz(path: str | Path, what: str, need_labels: bool = False) -> tuple[np.ndarray, np.ndarray | None]:
    """Load and check a calibration or eval .npz: array `x` (float, finite, non-empty), `y` if labelled."""
    p = Path(path)
    if not p.is_file():
        raise DataError(f"{what} {p} does not exist")
    try:
        with np.load(p, allow_pickle=False) as z:
            files = set(z.files)
            if "x" not in files:
                raise DataError(f"{what} {p}: no array named 'x' (has: {', '.join(sorted(files)) or 'none'})")
            unread = sorted(files - {"x", "y"})
            if unread:
                raise DataError(f"{what} {p}: holds arrays edgekd does not read ({', '.join(unread)}); it reads x (the "
                                "inputs) and y (the labels)")
            x = z["x"]
            y = z["y"] if "y" in files else None
    except DataError:
        raise
    except Exception as e:  # noqa: BLE001 - numpy raises many kinds for a corrupt file
        raise DataError(f"{what} {p}: not a readable .npz file ({type(e).__name__})") from None
    if x.ndim < 2:
        raise DataError(f"{what} {p}: array 'x' has shape {x.shape}; expected (samples, channels, height, width)")
    if x.size == 0:
        raise DataError(f"{what} {p}: array 'x' is empty")
    if not np.issubdtype(x.dtype, np.floating):
        raise DataError(f"{what} {p}: array 'x' has dtype {x.dtype}; expected float32")
    if not np.isfinite(x).all():
        bad = int((~np.isfinite(x)).sum())
        raise DataError(f"{what} {p}: array 'x' holds {bad} NaN/Inf value(s)")
    x = x.astype(np.float32, copy=False)
    if need_labels and y is None:
        raise DataError(f"{what} {p}: no array named 'y' (labels)")
    if y is not None:
        try:  # the board runners' own check: one reading of what a label is
            y = labels(y, len(x), f"{what} {p}")
        except EvalDataError as e:
            raise DataError(str(e)) from None
    return x, y


def shared_rows(a: np.ndarray, b: np.ndarray) -> int:
    """How many rows of `b` are also rows of `a` (byte for byte)."""
    seen = {row.tobytes() for row in np.ascontiguousarray(a).reshape(len(a), -1)}
    return sum(row.tobytes() in seen for row in np.ascontiguousarray(b).reshape(len(b), -1))


def transfer_set(splits: Splits) -> ArrayDataset:
    """What distillation trains on: the training split (unlabeled samples carry -1) plus data.unlabeled_root."""
    if splits.unlabeled is None or len(splits.unlabeled) == 0:
        return splits.train
    parts = [splits.train.x, splits.unlabeled.x]
    y = torch.cat([splits.train.y, splits.unlabeled.y]).numpy()
    if all(isinstance(p, torch.Tensor) for p in parts):
        return ArrayDataset(torch.cat(parts).numpy(), y)  # type: ignore[arg-type]
    return ArrayDataset(ConcatImages(parts), y)
