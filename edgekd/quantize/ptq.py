"""Static INT8 post-training quantization of an FP32 ONNX model with ONNX Runtime (QDQ or QOperator).

Calibration runs once (`calibrate`, memory-bounded, ranges saved as JSON); every quantized variant
(QDQ, QOperator, a re-quantization with more nodes kept in float) reuses the saved ranges.
"""
from __future__ import annotations

import contextlib
import io
import logging
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

from ..errors import ConfigError, DataError, StageError
from ..runs import atomic_path
from .calibration import NpzCalibrationReader, calibration_plan
from .recipes import Recipe

CALIBRATION_BATCH = 16
CALIBRATION_MEMORY_MB = 1024  # what the calibrator may hold of intermediate outputs at once
HISTOGRAM_BINS = {"entropy": 512, "percentile": 2048}
FORMATS = ("qdq", "qoperator")


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """Keep onnxruntime.quantization's prints and log warnings off the terminal (stages do not print)."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        root.setLevel(level)


def _method(name: str):
    from onnxruntime.quantization import CalibrationMethod

    methods = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
               "percentile": CalibrationMethod.Percentile}
    if name not in methods:
        raise ConfigError(f"quantize.method {name!r} is not one of {', '.join(methods)}")
    return methods[name]


def input_name(model_path: Path) -> str:
    """Name of the model's (single) graph input that is not an initializer."""
    import onnx

    g = onnx.load(str(model_path), load_external_data=False).graph
    inits = {i.name for i in g.initializer}
    return next(i.name for i in g.input if i.name not in inits)


def preprocess(fp32_path: Path, out_path: Path) -> Path:
    """ONNX Runtime's quantization pre-processing (shape inference, BN folding); the original on failure."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    try:
        with quiet():
            quant_pre_process(str(fp32_path), str(out_path), skip_symbolic_shape=True)
        return out_path
    except Exception:  # noqa: BLE001 - pre-processing is an optimisation; quantize the original
        return fp32_path


def activation_bytes(model_path: Path) -> int:
    """Bytes of the float tensors one sample produces inside the model (symbolic dimensions as 1)."""
    import onnx
    from onnx import TensorProto, shape_inference

    m = shape_inference.infer_shapes(onnx.load(str(model_path)))
    total = 0
    for vi in list(m.graph.value_info) + list(m.graph.output):
        t = vi.type.tensor_type
        if t.elem_type != TensorProto.FLOAT:
            continue
        n = 1
        for d in t.shape.dim:
            n *= d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else 1
        total += 4 * n
    return total


def calibrate(model_path: Path, calib_path: Path, ranges_path: Path, method: str, *, symmetric: bool = False,
              percentile: float = 99.999, memory_mb: float = CALIBRATION_MEMORY_MB,
              on_batch: Callable[[int], None] | None = None) -> dict:
    """Collect activation ranges of `model_path` on calib.npz's `x` and save them at `ranges_path`.

    The data is fed in chunks sized so the calibrator never holds more than `memory_mb` of
    intermediate outputs (histograms are merged chunk by chunk). Returns the plan used."""
    from onnxruntime.quantization.calibrate import create_calibrator, save_tensors_data

    per_sample = activation_bytes(model_path)
    batch, chunk = calibration_plan(per_sample, memory_mb, CALIBRATION_BATCH)
    options = {"symmetric": symmetric}
    if method in HISTOGRAM_BINS:
        options["num_bins"] = HISTOGRAM_BINS[method]
    if method == "percentile":
        options["percentile"] = percentile
    # Not max_intermediate_outputs: onnxruntime 1.31's MinMaxCalibrater clears the held outputs when it
    # reaches that count without merging them into the ranges, so those batches would be lost.
    reader = NpzCalibrationReader(calib_path, input_name(model_path), batch, on_batch, max_batches=chunk)
    with tempfile.TemporaryDirectory() as tmp, quiet():
        try:
            calibrator = create_calibrator(model_path, None, augmented_model_path=str(Path(tmp) / "augmented.onnx"),
                                           calibrate_method=_method(method), extra_options=options)
            chunks = 0
            while reader.next_chunk():
                calibrator.collect_data(reader)
                chunks += 1
            if not chunks:
                raise DataError(f"calibration data {calib_path}: array 'x' is empty")
            ranges = calibrator.compute_data()
        except DataError:
            raise
        except Exception as e:  # noqa: BLE001 - onnxruntime raises many types
            raise StageError(f"quantize: calibration of {model_path.name} failed: "
                             f"{str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__}") from None
    with atomic_path(ranges_path) as tmp_out:
        save_tensors_data(ranges, tmp_out)
    return {"method": method, "batch_size": batch, "batches_per_chunk": chunk, "chunks": chunks,
            "activation_mb_per_sample": round(per_sample / 2**20, 2), "memory_bound_mb": memory_mb}


def quantize_with_ranges(src_path: Path, out_path: Path, ranges_path: Path, recipe: Recipe, *,
                         fmt: str = "qdq", nodes_to_exclude: list[str] | None = None) -> Path:
    """Quantize `src_path` into `out_path` in QDQ or QOperator form with ranges saved by `calibrate`."""
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static

    if fmt not in FORMATS:
        raise ConfigError(f"quantization format {fmt!r} is not one of {', '.join(FORMATS)}")
    qtype = {"uint8": QuantType.QUInt8, "int8": QuantType.QInt8}
    extra = {"ActivationSymmetric": recipe.symmetric_activations, "WeightSymmetric": recipe.symmetric_weights}
    if recipe.name == "tensorrt":
        extra["QDQKeepRemovableActivations"] = True
    with atomic_path(out_path) as tmp_out, quiet():
        try:
            quantize_static(
                str(src_path), str(tmp_out), None,
                quant_format=QuantFormat.QDQ if fmt == "qdq" else QuantFormat.QOperator,
                activation_type=qtype[recipe.activation_type], weight_type=qtype[recipe.weight_type],
                per_channel=recipe.per_channel, reduce_range=recipe.reduce_range,
                calibrate_method=_method(recipe.method), nodes_to_exclude=list(nodes_to_exclude or []),
                extra_options=extra, calibration_cache_path=str(ranges_path),
            )
        except Exception as e:  # noqa: BLE001
            raise StageError(f"quantize: onnxruntime quantize_static ({fmt}) failed on {src_path.name}: "
                             f"{str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__}") from None
    return out_path


def quantize_qdq(fp32_path: Path, out_path: Path, calib_path: Path, recipe: Recipe, *,
                 nodes_to_exclude: list[str] | None = None, percentile: float = 99.999,
                 on_batch: Callable[[int], None] | None = None, fmt: str = "qdq",
                 memory_mb: float = CALIBRATION_MEMORY_MB) -> Path:
    """Pre-process, calibrate and quantize `fp32_path` into `out_path` in one call."""
    with tempfile.TemporaryDirectory() as tmp:
        src = preprocess(fp32_path, Path(tmp) / "pre.onnx")
        ranges = Path(tmp) / "ranges.json"
        calibrate(src, calib_path, ranges, recipe.method, symmetric=recipe.symmetric_activations,
                  percentile=percentile, memory_mb=memory_mb, on_batch=on_batch)
        return quantize_with_ranges(src, out_path, ranges, recipe, fmt=fmt, nodes_to_exclude=nodes_to_exclude)


def quantize_ort_default(fp32_path: Path, out_path: Path, calib_path: Path) -> Path:
    """ONNX Runtime's quantize_static with its defaults (the peer baseline): QDQ, S8S8, per-tensor, MinMax."""
    from onnxruntime.quantization import quantize_static

    with atomic_path(out_path) as tmp_out, quiet():
        quantize_static(str(fp32_path), str(tmp_out),
                        NpzCalibrationReader(calib_path, input_name(fp32_path), CALIBRATION_BATCH))
    return out_path

