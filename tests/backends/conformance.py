"""One conformance suite for every backend: subclass BackendConformance and name the backend and profile.

    class TestOpenVino(BackendConformance):
        backend_name, profile_name = "openvino", "intel-cpu"
        runtime_module, install_hint = "openvino", "edgekd[openvino]"

Tests that run the artifact skip, with `skip_reason`, where the artifact cannot run on this machine.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from edgekd.backends import Artifact, Backend, get_backend
from edgekd.bench.harness import summarize, time_inference
from edgekd.config import QuantizeConfig
from edgekd.config.profiles import Profile, load_profile
from edgekd.errors import EdgeKDError, ModelError
from edgekd.quantize.ptq import quantize_qdq
from edgekd.quantize.recipes import resolve

from .conftest import TinySet, ort_logits

ROOT = Path(__file__).resolve().parents[2]
LATENCY_KEYS = {"p50", "p90", "p95", "p99", "mean", "std", "min", "max"}


def agreement(a: np.ndarray, b: np.ndarray) -> float:
    """Top-1 agreement in percent."""
    return float((a.argmax(1) == b.argmax(1)).mean() * 100)


def run_python(code: str) -> subprocess.CompletedProcess:
    """Run `code` in a fresh interpreter with this checkout importable."""
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, text=True, capture_output=True,
                          timeout=300)


class BackendConformance:
    """What every backend promises: artifacts on disk, parity with FP32, checks, versions, clear errors."""

    backend_name: str = ""
    profile_name: str = ""
    runtime_module: str | None = None  # the import whose absence must be a RuntimeMissingError
    install_hint: str = ""  # what that error must tell the user to install
    skip_reason: str = ""  # why runtime tests skip when the artifact cannot run here (default: the artifact's)

    # ------------------------------------------------------------ fixtures

    @pytest.fixture(scope="class")
    @classmethod
    def profile(cls) -> Profile:
        return load_profile(cls.profile_name)

    @pytest.fixture(scope="class")
    @classmethod
    def backend(cls) -> Backend:
        return get_backend(cls.backend_name)

    @pytest.fixture(scope="class")
    @classmethod
    def int8_onnx(cls, tiny_set: TinySet, profile: Profile, tmp_path_factory) -> Path:
        out = tmp_path_factory.mktemp(f"{cls.profile_name}-qdq") / "model.int8.onnx"
        return quantize_qdq(tiny_set.fp32_onnx, out, tiny_set.calib_npz, resolve(profile, QuantizeConfig()))

    @pytest.fixture(scope="class")
    @classmethod
    def fp32_artifact(cls, backend: Backend, profile: Profile, tiny_set: TinySet, tmp_path_factory) -> Artifact:
        return backend.compile(tiny_set.fp32_onnx, profile, tmp_path_factory.mktemp(f"{cls.profile_name}-fp32"),
                               "fp32")

    @pytest.fixture(scope="class")
    @classmethod
    def int8_artifact(cls, backend: Backend, profile: Profile, int8_onnx: Path, tmp_path_factory) -> Artifact:
        return backend.compile(int8_onnx, profile, tmp_path_factory.mktemp(f"{cls.profile_name}-int8"), "int8")

    def _runner(self, backend: Backend, artifact: Artifact, profile: Profile):
        if not artifact.runnable_here:
            pytest.skip(self.skip_reason or artifact.not_runnable_reason)
        return backend.load(artifact, profile, threads=1)

    # ------------------------------------------------------------ compile

    def test_fp32_artifact_files_exist(self, fp32_artifact: Artifact):
        assert fp32_artifact.backend == self.backend_name and fp32_artifact.precision == "fp32"
        assert fp32_artifact.files and all(f.is_file() and f.stat().st_size > 0 for f in fp32_artifact.files)
        assert fp32_artifact.size_bytes() > 0

    def test_int8_artifact_files_exist(self, int8_artifact: Artifact):
        assert int8_artifact.precision == "int8"
        assert int8_artifact.files and all(f.is_file() and f.stat().st_size > 0 for f in int8_artifact.files)

    def test_artifact_says_why_it_cannot_run(self, fp32_artifact: Artifact):
        assert fp32_artifact.runnable_here or fp32_artifact.not_runnable_reason

    def test_compile_of_a_missing_model_is_bad_input(self, backend: Backend, profile: Profile, tmp_path):
        with pytest.raises(ModelError, match="does not exist"):
            backend.compile(tmp_path / "nope.onnx", profile, tmp_path / "out", "fp32")

    # ------------------------------------------------------------ run

    def test_fp32_parity_with_onnx(self, backend, profile, fp32_artifact, tiny_set: TinySet):
        runner = self._runner(backend, fp32_artifact, profile)
        ref = ort_logits(tiny_set.fp32_onnx, tiny_set.eval_x)
        got = runner.infer(tiny_set.eval_x)
        assert got.shape == ref.shape
        assert agreement(ref, got) >= profile.tolerances.parity_min_agreement
        assert float(np.abs(ref - got).max()) <= profile.tolerances.parity_max_abs

    def test_int8_parity(self, backend, profile, int8_artifact, int8_onnx, tiny_set: TinySet):
        runner = self._runner(backend, int8_artifact, profile)
        got = runner.infer(tiny_set.eval_x)
        assert agreement(ort_logits(int8_onnx, tiny_set.eval_x), got) >= profile.tolerances.parity_min_agreement
        assert agreement(ort_logits(tiny_set.fp32_onnx, tiny_set.eval_x), got) >= 99.0
        accuracy = float((got.argmax(1) == tiny_set.eval_y).mean() * 100)
        fp32_accuracy = float((ort_logits(tiny_set.fp32_onnx, tiny_set.eval_x).argmax(1) == tiny_set.eval_y).mean() * 100)
        assert accuracy >= fp32_accuracy - 1.0

    def test_single_sample_and_odd_batches(self, backend, profile, fp32_artifact, tiny_set: TinySet):
        runner = self._runner(backend, fp32_artifact, profile)
        one = runner.infer(tiny_set.eval_x[:1])
        seven = runner.infer(tiny_set.eval_x[:7])
        assert one.shape[0] == 1 and seven.shape[0] == 7
        np.testing.assert_allclose(one[0], seven[0], atol=profile.tolerances.parity_max_abs)

    def test_wrong_rank_is_a_model_error(self, backend, profile, fp32_artifact, tiny_set: TinySet):
        runner = self._runner(backend, fp32_artifact, profile)
        with pytest.raises(ModelError, match="rank"):
            runner.infer(tiny_set.eval_x[0])

    def test_benchmark_result_schema(self, backend, profile, fp32_artifact, tiny_set: TinySet):
        runner = self._runner(backend, fp32_artifact, profile)
        stats = summarize(time_inference(runner.infer, tiny_set.eval_x[:1], warmup=2, iterations=10))
        assert set(stats) == LATENCY_KEYS
        assert 0 < stats["min"] <= stats["p50"] <= stats["p99"] <= stats["max"]
        assert isinstance(runner.describe(), dict)

    # ------------------------------------------------------------ versions and errors

    def test_versions_name_the_runtime(self, backend: Backend):
        v = backend.versions()
        assert isinstance(v, dict) and v
        assert self.backend_name in v

    def test_missing_runtime_is_a_clear_error(self):
        if self.runtime_module is None:
            pytest.skip(f"{self.backend_name} compiles without its runtime; see its own missing-runtime test")
        code = (f"import sys\nsys.modules[{self.runtime_module!r}] = None\n"
                "from edgekd.backends import get_backend\nfrom edgekd.errors import EdgeKDError\n"
                f"try:\n    get_backend({self.backend_name!r})\n"
                "except EdgeKDError as e:\n    print(type(e).__name__, e.exit_code, e)\n    sys.exit(0)\n"
                "sys.exit(1)\n")
        r = run_python(code)
        assert r.returncode == 0, r.stderr
        name, code_, message = r.stdout.strip().split(" ", 2)
        assert name == "RuntimeMissingError" and code_ == "2"
        assert self.runtime_module in message and self.install_hint in message

    def test_error_classes_are_edgekd_errors(self):
        from edgekd.errors import RuntimeMissingError

        assert issubclass(RuntimeMissingError, EdgeKDError) and RuntimeMissingError.exit_code == 2
