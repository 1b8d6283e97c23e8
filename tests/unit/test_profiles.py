import pytest

from edgekd.config.profiles import list_profiles, load_profile
from edgekd.errors import ConfigError


def test_shipped_profiles_and_aliases():
    names = {p.name for p in list_profiles()}
    assert {"cpu", "intel-cpu", "raspberry-pi-5", "raspberry-pi-4", "jetson-orin-nano", "jetson-agx-orin"} <= names
    for alias, name in [("local", "cpu"), ("jetson", "jetson-orin-nano"), ("rpi", "raspberry-pi-5"),
                        ("raspberry-pi", "raspberry-pi-5"), ("openvino", "intel-cpu")]:
        assert load_profile(alias).name == name


def test_unknown_target_lists_known_ones():
    with pytest.raises(ConfigError, match="unknown target 'nope'.*cpu"):
        load_profile("nope")


def test_user_profile_file(tmp_path):
    p = tmp_path / "board.yaml"
    p.write_text("backend: onnxruntime\narch: aarch64\nthreads: 4\n")
    prof = load_profile(str(p))
    assert prof.name == "board" and prof.threads == 4 and not prof.measures_here
    p.write_text("backend: onnxruntime\nthreds: 4\n")
    with pytest.raises(ConfigError, match="threds: unknown key"):
        load_profile(str(p))


def test_a_jetson_profile_knows_its_own_board():
    from edgekd.config.profiles import load_profile

    nano, agx = load_profile("jetson-orin-nano"), load_profile("jetson-agx-orin")
    model = "NVIDIA Jetson Orin Nano Developer Kit"
    assert nano.is_this_board(model) and not agx.is_this_board(model)
    assert agx.is_this_board("NVIDIA Jetson AGX Orin Developer Kit") and not nano.is_this_board("Raspberry Pi 5 Model B")
    from pathlib import Path

    if not Path("/proc/device-tree/model").exists():  # a machine that is no board
        assert not nano.is_this_board() and not nano.measures_here  # nothing measured here is the Jetson's
