"""The quantize stage on a tiny model: candidates per target, sensitivity table, fallback record."""
from __future__ import annotations

import numpy as np

from edgekd.config import Config, QuantizeConfig
from edgekd.config.profiles import load_profile
from edgekd.context import RunContext
from edgekd.quantize.sensitivity import Validation
from edgekd.quantize.stage import run_quantize
from tests.e2e.test_onnx_entry import smooth_inputs, tiny_onnx


def _run(tmp_path, target: str, measured: bool, max_drop: float = 0.5):
    run = tmp_path / target
    run.mkdir()
    fp32 = tiny_onnx(run / "model.fp32.onnx")
    np.savez(run / "calib.npz", x=smooth_inputs(24))
    cfg = Config(quantize=QuantizeConfig(max_accuracy_drop=max_drop))
    ctx = RunContext(cfg, load_profile(target), run, threads=1)
    val = Validation(smooth_inputs(16, 7), None, "held-out calibration inputs")
    return run, run_quantize(ctx, fp32, run / "calib.npz", run / "model.int8.onnx", val, measured)


def test_cpu_stage_reports_sensitivity_and_candidates(tmp_path):
    run, res = _run(tmp_path, "cpu", measured=True)
    e = res.entry
    assert (run / "model.int8.onnx").exists() and "int8" in res.sources
    assert all(s.precision == "int8" and s.path.exists() for s in res.sources.values())
    assert e["sensitivity"] and all({"node", "op_type", "sqnr_db"} <= set(r) for r in e["sensitivity"])
    fb = e["fallback"]
    assert fb["metric"].startswith("top-1 disagreement") and fb["steps"][0]["kept_float"] == 0
    assert fb["within_budget"] == (fb["drop"] <= 0.5)
    assert e["calibration_plan"]["memory_bound_mb"] > 0
    assert [m["candidate"] for m in e["int8_models"]] == list(res.sources)


def test_zero_budget_keeps_nodes_in_float_or_says_it_could_not(tmp_path):
    _, res = _run(tmp_path, "cpu", measured=False, max_drop=0.0)
    fb = res.entry["fallback"]
    assert list(res.sources) == ["int8"]
    if fb["steps"][0]["drop"] > 0:
        assert len(fb["steps"]) > 1
    assert fb["within_budget"] == (fb["drop"] == 0.0)
    best = [s["kept_float"] for s in fb["steps"] if s["drop"] == fb["drop"]]
    assert len(res.entry["kept_float"]) == best[0]  # the first model tried with the lowest drop


def test_raspberry_pi_stage_uses_the_arm_recipe(tmp_path):
    _, res = _run(tmp_path, "raspberry-pi-5", measured=False)
    r = res.entry["recipe"]
    assert (r["name"], r["activation_type"], r["per_channel"]) == ("ort-arm", "int8", True)
    assert "x86 kernels standing in" in res.entry["fallback"]["evaluated_with"]
