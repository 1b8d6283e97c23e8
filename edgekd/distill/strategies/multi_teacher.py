"""Multi-teacher distillation: the soft target is the weighted average of several teachers' softened
outputs (or of their logits). The extra teachers come from distill.strategy_options.multi_teacher.teachers:
a checkpoint each, or trained here once on the training split and cached like the embedded teacher."""
from __future__ import annotations

import time
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ...config.strategies import ExtraTeacher
from ...context import RunContext
from ...errors import ConfigError
from ...models import apply_checkpoint, build_model, load_state_dict_file
from ...runs import atomic_path, cache_dir, hash_obj
from ..cache import frozen
from ..trainer import train
from .common import device_of, finish, onnx_logits, splits_of, transfer_views

__all__ = ["TeacherEnsemble", "ensemble_soft_target", "extra_teacher", "run"]


def ensemble_soft_target(logits: Sequence[torch.Tensor], weights: Sequence[float], temperature: float,
                         average: str = "probabilities") -> torch.Tensor:
    """The soft target: sum_i w_i softmax(z_i / T) ('probabilities') or softmax(sum_i w_i z_i / T) ('logits'),
    with the weights normalised to sum to 1."""
    w = torch.tensor([float(v) for v in weights]) / float(sum(weights))
    z = torch.stack([t.float() for t in logits])
    if average == "logits":
        return F.softmax((w.view(-1, 1, 1) * z).sum(0) / temperature, dim=1)
    return (w.view(-1, 1, 1) * F.softmax(z / temperature, dim=2)).sum(0)


class TeacherEnsemble(nn.Module):
    """Frozen teachers behind one forward pass whose output, read at temperature T, is the ensemble's
    soft target: T * log(sum_i w_i softmax(z_i / T)) for 'probabilities' (its softmax at T is exactly the
    weighted mean of the softened outputs), sum_i w_i z_i for 'logits'."""

    def __init__(self, teachers: Sequence[nn.Module], weights: Sequence[float], temperature: float,
                 average: str = "probabilities"):
        super().__init__()
        if len(teachers) != len(weights) or not teachers:
            raise ValueError("one weight per teacher, and at least one teacher")
        self.teachers = nn.ModuleList([frozen(t) for t in teachers])
        w = torch.tensor([float(v) for v in weights])
        self.register_buffer("weights", w / w.sum())
        self.temperature = float(temperature)
        self.average = average

    def extra_repr(self) -> str:
        return f"average={self.average}, temperature={self.temperature:g}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = torch.stack([t(x).float() for t in self.teachers])
        w = self.weights.view(-1, 1, 1)
        if self.average == "logits":
            return (w * z).sum(0)
        log_p = F.log_softmax(z / self.temperature, dim=2)
        return self.temperature * torch.logsumexp(log_p + w.log(), dim=0)


def extra_teacher(ctx: RunContext, spec: ExtraTeacher, index: int) -> tuple[nn.Module, str]:
    """One extra teacher in eval mode with gradients off, and where it came from."""
    cfg, splits = ctx.config, splits_of(ctx)
    key = f"distill.strategy_options.multi_teacher.teachers[{index}]"
    model = build_model(spec.model, splits.num_classes, trust_checkpoint=cfg.teacher.trust_checkpoint)
    if spec.checkpoint:
        apply_checkpoint(model, spec.checkpoint)
        return frozen(model), f"checkpoint {spec.checkpoint}"
    if spec.train_epochs == 0:
        ctx.notes.append(f"{key}: no checkpoint and train_epochs 0: a randomly initialised teacher")
        return frozen(model), "random initialisation"
    digest = hash_obj("extra-teacher-v2", spec.model_dump(mode="json"), cfg.data.key_dump(),
                      cfg.teacher.lr, {k: ctx.versions.get(k) for k in ("torch", "torchvision", "edgekd")})
    path = cache_dir() / "teachers" / f"extra-{spec.model.replace(':', '_').replace('/', '_')}-{digest}.pt"
    if path.is_file():
        model.load_state_dict(load_state_dict_file(path))
        return frozen(model), f"trained earlier, cached at {path}"
    train(model, splits.train, splits.val, epochs=spec.train_epochs, lr=cfg.teacher.lr, seed=index + 1,
          batch_size=cfg.data.batch_size, augment=cfg.data.augment, progress=ctx.progress,
          label=f"training teacher {index + 2} ({spec.model})", device=cfg.distill.device)
    with atomic_path(path) as tmp:
        torch.save(model.state_dict(), tmp)
    return frozen(model), f"trained here for {spec.train_epochs} epochs, cached at {path}"


def run(ctx: RunContext, teacher: nn.Module, student: nn.Module) -> tuple[nn.Module, dict]:
    """Distil `student` from the weighted ensemble of the configured teacher and the extra ones."""
    from ...data import transfer_set

    started = time.perf_counter()
    cfg, splits = ctx.config, splits_of(ctx)
    d, opts = cfg.distill, cfg.distill.strategy_options.multi_teacher
    members: list[tuple[nn.Module, float, dict]] = []
    if opts.teacher_weight > 0:
        members.append((teacher, opts.teacher_weight, {"model": cfg.teacher.model, "source": "distill teacher"}))
    for i, spec in enumerate(opts.teachers):
        model, source = extra_teacher(ctx, spec, i)
        members.append((model, spec.weight, {"model": spec.model, "source": source}))
    if not members:
        raise ConfigError("distill.strategy_options.multi_teacher: no teachers (teacher_weight is 0 and the "
                          "teachers list is empty)")
    ensemble = TeacherEnsemble([m for m, _, _ in members], [w for _, w, _ in members], d.temperature, opts.average)
    kd_set = transfer_set(splits)
    res = train(student, kd_set, splits.val, epochs=d.epochs, steps=d.steps, lr=d.lr, seed=cfg.seed,
                batch_size=cfg.data.batch_size, teacher=ensemble, temperature=d.temperature, alpha=d.alpha,
                views=transfer_views(ctx, kd_set), progress=ctx.progress, label="distilling from the teachers",
                device=device_of(ctx), precision=d.precision, cache_topk=d.cache_topk)
    teachers, all_logits = [], []
    for i, ((model, _, info), w) in enumerate(zip(members, ensemble.weights.tolist(), strict=True)):
        acc, logits = onnx_logits(ctx, model, f"teacher_{i + 1}")
        teachers.append({**info, "weight": round(w, 6), "accuracy": acc})
        all_logits.append(torch.from_numpy(logits))
    target = ensemble_soft_target(all_logits, ensemble.weights.tolist(), 1.0, opts.average).numpy()
    y = splits.test.y.numpy()
    metrics = {"strategy": "multi_teacher", "temperature": d.temperature, "alpha": d.alpha, "average": opts.average,
               "teachers": teachers, "ensemble_accuracy": float((target.argmax(1) == y).mean() * 100),
               "steps": res.steps, "epoch_seconds": [round(s, 4) for s in res.epoch_seconds], "curve": res.curve,
               "val_accuracy_torch": res.val_accuracy, "teacher_cache_seconds": round(res.cache_seconds, 3)}
    if res.soft_target_entropy is not None:
        metrics["soft_target_entropy"] = res.soft_target_entropy
    return student, finish(ctx, teacher, student, metrics, started)
