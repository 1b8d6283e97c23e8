"""The distill stage: train the student from the teacher's soft targets (Hinton KD)."""
from __future__ import annotations

import time

import torch
from torch import nn

from ..context import RunContext
from ..runs import atomic_path
from .trainer import TeacherLogitCache, augmented_views, train, AUG_DRAWS


def distill_key(ctx: RunContext, teacher_key: str, student_spec: str) -> str:
    cfg = ctx.config
    return ctx.key("distill-v1", teacher_key, student_spec, cfg.distill.model_dump(mode="json"),
                   cfg.data.model_dump(mode="json"))


def run_distill(ctx: RunContext, teacher: nn.Module, student: nn.Module, key: str) -> tuple[nn.Module, dict]:
    """Train `student` in place with KD from `teacher`; with distill.baseline also train a no-KD twin."""
    cfg, splits = ctx.config, ctx.splits
    if splits is None:
        raise RuntimeError("distill needs data splits")
    d = cfg.distill
    out = ctx.stage_dir("distill")
    t0 = time.perf_counter()
    train_set = splits.train
    views = augmented_views(train_set.x, cfg.seed, AUG_DRAWS, cfg.data.augment)
    cache = TeacherLogitCache(teacher, views) if d.alpha > 0 else None
    res = train(student, train_set, splits.val, epochs=d.epochs, steps=d.steps, lr=d.lr, seed=cfg.seed,
                batch_size=cfg.data.batch_size, teacher=teacher, temperature=d.temperature, alpha=d.alpha,
                augment=cfg.data.augment, cache=cache, progress=ctx.progress, label="distilling student")
    with atomic_path(out / "model.pt") as tmp:
        torch.save(student.state_dict(), tmp)
    metrics = {
        "strategy": d.strategy, "temperature": d.temperature, "alpha": d.alpha, "steps": res.steps,
        "epoch_seconds": [round(s, 4) for s in res.epoch_seconds], "teacher_cache_seconds": round(res.cache_seconds, 3),
        "val_accuracy_torch": res.val_accuracy, "curve": res.curve,
    }
    if d.baseline:
        import copy

        twin = copy.deepcopy(student)
        for m in twin.modules():
            if hasattr(m, "reset_parameters"):
                m.reset_parameters()
        torch.manual_seed(cfg.seed)
        base = train(twin, train_set, splits.val, epochs=d.epochs, steps=d.steps, lr=d.lr, seed=cfg.seed,
                     batch_size=cfg.data.batch_size, teacher=None, alpha=0.0, augment=cfg.data.augment,
                     progress=ctx.progress, label="baseline (no KD)")
        with atomic_path(out / "baseline.pt") as tmp:
            torch.save(twin.state_dict(), tmp)
        metrics["baseline_epoch_seconds"] = [round(s, 4) for s in base.epoch_seconds]
    metrics["duration_s"] = round(time.perf_counter() - t0, 2)
    return student, metrics
