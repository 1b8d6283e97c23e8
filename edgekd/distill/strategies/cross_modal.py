"""Cross-modal distillation (Gupta et al. 2016): the teacher sees the preprocessed image, the student
what a cheaper sensor gives, declared in distill.strategy_options.cross_modal (greyscale, channels,
resolution; data/modality.py). Both see the same sample: the teacher's soft targets on each augmented
image (the shared logit cache) teach the student on that image's transform, beside the labels. The
student is built for its input (its first convolution takes the student's channels) and exported
taking it; the pipeline hands the later stages the student's view of every split."""
from __future__ import annotations

import time

import torch
from torch import nn

from ...context import RunContext
from ...data import ArrayDataset
from ...data.modality import InputTransform, TransformedImages, transform_splits
from ..losses import combined_loss
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

__all__ = ["input_transform", "prepare_student", "run"]


def input_transform(ctx: RunContext) -> InputTransform:
    """The student's input transform that distill.strategy_options.cross_modal declares."""
    o = ctx.config.distill.strategy_options.cross_modal
    return InputTransform(o.greyscale, o.channels, o.resolution)


def prepare_student(ctx: RunContext, student: nn.Module, input_shape: tuple[int, ...]) -> InputTransform:
    """Build `student` for its input (its first convolution takes the student's channels); the transform."""
    from ...models import adapt_input_channels

    transform = input_transform(ctx)
    adapt_input_channels(student, transform.output_shape(input_shape)[0])
    return transform


def run(ctx: RunContext, teacher: nn.Module, student: nn.Module) -> tuple[nn.Module, dict]:
    """Distil `student` (already taking the student's input) from the teacher's outputs on the full input."""
    from ...data import transfer_set

    started = time.perf_counter()
    cfg, splits = ctx.config, splits_of(ctx)
    d = cfg.distill
    transform = input_transform(ctx)
    kd_set = transfer_set(splits)
    views = transfer_views(ctx, kd_set)
    cache = teacher_cache(ctx, teacher, views)  # the teacher on the full input
    seen = transform_splits(splits, transform)
    student_set = ArrayDataset(TransformedImages(kd_set.x, transform), kd_set.y.numpy())
    student_views = [TransformedImages(v, transform) for v in views]

    def loss_fn(step: int, xb: torch.Tensor, yb: torch.Tensor, idx: torch.Tensor, draw: int) -> torch.Tensor:
        loss, _ = combined_loss(student(xb), cache.get(draw, idx).to(xb.device), yb, temperature=d.temperature,
                                alpha=d.alpha, weights={"kd": 1.0})
        return loss

    steps = total_steps(d.steps, d.epochs, len(kd_set), cfg.data.batch_size)
    res = fit([student], loss_fn, student_set, seen.val, watch={"student": student},  # type: ignore[arg-type]
              views=student_views, steps=steps, lr=d.lr, seed=cfg.seed, batch_size=cfg.data.batch_size,  # type: ignore[arg-type]
              progress=ctx.progress, label="distilling student (cross-modal)", device=device_of(ctx),
              precision=d.precision)
    metrics = loop_metrics("cross_modal", res, temperature=d.temperature, alpha=d.alpha,
                           val_accuracy_torch=res.best["student"], teacher_cache_seconds=round(cache.seconds, 3),
                           student_input={"transform": transform.describe(splits.input_shape),
                                          "shape": list(seen.input_shape), "teacher_shape": list(splits.input_shape)})
    return student, finish(ctx, teacher, student, metrics, started, student_x=seen.test.x.numpy())  # type: ignore[union-attr]
