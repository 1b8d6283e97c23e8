"""NNCF's post-training INT8 quantization of the OpenVINO model: the intel-cpu alternative to QDQ ONNX.

With the default preset this is also the "NNCF default INT8 on OpenVINO" peer of the comparisons.
"""
from __future__ import annotations

import contextlib
import io
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from ..errors import ConfigError, DataError, ModelError, StageError
from .calibration import iter_npz_batches, npz_shape

PRESETS = ("performance", "mixed")


class NpzDataset:
    """Rows of calib.npz's `x`, one batch of 1 at a time; iterable more than once (NNCF makes several passes)."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.shape, _ = npz_shape(self.path)

    def __len__(self) -> int:
        return int(self.shape[0])

    def __iter__(self) -> Iterator[np.ndarray]:
        return iter_npz_batches(self.path, 1)


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return (text.splitlines()[0] if text else type(e).__name__)[:200]


def quantize_nncf(fp32_onnx: Path, calib_npz: Path, out_xml: Path, subset_size: int,
                  preset: str = "performance") -> Path:
    """Quantize `fp32_onnx` with nncf.quantize on OpenVINO, calibrated on `calib_npz`; save the IR at `out_xml`."""
    import nncf
    import openvino as ov

    fp32_onnx, calib_npz, out_xml = Path(fp32_onnx), Path(calib_npz), Path(out_xml)
    if preset not in PRESETS:
        raise ConfigError(f"nncf preset {preset!r} is not one of {', '.join(PRESETS)}")
    if subset_size < 1:
        raise ConfigError(f"nncf subset_size must be at least 1, got {subset_size}")
    if not calib_npz.is_file():
        raise DataError(f"calibration data {calib_npz} does not exist")
    if not fp32_onnx.is_file():
        raise ModelError(f"ONNX model {fp32_onnx} does not exist")
    dataset = NpzDataset(calib_npz)
    if len(dataset) == 0:
        raise DataError(f"{calib_npz}: array 'x' is empty")
    try:
        model = ov.Core().read_model(str(fp32_onnx))
    except Exception as e:  # noqa: BLE001 - OpenVINO raises RuntimeError subclasses
        raise ModelError(f"openvino cannot read {fp32_onnx}: {_first_line(e)}") from None
    rank = model.inputs[0].get_partial_shape().rank
    if rank.is_static and rank.get_length() != len(dataset.shape):
        raise DataError(f"{calib_npz}: array 'x' has shape {dataset.shape} (rank {len(dataset.shape)}); "
                        f"{fp32_onnx.name} expects rank {rank.get_length()}")
    try:
        # NNCF draws its own progress bars on stdout; stages report progress through the run context.
        with contextlib.redirect_stdout(io.StringIO()):
            quantized = nncf.quantize(model, nncf.Dataset(dataset), preset=nncf.QuantizationPreset(preset),
                                      subset_size=min(subset_size, len(dataset)))
    except Exception as e:  # noqa: BLE001 - NNCF raises many types
        raise StageError(f"quantize: nncf.quantize failed on {fp32_onnx.name}: {_first_line(e)}") from None
    out_xml.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_xml.with_name(f".tmp.{out_xml.name}")
    try:
        ov.save_model(quantized, str(tmp), compress_to_fp16=False)
        shutil.move(tmp.with_suffix(".bin"), out_xml.with_suffix(".bin"))
        shutil.move(tmp, out_xml)
    finally:
        for leftover in (tmp, tmp.with_suffix(".bin")):
            if leftover.exists():
                leftover.unlink()
    return out_xml
