"""Progressive distillation: the KD loss's alpha and temperature change over training. Stages
(distill.strategy_options.progressive.stages) each hold an alpha (and optionally a temperature) until a
share of training; temperature_start/temperature_end anneal the temperature over the whole run
(linear or cosine), overriding per-stage temperatures. Without either, distill.temperature holds."""
from __future__ import annotations

import math
import time

import torch
from torch import nn

from ...config.strategies import ProgressiveOptions
from ...context import RunContext
from ..losses import hinton_kd_loss
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

__all__ = ["run", "schedule", "schedule_table"]


def schedule(step: int, total: int, opts: ProgressiveOptions, alpha: float, temperature: float) -> tuple[float, float]:
    """(alpha, temperature) at optimizer step `step` (0-based) of `total`.

    The stage is the first whose `until` exceeds the share of training done (step / total); the
    annealed temperature runs from temperature_start at step 0 to temperature_end at step total - 1.
    `alpha` and `temperature` (distill.alpha / distill.temperature) fill what the options leave open."""
    done = step / max(total, 1)
    stage = next((s for s in opts.stages if done < s.until), opts.stages[-1] if opts.stages else None)
    if stage is not None:
        alpha = stage.alpha
        if stage.temperature is not None:
            temperature = stage.temperature
    if opts.temperature_start is not None and opts.temperature_end is not None:
        q = min(1.0, step / max(total - 1, 1))
        start, end = opts.temperature_start, opts.temperature_end
        if opts.anneal == "cosine":
            temperature = end + (start - end) * (1 + math.cos(math.pi * q)) / 2
        else:
            temperature = start + (end - start) * q
    return float(alpha), float(temperature)


def schedule_table(total: int, opts: ProgressiveOptions, alpha: float, temperature: float) -> list[dict]:
    """The schedule at the first step of each stage and at the last step, for the report."""
    marks = {0, max(total - 1, 0)}
    for s in opts.stages[:-1]:
        marks.add(min(max(total - 1, 0), math.ceil(s.until * total)))
    rows = []
    for step in sorted(marks):
        a, t = schedule(step, total, opts, alpha, temperature)
        rows.append({"step": step, "alpha": round(a, 6), "temperature": round(t, 6)})
    return rows


def run(ctx: RunContext, teacher: nn.Module, student: nn.Module) -> tuple[nn.Module, dict]:
    """Distil `student` with the scheduled alpha and temperature."""
    from ...data import transfer_set

    started = time.perf_counter()
    cfg, splits = ctx.config, splits_of(ctx)
    d, opts = cfg.distill, cfg.distill.strategy_options.progressive
    kd_set = transfer_set(splits)
    views = transfer_views(ctx, kd_set)
    cache = teacher_cache(ctx, teacher, views)
    steps = total_steps(d.steps, d.epochs, len(kd_set), cfg.data.batch_size)

    def loss_fn(step: int, xb: torch.Tensor, yb: torch.Tensor, idx: torch.Tensor, draw: int) -> torch.Tensor:
        alpha, temperature = schedule(step, steps, opts, d.alpha, d.temperature)
        return hinton_kd_loss(student(xb), cache.get(draw, idx).to(xb.device), yb, temperature, alpha)

    res = fit([student], loss_fn, kd_set, splits.val, watch={"student": student}, views=views, steps=steps, lr=d.lr,
              seed=cfg.seed, batch_size=cfg.data.batch_size, progress=ctx.progress,
              label="distilling student (progressive)", device=device_of(ctx),
              precision=ctx.config.distill.precision)
    metrics = loop_metrics("progressive", res, schedule=schedule_table(steps, opts, d.alpha, d.temperature),
                           anneal=opts.anneal if opts.temperature_start is not None else None,
                           val_accuracy_torch=res.best["student"], teacher_cache_seconds=round(cache.seconds, 3))
    return student, finish(ctx, teacher, student, metrics, started)
