"""LM training on token blocks: perplexity by its formula, CE and KD training, the top-k cache equal to
the live teacher, the best validation weights kept."""
import math

import pytest
import torch

pytest.importorskip("transformers")

from edgekd.data.text import build_text_splits  # noqa: E402
from edgekd.distill.lm_cache import TopKCache  # noqa: E402
from edgekd.distill.lm_trainer import (  # noqa: E402
    build_topk_cache,
    lm_amp,
    lm_logits,
    next_token_agreement,
    perplexity,
    train_lm,
)
from edgekd.lm.models import build_lm_student, load_lm  # noqa: E402
from tests.lm_fixtures import corpus_files, tiny_llama_dir  # noqa: E402


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    loaded = load_lm(str(tiny_llama_dir(tmp_path_factory.mktemp("lm") / "teacher")))
    splits = build_text_splits(corpus_files(), loaded.tokenizer, seq_len=32, seed=0, val_fraction=0.2,
                               test_fraction=0.2, max_train_tokens=32 * 48, max_eval_tokens=32 * 8)
    # a teacher that knows the text: a few CE steps on the training blocks
    train_lm(loaded.model, splits.train.ids, splits.val.ids, steps=60, lr=3e-3, batch_size=8, seed=0, alpha=0.0)
    for p in loaded.model.parameters():
        p.requires_grad_(False)
    return loaded, splits


def test_perplexity_is_exp_of_the_mean_next_token_nll(lm):
    loaded, splits = lm
    ids = splits.val.ids
    logits = lm_logits(loaded.model, ids)[:, :-1]
    nll = torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten())
    assert perplexity(loaded.model, ids, batch_size=3) == pytest.approx(math.exp(float(nll)), rel=1e-5)
    assert next_token_agreement(loaded.model, loaded.model, ids) == 100.0


def test_ce_training_lowers_validation_perplexity_and_keeps_the_best(lm):
    loaded, splits = lm
    student, _ = build_lm_student(loaded.model, {"layers": 2}, init="scratch")
    before = perplexity(student, splits.val.ids)
    res = train_lm(student, splits.train.ids, splits.val.ids, steps=40, lr=3e-3, batch_size=8, seed=0, alpha=0.0)
    assert res.val_perplexity < before and res.steps == 40
    assert res.val_perplexity == pytest.approx(perplexity(student, splits.val.ids), rel=1e-6)
    assert res.val_perplexity == pytest.approx(min(c["val_perplexity"] for c in res.curve), abs=1e-3)
    assert not student.training


@pytest.mark.parametrize("kind", ["forward_kl", "reverse_kl", "jsd"])
def test_distillation_moves_the_student_toward_the_teacher(lm, kind):
    loaded, splits = lm
    student, _ = build_lm_student(loaded.model, {"layers": 2}, init="scratch", seed=1)
    before = next_token_agreement(student, loaded.model, splits.val.ids)
    train_lm(student, splits.train.ids, splits.val.ids, steps=40, lr=3e-3, batch_size=8, seed=0, kind=kind,
             alpha=1.0, teacher=loaded.model)
    assert next_token_agreement(student, loaded.model, splits.val.ids) > before + 10


def test_training_from_the_full_topk_cache_matches_the_live_teacher(lm, tmp_path):
    loaded, splits = lm
    vocab = loaded.model.config.vocab_size
    cache = TopKCache(tmp_path / "cache", "k", k=vocab, vocab=vocab)
    assert build_topk_cache(loaded.model, splits.train.ids, 8, cache) == math.ceil(len(splits.train) / 8)
    assert build_topk_cache(loaded.model, splits.train.ids, 8, cache) == 0  # built once
    a, _ = build_lm_student(loaded.model, {"layers": 2}, init="teacher")
    b, _ = build_lm_student(loaded.model, {"layers": 2}, init="teacher")
    kw = dict(steps=6, lr=1e-3, batch_size=8, seed=0, kind="forward_kl", alpha=0.5, temperature=2.0)
    live = train_lm(a, splits.train.ids, splits.val.ids, teacher=loaded.model, eval_every=6, **kw)
    cached = train_lm(b, splits.train.ids, splits.val.ids, cache=cache, eval_every=6, **kw)
    assert cached.curve[-1]["loss"] == pytest.approx(live.curve[-1]["loss"], rel=1e-3)
    assert cached.val_perplexity == pytest.approx(live.val_perplexity, rel=1e-3)


def test_precision_auto_is_bf16_only_where_the_cpu_multiplies_bf16():
    native = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    assert lm_amp("auto") == (torch.bfloat16 if native else None)
    assert lm_amp("fp32") is None and lm_amp("fp16") is None
    assert lm_amp("bf16") == torch.bfloat16


def test_bf16_logits_stay_close_and_the_head_can_stay_fp32(lm, tmp_path):
    loaded, splits = lm
    ids = splits.val.ids[:4]
    ref = lm_logits(loaded.model, ids)
    bf = lm_logits(loaded.model, ids, torch.bfloat16)
    head = lm_logits(loaded.model, ids, torch.bfloat16, head_fp32=True)
    assert bf.dtype == torch.bfloat16 and head.dtype == torch.float32
    scale = float(ref.abs().max())
    assert float((head - ref).abs().max()) < 0.05 * scale
    assert float((head.argmax(-1) == ref.argmax(-1)).float().mean()) > 0.9
    cache = TopKCache(tmp_path / "bf16", "k", k=8, vocab=loaded.model.config.vocab_size)
    assert build_topk_cache(loaded.model, ids, 4, cache, amp=torch.bfloat16) == 1
    top, _ = cache.read(0)
    want = ref[:, :-1].float().log_softmax(-1).topk(8, -1).values
    assert float((top.values.float() - want).abs().mean()) < 0.05


def test_bf16_training_lowers_validation_perplexity_like_fp32(lm):
    loaded, splits = lm
    fp32, _ = build_lm_student(loaded.model, {"layers": 2}, init="scratch", seed=2)
    bf16, _ = build_lm_student(loaded.model, {"layers": 2}, init="scratch", seed=2)
    before = perplexity(fp32, splits.val.ids)
    kw = dict(steps=40, lr=3e-3, batch_size=8, seed=0, alpha=0.5, teacher=loaded.model)
    a = train_lm(fp32, splits.train.ids, splits.val.ids, **kw)
    b = train_lm(bf16, splits.train.ids, splits.val.ids, amp=torch.bfloat16, **kw)
    assert b.val_perplexity < 0.5 * before
    assert b.val_perplexity == pytest.approx(a.val_perplexity, rel=0.1)
    assert next(bf16.parameters()).dtype == torch.float32  # the weights stay fp32


def test_training_uses_the_fused_adamw_on_float_cpu_parameters(lm, monkeypatch):
    """The student's optimizer is AdamW's fused kernel (one pass per parameter); integer or empty parameter
    lists keep the default loop."""
    from edgekd.distill import lm_trainer

    made = []
    real = torch.optim.AdamW

    def spy(params, **kw):
        made.append(kw)
        return real(params, **kw)

    monkeypatch.setattr(lm_trainer.torch.optim, "AdamW", spy)
    loaded, splits = lm
    student, _ = build_lm_student(loaded.model, {"layers": 2}, init="scratch")
    train_lm(student, splits.train.ids, splits.val.ids, steps=2, lr=3e-3, batch_size=8, seed=0, alpha=0.0)
    assert made == [{"lr": 3e-3, "weight_decay": 0.01, "fused": True}]
    assert not lm_trainer._fusable([]) and not lm_trainer._fusable([torch.zeros(2, dtype=torch.long)])
