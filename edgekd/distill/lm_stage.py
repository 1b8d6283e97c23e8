"""The distill stage for task causal-lm: token-level distillation from the teacher's top-k cache (built
once per teacher, data and batch size, in the user cache, and reused by later runs), optionally over the
teacher's own continuations (distill.sequence_kd: a share of the blocks, or with distill.sequence_steps those
of the batches it trains on last) and with on-policy steps (distill.on_policy); with distill.baseline the
same student trained on next-token cross-entropy alone for the same steps, on the text as written."""
from __future__ import annotations

import copy
import time

import numpy as np
import torch
from torch import nn

from ..context import RunContext
from ..data.text import TextSplits
from ..errors import BadInputError, StageError
from ..runs import cache_dir, hash_arrays, hash_obj
from .lm_cache import TopKCache
from .lm_sequence import sequence_kd_blocks
from .lm_trainer import build_topk_cache, lm_amp, train_lm
from .trainer import PRECISION_NAMES as PRECISION

__all__ = ["last_step_batches", "lm_distill_key", "lm_steps", "run_lm_distill", "teacher_topk_cache"]


def lm_steps(ctx: RunContext, splits: TextSplits) -> int:
    """distill.steps, else distill.epochs passes over the training batches (at least one step)."""
    d, bs = ctx.config.distill, ctx.config.data.batch_size
    batches = -(-len(splits.train) // bs)
    return d.steps if d.steps is not None else max(1, d.epochs * batches)


def lm_distill_key(ctx: RunContext, teacher_key: str, splits: TextSplits) -> str:
    cfg = ctx.config
    distill = cfg.distill.model_dump(mode="json")
    if distill.get("sequence_steps") is None:
        distill.pop("sequence_steps", None)  # keys as they were before distill.sequence_steps existed
    return ctx.key("lm-distill-v1", teacher_key, hash_arrays(splits.train.ids.numpy(), splits.val.ids.numpy()),
                   cfg.student.model_dump(mode="json"), distill, cfg.data.batch_size)


def last_step_batches(n_blocks: int, batch_size: int, steps: int, count: int) -> list[int]:
    """The `count` batches (of `n_blocks` blocks, `batch_size` each) the student trains on last, one draw that
    every run seed shares (so the teacher writes them once); BadInputError where they leave no other step."""
    batches = -(-n_blocks // batch_size)
    if count >= batches or count > steps:
        raise BadInputError(f"distill.sequence_steps {count}: the training split has {batches} batches of "
                            f"{batch_size} blocks and the student trains {steps} steps; sequence_steps must be "
                            f"less than {batches} and at most {steps}")
    return sorted(int(b) for b in np.random.default_rng(0).choice(batches, count, replace=False))


def teacher_topk_cache(ctx: RunContext, teacher: nn.Module, teacher_key: str, splits: TextSplits,
           blocks: torch.Tensor | None = None, amp: torch.dtype | None = None) -> tuple[TopKCache, dict]:
    """The teacher's top-k cache over `blocks` (default: the training blocks), built where missing, the
    teacher's layers under `amp` autocast (its head in fp32)."""
    cfg = ctx.config
    blocks = splits.train.ids if blocks is None else blocks
    k = min(int(cfg.distill.cache_topk), splits.vocab_size)  # type: ignore[arg-type]
    parts = ("lm-topk-v1", teacher_key, hash_arrays(blocks.numpy()), cfg.data.batch_size, k)
    key = hash_obj(*parts, PRECISION[amp]) if amp is not None else hash_obj(*parts)  # fp32 keys as they were
    cache = TopKCache(cache_dir() / "lm-topk" / key, key, k=k, vocab=splits.vocab_size)
    t0 = time.perf_counter()
    built = build_topk_cache(teacher, blocks, cfg.data.batch_size, cache, ctx.progress, amp)
    info = {"k": k, "precision": PRECISION[amp], "directory": str(cache.directory), "batches": len(cache.batches()),
            "built_batches": built, "reused": built == 0, "mb": round(cache.nbytes() / 2**20, 2),
            "seconds": round(time.perf_counter() - t0, 2)}
    return cache, info


def run_lm_distill(ctx: RunContext, teacher: nn.Module, teacher_key: str, student: nn.Module,
                   splits: TextSplits) -> tuple[nn.Module, dict, nn.Module | None]:
    """Distil `student` in place; returns it, the stage's metrics and (distill.baseline) the CE-only twin."""
    cfg = ctx.config
    d = cfg.distill
    steps = lm_steps(ctx, splits)
    amp = lm_amp(d.precision)
    initial = copy.deepcopy(student.state_dict()) if d.baseline else None
    t0 = time.perf_counter()
    metrics: dict = {"strategy": "kd", "loss": d.loss, "alpha": d.alpha, "temperature": d.temperature,
                     "steps": steps, "batch_size": cfg.data.batch_size, "seq_len": splits.seq_len,
                     "train_tokens": splits.train.tokens, "precision": PRECISION[amp]}
    if d.loss == "jsd":
        metrics["beta"] = d.beta
    blocks, last = splits.train.ids, []
    if d.sequence_kd:  # the transfer set is the training text as the teacher continues it
        rows = None
        if d.sequence_steps:  # the blocks of the batches trained on last
            bs = cfg.data.batch_size
            last = last_step_batches(len(blocks), bs, steps, d.sequence_steps)
            rows = np.concatenate([np.arange(b * bs, min((b + 1) * bs, len(blocks))) for b in last])
        blocks, metrics["sequence_kd"] = sequence_kd_blocks(teacher, teacher_key, blocks, d.sequence_kd,
                                                            d.sequence_share, progress=ctx.progress, rows=rows)
        if last:
            metrics["sequence_kd"]["last_steps"] = len(last)
    cache = None
    if d.alpha > 0 and d.cache_topk:
        cache, metrics["teacher_cache"] = teacher_topk_cache(ctx, teacher, teacher_key, splits, blocks, amp)
    policy_tokens = d.sequence_kd or max(1, splits.seq_len // 4)
    res = train_lm(student, blocks, splits.val.ids, steps=steps, lr=d.lr, batch_size=cfg.data.batch_size,
                   seed=cfg.seed, kind=d.loss, alpha=d.alpha, temperature=d.temperature, beta=d.beta,
                   teacher=None if cache is not None else teacher, cache=cache, progress=ctx.progress,
                   label="distilling the LM student", on_policy=d.on_policy,
                   policy_teacher=teacher if d.on_policy else None, policy_tokens=policy_tokens, amp=amp,
                   last_batches=last)
    metrics.update({"val_perplexity": round(res.val_perplexity, 4), "best_step": res.best_step, "step_curve": res.curve,
                    "train_seconds": res.seconds})
    _check_progress(ctx, res, "the distilled student", metrics)
    if d.on_policy:
        metrics["on_policy"] = {"share": d.on_policy, "steps": res.on_policy_steps, "sampled_tokens": policy_tokens}
    baseline = None
    if initial is not None:
        baseline = copy.deepcopy(student)
        baseline.load_state_dict(initial)
        base = train_lm(baseline, splits.train.ids, splits.val.ids, steps=steps, lr=d.lr,
                        batch_size=cfg.data.batch_size, seed=cfg.seed, alpha=0.0, progress=ctx.progress,
                        label="training the cross-entropy baseline", amp=amp)
        metrics["baseline"] = {"steps": steps, "val_perplexity": round(base.val_perplexity, 4),
                               "best_step": base.best_step, "train_seconds": base.seconds}
        _check_progress(ctx, base, "the cross-entropy baseline", metrics["baseline"], fail=False)
    metrics["duration_s"] = round(time.perf_counter() - t0, 2)
    return student, metrics, baseline


def _check_progress(ctx: RunContext, res, who: str, entry: dict, fail: bool = True) -> None:
    """Training that never bettered the initial weights on validation keeps them (best_step 0): said in a
    note and in the stage's entry; where the perplexity blew up (more than doubled, or overflowed) the
    student diverged, a failure (exit 3) unless allow_collapse."""
    if res.best_step > 0 or res.steps == 0:
        return
    first = res.curve[0]["val_perplexity"]
    last = res.curve[-1].get("val_perplexity")
    diverged = last is None or last > 2 * first
    lr = ctx.config.distill.lr
    said = (f"distill: {who} never bettered its initial validation perplexity {first:g} in {res.steps} steps "
            f"(last {'inf' if last is None else f'{last:g}'}); it keeps its initial weights")
    entry["kept_initial_weights"] = True
    if diverged and fail and not ctx.config.allow_collapse:
        raise StageError(f"{said}: training diverged; lower distill.lr (now {lr:g}); allow_collapse: true keeps "
                         "the initial weights")
    ctx.notes.append(said + (f": training diverged at distill.lr {lr:g}" if diverged else ""))
