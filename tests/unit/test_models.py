"""Models by name: 'module:package.module:callable' factories, and checkpoints whose head does not fit."""
from __future__ import annotations

import pytest
import torch

from edgekd.config import from_dict
from edgekd.config.profiles import load_profile
from edgekd.context import RunContext
from edgekd.data import build_splits
from edgekd.distill.teacher import get_teacher
from edgekd.errors import ModelError
from edgekd.models import BUILTIN, apply_backbone, build_model, classifier_layer, is_model_file

FACTORIES = "module:tests.unit.factories"


def test_a_factory_is_called_with_num_classes():
    model = build_model(f"{FACTORIES}:small_net", 7)
    assert model(torch.zeros(2, 3, 8, 8)).shape == (2, 7)
    assert build_model(f"{FACTORIES}:Registry.build", 4)(torch.zeros(1, 3, 8, 8)).shape == (1, 4)
    assert not is_model_file(f"{FACTORIES}:small_net")


@pytest.mark.parametrize("spec, says", [
    ("module:tests.unit.no_such_module:f", "cannot import tests.unit.no_such_module"),
    (f"{FACTORIES}:missing", "has no attribute 'missing'"),
    (f"{FACTORIES}:NOT_CALLABLE", "is not callable"),
    (f"{FACTORIES}:not_a_module", "returned a int, not an nn.Module"),
    (f"{FACTORIES}:broken", "failed (ValueError: no such width)"),
    ("module:only-one-part", "expected 'module:package.module:callable'"),
])
def test_a_bad_factory_is_one_clear_line(spec, says):
    with pytest.raises(ModelError) as e:
        build_model(spec, 3)
    assert says in str(e.value) and spec in str(e.value) and "\n" not in str(e.value)


def test_a_checkpoint_for_other_classes_loads_without_its_head(tmp_path):
    source = BUILTIN["tiny_cnn"](1000)
    path = tmp_path / "imagenet.pt"
    torch.save(source.state_dict(), path)
    model = BUILTIN["tiny_cnn"](10)
    head = classifier_layer(model)
    assert apply_backbone(model, path) == [f"{head}.weight", f"{head}.bias"]
    body = {k: v for k, v in source.state_dict().items() if not k.startswith(head + ".")}
    assert all(torch.equal(model.state_dict()[k], v) for k, v in body.items())
    with pytest.raises(ModelError, match="beyond its classifier"):
        apply_backbone(BUILTIN["wide_cnn"](10), path)


def _ctx(tmp_path, **teacher) -> RunContext:
    cfg = from_dict({"teacher": {"model": "tiny_cnn", **teacher}})
    ctx = RunContext(cfg, load_profile("cpu"), tmp_path)
    ctx.splits = build_splits(cfg.data, cfg.seed)
    return ctx


def test_the_teacher_is_fine_tuned_with_a_new_head(tmp_path):
    path = tmp_path / "other-task.pt"
    torch.save(BUILTIN["tiny_cnn"](1000).state_dict(), path)
    with pytest.raises(ModelError, match="does not fit the model"):
        get_teacher(_ctx(tmp_path, checkpoint=str(path), train_epochs=0))
    ctx = _ctx(tmp_path, checkpoint=str(path), train_epochs=2)
    teacher, info = get_teacher(ctx)
    assert "without its classifier" in info["source"] and "fine-tuned with a new head" in info["source"]
    x, y = ctx.splits.test.x[:200], ctx.splits.test.y[:200]
    with torch.no_grad():
        accuracy = (teacher(x).argmax(1) == y).float().mean().item()
    assert accuracy > 0.5  # ten classes: chance is 0.1


def test_a_lightning_style_checkpoint_loads_and_a_pickled_model_is_named_for_what_it_is(tmp_path):
    from edgekd.models import apply_checkpoint

    source = build_model(f"{FACTORIES}:small_net", 5)
    wrapped = {f"model.{k}": v for k, v in source.state_dict().items()}
    wrapped["loss_fn.weight"] = torch.ones(5)  # the training module's own state beside the network's
    torch.save({"state_dict": wrapped, "epoch": 3}, tmp_path / "last.ckpt")
    model = apply_checkpoint(build_model(f"{FACTORIES}:small_net", 5), tmp_path / "last.ckpt")
    assert all(torch.equal(v, source.state_dict()[k]) for k, v in model.state_dict().items())
    torch.save(source, tmp_path / "whole.pt")
    with pytest.raises(ModelError) as e:
        apply_checkpoint(build_model(f"{FACTORIES}:small_net", 5), tmp_path / "whole.pt")
    assert "holds a pickled torch.nn.modules.container.Sequential object, not only tensors" in str(e.value)
    assert "\x1b" not in str(e.value)
    assert "--trust-checkpoint" in str(e.value)
