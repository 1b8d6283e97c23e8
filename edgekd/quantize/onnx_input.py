"""A user's ONNX model made ready for the quantize stage, and checked to compute what the original does.

Exporters write fixed batches, old opsets and weights in Constant nodes. Downstream needs a free batch
dimension (calibration, evaluation and benchmarks feed different batch sizes), opset 13 or later
(per-channel DequantizeLinear takes `axis` from 13) and weights as initializers (the quantizer
quantizes initializers only). The ONNX entry's calibration inputs are also split here into the parts
that calibrate, choose and report.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import ModelError

MIN_QDQ_OPSET = 13
BATCH_DIM = "batch"
CHECK_RTOL = 1e-3  # batch-size-dependent kernels and opset conversion may reorder float sums


def _first_line(e: Exception) -> str:
    text = str(e).strip()
    return text.splitlines()[0][:200] if text else type(e).__name__


def opset_of(model) -> int:
    """The model's ai.onnx opset."""
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)


def _graph_input(model):
    inits = {i.name for i in model.graph.initializer}
    return next(i for i in model.graph.input if i.name not in inits)


def _convert_opset(model, path: Path, target: int, info: dict):
    """Opsets before 13 go to `target` (the profile's opset, at least 13), or to 13 if that fails."""
    import onnx
    from onnx import helper, version_converter

    have = opset_of(model)
    info["opset_used"] = have
    if have >= MIN_QDQ_OPSET:
        return model
    err: Exception | None = None
    for version in dict.fromkeys((max(target, MIN_QDQ_OPSET), MIN_QDQ_OPSET)):
        try:
            converted = version_converter.convert_version(model, version)
            converted.ir_version = max(converted.ir_version,
                                       helper.find_min_ir_version_for(list(converted.opset_import)))
            onnx.checker.check_model(converted)
        except Exception as e:  # noqa: BLE001 - the converter raises C++ errors of several types
            err = e
            continue
        info["opset_used"] = version
        return converted
    raise ModelError(f"ONNX model {path}: opset {have} could not be converted to opset {MIN_QDQ_OPSET} or later "
                     f"(INT8 per-channel quantization needs it): {_first_line(err)}")  # type: ignore[arg-type]


def _lift_constants(model, info: dict):
    """Constant nodes become initializers and initializers leave the graph inputs (onnx_ir's passes)."""
    constants = sum(n.op_type == "Constant" for n in model.graph.node)
    inits = {i.name for i in model.graph.initializer}
    as_inputs = sum(i.name in inits for i in model.graph.input)
    info["constants_lifted"] = constants
    info["initializers_removed_from_inputs"] = as_inputs
    if not constants and not as_inputs:
        return model
    import onnx_ir as ir
    from onnx_ir.passes.common import LiftConstantsToInitializersPass, RemoveInitializersFromInputsPass

    m = ir.from_proto(model)
    RemoveInitializersFromInputsPass()(m)
    LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0)(m)
    return ir.to_proto(m)


def _free_batch(model, sample_shape: tuple, batch: int | None):
    """A copy with the input's first dimension symbolic (outputs' too where they carried the fixed
    batch), the input's other unknown dimensions taken from the data, and shapes inferred afresh."""
    import onnx

    m = onnx.ModelProto()
    m.CopyFrom(model)
    dims = _graph_input(m).type.tensor_type.shape.dim
    name = dims[0].dim_param or BATCH_DIM
    dims[0].Clear()
    dims[0].dim_param = name
    for d, size in zip(dims[1:], sample_shape[1:], strict=True):
        if not d.dim_value:
            d.Clear()
            d.dim_value = int(size)
    for out in m.graph.output:
        od = out.type.tensor_type.shape.dim
        if batch is not None and len(od) and od[0].dim_value == batch:
            od[0].Clear()
            od[0].dim_param = name
    del m.graph.value_info[:]  # inferred for the fixed batch; inferred again below
    try:
        return onnx.shape_inference.infer_shapes(m, strict_mode=False, data_prop=True)
    except Exception:  # noqa: BLE001 - ONNX Runtime infers at load time what this could not
        return m


def _unpin_reshapes(model, batch: int) -> list[str]:
    """Reshape targets that spell the fixed batch as a constant first entry now copy it from their input
    (0): the same result at that batch, any batch after. Only where the input's inferred first
    dimension is that batch. Returns the Reshape nodes changed."""
    import onnx
    from onnx import numpy_helper

    g = onnx.shape_inference.infer_shapes(model, strict_mode=False).graph
    first = {vi.name: vi.type.tensor_type.shape.dim[0].dim_value
             for vi in list(g.input) + list(g.value_info) if len(vi.type.tensor_type.shape.dim)}
    inits = {i.name: i for i in model.graph.initializer}
    users: dict[str, int] = {}
    for n in model.graph.node:
        for i in n.input:
            users[i] = users.get(i, 0) + 1
    changed = []
    for n in model.graph.node:
        allowzero = next((a.i for a in n.attribute if a.name == "allowzero"), 0)
        if n.op_type != "Reshape" or allowzero or len(n.input) < 2 or n.input[1] not in inits:
            continue
        shape = numpy_helper.to_array(inits[n.input[1]])
        if shape.ndim != 1 or not len(shape) or shape[0] != batch or first.get(n.input[0]) != batch:
            continue
        shape = shape.copy()
        shape[0] = 0
        name = n.input[1] if users[n.input[1]] == 1 else f"{n.input[1]}_{len(changed)}_batch_free"
        if name == n.input[1]:
            model.graph.initializer.remove(inits[name])
        model.graph.initializer.append(numpy_helper.from_array(shape, name))
        n.input[1] = name
        changed.append(n.name or n.output[0])
    return changed


def _session(source, path: Path):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 4  # a failure is raised as one line; ONNX Runtime's log would repeat it
    so.intra_op_num_threads = 1
    try:
        return ort.InferenceSession(source, so, providers=["CPUExecutionProvider"])
    except Exception as e:  # noqa: BLE001 - onnxruntime raises its own exception types
        raise ModelError(f"ONNX model {path}: ONNX Runtime cannot load it: {_first_line(e)}") from None


def _run(sess, x: np.ndarray, chunk: int, path: Path) -> list[np.ndarray]:
    name = sess.get_inputs()[0].name
    try:
        parts = [sess.run(None, {name: x[i:i + chunk]}) for i in range(0, len(x), chunk)]
    except Exception as e:  # noqa: BLE001
        raise ModelError(f"ONNX model {path}: ONNX Runtime cannot run it on the calibration data: "
                         f"{_first_line(e)}") from None
    return [np.concatenate(outs) for outs in zip(*parts, strict=True)]


def _save(model, path: Path) -> Path:
    import onnx

    onnx.save(model, str(path), save_as_external_data=model.ByteSize() > 2**31 - 2**26)
    return path


def _mismatch(model_path: Path, candidate: Path, x: np.ndarray, batch: int | None) -> tuple[str, float]:
    """Why the candidate file does not compute what the original does on `x` ('' when it does), fed
    the original at its own batch and the candidate all rows at once; and the largest difference."""
    ref = _run(_session(str(model_path), model_path), x, batch or len(x), model_path)
    try:
        sess = _session(str(candidate), model_path)
        names = [o.name for o in sess.get_outputs()]
        got = _run(sess, x, len(x), model_path)
    except ModelError as e:
        return str(e).split(": ", 1)[-1], float("inf")
    if got[0].ndim == 0 or got[0].shape[0] != len(x):
        return (f"its first output {names[0]!r}, the one judged, has shape {got[0].shape} for {len(x)} inputs, "
                "not one row per input"), float("inf")
    worst = 0.0
    for r, g, out in zip(ref, got, names, strict=True):
        if r.shape != g.shape:
            return f"output {out!r} has shape {g.shape} for {len(x)} inputs, {r.shape} before", float("inf")
        if r.dtype.kind != "f":
            if not np.array_equal(r, g):
                return f"output {out!r} changed", float("inf")
            continue
        diff = float(np.abs(r.astype(np.float64) - g).max()) if r.size else 0.0
        worst = max(worst, diff)
        if not np.allclose(g, r, rtol=CHECK_RTOL, atol=CHECK_RTOL * max(1.0, float(np.abs(r).max(initial=0)))):
            return f"output {out!r} differs by up to {diff:.3g}", diff
    return "", worst


def _check_input(model, path: Path) -> int | None:
    """The fixed batch the input declares (None when symbolic); a non-float input is an error."""
    from onnx import TensorProto

    inp = _graph_input(model)
    t = inp.type.tensor_type
    if t.elem_type != TensorProto.FLOAT:
        raise ModelError(f"ONNX model {path}: input {inp.name!r} is {TensorProto.DataType.Name(t.elem_type)}; "
                         "edgekd feeds float32 (export the model with a float input)")
    d = t.shape.dim[0]
    return int(d.dim_value) if d.HasField("dim_value") and d.dim_value > 0 else None


def normalise_onnx(model_path: Path, out_path: Path, sample: np.ndarray, target_opset: int) -> dict:
    """Write the model used downstream at `out_path` (opset >= 13, Constant weights as initializers,
    free batch, unknown input dimensions from `sample`), checked in ONNX Runtime against the original
    on `sample`'s rows; returns what was done, for the report. `sample`: a few calibration inputs."""
    import onnx

    try:
        model = onnx.load(str(model_path))
    except Exception:  # noqa: BLE001
        raise ModelError(f"ONNX model {model_path}: not a readable ONNX file") from None
    info: dict = {"file": str(model_path), "opset": opset_of(model)}
    rank = len(_graph_input(model).type.tensor_type.shape.dim)
    if rank != sample.ndim:
        raise ModelError(f"ONNX model {model_path}: input has rank {rank}; the calibration data has rank {sample.ndim}")
    batch = _check_input(model, model_path)
    model = _convert_opset(model, model_path, target_opset, info)
    info["opset_converted"] = info["opset_used"] != info["opset"]
    model = _lift_constants(model, info)
    rows = 2 * (batch or 1)  # a batch size the file did not declare
    x = np.ascontiguousarray(sample[np.arange(rows) % len(sample)], dtype=np.float32)
    candidate = _free_batch(model, sample.shape, batch)
    why, diff = _mismatch(model_path, _save(candidate, out_path), x, batch)
    unpinned: list[str] = []
    if why and batch is not None:
        unpinned = _unpin_reshapes(model, batch)
        if unpinned:
            candidate = _free_batch(model, sample.shape, batch)
            why, diff = _mismatch(model_path, _save(candidate, out_path), x, batch)
    if why:
        out_path.unlink(missing_ok=True)
        fix = (f"; its batch is fixed at {batch}: export it with a dynamic batch axis (torch.onnx.export(..., "
               "dynamic_axes={'input': {0: 'batch'}}))" if batch is not None else "")
        raise ModelError(f"ONNX model {model_path}: cannot be normalised for edgekd: {why}{fix}")
    outputs = [o.name for o in candidate.graph.output]
    info["batch"] = {"declared": batch if batch is not None else "dynamic",
                     "handling": (f"fixed at {batch} in the file: made dynamic" if batch is not None
                                  else "dynamic in the file: kept"),
                     "reshapes_unpinned": unpinned}
    info["input_shape"] = [d.dim_param or d.dim_value for d in _graph_input(candidate).type.tensor_type.shape.dim]
    info["outputs"] = outputs
    info["output_judged"] = outputs[0]
    info["checked"] = {"inputs": rows, "max_abs_diff": diff, "rtol": CHECK_RTOL,
                       "against": "the original file in ONNX Runtime, fed its declared batch"}
    return info


MIN_SELECTION = 5  # the fewest held-out calibration inputs that may judge the ONNX entry's accuracy budget


def split_inputs(n: int, seed: int, hold_report: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Seeded indices (calibration, selection, report) of `n` calibration inputs. With `hold_report` a
    third selects (the fallback and precision choice), a third is only reported and the rest calibrates;
    otherwise (the report has eval data of its own) half selects and half calibrates. Selection gets the
    larger share because it judges a disagreement budget of a fraction of a percent, which a few dozen
    inputs cannot resolve, while static calibration settles on a hundred or so. A share under MIN_SELECTION
    inputs selects nothing (it calibrates): a budget of a fraction of a percent judged on a handful says
    nothing."""
    perm = np.random.default_rng(seed).permutation(n)
    k = n // 3 if hold_report else n // 2
    n_report = k if hold_report else 0
    n_select = k if k >= MIN_SELECTION else 0
    report = np.sort(perm[k:k + n_report])
    return np.sort(np.concatenate([perm[n_select:k], perm[k + n_report:]])), np.sort(perm[:n_select]), report
