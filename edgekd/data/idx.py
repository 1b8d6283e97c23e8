"""IDX files (the MNIST format, optionally gzip-compressed) and the datasets made of four of them:
Fashion-MNIST from Debian's dataset-fashion-mnist package, or any MNIST-format set (data.dataset: idx).
Both keep their official train/test split; the pixels stay uint8 and are preprocessed per batch."""
from __future__ import annotations

import gzip
import math
import struct
import zlib
from pathlib import Path

import numpy as np

from ..config import DataConfig
from ..errors import DataError
from .images import PixelImages

FASHION_MNIST_ROOT = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_PACKAGE = "dataset-fashion-mnist"
FASHION_MNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                         "Ankle boot"]
# data.files key -> the standard file name (read as NAME.gz or NAME)
STANDARD_FILES = {"train_images": "train-images-idx3-ubyte", "train_labels": "train-labels-idx1-ubyte",
                  "test_images": "t10k-images-idx3-ubyte", "test_labels": "t10k-labels-idx1-ubyte"}
IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
GREY_MEAN, GREY_STD = (0.5,), (0.5,)  # pixels in [0, 1] become [-1, 1], as the digits demo's


def read_idx(path: Path) -> np.ndarray:
    """The array stored in an IDX file (gzip-compressed or not: told by its first bytes, not its name)."""
    try:
        with open(path, "rb") as f:
            compressed = f.read(2) == b"\x1f\x8b"
        with (gzip.open(path, "rb") if compressed else open(path, "rb")) as f:
            data = f.read()
    except (OSError, EOFError, zlib.error) as e:
        raise DataError(f"{path}: cannot be read as an IDX file ({type(e).__name__}: {e})") from None
    if len(data) < 4 or data[:2] != b"\x00\x00" or data[2] not in IDX_DTYPES:
        raise DataError(f"{path}: not an IDX file (the first 4 bytes are not an IDX magic number)")
    ndim = data[3]
    header = 4 + 4 * ndim
    if ndim == 0 or len(data) < header:
        raise DataError(f"{path}: IDX header is truncated or names no dimensions")
    dims = struct.unpack(f">{ndim}I", data[4:header])
    dtype = np.dtype(IDX_DTYPES[data[2]])
    expected = math.prod(dims) * dtype.itemsize
    if len(data) - header != expected:
        raise DataError(f"{path}: IDX header says {'x'.join(map(str, dims))} {dtype.name} values ({expected} bytes) "
                        f"but the file holds {len(data) - header} bytes after it")
    a = np.frombuffer(data, dtype, offset=header).reshape(dims)
    return a.astype(dtype.newbyteorder("="))  # a writable, native-order copy


def idx_paths(cfg: DataConfig) -> dict[str, Path]:
    """The four files: data.files entries (relative to data.root), else the standard names in data.root
    (NAME.gz or NAME); for fashion-mnist data.root defaults to the Debian package's folder."""
    fashion = cfg.dataset == "fashion-mnist"
    root = Path(cfg.root) if cfg.root else FASHION_MNIST_ROOT
    given = cfg.files.model_dump() if cfg.files is not None else {}
    paths = {}
    for key, name in STANDARD_FILES.items():
        if given.get(key):
            p = root / given[key]
        else:
            p = next((c for c in (root / f"{name}.gz", root / name) if c.is_file()), root / f"{name}.gz")
        if not p.is_file():
            if fashion:
                raise DataError(f"data: Fashion-MNIST file {p} not found; install the Debian package "
                                f"{FASHION_MNIST_PACKAGE} (apt-get install {FASHION_MNIST_PACKAGE}) or set data.root "
                                "to a folder holding the four files")
            raise DataError(f"data: IDX file {p} (data.files.{key}) not found")
        paths[key] = p
    return paths


def _images(path: Path) -> np.ndarray:
    a = read_idx(path)
    if a.ndim != 3 or a.dtype != np.uint8:
        raise DataError(f"{path}: expected greyscale images (N x H x W unsigned bytes), found "
                        f"{'x'.join(map(str, a.shape))} {a.dtype.name}")
    return a


def _labels(path: Path, count: int, images: Path) -> np.ndarray:
    a = read_idx(path)
    if a.ndim != 1 or not np.issubdtype(a.dtype, np.integer):
        raise DataError(f"{path}: expected one integer label per image, found {'x'.join(map(str, a.shape))} "
                        f"{a.dtype.name}")
    if len(a) != count:
        raise DataError(f"{path}: {len(a)} labels for the {count} images of {images}")
    if len(a) and a.min() < 0:
        raise DataError(f"{path}: labels must be >= 0 (found {int(a.min())})")
    return a.astype(np.int64)


def idx_dataset(cfg: DataConfig) -> tuple[PixelImages, np.ndarray, PixelImages, np.ndarray, list[str], str]:
    """(train images, train labels, test images, test labels, class names, description): each image
    resized to data.image_size, normalised to [-1, 1] and repeated to 3 channels when a batch is made."""
    paths = idx_paths(cfg)
    x_tr, x_te = _images(paths["train_images"]), _images(paths["test_images"])
    y_tr = _labels(paths["train_labels"], len(x_tr), paths["train_images"])
    y_te = _labels(paths["test_labels"], len(x_te), paths["test_images"])
    if x_tr.shape[1:] != x_te.shape[1:]:
        raise DataError(f"{paths['test_images']}: images are {x_te.shape[1]}x{x_te.shape[2]}, the training images "
                        f"{x_tr.shape[1]}x{x_tr.shape[2]}")
    if not len(x_tr) or not len(x_te):
        raise DataError(f"{paths['train_images' if not len(x_tr) else 'test_images']}: holds no images")
    n_classes = int(y_tr.max()) + 1
    if y_te.max() >= n_classes:
        raise DataError(f"{paths['test_labels']}: label {int(y_te.max())} never occurs in the training labels")
    fashion = cfg.dataset == "fashion-mnist" and n_classes == len(FASHION_MNIST_CLASSES)
    classes = FASHION_MNIST_CLASSES if fashion else [str(i) for i in range(n_classes)]
    size = cfg.image_size

    def store(x: np.ndarray) -> PixelImages:
        return PixelImages(x[:, None], size, 3, GREY_MEAN, GREY_STD)

    name = "Fashion-MNIST" if cfg.dataset == "fashion-mnist" else "IDX files"
    desc = (f"{name} ({paths['train_images'].parent}), {len(x_tr)} training and {len(x_te)} test images "
            f"{x_tr.shape[1]}x{x_tr.shape[2]} greyscale, resized to {size}x{size}, 3 channels")
    return store(x_tr), y_tr, store(x_te), y_te, classes, desc
