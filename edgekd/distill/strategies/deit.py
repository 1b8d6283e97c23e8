"""DeiT-style distillation (Touvron et al. 2021) for ViT students: beside the class token the student
has a learnable distillation token with its own head, trained on the teacher's predictions (hard:
the teacher's top-1 class; soft: its softened output) while the class head learns from the labels.
At inference the model returns the mean of the two heads' logits: one input, one output, exportable.

The ViT is a small pre-norm transformer sized by distill.strategy_options.deit; a student that is
already a DistilledViT is trained as it is."""
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

__all__ = ["DistilledViT", "EncoderBlock", "deit_loss", "run", "student_for"]


class EncoderBlock(nn.Module):
    """A pre-norm transformer block (multi-head self-attention, then an MLP). Every reshape names its
    sizes and leaves only the batch as -1, so the exported graph holds no Shape ops (static for the
    quantizer and the board compilers, any batch size at run time)."""

    def __init__(self, tokens: int, dim: int, heads: int, mlp_dim: int):
        super().__init__()
        self.tokens, self.dim, self.heads, self.head_dim = tokens, dim, heads, dim // heads
        self.ln_1 = nn.LayerNorm(dim, eps=1e-6)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.ln_2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp_dim), nn.GELU(), nn.Linear(mlp_dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        qkv = self.qkv(self.ln_1(x)).reshape(-1, self.tokens, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        attn = torch.softmax((q @ k.transpose(-2, -1)) * self.head_dim ** -0.5, dim=-1)
        x = x + self.proj((attn @ v).transpose(1, 2).reshape(-1, self.tokens, self.dim))
        return x + self.mlp(self.ln_2(x))


class DistilledViT(nn.Module):
    """A small vision transformer with a class token and a distillation token (DeiT).

    `heads(x)` returns (class-head logits, distillation-head logits); `forward(x)` their mean."""

    def __init__(self, num_classes: int, image_size: int, in_channels: int = 3, patch_size: int = 4,
                 hidden_dim: int = 64, depth: int = 4, heads: int = 4, mlp_dim: int = 128):
        super().__init__()
        if image_size % patch_size:
            raise ConfigError(f"distill.strategy_options.deit.patch_size {patch_size} does not divide the image "
                              f"size {image_size} (data.image_size)")
        if hidden_dim % heads:
            raise ConfigError(f"distill.strategy_options.deit.hidden_dim {hidden_dim} is not divisible by heads {heads}")
        self.patches, self.hidden_dim = (image_size // patch_size) ** 2, hidden_dim
        self.patch_embed = nn.Conv2d(in_channels, hidden_dim, patch_size, patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, hidden_dim))
        self.dist_token = nn.Parameter(torch.zeros(1, 1, hidden_dim))
        self.pos_embedding = nn.Parameter(torch.zeros(1, self.patches + 2, hidden_dim))
        self.blocks = nn.Sequential(*[EncoderBlock(self.patches + 2, hidden_dim, heads, mlp_dim) for _ in range(depth)])
        self.norm = nn.LayerNorm(hidden_dim, eps=1e-6)
        self.head = nn.Linear(hidden_dim, num_classes)
        self.head_dist = nn.Linear(hidden_dim, num_classes)
        for p in (self.cls_token, self.dist_token, self.pos_embedding):
            nn.init.trunc_normal_(p, std=0.02)

    def heads(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits of the class head and of the distillation head."""
        patches = self.patch_embed(x).reshape(-1, self.hidden_dim, self.patches).transpose(1, 2)
        zero = patches[:, :1] * 0  # broadcasts the tokens over the batch without reading its size
        tokens = torch.cat([zero + self.cls_token, zero + self.dist_token, patches], dim=1) + self.pos_embedding
        out = self.norm(self.blocks(tokens))
        return self.head(out[:, 0]), self.head_dist(out[:, 1])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        cls_logits, dist_logits = self.heads(x)
        return (cls_logits + dist_logits) / 2


def student_for(ctx: RunContext, student: nn.Module) -> nn.Module:
    """The model the deit strategy trains: `student` when it is a DistilledViT, else a new one sized by
    distill.strategy_options.deit for the data's input shape (also what a resumed run loads into)."""
    if isinstance(student, DistilledViT):
        return student
    opts, splits = ctx.config.distill.strategy_options.deit, splits_of(ctx)
    channels, height, width = splits.input_shape
    if height != width:
        raise ConfigError(f"distill.strategy deit: the ViT student needs square inputs, not {height}x{width}")
    torch.manual_seed(ctx.config.seed)
    return DistilledViT(splits.num_classes, height, channels, opts.patch_size, opts.hidden_dim, opts.depth,
                        opts.heads, opts.mlp_dim)


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
    from ...data import transfer_set

    started = time.perf_counter()
    cfg, splits = ctx.config, splits_of(ctx)
    d, opts = cfg.distill, cfg.distill.strategy_options.deit
    replaced = None if isinstance(student, DistilledViT) else ctx.config.student.model
    student = student_for(ctx, student)
    if replaced is not None:
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
              label="distilling ViT student (DeiT token)", device=device_of(ctx),
              precision=ctx.config.distill.precision)
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
