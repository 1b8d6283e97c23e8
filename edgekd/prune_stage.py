"""The prune stage: torch-pruning with KD fine-tuning from the unpruned model, resumable."""
from __future__ import annotations

import copy
import time

import torch
from torch import nn

from .context import RunContext
from .distill.trainer import TeacherLogitCache, augmented_views, train, AUG_DRAWS
from .models import build_model, student_from
from .prune import load_pruned, prune, save_pruned
from .runs import atomic_path


def _fresh(ctx: RunContext, teacher: nn.Module) -> nn.Module:
    splits = ctx.splits
    return student_from(ctx.config.student.model, teacher, splits.num_classes) if ctx.config.student.model == "teacher" \
        else build_model(ctx.config.student.model, splits.num_classes)  # type: ignore[union-attr]


def _latency_fn(ctx: RunContext):
    """Latency of a torch model exported to ONNX and run on the target's runtime (this host)."""
    from .backends import get_backend
    from .bench.harness import time_inference
    from .export import export_onnx

    backend = get_backend(ctx.profile.backend)
    splits = ctx.splits
    tmp = ctx.stage_dir("prune") / "probe"

    def measure(model: nn.Module) -> float:
        onnx_path = export_onnx(copy.deepcopy(model).eval(), splits.input_shape, tmp / "probe.onnx",  # type: ignore[union-attr]
                                ctx.profile.opset)
        art = backend.compile(onnx_path, ctx.profile, tmp / "compiled", "fp32")
        runner = backend.load(art, ctx.profile, ctx.threads)
        x = splits.test.x[:1].numpy()  # type: ignore[union-attr]
        t = time_inference(runner.infer, x, 20, 200)
        runner.close()
        return float(torch.tensor(t).median())

    return measure


def _step(s) -> dict:
    row = {"step": s.step, "params": s.params, "macs": s.macs}
    if s.latency_ms is not None:
        row["latency_ms"] = round(s.latency_ms, 4)
    if s.accuracy is not None and s.accuracy == s.accuracy:
        row["val_accuracy_torch"] = s.accuracy
    return row


def run_prune(ctx: RunContext, teacher: nn.Module, model: nn.Module, upstream: str) -> tuple[nn.Module, dict]:
    """Prune `model` (fine-tuning with KD from its unpruned self) or reload a stored result."""
    cfg, splits = ctx.config, ctx.splits
    p = cfg.prune
    key = ctx.key("prune-v1", upstream, p.model_dump(mode="json"), cfg.distill.temperature, cfg.distill.alpha,
                  ctx.profile.round_to, ctx.profile.name if p.target_speedup or p.target_latency_ms else "")
    out = ctx.stage_dir("prune")
    hit = ctx.cached("prune", key)
    if hit is not None:
        saved = torch.load(out / "model.pt", weights_only=True)
        model = load_pruned(_fresh(ctx, teacher), saved)
        ctx.notes.append("prune: resumed from the stored result")
        return model, {**hit, "resumed": True}
    t0 = time.perf_counter()
    unpruned = copy.deepcopy(model).eval()
    for q in unpruned.parameters():
        q.requires_grad_(False)
    views = augmented_views(splits.train.x, cfg.seed, AUG_DRAWS, cfg.data.augment)  # type: ignore[union-attr]
    cache = TeacherLogitCache(unpruned, views)
    epochs_per_step = max(1, p.finetune_epochs // max(1, p.steps)) if p.finetune_epochs else 0

    def finetune(m: nn.Module, step: int) -> float:
        if epochs_per_step == 0:
            return float("nan")
        res = train(m, splits.train, splits.val, epochs=epochs_per_step, lr=p.lr, seed=cfg.seed + step,  # type: ignore[union-attr]
                    batch_size=cfg.data.batch_size, teacher=unpruned, temperature=cfg.distill.temperature,
                    alpha=max(cfg.distill.alpha, 0.5), augment=cfg.data.augment, cache=cache,
                    progress=ctx.progress, label=f"fine-tuning (step {step + 1})")
        return res.val_accuracy

    kind, _ = p.amount()
    measure = _latency_fn(ctx) if kind in ("target_speedup", "target_latency_ms") else None
    baseline = measure(unpruned) if measure else None
    grad_batch = (splits.train.x[:64], splits.train.y[:64]) if p.criterion == "taylor" else None  # type: ignore[union-attr]
    model.train()
    model, outcome = prune(model, splits.input_shape, p, splits.num_classes, ctx.profile.round_to,  # type: ignore[union-attr]
                           finetune=finetune, measure_latency=measure, baseline_latency_ms=baseline,
                           grad_batch=grad_batch)
    with atomic_path(out / "model.pt") as tmp:
        torch.save(save_pruned(model), tmp)
    metrics = {
        "criterion": p.criterion, "amount": dict([p.amount()]), "round_to": ctx.profile.round_to,
        "before": outcome.before, "after": outcome.after, "reached": outcome.reached,
        "steps": [_step(s) for s in outcome.steps],
        "duration_s": round(time.perf_counter() - t0, 2),
    }
    if baseline is not None:
        metrics["baseline_latency_ms"] = baseline
    if outcome.note:
        metrics["note"] = outcome.note
    ctx.mark_done("prune", key, metrics)
    return model, metrics
