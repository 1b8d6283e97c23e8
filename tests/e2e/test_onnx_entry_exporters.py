"""The ONNX entry on models as exporters write them: torchvision networks exported with a fixed batch of 1
at opsets 11, 13 and 17, a model with two outputs, weights in Constant nodes, and models it cannot take
(exit 2, one line naming the file)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import SHARED, run_edgekd

pytestmark = pytest.mark.e2e

SIZE = 64
FAST = "bench: {iterations: 10, warmup: 1}\n"


def image_like(n: int, size: int = SIZE, seed: int = 0) -> np.ndarray:
    """Smooth random fields (a 4x4 field upsampled) plus a little noise: inputs shaped like images."""
    rng = np.random.default_rng(seed)
    low = rng.standard_normal((n, 3, 4, 4)).astype(np.float32)
    x = np.repeat(np.repeat(low, size // 4, axis=2), size // 4, axis=3)
    return (x + 0.1 * rng.standard_normal(x.shape)).astype(np.float32)


def export_fixed(model, path: Path, opset: int, size: int = SIZE, **kw) -> Path:
    """torch.onnx.export the usual way: one example of batch 1, no dynamic axes."""
    import torch

    torch.onnx.export(model.eval(), (torch.randn(1, 3, size, size),), str(path), input_names=["input"],
                      dynamo=False, opset_version=opset, **kw)
    return path


def torchvision_model(name: str):
    import torch
    import torchvision

    torch.manual_seed(0)
    return getattr(torchvision.models, name)(weights=None)


def small_cnn(two_outputs: bool = False):
    import torch
    from torch import nn

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.features = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                                          nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.ReLU(),
                                          nn.AdaptiveAvgPool2d(1), nn.Flatten())
            self.head = nn.Linear(16, 5)

        def forward(self, x):
            f = self.features(x)
            return (self.head(f), f) if two_outputs else self.head(f)

    torch.manual_seed(0)
    return Net()


def weights_into_constants(path: Path) -> int:
    """Rewrite `path` so every initializer is a Constant node, as some converters write models."""
    import onnx
    from onnx import helper

    m = onnx.load(str(path))
    consts = [helper.make_node("Constant", [], [t.name], value=t) for t in m.graph.initializer]
    del m.graph.initializer[:]
    nodes = consts + list(m.graph.node)
    del m.graph.node[:]
    m.graph.node.extend(nodes)
    onnx.checker.check_model(m)
    onnx.save(m, str(path))
    return len(consts)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("exporters")
    np.savez(d / "calib.npz", x=image_like(16))
    np.savez(d / "eval.npz", x=image_like(8, seed=1))
    (d / "fast.yaml").write_text(FAST)
    return d


def compress(d: Path, model: Path, out: Path, target: str, *extra: str):
    return run_edgekd("compress", "--config", str(d / "fast.yaml"), "--model", str(model), "--calib-data",
                      str(d / "calib.npz"), "--target", target, "--out", str(out), "--quiet", *extra)


def report_of(out: Path) -> dict:
    return json.loads((out / "report.json").read_text())


def quantize_stage(rep: dict) -> dict:
    return next(s for s in rep["stages"] if s["name"] == "quantize")


def per_channel_weights(int8_path: Path) -> int:
    """How many DequantizeLinear nodes of the INT8 model dequantize per channel (an `axis`, several scales)."""
    import onnx

    m = onnx.load(str(int8_path))
    sizes = {i.name: int(np.prod(i.dims)) for i in m.graph.initializer}
    return sum(1 for n in m.graph.node if n.op_type == "DequantizeLinear" and sizes.get(n.input[1], 1) > 1)


CASES = [(name, opset, "cpu") for name in ("resnet18", "mobilenet_v2") for opset in (11, 13, 17)]
CASES += [("resnet18", 11, "intel-cpu"), ("mobilenet_v2", 11, "raspberry-pi-5")]


@pytest.mark.parametrize("name,opset,target", CASES)
def test_torchvision_fixed_batch_export_compresses(data_dir, tmp_path, name, opset, target):
    model = export_fixed(torchvision_model(name), tmp_path / f"{name}.onnx", opset)
    out = tmp_path / "run"
    r = compress(data_dir, model, out, target)
    assert r.returncode == 0, r.stderr[-2000:]
    rep = report_of(out)
    info = rep["onnx_input"]
    assert info["opset"] == opset and info["opset_used"] == (17 if opset < 13 else opset)
    assert info["opset_converted"] is (opset < 13)
    assert info["batch"]["declared"] == 1 and info["input_shape"] == ["batch", 3, SIZE, SIZE]
    if name == "mobilenet_v2":
        assert info["constants_lifted"] > 0  # its Clip bounds are Constant nodes in the export
    assert info["output_judged"] == info["outputs"][0]
    # 16 calibration inputs: 6 calibrate, 5 choose, 5 are reported (never used to choose).
    data = rep["data"]
    assert (data["calibration_inputs"], data["selection_inputs"], data["held_out_for_fidelity"]) == (6, 5, 5)
    assert "selection" in data["selection"] and "held out from calibration and selection" in data["eval"]
    q = quantize_stage(rep)
    assert q["fallback"]["validation"] == data["selection"] and q["fallback"]["samples"] == 5
    assert per_channel_weights(out / "model.int8.onnx") > 0
    assert (out / rep["final"]["artifact"]).exists()
    assert rep["final"]["accuracy_source"] == "fidelity"
    assert 0 <= rep["final"]["agreement_with_fp32"] <= 100
    if target == "cpu" and opset == 11 and name == "resnet18":
        checker = SHARED / "tools" / "check_run.py"
        if checker.exists():
            c = subprocess.run([sys.executable, str(checker), str(out), "--onnx-entry"], capture_output=True,
                               text=True)
            assert c.returncode == 0, c.stdout


def test_two_outputs_first_is_judged_and_both_are_kept(data_dir, tmp_path):
    import onnx

    model = export_fixed(small_cnn(two_outputs=True), tmp_path / "two.onnx", 13, output_names=["logits", "features"])
    out = tmp_path / "run"
    r = compress(data_dir, model, out, "cpu", "--eval-data", str(data_dir / "eval.npz"))
    assert r.returncode == 0, r.stderr[-2000:]
    rep = report_of(out)
    assert rep["onnx_input"]["outputs"] == ["logits", "features"]
    assert rep["onnx_input"]["output_judged"] == "logits"
    assert [o.name for o in onnx.load(str(out / "model.int8.onnx")).graph.output] == ["logits", "features"]
    # With eval data: half selects, half calibrates, and only the eval data is reported.
    data = rep["data"]
    assert (data["calibration_inputs"], data["selection_inputs"], data["held_out_for_fidelity"]) == (8, 8, 0)
    assert data["eval"].startswith("eval data") and data["eval_inputs"] == 8
    assert rep["final"]["fidelity"]["top1_agreement"] is not None


def test_weights_in_constant_nodes_are_quantized(data_dir, tmp_path):
    import onnx

    model = export_fixed(small_cnn(), tmp_path / "consts.onnx", 11)
    moved = weights_into_constants(model)
    out = tmp_path / "run"
    r = compress(data_dir, model, out, "cpu")
    assert r.returncode == 0, r.stderr[-2000:]
    info = report_of(out)["onnx_input"]
    assert info["constants_lifted"] >= moved and info["opset_used"] == 17
    m = onnx.load(str(out / "model.int8.onnx"))
    int8_inits = {i.name for i in m.graph.initializer if i.data_type == onnx.TensorProto.INT8}
    weight_dq = [n for n in m.graph.node if n.op_type == "DequantizeLinear" and n.input[0] in int8_inits]
    convs = [n for n in m.graph.node if n.op_type in ("Conv", "Gemm", "MatMul")]
    dq_out = {n.output[0] for n in weight_dq}
    assert convs and all(n.input[1] in dq_out for n in convs)  # every weight is an INT8 initializer
    assert not any(n.op_type == "Constant" for n in onnx.load(str(out / "model.fp32.onnx")).graph.node)


def _batch_mixing(path: Path) -> str:
    """Fixed batch 1, and the output depends on every row of the batch: not something edgekd can feed."""
    import torch
    from torch import nn

    class Mix(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = small_cnn()

        def forward(self, x):
            y = self.net(x)
            return y + torch.ones(1, 5) * y.sum()

    export_fixed(Mix(), path, 13)
    return "batch is fixed at 1"


def _int_input(path: Path) -> str:
    import onnx
    from onnx import TensorProto, helper

    export_fixed(small_cnn(), path, 13)
    m = onnx.load(str(path))
    m.graph.input[0].type.tensor_type.elem_type = TensorProto.UINT8
    cast = helper.make_node("Cast", ["input"], ["input_f"], to=TensorProto.FLOAT)
    for n in m.graph.node:
        n.input[:] = ["input_f" if i == "input" else i for i in n.input]
    m.graph.node.insert(0, cast)
    onnx.save(m, str(path))
    return "float32"


@pytest.mark.parametrize("make", [_batch_mixing, _int_input], ids=["batch-mixing", "uint8-input"])
def test_model_it_cannot_take_exits_2_with_one_line(data_dir, tmp_path, make):
    model = tmp_path / "bad.onnx"
    fragment = make(model)
    out = tmp_path / "out"
    r = compress(data_dir, model, out, "cpu")
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2, r.stderr
    assert len(lines) == 1 and str(model) in lines[0] and fragment in lines[0], r.stderr
    assert "Traceback" not in r.stderr and "[ONNXRuntimeError]" not in r.stderr
    assert not (out / "report.json").exists()
