"""ARM checks under qemu user-mode emulation: the cached aarch64 sysroot, `edgekd bench --host
emulate:aarch64`, and verify_arm on a trained tiny CNN (FP32 and S8S8 QDQ INT8) against x86.

The sysroot is built once in the user's edgekd cache (like the tools/setup.sh venv), not in the
per-session test cache, so only the first session downloads it (about 40 MB, a minute)."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from edgekd.config.profiles import load_profile
from edgekd.errors import BadInputError, RuntimeMissingError
from edgekd.report.assemble import apply_arm
from edgekd.runs import cache_dir
from tests.conftest import x86_arm_tolerance

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
SHARED_CACHE = cache_dir()  # read before the per-test cache is set: the sysroot outlives a session
QEMU = "qemu-aarch64-static"
EVAL_SAMPLES = 200


def _install_qemu() -> str | None:
    """qemu-aarch64-static's path, installing Debian's qemu-user-static when root and apt can."""
    if shutil.which(QEMU):
        return shutil.which(QEMU)
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        return None
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", "--no-install-recommends",
                                                "qemu-user-static"]):
        if subprocess.run(cmd, env=env, capture_output=True, timeout=600).returncode != 0:
            return None
    return shutil.which(QEMU)


@pytest.fixture(scope="module")
def sysroot():
    if _install_qemu() is None:
        pytest.skip(f"{QEMU} is not installed and cannot be installed here "
                    "(tools/system_deps.sh installs Debian's qemu-user-static as root)")
    from edgekd.bench.sysroot import build_sysroot

    saved = os.environ.get("EDGEKD_CACHE")
    os.environ["EDGEKD_CACHE"] = str(SHARED_CACHE)
    try:
        yield build_sysroot()
    finally:
        if saved is None:
            os.environ.pop("EDGEKD_CACHE", None)
        else:
            os.environ["EDGEKD_CACHE"] = saved


@pytest.fixture
def shared_cache(sysroot, monkeypatch):
    """Point edgekd's cache at the one holding the sysroot for this test."""
    monkeypatch.setenv("EDGEKD_CACHE", str(sysroot.path.parent))
    return sysroot


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A tiny CNN trained on digits (32x32), exported to FP32 ONNX and quantized to the Raspberry Pi
    5 recipe (S8S8 QDQ, per-channel weights); eval.npz holds EVAL_SAMPLES held-out samples."""
    import torch
    from torch import nn

    from edgekd.config import QuantizeConfig
    from edgekd.data import digits_arrays
    from edgekd.export import export_onnx
    from edgekd.quantize.ptq import quantize_qdq
    from edgekd.quantize.recipes import resolve

    d = tmp_path_factory.mktemp("arm-models")
    torch.manual_seed(0)
    x, y = digits_arrays(32)
    order = np.random.default_rng(0).permutation(len(x))
    train, held = order[:1400], order[1400:1400 + EVAL_SAMPLES]
    model = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.ReLU(),
                          nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(16 * 8 * 8, 10))
    opt = torch.optim.Adam(model.parameters(), 3e-3)
    xt, yt = torch.from_numpy(x[train]), torch.from_numpy(y[train])
    for _ in range(2):
        for i in range(0, len(train), 50):
            opt.zero_grad()
            nn.functional.cross_entropy(model(xt[i:i + 50]), yt[i:i + 50]).backward()
            opt.step()
    np.savez(d / "eval.npz", x=x[held], y=y[held])
    np.savez(d / "calib.npz", x=x[train[:128]])
    fp32 = export_onnx(model, (3, 32, 32), d / "model.fp32.onnx", 17)
    recipe = resolve(load_profile("raspberry-pi-5"), QuantizeConfig())
    int8 = quantize_qdq(fp32, d / "model.int8.onnx", d / "calib.npz", recipe)
    return {"dir": d, "fp32": fp32, "int8": int8, "eval": d / "eval.npz", "activation_type": recipe.activation_type}


def _latency_figures(node: object, path: str = "") -> list[str]:
    """Paths of every non-null value under a key that names a timing."""
    found = []
    if isinstance(node, dict):
        for k, v in node.items():
            p = f"{path}.{k}"
            timing = any(w in k for w in ("latency", "throughput", "cold_start", "_ms")) and "not_measured" not in k
            if timing and v is not None and not isinstance(v, str):
                found.append(p)
            found += _latency_figures(v, p)
    elif isinstance(node, list):
        for i, v in enumerate(node):
            found += _latency_figures(v, f"{path}[{i}]")
    return found


def test_sysroot_is_cached_and_records_its_versions(shared_cache):
    from edgekd.bench.sysroot import WHEELS, build_sysroot, load_sysroot, pins_key

    again = build_sysroot()
    assert again.path == shared_cache.path and again.path.name == f"arm64-sysroot-{pins_key()}"
    assert again.manifest["built_at"] == shared_cache.manifest["built_at"]  # a no-op, not a rebuild
    assert load_sysroot().manifest == again.manifest
    m = again.manifest
    assert m["verified"]["machine"] == "aarch64"
    assert m["verified"]["onnxruntime"] == WHEELS["onnxruntime"][0] and m["verified"]["numpy"] == WHEELS["numpy"][0]
    assert {"libc6", "python3.11-minimal", "libstdc++6"} <= set(m["debian_packages"])
    assert all(p["version"] and p["arch"] == "arm64" and len(p["sha256"]) == 64 for p in m["debian_packages"].values())
    assert m["qemu"].startswith("qemu-aarch64")
    r = subprocess.run([sys.executable, "-m", "edgekd.bench.sysroot", "--quiet"], cwd=ROOT, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == str(again.path), r.stderr


@pytest.mark.parametrize("precision", ["fp32", "int8"])
def test_verify_arm_matches_x86(shared_cache, models, precision, tmp_path):
    from edgekd.bench.emulate import verify_arm
    from edgekd.report.assemble import apply_arm

    assert models["activation_type"] == "int8"  # the Pi recipe: S8S8
    result = verify_arm(tmp_path, models[precision], models["eval"])
    assert result["samples"] == EVAL_SAMPLES and result["emulated"] is True
    assert result["runtime_version_arm"] == shared_cache.manifest["verified"]["onnxruntime"]
    assert result["emulated_cpu"] == "cortex-a76"
    assert result["accuracy_x86"] > 80, "the tiny CNN did not train"
    max_gap, min_agreement = x86_arm_tolerance()
    assert abs(result["accuracy_arm"] - result["accuracy_x86"]) <= max_gap, result
    assert result["arm_agreement"] >= min_agreement, result
    assert result["latency_ms"] is None and result["not_measured"] == "emulated: not representative"
    saved = json.loads((tmp_path / "verify_arm.json").read_text())
    assert len(saved["predictions_arm"]) == EVAL_SAMPLES and saved["disagreements"] == result["disagreements"]

    import onnxruntime as ort

    with np.load(models["eval"]) as z:
        x = z["x"]
    from edgekd.quantize.recipes import needs_precise_int8

    so = ort.SessionOptions()
    if needs_precise_int8(models[precision]):  # the x86 stand-in computes what the Pi's kernels do
        so.add_session_config_entry("session.x64quantprecision", "1")
    logits = ort.InferenceSession(str(models[precision]), so, providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]
    report = {"final": {"artifact": models[precision].name, "accuracy": result["accuracy_x86"],
                        "latency_ms": None, "not_measured": {"latency_ms": "measured on the board only"}}}
    apply_arm(report, result)
    final = report["final"]
    assert final["accuracy_arm"] == result["accuracy_arm"] and final["arm_agreement"] == result["arm_agreement"]
    assert final["arm"]["runtime_version_arm"] == result["runtime_version_arm"] and final["arm"]["emulated"] is True
    assert final["latency_ms"] is None and not _latency_figures(report)
    assert np.array_equal(np.asarray(saved["predictions_x86"]), logits.argmax(1))
    if precision == "int8":  # x86 logits given by the caller, on the first 60 samples only
        given = verify_arm(tmp_path, models[precision], models["eval"], logits, max_samples=60)
        assert given["samples"] == 60 and given["arm_agreement"] >= min_agreement
        assert abs(given["accuracy_x86"] - given["accuracy_arm"]) <= max(max_gap, 100 / 60) + 1e-9


def test_bench_emulated_cli(shared_cache, models, tmp_path):
    out = tmp_path / "bench.json"
    with np.load(models["eval"]) as z:
        np.savez(tmp_path / "eval50.npz", x=z["x"][:50], y=z["y"][:50])
    r = subprocess.run([sys.executable, "-m", "edgekd.cli", "bench", str(models["int8"]), "--target", "rpi",
                        "--host", "emulate:aarch64", "--eval-data", str(tmp_path / "eval50.npz"), "--json", str(out)],
                       cwd=ROOT, env={**os.environ}, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    result = json.loads(out.read_text())
    assert result["emulated"] is True and result["measured_on"] == "emulate:aarch64"
    assert result["latency_ms"] is None and result["not_measured"] == "emulated: not representative"
    assert result["cold_start_ms"] is None and result["throughput"] is None and not _latency_figures(result)
    assert result["environment"]["machine"] == "aarch64" and result["versions"]["onnxruntime"] == "1.24.1"
    assert result["runtime_version_arm"] == "1.24.1" and result["eval_samples"] == 50
    assert result["accuracy"] is not None and len(result["predictions"]) == 50
    assert "latency not measured: emulated: not representative" in r.stdout


def test_errors_name_the_fix(tmp_path, monkeypatch):
    from edgekd.bench import emulate, sysroot

    profile = load_profile("raspberry-pi-5")
    with pytest.raises(BadInputError, match="emulate:aarch64"):
        emulate.parse_emulated_host("emulate:riscv64", profile)
    with pytest.raises(BadInputError, match="unknown CPU"):
        emulate.parse_emulated_host("emulate:aarch64:pentium", profile)
    assert emulate.parse_emulated_host("emulate:aarch64:cortex-a72", profile) == "cortex-a72"
    with pytest.raises(BadInputError, match="aarch64 boards"):
        emulate.check_profile(load_profile("cpu"))
    logits = np.eye(10)[[3, 1, 4, 1, 5]]
    assert emulate._host_predictions(logits, 5, 3).tolist() == [3, 1, 4]
    with pytest.raises(BadInputError, match="4 x86 predictions"):
        emulate._host_predictions([1, 2, 3, 4], 5, 5)
    report: dict = {"final": {"accuracy": 90.0}}
    apply_arm(report, {"accuracy_arm": None, "arm_agreement": 97.5, "emulated": True,
                                     "accuracy_not_measured": "eval data has no labels (y)"})
    assert report["final"]["not_measured"] == {"accuracy_arm": "eval data has no labels (y)"}
    assert report["final"]["arm_agreement"] == 97.5 and not _latency_figures(report)
    monkeypatch.setenv("EDGEKD_CACHE", str(tmp_path / "empty-cache"))
    if shutil.which(QEMU):
        with pytest.raises(RuntimeMissingError, match="python -m edgekd.bench.sysroot"):
            sysroot.load_sysroot()
    monkeypatch.setenv("PATH", str(tmp_path))  # no qemu, apt-get or dpkg on PATH
    with pytest.raises(RuntimeMissingError, match="qemu-user-static"):
        sysroot.build_sysroot()
    (tmp_path / "m.onnx").write_bytes(b"")
    np.savez(tmp_path / "e.npz", x=np.zeros((2, 3, 8, 8), np.float32))
    with pytest.raises(RuntimeMissingError, match="qemu-user-static"):
        emulate.verify_arm(tmp_path, tmp_path / "m.onnx", tmp_path / "e.npz")
