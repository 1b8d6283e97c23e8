"""Born-Again networks (Furlanello et al. 2018): N generations of the student's architecture, each
trained from a fresh initialisation and distilled from the previous generation; the first learns from
the configured teacher (or from the labels alone). Each generation's accuracy and the generations'
ensemble accuracy go into the report; the returned student is the last or the best generation."""
from __future__ import annotations

import copy
import time

import numpy as np
import torch
from torch import nn

from ...context import RunContext
from ..cache import frozen
from ..trainer import train
from .common import device_of, finish, onnx_logits, splits_of, transfer_views

__all__ = ["reinitialise", "run"]


def reinitialise(model: nn.Module, seed: int) -> nn.Module:
    """Reset every layer that can reset itself, from `seed` (a new generation starts from scratch)."""
    torch.manual_seed(seed)
    for m in model.modules():
        reset = getattr(m, "reset_parameters", None)
        if callable(reset):
            reset()
    return model


def run(ctx: RunContext, teacher: nn.Module, student: nn.Module) -> tuple[nn.Module, dict]:
    """Train the generations in turn; generation k (k >= 1) is distilled from generation k - 1."""
    from ...data import transfer_set

    started = time.perf_counter()
    cfg, splits = ctx.config, splits_of(ctx)
    d, opts = cfg.distill, cfg.distill.strategy_options.born_again
    kd_set = transfer_set(splits)
    kd_views = transfer_views(ctx, kd_set)
    initial = copy.deepcopy(student)
    previous: nn.Module | None = teacher if opts.first_teacher == "teacher" else None
    source = "distill teacher" if previous is not None else "labels only"
    models: list[nn.Module] = []
    rows: list[dict] = []
    epoch_seconds: list[float] = []
    curve: list[dict] = []
    for k in range(opts.generations):
        model = student if k == 0 else reinitialise(copy.deepcopy(initial), cfg.seed + k)
        distil = previous is not None and d.alpha > 0
        data = kd_set if distil else splits.train
        res = train(model, data, splits.val, epochs=d.epochs, steps=d.steps, lr=d.lr, seed=cfg.seed + k,
                    batch_size=cfg.data.batch_size, teacher=previous if distil else None,
                    temperature=d.temperature, alpha=d.alpha if distil else 0.0,
                    views=kd_views if distil else transfer_views(ctx, data), progress=ctx.progress,
                    label=f"born-again generation {k + 1}/{opts.generations}", device=device_of(ctx),
                    precision=d.precision, cache_topk=d.cache_topk)
        models.append(model)
        epoch_seconds += res.epoch_seconds
        curve += [{**r, "epoch": len(curve) + i + 1, "generation": k + 1} for i, r in enumerate(res.curve)]
        rows.append({"generation": k + 1, "teacher": source if distil else "labels only", "steps": res.steps,
                     "val_accuracy_torch": res.val_accuracy,
                     "epoch_seconds": [round(s, 4) for s in res.epoch_seconds]})
        previous = frozen(copy.deepcopy(model))
        source = f"generation {k + 1}"
    probs = []
    for row, model in zip(rows, models, strict=True):
        acc, logits = onnx_logits(ctx, model, f"generation_{row['generation']}")
        row["accuracy"] = acc
        e = np.exp(logits - logits.max(1, keepdims=True))
        probs.append(e / e.sum(1, keepdims=True))
    y = splits.test.y.numpy()
    ensemble = float((np.mean(probs, axis=0).argmax(1) == y).mean() * 100)
    chosen = len(models) - 1 if opts.keep == "last" else max(
        range(len(models)), key=lambda i: (rows[i]["val_accuracy_torch"], i))
    result = models[chosen]
    if result is not student:
        student.load_state_dict(result.state_dict())  # the caller's module carries the chosen weights
    metrics = {"strategy": "born_again", "temperature": d.temperature, "alpha": d.alpha,
               "generations": rows, "kept_generation": chosen + 1, "keep": opts.keep,
               "ensemble_accuracy": ensemble,
               "ensemble_accuracy_runtime": "mean of the generations' softmax outputs, each from onnxruntime fp32",
               "steps": sum(r["steps"] for r in rows), "epoch_seconds": [round(s, 4) for s in epoch_seconds],
               "curve": curve,
               "val_accuracy_torch": rows[chosen]["val_accuracy_torch"]}
    return student, finish(ctx, teacher, student, metrics, started)
