"""The LM teacher top-k cache: round trip, rest mass, losses from the cache against the live teacher,
keys, reopening, truncated files and atomic batches."""
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from edgekd.distill.lm_cache import TopKCache, TopKCacheError
from edgekd.distill.lm_losses import (
    forward_kl,
    forward_kl_topk,
    generalized_jsd_topk,
    reverse_kl_topk,
    topk_teacher,
)

B, S, V = 2, 6, 16

# The cache keeps log-probabilities in float16: a log-probability of magnitude 2-16 is rounded by up to
# 2^-9-2^-7, i.e. 0.2-0.8% of that token's probability; the errors mostly cancel in a KL (and the re-normalising
# over the k + 1 buckets absorbs their common part). Measured on these inputs over 20 seeds: at most 6e-5
# relative, so 1e-3 leaves a wide margin.
FP16_REL_TOL = 1e-3


def _batch(seed=0, vocab=V, peaked=False):
    g = torch.Generator().manual_seed(seed)
    t = torch.randn(B, S, vocab, generator=g) * 2
    if peaked:  # over 99% of the mass on 4 tokens at every position
        hot = torch.randint(0, vocab, (B, S, 4), generator=g)
        t = t.scatter_add(-1, hot, torch.full((B, S, 4), 9.0))
    s = torch.randn(B, S, vocab, generator=g) * 2
    mask = torch.ones(B, S, dtype=torch.long)
    mask[1, 4:] = 0
    return s, F.log_softmax(t, -1), mask


def test_round_trip(tmp_path):
    _, log_p, mask = _batch()
    cache = TopKCache(tmp_path / "c", "key-a", k=4, vocab=V)
    assert not cache.reused
    cache.write(3, log_p, mask)
    top, got_mask = cache.read(3)
    assert top.values.dtype == torch.float16 and top.indices.dtype == torch.int32
    assert top.rest_mass.dtype == torch.float32 and got_mask.dtype == torch.bool
    assert top.values.shape == (B, S, 4) and top.rest_mass.shape == (B, S)
    want = log_p.topk(4, dim=-1)
    keep = mask.bool()
    assert torch.equal(got_mask, keep)
    assert torch.equal(top.indices[keep].long(), want.indices[keep])
    assert torch.equal(top.values[keep], want.values[keep].half())
    assert not top.values[~keep].any() and not top.rest_mass[~keep].any()  # padding stored as zeros
    assert cache.batches() == [3] and cache.has(3) and not cache.has(0)
    assert cache.nbytes() > 0
    with pytest.raises(TopKCacheError, match="not in the cache"):
        cache.read(0)


def test_rest_mass_is_one_minus_the_topk_probabilities(tmp_path):
    _, log_p, mask = _batch(1)
    cache = TopKCache(tmp_path, "k", k=3, vocab=V)
    cache.write(0, log_p, mask)
    top, _ = cache.read(0)
    want = 1.0 - log_p.double().topk(3, dim=-1).values.exp().sum(-1)
    keep = mask.bool()
    assert torch.allclose(top.rest_mass[keep].double(), want[keep], atol=1e-6)
    assert float(top.rest_mass[keep].min()) > 0


def test_raw_logits_are_normalised_on_write(tmp_path):
    _, log_p, mask = _batch(2)
    a, b = TopKCache(tmp_path / "a", "k", k=5, vocab=V), TopKCache(tmp_path / "b", "k", k=5, vocab=V)
    a.write(0, log_p, mask)
    b.write(0, log_p + 7.0, mask)  # logits = log-probabilities + a constant
    ta, tb = a.read(0)[0], b.read(0)[0]
    assert torch.equal(ta.indices, tb.indices)
    assert torch.allclose(ta.values.float(), tb.values.float(), atol=1e-2)


@pytest.mark.parametrize("T", [1.0, 2.0])
def test_loss_from_cache_matches_live_teacher_with_k_equal_vocab(tmp_path, T):
    s, log_p, mask = _batch(3)
    cache = TopKCache(tmp_path, "k", k=V, vocab=V)
    cache.write(0, log_p, mask)
    top, got_mask = cache.read(0)
    live = float(forward_kl(s, log_p, mask, T))
    assert float(forward_kl_topk(s, *top, got_mask, T)) == pytest.approx(live, rel=FP16_REL_TOL)


def test_loss_from_cache_matches_live_topk_for_a_peaked_teacher(tmp_path):
    """k < vocab: the cached loss equals the same top-k loss from the live teacher up to float16 rounding,
    and the full loss up to the top-k approximation (test_lm_losses.PEAKED_REL_TOL)."""
    s, log_p, mask = _batch(4, vocab=40, peaked=True)
    cache = TopKCache(tmp_path, "k", k=6, vocab=40)
    cache.write(0, log_p, mask)
    top, got_mask = cache.read(0)
    live_top = topk_teacher(log_p, 6)
    assert float(top.rest_mass[got_mask].max()) < 0.01
    for fn in (forward_kl_topk, reverse_kl_topk, generalized_jsd_topk):
        assert float(fn(s, *top, got_mask)) == pytest.approx(float(fn(s, *live_top, mask)), rel=FP16_REL_TOL)
    assert float(forward_kl_topk(s, *top, got_mask)) == pytest.approx(float(forward_kl(s, log_p, mask)), rel=5e-3)


def test_reopening_with_the_same_key_reads_the_same_arrays(tmp_path):
    _, log_p, mask = _batch(5)
    first = TopKCache(tmp_path, "key-a", k=4, vocab=V)
    for i in range(3):
        first.write(i, log_p + i, mask)
    again = TopKCache(tmp_path, "key-a", k=4, vocab=V)
    assert again.reused and again.batches() == [0, 1, 2]
    for i in range(3):
        a, b = first.read(i), again.read(i)
        for x, y in zip((*a[0], a[1]), (*b[0], b[1]), strict=True):
            assert torch.equal(x, y)
    mapped = again.arrays(1)
    assert isinstance(mapped["values"], np.memmap) and not mapped["values"].flags.writeable


def test_a_different_key_or_k_is_not_reused(tmp_path):
    _, log_p, mask = _batch(6)
    TopKCache(tmp_path, "key-a", k=4, vocab=V).write(0, log_p, mask)
    with pytest.raises(TopKCacheError, match="key-a"):
        TopKCache(tmp_path, "key-b", k=4, vocab=V)
    with pytest.raises(TopKCacheError, match="another run"):
        TopKCache(tmp_path, "key-a", k=8, vocab=V)
    assert TopKCache(tmp_path, "key-a", k=4, vocab=V).has(0)  # refusing left the cache as it was
    fresh = TopKCache(tmp_path, "key-b", k=4, vocab=V, rebuild=True)
    assert not fresh.reused and fresh.batches() == []
    assert json.loads((tmp_path / "header.json").read_text())["key"] == "key-b"


def test_a_corrupt_header_is_not_reused(tmp_path):
    TopKCache(tmp_path, "key-a", k=4, vocab=V)
    (tmp_path / "header.json").write_text("{not json")
    with pytest.raises(TopKCacheError):
        TopKCache(tmp_path, "key-a", k=4, vocab=V)
    assert not TopKCache(tmp_path, "key-a", k=4, vocab=V, rebuild=True).reused


def test_truncated_or_missing_files_are_detected(tmp_path):
    _, log_p, mask = _batch(7)
    cache = TopKCache(tmp_path, "k", k=4, vocab=V)
    cache.write(0, log_p, mask)
    cache.write(1, log_p, mask)
    values = cache.batch_dir(0) / "values.npy"
    values.write_bytes(values.read_bytes()[:-10])
    assert not cache.has(0)
    with pytest.raises(TopKCacheError, match="values.npy"):
        cache.read(0)
    (cache.batch_dir(1) / "rest_mass.npy").unlink()
    assert not cache.has(1)
    cache.write(0, log_p, mask)  # a rewrite replaces the broken batch
    assert cache.has(0) and cache.read(0)[1].shape == (B, S)


def test_writes_leave_no_temporary_files_and_reject_bad_shapes(tmp_path):
    _, log_p, mask = _batch(8)
    cache = TopKCache(tmp_path, "k", k=4, vocab=V)
    cache.write(0, log_p, mask)
    cache.write(0, log_p, None)  # replaces the batch; no mask means every token counts
    assert cache.read(0)[1].all()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["batch-000000", "header.json"]
    with pytest.raises(ValueError, match="vocab|16"):
        cache.write(1, log_p[..., :8], mask)
    with pytest.raises(ValueError, match="mask"):
        cache.write(1, log_p, mask[:, :3])
    assert cache.batches() == [0]
