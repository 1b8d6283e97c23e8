"""torch -> ONNX export, onnx.checker, and what a runtime on this host says of the export: parity against
PyTorch and accuracy. The one place that opens a session on this host (through the backend interface)."""
from __future__ import annotations

import copy
import io
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .backends.base import Runner
from .bench.measure import accuracy_of, predict
from .config.profiles import Profile
from .context import RunContext
from .errors import BadInputError, ModelError, StageError
from .runs import atomic_path

INPUT_NAME, OUTPUT_NAME = "input", "logits"


@contextmanager
def without_attention_fastpath() -> Iterator[None]:
    """torch's fused attention kernel, taken in eval mode (nn.MultiheadAttention without grad), has no
    ONNX export; the plain path computes the same."""
    mha = torch.backends.mha
    was = mha.get_fastpath_enabled()
    mha.set_fastpath_enabled(False)
    try:
        yield
    finally:
        mha.set_fastpath_enabled(was)


def export_onnx(model: nn.Module, input_shape: tuple[int, ...], path: Path, opset: int) -> Path:
    """Export `model` (eval mode, batch dimension dynamic) to `path` and check it with onnx.checker."""
    import onnx

    model = model.eval()
    example = torch.zeros(1, *input_shape)
    buf = io.BytesIO()
    with warnings.catch_warnings(), without_attention_fastpath():
        warnings.simplefilter("ignore")
        try:
            torch.onnx.export(model, (example,), buf, dynamo=False, opset_version=opset, input_names=[INPUT_NAME],
                              output_names=[OUTPUT_NAME], do_constant_folding=True,
                              dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}})
        except Exception as e:  # noqa: BLE001 - the exporter raises many types
            raise StageError(f"export: torch.onnx.export failed for {type(model).__name__}: "
                             f"{str(e).splitlines()[0][:200]}") from None
    proto = onnx.load_from_string(buf.getvalue())
    try:
        onnx.checker.check_model(proto, full_check=True)
    except Exception as e:  # noqa: BLE001
        raise StageError(f"export: onnx.checker rejected the exported model: {str(e).splitlines()[0]}") from None
    with atomic_path(path) as tmp:
        onnx.save(proto, str(tmp))
    return path


def _first_line(e: Exception) -> str:
    text = str(e).strip()
    return text.splitlines()[0][:200] if text else type(e).__name__


def _check_external_data(proto, path: Path) -> None:
    """Weights kept in external data files must lie where the model says, beside it: name the first missing."""
    from onnx.external_data_helper import ExternalDataInfo, uses_external_data

    for tensor in proto.graph.initializer:
        if uses_external_data(tensor):
            location = ExternalDataInfo(tensor).location
            if not (path.parent / location).is_file():
                raise ModelError(f"ONNX model {path}: its weights are in an external data file {location!r}, which "
                                 f"is not in {path.parent.resolve()}; copy it beside the model")


def check_onnx_file(path: Path) -> tuple[str, tuple]:
    """Validate a user's ONNX model (checker, one image-like input); returns (input name, input shape)."""
    import onnx

    if not Path(path).is_file():
        raise ModelError(f"ONNX model {path} does not exist")
    if Path(path).stat().st_size == 0:
        raise ModelError(f"ONNX model {path}: the file is empty")
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception:  # noqa: BLE001
        raise ModelError(f"ONNX model {path}: not a readable ONNX file") from None
    _check_external_data(proto, Path(path))
    try:
        onnx.load_external_data_for_model(proto, str(Path(path).parent))
    except Exception as e:  # noqa: BLE001
        raise ModelError(f"ONNX model {path}: its external weights cannot be read ({_first_line(e)})") from None
    opsets = {o.domain or "ai.onnx": o.version for o in proto.opset_import}
    for node in proto.graph.node:
        domain = node.domain or "ai.onnx"
        if domain in ("ai.onnx", "ai.onnx.ml") and not onnx.defs.has(node.op_type, "" if domain == "ai.onnx" else domain):
            raise ModelError(f"ONNX model {path}: node {node.name or '(unnamed)'!r} uses op {node.op_type!r}, "
                             f"which is not an ONNX operator (opset {opsets.get(domain)})")
        if domain not in ("ai.onnx", "ai.onnx.ml", "com.microsoft"):
            raise ModelError(f"ONNX model {path}: node {node.name or '(unnamed)'!r} uses op {node.op_type!r} from "
                             f"custom domain {domain!r}, which the target runtimes cannot run")
    try:
        onnx.checker.check_model(proto)
    except Exception as e:  # noqa: BLE001
        raise ModelError(f"ONNX model {path}: onnx.checker: {str(e).splitlines()[0][:200]}") from None
    inits = {i.name for i in proto.graph.initializer}
    inputs = [i for i in proto.graph.input if i.name not in inits]
    if len(inputs) != 1:
        raise ModelError(f"ONNX model {path}: expected one input, found {len(inputs)}")
    elem = inputs[0].type.tensor_type.elem_type
    if elem != onnx.TensorProto.FLOAT:
        raise ModelError(f"ONNX model {path}: input {inputs[0].name!r} takes {onnx.TensorProto.DataType.Name(elem)}; "
                         "edgekd calibrates and quantizes float32 inputs: export the model with a float32 input "
                         "(any scaling from uint8 inside it)")
    dims = tuple(d.dim_value if d.HasField("dim_value") else (d.dim_param or None)
                 for d in inputs[0].type.tensor_type.shape.dim)
    if len(dims) != 4:
        raise ModelError(f"ONNX model {path}: input {inputs[0].name!r} has rank {len(dims)}; edgekd expects NCHW")
    return inputs[0].name, dims


def torch_logits(model: nn.Module, x: np.ndarray, batch_size: int = 256) -> np.ndarray:
    """PyTorch logits for `x` in eval mode."""
    model.eval()
    with torch.no_grad():
        return torch.cat([model(torch.from_numpy(x[i:i + batch_size])) for i in range(0, len(x), batch_size)]).numpy()


def parity(reference: np.ndarray, candidate: np.ndarray) -> dict:
    """Max absolute logit difference and top-1 agreement (percent) between two logit arrays."""
    return {
        "max_abs_diff": float(np.abs(reference - candidate).max()),
        "top1_agreement": float((reference.argmax(1) == candidate.argmax(1)).mean() * 100),
    }


def host_session(path: Path, threads: int | None, profile: Profile | None = None, precision: str = "fp32") -> Runner:
    """A session on this host for the model file at `path`, through the backend interface: the profile's
    backend when it runs here (ONNX Runtime, OpenVINO), else ONNX Runtime's CPU provider."""
    from .backends import Artifact, get_backend
    from .config.profiles import load_profile

    if profile is None or profile.backend not in ("onnxruntime", "openvino"):
        profile = load_profile("cpu")
    backend = get_backend(profile.backend)
    return backend.load(Artifact(Path(path), backend.name, precision), profile, threads)


def onnx_accuracy(ctx: RunContext, model: nn.Module | None, path: Path, x: np.ndarray, y: np.ndarray
                  ) -> tuple[float, np.ndarray]:
    """Export `model` to `path` (replacing any older file) and measure top-1 accuracy with ONNX Runtime."""
    if model is not None:
        export_onnx(copy.deepcopy(model).eval(), tuple(x.shape[1:]), path, ctx.profile.opset)
    logits = host_predict(path, x, ctx.threads)
    return accuracy_of(logits, y), logits


def host_predict(path: Path, x: np.ndarray, threads: int | None, profile: Profile | None = None,
                 precision: str = "fp32") -> np.ndarray:
    """Logits of the model at `path` on `x`, from a host session that is closed afterwards."""
    runner = host_session(path, threads, profile, precision)
    try:
        return predict(runner, x)
    finally:
        runner.close()


def check_class_scores(model: Path, sample, eval_y, model_name: str, eval_name: str) -> None:
    """The ONNX entry judges top-1 over the first output's class scores: it must be (batch, classes) with at
    least 2 classes, and every eval label one of them (else every accuracy would be a wrong figure)."""
    import onnxruntime as ort

    try:
        sess = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
        first = np.asarray(sess.run(None, {sess.get_inputs()[0].name: sample.astype(np.float32)})[0])
    except Exception:  # noqa: BLE001 - the stages that run it say what is wrong, in their words
        return
    name = sess.get_outputs()[0].name
    if first.ndim != 2 or first.shape[1] < 2 or not np.issubdtype(first.dtype, np.floating):
        raise BadInputError(f"{model_name}: its first output {name!r} is {first.dtype} of shape "
                            f"{tuple(first.shape)}; edgekd judges top-1 over class scores, (batch, classes) with "
                            "at least 2 classes")
    if eval_y is not None:  # one int64 index per input (data.load_npz checked): within the classes?
        y = np.asarray(eval_y)
        bad = y[(y < 0) | (y >= first.shape[1])]
        if len(bad):
            raise BadInputError(f"{eval_name}: label {int(bad[0])} is outside 0..{first.shape[1] - 1} "
                                f"(the model's first output has {first.shape[1]} classes)")
