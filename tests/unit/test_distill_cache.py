"""The teacher-logit cache: computed once, float16 or top-k, on disk, invalidated by any change."""
import math

import pytest
import torch
from torch import nn

from edgekd.data import ArrayDataset
from edgekd.distill.cache import TeacherLogitCache, compress_topk, expand_topk
from edgekd.distill.trainer import augmented_views, train
from edgekd.progress import NullProgress


class Counting(nn.Module):
    """A tiny teacher with BatchNorm and dropout (both differ between train and eval mode)."""

    def __init__(self, classes: int = 5, scale: float = 1.0):
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                                 nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(0.5), nn.Linear(4, classes))
        self.scale = scale
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        return self.net(x) * self.scale


def _data(n=24, classes=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, 8, 8, generator=g)
    y = torch.arange(n) % classes
    return ArrayDataset(x.numpy(), y.numpy())


def test_computed_once_in_eval_mode_stored_as_float16(tmp_path):
    torch.manual_seed(0)
    teacher, ds = Counting(scale=10.0).train(), _data()
    views = augmented_views(ds.x, 0, 3, True)
    cache = TeacherLogitCache(teacher, views, directory=tmp_path)
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    assert cache.path.is_file() and not cache.hit
    with torch.no_grad():
        ref = teacher(views[1][:])  # eval mode: deterministic, running BN statistics
    assert torch.allclose(cache.get(1, torch.arange(len(ds))), ref, rtol=1e-3, atol=1e-2)
    assert cache.nbytes() == 3 * len(ds) * 5 * 2  # float16
    again = TeacherLogitCache(teacher, views, directory=tmp_path)
    assert again.hit and torch.equal(again.all_logits(2), cache.all_logits(2))
    stored = torch.load(cache.path, weights_only=True)
    assert stored["full"].dtype == torch.float16


def test_reused_across_epochs_without_running_the_teacher(tmp_path):
    torch.manual_seed(0)
    teacher, ds = Counting(scale=20.0), _data()
    cache = TeacherLogitCache(teacher, augmented_views(ds.x, 0, 2, True), directory=tmp_path)
    calls = teacher.calls
    student = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 5))
    res = train(student, ds, ds, epochs=4, lr=1e-2, seed=0, batch_size=8, teacher=teacher, alpha=0.9,
                cache=cache)
    assert teacher.calls == calls  # four epochs, no teacher forward pass
    assert res.steps == 12 and len(res.epoch_seconds) == 4


@pytest.mark.parametrize("change", ["teacher", "data", "augmentation", "topk"])
def test_a_change_to_teacher_data_or_preprocessing_invalidates(tmp_path, change):
    torch.manual_seed(0)
    teacher, ds = Counting(), _data()
    views = augmented_views(ds.x, 0, 2, True)
    first = TeacherLogitCache(teacher, views, directory=tmp_path)
    topk = None
    if change == "teacher":
        with torch.no_grad():
            teacher.net[-1].bias[0] += 0.01
    elif change == "data":
        views = augmented_views(_data(seed=1).x, 0, 2, True)
    elif change == "augmentation":
        views = augmented_views(ds.x, 1, 2, True)
    else:
        topk = 2
    second = TeacherLogitCache(teacher, views, directory=tmp_path, topk=topk)
    assert second.key != first.key and not second.hit
    same = TeacherLogitCache(teacher, views, directory=tmp_path, topk=topk)
    assert same.key == second.key and same.hit


def test_topk_keeps_the_top_logits_and_the_rest_mass():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 6, 10, generator=g) * 3
    packed = compress_topk(logits, 3)
    full = expand_topk(packed["values"], packed["indices"], packed["rest"], 10)
    top = logits.topk(3, dim=-1)
    assert torch.allclose(full.gather(-1, top.indices), top.values, atol=1e-2)
    # at temperature 1 the classes outside the top 3 keep their total probability
    mask = torch.ones_like(logits, dtype=torch.bool).scatter_(-1, top.indices, False)
    p_ref = logits.softmax(-1).masked_fill(~mask, 0).sum(-1)
    p_got = full.softmax(-1).masked_fill(~mask, 0).sum(-1)
    assert torch.allclose(p_got, p_ref, atol=5e-3)


def test_topk_cache_serves_full_width_logits(tmp_path):
    torch.manual_seed(0)
    teacher, ds = Counting(classes=7, scale=5.0), _data(classes=7)
    cache = TeacherLogitCache(teacher, [ds.x], topk=2, directory=tmp_path)
    got = cache.get(0, torch.arange(4))
    assert got.shape == (4, 7)
    assert cache.nbytes() < len(ds) * 7 * 2  # smaller than the full float16 table
    assert TeacherLogitCache(teacher, [ds.x], topk=2, directory=tmp_path).hit


def test_near_uniform_soft_targets_warn(tmp_path):
    torch.manual_seed(0)
    teacher, ds = Counting(scale=0.01), _data()
    progress = NullProgress()
    student = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 5))
    with pytest.warns(UserWarning, match="near-uniform"):
        res = train(student, ds, ds, epochs=1, lr=1e-2, seed=0, batch_size=8, teacher=teacher, alpha=0.5,
                    temperature=4.0, cache=TeacherLogitCache(teacher, [ds.x], directory=tmp_path),
                    progress=progress)
    assert any("near-uniform" in n for n in progress.notes)
    assert res.soft_target_entropy > 0.95 and res.soft_target_entropy <= 1.0 + 1e-6
    assert math.isfinite(res.val_loss)


def test_a_truncated_file_is_recomputed(tmp_path):
    torch.manual_seed(0)
    teacher, ds = Counting(), _data()
    first = TeacherLogitCache(teacher, [ds.x], directory=tmp_path)
    first.path.write_bytes(b"not a checkpoint")
    again = TeacherLogitCache(teacher, [ds.x], directory=tmp_path)
    assert not again.hit and torch.equal(again.all_logits(), first.all_logits())


def test_kd_draws_fill_the_view_budget_and_never_fall_below_the_default():
    from edgekd.distill.trainer import AUG_DRAWS, KD_DRAWS, KD_VIEWS_BYTES, kd_draws

    assert kd_draws(torch.zeros(1077, 3, 32, 32)) == KD_DRAWS  # the embedded default: 13 MB a view
    per_view = KD_VIEWS_BYTES // 12  # twelve views fit
    assert kd_draws(torch.empty(per_view // 4, device="meta")) == 12
    assert kd_draws(torch.empty(10**6, 3, 224, 224, device="meta")) == AUG_DRAWS  # 600 GB a view
