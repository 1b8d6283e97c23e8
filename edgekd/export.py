"""torch -> ONNX export, onnx.checker, and parity of the ONNX model against PyTorch."""
from __future__ import annotations

import io
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .errors import ModelError, StageError
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


def check_onnx_file(path: Path) -> tuple[str, tuple]:
    """Validate a user's ONNX model (checker, one image-like input); returns (input name, input shape)."""
    import onnx

    if not Path(path).is_file():
        raise ModelError(f"ONNX model {path} does not exist")
    try:
        proto = onnx.load(str(path))
    except Exception:  # noqa: BLE001
        raise ModelError(f"ONNX model {path}: not a readable ONNX file") from None
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
