"""Feature distillation: hooks on layers named by module path, 1x1-conv+BN adapters, hooks removed after."""
import pytest
import torch
from torch import nn

from edgekd.data import ArrayDataset
from edgekd.distill.cache import TeacherLogitCache
from edgekd.distill.features import FeatureTap, HintAdapter, StudentWithAdapters
from edgekd.distill.trainer import train
from edgekd.errors import ConfigError
from edgekd.models import SmallCNN


def _hooks(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) for m in model.modules())


def _teacher() -> nn.Module:
    torch.manual_seed(1)
    t = SmallCNN(4, widths=(8, 16, 16, 24, 24))
    return t.eval()


def _data(n=32):
    g = torch.Generator().manual_seed(0)
    return ArrayDataset(torch.randn(n, 3, 12, 12, generator=g).numpy(), (torch.arange(n) % 4).numpy())


def test_tap_captures_named_layers_and_removes_its_hooks():
    model = SmallCNN(4)
    with FeatureTap(model, ["features.1", "features.3"]) as tap:
        assert _hooks(model) == 2
        model(torch.randn(2, 3, 12, 12))
        a, b = tap.take()
        assert a.shape == (2, 32, 6, 6) and b.shape == (2, 64, 3, 3)
    assert _hooks(model) == 0 and tap.active == 0


def test_unknown_layer_path_is_a_config_error_naming_the_key():
    with pytest.raises(ConfigError, match=r"distill.feature_layers.student: SmallCNN has no module 'layer3'"):
        FeatureTap(SmallCNN(4), ["layer3"], "distill.feature_layers.student")


def test_adapters_map_student_channels_to_the_teachers():
    student, teacher = SmallCNN(4), _teacher()
    wrapped = StudentWithAdapters(student, teacher, ["features.1"], ["features.3"], torch.randn(2, 3, 12, 12))
    assert isinstance(wrapped.adapters[0], HintAdapter)
    conv = wrapped.adapters[0].proj
    assert isinstance(conv, nn.Conv2d) and conv.kernel_size == (1, 1) and conv.out_channels == 24
    assert isinstance(wrapped.adapters[0].bn, nn.BatchNorm2d)
    logits, raw, adapted = wrapped(torch.randn(2, 3, 12, 12))
    assert logits.shape == (2, 4) and raw[0].shape == (2, 32, 6, 6) and adapted[0].shape == (2, 24, 6, 6)
    wrapped.remove_hooks()
    assert _hooks(student) == 0


def test_vector_features_get_a_linear_adapter():
    teacher = _teacher()
    with pytest.raises(ConfigError, match="both must be NCHW maps"):
        StudentWithAdapters(SmallCNN(4), teacher, ["pool"], ["classifier"], torch.randn(2, 3, 12, 12))
    flat = StudentWithAdapters(SmallCNN(4), teacher, ["classifier"], ["classifier"], torch.randn(2, 3, 12, 12))
    assert isinstance(flat.adapters[0].proj, nn.Linear) and isinstance(flat.adapters[0].bn, nn.BatchNorm1d)
    flat.remove_hooks()


@pytest.mark.filterwarnings("ignore:distill. the teacher.s soft targets")
@pytest.mark.parametrize("losses", [{"kd": 1.0, "feature": 1.0}, {"attention": 1.0, "rkd_distance": 1.0},
                                    {"kd": 1.0, "rkd_angle": 0.5, "gram": 0.5}])
def test_training_with_feature_terms_leaves_no_hooks_and_no_adapter_weights(tmp_path, losses):
    teacher, ds = _teacher(), _data()
    student = SmallCNN(4, widths=(4, 8, 8, 8, 8))
    keys = set(student.state_dict())
    before = {k: v.clone() for k, v in student.state_dict().items()}
    res = train(student, ds, ds, epochs=2, lr=1e-2, seed=0, batch_size=16, teacher=teacher, alpha=0.8,
                temperature=2.0, losses=losses, feature_layers=[("features.3", "features.3")],
                cache=TeacherLogitCache(teacher, [ds.x], directory=tmp_path))
    assert _hooks(student) == 0 and _hooks(teacher) == 0
    assert set(student.state_dict()) == keys  # the adapters are not part of the student
    assert any(not torch.equal(before[k], v) for k, v in student.state_dict().items())
    assert not teacher.training and res.steps == 4
    assert all(c["loss"] == c["loss"] for c in res.curve)  # finite, not NaN


def test_hooks_are_removed_when_training_fails(tmp_path):
    teacher, ds = _teacher(), _data()
    student = SmallCNN(4)
    with pytest.raises(ConfigError):
        train(student, ds, ds, epochs=1, lr=1e-2, seed=0, batch_size=16, teacher=teacher, alpha=0.5,
              losses={"feature": 1.0}, feature_layers=[("features.3", "nope")],
              cache=TeacherLogitCache(teacher, [ds.x], directory=tmp_path))
    assert _hooks(student) == 0 and _hooks(teacher) == 0
