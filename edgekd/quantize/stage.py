"""The quantize stage: calibrate once, quantize with the target's recipe, keep the most sensitive nodes
in float while INT8 is over the accuracy budget, and produce the INT8 candidates the target measures."""
from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..backends.base import Source
from ..backends.onnxruntime import providers_for
from ..backends.tensorrt import zero_points
from ..context import RunContext
from ..errors import DataError, StageError
from ..export import host_predict, host_session
from .calibration import npz_shape
from .candidates import int8_specs
from .ptq import calibrate, preprocess, quantize_with_ranges
from .recipes import Recipe, resolve
from .sensitivity import Validation, fallback, sensitivity_table


@dataclass
class QuantizeResult:
    """The stage's report entry and the INT8 models to compile as candidates (name -> Source)."""

    entry: dict
    sources: dict[str, Source] = field(default_factory=dict)


def evaluator(ctx: RunContext, x: np.ndarray) -> tuple[Callable[[Path], np.ndarray], str]:
    """A function from a model file to its logits on `x`, with the target's runtime where it runs on
    this host (OpenVINO for intel-cpu, ONNX Runtime otherwise), and a label saying which runtime."""
    prof = ctx.profile
    if prof.backend == "openvino":
        label = f"openvino {prof.device} on this host"
    else:
        providers = providers_for(prof) if prof.backend == "onnxruntime" else ["CPUExecutionProvider"]
        label = f"onnxruntime {'/'.join(providers)} on this host"
        if prof.backend != "onnxruntime":
            label += f" (standing in for {prof.backend}, which does not run here)"
        elif not prof.host_matches_arch():
            label += f" (x86 kernels standing in for the {prof.arch} board's)"

    def run(path: Path) -> np.ndarray:
        return host_predict(path, x, ctx.threads, prof, "int8")

    return run, label


def _sensitivity(ctx: RunContext, fp32_path: Path, src: Path, ranges: Path, recipe: Recipe, out_path: Path,
                 validation: Validation) -> dict:
    """Per-layer table and the accuracy-aware fallback; leaves the chosen INT8 model at `out_path`."""
    evaluate, evaluated_with = evaluator(ctx, validation.x)
    with ctx.progress.task("per-layer sensitivity", None):
        table = sensitivity_table(src, out_path, validation.x, ctx.threads)
        fp32_logits = evaluate(fp32_path)

        def requantize(nodes: list[str], path: Path) -> Path:
            return quantize_with_ranges(src, path, ranges, recipe, nodes_to_exclude=nodes)

        res = fallback(fp32_logits, evaluate, requantize, out_path, table, validation,
                       ctx.config.quantize.max_accuracy_drop)
    return {"sensitivity": table, "kept_float": res.kept_float,
            "fallback": {"validation": validation.source, "samples": int(len(validation.x)),
                         "evaluated_with": evaluated_with, "metric": res.metric, "drop": res.drop,
                         "max_accuracy_drop": ctx.config.quantize.max_accuracy_drop,
                         "within_budget": res.within_budget, "steps": res.steps}}


def _alternative(ctx: RunContext, quantizer: str, src: Path, fp32_path: Path, calib_path: Path, ranges: Path,
                 recipe, kept: list[str], n: int) -> Path:
    """An alternative INT8 model to measure beside the recipe's QDQ one (QOperator or NNCF), checked to load."""
    sd = ctx.stage_dir("quantize")
    if quantizer == "qoperator":
        path = quantize_with_ranges(src, sd / "model.int8.qoperator.onnx", ranges, recipe, fmt="qoperator",
                                    nodes_to_exclude=kept)
        host_session(path, 1).close()  # ORT rejects some QOperator graphs
        return path
    from .nncf_ov import quantize_nncf

    with ctx.progress.task("NNCF quantization", None):
        return quantize_nncf(fp32_path, calib_path, sd / "nncf" / "model.int8.xml", subset_size=n)


def run_quantize(ctx: RunContext, fp32_path: Path, calib_path: Path, out_path: Path,
                 validation: Validation | None = None, measured: bool = False) -> QuantizeResult:
    """Quantize `fp32_path` into `out_path` (QDQ, the target's recipe) and, when `measured`, the recipe's
    alternatives; returns the report entry (recipe, calibration, sensitivity, kept_float) and sources."""
    t0 = time.perf_counter()
    q = ctx.config.quantize
    recipe = resolve(ctx.profile, q)
    sd = ctx.stage_dir("quantize")
    n = npz_shape(calib_path)[0][0]
    if n == 0:
        raise DataError(f"calibration data {calib_path}: array 'x' is empty")
    src = preprocess(fp32_path, sd / "model.pre.onnx")
    ranges = sd / "ranges.json"
    ranges.unlink(missing_ok=True)  # ranges of an earlier run must not be reused for new data
    with ctx.progress.task("calibrating", n) as bar:
        plan = calibrate(src, calib_path, ranges, recipe.method, symmetric=recipe.symmetric_activations,
                         percentile=q.percentile, on_batch=bar.advance)
    quantize_with_ranges(src, out_path, ranges, recipe)
    entry: dict = {"name": "quantize", "recipe": recipe.as_dict(), "calibration_plan": plan,
                   "sensitivity": [], "kept_float": []}
    if validation is not None and len(validation.x):
        entry.update(_sensitivity(ctx, fp32_path, src, ranges, recipe, out_path, validation))
    else:
        entry["not_measured"] = {"sensitivity": "no validation data (too few calibration inputs to hold any out)"}
    kept = entry["kept_float"]
    result = QuantizeResult(entry)
    produced, dropped = [], []
    for spec in int8_specs(recipe, measured):
        if spec.quantizer == "qdq":
            path = out_path
        else:
            try:
                path = _alternative(ctx, spec.quantizer, src, fp32_path, calib_path, ranges, recipe, kept, n)
            except Exception as e:  # noqa: BLE001 - an alternative that fails leaves the others to compare
                first = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
                dropped.append({"candidate": spec.name, "why": first})
                ctx.notes.append(f"quantize: {spec.name} left out: {first}")
                continue
        result.sources[spec.name] = Source("int8", path, spec.label())
        produced.append({"candidate": spec.name, "quantizer": spec.quantizer, "label": spec.label(),
                         "file": str(path.relative_to(ctx.run_dir)) if path.is_relative_to(ctx.run_dir)
                         else str(path)})
    if recipe.name == "tensorrt":
        bad = [z for z in zero_points(out_path) if z != 0]
        if bad:
            raise StageError(f"quantize: {out_path.name} has {len(bad)} non-zero zero points; TensorRT needs "
                             "symmetric int8")
    entry["int8_models"] = produced
    if dropped:
        entry["alternatives_dropped"] = dropped
    entry["alternatives_measured"] = measured
    entry["duration_s"] = round(time.perf_counter() - t0, 2)
    return result
