"""OpenVINO: the ONNX (FP32 or QDQ INT8) or an NNCF IR saved as IR (.xml/.bin), compiled for the profile's device.

The runner compiles a static batch-1 copy of the model when only the batch dimension is dynamic: a
static shape is what a latency-bound board runs, it is faster on CPU (no per-call shape inference),
and NPUs accept nothing else. Larger batches are run in chunks of the compiled batch size, so accuracy
is measured with the very compiled model whose latency is reported.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np

from ..config.profiles import Profile
from ..errors import ModelError, StageError
from .base import Artifact, Backend, Runner

# Devices that take a list of devices after a colon (AUTO:GPU,CPU); the list is what must exist.
_VIRTUAL_DEVICES = ("AUTO", "MULTI", "HETERO", "BATCH")


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return (text.splitlines()[0] if text else type(e).__name__)[:200]


def check_device(device: str, available: list[str]) -> None:
    """Raise StageError unless `device` (CPU, GPU, GPU.1, NPU, AUTO:GPU,CPU ...) can run on this machine."""
    head, _, rest = device.partition(":")
    if head.upper() in _VIRTUAL_DEVICES:
        wanted = [d.strip() for d in rest.split(",") if d.strip()]
    else:
        wanted = [device]
    have_base = {a.split(".")[0] for a in available}
    missing = [d for d in wanted if d not in available and d not in have_base]
    if missing:
        raise StageError(f"openvino: device {missing[0]!r} (target device {device!r}) is not available on this "
                         f"machine; available devices: {', '.join(available) or 'none'}")


def _supported(core, device: str) -> set[str]:
    """Property names the device accepts; empty when the device cannot say (virtual devices)."""
    try:
        return set(core.get_property(device, "SUPPORTED_PROPERTIES"))
    except Exception:  # noqa: BLE001 - virtual devices and old plugins may not answer
        return set()


def compile_config(core, device: str, precision: str, threads: int | None) -> dict:
    """Compile properties: latency hint, thread count (where the device has one), FP32 math for fp32/int8.

    The CPU plugin defaults to bf16 inference on processors with AMX or AVX512-BF16; fp32 artifacts
    and the float parts of int8 ones are kept in f32 so their accuracy is the model's own."""
    supported = _supported(core, device.split(":")[0])
    config: dict = {"PERFORMANCE_HINT": "LATENCY"}
    if threads and (not supported or "INFERENCE_NUM_THREADS" in supported):
        config["INFERENCE_NUM_THREADS"] = int(threads)
    if precision in ("fp32", "int8", "int4") and "INFERENCE_PRECISION_HINT" in supported:
        config["INFERENCE_PRECISION_HINT"] = "f32"
    return config


def static_batch(model) -> int | None:
    """Reshape `model` in place to batch 1 when only its first dimension is dynamic; return the batch it runs.

    None means other dimensions are dynamic too, and the model is left dynamic."""
    shape = model.inputs[0].get_partial_shape()
    if shape.rank.is_dynamic or len(model.inputs) != 1:
        return None
    dims = list(shape)
    if any(d.is_dynamic for d in dims[1:]):
        return None
    if dims[0].is_dynamic:
        model.reshape([1, *(d.get_length() for d in dims[1:])])
        return 1
    return dims[0].get_length()


class OpenVinoRunner(Runner):
    """A compiled OpenVINO model with one infer request."""

    def __init__(self, xml: Path, device: str, precision: str, threads: int | None):
        import openvino as ov

        core = ov.Core()
        check_device(device, list(core.available_devices))
        try:
            model = core.read_model(str(xml))
        except Exception as e:  # noqa: BLE001 - OpenVINO raises RuntimeError subclasses
            raise ModelError(f"openvino cannot read {xml}: {_first_line(e)}") from None
        shape = model.inputs[0].get_partial_shape()
        self.input_name = model.inputs[0].get_any_name()
        self.input_shape = tuple(d.get_length() if d.is_static else None for d in shape) if shape.rank.is_static else ()
        self.batch = static_batch(model)
        self.config = compile_config(core, device, precision, threads)
        try:
            self.compiled = core.compile_model(model, device, self.config)
        except Exception as e:  # noqa: BLE001
            raise StageError(f"openvino cannot compile {xml.name} for {device}: {_first_line(e)}") from None
        self.request = self.compiled.create_infer_request()
        self.device, self.threads = device, threads

    def _run(self, batch: np.ndarray) -> np.ndarray:
        return np.array(self.request.infer({0: batch})[0], copy=True)

    def run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        try:
            res = self.request.infer(feeds)
        except Exception as e:  # noqa: BLE001
            raise StageError(f"openvino inference failed: {_first_line(e)}") from None
        return [np.array(res[out], copy=True) for out in self.compiled.outputs]

    def _infer(self, batch: np.ndarray) -> np.ndarray:
        n, b = batch.shape[0], self.batch
        if b is None or n == b:
            return self._run(batch)
        outs = []
        for start in range(0, n, b):
            chunk = batch[start:start + b]
            if len(chunk) < b:  # pad the last chunk to the compiled batch; the padding rows are dropped
                pad = np.zeros((b - len(chunk), *chunk.shape[1:]), dtype=chunk.dtype)
                outs.append(self._run(np.concatenate([chunk, pad]))[:len(chunk)])
            else:
                outs.append(self._run(chunk))
        return np.concatenate(outs)

    def describe(self) -> dict:
        info = {"device": self.device, "threads": self.threads, "compiled_batch": self.batch,
                "config": dict(self.config)}
        try:
            info["execution_devices"] = list(self.compiled.get_property("EXECUTION_DEVICES"))
            precision = self.compiled.get_property("INFERENCE_PRECISION_HINT")
            info["inference_precision"] = getattr(precision, "get_type_name", lambda: str(precision))()
        except Exception:  # noqa: BLE001 - not every device reports these
            pass
        return info


class OpenVinoBackend(Backend):
    """ONNX or IR -> OpenVINO IR in out_dir; runs on the profile's device with the latency hint."""

    name = "openvino"
    extra = "openvino"

    def _compile(self, onnx_path: Path, profile: Profile, out_dir: Path, precision: str) -> Artifact:
        import openvino as ov

        if precision not in ("fp32", "fp16", "int8", "int4"):
            raise ModelError(f"openvino: unknown precision {precision!r}; expected fp32, fp16, int8 or int4")
        xml = out_dir / f"model.{precision}.xml"
        bin_ = xml.with_suffix(".bin")
        tmp_xml = out_dir / f".tmp.{xml.name}"
        try:
            if onnx_path.suffix == ".xml":  # an IR already (NNCF's output): re-saved beside the others
                model = ov.Core().read_model(str(onnx_path))
                source = "openvino-ir"
            else:
                model = ov.convert_model(str(onnx_path))
                source = "onnx"
        except Exception as e:  # noqa: BLE001
            raise ModelError(f"openvino cannot convert {onnx_path}: {_first_line(e)}") from None
        compress = precision == "fp16"
        try:
            ov.save_model(model, str(tmp_xml), compress_to_fp16=compress)
            shutil.move(tmp_xml.with_suffix(".bin"), bin_)
            shutil.move(tmp_xml, xml)
        except Exception as e:  # noqa: BLE001
            raise StageError(f"openvino cannot save IR {xml}: {_first_line(e)}") from None
        finally:
            for leftover in (tmp_xml, tmp_xml.with_suffix(".bin")):
                if leftover.exists():
                    leftover.unlink()
        return Artifact(path=xml, backend=self.name, precision=precision, files=[xml, bin_],
                        info={"device": profile.device, "source": source, "source_file": onnx_path.name,
                              "compress_to_fp16": compress})

    def _load(self, artifact: Artifact, profile: Profile, threads: int | None, spin: bool = True) -> Runner:
        return OpenVinoRunner(artifact.path, profile.device, artifact.precision, threads or profile.threads)

    def versions(self) -> dict:
        import openvino as ov

        return {"openvino": ov.__version__}


BACKEND = OpenVinoBackend()
