"""Sequence-level KD (the teacher's greedy continuations, stored and reused) and on-policy steps (the
student samples, the live teacher scores), on a tiny Llama."""
import pytest
import torch

pytest.importorskip("transformers")

from edgekd.config import load_config  # noqa: E402
from edgekd.data.text import build_text_splits  # noqa: E402
from edgekd.distill import lm_sequence  # noqa: E402
from edgekd.distill.lm_sequence import continue_greedy, sample_continuations, sequence_kd_blocks  # noqa: E402
from edgekd.distill.lm_trainer import lm_logits, train_lm  # noqa: E402
from edgekd.errors import ConfigError  # noqa: E402
from edgekd.lm.models import build_lm_student, load_lm  # noqa: E402
from tests.lm_fixtures import corpus_files, tiny_llama_dir  # noqa: E402


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    loaded = load_lm(str(tiny_llama_dir(tmp_path_factory.mktemp("lm") / "teacher")))
    splits = build_text_splits(corpus_files(), loaded.tokenizer, seq_len=24, seed=0, val_fraction=0.2,
                               test_fraction=0.2, max_train_tokens=24 * 16, max_eval_tokens=24 * 4)
    for p in loaded.model.parameters():
        p.requires_grad_(False)
    return loaded, splits


def _greedy_without_cache(model, prompts, n):
    ids = prompts
    with torch.no_grad():
        for _ in range(n):
            ids = torch.cat([ids, lm_logits(model, ids)[:, -1:].argmax(-1)], 1)
    return ids


def test_greedy_continuation_through_the_kv_cache_equals_full_recomputation(lm):
    loaded, splits = lm
    prompts = splits.train.ids[:3, :10]
    got = continue_greedy(loaded.model, prompts, 6)
    assert got.shape == (3, 16)
    assert torch.equal(got[:, :10], prompts)
    assert torch.equal(got, _greedy_without_cache(loaded.model, prompts, 6))


def test_sequence_kd_blocks_are_the_teachers_continuations_and_are_stored_once(lm, tmp_path, monkeypatch):
    monkeypatch.setattr(lm_sequence, "SEQUENCE_BATCH", 2)  # three generation batches, the last one short
    loaded, splits = lm
    blocks = splits.train.ids[:5]
    written, info = sequence_kd_blocks(loaded.model, "teacher-key", blocks, 8, root=tmp_path)
    assert written.shape == blocks.shape and written.dtype == torch.long
    assert torch.equal(written[:, :16], blocks[:, :16])  # the prompts stay the text
    assert torch.equal(written, _greedy_without_cache(loaded.model, blocks[:, :16], 8))
    assert info["reused"] is False and info["prompt_tokens"] == 16 and 0 <= info["differs_from_text"] <= 100
    again, info2 = sequence_kd_blocks(loaded.model, "teacher-key", blocks, 8, root=tmp_path)
    assert info2["reused"] is True and torch.equal(again, written)
    _, info3 = sequence_kd_blocks(loaded.model, "another-teacher", blocks, 8, root=tmp_path)
    assert info3["reused"] is False  # another teacher never reads this one's text
    with pytest.raises(ValueError, match="sequence_kd 24"):
        sequence_kd_blocks(loaded.model, "teacher-key", blocks, 24, root=tmp_path)


def test_a_share_of_the_blocks_is_rewritten_and_the_rest_kept(lm, tmp_path):
    loaded, splits = lm
    blocks = splits.train.ids[:6]
    written, info = sequence_kd_blocks(loaded.model, "teacher-key", blocks, 8, share=0.5, seed=3, root=tmp_path)
    rewritten = [i for i in range(6) if not torch.equal(written[i], blocks[i])]
    kept = [i for i in range(6) if i not in rewritten]
    assert info["blocks"] == 3 and info["of_blocks"] == 6
    assert len(rewritten) <= 3 and len(kept) >= 3  # a continuation may equal the text; at most 3 differ
    teacher_text = _greedy_without_cache(loaded.model, blocks[:, :16], 8)
    same_as_teacher = [i for i in range(6) if torch.equal(written[i], teacher_text[i])]
    assert len(same_as_teacher) >= 3 and set(rewritten) <= set(same_as_teacher)
    for i in kept:
        assert torch.equal(written[i], blocks[i])
    # another seed chooses other blocks, under another key; the whole set keeps its own key
    _, other = sequence_kd_blocks(loaded.model, "teacher-key", blocks, 8, share=0.5, seed=4, root=tmp_path)
    _, whole = sequence_kd_blocks(loaded.model, "teacher-key", blocks, 8, root=tmp_path)
    assert len({info["file"], other["file"], whole["file"]}) == 3
    with pytest.raises(ValueError, match="sequence_share 0"):
        sequence_kd_blocks(loaded.model, "teacher-key", blocks, 8, share=0.0, root=tmp_path)


def test_sampled_continuations_follow_the_seed(lm):
    loaded, splits = lm
    prompts = splits.train.ids[:4, :12]
    a = sample_continuations(loaded.model, prompts, 10, 1.0, torch.Generator().manual_seed(1))
    b = sample_continuations(loaded.model, prompts, 10, 1.0, torch.Generator().manual_seed(1))
    c = sample_continuations(loaded.model, prompts, 10, 1.0, torch.Generator().manual_seed(2))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert torch.equal(a[:, :12], prompts) and a.shape == (4, 22)


def test_on_policy_steps_train_towards_the_teacher_on_the_students_own_text(lm):
    loaded, splits = lm
    student, _ = build_lm_student(loaded.model, {"layers": 2}, "teacher", 0)
    before = {k: v.clone() for k, v in student.state_dict().items()}
    res = train_lm(student, splits.train.ids, splits.val.ids, steps=6, lr=1e-3, batch_size=4, seed=0, alpha=0.5,
                   teacher=loaded.model, on_policy=0.5, policy_teacher=loaded.model, policy_tokens=8)
    assert 0 < res.on_policy_steps < 6  # a seeded share of the steps
    res_all = train_lm(student, splits.train.ids, splits.val.ids, steps=3, lr=1e-3, batch_size=4, seed=0,
                       alpha=0.5, teacher=loaded.model, on_policy=1.0, policy_teacher=loaded.model, policy_tokens=8)
    assert res_all.on_policy_steps == 3
    assert any(not torch.equal(before[k], v) for k, v in student.state_dict().items())
    with pytest.raises(ValueError, match="live teacher"):
        train_lm(student, splits.train.ids, splits.val.ids, steps=1, lr=1e-3, batch_size=4, seed=0, on_policy=0.5)


def test_sequence_kd_longer_than_a_block_and_lm_keys_on_images_are_refused(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("task: causal-lm\ndata: {seq_len: 64}\ndistill: {sequence_kd: 64}\n")
    with pytest.raises(ConfigError, match="sequence_kd 64 must be less than data.seq_len 64"):
        load_config(cfg)
    cfg.write_text("distill: {on_policy: 0.5}\n")
    with pytest.raises(ConfigError, match="distill.on_policy is read only with task: causal-lm"):
        load_config(cfg)


def test_the_rows_given_are_rewritten_under_their_own_key(lm, tmp_path):
    loaded, splits = lm
    blocks = splits.train.ids[:6]
    written, info = sequence_kd_blocks(loaded.model, "teacher-key", blocks, 8, root=tmp_path, rows=[4, 1])
    teacher_text = _greedy_without_cache(loaded.model, blocks[:, :16], 8)
    assert info["blocks"] == 2 and info["of_blocks"] == 6
    for i in range(6):
        assert torch.equal(written[i], teacher_text[i] if i in (1, 4) else blocks[i])
    _, whole = sequence_kd_blocks(loaded.model, "teacher-key", blocks, 8, root=tmp_path)
    assert whole["file"] != info["file"]
    with pytest.raises(ValueError, match="block indices below 6"):
        sequence_kd_blocks(loaded.model, "teacher-key", blocks, 8, root=tmp_path, rows=[6])


def _trained_batches(monkeypatch, lm, **kw) -> list[int]:
    """The batch index each step of a cross-entropy training trained on, read from the labels it saw."""
    from edgekd.distill import lm_trainer

    loaded, splits = lm
    train = splits.train.ids[:12]
    seen: list[torch.Tensor] = []
    real = lm_trainer.next_token_ce

    def spy(logits, labels, mask):
        seen.append(labels.clone())
        return real(logits, labels, mask)

    monkeypatch.setattr(lm_trainer, "next_token_ce", spy)
    student, _ = build_lm_student(loaded.model, {"layers": 1}, "teacher", 0)
    train_lm(student, train, splits.val.ids, lr=1e-3, batch_size=2, seed=5, alpha=0.0, **kw)
    batches = [train[i:i + 2, 1:] for i in range(0, 12, 2)]
    return [next(b for b, ids in enumerate(batches) if torch.equal(ids, labels)) for labels in seen]


def test_the_last_batches_are_trained_on_last_and_only_then(lm, monkeypatch):
    import random

    order = _trained_batches(monkeypatch, lm, steps=8)
    expect = list(range(6))
    random.Random(5).shuffle(expect)  # the order as it always was: a seeded shuffle, popped from the end
    assert order[:6] == expect[::-1] and len(order) == 8
    tail = _trained_batches(monkeypatch, lm, steps=8, last_batches=[4, 1])
    assert sorted(tail[-2:]) == [1, 4] and not {1, 4} & set(tail[:-2])  # 6 steps over the 4 others, then 1 and 4
    assert sorted(tail[:4]) == [0, 2, 3, 5]
    with pytest.raises(ValueError, match="distinct batch indices below 6"):
        _trained_batches(monkeypatch, lm, steps=8, last_batches=[6])
    with pytest.raises(ValueError, match="leaves no room"):
        _trained_batches(monkeypatch, lm, steps=1, last_batches=[0, 1])


def test_sequence_steps_need_sequence_kd_and_no_share(tmp_path):
    from edgekd.distill.lm_stage import last_step_batches
    from edgekd.errors import BadInputError

    cfg = tmp_path / "c.yaml"
    cfg.write_text("task: causal-lm\ndata: {seq_len: 64}\ndistill: {sequence_steps: 10}\n")
    with pytest.raises(ConfigError, match="sequence_steps 10 needs distill.sequence_kd"):
        load_config(cfg)
    cfg.write_text("task: causal-lm\ndata: {seq_len: 64}\ndistill: {sequence_kd: 32, sequence_steps: 10, "
                   "sequence_share: 0.5}\n")
    with pytest.raises(ConfigError, match="set one of them"):
        load_config(cfg)
    cfg.write_text("distill: {sequence_steps: 10}\n")
    with pytest.raises(ConfigError, match="distill.sequence_steps is read only with task: causal-lm"):
        load_config(cfg)
    cfg.write_text("task: causal-lm\ndata: {seq_len: 64}\ndistill: {sequence_kd: 32, sequence_steps: 10}\n")
    assert load_config(cfg).distill.sequence_steps == 10
    chosen = last_step_batches(100, 8, 13, 3)  # 13 batches, the last one of 4 blocks
    assert chosen == last_step_batches(100, 8, 13, 3) and len(set(chosen)) == 3 and max(chosen) < 13
    with pytest.raises(BadInputError, match="sequence_steps 13: the training split has 13 batches of 8 blocks"):
        last_step_batches(100, 8, 13, 13)
