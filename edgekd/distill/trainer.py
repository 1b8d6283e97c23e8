"""Training loops: supervised (teacher, baselines) and distillation with a cached teacher-logit table."""
from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from ..data import ArrayDataset, augment_batch
from ..progress import NullProgress, Progress
from .losses import hinton_kd_loss

AUG_DRAWS = 8  # augmentation draws per sample whose teacher logits are cached and reused


@dataclass
class TrainResult:
    """What a training run produced, for the report."""

    val_accuracy: float
    epoch_seconds: list[float] = field(default_factory=list)
    curve: list[dict] = field(default_factory=list)
    steps: int = 0
    cache_seconds: float = 0.0


@torch.no_grad()
def predict_logits(model: nn.Module, x: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """Logits of `model` in eval mode for all of `x`."""
    was = model.training
    model.eval()
    out = torch.cat([model(x[i:i + batch_size]) for i in range(0, len(x), batch_size)])
    model.train(was)
    return out


def accuracy(model: nn.Module, ds: ArrayDataset) -> float:
    """Top-1 accuracy in percent (PyTorch; used for model selection only, never in reports)."""
    pred = predict_logits(model, ds.x).argmax(1)
    return float((pred == ds.y).float().mean() * 100)


def augmented_views(x: torch.Tensor, seed: int, draws: int, augment: bool) -> list[torch.Tensor]:
    """`draws` deterministic augmentation draws of the whole training set."""
    if not augment:
        return [x]
    views = []
    for d in range(draws):
        g = torch.Generator().manual_seed(seed * 1000 + d)
        views.append(augment_batch(x, g))
    return views


class TeacherLogitCache:
    """Teacher outputs for each (sample, augmentation draw), computed once in float16 and reused."""

    def __init__(self, teacher: nn.Module, views: list[torch.Tensor]):
        teacher.eval()
        t0 = time.perf_counter()
        with torch.no_grad():
            self.logits = [predict_logits(teacher, v).to(torch.float16) for v in views]
        self.seconds = time.perf_counter() - t0

    def get(self, draw: int, idx: torch.Tensor) -> torch.Tensor:
        return self.logits[draw][idx].float()


def train(model: nn.Module, train_set: ArrayDataset, val_set: ArrayDataset, *, epochs: int, lr: float,
          seed: int, batch_size: int = 64, steps: int | None = None, teacher: nn.Module | None = None,
          temperature: float = 4.0, alpha: float = 0.0, augment: bool = True,
          cache: TeacherLogitCache | None = None, progress: Progress | None = None,
          label: str = "training") -> TrainResult:
    """Train `model` in place with CE (alpha=0 or no teacher) or Hinton KD; keeps the best-val weights.

    `steps`, when given, fixes the number of optimizer steps (epochs are then derived from it)."""
    progress = progress or NullProgress()
    torch.manual_seed(seed)
    n = len(train_set)
    per_epoch = max(1, math.ceil(n / batch_size))
    total_steps = steps if steps is not None else epochs * per_epoch
    if total_steps <= 0:
        return TrainResult(val_accuracy=accuracy(model, val_set))
    use_kd = teacher is not None and alpha > 0
    views = augmented_views(train_set.x, seed, AUG_DRAWS, augment)
    if use_kd and cache is None:
        cache = TeacherLogitCache(teacher, views)  # type: ignore[arg-type]
    labeled_only = not use_kd
    pool = torch.arange(n) if not labeled_only else torch.nonzero(train_set.y >= 0).flatten()
    if len(pool) == 0:
        raise ValueError("no labeled training samples")
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=5e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=total_steps, pct_start=0.15)
    gen = torch.Generator().manual_seed(seed)
    result = TrainResult(val_accuracy=-1.0, cache_seconds=cache.seconds if cache else 0.0)
    best_state, best_acc = None, -1.0
    step, epoch = 0, 0
    with progress.task(label, total_steps) as bar:
        while step < total_steps:
            model.train()
            t0 = time.perf_counter()
            draw = epoch % len(views)
            order = pool[torch.randperm(len(pool), generator=gen)]
            loss_sum, seen = 0.0, 0
            for i in range(0, len(order), batch_size):
                if step >= total_steps:
                    break
                idx = order[i:i + batch_size]
                xb, yb = views[draw][idx], train_set.y[idx]
                out = model(xb)
                if use_kd:
                    loss = hinton_kd_loss(out, cache.get(draw, idx), yb, temperature, alpha)  # type: ignore[union-attr]
                else:
                    loss = nn.functional.cross_entropy(out, yb)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                step += 1
                loss_sum += float(loss.detach()) * len(idx)
                seen += len(idx)
                bar.advance()
            result.epoch_seconds.append(time.perf_counter() - t0)
            acc = accuracy(model, val_set)
            result.curve.append({"epoch": epoch + 1, "loss": loss_sum / max(seen, 1), "val_accuracy": acc})
            if acc >= best_acc:
                best_acc, best_state = acc, copy.deepcopy(model.state_dict())
            epoch += 1
    if best_state is not None:
        model.load_state_dict(best_state)
    result.val_accuracy = best_acc
    result.steps = step
    return result


def agreement(a: np.ndarray, b: np.ndarray) -> float:
    """Top-1 agreement in percent between two logit arrays."""
    return float((a.argmax(1) == b.argmax(1)).mean() * 100)
