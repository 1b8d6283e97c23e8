"""Self-distillation (Zhang et al. 2019, "Be Your Own Teacher"): auxiliary classifiers on intermediate
layers of the student, named by module path; the deepest exit (the student's own output) learns from
the labels and teaches the shallower exits with its softened output. No separate teacher is used.
The auxiliary heads and their hooks are dropped afterwards: the exported student is the plain model."""
from __future__ import annotations

import time
from collections.abc import Sequence

import torch
from torch import nn

from ...context import RunContext
from ...errors import ConfigError
from ..features import FeatureTap, probe_shapes
from ..losses import labeled_cross_entropy, soft_kl
from .common import device_of, finish, fit, loop_metrics, splits_of, total_steps, transfer_views

KEY = "distill.strategy_options.self.exits"

__all__ = ["AuxiliaryHead", "SelfDistillNet", "run", "self_distill_loss"]


class AuxiliaryHead(nn.Module):
    """A small classifier on an intermediate output: 1x1 conv + BN + ReLU + global pooling + linear
    for NCHW maps, linear for (N, C) vectors."""

    def __init__(self, channels: int, num_classes: int, width: int, spatial: bool):
        super().__init__()
        self.body: nn.Module = nn.Sequential(
            nn.Conv2d(channels, width, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True),
            nn.AdaptiveAvgPool2d(1), nn.Flatten()) if spatial else nn.Identity()
        self.fc = nn.Linear(width if spatial else channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.body(x))


class SelfDistillNet(nn.Module):
    """The student with auxiliary heads at `exits`; forward returns the exits' logits, shallowest first
    and the student's own output last."""

    def __init__(self, student: nn.Module, exits: Sequence[str], num_classes: int, width: int,
                 example: torch.Tensor):
        super().__init__()
        self.student = student
        shapes = probe_shapes(student, exits, example, KEY)
        for path, shape in zip(exits, shapes, strict=True):
            if len(shape) not in (2, 4):
                raise ConfigError(f"{KEY}: layer {path!r} gives shape {tuple(shape)}; an exit needs an NCHW map "
                                  "or an (N, C) vector")
        self.heads = nn.ModuleList([AuxiliaryHead(s[1], num_classes, width, len(s) == 4) for s in shapes])
        self.tap = FeatureTap(student, exits, KEY)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        final = self.student(x)
        return [h(f) for h, f in zip(self.heads, self.tap.take(), strict=True)] + [final]

    def detach_student(self) -> nn.Module:
        """Remove the hooks and return the plain student (the heads stay behind)."""
        self.tap.remove()
        return self.student


def self_distill_loss(exit_logits: Sequence[torch.Tensor], labels: torch.Tensor, temperature: float,
                      alpha: float) -> tuple[torch.Tensor, list[float]]:
    """CE(deepest exit, labels) + sum over shallower exits of (1 - alpha) CE + alpha T^2 KL(deepest || exit),
    the deepest exit's output detached as the soft target. Returns the total and each exit's term."""
    deepest = exit_logits[-1]
    target = deepest.detach()
    terms = [(1.0 - alpha) * labeled_cross_entropy(z, labels) + alpha * soft_kl(z, target, temperature)
             for z in exit_logits[:-1]]
    terms.append(labeled_cross_entropy(deepest, labels))
    return torch.stack(terms).sum(), [float(t.detach()) for t in terms]


def run(ctx: RunContext, teacher: nn.Module, student: nn.Module) -> tuple[nn.Module, dict]:
    """Train `student` with auxiliary exits taught by its deepest exit; return it without them."""
    from ...data import transfer_set

    started = time.perf_counter()
    cfg, splits = ctx.config, splits_of(ctx)
    d, opts = cfg.distill, cfg.distill.strategy_options.self
    kd_set = transfer_set(splits)
    views = transfer_views(ctx, kd_set)
    net = SelfDistillNet(student, opts.exits, splits.num_classes, opts.head_width, views[0][:2])

    def loss_fn(step: int, xb: torch.Tensor, yb: torch.Tensor, idx: torch.Tensor, draw: int) -> torch.Tensor:
        return self_distill_loss(net(xb), yb, d.temperature, d.alpha)[0]

    steps = total_steps(d.steps, d.epochs, len(kd_set), cfg.data.batch_size)
    try:
        res = fit([net], loss_fn, kd_set, splits.val, watch={"student": student}, views=views, steps=steps, lr=d.lr,
                  seed=cfg.seed, batch_size=cfg.data.batch_size, progress=ctx.progress,
                  label="self-distilling student", device=device_of(ctx),
                  precision=ctx.config.distill.precision)
        exit_acc = _exit_accuracies(net, splits.val.x, splits.val.y)
    finally:
        student = net.detach_student()
    metrics = loop_metrics("self", res, temperature=d.temperature, alpha=d.alpha,
                           val_accuracy_torch=res.best["student"],
                           exits=[{"layer": p, "val_accuracy_torch": a} for p, a in zip(opts.exits, exit_acc[:-1], strict=True)],
                           final_exit_val_accuracy_torch=exit_acc[-1],
                           auxiliary_params=sum(p.numel() for p in net.heads.parameters()))
    return student, finish(ctx, teacher, student, metrics, started)


@torch.no_grad()
def _exit_accuracies(net: SelfDistillNet, x: torch.Tensor, y: torch.Tensor) -> list[float]:
    """Validation accuracy (PyTorch, percent) of each exit, the deepest last."""
    net.cpu().eval()
    correct: list[float] = []
    for i in range(0, len(x), 256):
        outs = net(x[i:i + 256])
        hits = [float((o.argmax(1) == y[i:i + 256]).sum()) for o in outs]
        correct = hits if not correct else [a + b for a, b in zip(correct, hits, strict=True)]
    return [round(100.0 * c / max(len(x), 1), 4) for c in correct]
