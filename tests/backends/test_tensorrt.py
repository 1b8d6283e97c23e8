"""TensorRT backend on jetson-orin-nano: the bundle everywhere; the engine where tensorrt imports."""
from __future__ import annotations

import json
import py_compile
import re
import subprocess
import sys

import numpy as np
import onnx
import pytest

from edgekd.backends.tensorrt import NOT_RUNNABLE, tensorrt_status, zero_points
from edgekd.config import QuantizeConfig
from edgekd.config.profiles import load_profile
from edgekd.errors import ModelError, StageError
from edgekd.quantize.ptq import quantize_qdq
from edgekd.quantize.recipes import resolve

from .conformance import BackendConformance, run_python
from .conftest import SIZE, TinyCNN, export, ort_logits

TRT_IMPORTS, _ = tensorrt_status()
BUNDLE = {"model.onnx", "build_engine.sh", "bundle.json", "trt_runner.py", "trt_device.py", "README.md", "energy.py",
          "eval_data.py"}


class TestTensorRt(BackendConformance):
    backend_name, profile_name = "tensorrt", "jetson-orin-nano"
    skip_reason = "tensorrt does not import here"

    def test_missing_runtime_is_a_clear_error(self, tiny_set, tmp_path):
        # tensorrt is the board's, not an extra: without it compile still writes the bundle, the artifact
        # says why it cannot run here, and load is a stage error naming the way forward.
        code = ("import sys\nsys.modules['tensorrt'] = None\nfrom pathlib import Path\n"
                "from edgekd.backends import get_backend\nfrom edgekd.errors import EdgeKDError\n"
                "from edgekd.config.profiles import load_profile\n"
                "b, p = get_backend('tensorrt'), load_profile('jetson-orin-nano')\n"
                f"a = b.compile(Path({str(tiny_set.fp32_onnx)!r}), p, Path({str(tmp_path)!r}), 'fp32')\n"
                "print(a.runnable_here)\nprint(a.not_runnable_reason)\n"
                "try:\n    b.load(a, p)\nexcept EdgeKDError as e:\n    print(type(e).__name__, e.exit_code)\n")
        r = run_python(code)
        assert r.returncode == 0, r.stderr
        runnable, reason, error = r.stdout.strip().splitlines()
        assert runnable == "False" and reason == NOT_RUNNABLE
        assert error == "StageError 3"

    def test_bundle_files(self, int8_artifact):
        assert {f.name for f in int8_artifact.files} >= BUNDLE
        if not TRT_IMPORTS:
            assert not int8_artifact.runnable_here and int8_artifact.not_runnable_reason == NOT_RUNNABLE
            assert int8_artifact.path.name == "model.onnx"
        else:
            assert int8_artifact.path.name == "model.engine"

    def test_bundle_model_is_static_batch_1_symmetric_int8(self, int8_artifact, int8_onnx, tiny_set):
        model_path = int8_artifact.path.parent / "model.onnx"
        m = onnx.load(str(model_path))
        onnx.checker.check_model(m)
        dims = [d.dim_value for d in m.graph.input[0].type.tensor_type.shape.dim]
        assert dims == [1, 3, SIZE, SIZE]
        assert m.graph.output[0].type.tensor_type.shape.dim[0].dim_value == 1
        zps = zero_points(model_path)
        assert zps and all(z == 0 for z in zps)
        # TensorRT dequantizes int8 only: the quantized (int32) biases are folded back to float.
        inits = {i.name: i.data_type for i in m.graph.initializer}
        assert all(inits.get(n.input[0]) != onnx.TensorProto.INT32 for n in m.graph.node
                   if n.op_type == "DequantizeLinear")
        assert int8_artifact.info["folded_int32_dequantize"] > 0
        x = tiny_set.eval_x[:1]
        np.testing.assert_allclose(ort_logits(model_path, x), ort_logits(int8_onnx, x), atol=1e-5)

    def test_bundle_json(self, int8_artifact, profile):
        meta = json.loads((int8_artifact.path.parent / "bundle.json").read_text())
        assert meta["precision"] == "int8" and meta["input_name"] == "input"
        assert meta["input_shape"] == [1, 3, SIZE, SIZE] and meta["qdq_nodes"] > 0
        assert meta["workspace_mb"] == profile.workspace_mb and meta["dla_core"] is None

    def test_build_script(self, int8_artifact, profile):
        script = int8_artifact.path.parent / "build_engine.sh"
        subprocess.run(["bash", "-n", str(script)], check=True)
        text = script.read_text()
        for flag in ("--onnx=model.onnx", "--saveEngine=", "--timingCacheFile=timing.cache",
                     f"--memPoolSize=workspace:{profile.workspace_mb}M", "(--int8 --fp16)"):
            assert flag in text
        assert "--useDLACore" not in text and not re.search(r"@[A-Z_]+@", text)
        assert "--shapes=" not in text  # trtexec refuses explicit shapes for a static model

    def test_bundle_scripts_compile_and_import_each_other(self, int8_artifact):
        bundle = int8_artifact.path.parent
        for name in ("trt_runner.py", "trt_device.py"):
            py_compile.compile(str(bundle / name), doraise=True)
        r = subprocess.run([sys.executable, "trt_runner.py", "--help"], cwd=bundle, text=True, capture_output=True)
        assert r.returncode == 0 and "build" in r.stdout and "bench" in r.stdout

    def test_fp16_bundle(self, backend, profile, tiny_set, tmp_path):
        art = backend.compile(tiny_set.fp32_onnx, profile, tmp_path, "fp16")
        text = (tmp_path / "build_engine.sh").read_text()
        assert "precision_flags=(--fp16)" in text
        assert json.loads((tmp_path / "bundle.json").read_text())["qdq_nodes"] == 0
        assert art.precision == "fp16"

    def test_dla_core_from_the_profile(self, backend, int8_onnx, tiny_set, tmp_path):
        agx = load_profile("jetson-agx-orin").model_copy(update={"dla_core": 1})
        backend.compile(int8_onnx, agx, tmp_path / "int8", "int8")
        assert "dla_flags=(--useDLACore=1 --allowGPUFallback)" in (tmp_path / "int8" / "build_engine.sh").read_text()
        assert "workspace:4096M" in (tmp_path / "int8" / "build_engine.sh").read_text()
        art = backend.compile(tiny_set.fp32_onnx, agx, tmp_path / "fp32", "fp32")
        assert "--useDLACore" not in (tmp_path / "fp32" / "build_engine.sh").read_text()
        assert art.info["dla_core"] is None and "DLA runs int8 and fp16 only" in art.info["notes"][0]

    def test_asymmetric_qdq_is_refused_naming_a_node(self, backend, profile, tiny_set, tmp_path):
        x86 = resolve(load_profile("intel-cpu"), QuantizeConfig())  # uint8 activations, non-zero zero points
        qdq = quantize_qdq(tiny_set.fp32_onnx, tmp_path / "u8.onnx", tiny_set.calib_npz, x86)
        with pytest.raises(StageError, match=r"node '.+' \((Quantize|Dequantize)Linear\).*zero points 0"):
            backend.compile(qdq, profile, tmp_path / "out", "int8")

    def test_int8_needs_a_quantized_model(self, backend, profile, tiny_set, tmp_path):
        with pytest.raises(ModelError, match="no QuantizeLinear/DequantizeLinear"):
            backend.compile(tiny_set.fp32_onnx, profile, tmp_path, "int8")

    def test_dynamic_spatial_size_is_refused(self, backend, profile, tmp_path):
        path = export(TinyCNN(), tmp_path / "dyn.onnx", {0: "batch", 2: "height", 3: "width"})
        with pytest.raises(ModelError, match="dynamic dimension 2 \\(height\\)"):
            backend.compile(path, profile, tmp_path / "out", "fp32")

    def test_unknown_precision(self, backend, profile, tiny_set, tmp_path):
        with pytest.raises(ModelError, match="precision 'int4'"):
            backend.compile(tiny_set.fp32_onnx, profile, tmp_path, "int4")


def test_static_copy_of_a_static_model_is_unchanged(tmp_path):
    from edgekd.backends.tensorrt import write_static_model

    src = export(TinyCNN(), tmp_path / "a.onnx")
    first = write_static_model(src, tmp_path / "b.onnx")
    again = write_static_model(tmp_path / "b.onnx", tmp_path / "c.onnx")
    assert first == again == ("input", [1, 3, SIZE, SIZE], 0)
