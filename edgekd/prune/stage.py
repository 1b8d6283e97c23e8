"""The prune stage: torch-pruning with KD fine-tuning from the unpruned model, latency on the target, resumable."""
from __future__ import annotations

import copy
import dataclasses
import shutil
import time
from collections.abc import Iterable

import numpy as np
import torch
from torch import nn

from ..context import RunContext
from ..distill.batchnorm import reestimate_bn
from ..distill.trainer import AUG_DRAWS, TeacherLogitCache, augmented_views, train
from ..models import build_model, student_from
from ..runs import atomic_path
from .guard import AccuracyGuard
from .loop import PruneStep, prune
from .pruner import load_pruned, save_pruned

# Each probe: PROBE_ROUNDS interleaved rounds of about PROBE_ROUND_S seconds per model (iterations
# bounded below and above), so a fast model gets enough samples to see a 5% change through the noise
# and a slow one costs no more than before.
PROBE_ROUNDS, PROBE_WARMUP, PROBE_ROUND_S = 6, 10, 0.25
PROBE_MIN_ITERATIONS, PROBE_MAX_ITERATIONS = 20, 400


def _fresh(ctx: RunContext, teacher: nn.Module) -> nn.Module:
    splits = ctx.splits
    return student_from(ctx.config.student.model, teacher, splits.num_classes) if ctx.config.student.model == "teacher" \
        else build_model(ctx.config.student.model, splits.num_classes)  # type: ignore[union-attr]


class LatencyProbe:
    """Latency of torch models exported to ONNX and run on the target's runtime, each measured in
    interleaved rounds with the unpruned model, so a drift in the machine's speed cancels in the ratio.

    Runs on this host: with the target's backend where the profile's latencies are real here (`cpu`,
    an x86 host for intel-cpu), else with ONNX Runtime as a stand-in, labelled so in `measured_on`."""

    def __init__(self, ctx: RunContext, reference: nn.Module):
        from ..backends import get_backend
        from ..bench.harness import calls_for

        self.ctx = ctx
        self.here = ctx.profile.measures_here
        self.backend = get_backend(ctx.profile.backend if self.here else "onnxruntime")
        self.measured_on = (f"host ({ctx.profile.backend}, {ctx.threads} threads)" if self.here else
                            f"host (onnxruntime, {ctx.threads} threads), standing in for {ctx.profile.name}")
        self.dir = ctx.stage_dir("prune") / "probe"
        self.sample = ctx.splits.val.x[:1].numpy()  # type: ignore[union-attr]  # timing only; test data reports
        self.count = 0
        self.reference = self._load(reference, "reference")
        self.iterations = calls_for(self.reference.infer, self.sample, PROBE_ROUND_S, PROBE_MIN_ITERATIONS,
                                    PROBE_MAX_ITERATIONS, PROBE_WARMUP)

    def _load(self, model: nn.Module, name: str):
        from ..export import export_onnx

        out = self.dir / name
        onnx_path = export_onnx(copy.deepcopy(model).eval(), self.ctx.splits.input_shape,  # type: ignore[union-attr]
                                out / "model.onnx", self.ctx.profile.opset)
        art = self.backend.compile(onnx_path, self.ctx.profile, out / "compiled", "fp32")
        return self.backend.load(art, self.ctx.profile, self.ctx.threads)

    def __call__(self, model: nn.Module) -> tuple[float, float]:
        """(p50 latency of `model`, p50 latency of the unpruned model) in ms, measured side by side."""
        return self.many([("candidate", model)])["candidate"]

    def many(self, models: Iterable[tuple[str, nn.Module]]) -> dict[str, tuple[float, float]]:
        """{name: (p50 latency, p50 of the unpruned model)} in ms for several models timed in the same
        interleaved rounds (the unpruned model's p50 is the same for all). Each model is exported and
        loaded on the runtime as it comes, and let go before the next one is taken."""
        from ..bench.harness import interleaved

        runners = {}
        try:
            for name, model in models:
                runners[name] = self._load(model, f"candidate-{len(runners)}")
                del model
            self.count += len(runners)
            fns = {"\0reference": self.reference.infer, **{n: r.infer for n, r in runners.items()}}
            times = interleaved(fns, self.sample, PROBE_WARMUP, self.iterations, PROBE_ROUNDS)
        finally:
            for r in runners.values():
                r.close()
            for i in range(len(runners) + 1):  # exported only to be timed (the last one perhaps half-way)
                shutil.rmtree(self.dir / f"candidate-{i}", ignore_errors=True)
        ref = float(np.median(times["\0reference"]))
        return {n: (float(np.median(times[n])), ref) for n in runners}

    def close(self) -> None:
        self.reference.close()


BOARD_PROBE_ROUNDS, BOARD_PROBE_ITERATIONS = 3, 50


class BoardProbe:
    """LatencyProbe's interface, measured on the board (`--host`): the models are exported and compiled for
    the target as they come, then timed with the unpruned one in interleaved rounds in ONE SSH session."""

    def __init__(self, ctx: RunContext, reference: nn.Module):
        from ..backends import get_backend

        self.ctx = ctx
        self.host, self.ssh_config, self.python = ctx.board  # type: ignore[misc]
        self.backend = get_backend(ctx.profile.backend)
        self.measured_on = f"{self.host} ({ctx.profile.backend}, the board)"
        self.dir = ctx.stage_dir("prune") / "probe"
        self.count = 0
        self.reference = self._export(reference, "reference")

    def _export(self, model: nn.Module, name: str) -> tuple[list, str]:
        from ..export import export_onnx

        out = self.dir / name
        onnx_path = export_onnx(copy.deepcopy(model).eval(), self.ctx.splits.input_shape,  # type: ignore[union-attr]
                                out / "model.onnx", self.ctx.profile.opset)
        art = self.backend.compile(onnx_path, self.ctx.profile, out / "compiled", "fp32")
        return list(art.files or [art.path]), art.path.name

    def __call__(self, model: nn.Module) -> tuple[float, float]:
        return self.many([("candidate", model)])["candidate"]

    def many(self, models: Iterable[tuple[str, nn.Module]]) -> dict[str, tuple[float, float]]:
        from pathlib import Path

        from ..bench.remote import bench_remote_many

        entries: dict[str, tuple[list, str]] = {}
        try:
            for name, model in models:
                entries[name] = self._export(model, f"candidate-{len(entries)}")
                del model
            self.count += len(entries)
            times = bench_remote_many(self.host, {"\0reference": self.reference, **entries}, self.ctx.profile,
                                      rounds=BOARD_PROBE_ROUNDS, iterations=BOARD_PROBE_ITERATIONS,
                                      warmup=PROBE_WARMUP, threads=self.ctx.threads,
                                      ssh_config=Path(self.ssh_config) if self.ssh_config else None,
                                      remote_python=self.python)
        finally:
            for i in range(len(entries) + 1):
                shutil.rmtree(self.dir / f"candidate-{i}", ignore_errors=True)
        ref = float(np.median(times["\0reference"]))
        return {n: (float(np.median(times[n])), ref) for n in entries}

    def close(self) -> None:
        shutil.rmtree(self.dir / "reference", ignore_errors=True)


def _step(s: PruneStep) -> dict:
    row: dict = {"step": s.step, "params": s.params, "macs": s.macs}
    if s.latency_ms is not None:
        row["latency_ms"] = round(s.latency_ms, 4)
    if s.speedup is not None:
        row["speedup"] = round(s.speedup, 3)
    if s.accuracy is not None and s.accuracy == s.accuracy:
        row["val_accuracy_torch"] = s.accuracy
    return row


def run_prune(ctx: RunContext, teacher: nn.Module, model: nn.Module, upstream: str) -> tuple[nn.Module, dict]:
    """Prune `model` (fine-tuning with KD from its unpruned self) or reload a stored result."""
    cfg, splits = ctx.config, ctx.splits
    p = cfg.prune
    board = ctx.board is not None and ctx.profile.backend != "tensorrt"  # a Jetson times one engine per session
    key = ctx.key("prune-v5", upstream, p.key_dump(), cfg.distill.temperature,
                  ctx.profile.round_to, ctx.profile.name, ctx.threads, ctx.board[0] if board else None)
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
    epochs_per_step = max(1, p.finetune_epochs // max(1, p.steps)) if p.finetune_epochs else 0
    caches: list[TeacherLogitCache] = []

    def finetune(m: nn.Module, step: int) -> float:
        if epochs_per_step == 0:  # no training, yet every BatchNorm after a pruned layer now sees other inputs
            reestimate_bn(m, splits.train.x, seed=cfg.seed + step, batch_size=cfg.data.batch_size)  # type: ignore[union-attr]
            return float("nan")
        if not caches:  # the unpruned model's logits on every augmented view, computed once when first needed
            views = augmented_views(splits.train.x, cfg.seed, AUG_DRAWS, cfg.data.augment)  # type: ignore[union-attr]
            caches.append(TeacherLogitCache(unpruned, views))
        cache = caches[0]
        res = train(m, splits.train, splits.val, epochs=epochs_per_step, lr=p.lr, seed=cfg.seed + step,  # type: ignore[union-attr]
                    batch_size=cfg.data.batch_size, teacher=unpruned, temperature=cfg.distill.temperature,
                    alpha=p.kd_alpha, augment=cfg.data.augment, cache=cache,
                    progress=ctx.progress, label=f"fine-tuning (step {step + 1})")
        return res.val_accuracy

    probe = BoardProbe(ctx, unpruned) if board else LatencyProbe(ctx, unpruned)
    grad_batch = (splits.train.x[:64], splits.train.y[:64]) if p.criterion == "taylor" else None  # type: ignore[union-attr]
    guard = AccuracyGuard(p, unpruned, splits.val)  # type: ignore[union-attr]
    try:
        for amount in guard.amounts():
            candidate, outcome = prune(copy.deepcopy(model), splits.input_shape, amount, splits.num_classes,  # type: ignore[union-attr]
                                       ctx.profile.round_to, finetune=finetune, measure_latency=probe,
                                       measure_many=probe.many, grad_batch=grad_batch)
            if guard.accept(amount, candidate):
                model = candidate
                break
        else:
            # the last try's evidence (steps, allocation search, latency shares) stays; the model is the unpruned one
            outcome = dataclasses.replace(outcome, after=outcome.before, reached=False, note=guard.refusal())
            ctx.notes.append(f"prune: {guard.refusal()}")
    finally:
        probe.close()
    with atomic_path(out / "model.pt") as tmp:
        torch.save(save_pruned(model), tmp)
    metrics = {
        "criterion": p.criterion, "global_pruning": p.global_pruning, "amount": dict([p.amount()]),
        "round_to": ctx.profile.round_to, "family": outcome.family,
        "before": outcome.before, "after": outcome.after, "reached": outcome.reached,
        "steps": [_step(s) for s in outcome.steps],
        "latency_measured_on": probe.measured_on, "latency_probes": probe.count,
        "duration_s": round(time.perf_counter() - t0, 2),
    }
    if outcome.kept_whole:
        metrics["kept_whole_layers"] = outcome.kept_whole
    if outcome.allocation_search:
        metrics["allocation_search"] = outcome.allocation_search
    if outcome.stage_latency_share:
        metrics["stage_latency_share"] = {k: round(v, 3) for k, v in outcome.stage_latency_share.items()}
    if outcome.note:
        metrics["note"] = outcome.note
    if guard.tries:
        metrics["accuracy_guard"] = guard.summary()
    ctx.mark_done("prune", key, metrics)
    return model, metrics
