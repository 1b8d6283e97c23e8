"""Compile candidates for the target, measure them with its runtime, and choose the final artifact."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .backends import Artifact, get_backend
from .context import RunContext
from .measure import accuracy_of, agreement_of, bench_interleaved, predict, sqnr_db


@dataclass
class Candidate:
    """One precision compiled for the target and what was measured of it."""

    precision: str
    onnx: Path
    artifact: Artifact | None = None
    accuracy: float | None = None
    fidelity: dict = field(default_factory=dict)
    latency: dict | None = None
    logits: np.ndarray | None = None
    not_measured: dict = field(default_factory=dict)


def compile_all(ctx: RunContext, onnx_by_name: dict[str, Path]) -> dict[str, Candidate]:
    """Compile each ONNX model with the target's backend into target/<name>/."""
    backend = get_backend(ctx.profile.backend)
    out: dict[str, Candidate] = {}
    for name, path in onnx_by_name.items():
        precision = "fp32" if name == "teacher" else name
        if precision == "fp16" and "fp32" in onnx_by_name:
            path = onnx_by_name["fp32"]
        art = backend.compile(path, ctx.profile, ctx.run_dir / "target" / name, precision)
        out[name] = Candidate(precision=precision, onnx=path, artifact=art)
    return out


def measure_all(ctx: RunContext, cands: dict[str, Candidate], x: np.ndarray, y: np.ndarray | None,
                reference: str = "fp32", measure_latency: bool = True) -> None:
    """Accuracy (or fidelity to `reference`) and interleaved latency for every runnable candidate."""
    backend = get_backend(ctx.profile.backend)
    runners = {}
    for name, c in cands.items():
        if c.artifact is None or not c.artifact.runnable_here:
            reason = c.artifact.not_runnable_reason if c.artifact else "not compiled"
            c.not_measured = {"accuracy": reason, "latency_ms": reason}
            continue
        runners[name] = backend.load(c.artifact, ctx.profile, ctx.threads)
        c.logits = predict(runners[name], x)
        if y is not None:
            c.accuracy = accuracy_of(c.logits, y)
    ref = cands.get(reference)
    for c in cands.values():
        if c.logits is not None and ref is not None and ref.logits is not None and c is not ref:
            c.fidelity = {"top1_agreement": agreement_of(ref.logits, c.logits),
                          "logit_sqnr_db": round(sqnr_db(ref.logits, c.logits), 2)}
    if runners and measure_latency:
        b = ctx.config.bench
        warmup = b.warmup if "warmup" in b.model_fields_set else ctx.profile.bench.warmup
        iters = b.iterations if "iterations" in b.model_fields_set else ctx.profile.bench.iterations
        res = bench_interleaved(runners, x[:1], warmup, iters, progress=ctx.progress)
        for name, r in res.items():
            cands[name].latency = r
    for r in runners.values():
        r.close()


def choose(ctx: RunContext, cands: dict[str, Candidate], max_drop: float, have_labels: bool,
           measured_here: bool) -> tuple[str, str, bool]:
    """The final candidate: fastest measured within the accuracy budget of FP32, or, where latency on the
    board could not be measured, the profile's preference order. Returns (name, why, measured)."""
    names = [p for p in ctx.profile.precisions if p in cands] + [n for n in cands if n not in ctx.profile.precisions
                                                                and n != "teacher"]
    ref = cands.get("fp32")

    def within_budget(c: Candidate) -> tuple[bool, str]:
        if c is ref or ref is None:
            return True, ""
        if have_labels and c.accuracy is not None and ref.accuracy is not None:
            drop = ref.accuracy - c.accuracy
            return drop <= max_drop, f"accuracy drop {drop:.2f} pt vs fp32 (budget {max_drop})"
        if c.fidelity:
            dis = 100 - c.fidelity["top1_agreement"]
            return dis <= max_drop, f"disagrees with fp32 on {dis:.2f}% of inputs (budget {max_drop})"
        return True, "accuracy not measured here"

    ok = [n for n in names if within_budget(cands[n])[0]]
    if not ok:
        ok = ["fp32"] if "fp32" in cands else names[:1]
    if measured_here and all(cands[n].latency for n in ok):
        best = min(ok, key=lambda n: cands[n].latency["p50"])  # type: ignore[index]
        parts = [f"{n} p50 {cands[n].latency['p50']:.3f} ms" for n in ok]  # type: ignore[index]
        rejected = [f"{n} ({within_budget(cands[n])[1]})" for n in names if n not in ok]
        why = f"fastest within the accuracy budget on {ctx.profile.name}: " + ", ".join(parts)
        if rejected:
            why += "; over budget: " + ", ".join(rejected)
        return best, why, True
    best = ok[0]
    why = (f"not measured on the board: chosen by {ctx.profile.name}'s preference order "
           f"({', '.join(ctx.profile.precisions)})")
    rejected = [n for n in names if n not in ok]
    if rejected:
        why += f"; {', '.join(rejected)} left out: " + "; ".join(within_budget(cands[n])[1] for n in rejected)
    return best, why, False
