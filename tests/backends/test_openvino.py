"""OpenVINO backend on the intel-cpu profile, its device checks, and NNCF's INT8 on OpenVINO."""
from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("openvino", reason="openvino is not installed (pip install 'edgekd[openvino]')")

from edgekd.backends.openvino import check_device  # noqa: E402
from edgekd.errors import ConfigError, DataError, StageError  # noqa: E402

from .conformance import BackendConformance, agreement  # noqa: E402
from .conftest import ort_logits  # noqa: E402


class TestOpenVino(BackendConformance):
    backend_name, profile_name = "openvino", "intel-cpu"
    runtime_module, install_hint = "openvino", "edgekd[openvino]"

    def test_ir_pair_and_fp32_weights(self, fp32_artifact):
        xml, bin_ = fp32_artifact.files
        assert xml.suffix == ".xml" and bin_ == xml.with_suffix(".bin")
        assert fp32_artifact.info["compress_to_fp16"] is False

    def test_fp16_ir_has_smaller_weights(self, backend, profile, tiny_set, fp32_artifact, tmp_path):
        art = backend.compile(tiny_set.fp32_onnx, profile, tmp_path, "fp16")
        assert art.info["compress_to_fp16"] is True
        assert art.files[1].stat().st_size < fp32_artifact.files[1].stat().st_size
        got = backend.load(art, profile, threads=1).infer(tiny_set.eval_x)
        assert agreement(ort_logits(tiny_set.fp32_onnx, tiny_set.eval_x), got) >= 99.0

    def test_runner_settings(self, backend, profile, fp32_artifact):
        info = backend.load(fp32_artifact, profile, threads=1).describe()
        assert info["config"]["PERFORMANCE_HINT"] == "LATENCY"
        assert info["config"]["INFERENCE_NUM_THREADS"] == 1
        assert info["compiled_batch"] == 1

    def test_unavailable_device_names_it_and_the_available_ones(self, backend, profile, fp32_artifact):
        npu = profile.model_copy(update={"device": "NPU"})
        with pytest.raises(StageError, match=r"'NPU'.*available devices: CPU"):
            backend.load(fp32_artifact, npu, threads=1)


def test_device_names_accepted():
    check_device("GPU", ["CPU", "GPU.0", "GPU.1"])
    check_device("GPU.1", ["CPU", "GPU.0", "GPU.1"])
    check_device("AUTO:GPU,CPU", ["CPU", "GPU"])
    check_device("AUTO", ["CPU"])
    with pytest.raises(StageError, match=r"'GPU' \(target device 'HETERO:GPU,CPU'\)"):
        check_device("HETERO:GPU,CPU", ["CPU"])


def test_nncf_int8_on_openvino(tiny_set, tmp_path):
    from edgekd.backends import get_backend
    from edgekd.config.profiles import load_profile
    from edgekd.quantize.nncf_ov import quantize_nncf

    xml = quantize_nncf(tiny_set.fp32_onnx, tiny_set.calib_npz, tmp_path / "nncf" / "model.xml", subset_size=32)
    assert xml.is_file() and xml.with_suffix(".bin").is_file()
    assert not list(xml.parent.glob(".tmp*"))
    profile = load_profile("intel-cpu")
    backend = get_backend("openvino")
    art = backend.compile(xml, profile, tmp_path / "target", "int8")
    assert art.info["source"] == "openvino-ir"
    got = backend.load(art, profile, threads=1).infer(tiny_set.eval_x)
    assert agreement(ort_logits(tiny_set.fp32_onnx, tiny_set.eval_x), got) >= 99.0
    assert "FakeQuantize" in xml.read_text()


def test_nncf_bad_inputs(tiny_set, tmp_path):
    from edgekd.quantize.nncf_ov import quantize_nncf

    with pytest.raises(ConfigError, match="preset 'fast'"):
        quantize_nncf(tiny_set.fp32_onnx, tiny_set.calib_npz, tmp_path / "m.xml", 8, preset="fast")
    with pytest.raises(DataError, match="does not exist"):
        quantize_nncf(tiny_set.fp32_onnx, tmp_path / "missing.npz", tmp_path / "m.xml", 8)
    flat = tmp_path / "flat.npz"
    np.savez(flat, x=np.zeros((4, 768), np.float32))
    with pytest.raises(DataError, match="rank 2"):
        quantize_nncf(tiny_set.fp32_onnx, flat, tmp_path / "m.xml", 8)
