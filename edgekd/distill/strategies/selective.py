"""Selective (dynamic) KD: per sample, the student learns the teacher's soft target where the teacher
is confident (top-1 probability at T = 1 of at least distill.strategy_options.selective.threshold) and,
with require_correct, right; elsewhere it learns the hard label. An unlabeled sample counts only when
the teacher is confident (there is no label to check it against or to fall back on)."""
from __future__ import annotations

import time

import torch
import torch.nn.functional as F
from torch import nn

from ...context import RunContext
from .common import (
    device_of,
    finish,
    fit,
    loop_metrics,
    splits_of,
    teacher_cache,
    total_steps,
    transfer_views,
)

__all__ = ["run", "selection_mask", "selective_kd_loss"]


def selection_mask(teacher_logits: torch.Tensor, labels: torch.Tensor, threshold: float,
                   require_correct: bool = True) -> torch.Tensor:
    """True where the teacher's soft target is used: confident, and right when the label is known."""
    conf, pred = F.softmax(teacher_logits.float(), dim=1).max(dim=1)
    mask = conf >= threshold
    if require_correct:
        mask &= (pred == labels) | (labels < 0)
    return mask


def selective_kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor, *,
                      temperature: float, threshold: float, require_correct: bool = True
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean over the counted samples of T^2 KL(teacher^T || student^T) where selected, CE(label) elsewhere.

    Counted: labeled samples and selected unlabeled ones. Returns (loss, the selection mask)."""
    mask = selection_mask(teacher_logits, labels, threshold, require_correct)
    t = temperature
    log_p_s = F.log_softmax(student_logits / t, dim=1)
    log_p_t = F.log_softmax(teacher_logits.float() / t, dim=1)
    soft = (t * t) * (log_p_t.exp() * (log_p_t - log_p_s)).sum(dim=1)
    hard = F.cross_entropy(student_logits, labels.clamp_min(0), reduction="none")
    labeled = labels >= 0
    per_sample = torch.where(mask, soft, torch.where(labeled, hard, torch.zeros_like(hard)))
    counted = mask | labeled
    return per_sample.sum() / counted.sum().clamp_min(1), mask


def run(ctx: RunContext, teacher: nn.Module, student: nn.Module) -> tuple[nn.Module, dict]:
    """Distil `student` with per-sample selection between the teacher's soft target and the label."""
    from ...data import transfer_set

    started = time.perf_counter()
    cfg, splits = ctx.config, splits_of(ctx)
    d, opts = cfg.distill, cfg.distill.strategy_options.selective
    kd_set = transfer_set(splits)
    views = transfer_views(ctx, kd_set)
    cache = teacher_cache(ctx, teacher, views)
    counts = {"soft": 0, "hard": 0}

    def loss_fn(step: int, xb: torch.Tensor, yb: torch.Tensor, idx: torch.Tensor, draw: int) -> torch.Tensor:
        loss, mask = selective_kd_loss(student(xb), cache.get(draw, idx).to(xb.device), yb,
                                       temperature=d.temperature, threshold=opts.threshold,
                                       require_correct=opts.require_correct)
        counts["soft"] += int(mask.sum())
        counts["hard"] += int((~mask & (yb >= 0)).sum())
        return loss

    steps = total_steps(d.steps, d.epochs, len(kd_set), cfg.data.batch_size)
    res = fit([student], loss_fn, kd_set, splits.val, watch={"student": student}, views=views, steps=steps, lr=d.lr,
              seed=cfg.seed, batch_size=cfg.data.batch_size, progress=ctx.progress,
              label="distilling student (selective)", device=device_of(ctx),
              precision=ctx.config.distill.precision)
    seen = max(counts["soft"] + counts["hard"], 1)
    metrics = loop_metrics("selective", res, temperature=d.temperature, threshold=opts.threshold,
                           require_correct=opts.require_correct, soft_target_share=round(counts["soft"] / seen, 4),
                           val_accuracy_torch=res.best["student"], teacher_cache_seconds=round(cache.seconds, 3))
    return student, finish(ctx, teacher, student, metrics, started)
