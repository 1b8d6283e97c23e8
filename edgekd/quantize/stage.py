"""The quantize stage: static INT8 (QDQ) with the target's recipe and real calibration data."""
from __future__ import annotations

import time
from pathlib import Path

from ..context import RunContext
from ..errors import StageError
from .ptq import quantize_qdq, zero_points
from .recipes import resolve


def run_quantize(ctx: RunContext, fp32_path: Path, calib_path: Path, out_path: Path) -> dict:
    """Quantize `fp32_path` into `out_path`; returns the stage's report entry (recipe and calibration)."""
    t0 = time.perf_counter()
    recipe = resolve(ctx.profile, ctx.config.quantize)
    from .calibration import npz_shape

    n = npz_shape(calib_path)[0][0]
    with ctx.progress.task("calibrating", n) as bar:
        quantize_qdq(fp32_path, out_path, calib_path, recipe, percentile=ctx.config.quantize.percentile,
                     on_batch=bar.advance)
    if recipe.name == "tensorrt":
        bad = [z for z in zero_points(out_path) if z != 0]
        if bad:
            raise StageError(f"quantize: {out_path.name} has {len(bad)} non-zero zero points; TensorRT needs "
                             "symmetric int8")
    return {"name": "quantize", "duration_s": round(time.perf_counter() - t0, 2), "recipe": recipe.as_dict(),
            "kept_float": []}
