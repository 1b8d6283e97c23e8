"""`edgekd gate --baseline` on a real pair of reports: the regression verdict weighs both runs' latency
intervals (final.latency_ci_ms), written by the pipeline from the interleaved rounds."""
from __future__ import annotations

import json

import pytest

from tests.conftest import run_edgekd
from tests.e2e.test_onnx_entry import FAST, smooth_inputs, tiny_onnx

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    import numpy as np

    d = tmp_path_factory.mktemp("gate-pair")
    tiny_onnx(d / "model.onnx")
    np.savez(d / "calib.npz", x=smooth_inputs(32))
    (d / "fast.yaml").write_text(FAST)
    runs = []
    for name in ("a", "b"):
        r = run_edgekd("compress", "--config", str(d / "fast.yaml"), "--model", str(d / "model.onnx"),
                       "--calib-data", str(d / "calib.npz"), "--out", str(d / name), "--quiet")
        assert r.returncode == 0, r.stderr[-2000:]
        runs.append(d / name / "report.json")
    return runs


def test_reports_carry_latency_intervals(pair):
    for path in pair:
        final = json.loads(path.read_text())["final"]
        for key in ("p50", "p90", "p99"):
            lo, hi = final["latency_ci_ms"][key]
            assert 0 < lo <= hi
        assert final["latency_ci_ms"]["p50"][0] <= final["latency_ms"]["p50"] <= final["latency_ci_ms"]["p50"][1]


def test_gate_baseline_uses_the_intervals(pair, tmp_path):
    a, b = pair
    r = run_edgekd("gate", str(b), "--baseline", str(a), "--max-regression", "50", "--percentile", "50",
                   "--junit", str(tmp_path / "gate.xml"))
    assert r.returncode in (0, 1), r.stderr
    out = r.stdout + r.stderr
    assert "interval" in out and "a point estimate without an interval" not in out
