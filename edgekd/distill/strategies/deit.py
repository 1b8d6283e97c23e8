"""DeiT-style distillation (Touvron et al. 2021) for ViT students: beside the class token the student
has a learnable distillation token with its own head, trained on the teacher's predictions (hard:
the teacher's top-1 class; soft: its softened output) while the class head learns from the labels.
At inference the model returns the mean of the two heads' logits: one input, one output, exportable.

The ViT is built from torchvision's transformer encoder with the sizes in
distill.strategy_options.deit; a student that is already a DistilledViT is trained as it is."""
from __future__ import annotations

import time

import torch
import torch.nn.functional as F
from torch import nn

from ...context import RunContext
from ...errors import ConfigError
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

__all__ = ["DistilledViT", "deit_loss", "run"]


class DistilledViT(nn.Module):
    """A small vision transformer with a class token and a distillation token (DeiT).

    `heads(x)` returns (class-head logits, distillation-head logits); `forward(x)` their mean."""

    def __init__(self, num_classes: int, image_size: int, in_channels: int = 3, patch_size: int = 4,
                 hidden_dim: int = 64, depth: int = 4, heads: int = 4, mlp_dim: int = 128):
        super().__init__()
        from torchvision.models.vision_transformer import Encoder

        if image_size % patch_size:
            raise ConfigError(f"distill.strategy_options.deit.patch_size {patch_size} does not divide the image "
                              f"size {image_size} (data.image_size)")
        patches = (image_size // patch_size) ** 2
        self.patch_embed = nn.Conv2d(in_channels, hidden_dim, patch_size, patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, hidden_dim))
        self.dist_token = nn.Parameter(torch.zeros(1, 1, hidden_dim))
        self.encoder = Encoder(patches + 2, depth, heads, hidden_dim, mlp_dim, dropout=0.0, attention_dropout=0.0)
        self.head = nn.Linear(hidden_dim, num_classes)
        self.head_dist = nn.Linear(hidden_dim, num_classes)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        nn.init.trunc_normal_(self.dist_token, std=0.02)

    def heads(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits of the class head and of the distillation head."""
        n = x.shape[0]
        tokens = self.patch_embed(x).flatten(2).transpose(1, 2)
        tokens = torch.cat([self.cls_token.expand(n, -1, -1), self.dist_token.expand(n, -1, -1), tokens], dim=1)
        out = self.encoder(tokens)
        return self.head(out[:, 0]), self.head_dist(out[:, 1])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        cls_logits, dist_logits = self.heads(x)
        return (cls_logits + dist_logits) / 2


def deit_loss(cls_logits: torch.Tensor, dist_logits: torch.Tensor, teacher_logits: torch.Tensor,
              labels: torch.Tensor, *, alpha: float, temperature: float, hard: bool = True) -> torch.Tensor:
    """(1 - alpha) CE(class head, labels) + alpha L(distillation head, teacher): L is CE against the
    teacher's top-1 class (hard) or T^2 KL from its softened output (soft)."""
    if hard:
        dist = F.cross_entropy(dist_logits, teacher_logits.argmax(1))
    else:
        dist = soft_kl(dist_logits, teacher_logits, temperature)
    return (1.0 - alpha) * labeled_cross_entropy(cls_logits, labels) + alpha * dist


def run(ctx: RunContext, teacher: nn.Module, student: nn.Module) -> tuple[nn.Module, dict]:
    """Train a DistilledViT student against the teacher; returns it (forward = mean of its two heads)."""
    from ..stage import transfer_set

    started = time.perf_counter()
    cfg, splits = ctx.config, splits_of(ctx)
    d, opts = cfg.distill, cfg.distill.strategy_options.deit
    replaced = None
    if not isinstance(student, DistilledViT):
        channels, height, width = splits.input_shape
        if height != width:
            raise ConfigError(f"distill.strategy deit: the ViT student needs square inputs, not {height}x{width}")
        replaced = cfg.student.model
        torch.manual_seed(cfg.seed)
        student = DistilledViT(splits.num_classes, height, channels, opts.patch_size, opts.hidden_dim, opts.depth,
                               opts.heads, opts.mlp_dim)
        ctx.notes.append(f"distill: strategy deit trains a DeiT-style ViT student (distill.strategy_options.deit) "
                         f"in place of student.model {replaced!r}")
    kd_set = transfer_set(splits)
    views = transfer_views(ctx, kd_set)
    cache = teacher_cache(ctx, teacher, views)
    model = student

    def loss_fn(step: int, xb: torch.Tensor, yb: torch.Tensor, idx: torch.Tensor, draw: int) -> torch.Tensor:
        cls_logits, dist_logits = model.heads(xb)
        t = cache.get(draw, idx).to(xb.device)
        return deit_loss(cls_logits, dist_logits, t, yb, alpha=d.alpha, temperature=d.temperature,
                         hard=opts.distillation == "hard")

    steps = total_steps(d.steps, d.epochs, len(kd_set), cfg.data.batch_size)
    res = fit([student], loss_fn, kd_set, splits.val, watch={"student": student}, views=views, steps=steps, lr=d.lr,
              seed=cfg.seed, batch_size=cfg.data.batch_size, progress=ctx.progress,
              label="distilling ViT student (DeiT token)", device=device_of(ctx))
    head_acc = _head_accuracies(student, splits.val.x, splits.val.y)
    metrics = loop_metrics("deit", res, temperature=d.temperature, alpha=d.alpha, distillation=opts.distillation,
                           val_accuracy_torch=res.best["student"], heads_val_accuracy_torch=head_acc,
                           student_model="DistilledViT " + ", ".join(f"{k} {v}" for k, v in opts.model_dump().items()
                                                                    if k != "distillation"),
                           teacher_cache_seconds=round(cache.seconds, 3))
    if replaced is not None:
        metrics["replaced_student_model"] = replaced
    return student, finish(ctx, teacher, student, metrics, started)


@torch.no_grad()
def _head_accuracies(model: DistilledViT, x: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
    """Validation accuracy (PyTorch, percent) of the class head, the distillation head and their mean."""
    model.cpu().eval()
    hits = torch.zeros(3)
    for i in range(0, len(x), 256):
        c, dl = model.heads(x[i:i + 256])
        yb = y[i:i + 256]
        hits += torch.tensor([float((o.argmax(1) == yb).sum()) for o in (c, dl, (c + dl) / 2)])
    acc = (100.0 * hits / max(len(x), 1)).tolist()
    return {"class_head": round(acc[0], 4), "distillation_head": round(acc[1], 4), "mean": round(acc[2], 4)}
