"""Accuracy-aware fallback: per-layer sensitivity of a QDQ model, and keeping the most sensitive
quantized nodes in float until INT8's drop against FP32 fits `quantize.max_accuracy_drop`.

Sensitivity is the SQNR of each quantized node's output in the QDQ model against the same tensor in
the float model (onnxruntime with graph optimisations off, so Q/DQ pairs are simulated exactly),
and the SQNR the node loses between its inputs and its output: the node that loses most adds most
noise, and is the first kept in float. The drop that decides is measured with the target's runtime
where it runs here, on validation data that is never the test set.
"""
from __future__ import annotations

import math
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..bench.measure import accuracy_of, agreement_of, margin_flip_estimate

SENSITIVITY_SAMPLES = 8
MAX_KEPT_FRACTION = 0.25  # past this, INT8 would keep too little integer compute to be worth it
INPUT_SQNR_DB = 120.0  # the reference a loss is measured from where a tensor is exact (a graph input)
SKIP_OPS = {"QuantizeLinear", "DequantizeLinear"}


@dataclass
class Validation:
    """Inputs (and labels, when there are any) that decide the fallback; never the test set."""

    x: np.ndarray
    y: np.ndarray | None
    source: str


@dataclass
class FallbackResult:
    """What the fallback measured and decided, for the report."""

    table: list[dict]
    kept_float: list[str]
    steps: list[dict] = field(default_factory=list)
    drop: float | None = None
    within_budget: bool = True
    metric: str = ""


def quantized_nodes(qdq_path: Path) -> dict[str, str]:
    """Nodes of a QDQ model that compute on dequantized inputs: {node name: op type}."""
    import onnx

    g = onnx.load(str(qdq_path), load_external_data=False).graph
    dq_out = {o for n in g.node if n.op_type == "DequantizeLinear" for o in n.output}
    return {n.name: n.op_type for n in g.node
            if n.op_type not in SKIP_OPS and n.name and any(i in dq_out for i in n.input)}


def _with_outputs(path: Path, names: list[str], out: Path) -> Path:
    import onnx
    from onnx import TensorProto, helper

    m = onnx.load(str(path))
    have = {o.name for o in m.graph.output}
    types = _elem_types(m)
    for name in names:
        if name not in have:
            # Declared with the inferred type: a Shape or ArgMax output is int64, never float.
            m.graph.output.append(helper.make_tensor_value_info(name, types.get(name, TensorProto.FLOAT), None))
    onnx.save(m, str(out))
    return out


def _elem_types(m) -> dict[str, int]:
    """Element type of every tensor whose type ONNX shape inference can tell."""
    import onnx

    try:
        inferred = onnx.shape_inference.infer_shapes(m, strict_mode=False)
    except Exception:  # noqa: BLE001 - an uninferable graph keeps the declared types only
        inferred = m
    g = inferred.graph
    out = {t.name: t.data_type for t in g.initializer}
    for vi in list(g.input) + list(g.value_info) + list(g.output):
        if vi.type.HasField("tensor_type") and vi.type.tensor_type.elem_type:
            out[vi.name] = vi.type.tensor_type.elem_type
    return out


def _session(path: Path, threads: int):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    so.intra_op_num_threads = threads
    so.log_severity_level = 3
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def sensitivity_table(float_path: Path, qdq_path: Path, x: np.ndarray, threads: int = 1,
                      samples: int = SENSITIVITY_SAMPLES) -> list[dict]:
    """[{node, op_type, sqnr_db, sqnr_loss_db}] for every quantized node, most noise-adding first.

    `float_path` must be the model that was quantized (same node names). A node's output is compared
    by node name, since the quantizer may rename it (a ReLU folded into the Q/DQ range). Memory stays
    bounded: signal and noise are summed sample by sample."""
    import onnx

    qnodes = quantized_nodes(qdq_path)
    fg = onnx.load(str(float_path), load_external_data=False).graph
    qg = onnx.load(str(qdq_path), load_external_data=False).graph
    q_out = {n.name: n.output[0] for n in qg.node if n.name in qnodes and n.output}
    f_nodes = [n for n in fg.node if n.name in q_out and n.output]
    if not f_nodes:
        return []
    f_out = {n.name: n.output[0] for n in f_nodes}
    signal = dict.fromkeys(f_out, 0.0)
    noise = dict.fromkeys(f_out, 0.0)
    with tempfile.TemporaryDirectory() as tmp:
        fs = _session(_with_outputs(float_path, sorted(set(f_out.values())), Path(tmp) / "f.onnx"), threads)
        qs = _session(_with_outputs(qdq_path, sorted(set(q_out[k] for k in f_out)), Path(tmp) / "q.onnx"), threads)
        in_name = fs.get_inputs()[0].name
        for i in range(min(samples, len(x))):
            feed = {in_name: x[i:i + 1].astype(np.float32)}
            fo = dict(zip([o.name for o in fs.get_outputs()], fs.run(None, feed), strict=True))
            qo = dict(zip([o.name for o in qs.get_outputs()], qs.run(None, feed), strict=True))
            for node, t in f_out.items():
                a, b = fo[t].astype(np.float64), qo[q_out[node]].astype(np.float64)
                signal[node] += float((a ** 2).sum())
                noise[node] += float(((a - b) ** 2).sum())

    def node_db(node: str) -> float:
        if noise[node] == 0:
            return INPUT_SQNR_DB
        return min(INPUT_SQNR_DB, 10 * math.log10(max(signal[node], 1e-30) / noise[node]))

    producer = {o: n for n in fg.node for o in n.output}
    inits = {i.name for i in fg.initializer}
    memo: dict[str, float] = {}

    def tensor_db(t: str, depth: int = 0) -> float:
        # The SQNR a tensor carries: its producer's if measured, else the worst of the producer's inputs.
        if t in memo:
            return memo[t]
        p = producer.get(t)
        if p is None or depth > 50:
            db = INPUT_SQNR_DB
        elif p.name in signal:
            db = node_db(p.name)
        else:
            ins = [tensor_db(i, depth + 1) for i in p.input if i and i not in inits and i in producer]
            db = min(ins, default=INPUT_SQNR_DB)
        memo[t] = db
        return db

    table = []
    for n in f_nodes:
        out_db = node_db(n.name)
        in_db = min((tensor_db(i) for i in n.input if i and i not in inits), default=INPUT_SQNR_DB)
        exact = noise[n.name] == 0  # no noise to measure: null, not the 120 dB reference ceiling
        table.append({"node": n.name, "op_type": n.op_type, "sqnr_db": None if exact else round(out_db, 2),
                      "sqnr_loss_db": round(max(0.0, in_db - out_db), 2), **({"exact": True} if exact else {})})
    table.sort(key=lambda r: -r["sqnr_loss_db"])
    return table


def drop_of(fp32_logits: np.ndarray, int8_logits: np.ndarray, y: np.ndarray | None) -> tuple[float, str]:
    """INT8's accuracy drop in points against FP32 with labels; without labels its top-1
    disagreement with FP32 in percent (an upper bound on the drop): the larger of the disagreement seen
    and the one its margins predict (margin_flip_estimate), since a few hundred unlabeled inputs
    rarely show a flip rate near the budget."""
    if y is not None:
        return accuracy_of(fp32_logits, y) - accuracy_of(int8_logits, y), "accuracy drop (points)"
    seen = 100.0 - agreement_of(fp32_logits, int8_logits)
    return max(seen, margin_flip_estimate(fp32_logits, int8_logits)), \
        "top-1 disagreement with fp32 (%, the larger of the one seen and the one its margins predict)"


def fallback(fp32_logits: np.ndarray, evaluate: Callable[[Path], np.ndarray],
             requantize: Callable[[list[str], Path], Path], int8_path: Path, table: list[dict],
             validation: Validation, max_drop: float) -> FallbackResult:
    """Keep the most noise-adding nodes in float (1, 2, 4, ... of them, up to a quarter of the
    quantized nodes) until the drop fits `max_drop`; the best model tried ends at `int8_path`."""
    drop, metric = drop_of(fp32_logits, evaluate(int8_path), validation.y)
    res = FallbackResult(table=table, kept_float=[], drop=round(drop, 3), metric=metric)
    res.steps.append({"kept_float": 0, "drop": round(drop, 3)})
    order = [r["node"] for r in table]
    limit = max(1, int(len(order) * MAX_KEPT_FRACTION))
    best = (drop, 0)
    k = 0
    with tempfile.TemporaryDirectory() as tmp:
        while drop > max_drop and k < min(limit, len(order)):
            k = min(max(1, 2 * k), limit, len(order))
            trial = requantize(order[:k], Path(tmp) / f"keep{k}.onnx")
            drop, _ = drop_of(fp32_logits, evaluate(trial), validation.y)
            res.steps.append({"kept_float": k, "drop": round(drop, 3)})
            if drop < best[0]:
                best = (drop, k)
                shutil.copyfile(trial, int8_path)
    res.drop = round(best[0], 3)
    res.kept_float = order[:best[1]]
    res.within_budget = best[0] <= max_drop
    return res
