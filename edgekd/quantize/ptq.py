"""Static INT8 post-training quantization of an FP32 ONNX model with ONNX Runtime (QDQ)."""
from __future__ import annotations

import tempfile
from collections.abc import Callable
from pathlib import Path

from ..errors import StageError
from ..runs import atomic_path
from .calibration import NpzCalibrationReader
from .recipes import Recipe

CALIBRATION_BATCH = 16


def _method(name: str):
    from onnxruntime.quantization import CalibrationMethod

    return {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
            "percentile": CalibrationMethod.Percentile}[name]


def quantize_qdq(fp32_path: Path, out_path: Path, calib_path: Path, recipe: Recipe, *,
                 nodes_to_exclude: list[str] | None = None, percentile: float = 99.999,
                 on_batch: Callable[[int], None] | None = None, preprocess: bool = True) -> Path:
    """Quantize `fp32_path` into a QDQ model at `out_path`, calibrated on calib.npz's `x`."""
    import onnx
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    qtype = {"uint8": QuantType.QUInt8, "int8": QuantType.QInt8}
    input_name = onnx.load(str(fp32_path), load_external_data=False).graph.input[0].name
    extra = {
        "ActivationSymmetric": recipe.symmetric_activations,
        "WeightSymmetric": recipe.symmetric_weights,
        "CalibMaxIntermediateOutputs": 64,  # bounds calibration memory for large sets
    }
    if recipe.method == "percentile":
        extra["CalibPercentile"] = percentile
    if recipe.method in ("entropy", "percentile"):
        extra["CalibNumBins"] = 2048 if recipe.method == "entropy" else 4096
    if recipe.name == "tensorrt":
        extra["QDQKeepRemovableActivations"] = True
    with tempfile.TemporaryDirectory() as tmp:
        src = fp32_path
        if preprocess:
            pre = Path(tmp) / "pre.onnx"
            try:
                quant_pre_process(str(fp32_path), str(pre), skip_symbolic_shape=True)
                src = pre
            except Exception:  # noqa: BLE001 - pre-processing is an optimisation; quantize the original
                src = fp32_path
        reader = NpzCalibrationReader(calib_path, input_name, CALIBRATION_BATCH, on_batch)
        with atomic_path(out_path) as tmp_out:
            try:
                quantize_static(
                    str(src), str(tmp_out), reader, quant_format=QuantFormat.QDQ,
                    activation_type=qtype[recipe.activation_type], weight_type=qtype[recipe.weight_type],
                    per_channel=recipe.per_channel, reduce_range=recipe.reduce_range,
                    calibrate_method=_method(recipe.method), nodes_to_exclude=nodes_to_exclude or [],
                    extra_options=extra,
                )
            except Exception as e:  # noqa: BLE001
                raise StageError(f"quantize: onnxruntime quantize_static failed on {fp32_path.name}: {e}") from None
    return out_path


def quantize_ort_default(fp32_path: Path, out_path: Path, calib_path: Path) -> Path:
    """ONNX Runtime's quantize_static with its defaults (the peer baseline): QDQ, S8S8, per-tensor, MinMax."""
    import onnx
    from onnxruntime.quantization import quantize_static

    input_name = onnx.load(str(fp32_path), load_external_data=False).graph.input[0].name
    with atomic_path(out_path) as tmp_out:
        quantize_static(str(fp32_path), str(tmp_out), NpzCalibrationReader(calib_path, input_name, CALIBRATION_BATCH))
    return out_path


def zero_points(path: Path) -> list[int]:
    """Every zero-point value of the Q/DQ nodes in a model (TensorRT needs them all 0)."""
    import onnx
    from onnx import numpy_helper

    m = onnx.load(str(path))
    inits = {i.name: numpy_helper.to_array(i) for i in m.graph.initializer}
    out: list[int] = []
    for n in m.graph.node:
        if n.op_type in ("QuantizeLinear", "DequantizeLinear") and len(n.input) > 2 and n.input[2] in inits:
            out.extend(int(v) for v in inits[n.input[2]].ravel())
    return out
