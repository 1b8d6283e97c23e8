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
