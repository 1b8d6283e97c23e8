import numpy as np
import pytest

from edgekd.config import DataConfig
from edgekd.data import build_splits, load_npz
from edgekd.errors import DataError
from edgekd.quantize.calibration import iter_npz_batches, npz_shape, stratified_sample


def test_digits_splits_are_stratified_fixed_and_disjoint():
    a = build_splits(DataConfig(), seed=0)
    b = build_splits(DataConfig(), seed=5)
    assert len(a.train) + len(a.val) + len(a.test) == 1797
    assert a.input_shape == (3, 32, 32) and a.num_classes == 10
    # The held-out test set does not move with the run's seed.
    assert np.array_equal(a.test.x.numpy(), b.test.x.numpy())
    counts = np.bincount(a.test.y.numpy(), minlength=10)
    assert counts.min() >= 30  # every class is represented in proportion
    train_rows = {r.tobytes() for r in a.train.x.numpy()[:, 0, ::4, ::4]}
    test_rows = [r.tobytes() for r in a.test.x.numpy()[:, 0, ::4, ::4]]
    assert sum(r in train_rows for r in test_rows) < len(test_rows)


def test_labeled_fraction_masks_labels():
    s = build_splits(DataConfig(labeled_fraction=0.1), seed=0)
    frac = float((s.train.y >= 0).float().mean())
    assert 0.08 < frac < 0.13


def test_calibration_sampling_is_stratified_and_deterministic():
    y = np.repeat(np.arange(10), [50, 50, 50, 50, 50, 50, 50, 50, 50, 100])
    a, b = stratified_sample(y, 110, 0), stratified_sample(y, 110, 0)
    assert np.array_equal(a, b) and len(a) == 110 and len(set(a)) == 110
    per_class = np.bincount(y[a], minlength=10)
    assert per_class[9] == 20 and per_class[:9].tolist() == [10] * 9
    assert not np.array_equal(a, stratified_sample(y, 110, 1))


def test_calibration_size_zero_is_bad_input():
    with pytest.raises(DataError):
        stratified_sample(np.zeros(5, int), 0, 0)


def test_streaming_reader_yields_all_rows_in_bounded_batches(tmp_path):
    x = np.random.default_rng(0).standard_normal((37, 3, 4, 4)).astype(np.float32)
    np.savez(tmp_path / "c.npz", x=x)
    assert npz_shape(tmp_path / "c.npz")[0] == (37, 3, 4, 4)
    batches = list(iter_npz_batches(tmp_path / "c.npz", 8))
    assert [len(b) for b in batches] == [8, 8, 8, 8, 5]
    assert np.array_equal(np.concatenate(batches), x)


@pytest.mark.parametrize("arrays, message", [
    ({"y": np.zeros(3)}, "no array named 'x'"),
    ({"x": np.zeros((0, 3, 4, 4), np.float32)}, "empty"),
    ({"x": np.full((2, 3, 4, 4), np.nan, np.float32)}, "NaN/Inf"),
    ({"x": np.zeros((2, 3, 4, 4), np.int32)}, "dtype int32"),
    ({"x": np.float32(1.0)}, r"shape \(\); expected \(samples"),
    ({"x": np.zeros((2, 3, 4, 4), np.float32), "y": np.eye(3)[[0, 2]]}, r"shape \(2, 3\).*y.argmax\(1\)"),
    ({"x": np.zeros((2, 3, 4, 4), np.float32), "y": np.int64(1)}, r"y has shape \(\)"),
    ({"x": np.zeros((2, 3, 4, 4), np.float32), "y": np.array([0, -1])}, "negative class index"),
])
def test_npz_validation(tmp_path, arrays, message):
    p = tmp_path / "d.npz"
    np.savez(p, **arrays)
    with pytest.raises(DataError, match=message):
        load_npz(p, "calibration data")


def test_npz_labels_of_one_column_count_as_one_index_each(tmp_path):
    np.savez(tmp_path / "d.npz", x=np.zeros((3, 1, 2, 2), np.float32), y=np.array([[2], [0], [1]], np.int32))
    _, y = load_npz(tmp_path / "d.npz", "eval data", need_labels=True)
    assert y.dtype == np.int64 and y.tolist() == [2, 0, 1]
