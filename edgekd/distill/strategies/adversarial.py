"""Adversarial distillation (Xu et al. 2017; Wang et al. 2018): beside the KD loss, a discriminator
learns to tell the teacher's outputs from the student's, and the student learns to fool it. The
discriminator sees each model's softened class distribution (its log-probabilities at the KD
temperature), the features the two models share whatever their architectures; it is a small MLP that
exists only in training. Each step trains both with one backward pass: the discriminator's loss reaches
only the discriminator (the student's outputs are detached), and the student's fooling term goes
through a copy of the discriminator's weights with no gradient, so it reaches only the student."""
from __future__ import annotations

import math
import time

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from ...context import RunContext
from ..losses import labeled_cross_entropy, soft_kl
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

__all__ = ["Discriminator", "adversarial_losses", "run"]


class Discriminator(nn.Module):
    """An MLP scoring a class distribution (log-probabilities) as the teacher's (logit > 0) or not."""

    def __init__(self, num_classes: int, hidden: int):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(num_classes, hidden), nn.LeakyReLU(0.2), nn.Linear(hidden, hidden),
                                 nn.LeakyReLU(0.2), nn.Linear(hidden, 1))

    def forward(self, log_probs: torch.Tensor) -> torch.Tensor:
        return self.net(log_probs).squeeze(1)


def adversarial_losses(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor,
                       disc: Discriminator, *, temperature: float, alpha: float, weight: float
                       ) -> tuple[torch.Tensor, torch.Tensor, dict[str, float]]:
    """(the student's loss, the discriminator's loss, logged figures).

    Student: (1 - alpha) CE(labeled) + alpha T^2 KL(teacher^T || student^T) + weight * BCE(D(student), teacher).
    Discriminator: BCE(D(teacher), teacher) + BCE(D(student, detached), student). The student's term
    calls D with detached weights, so neither loss trains the other's parameters."""
    t = temperature
    s_lp = F.log_softmax(student_logits / t, dim=1)
    t_lp = F.log_softmax(teacher_logits.float() / t, dim=1)
    frozen = {k: v.detach() for k, v in disc.named_parameters()}
    fool = functional_call(disc, frozen, (s_lp,))
    student_loss = (1.0 - alpha) * labeled_cross_entropy(student_logits, labels) + \
        alpha * soft_kl(student_logits, teacher_logits.float(), t) + \
        weight * F.binary_cross_entropy_with_logits(fool, torch.ones_like(fool))
    real, fake = disc(t_lp), disc(s_lp.detach())
    disc_loss = F.binary_cross_entropy_with_logits(real, torch.ones_like(real)) + \
        F.binary_cross_entropy_with_logits(fake, torch.zeros_like(fake))
    with torch.no_grad():
        told = float(((real > 0).float().mean() + (fake <= 0).float().mean()) / 2)
    return student_loss, disc_loss, {"discriminator_accuracy": told, "fooled": float((fool > 0).float().mean())}


def run(ctx: RunContext, teacher: nn.Module, student: nn.Module) -> tuple[nn.Module, dict]:
    """Distil `student` with the KD loss plus the adversarial term; the discriminator is dropped after."""
    from ...data import transfer_set

    started = time.perf_counter()
    cfg, splits = ctx.config, splits_of(ctx)
    d, opts = cfg.distill, cfg.distill.strategy_options.adversarial
    kd_set = transfer_set(splits)
    views = transfer_views(ctx, kd_set)
    cache = teacher_cache(ctx, teacher, views)
    torch.manual_seed(cfg.seed + 2)
    disc = Discriminator(splits.num_classes, opts.hidden)
    per_epoch: dict[int, dict[str, list[float]]] = {}
    steps = total_steps(d.steps, d.epochs, len(kd_set), cfg.data.batch_size)
    steps_per_epoch = max(1, math.ceil(len(kd_set) / cfg.data.batch_size))

    def loss_fn(step: int, xb: torch.Tensor, yb: torch.Tensor, idx: torch.Tensor, draw: int) -> torch.Tensor:
        s_loss, d_loss, figs = adversarial_losses(student(xb), cache.get(draw, idx).to(xb.device), yb, disc,
                                                  temperature=d.temperature, alpha=d.alpha, weight=opts.weight)
        row = per_epoch.setdefault(step // steps_per_epoch + 1, {k: [] for k in figs})
        for k, v in figs.items():
            row[k].append(v)
        return s_loss + opts.discriminator_weight * d_loss

    res = fit([student, disc], loss_fn, kd_set, splits.val, watch={"student": student}, views=views, steps=steps,
              lr=d.lr, seed=cfg.seed, batch_size=cfg.data.batch_size, progress=ctx.progress,
              label="distilling student (adversarial)", device=device_of(ctx), precision=d.precision)
    metrics = loop_metrics("adversarial", res, temperature=d.temperature, alpha=d.alpha, weight=opts.weight,
                           discriminator={"hidden": opts.hidden, "input": "log-probabilities at the KD temperature",
                                          "per_epoch": [{"epoch": e, **{k: round(sum(v) / len(v), 4)
                                                                        for k, v in row.items()}}
                                                        for e, row in sorted(per_epoch.items())]},
                           val_accuracy_torch=res.best["student"], teacher_cache_seconds=round(cache.seconds, 3))
    return student, finish(ctx, teacher, student, metrics, started)
