"""Datasets (the embedded digits demo, image folders, .npz arrays), preprocessing and splits."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from ..config import DataConfig
from ..errors import DataError

SPLIT_SEED = 20240601  # fixed: the held-out test set must not move with the run's seed
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".pgm", ".tif", ".tiff", ".webp")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class ArrayDataset(Dataset):
    """Preprocessed float32 NCHW inputs with int64 labels (-1 marks an unlabeled sample)."""

    def __init__(self, x: np.ndarray, y: np.ndarray):
        self.x = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
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
    from PIL import Image

    with Image.open(path) as im:
        im = im.convert("RGB")
        w, h = im.size
        s = image_size / min(w, h)
        im = im.resize((max(image_size, round(w * s)), max(image_size, round(h * s))), Image.BILINEAR)
        w, h = im.size
        left, top = (w - image_size) // 2, (h - image_size) // 2
        im = im.crop((left, top, left + image_size, top + image_size))
        a = np.asarray(im, dtype=np.float32) / 255.0
    a = (a - np.array(IMAGENET_MEAN, np.float32)) / np.array(IMAGENET_STD, np.float32)
    return a.transpose(2, 0, 1).copy()


def imagefolder_arrays(root: Path, image_size: int) -> tuple[np.ndarray, np.ndarray, list[str], list[str]]:
    """Read ROOT/CLASS/*.jpg into arrays; unreadable images are skipped and listed."""
    if not root.is_dir():
        raise DataError(f"data.root {root} does not exist or is not a folder")
    items, classes = _list_images(root)
    xs, ys, skipped = [], [], []
    for f, c in items:
        try:
            xs.append(load_image(f, image_size))
            ys.append(c)
        except Exception:  # noqa: BLE001 - any decoder failure means the file is unreadable
            skipped.append(str(f))
    if not xs:
        raise DataError(f"data.root {root}: none of the {len(items)} images could be read")
    return np.stack(xs), np.asarray(ys, np.int64), classes, skipped


def unlabeled_arrays(root: Path, image_size: int) -> tuple[np.ndarray, list[str]]:
    """Read every image under `root` (any depth) as an unlabeled transfer set."""
    if not root.is_dir():
        raise DataError(f"data.unlabeled_root {root} does not exist or is not a folder")
    files = sorted(f for f in root.rglob("*") if f.suffix.lower() in IMAGE_EXTENSIONS and f.is_file())
    xs, skipped = [], []
    for f in files:
        try:
            xs.append(load_image(f, image_size))
        except Exception:  # noqa: BLE001
            skipped.append(str(f))
    if not xs:
        raise DataError(f"data.unlabeled_root {root}: no readable images")
    return np.stack(xs), skipped


def build_splits(cfg: DataConfig, seed: int = 0) -> Splits:
    """Load the configured dataset and split it (stratified, fixed split seed)."""
    skipped: list[str] = []
    if cfg.dataset == "digits":
        x, y = digits_arrays(cfg.image_size)
        classes = [str(i) for i in range(10)]
        desc = f"scikit-learn digits, {len(y)} images upsampled to {cfg.image_size}x{cfg.image_size} RGB"
    else:
        root = Path(cfg.root or "")
        x, y, classes, skipped = imagefolder_arrays(root, cfg.image_size)
        desc = f"image folder {root}, {len(y)} images, {len(classes)} classes"
    counts = np.bincount(y, minlength=len(classes))
    if (counts < 3).any():
        thin = [classes[i] for i in np.flatnonzero(counts < 3)]
        raise DataError(f"data: class(es) {', '.join(thin)} have fewer than 3 images; cannot split")
    tr, va, te = _stratified_split(y, cfg.val_fraction, cfg.test_fraction)
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
        ux, uskipped = unlabeled_arrays(Path(cfg.unlabeled_root), cfg.image_size)
        skipped += uskipped
        unlabeled = ArrayDataset(ux, np.full(len(ux), -1, np.int64))
    return Splits(
        train=ArrayDataset(x[tr], y_train), val=ArrayDataset(x[va], y[va]), test=ArrayDataset(x[te], y[te]),
        num_classes=len(classes), class_names=classes, input_shape=tuple(x.shape[1:]),  # type: ignore[arg-type]
        description=desc, skipped_files=skipped, unlabeled=unlabeled,
    )


def augment_batch(x: torch.Tensor, generator: torch.Generator, pad: int = 2) -> torch.Tensor:
    """Random translation by up to `pad` pixels (replicate padding), per sample."""
    n, _, h, w = x.shape
    padded = torch.nn.functional.pad(x, (pad, pad, pad, pad), mode="replicate")
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=generator)
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=generator)
    out = torch.empty_like(x)
    for i in range(n):
        out[i] = padded[i, :, dy[i]:dy[i] + h, dx[i]:dx[i] + w]
    return out


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
            x = z["x"]
            y = z["y"] if "y" in files else None
    except DataError:
        raise
    except Exception as e:  # noqa: BLE001 - numpy raises many kinds for a corrupt file
        raise DataError(f"{what} {p}: not a readable .npz file ({type(e).__name__})") from None
    if x.size == 0 or len(x) == 0:
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
        if len(y) != len(x):
            raise DataError(f"{what} {p}: 'y' has {len(y)} labels for {len(x)} inputs")
        if not np.issubdtype(y.dtype, np.integer):
            raise DataError(f"{what} {p}: array 'y' has dtype {y.dtype}; expected integer labels")
        y = y.astype(np.int64)
    return x, y


def transfer_set(splits: Splits) -> ArrayDataset:
    """What distillation trains on: the training split (unlabeled samples carry -1) plus data.unlabeled_root."""
    if splits.unlabeled is None or len(splits.unlabeled) == 0:
        return splits.train
    x = torch.cat([splits.train.x, splits.unlabeled.x]).numpy()
    y = torch.cat([splits.train.y, splits.unlabeled.y]).numpy()
    return ArrayDataset(x, y)
