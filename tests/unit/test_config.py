import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edgekd.config import Config, assign, from_dict, load_config
from edgekd.errors import ConfigError


def test_defaults_are_the_embedded_demo():
    cfg = load_config(None)
    assert cfg.data.dataset == "digits"
    assert cfg.stages == ["distill", "prune", "quantize"]
    assert cfg.target == "cpu"


def test_unknown_key_names_its_path(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("distill:\n  epocs: 3\n")
    with pytest.raises(ConfigError) as e:
        load_config(p)
    assert "distill.epocs" in str(e.value) and "unknown key" in str(e.value) and str(p) in str(e.value)


def test_out_of_range_value_names_key():
    with pytest.raises(ConfigError, match=r"distill\.alpha"):
        from_dict({"distill": {"alpha": 1.5}})


def test_malformed_yaml_names_file_and_line(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("name: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(p)


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")


def test_stage_order_and_duplicates():
    with pytest.raises(ConfigError, match="order"):
        from_dict({"stages": ["prune", "distill"]})
    with pytest.raises(ConfigError, match="twice"):
        from_dict({"stages": ["prune", "prune"]})


def test_imagefolder_needs_root():
    with pytest.raises(ConfigError, match="data.root"):
        from_dict({"data": {"dataset": "imagefolder"}})


def test_one_prune_amount_only():
    with pytest.raises(ConfigError, match="ratio and target_macs"):
        from_dict({"prune": {"ratio": 0.3, "target_macs": 0.5}})


def test_relative_paths_resolve_against_config_file(tmp_path):
    (tmp_path / "imgs").mkdir()
    p = tmp_path / "c.yaml"
    p.write_text("data: {dataset: imagefolder, root: imgs}\n")
    assert load_config(p).data.root == str(tmp_path / "imgs")


def test_strategy_teachers_and_model_files_resolve_against_config_file(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("student: {model: nets/student.pt}\n"
                 "distill: {strategy: multi_teacher, strategy_options: {multi_teacher: {teachers: "
                 "[{model: wide_cnn, checkpoint: ckpt/wide.pt}, {model: nets/other.pth}]}, mutual: {peer: tiny_cnn}}}\n")
    cfg = load_config(p)
    teachers = cfg.distill.strategy_options.multi_teacher.teachers
    assert cfg.student.model == str(tmp_path / "nets/student.pt")
    assert teachers[0].checkpoint == str(tmp_path / "ckpt/wide.pt") and teachers[0].model == "wide_cnn"
    assert teachers[1].model == str(tmp_path / "nets/other.pth")
    assert cfg.distill.strategy_options.mutual.peer == "tiny_cnn"


@settings(max_examples=60, deadline=None)
@given(st.dictionaries(st.text(min_size=1, max_size=8), st.integers() | st.text(max_size=5) | st.none(), max_size=4))
def test_arbitrary_top_level_mappings_load_or_fail_cleanly(raw):
    try:
        cfg = from_dict(raw)
    except ConfigError as e:
        assert str(e) and "\n" not in str(e)
    else:
        assert isinstance(cfg, Config)


@settings(max_examples=60, deadline=None)
@given(st.floats(allow_nan=True, allow_infinity=True), st.floats(allow_nan=True, allow_infinity=True))
def test_distill_numbers_validated(t, a):
    try:
        cfg = from_dict({"distill": {"temperature": t, "alpha": a}})
    except ConfigError as e:
        assert "distill." in str(e)
    else:
        assert 0 < cfg.distill.temperature <= 100 and 0 <= cfg.distill.alpha <= 1


def test_dotted_assignments_set_nested_keys_with_yaml_values():
    raw = assign({"prune": {"target_macs": 0.5}},
                 ["prune.latency_guided=true", "distill.sweep={temperature: [1, 2]}", "seed=3"])
    assert raw == {"prune": {"target_macs": 0.5, "latency_guided": True},
                   "distill": {"sweep": {"temperature": [1, 2]}}, "seed": 3}
    assert from_dict(raw).prune.latency_guided is True
