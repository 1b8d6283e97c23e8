"""torchvision students built with a small BatchNorm momentum (MobileNetV3: 0.01, MNASNet: 0.0003) are
usable in eval mode after a short distill run on the embedded default: their running statistics are
re-estimated after training, so the exported model (eval mode, ONNX Runtime) scores what the weights
learned instead of one class. Every family through the whole default pipeline: tools/student_families.py."""
from __future__ import annotations

import pytest
import torch

from edgekd import Pipeline
from edgekd.config import from_dict
from edgekd.data import build_splits
from edgekd.models import build_model


@pytest.mark.parametrize("family", ["mnasnet0_5", "efficientnet_b0"])
def test_class_scaled_heads_start_small_for_ten_classes(family):
    # torchvision scales these heads' initialisation for 1000 classes: left so, the first 10-class logits
    # (train mode, as the first step sees them) have a std of 4 to 9 and training stalls
    x = torch.randn(16, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    model = build_model(f"torchvision:{family}", 10).train()
    with torch.no_grad():
        std = float(model(x).std())
    assert 0 < std < 1.0, (family, std)


@pytest.mark.slow
@pytest.mark.parametrize(("family", "floor"), [("mobilenet_v3_small", 80.0), ("mnasnet0_5", 60.0)])
def test_low_momentum_student_is_usable_in_eval_mode(tmp_path, family, floor):
    # The embedded default's data and teacher (trained for 2 epochs, as tests/conftest.TINY_CONFIG, so a
    # session trains it once); 4 epochs of KD on 2 augmentation draws the teacher labels.
    cfg = from_dict({"name": "family", "stages": ["distill"], "teacher": {"train_epochs": 2},
                     "student": {"model": f"torchvision:{family}"},
                     "distill": {"epochs": 4, "temperature": 4, "alpha": 0.7, "draws": 2},
                     "bench": {"iterations": 20, "warmup": 2}})
    out = tmp_path / "run"
    rep = Pipeline(cfg, out=out).run()
    distill = next(s for s in rep["stages"] if s["name"] == "distill")
    assert rep["teacher"]["accuracy"] >= 80, rep["teacher"]["accuracy"]
    # ONNX Runtime on the held-out test split: the exported model, in eval mode, is usable ...
    assert distill["accuracy"] >= floor, (family, distill["accuracy"], distill["curve"])
    assert rep["final"]["accuracy"] >= floor, rep["final"]["accuracy"]
    # ... and scores what its weights learned: as well as the same weights with batch statistics (train mode)
    test = build_splits(cfg.data, cfg.seed).test
    model = build_model(f"torchvision:{family}", 10)
    model.load_state_dict(torch.load(out / "stages" / "distill" / "model.pt", weights_only=True))
    model.train()
    with torch.no_grad():
        train_mode = float((model(test.x).argmax(1) == test.y).float().mean() * 100)
    assert distill["accuracy"] >= train_mode - 5, (family, distill["accuracy"], train_mode)
    # the epoch kept was chosen on statistics re-estimated for its own weights
    assert distill["val_accuracy_torch"] >= floor, distill["curve"]
