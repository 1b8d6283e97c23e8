"""IDX files (the MNIST format) and the datasets built on them: generic idx and Fashion-MNIST."""
from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest

from edgekd.cli import main
from edgekd.config import DataConfig
from edgekd.data import build_splits
from edgekd.data.idx import FASHION_MNIST_CLASSES, FASHION_MNIST_PACKAGE, FASHION_MNIST_ROOT, read_idx
from edgekd.errors import DataError

CODES = {np.dtype(np.uint8): 0x08, np.dtype(np.int8): 0x09, np.dtype(">i4"): 0x0C, np.dtype(">f4"): 0x0D}


def write_idx(path: Path, a: np.ndarray, compress: bool = True) -> Path:
    """A real IDX file: magic (0, 0, dtype code, ndim), big-endian dimensions, big-endian data."""
    a = a.astype(a.dtype.newbyteorder(">")) if a.dtype.itemsize > 1 else a
    raw = bytes([0, 0, CODES[a.dtype], a.ndim]) + struct.pack(f">{a.ndim}I", *a.shape) + a.tobytes()
    path.write_bytes(gzip.compress(raw) if compress else raw)
    return path


def make_set(root: Path, n_train: int = 120, n_test: int = 40, classes: int = 4, size: int = 28,
             names: dict[str, str] | None = None) -> dict[str, np.ndarray]:
    """Four IDX files under `root` whose pixels encode their label (class c is a bright band at row 4c)."""
    rng = np.random.default_rng(0)
    arrays = {}
    for split, n in (("train", n_train), ("t10k", n_test)):
        y = (np.arange(n) % classes).astype(np.uint8)
        x = rng.integers(0, 40, (n, size, size), dtype=np.uint8)
        for i, c in enumerate(y):
            x[i, 4 * c:4 * c + 3] = 250
        arrays[f"{split}-images"], arrays[f"{split}-labels"] = x, y
    root.mkdir(parents=True, exist_ok=True)
    names = names or {}
    write_idx(root / names.get("train_images", "train-images-idx3-ubyte.gz"), arrays["train-images"])
    write_idx(root / names.get("train_labels", "train-labels-idx1-ubyte.gz"), arrays["train-labels"])
    write_idx(root / names.get("test_images", "t10k-images-idx3-ubyte.gz"), arrays["t10k-images"])
    write_idx(root / names.get("test_labels", "t10k-labels-idx1-ubyte.gz"), arrays["t10k-labels"])
    return arrays


@pytest.mark.parametrize("compress", [True, False])
@pytest.mark.parametrize("dtype", ["uint8", "int8", ">i4", ">f4"])
def test_read_idx_round_trips_gzip_and_plain_files(tmp_path, compress, dtype):
    a = (np.arange(2 * 3 * 5) - 7).reshape(2, 3, 5).astype(dtype) if dtype != "uint8" else \
        np.arange(30, dtype=np.uint8).reshape(2, 3, 5)
    got = read_idx(write_idx(tmp_path / "a.idx", a, compress))
    assert got.shape == (2, 3, 5) and got.dtype == a.dtype.newbyteorder("=")
    assert np.array_equal(got, a)


@pytest.mark.parametrize("content, message", [
    (b"\x00\x00\x08", "not an IDX file"),
    (b"\x01\x02\x08\x01\x00\x00\x00\x02ab", "not an IDX file"),
    (b"\x00\x00\x08\x01\x00\x00\x00\x05abc", "says 5 uint8 values"),
    (b"\x00\x00\x08\x03\x00\x00", "truncated"),
])
def test_malformed_idx_files_are_data_errors_naming_the_file(tmp_path, content, message):
    p = tmp_path / "bad-idx3-ubyte.gz"
    p.write_bytes(gzip.compress(content))
    with pytest.raises(DataError, match=message) as e:
        read_idx(p)
    assert str(p) in str(e.value)


def test_a_truncated_gzip_file_is_a_data_error(tmp_path):
    p = tmp_path / "cut.gz"
    p.write_bytes(gzip.compress(b"\x00\x00\x08\x01\x00\x00\x00\x10" + bytes(16))[:12])
    with pytest.raises(DataError, match="cut.gz"):
        read_idx(p)


def test_idx_dataset_keeps_the_official_split_and_carves_a_stratified_validation_split(tmp_path):
    arrays = make_set(tmp_path / "set")
    cfg = DataConfig(dataset="idx", root=str(tmp_path / "set"), image_size=32, val_fraction=0.25)
    s = build_splits(cfg, seed=0)
    assert (len(s.train), len(s.val), len(s.test)) == (90, 30, 40)
    assert s.input_shape == (3, 32, 32) and s.num_classes == 4 and s.class_names == ["0", "1", "2", "3"]
    assert sorted(np.bincount(s.val.y.numpy()).tolist()) == [7, 7, 8, 8]  # stratified: 30 of 4 x 30
    assert np.array_equal(s.test.y.numpy(), arrays["t10k-labels"])  # the test file, in order
    x = s.test.x.numpy()
    assert x.shape == (40, 3, 32, 32) and x.dtype == np.float32
    assert x.min() >= -1.0 and x.max() <= 1.0  # [0, 255] -> [-1, 1]
    assert np.array_equal(x[:, 0], x[:, 1]) and np.array_equal(x[:, 0], x[:, 2])  # greyscale repeated
    # the same split whatever the run's seed; training and validation images never overlap
    again = build_splits(cfg, seed=7)
    assert np.array_equal(again.val.x.numpy(), s.val.x.numpy())
    train_rows = {r.tobytes() for r in s.train.x.numpy()}
    assert not any(r.tobytes() in train_rows for r in s.val.x.numpy())


def test_idx_images_at_their_own_size_are_the_pixels_scaled(tmp_path):
    arrays = make_set(tmp_path / "set", size=28)
    s = build_splits(DataConfig(dataset="idx", root=str(tmp_path / "set"), image_size=28), seed=0)
    expected = arrays["t10k-images"].astype(np.float32) / 255.0 * 2 - 1
    assert np.allclose(s.test.x.numpy()[:, 0], expected, atol=1e-6)
    assert s.train.x.base.pixels.dtype.is_floating_point is False  # stored as uint8


def test_data_files_name_other_files_relative_to_the_root(tmp_path):
    names = {"train_images": "a.gz", "train_labels": "b.gz", "test_images": "c.gz", "test_labels": "sub/d.gz"}
    (tmp_path / "set" / "sub").mkdir(parents=True)
    make_set(tmp_path / "set", names=names)
    s = build_splits(DataConfig(dataset="idx", root=str(tmp_path / "set"), files=names), seed=0)
    assert len(s.test) == 40 and len(s.train) + len(s.val) == 120


def test_a_missing_idx_file_names_its_key_and_path(tmp_path):
    make_set(tmp_path / "set")
    (tmp_path / "set" / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(DataError, match="t10k-labels-idx1-ubyte.gz.*data.files.test_labels"):
        build_splits(DataConfig(dataset="idx", root=str(tmp_path / "set")), seed=0)


def test_labels_that_do_not_match_the_images_are_a_data_error(tmp_path):
    make_set(tmp_path / "set")
    write_idx(tmp_path / "set" / "train-labels-idx1-ubyte.gz", np.zeros(7, np.uint8))
    with pytest.raises(DataError, match="7 labels for the 120 images"):
        build_splits(DataConfig(dataset="idx", root=str(tmp_path / "set")), seed=0)


def test_missing_fashion_mnist_is_exit_2_with_one_line_naming_package_and_path(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"data: {{dataset: fashion-mnist, root: {tmp_path / 'nowhere'}}}\n")
    code = main(["compress", "--config", str(cfg), "--out", str(tmp_path / "run"), "--quiet"])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1
    assert FASHION_MNIST_PACKAGE in err and str(tmp_path / "nowhere" / "train-images-idx3-ubyte.gz") in err
    assert not (tmp_path / "run" / "report.json").exists()


FASHION_FILES = [FASHION_MNIST_ROOT / f"{n}.gz" for n in
                 ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
                  "t10k-labels-idx1-ubyte")]


@pytest.mark.skipif(not all(p.is_file() for p in FASHION_FILES),
                    reason=f"Debian package {FASHION_MNIST_PACKAGE} not installed (tools/system_deps.sh installs it)")
def test_fashion_mnist_from_the_debian_package():
    s = build_splits(DataConfig(dataset="fashion-mnist", image_size=28, val_fraction=0.1), seed=0)
    assert (len(s.train), len(s.val), len(s.test)) == (54000, 6000, 10000)
    assert s.class_names == FASHION_MNIST_CLASSES and s.input_shape == (3, 28, 28)
    assert np.bincount(s.test.y.numpy()).tolist() == [1000] * 10
    assert np.bincount(s.val.y.numpy()).tolist() == [600] * 10  # stratified
    assert s.train.x.base.pixels.numel() == 60000 * 28 * 28  # one uint8 copy, shared by train and val
    batch = s.train.x[np.arange(0, 54000, 5400)]
    assert batch.shape == (10, 3, 28, 28) and -1.0 <= float(batch.min()) < float(batch.max()) <= 1.0
