"""The default pipeline end to end on a tiny budget, checked against the run-directory contract."""
import json
import subprocess
import sys

import numpy as np
import pytest

from tests.conftest import ROOT, SHARED, run_edgekd

pytestmark = pytest.mark.e2e


def test_run_directory_holds_the_contract(tiny_run):
    out, _ = tiny_run
    checker = SHARED / "tools" / "check_run.py"
    if not checker.exists():
        pytest.skip("../shared/tools/check_run.py not beside the clone")
    r = subprocess.run([sys.executable, str(checker), str(out)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout


def test_report_figures_are_measured_with_the_runtime(tiny_run):
    import onnxruntime as ort

    out, _ = tiny_run
    rep = json.loads((out / "report.json").read_text())
    assert rep["schema_version"] == 1 and rep["target"]["name"] == "cpu"
    f = rep["final"]
    assert (out / f["artifact"]).exists()
    assert f["precision"] in ("int8", "fp32")
    assert f["runtime"] == {"name": "onnxruntime", "version": ort.__version__}
    # The final accuracy is recomputed here from eval.npz with onnxruntime on the artifact.
    with np.load(out / "eval.npz") as z:
        x, y = z["x"], z["y"]
    s = ort.InferenceSession(str(out / f["artifact"]), providers=["CPUExecutionProvider"])
    pred = np.concatenate([s.run(None, {"input": x[i:i + 64]})[0] for i in range(0, len(x), 64)]).argmax(1)
    assert abs(float((pred == y).mean() * 100) - f["accuracy"]) < 1e-6
    assert f["latency_ms"]["p50"] > 0 and f["speedup_vs_teacher"] > 1
    assert f["compression_vs_teacher"] > 20
    names = [s["name"] for s in rep["stages"]]
    assert names[:3] == ["teacher", "distill", "prune"] and "quantize" in names
    prune = next(s for s in rep["stages"] if s["name"] == "prune")
    assert prune["after"]["params"] < prune["before"]["params"]
    distill = next(s for s in rep["stages"] if s["name"] == "distill")
    assert distill["epoch_seconds"] and 0 <= distill["agreement"] <= 100
    q = next(s for s in rep["stages"] if s["name"] == "quantize")
    assert q["calibration"]["samples"] == 64 and sum(c["chosen"] for c in q["candidates"]) == 1
    # Every measured candidate carries the peak memory of its own runner process; energy needs a power
    # sensor this host does not have: null with the reason, never a guess.
    from edgekd.bench.energy import find_meter

    meter, why = find_meter()
    for c in q["candidates"]:
        if c["latency_ms"] is not None:
            assert 0 < c["peak_memory_mb"] < 4096, c
            if meter is None:
                assert c["energy_mj"] is None and c["not_measured"]["energy_mj"] == why
    assert f["peak_memory_mb"] > 0 and rep["teacher"]["peak_memory_mb"] > 0
    assert meter is not None or (f["energy_mj"] is None and f["not_measured"]["energy_mj"] == why)


def test_calibration_comes_from_training_data_not_test(tiny_run):
    out, _ = tiny_run
    with np.load(out / "calib.npz") as c, np.load(out / "eval.npz") as e:
        calib = {r.tobytes() for r in c["x"]}
        assert not any(r.tobytes() in calib for r in e["x"])


def test_int8_model_is_qdq(tiny_run):
    import onnx

    out, _ = tiny_run
    ops = {n.op_type for n in onnx.load(str(out / "model.int8.onnx")).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops


def test_summary_table_printed(tiny_run):
    _, r = tiny_run
    assert "speedup vs teacher" in r.stdout and "teacher" in r.stdout


def test_targets_command_lists_profiles():
    r = run_edgekd("targets")
    assert r.returncode == 0
    for name in ("cpu", "intel-cpu", "raspberry-pi-5", "jetson-orin-nano", "local", "rpi"):
        assert name in r.stdout


def _key_paths(node, prefix: str = "") -> set[str]:
    """Every key path of a report: lists of stages are keyed by stage name, other lists by '[]';
    config and environment count as one key each (their contents are the config's and the host's)."""
    out: set[str] = set()
    if isinstance(node, dict):
        for k, v in node.items():
            path = f"{prefix}.{k}" if prefix else k
            out.add(path)
            if k not in ("config", "environment"):
                out |= _key_paths(v, path)
    elif isinstance(node, list):
        for item in node:
            named = prefix == "stages" and isinstance(item, dict) and isinstance(item.get("name"), str)
            out |= _key_paths(item, prefix + (f"[{item['name']}]" if named else "[]"))
    return out


def test_report_keeps_every_key_dashboards_read(tiny_run):
    # report.json's keys are a contract: a key present in the golden list may never disappear. Keys are
    # only added (and then added to tests/fixtures/report_keys.json).
    out, _ = tiny_run
    golden = set(json.loads((ROOT / "tests" / "fixtures" / "report_keys.json").read_text()))
    have = _key_paths(json.loads((out / "report.json").read_text()))
    missing = sorted(golden - have)
    assert not missing, f"keys gone from report.json: {missing[:20]}"
