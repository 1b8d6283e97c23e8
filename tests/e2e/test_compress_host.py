"""`edgekd compress --host`: the final artifact measured on a board over SSH (a real sshd on loopback)."""
from __future__ import annotations

import json
import sys

import numpy as np
import pytest
import torch

from edgekd.models import SmallCNN
from tests.conftest import ROOT, run_edgekd
from tests.e2e.sshd import SSHD, start_sshd

pytestmark = [pytest.mark.e2e,
              pytest.mark.skipif(not SSHD.exists(), reason=f"{SSHD} is missing (Debian package openssh-server)")]


def _onnx_model(tmp_path):
    """A small CNN exported with a dynamic batch, and 32 calibration inputs beside it."""
    torch.manual_seed(0)
    model = SmallCNN(10).eval()
    onnx_path = tmp_path / "m.onnx"
    torch.onnx.export(model, (torch.zeros(1, 3, 32, 32),), str(onnx_path), dynamo=False, opset_version=17,
                      input_names=["input"], dynamic_axes={"input": {0: "b"}})
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "calib.npz", x=rng.standard_normal((32, 3, 32, 32)).astype(np.float32))
    return model, onnx_path, rng


def test_compress_with_host_reports_the_boards_figures(tmp_path):
    model, onnx_path, rng = _onnx_model(tmp_path)
    x = rng.standard_normal((40, 3, 32, 32)).astype(np.float32)
    with torch.no_grad():
        y = model(torch.from_numpy(x)).argmax(1).numpy()
    np.savez(tmp_path / "eval.npz", x=x, y=y)
    profile = tmp_path / "pi.yaml"
    profile.write_text(f"name: test-pi\nbackend: onnxruntime\narch: aarch64\nthreads: 1\n"
                       f"bench: {{warmup: 2, iterations: 20}}\nremote: {{workdir: {tmp_path}, timeout_s: 120, "
                       f"connect_timeout_s: 5}}\n")
    server = start_sshd(tmp_path / "sshd")
    try:
        out = tmp_path / "run"
        r = run_edgekd("compress", "--model", str(onnx_path), "--calib-data", str(tmp_path / "calib.npz"),
                       "--eval-data", str(tmp_path / "eval.npz"), "--target", str(profile), "--out", str(out),
                       "--host", "board", "--ssh-config", str(server.ssh_config()), "--remote-python",
                       sys.executable, "--quiet")
        assert r.returncode == 0, r.stderr[-2000:]
        rep = json.loads((out / "report.json").read_text())
        assert rep["final"]["measured_on"] == "board"
        assert rep["final"]["runtime"] == {"name": "onnxruntime", "version": rep["remote"][0]["versions"]["onnxruntime"],
                                           "where": "board"}
        assert rep["final"]["latency_ms"]["p50"] > 0
        assert rep["remote"][0]["host"] == "board" and rep["remote"][0]["accuracy"] is not None
        # The board decides: every candidate was measured there, in interleaved rounds, and the choice says so.
        q = next(st for st in rep["stages"] if st["name"] == "quantize")
        assert q["choice"]["measured"] is True and q["choice"]["measured_where"].startswith("board")
        assert "on board" in q["choice"]["why"]
        for c in q["candidates"]:
            assert c["measured_on"] == "board" and c["latency_ms"]["p50"] > 0, c
            assert c["selection"]["data"].endswith("on board") and c["selection"]["top1_agreement"] is not None
            assert c["peak_memory_mb"] > 0
        # The loopback "board" is this x86 host, not the aarch64 board the profile names: the report says so.
        assert "x86_64 processor where test-pi is aarch64" in rep["final"]["measured_on_note"]
        bad = run_edgekd("compress", "--model", str(onnx_path), "--calib-data", str(tmp_path / "calib.npz"),
                         "--target", str(profile), "--out", str(tmp_path / "run2"), "--host", "nosuchboard:1",
                         "--ssh-config", str(server.ssh_config()), "--quiet", timeout=120)
        assert bad.returncode == 3 and "nosuchboard" in bad.stderr and len(bad.stderr.strip().splitlines()) == 1
        assert not (tmp_path / "run2" / "report.json").exists()
    finally:
        server.stop()


def test_a_jetson_without_tensorrt_stops_and_no_other_runtime_speaks_for_it(tmp_path):
    # The board (a real sshd on loopback) has Python, numpy and ONNX Runtime but no TensorRT: the Jetson
    # profile must build and time its engine there with TensorRT, so the run stops with exit 3 and one
    # line; ONNX Runtime never measures in its place.
    _, onnx_path, _ = _onnx_model(tmp_path)
    profile = tmp_path / "jetson.yaml"
    nano = (ROOT / "edgekd" / "targets" / "jetson-orin-nano.yaml").read_text()
    profile.write_text(nano.replace("name: jetson-orin-nano", "name: test-jetson").replace("aliases: [jetson, orin-nano]", "aliases: []")
                       .replace("remote: {python: python3, workdir: /tmp}",
                                f"remote: {{workdir: {tmp_path}, timeout_s: 120, connect_timeout_s: 5}}")
                       .replace("bench: {warmup: 50, iterations: 500}", "bench: {warmup: 2, iterations: 20}"))
    server = start_sshd(tmp_path / "sshd")
    try:
        out = tmp_path / "run"
        r = run_edgekd("compress", "--model", str(onnx_path), "--calib-data", str(tmp_path / "calib.npz"),
                       "--target", str(profile), "--out", str(out), "--host", "board", "--ssh-config",
                       str(server.ssh_config()), "--remote-python", sys.executable, "--quiet", timeout=600)
        lines = r.stderr.strip().splitlines()
        assert r.returncode == 3 and len(lines) == 1, r.stderr[-2000:]
        assert "board" in lines[0] and "tensorrt does not import" in lines[0]
        assert "onnxruntime" not in r.stdout.lower() and not (out / "report.json").exists()
        # The same artifact benched directly: the same refusal, no latency figure.
        b = run_edgekd("bench", str(out / "target" / "int8"), "--target", str(profile), "--host", "board",
                       "--ssh-config", str(server.ssh_config()), "--remote-python", sys.executable, timeout=300)
        assert b.returncode == 3 and "tensorrt does not import" in b.stderr and "latency" not in b.stdout
    finally:
        server.stop()


def test_the_board_times_the_pruning_search_and_decides_the_precision(tmp_path):
    # The default pipeline with a MACs target and --host: the allocation search's candidates are timed on
    # the board (one SSH session for all), the precision candidates too, and the report says where.
    profile = tmp_path / "pi.yaml"
    profile.write_text(f"name: test-pi\nbackend: onnxruntime\narch: aarch64\nthreads: 1\n"
                       f"bench: {{warmup: 2, iterations: 30}}\nremote: {{workdir: {tmp_path}, timeout_s: 300, "
                       f"connect_timeout_s: 5}}\n")
    cfg = tmp_path / "c.yaml"
    cfg.write_text("name: board\nteacher: {train_epochs: 2}\ndistill: {epochs: 2}\n"  # the tiny run's teacher, cached
                   "prune: {ratio: null, target_macs: 0.6, finetune_epochs: 0}\nquantize: {calibration_samples: 32}\n")
    server = start_sshd(tmp_path / "sshd")
    try:
        out = tmp_path / "run"
        r = run_edgekd("compress", "--config", str(cfg), "--target", str(profile), "--out", str(out), "--host", "board",
                       "--ssh-config", str(server.ssh_config()), "--remote-python", sys.executable, "--quiet", timeout=1500)
        assert r.returncode == 0, r.stderr[-2000:]
        rep = json.loads((out / "report.json").read_text())
    finally:
        server.stop()
    prune = next(st for st in rep["stages"] if st["name"] == "prune")
    assert prune["latency_measured_on"].startswith("board") and "the board" in prune["latency_measured_on"]
    rows = prune["allocation_search"]
    assert len(rows) > 1 and all(row["latency_ms"] > 0 for row in rows) and sum(row["chosen"] for row in rows) == 1
    q = next(st for st in rep["stages"] if st["name"] == "quantize")
    assert q["choice"]["measured"] is True and q["choice"]["measured_where"].startswith("board")
    assert rep["final"]["measured_on"] == "board" and rep["final"]["latency_ms"]["p50"] > 0
