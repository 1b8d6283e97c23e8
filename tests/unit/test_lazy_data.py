"""Bounded memory: augmentation draws made per batch (deterministic, equal across calls and to the
whole-set draw), teacher logits filled batch by batch, image folders decoded per batch through a
bounded cache."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from edgekd.config import DataConfig
from edgekd.data import ArrayDataset, augment_batch, build_splits, load_image, transfer_set
from edgekd.data.images import AugmentedView, PixelImages
from edgekd.distill.cache import TEACHER_BATCH, TeacherLogitCache, compress_topk
from edgekd.distill.trainer import augmented_views, train
from edgekd.errors import DataError


def _pixels(n: int = 50, size: int = 10) -> PixelImages:
    rng = np.random.default_rng(0)
    return PixelImages(rng.integers(0, 256, (n, 1, size, size), dtype=np.uint8), 12, 3, (0.5,), (0.5,))


@pytest.mark.parametrize("base", ["tensor", "pixels"])
def test_views_are_deterministic_and_equal_across_calls_and_batchings(base):
    x = torch.randn(50, 3, 12, 12, generator=torch.Generator().manual_seed(0)) if base == "tensor" else _pixels()
    a, b = augmented_views(x, 3, 4, True), augmented_views(x, 3, 4, True)
    full = [v[:] for v in a]
    idx = torch.tensor([7, 3, 49, 0, 3])
    for d in range(4):
        assert torch.equal(full[d], b[d][:])  # another call: the same inputs
        assert torch.equal(a[d][idx], full[d][idx])  # any batch of a draw is those rows of the draw
        assert torch.equal(a[d][:20], a[d][:20])  # and the same on every call
    assert not torch.equal(full[0], full[1])  # draws differ
    assert not torch.equal(full[0], augmented_views(x, 4, 1, True)[0][:])  # and move with the seed
    # a draw equals translating the whole set at once with that draw's generator
    whole = x if isinstance(x, torch.Tensor) else x[:]
    assert torch.equal(full[2], augment_batch(whole, torch.Generator().manual_seed(3 * 1000 + 2)))


def test_views_store_offsets_not_images():
    x = _pixels(n=200)
    views = augmented_views(x, 0, 30, True)
    assert all(isinstance(v, AugmentedView) and v.base is x for v in views)
    assert all(v.dx.nbytes + v.dy.nbytes == 2 * 200 for v in views)  # two bytes a sample a draw
    assert augmented_views(x, 0, 30, False) == [x]  # no augmentation: the images themselves


def test_translation_shifts_by_the_drawn_offsets_with_replicate_padding():
    x = torch.arange(16.0).view(1, 1, 4, 4)
    v = AugmentedView(x, 0)
    dx, dy = int(v.dx[0]), int(v.dy[0])
    padded = nn.functional.pad(x, (2, 2, 2, 2), mode="replicate")
    assert torch.equal(v[0], padded[0, :, dy:dy + 4, dx:dx + 4])


class Teacher(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                                 nn.Flatten(), nn.Linear(4, 6))

    def forward(self, x):
        return self.net(x) * 5


@pytest.mark.parametrize("topk", [None, 2])
def test_teacher_logits_filled_batch_by_batch_match_the_whole_view(tmp_path, topk):
    torch.manual_seed(0)
    n = TEACHER_BATCH * 2 + 37  # three batches, the last one short
    ds = ArrayDataset(torch.randn(n, 3, 8, 8).numpy(), (torch.arange(n) % 6).numpy())
    teacher = Teacher().eval()
    views = augmented_views(ds.x, 0, 2, True)
    cache = TeacherLogitCache(teacher, views, topk=topk, directory=tmp_path)
    with torch.no_grad():
        whole = [teacher(v[:]) for v in views]
    for d in range(2):
        if topk is None:
            assert torch.allclose(cache.all_logits(d), whole[d].half().float())
        else:
            ref = compress_topk(whole[d], topk)
            assert torch.equal(cache._topk["indices"][d], ref["indices"])
            assert torch.allclose(cache._topk["values"][d].float(), ref["values"].float())
    again = TeacherLogitCache(teacher, augmented_views(ds.x, 0, 2, True), topk=topk, directory=tmp_path)
    assert again.hit and torch.equal(again.all_logits(1), cache.all_logits(1))


def _png_folder(root, classes=2, per_class=12, size=24):
    rng = np.random.default_rng(0)
    for c in range(classes):
        (root / f"class{c}").mkdir(parents=True)
        for i in range(per_class):
            a = rng.integers(0, 60, (size, size + 8, 3), dtype=np.uint8)
            a[:, :, c] = 220  # the class is the bright channel
            Image.fromarray(a).save(root / f"class{c}" / f"{i}.png")
    return root


def test_an_image_folder_is_not_decoded_up_front_and_trains_past_a_small_cache(tmp_path):
    root = _png_folder(tmp_path / "imgs")
    (root / "class0" / "broken.png").write_bytes(b"not a png")
    bound_mb = 3 * 16 * 16 * 3 / 2**20  # room for three decoded 16x16 images of 24
    cfg = DataConfig(dataset="imagefolder", root=str(root), image_size=16, decoded_cache_mb=bound_mb,
                     val_fraction=0.25, test_fraction=0.25)
    s = build_splits(cfg, seed=0)
    cache = s.train.x.cache
    assert len(cache) == 0  # listed, not decoded
    assert s.skipped_files == [str(root / "class0" / "broken.png")]
    assert (len(s.train), len(s.val), len(s.test)) == (12, 6, 6) and s.input_shape == (3, 16, 16)
    # a batch is the eager decode of those files
    assert np.allclose(s.test.x[2].numpy(), load_image(s.test.x.paths[2], 16), atol=1e-6)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2))
    res = train(model, s.train, s.val, epochs=3, lr=1e-2, seed=0, batch_size=4)
    assert res.steps == 9 and len(res.curve) == 3
    assert 0 < len(cache) <= 3 and cache.nbytes <= cache.max_bytes  # bounded all along
    assert s.val.x.cache is cache  # one bound for the whole folder


def test_a_file_that_fails_to_decode_mid_run_is_a_data_error_naming_it(tmp_path):
    root = _png_folder(tmp_path / "imgs")
    bad = root / "class1" / "3.png"
    bad.write_bytes(bad.read_bytes()[:60])  # the header survives, the pixels do not
    s = build_splits(DataConfig(dataset="imagefolder", root=str(root), image_size=16, val_fraction=0.25,
                                test_fraction=0.25), seed=0)
    everything = transfer_set(s).x
    with pytest.raises(DataError, match="3.png: cannot be decoded"):
        for i in range(0, len(everything), 4):
            everything[i:i + 4]
        s.val.x[:]
        s.test.x[:]


def test_unlabeled_images_join_the_transfer_set_lazily(tmp_path):
    root = _png_folder(tmp_path / "imgs")
    extra = _png_folder(tmp_path / "extra", classes=1, per_class=5)
    s = build_splits(DataConfig(dataset="imagefolder", root=str(root), image_size=16, unlabeled_root=str(extra),
                                val_fraction=0.25, test_fraction=0.25), seed=0)
    ds = transfer_set(s)
    assert len(ds) == len(s.train) + 5 and (ds.y[-5:] == -1).all()
    assert torch.equal(ds.x[len(s.train) + 1], s.unlabeled.x[1]) and torch.equal(ds.x[0], s.train.x[0])


def test_images_index_like_a_tensor():
    x = _pixels(n=6)
    whole = x[:]
    assert whole.shape == (6, 3, 12, 12) and whole.dtype == torch.float32
    mask = np.array([True, False, True, False, False, True])
    for key in (2, -1, np.int64(3), torch.tensor(4)):
        assert torch.equal(x[key], whole[int(key)])
    for key in (slice(1, 5, 2), [0, 5, 5], np.array([4, 1]), torch.tensor([3, -6]), mask, torch.from_numpy(mask)):
        assert torch.equal(x[key], whole[torch.as_tensor(np.arange(6)[np.asarray(key)] if not isinstance(key, slice)
                                                         else np.arange(6)[key])])
    assert np.array_equal(x.numpy(batch=4), whole.numpy())
    with pytest.raises(IndexError):
        x[6]
