from edgekd.config import QuantizeConfig
from edgekd.config.profiles import load_profile
from edgekd.quantize.recipes import has_vnni, resolve


def test_arm_recipe_is_s8s8_per_channel():
    r = resolve(load_profile("raspberry-pi-5"), QuantizeConfig())
    assert (r.name, r.activation_type, r.weight_type, r.per_channel) == ("ort-arm", "int8", "int8", True)


def test_tensorrt_recipe_is_symmetric():
    r = resolve(load_profile("jetson"), QuantizeConfig())
    assert r.symmetric_activations and r.symmetric_weights and r.activation_type == "int8"


def test_x86_recipe_reduces_range_without_vnni():
    r = resolve(load_profile("cpu"), QuantizeConfig())
    assert r.name in ("ort-x86", "ort-arm")
    if r.name == "ort-x86":
        assert r.activation_type == "uint8" and r.reduce_range == (not has_vnni())


def test_vnni_detection_from_flags():
    assert has_vnni({"avx2", "avx512_vnni"}) and not has_vnni({"avx2", "fma"})


def _qdq_model(path, zero_point_type):
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    zp = numpy_helper.from_array(np.zeros((), dtype=np.int8 if zero_point_type == "int8" else np.uint8), "zp")
    scale = numpy_helper.from_array(np.asarray(0.1, dtype=np.float32), "scale")
    q = helper.make_node("QuantizeLinear", ["x", "scale", "zp"], ["q"])
    dq = helper.make_node("DequantizeLinear", ["q", "scale", "zp"], ["y"])
    graph = helper.make_graph([q, dq], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])], [zp, scale])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8), str(path))
    return path


def test_precise_int8_only_for_s8s8_models_on_x86_without_vnni(tmp_path):
    import numpy as np
    import onnxruntime as ort

    from edgekd.backends.onnxruntime import OrtRunner
    from edgekd.quantize.recipes import host_arch, int8_activations, needs_precise_int8

    s8 = _qdq_model(tmp_path / "s8.onnx", "int8")
    u8 = _qdq_model(tmp_path / "u8.onnx", "uint8")
    assert int8_activations(s8) and not int8_activations(u8)
    assert not int8_activations(tmp_path / "missing.onnx")
    expected = host_arch() == "x86_64" and not has_vnni()
    assert needs_precise_int8(s8) == expected and not needs_precise_int8(u8)
    runner = OrtRunner(s8, 1, ["CPUExecutionProvider"])
    assert runner.describe().get("x64quantprecision", False) == expected  # the report says which mode ran
    x = np.linspace(-1, 1, 4, dtype=np.float32)[None]
    ref = ort.InferenceSession(str(s8), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    assert np.array_equal(runner.session.run(None, {"x": x})[0], ref)


def test_profile_format_and_types_are_honoured():
    import pytest

    from edgekd.errors import ConfigError
    from edgekd.quantize.candidates import int8_specs

    def with_quant(name: str, **kw):
        p = load_profile(name)
        return p.model_copy(update={"quantization": p.quantization.model_copy(update=kw)})

    pi = resolve(with_quant("raspberry-pi-5", activation_type="uint8"), QuantizeConfig())
    assert pi.activation_type == "uint8" and "activation_type uint8" in pi.why
    qop = resolve(with_quant("raspberry-pi-5", format="qoperator"), QuantizeConfig())
    assert qop.format == "qoperator"
    specs = int8_specs(qop, measured=True)
    assert [(s.name, s.quantizer) for s in specs] == [("int8", "qoperator"), ("int8-qdq", "qdq")]
    assert [s.quantizer for s in int8_specs(qop, measured=False)] == ["qoperator"]
    with pytest.raises(ConfigError, match="nncf"):
        resolve(with_quant("cpu", format="nncf"), QuantizeConfig())
    with pytest.raises(ConfigError, match="TensorRT"):
        resolve(with_quant("jetson", activation_type="uint8"), QuantizeConfig())
    assert resolve(load_profile("jetson"), QuantizeConfig()).why.startswith("TensorRT")  # defaults unchanged
