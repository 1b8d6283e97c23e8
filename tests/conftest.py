"""Shared fixtures: an isolated cache, tiny configs, and the edgekd command."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import settings

# Property tests draw the same examples run after run (a search with fresh seeds: HYPOTHESIS_PROFILE=explore).
settings.register_profile("repeatable", derandomize=True)
settings.register_profile("explore", max_examples=2000)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "repeatable"))

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    # One cache per test session: the demo teacher is trained once and reused by every test.
    cache = tmp_path_factory.getbasetemp() / "edgekd-cache"
    monkeypatch.setenv("EDGEKD_CACHE", str(cache))


def run_edgekd(*args: str, cwd: Path | None = None, env: dict | None = None, timeout: int = 900):
    """Run the edgekd command in a subprocess; returns CompletedProcess with text output."""
    e = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, "-m", "edgekd.cli", *args], cwd=cwd or ROOT, env=e, text=True,
                          capture_output=True, timeout=timeout)


TINY_CONFIG = """
name: tiny
teacher: {train_epochs: 2}
distill: {epochs: 8}
prune: {finetune_epochs: 2}
quantize: {calibration_samples: 64}
bench: {iterations: 60, warmup: 5}
"""


@pytest.fixture
def tiny_config(tmp_path) -> Path:
    p = tmp_path / "tiny.yaml"
    p.write_text(TINY_CONFIG)
    return p


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """One uninterrupted tiny run of the default pipeline for the cpu target: (run dir, process)."""
    d = tmp_path_factory.mktemp("tiny-run")
    cfg = d / "tiny.yaml"
    cfg.write_text(TINY_CONFIG)
    out = d / "out"
    r = run_edgekd("compress", "--config", str(cfg), "--target", "cpu", "--out", str(out), "--quiet",
                   env={"EDGEKD_CACHE": str(tmp_path_factory.getbasetemp() / "edgekd-cache")})
    assert r.returncode == 0, r.stderr[-2000:]
    return out, r


def x86_arm_tolerance() -> tuple[float, float]:
    """(largest accuracy gap in points, smallest top-1 agreement in %) expected between the Pi's S8S8
    model on the aarch64 kernels and on this host's x86 kernels. Without VNNI, x86 int8 kernels saturate
    on S8S8 unless ONNX Runtime's precise mode is on (edgekd turns it on for such models: 5.6 points
    apart without it, identical predictions with it); requantization may still round one ulp apart."""
    return (1.0, 99.0)
