"""The ONNX entry (`compress --model m.onnx --calib-data c.npz`) on a tiny CNN: candidates, fidelity,
the ARM recipe without a board, and bad input (exit 2, one line naming the file, no report)."""
from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import SHARED, run_edgekd

pytestmark = pytest.mark.e2e

SHAPE = (3, 16, 16)
FAST = "bench: {iterations: 30, warmup: 2}\n"


def tiny_onnx(path: Path, classes: int = 5) -> Path:
    """A small Conv-BN-ReLU classifier exported like a user's model (input 'input', dynamic batch)."""
    import torch
    from torch import nn

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                          nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, classes)).eval()
    torch.onnx.export(model, (torch.zeros(1, *SHAPE),), str(path), dynamo=False, opset_version=17,
                      input_names=["input"], output_names=["logits"],
                      dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}})
    return path


def smooth_inputs(n: int, seed: int = 0) -> np.ndarray:
    """Image-like inputs: a low-resolution random field upsampled, plus a little noise."""
    rng = np.random.default_rng(seed)
    low = rng.standard_normal((n, 3, 4, 4)).astype(np.float32)
    x = np.repeat(np.repeat(low, 4, axis=2), 4, axis=3)
    return (x + 0.1 * rng.standard_normal(x.shape)).astype(np.float32)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("onnx-entry")
    tiny_onnx(d / "model.onnx")
    np.savez(d / "calib.npz", x=smooth_inputs(32))
    np.savez(d / "eval.npz", x=smooth_inputs(40, 1), y=np.arange(40) % 5)
    (d / "fast.yaml").write_text(FAST)
    return d


def _compress(d: Path, out: Path, *extra: str, calib: str = "calib.npz", model: str = "model.onnx",
              config: str = "fast.yaml"):
    return run_edgekd("compress", "--config", str(d / config), "--model", str(d / model), "--calib-data",
                      str(d / calib), "--out", str(out), "--quiet", *extra)


def _quantize_stage(rep: dict) -> dict:
    return next(s for s in rep["stages"] if s["name"] == "quantize")


def test_cpu_candidates_fidelity_and_contract(model_dir, tmp_path):
    out = tmp_path / "run"
    r = _compress(model_dir, out, "--target", "cpu")
    assert r.returncode == 0, r.stderr
    checker = SHARED / "tools" / "check_run.py"
    if checker.exists():
        c = subprocess.run([sys.executable, str(checker), str(out), "--onnx-entry"], capture_output=True, text=True)
        assert c.returncode == 0, c.stdout
    v = run_edgekd("report", "validate", str(out / "report.json"))
    assert v.returncode == 0, v.stderr
    rep = json.loads((out / "report.json").read_text())
    q = _quantize_stage(rep)
    names = [c["name"] for c in q["candidates"]]
    assert names[0] == "int8" and "fp32" in names and sum(c["chosen"] for c in q["candidates"]) == 1
    if q["recipe"]["name"] == "ort-x86":
        assert "int8-qoperator" in names  # measured here, so the alternative is tried
    for c in q["candidates"]:
        assert c["label"] and c["why"] and c["measured_on"] == "host" and c["latency_ms"]["p50"] > 0
    assert q["choice"]["measured"] is True
    # Without eval data, fidelity on held-out calibration inputs stands in for accuracy, and says so; the
    # inputs that chose (selection) are not the ones reported: 32 = 12 calibrate + 10 select + 10 report.
    f = rep["final"]
    assert f["accuracy"] is None and f["accuracy_source"] == "fidelity" and "fidelity" in f["not_measured"]["accuracy"]
    assert rep["data"]["held_out_for_fidelity"] == 10 and rep["data"]["calibration_inputs"] == 12
    assert rep["data"]["selection_inputs"] == 10 and rep["data"]["eval_inputs"] == 10
    assert q["fallback"]["validation"].startswith("10 calibration inputs held out")
    assert q["fallback"]["validation"] == rep["data"]["selection"]
    assert q["sensitivity"] and {"node", "op_type", "sqnr_db"} <= set(q["sensitivity"][0])
    assert isinstance(q["kept_float"], list)
    assert q["calibration"]["sha256"] == hashlib.sha256((out / "calib.npz").read_bytes()).hexdigest()
    assert q["calibration"]["samples"] == 12
    # No other candidate within budget was faster than the choice beyond noise in the same interleaved run.
    for c in q["candidates"]:
        if c["name"] != q["choice"]["candidate"] and not c["why"].startswith("over the accuracy budget"):
            assert c["why"].startswith(("slower", "not faster beyond noise", "tie with")), c["why"]


def test_raspberry_pi_5_gets_the_arm_recipe_unmeasured(model_dir, tmp_path):
    out = tmp_path / "rpi"
    (model_dir / "calib8.yaml").write_text(FAST + "quantize: {calibration_samples: 8}\n")
    r = _compress(model_dir, out, "--target", "raspberry-pi-5", "--eval-data", str(model_dir / "eval.npz"),
                  config="calib8.yaml")
    assert r.returncode == 0, r.stderr
    rep = json.loads((out / "report.json").read_text())
    q = _quantize_stage(rep)
    # quantize.calibration_samples, set, caps the 16 inputs left to calibrate (the other 16 select)
    assert q["calibration"]["samples"] == 8 == rep["data"]["calibration_inputs"]
    rec = q["recipe"]
    assert (rec["name"], rec["activation_type"], rec["weight_type"], rec["per_channel"]) == \
        ("ort-arm", "int8", "int8", True)
    assert [c["name"] for c in q["candidates"]] == ["int8", "fp32"]  # no x86-only alternatives
    assert q["choice"]["measured"] is False and rep["final"]["choice"]["measured"] is False
    assert "not measured on the board" in rep["final"]["choice"]["why"]
    assert rep["final"]["accuracy"] is not None and "not the board's latency" in rep["final"]["measured_on_note"]
    import onnx
    from onnx import numpy_helper

    m = onnx.load(str(out / "model.int8.onnx"))
    inits = {i.name: numpy_helper.to_array(i) for i in m.graph.initializer}
    zps = [inits[n.input[2]] for n in m.graph.node if n.op_type == "QuantizeLinear" and len(n.input) > 2]
    assert zps and all(z.dtype == np.int8 for z in zps)  # S8 activations


def _bad(d: Path, kind: str) -> tuple[list[str], str]:
    """Arguments of a bad-input run and a fragment the one-line message must hold."""
    x = smooth_inputs(8)
    if kind == "shape":
        np.savez(d / "bad.npz", x=np.zeros((8, 3, 20, 20), np.float32))
        return ["--calib-data", "bad.npz"], "shape"
    if kind == "dtype":
        np.savez(d / "bad.npz", x=x.astype(np.int32))
        return ["--calib-data", "bad.npz"], "dtype int32"
    if kind == "nan":
        x[0, 0, 0, 0] = np.nan
        x[1, 0, 0, 0] = np.inf
        np.savez(d / "bad.npz", x=x)
        return ["--calib-data", "bad.npz"], "NaN/Inf"
    if kind == "empty":
        np.savez(d / "bad.npz", x=np.zeros((0, *SHAPE), np.float32))
        return ["--calib-data", "bad.npz"], "empty"
    if kind == "rank":
        np.savez(d / "bad.npz", x=x[:, 0])
        return ["--calib-data", "bad.npz"], "rank 3"
    if kind == "model-rank":
        import torch

        torch.onnx.export(torch.nn.Linear(4, 2).eval(), (torch.zeros(1, 4),), str(d / "mlp.onnx"), dynamo=False,
                          opset_version=17, input_names=["input"])
        np.savez(d / "bad.npz", x=x)
        return ["--model", "mlp.onnx", "--calib-data", "bad.npz"], "rank 2"
    if kind == "labels":  # a label the 5-class model cannot score: every accuracy would be wrong
        np.savez(d / "bad.npz", x=x)
        np.savez(d / "badeval.npz", x=x + 1, y=np.array([0, 1, 2, 3, 4, 7, 1, 2]))  # held out: other inputs
        return ["--calib-data", "bad.npz", "--eval-data", "badeval.npz"], "label 7 is outside 0..4"
    if kind == "one-score":
        tiny_onnx(d / "one.onnx", classes=1)
        np.savez(d / "bad.npz", x=x)
        return ["--model", "one.onnx", "--calib-data", "bad.npz"], "judges top-1 over class scores"
    (d / "zero.yaml").write_text(FAST + "quantize: {calibration_samples: 0}\n")
    np.savez(d / "bad.npz", x=x)
    return ["--config", "zero.yaml", "--calib-data", "bad.npz"], "calibration_samples"


@pytest.mark.parametrize("kind", ["shape", "dtype", "nan", "empty", "rank", "model-rank", "size-zero", "labels",
                                  "one-score"])
def test_bad_input_exits_2_with_one_line_and_no_report(model_dir, tmp_path, kind):
    d = tmp_path / "in"
    d.mkdir()
    (d / "fast.yaml").write_text(FAST)
    (d / "model.onnx").write_bytes((model_dir / "model.onnx").read_bytes())
    args, fragment = _bad(d, kind)
    given = dict(zip(args[::2], args[1::2], strict=True))
    out = tmp_path / "out"
    r = run_edgekd("compress", "--config", str(d / given.get("--config", "fast.yaml")),
                   "--model", str(d / given.get("--model", "model.onnx")),
                   "--calib-data", str(d / given["--calib-data"]), "--target", "cpu", "--out", str(out), "--quiet",
                   *(["--eval-data", str(d / given["--eval-data"])] if "--eval-data" in given else []))
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2, r.stderr
    assert len(lines) == 1 and fragment in lines[0], r.stderr
    named = Path(given.get("--config") if kind == "size-zero" else
                 given["--model"] if kind in ("model-rank", "one-score") else
                 given.get("--eval-data", given["--calib-data"])).name
    assert named in lines[0]
    assert not (out / "report.json").exists()
