"""Deep mutual learning (Zhang et al. 2018), online: two students trained together from different
initialisations, each learning from the labels and from the other's softened output. No teacher is
used. The configured student is returned; the peer (distill.strategy_options.mutual.peer, by default
the same architecture) is measured and reported beside it."""
from __future__ import annotations

import time

import torch
from torch import nn

from ...context import RunContext
from ...models import student_from
from ..losses import labeled_cross_entropy, soft_kl
from .common import device_of, finish, fit, loop_metrics, onnx_logits, splits_of, total_steps, transfer_views

__all__ = ["mutual_losses", "run"]


def mutual_losses(logits_a: torch.Tensor, logits_b: torch.Tensor, labels: torch.Tensor, temperature: float,
                  alpha: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss of a, loss of b): each (1 - alpha) CE(labels) + alpha T^2 KL(other || self), the other's output
    detached, so each KL term trains only the student it is the loss of."""
    loss_a = (1.0 - alpha) * labeled_cross_entropy(logits_a, labels) + \
        alpha * soft_kl(logits_a, logits_b.detach(), temperature)
    loss_b = (1.0 - alpha) * labeled_cross_entropy(logits_b, labels) + \
        alpha * soft_kl(logits_b, logits_a.detach(), temperature)
    return loss_a, loss_b


def run(ctx: RunContext, teacher: nn.Module, student: nn.Module) -> tuple[nn.Module, dict]:
    """Train `student` and a peer together, each distilling from the other; return `student`."""
    from ...data import transfer_set

    started = time.perf_counter()
    cfg, splits = ctx.config, splits_of(ctx)
    d, opts = cfg.distill, cfg.distill.strategy_options.mutual
    peer_spec = opts.peer or cfg.student.model
    torch.manual_seed(cfg.seed + 1)  # a different initialisation: mutual learning needs two views
    peer = student_from(peer_spec, teacher, splits.num_classes)
    kd_set = transfer_set(splits)
    parts: dict[str, float] = {}

    def loss_fn(step: int, xb: torch.Tensor, yb: torch.Tensor, idx: torch.Tensor, draw: int) -> torch.Tensor:
        loss_a, loss_b = mutual_losses(student(xb), peer(xb), yb, d.temperature, d.alpha)
        parts["student"], parts["peer"] = float(loss_a.detach()), float(loss_b.detach())
        return loss_a + loss_b

    steps = total_steps(d.steps, d.epochs, len(kd_set), cfg.data.batch_size)
    res = fit([student, peer], loss_fn, kd_set, splits.val, watch={"student": student, "peer": peer},
              views=transfer_views(ctx, kd_set), steps=steps, lr=d.lr, seed=cfg.seed,
              batch_size=cfg.data.batch_size, progress=ctx.progress, label="mutual learning (two students)",
              device=device_of(ctx),
              precision=ctx.config.distill.precision)
    peer_acc, _ = onnx_logits(ctx, peer.eval(), "peer")
    metrics = loop_metrics("mutual", res, temperature=d.temperature, alpha=d.alpha,
                           val_accuracy_torch=res.best["student"],
                           peer={"model": peer_spec, "accuracy": peer_acc, "val_accuracy_torch": res.best["peer"]},
                           last_losses=parts)
    return student, finish(ctx, teacher, student, metrics, started)
