"""Calibration (methods, memory-bounded chunks, symmetric activations) and QDQ/QOperator quantization."""
from __future__ import annotations

import json

import numpy as np
import pytest

from edgekd.backends.tensorrt import zero_points
from edgekd.config import QuantizeConfig
from edgekd.config.profiles import load_profile
from edgekd.quantize.calibration import NpzCalibrationReader
from edgekd.quantize.ptq import calibrate, preprocess, quantize_with_ranges
from edgekd.quantize.recipes import resolve
from edgekd.quantize.sensitivity import quantized_nodes, sensitivity_table
from tests.e2e.test_onnx_entry import smooth_inputs, tiny_onnx


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("ptq")
    src = preprocess(tiny_onnx(d / "model.onnx"), d / "pre.onnx")
    np.savez(d / "calib.npz", x=smooth_inputs(24))
    return d, src


def _ranges(path):
    return json.loads(path.read_text())


def test_reader_feeds_chunks_until_exhausted(tiny):
    d, _ = tiny
    r = NpzCalibrationReader(d / "calib.npz", "input", batch_size=5, max_batches=2)
    sizes = []
    while r.next_chunk():
        chunk = []
        while (b := r.get_next()) is not None:
            chunk.append(len(b["input"]))
        sizes.append(chunk)
    assert sizes == [[5, 5], [5, 5], [4]] and r.exhausted


def test_memory_bound_does_not_change_minmax_ranges(tiny):
    d, src = tiny
    plan_small = calibrate(src, d / "calib.npz", d / "small.json", "minmax", memory_mb=0.05)
    plan_big = calibrate(src, d / "calib.npz", d / "big.json", "minmax", memory_mb=1024)
    assert plan_small["chunks"] > plan_big["chunks"] == 1
    assert _ranges(d / "small.json") == _ranges(d / "big.json")


@pytest.mark.parametrize("method", ["entropy", "percentile"])
def test_histogram_methods_calibrate_in_chunks(tiny, method):
    d, src = tiny
    plan = calibrate(src, d / "calib.npz", d / f"{method}.json", method, memory_mb=0.05)
    assert plan["chunks"] > 1 and plan["method"] == method
    out = quantize_with_ranges(src, d / f"{method}.onnx", d / f"{method}.json",
                               resolve(load_profile("cpu"), QuantizeConfig(method=method)))
    assert out.exists()


def test_tensorrt_recipe_is_symmetric_with_zero_points_zero(tiny):
    d, src = tiny
    recipe = resolve(load_profile("jetson"), QuantizeConfig())
    calibrate(src, d / "calib.npz", d / "sym.json", "minmax", symmetric=True)
    out = quantize_with_ranges(src, d / "trt.onnx", d / "sym.json", recipe)
    zps = zero_points(out)
    assert zps and all(z == 0 for z in zps)


def test_qoperator_and_excluded_nodes(tiny):
    d, src = tiny
    recipe = resolve(load_profile("cpu"), QuantizeConfig())
    calibrate(src, d / "calib.npz", d / "r.json", "minmax")
    qdq = quantize_with_ranges(src, d / "qdq.onnx", d / "r.json", recipe)
    nodes = quantized_nodes(qdq)
    assert any(op == "Conv" for op in nodes.values())
    first = next(n for n, op in nodes.items() if op == "Conv")
    kept = quantize_with_ranges(src, d / "kept.onnx", d / "r.json", recipe, nodes_to_exclude=[first])
    assert first not in quantized_nodes(kept)
    import onnx

    qop = quantize_with_ranges(src, d / "qop.onnx", d / "r.json", recipe, fmt="qoperator")
    assert any(n.op_type == "QLinearConv" for n in onnx.load(str(qop)).graph.node)


def test_sensitivity_table_lists_every_quantized_node(tiny):
    d, src = tiny
    recipe = resolve(load_profile("cpu"), QuantizeConfig())
    calibrate(src, d / "calib.npz", d / "s.json", "minmax")
    qdq = quantize_with_ranges(src, d / "s.onnx", d / "s.json", recipe)
    table = sensitivity_table(src, qdq, smooth_inputs(4, 3))
    assert {r["node"] for r in table} == set(quantized_nodes(qdq))
    assert all(np.isfinite(r["sqnr_db"]) and r["sqnr_loss_db"] >= 0 for r in table)
    assert table == sorted(table, key=lambda r: -r["sqnr_loss_db"])


def test_sensitivity_handles_models_with_shape_ops(tmp_path):
    # A flatten written as reshape(x.shape[0], -1) exports Shape/Gather (int64) beside the float nodes.
    import torch

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 8, 3, padding=1)
            self.fc = torch.nn.Linear(8 * 8 * 8, 4)

        def forward(self, x):
            y = torch.relu(self.conv(x))
            return self.fc(y.reshape(y.shape[0], -1))

    torch.manual_seed(0)
    raw = tmp_path / "shape.onnx"
    torch.onnx.export(Net().eval(), torch.randn(1, 3, 8, 8), str(raw), input_names=["input"], dynamo=False,
                      opset_version=17, dynamic_axes={"input": {0: "n"}})
    import onnx

    assert any(n.op_type == "Shape" for n in onnx.load(str(raw)).graph.node)
    src = preprocess(raw, tmp_path / "pre.onnx")
    x = np.random.default_rng(0).random((8, 3, 8, 8), dtype=np.float32)
    np.savez(tmp_path / "calib.npz", x=x)
    calibrate(src, tmp_path / "calib.npz", tmp_path / "r.json", "minmax")
    qdq = quantize_with_ranges(src, tmp_path / "q.onnx", tmp_path / "r.json",
                               resolve(load_profile("cpu"), QuantizeConfig()))
    table = sensitivity_table(src, qdq, x[:3])
    assert table and all(np.isfinite(r["sqnr_db"]) for r in table)
