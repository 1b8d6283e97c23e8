"""TensorRT for Jetson: a bundle in target/ from which the board builds and runs its own engine.

The bundle holds the TensorRT-ready ONNX (for int8 the explicitly quantized QDQ model: symmetric int8,
zero points 0), build_engine.sh (trtexec), trt_runner.py (the tensorrt Python API: build, and a
benchmark timed with CUDA events; device memory from trt_device.py) and a README. Engines are not portable across TensorRT/JetPack
versions or GPUs, so they are built on the board. Where `tensorrt` imports (edgekd running on a
Jetson) compile also builds the engine and load returns a runner; elsewhere the artifact says why
it cannot run here, and no latency is reported for it.

The bundle's model has a static batch-1 input: TensorRT then needs no optimization profile, and
trtexec takes no --shapes (it refuses explicit shapes for a static model).
"""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np

from ..config.profiles import Profile
from ..errors import ModelError, StageError
from ..runs import atomic_path, write_text
from .base import Artifact, Backend, Runner

BUNDLE_DIR = Path(__file__).parent / "tensorrt_bundle"
COPIED = ("trt_runner.py", "trt_device.py", "README.md")
ENERGY = Path(__file__).parents[1] / "bench" / "energy.py"
EVAL_CHECKS = Path(__file__).parents[1] / "bench" / "eval_data.py"  # trt_runner reads eval data with it
NOT_RUNNABLE = ("TensorRT needs an NVIDIA GPU with the tensorrt Python bindings; none here — build on the board "
                "with build_engine.sh")
PRECISION_FLAGS = {"int8": "--int8 --fp16", "fp16": "--fp16", "fp32": ""}


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return (text.splitlines()[0] if text else type(e).__name__)[:200]


def tensorrt_status() -> tuple[bool, str]:
    """(True, "") when the tensorrt Python bindings import here, else (False, why not)."""
    try:
        import tensorrt  # noqa: F401
    except ImportError as e:
        if isinstance(e, ModuleNotFoundError) and e.name == "tensorrt":
            return False, NOT_RUNNABLE
        return False, f"{NOT_RUNNABLE} (tensorrt is installed but fails to import: {_first_line(e)})"
    return True, ""


def check_symmetric_int8(path: Path) -> int:
    """Count the model's Q/DQ nodes; StageError naming the first whose zero point is not an int8 zero."""
    import onnx
    from onnx import numpy_helper

    from .tensorrt import zero_points

    qdq = ("QuantizeLinear", "DequantizeLinear")
    model = onnx.load(str(path), load_external_data=False)
    nodes = [n for n in model.graph.node if n.op_type in qdq]
    if not nodes:
        raise ModelError(f"tensorrt: precision int8 needs an explicitly quantized model; {path.name} has no "
                         "QuantizeLinear/DequantizeLinear nodes")
    inits = {i.name: i for i in model.graph.initializer}
    if not any(v != 0 for v in zero_points(path)) and all(
            inits[n.input[2]].data_type == onnx.TensorProto.INT8 for n in nodes
            if len(n.input) > 2 and n.input[2] in inits):
        return len(nodes)
    for n in nodes:  # name the first offending node
        if len(n.input) < 3 or n.input[2] not in inits:
            continue
        zp = numpy_helper.to_array(inits[n.input[2]])
        if zp.dtype != np.int8 or np.any(zp != 0):
            raise StageError(f"tensorrt: node {n.name!r} ({n.op_type}) in {path.name} has zero point "
                             f"{zp.ravel()[:4].tolist()} of type {zp.dtype}; TensorRT needs symmetric int8 "
                             "(zero points 0): quantize with the tensorrt recipe")
    raise StageError(f"tensorrt: {path.name} has non-zero Q/DQ zero points; TensorRT needs them all 0")


def fold_int32_dequantize(model) -> int:
    """Replace DequantizeLinear of constant int32 tensors (quantized biases) by their float values; return how many.

    TensorRT dequantizes int8 only ("only activation types allowed as input" for an int32 input), and a
    bias dequantized ahead of time is exactly what the DequantizeLinear would compute."""
    from onnx import TensorProto, numpy_helper

    inits = {i.name: i for i in model.graph.initializer}
    folded = []
    for n in model.graph.node:
        if (n.op_type != "DequantizeLinear" or n.input[0] not in inits or inits[n.input[0]].data_type != TensorProto.INT32
                or any(i not in inits for i in n.input[1:] if i)):
            continue
        q = numpy_helper.to_array(inits[n.input[0]]).astype(np.float64)
        scale = numpy_helper.to_array(inits[n.input[1]]).astype(np.float64)
        zp = numpy_helper.to_array(inits[n.input[2]]).astype(np.float64) if len(n.input) > 2 and n.input[2] else 0.0
        if scale.ndim == 1 and q.ndim > 1:  # per-axis: broadcast along the node's axis (default 1)
            axis = next((a.i for a in n.attribute if a.name == "axis"), 1) % q.ndim
            shape = [1] * q.ndim
            shape[axis] = -1
            scale, zp = scale.reshape(shape), np.reshape(zp, shape) if np.ndim(zp) else zp
        value = ((q - zp) * scale).astype(np.float32)
        model.graph.initializer.append(numpy_helper.from_array(value, n.output[0]))
        folded.append(n)
    for n in folded:
        model.graph.node.remove(n)
    used = {i for n in model.graph.node for i in n.input} | {o.name for o in model.graph.output}
    keep = [i for i in model.graph.initializer if i.name in used]
    del model.graph.initializer[:]
    model.graph.initializer.extend(keep)
    return len(folded)


def write_static_model(src: Path, dst: Path) -> tuple[str, list[int], int]:
    """Copy `src` to `dst` TensorRT-ready: batch fixed at 1, int32 bias dequantization folded.

    Returns the input's name and shape and the number of folded DequantizeLinear nodes."""
    import onnx

    try:
        model = onnx.load(str(src))
    except Exception as e:  # noqa: BLE001 - onnx raises DecodeError and others
        raise ModelError(f"tensorrt: cannot read ONNX model {src}: {_first_line(e)}") from None
    inits = {i.name for i in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in inits]
    if len(inputs) != 1:
        raise ModelError(f"tensorrt: {src.name} has {len(inputs)} inputs; the bundle runs models with one")
    dims = inputs[0].type.tensor_type.shape.dim
    if len(dims) < 2:
        raise ModelError(f"tensorrt: input {inputs[0].name!r} of {src.name} has rank {len(dims)}; expected NCHW")
    for k, d in enumerate(dims):
        if not d.HasField("dim_value") and k > 0:
            raise ModelError(f"tensorrt: input {inputs[0].name!r} of {src.name} has a dynamic dimension {k} "
                             f"({d.dim_param or '?'}); export it with a static C, H, W")
    for value in [inputs[0], *model.graph.output]:
        shape = value.type.tensor_type.shape
        if len(shape.dim) and not shape.dim[0].HasField("dim_value"):
            shape.dim[0].dim_value = 1  # clears dim_param: the two share a oneof
    del model.graph.value_info[:]  # intermediate shapes named the old batch; TensorRT infers its own
    folded = fold_int32_dequantize(model)
    try:
        onnx.checker.check_model(model)
    except Exception as e:  # noqa: BLE001
        raise StageError(f"tensorrt: the static-batch copy of {src.name} fails onnx.checker: {_first_line(e)}") from None
    with atomic_path(dst) as tmp:
        onnx.save(model, str(tmp))
    return inputs[0].name, [int(d.dim_value) for d in dims], folded


def render_build_script(profile: Profile, precision: str, input_name: str, input_shape: list[int],
                        dla_core: int | None) -> str:
    """build_engine.sh for this bundle: the template with the profile's flags filled in."""
    values = {
        "TARGET": profile.name, "PRECISION": precision, "INPUT_NAME": input_name,
        "INPUT_SHAPE": "x".join(str(d) for d in input_shape), "WORKSPACE_MB": str(int(profile.workspace_mb)),
        "PRECISION_FLAGS": PRECISION_FLAGS[precision],
        "DLA_FLAGS": f"--useDLACore={int(dla_core)} --allowGPUFallback" if dla_core is not None else "",
    }
    text = (BUNDLE_DIR / "build_engine.sh").read_text()
    for key, value in values.items():
        text = text.replace(f"@{key}@", re.sub(r"[^\w.:=+ -]", "_", value))
    left = re.findall(r"@[A-Z_]+@", text)
    if left:
        raise StageError(f"tensorrt: build_engine.sh template has unfilled fields {', '.join(sorted(set(left)))}")
    return text


def _runner_module():
    from .tensorrt_bundle import trt_runner

    return trt_runner


class TensorRtRunner(Runner):
    """The engine through the bundle's TrtEngine (device buffers, one stream)."""

    def __init__(self, engine_path: Path):
        mod = _runner_module()
        self._errors = (mod.RunnerError, mod.DeviceError)
        try:
            self.engine = mod.TrtEngine(str(engine_path))
        except self._errors as e:
            cls = ModelError if getattr(e, "exit_code", None) == mod.EXIT_BAD_INPUT else StageError
            raise cls(f"tensorrt: {e}") from None
        self.input_name, self.input_shape = self.engine.input_name, tuple(self.engine.input_shape)

    def _infer(self, batch: np.ndarray) -> np.ndarray:
        try:
            return self.engine.infer(batch)
        except self._errors as e:
            raise StageError(f"tensorrt: inference failed: {e}") from None

    def device_times(self, sample: np.ndarray, warmup: int, iterations: int) -> np.ndarray:
        """Per-call times (ms) from CUDA events around copy in, execute and copy out (what trt_runner's
        bench reports), not the host's wall clock."""
        try:
            return self.engine.time_ms(np.ascontiguousarray(sample[:self.input_shape[0]]), warmup, iterations)
        except self._errors as e:
            raise StageError(f"tensorrt: timing failed: {e}") from None

    def close(self) -> None:
        self.engine.close()

    def describe(self) -> dict:
        return {"device": "GPU", "input_shape": list(self.input_shape), "cuda_memory": self.engine.cuda.name}


class TensorRtBackend(Backend):
    """A Jetson bundle in out_dir; the engine too where tensorrt imports."""

    name = "tensorrt"
    extra = ""  # the tensorrt bindings come with the board's JetPack, not from pip

    def _compile(self, onnx_path: Path, profile: Profile, out_dir: Path, precision: str) -> Artifact:
        if precision not in PRECISION_FLAGS:
            raise ModelError(f"tensorrt: unknown precision {precision!r}; expected int8, fp16 or fp32")
        model = out_dir / "model.onnx"
        input_name, input_shape, folded = write_static_model(onnx_path, model)
        try:
            qdq_nodes = check_symmetric_int8(model) if precision == "int8" else 0
        except (ModelError, StageError) as e:
            model.unlink()
            raise type(e)(str(e).replace(model.name, onnx_path.name)) from None
        dla_core, notes = profile.dla_core, []
        if dla_core is not None and precision == "fp32":
            dla_core = None
            notes.append(f"dla_core {profile.dla_core} not used: DLA runs int8 and fp16 only, so fp32 builds for the GPU")
        script = out_dir / "build_engine.sh"
        write_text(script, render_build_script(profile, precision, input_name, input_shape, dla_core))
        script.chmod(0o755)
        for name in COPIED:
            shutil.copyfile(BUNDLE_DIR / name, out_dir / name)
        shutil.copyfile(ENERGY, out_dir / "energy.py")  # the board's power sensor, read while trt_runner times
        shutil.copyfile(EVAL_CHECKS, out_dir / "eval_data.py")
        (out_dir / "trt_runner.py").chmod(0o755)
        from .._version import __version__

        bundle = {"edgekd_version": __version__, "target": profile.name, "precision": precision,
                  "source_model": onnx_path.name, "model": model.name, "engine": "model.engine",
                  "timing_cache": "timing.cache", "input_name": input_name, "input_shape": input_shape,
                  "qdq_nodes": qdq_nodes, "folded_int32_dequantize": folded,
                  "workspace_mb": int(profile.workspace_mb), "dla_core": dla_core,
                  "warmup": profile.bench.warmup, "iterations": profile.bench.iterations, "notes": notes}
        write_text(out_dir / "bundle.json", json.dumps(bundle, indent=2) + "\n")
        files = [model, script, out_dir / "bundle.json", *(out_dir / n for n in COPIED), out_dir / "energy.py",
                 out_dir / "eval_data.py"]
        info = {"bundle": [f.name for f in files], "input_name": input_name, "input_shape": input_shape,
                "qdq_nodes": qdq_nodes, "folded_int32_dequantize": folded, "dla_core": dla_core,
                "workspace_mb": int(profile.workspace_mb),
                "build_on_board": "./build_engine.sh or python3 trt_runner.py build", "notes": notes}
        runnable, reason = tensorrt_status()
        if runnable and not profile.is_this_board():
            # An engine only runs on the GPU and TensorRT it was built with: one built on this machine is
            # never shipped as the board's artifact. The board builds its own from the bundle.
            runnable, reason = False, (f"tensorrt imports here, but this machine is not a {profile.name}: an engine "
                                       "built here would not run on the board; the board builds it from the bundle")
        if not runnable:
            return Artifact(path=model, backend=self.name, precision=precision, files=files,
                            runnable_here=False, not_runnable_reason=reason, info=info)
        mod = _runner_module()
        engine, cache = out_dir / "model.engine", out_dir / "timing.cache"
        try:
            info["build"] = mod.build_engine(str(model), str(engine), precision, int(profile.workspace_mb),
                                             str(cache), dla_core)
        except mod.RunnerError as e:
            cls = ModelError if e.exit_code == mod.EXIT_BAD_INPUT else StageError
            raise cls(f"tensorrt: {e}") from None
        return Artifact(path=engine, backend=self.name, precision=precision, files=[engine, cache, *files],
                        info=info)

    def _load(self, artifact: Artifact, profile: Profile, threads: int | None, spin: bool = True) -> Runner:
        return TensorRtRunner(artifact.path)

    def versions(self) -> dict:
        import onnx

        runnable, reason = tensorrt_status()
        if runnable:
            import tensorrt as trt

            return {"tensorrt": trt.__version__, "onnx": onnx.__version__}
        return {"tensorrt": None, "tensorrt_not_available": reason, "onnx": onnx.__version__}


BACKEND = TensorRtBackend()


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
