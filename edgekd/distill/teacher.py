"""The teacher: built, loaded from the user's checkpoint, or trained once and cached (embedded default)."""
from __future__ import annotations

import time
from pathlib import Path

import torch
from torch import nn

from ..context import RunContext
from ..errors import ModelError
from ..models import apply_backbone, apply_checkpoint, build_model, is_model_file, load_state_dict_file
from ..runs import atomic_path, cache_dir, hash_obj, sha256_file
from .trainer import train


def _cache_path(ctx: RunContext, model: nn.Module) -> Path:
    """Keyed by the teacher's settings, the data, the versions, the checkpoint's hash and the built
    architecture's parameter shapes (a built-in that changes shape is not loaded from an older cache)."""
    cfg = ctx.config
    checkpoint = sha256_file(cfg.teacher.checkpoint) if cfg.teacher.checkpoint else None
    shapes = [(k, list(v.shape)) for k, v in model.state_dict().items()]
    key = hash_obj("teacher-v2", cfg.teacher.model_dump(mode="json"), cfg.data.key_dump(),
                   {k: ctx.versions.get(k) for k in ("torch", "torchvision", "edgekd")}, checkpoint, shapes)
    return cache_dir() / "teachers" / f"{cfg.teacher.model.replace(':', '_').replace('/', '_')}-{key}.pt"


def get_teacher(ctx: RunContext, trust_checkpoint: bool = False) -> tuple[nn.Module, dict]:
    """The teacher model in eval mode, with where it came from for the report."""
    cfg, splits = ctx.config, ctx.splits
    if splits is None:
        raise RuntimeError("teacher needs the data splits")
    model = build_model(cfg.teacher.model, splits.num_classes,  # type: ignore[union-attr]
                        trust_checkpoint=trust_checkpoint or cfg.teacher.trust_checkpoint)
    info: dict = {"model": cfg.teacher.model}
    if cfg.teacher.checkpoint:
        try:
            apply_checkpoint(model, cfg.teacher.checkpoint)
            info["source"] = f"checkpoint {cfg.teacher.checkpoint}"
        except ModelError:
            if cfg.teacher.train_epochs <= 0:
                raise
            # Transfer learning: a checkpoint for other classes (ImageNet, say) loads without its head,
            # then the teacher is fine-tuned with a new head for this task's classes.
            head = apply_backbone(model, cfg.teacher.checkpoint)
            _train_cached(ctx, model, info, f"checkpoint {cfg.teacher.checkpoint} without its classifier "
                          f"({', '.join(head)}), fine-tuned with a new head for")
    elif cfg.teacher.train_epochs > 0 and not is_model_file(cfg.teacher.model):
        _train_cached(ctx, model, info, "trained here for")
    else:
        info["source"] = "random initialisation"
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model, info


def _train_cached(ctx: RunContext, model: nn.Module, info: dict, what: str) -> None:
    """Train the teacher for teacher.train_epochs (from its current weights), or load the result of an
    earlier identical training from the cache."""
    cfg, splits = ctx.config, ctx.splits
    path = _cache_path(ctx, model)
    if path.is_file():
        model.load_state_dict(load_state_dict_file(path))
        info["source"] = f"{what} {cfg.teacher.train_epochs} epochs by an earlier run, cached at {path}"
        return
    t0 = time.perf_counter()
    res = train(model, splits.train, splits.val, epochs=cfg.teacher.train_epochs,  # type: ignore[union-attr]
                lr=cfg.teacher.lr, seed=0, batch_size=cfg.data.batch_size, augment=cfg.data.augment,
                progress=ctx.progress, label="training teacher")
    with atomic_path(path) as tmp:
        torch.save(model.state_dict(), tmp)
    info["source"] = f"{what} {cfg.teacher.train_epochs} epochs, cached at {path}"
    info["train_seconds"] = round(time.perf_counter() - t0, 2)
    info["val_accuracy_torch"] = res.val_accuracy
