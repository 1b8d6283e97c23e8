"""What the strategies share: the transfer set and its augmentation draws, the teacher-logit table, a
training loop over several modules with a per-step loss, and the stage's closing measurements (the
returned student saved, exported and measured with ONNX Runtime on the held-out test split)."""
from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Mapping
from contextlib import nullcontext
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from ...context import RunContext
from ...data import ArrayDataset, Splits
from ...progress import NullProgress, Progress
from ...runs import atomic_path
from ..batchnorm import reestimate_bn
from ..cache import TeacherLogitCache
from ..trainer import AUG_DRAWS, PRECISION_NAMES, augmented_views, autocast_dtype, evaluate, resolve_device

# loss(step, inputs, labels, sample indices, augmentation draw) -> scalar loss
StepLoss = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor, int], torch.Tensor]


def splits_of(ctx: RunContext) -> Splits:
    """The run's data splits (every strategy needs at least the held-out test split)."""
    if ctx.splits is None:
        raise RuntimeError("distill needs data splits")
    return ctx.splits


def transfer_views(ctx: RunContext, train_set: ArrayDataset) -> list[torch.Tensor]:
    """The deterministic augmentation draws of `train_set` (as the KD stage makes them)."""
    return augmented_views(train_set.x, ctx.config.seed, AUG_DRAWS, ctx.config.data.augment)


def teacher_cache(ctx: RunContext, teacher: nn.Module, views: list[torch.Tensor]) -> TeacherLogitCache:
    """The frozen teacher's logits for every draw, computed once (or read from the disk cache)."""
    from .. import parallel

    return parallel.shared_cache(teacher, views, topk=ctx.config.distill.cache_topk)


def total_steps(steps: int | None, epochs: int, samples: int, batch_size: int) -> int:
    """Optimizer steps of a run: `steps` when given, else epochs * ceil(samples / batch_size)."""
    return steps if steps is not None else epochs * max(1, math.ceil(samples / batch_size))


@dataclass
class LoopResult:
    """What `fit` did: steps, seconds per epoch, the validation curve and each watched model's best accuracy."""

    steps: int = 0
    epoch_seconds: list[float] = field(default_factory=list)
    curve: list[dict] = field(default_factory=list)
    best: dict[str, float] = field(default_factory=dict)
    precision: str = "fp32"


def fit(trainable: list[nn.Module], loss_fn: StepLoss, train_set: ArrayDataset, val_set: ArrayDataset, *,
        watch: Mapping[str, nn.Module], views: list[torch.Tensor], steps: int, lr: float, seed: int,
        batch_size: int, progress: Progress | None = None, label: str = "training",
        device: torch.device | None = None, precision: str = "fp32") -> LoopResult:
    """Train the parameters of `trainable` (AdamW, one-cycle schedule) for `steps` steps of `loss_fn`.

    Each epoch visits the samples in a seeded order, taking epoch e's inputs from augmentation draw
    e mod len(views); after each epoch the BatchNorm statistics of every trainable module are
    re-estimated on `train_set`'s inputs, every watched model is scored on `val_set`, and each ends
    with its best-validation weights (ties go to the lower validation loss).

    Under torchrun each global batch is split across the ranks; gradients are averaged over them and
    rank 0's buffers shared after every step, as DistributedDataParallel does. On GPU, `precision`
    (distill.precision) runs the forward passes and losses under bf16/fp16 autocast, fp16 with a
    gradient scaler; on the CPU training stays in fp32."""
    from .. import parallel

    rank, world = parallel.rank_and_world()
    progress = (progress or NullProgress()) if rank == 0 else NullProgress()
    dev = device or torch.device("cpu")
    torch.manual_seed(seed)
    params = list({id(p): p for m in trainable for p in m.parameters() if p.requires_grad}.values())
    for m in trainable:
        m.to(dev)
    pool = torch.arange(len(train_set))  # every sample: unlabeled ones (-1) get the loss's label-free terms
    if len(pool) == 0:
        raise ValueError("no training samples")
    result = LoopResult()
    if steps <= 0:  # nothing to train: the watched models are scored as they are
        result.best = {name: evaluate(model.to("cpu"), val_set)[0] for name, model in watch.items()}
        return result
    amp = autocast_dtype(precision, dev)
    result.precision = PRECISION_NAMES[amp]
    scaler = torch.amp.GradScaler("cuda") if amp is torch.float16 else None
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=5e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.15)
    gen = torch.Generator().manual_seed(seed)
    best = {name: (-1.0, float("inf"), None) for name in watch}
    step, epoch = 0, 0
    with progress.task(label, steps) as bar:
        while step < steps:
            for m in trainable:
                m.train()
            t0 = time.perf_counter()
            draw = epoch % len(views)
            order = pool[torch.randperm(len(pool), generator=gen)]
            loss_sum, seen = 0.0, 0
            for i in range(0, len(order), batch_size):
                if step >= steps:
                    break
                idx = order[i:i + batch_size]
                if world > 1:
                    if len(idx) < world:
                        continue  # every rank skips alike: they share the order
                    idx = idx[rank::world]
                xb, yb = views[draw][idx].to(dev), train_set.y[idx].to(dev)
                with torch.autocast(dev.type, dtype=amp) if amp is not None else nullcontext():
                    loss = loss_fn(step, xb, yb, idx, draw)
                opt.zero_grad(set_to_none=True)
                if scaler is not None:
                    scaler.scale(loss).backward()
                    parallel.average_gradients(params)  # scaled, as DDP does: every rank then sees the same infs
                    scaler.step(opt)
                    scaler.update()
                else:
                    loss.backward()
                    parallel.average_gradients(params)
                    opt.step()
                parallel.broadcast_buffers(trainable)
                sched.step()
                step += 1
                loss_sum += float(loss.detach()) * len(idx)
                seen += len(idx)
                bar.advance()
            result.epoch_seconds.append(time.perf_counter() - t0)
            row: dict = {"epoch": epoch + 1, "loss": round(parallel.mean_over_ranks(loss_sum, seen), 5),
                         "seconds": round(result.epoch_seconds[-1], 4)}
            for m in trainable:  # the running statistics of the weights just trained, before scoring
                reestimate_bn(m, train_set.x, seed=seed, batch_size=batch_size)
            for name, model in watch.items():
                acc, vloss = evaluate(model, val_set)
                row[f"val_accuracy_{name}" if len(watch) > 1 else "val_accuracy"] = acc
                if (acc, -vloss) >= (best[name][0], -best[name][1]):
                    best[name] = (acc, vloss, copy.deepcopy(model.state_dict()))
            result.curve.append(row)
            epoch += 1
    for name, model in watch.items():
        if best[name][2] is not None:
            model.load_state_dict(best[name][2])
        model.to("cpu")
    for m in trainable:
        m.to("cpu")
    result.steps = step
    result.best = {name: b[0] for name, b in best.items()}
    return result


def device_of(ctx: RunContext) -> torch.device:
    """The training device distill.device asks for."""
    return resolve_device(ctx.config.distill.device)


def onnx_logits(ctx: RunContext, model: nn.Module, name: str, x: np.ndarray | None = None) -> tuple[float, np.ndarray]:
    """Export `model` as stages/distill/<name>.onnx; its top-1 accuracy (ONNX Runtime) and logits on the test
    split (`x`: the model's own view of its inputs, when it is not the teacher's)."""
    from ...export import onnx_accuracy

    test = splits_of(ctx).test
    return onnx_accuracy(ctx, model, ctx.stage_dir("distill") / f"{name}.onnx",
                         test.x.numpy() if x is None else x, test.y.numpy())


def finish(ctx: RunContext, teacher: nn.Module, student: nn.Module, metrics: dict, started: float,
           student_x: np.ndarray | None = None) -> dict:
    """Save and measure the returned student like the KD stage does: model.pt, model.onnx, accuracy,
    teacher accuracy and agreement (ONNX Runtime, held-out test split), duration. `student_x`: the
    student's view of the test split where it takes another input than the teacher (cross_modal)."""
    from ...export import onnx_accuracy

    splits = splits_of(ctx)
    out = ctx.stage_dir("distill")
    student = student.cpu().eval()
    with atomic_path(out / "model.pt") as tmp:
        torch.save(student.state_dict(), tmp)
    acc, logits = onnx_logits(ctx, student, "model", student_x)
    x, y = splits.test.x.numpy(), splits.test.y.numpy()
    teacher_onnx = ctx.run_dir / "teacher.fp32.onnx"
    teacher_acc, teacher_logits = onnx_accuracy(ctx, None if teacher_onnx.exists() else teacher,  # type: ignore[arg-type]
                                                teacher_onnx if teacher_onnx.exists() else out / "teacher.onnx", x, y)
    metrics.update({
        "accuracy": acc, "teacher_accuracy": teacher_acc,
        "agreement": float((logits.argmax(1) == teacher_logits.argmax(1)).mean() * 100),
        "accuracy_runtime": "onnxruntime fp32 (this host), held-out test split", "gap_recovered": None,
    })
    not_measured = dict(metrics.get("not_measured") or {})
    not_measured.setdefault("gap_recovered", "measured for distill.strategy kd with distill.baseline: true")
    metrics["not_measured"] = not_measured
    metrics["duration_s"] = round(time.perf_counter() - started, 2)
    return metrics


def loop_metrics(strategy: str, res: LoopResult, **extra: object) -> dict:
    """The stage metrics every strategy reports about its training run."""
    return {"strategy": strategy, "steps": res.steps, "epoch_seconds": [round(s, 4) for s in res.epoch_seconds],
            "curve": res.curve, "precision": res.precision, **extra}
