"""ONNX Runtime backend: the `cpu` profile and the raspberry-pi-5 profile (ARM artifact, run here on x86)."""
from __future__ import annotations

from edgekd.backends.onnxruntime import provider_settings, session_options

from .conformance import BackendConformance


class TestOnnxRuntimeCpu(BackendConformance):
    backend_name, profile_name = "onnxruntime", "cpu"
    runtime_module, install_hint = "onnxruntime", "pip install edgekd"


class TestOnnxRuntimeRaspberryPi5(BackendConformance):
    backend_name, profile_name = "onnxruntime", "raspberry-pi-5"
    runtime_module, install_hint = "onnxruntime", "pip install edgekd"

    def test_arm_artifact_is_optimised_portably(self, int8_artifact):
        # 'basic' keeps the graph free of x86-only layouts (NCHWc) that an ARM runtime cannot run.
        assert int8_artifact.info["optimization_level"] == "basic"
        assert int8_artifact.path.suffix == ".onnx"


def test_xnnpack_gets_the_threads_and_the_session_pool_one():
    so = session_options(4)
    providers = provider_settings(["XnnpackExecutionProvider", "CPUExecutionProvider"], 4, so)
    assert providers[0] == ("XnnpackExecutionProvider", {"intra_op_num_threads": "4"})
    assert providers[1] == "CPUExecutionProvider"
    assert so.intra_op_num_threads == 1


def test_cpu_provider_alone_keeps_its_threads():
    so = session_options(3)
    assert provider_settings(["CPUExecutionProvider"], 3, so) == ["CPUExecutionProvider"]
    assert so.intra_op_num_threads == 3
