"""The distill stage: train the student from the teacher's soft targets (plain KD with optional logit
and feature terms), search temperature/alpha, and with distill.baseline train the same student without
KD at equal budget so the report shows what distillation earned (accuracy measured with ONNX Runtime)."""
from __future__ import annotations

import copy
import statistics
import time

import torch
from torch import nn

from ..context import RunContext
from ..data import transfer_set
from ..export import onnx_accuracy
from ..runs import atomic_path
from . import parallel
from .sweep import run_sweep, sweep_grid
from .trainer import TrainResult, augmented_views, kd_draws, resolve_device, train


def distill_key(ctx: RunContext, teacher_key: str, student_spec: str) -> str:
    """The stage's cache key: teacher, student, the distill and data config, seed and library versions."""
    cfg = ctx.config
    return ctx.key("distill-v3", teacher_key, student_spec, cfg.distill.key_dump(), cfg.data.key_dump())


def _secs(values: list[float]) -> list[float]:
    return [round(s, 4) for s in values]


def distill_student(ctx: RunContext, teacher: nn.Module, student: nn.Module
                    ) -> tuple[nn.Module, dict, nn.Module | None]:
    """Training only (every rank under torchrun): optional sweep, the KD run, and with distill.baseline
    the no-KD twin from the same initial weights at the same optimizer steps on the labeled samples.

    Returns (student trained in place, metrics, baseline model or None)."""
    cfg, splits = ctx.config, ctx.splits
    if splits is None:
        raise RuntimeError("distill needs data splits")
    d = cfg.distill
    kd_set = transfer_set(splits)
    initial = copy.deepcopy(student)
    grid = sweep_grid(d.sweep, d.temperature, d.alpha) if d.sweep else []
    needs_teacher = d.alpha > 0 or any(a > 0 for _, a in grid)
    draws = d.draws or kd_draws(kd_set.x)  # the no-KD twin gets as many
    views = augmented_views(kd_set.x, cfg.seed, draws, cfg.data.augment)
    device = resolve_device(d.device)
    cache = parallel.shared_cache(teacher, views, topk=d.cache_topk, device=device) if needs_teacher else None
    common = dict(lr=d.lr, seed=cfg.seed, batch_size=cfg.data.batch_size, teacher=teacher, augment=cfg.data.augment,
                  cache=cache, views=views, progress=ctx.progress, losses=d.loss_weights(),
                  feature_layers=d.layer_pairs(), device=device, precision=d.precision)

    def fit(model: nn.Module, temperature: float, alpha: float, label: str, epochs: int,
            steps: int | None) -> TrainResult:
        return train(model, kd_set, splits.val, epochs=epochs, steps=steps, temperature=temperature,  # type: ignore[arg-type]
                     alpha=alpha, label=label, **common)  # type: ignore[arg-type]

    temperature, alpha = d.temperature, d.alpha
    sweep = None
    if grid:
        budget = d.sweep_budget()
        sweep = run_sweep(student, lambda m, t, a: fit(m, t, a, f"sweep T={t:g} alpha={a:g}", budget, None),
                          grid, budget)
        temperature, alpha = sweep["best"]["temperature"], sweep["best"]["alpha"]
    res = fit(student, temperature, alpha, "distilling student", d.epochs, d.steps)
    labeled = int((kd_set.y >= 0).sum())
    metrics: dict = {
        "strategy": d.strategy, "temperature": temperature, "alpha": alpha, "losses": d.loss_weights(),
        "steps": res.steps, "epoch_seconds": _secs(res.epoch_seconds), "curve": res.curve,
        "val_accuracy_torch": res.val_accuracy, "device": res.device, "precision": res.precision,
        "world_size": res.world_size,
        "transfer_set": {"images": len(kd_set), "labeled": labeled, "unlabeled": len(kd_set) - labeled,
                         "used_by_student": res.samples},
    }
    if d.layer_pairs():
        metrics["feature_layers"] = [{"student": s, "teacher": t} for s, t in d.layer_pairs()]
    if cache is not None:
        metrics["teacher_cache"] = {"seconds": round(cache.seconds, 3), "hit": cache.hit, "key": cache.key,
                                    "draws": len(views), "bytes": cache.nbytes(), "topk": d.cache_topk,
                                    "dtype": "float16"}
        metrics["teacher_cache_seconds"] = round(cache.seconds, 3)
    if res.soft_target_entropy is not None:
        metrics["soft_target_entropy"] = res.soft_target_entropy
    if sweep is not None:
        metrics["sweep"] = sweep
    base_model = None
    if d.baseline:
        base_model = initial
        base = train(base_model, splits.train, splits.val, epochs=0, steps=res.steps, lr=d.lr, seed=cfg.seed,
                     batch_size=cfg.data.batch_size, teacher=None, alpha=0.0, augment=cfg.data.augment,
                     views=augmented_views(splits.train.x, cfg.seed, draws, cfg.data.augment),
                     progress=ctx.progress, label="baseline (no KD)", device=device, precision=d.precision)
        metrics.update({"baseline_steps": base.steps, "baseline_epoch_seconds": _secs(base.epoch_seconds),
                        "baseline_curve": base.curve, "baseline_val_accuracy_torch": base.val_accuracy,
                        "baseline_samples": base.samples})
        kd_sec, base_sec = _per_sample_epoch(res), _per_sample_epoch(base)
        if kd_sec and base_sec:
            metrics["epoch_time_ratio"] = round(kd_sec / base_sec, 3)
    return student, metrics, base_model


def _per_sample_epoch(res: TrainResult) -> float | None:
    """Median seconds per sample of the full epochs (a partial last epoch is left out)."""
    full = list(res.epoch_seconds)
    if len(full) > 1:
        full = full[:-1]
    return statistics.median(full) / max(res.samples, 1) if full else None


def gap_recovered(kd: float, base: float, teacher: float) -> float | None:
    """Share of the teacher-student gap that KD recovered, in percent: 100 (kd - base) / (teacher - base);
    None when the student without KD is already at least as accurate as the teacher."""
    if teacher - base <= 0:
        return None
    return round(100.0 * (kd - base) / (teacher - base), 2)


def run_distill(ctx: RunContext, teacher: nn.Module, student: nn.Module, key: str) -> tuple[nn.Module, dict]:
    """Train `student` in place with KD from `teacher` (or the configured strategy) and measure it."""
    cfg, splits = ctx.config, ctx.splits
    if cfg.distill.strategy != "kd":
        from .strategies import run_strategy

        return run_strategy(ctx, teacher, student, key)
    if splits is None:
        raise RuntimeError("distill needs data splits")
    out = ctx.stage_dir("distill")
    t0 = time.perf_counter()
    student, metrics, base_model = distill_student(ctx, teacher, student)
    with atomic_path(out / "model.pt") as tmp:
        torch.save(student.state_dict(), tmp)
    x, y = splits.test.x.numpy(), splits.test.y.numpy()
    kd_acc, kd_logits = onnx_accuracy(ctx, student, out / "model.onnx", x, y)
    teacher_onnx = ctx.run_dir / "teacher.fp32.onnx"
    teacher_acc, teacher_logits = onnx_accuracy(ctx, None if teacher_onnx.exists() else teacher,  # type: ignore[arg-type]
                                                teacher_onnx if teacher_onnx.exists() else out / "teacher.onnx", x, y)
    metrics["accuracy"] = kd_acc
    metrics["teacher_accuracy"] = teacher_acc
    metrics["agreement"] = float((kd_logits.argmax(1) == teacher_logits.argmax(1)).mean() * 100)
    metrics["accuracy_runtime"] = "onnxruntime fp32 (this host), held-out test split"
    if base_model is not None:
        with atomic_path(out / "baseline.pt") as tmp:
            torch.save(base_model.state_dict(), tmp)
        base_acc, _ = onnx_accuracy(ctx, base_model, out / "baseline.onnx", x, y)
        metrics["baseline_accuracy"] = base_acc
        metrics["kd_gain"] = round(kd_acc - base_acc, 4)
        metrics["gap_recovered"] = gap_recovered(kd_acc, base_acc, teacher_acc)
        if metrics["gap_recovered"] is None:
            metrics["not_measured"] = {"gap_recovered": "the student without KD is already as accurate as the "
                                                        "teacher: there is no gap to recover"}
            ctx.progress.note(f"distill: the student trained without KD ({base_acc:.2f}%) is at least as accurate "
                              f"as the teacher ({teacher_acc:.2f}%): the teacher has little to teach; train it "
                              "longer (teacher.train_epochs) or use a larger one")
    else:
        metrics["gap_recovered"] = None
        metrics["not_measured"] = {"gap_recovered": "needs distill.baseline: true (a student trained without KD)"}
    metrics["duration_s"] = round(time.perf_counter() - t0, 2)
    return student, metrics
