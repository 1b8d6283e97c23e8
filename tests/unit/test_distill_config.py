"""distill.* config keys: loss weights, feature layers, sweep values, cache and device settings."""
import pytest

from edgekd.config import DISTILL_LOSSES, from_dict
from edgekd.errors import ConfigError


def test_defaults_are_plain_hinton_kd():
    d = from_dict({}).distill
    assert d.loss_weights() == {"kd": 1.0}
    assert d.layer_pairs() == []
    assert (d.cache_topk, d.device, d.precision, d.sweep_epochs) == (None, "auto", "auto", None)


@pytest.mark.parametrize("given, sweep", [
    ({}, {"temperature": [1.0, 2.0, 4.0], "alpha": [0.5, 0.9]}),
    ({"alpha": 0.7}, {"temperature": [1.0, 2.0, 4.0]}),
    ({"temperature": 3}, {"alpha": [0.5, 0.9]}),
    ({"temperature": 3, "alpha": 0.7}, None),
    ({"alpha": 0}, None),  # no KD: nothing to choose
    ({"sweep": None}, None),
    ({"strategy": "self"}, None),
    ({"sweep": {"temperature": [6]}}, {"temperature": [6.0]}),
])
def test_kd_chooses_on_validation_what_the_config_leaves_open(given, sweep):
    d = from_dict({"distill": given}).distill
    assert d.sweep == sweep
    # the choice is written into the config, so a saved config reloads to the same search
    assert from_dict({"distill": d.model_dump(mode="json")}).distill.sweep == sweep


def test_sweep_budget_is_a_sixth_of_the_run_unless_given():
    assert from_dict({}).distill.sweep_budget() == 5
    assert from_dict({"distill": {"epochs": 8}}).distill.sweep_budget() == 2
    assert from_dict({"distill": {"epochs": 1}}).distill.sweep_budget() == 1
    assert from_dict({"distill": {"sweep_epochs": 3}}).distill.sweep_budget() == 3


def test_losses_and_feature_layers_parse():
    d = from_dict({"distill": {"losses": {"kd": 1.0, "feature": 0.5, "rkd_angle": 0.1},
                               "feature_layers": {"student": "features.3", "teacher": "layer3"}}}).distill
    assert d.loss_weights() == {"kd": 1.0, "feature": 0.5, "rkd_angle": 0.1}
    assert d.layer_pairs() == [("features.3", "layer3")]
    two = from_dict({"distill": {"losses": {"attention": 1.0}, "feature_layers": [
        {"student": "features.1", "teacher": "layer1"}, {"student": "features.3", "teacher": "layer3"}]}}).distill
    assert two.layer_pairs() == [("features.1", "layer1"), ("features.3", "layer3")]


def test_loss_names_match_the_loss_module():
    from edgekd.distill.losses import LOSS_NAMES

    assert tuple(LOSS_NAMES) == tuple(DISTILL_LOSSES)


@pytest.mark.parametrize("distill, message", [
    ({"losses": {"crd": 1.0}}, "distill: distill.losses: unknown loss 'crd'"),
    ({"losses": {"kd": -1.0}}, "distill.losses.kd: a weight must be >= 0"),
    ({"losses": {"kd": 0.0}}, "every weight is 0"),
    ({"losses": {"feature": 1.0}}, "distill.losses.feature needs distill.feature_layers"),
    ({"feature_layers": {"student": "features.3"}}, "distill.feature_layers"),
    ({"sweep": {"temperature": []}}, "distill.sweep.temperature is empty"),
    ({"sweep": {"temperature": [2, 0]}}, "distill.sweep.temperature: 0.0 is out of range"),
    ({"sweep": {"alpha": [0.5, 1.5]}}, "distill.sweep.alpha: 1.5 is out of range"),
    ({"sweep": {"beta": [1]}}, "distill.sweep accepts temperature and alpha, not beta"),
    ({"cache_topk": 0}, "distill.cache_topk"),
    ({"precision": "int4"}, "distill.precision"),
    ({"sweep_epochs": 0}, "distill.sweep_epochs"),
])
def test_bad_distill_settings_name_the_key(distill, message):
    with pytest.raises(ConfigError) as e:
        from_dict({"distill": distill})
    assert message in str(e.value)
