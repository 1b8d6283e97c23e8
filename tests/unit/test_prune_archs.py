"""Every torchvision classifier family goes through prune -> save/load (weights_only) -> ONNX -> ONNX Runtime.

Cheap members at 64x64 (ViT at its own 32x32 image size); the heavy families (ResNeXt, DenseNet,
ConvNeXt, EfficientNetV2, ViT) are built from torchvision's own classes with fewer blocks, so the
same module types and graph patterns are pruned in seconds.
"""
from __future__ import annotations

import io
from functools import partial

import numpy as np
import pytest
import torch
import torchvision
from torch import nn
from torchvision.models import convnext, densenet, efficientnet, resnet, vision_transformer

from edgekd.config import PruneConfig
from edgekd.errors import StageError
from edgekd.export import export_onnx
from edgekd.models import build_model, count_macs, count_params
from edgekd.prune.loop import prune
from edgekd.prune.pruner import classifier_head, load_pruned, save_pruned

NUM_CLASSES = 10


def _tv(name: str) -> nn.Module:
    return build_model(f"torchvision:{name}", NUM_CLASSES)


def _resnext() -> nn.Module:
    return resnet.ResNet(resnet.Bottleneck, [1, 1, 1, 1], num_classes=NUM_CLASSES, groups=32, width_per_group=4)


def _densenet() -> nn.Module:
    return densenet.DenseNet(growth_rate=16, block_config=(2, 2, 2, 2), num_init_features=32, num_classes=NUM_CLASSES)


def _convnext() -> nn.Module:
    cfg = convnext.CNBlockConfig
    return convnext.ConvNeXt([cfg(32, 64, 1), cfg(64, 128, 1), cfg(128, 256, 1), cfg(256, None, 1)],
                             num_classes=NUM_CLASSES)


def _efficientnet_v2() -> nn.Module:
    fused, mb = efficientnet.FusedMBConvConfig, efficientnet.MBConvConfig
    setting = [fused(1, 3, 1, 24, 24, 1), fused(4, 3, 2, 24, 48, 1), mb(4, 3, 2, 48, 64, 1),
               mb(6, 3, 2, 64, 128, 1)]
    return efficientnet.EfficientNet(setting, dropout=0.2, last_channel=512, num_classes=NUM_CLASSES,
                                     norm_layer=partial(nn.BatchNorm2d, eps=1e-3))


def _vit() -> nn.Module:
    return vision_transformer.VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=64,
                                                mlp_dim=128, num_classes=NUM_CLASSES)


ARCHS = {
    "resnet18": (partial(_tv, "resnet18"), 64),
    "resnext": (_resnext, 64),
    "mobilenet_v2": (partial(_tv, "mobilenet_v2"), 64),
    "mobilenet_v3_small": (partial(_tv, "mobilenet_v3_small"), 64),
    "efficientnet_b0": (partial(_tv, "efficientnet_b0"), 64),
    "efficientnet_v2": (_efficientnet_v2, 64),
    "regnet_x_400mf": (partial(_tv, "regnet_x_400mf"), 64),
    "shufflenet_v2_x0_5": (partial(_tv, "shufflenet_v2_x0_5"), 64),
    "squeezenet1_1": (partial(_tv, "squeezenet1_1"), 64),
    "mnasnet0_5": (partial(_tv, "mnasnet0_5"), 64),
    "densenet": (_densenet, 64),
    "convnext": (_convnext, 64),
    "vit": (_vit, 32),
}


@pytest.fixture(autouse=True)
def _one_thread():
    # several test processes share few cores: one intra-op thread each avoids oversubscription
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)

FAMILY = {"vit": "vit", "convnext": "convnext", "shufflenet_v2_x0_5": "shufflenet"}


def _ort_logits(path, x: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: x})[0]


@pytest.mark.parametrize("arch", list(ARCHS))
def test_family_prunes_reloads_and_runs_in_onnxruntime(arch, tmp_path):
    build, size = ARCHS[arch]
    shape = (3, size, size)
    torch.manual_seed(0)
    model = build().eval()
    head = classifier_head(model, torch.zeros(1, *shape))
    head_weight = head.weight.detach().clone()
    model, out = prune(model, shape, PruneConfig(ratio=0.3), NUM_CLASSES, round_to=8)
    assert out.family == FAMILY.get(arch, "generic")
    assert out.after["params"] <= 0.8 * out.before["params"], out
    assert out.after["macs"] <= 0.8 * out.before["macs"], out
    assert out.after["params"] == count_params(model) and out.after["macs"] == count_macs(model, shape)
    x = torch.randn(2, *shape)
    model.eval()
    with torch.no_grad():
        y = model(x)
    assert y.shape == (2, NUM_CLASSES)
    # the classifier head keeps every class output
    assert head.weight.shape[0] == head_weight.shape[0]

    buf = io.BytesIO()
    torch.save(save_pruned(model), buf)
    buf.seek(0)
    again = load_pruned(build(), torch.load(buf, weights_only=True)).eval()
    with torch.no_grad():
        assert torch.equal(again(x), y)

    path = export_onnx(again, shape, tmp_path / f"{arch}.onnx", 17)
    got = _ort_logits(path, x.numpy())
    assert got.shape == (2, NUM_CLASSES)
    np.testing.assert_allclose(got, y.numpy(), rtol=1e-3, atol=1e-3 * max(1.0, float(y.abs().max())))


def test_channels_follow_round_to():
    torch.manual_seed(0)
    model = _tv("mobilenet_v2")
    before = {n: m.out_channels for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}
    model, _ = prune(model, (3, 64, 64), PruneConfig(ratio=0.4), NUM_CLASSES, round_to=16)
    after = {n: m.out_channels for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}
    pruned = [n for n in after if after[n] != before[n]]
    assert len(pruned) > len(after) // 2
    assert all(after[n] % 16 == 0 for n in pruned), {n: after[n] for n in pruned}
    assert model.classifier[-1].out_features == NUM_CLASSES


def test_vit_width_stays_divisible_by_heads():
    torch.manual_seed(0)
    model = vision_transformer.VisionTransformer(image_size=32, patch_size=8, num_layers=1, num_heads=3,
                                                 hidden_dim=96, mlp_dim=96, num_classes=NUM_CLASSES)
    model, _ = prune(model, (3, 32, 32), PruneConfig(ratio=0.3), NUM_CLASSES, round_to=8)
    attn = model.encoder.layers[0].self_attention
    assert model.hidden_dim == attn.embed_dim < 96
    assert attn.embed_dim % 24 == 0 and attn.head_dim * 3 == attn.embed_dim
    assert model(torch.randn(1, 3, 32, 32)).shape == (1, NUM_CLASSES)


@pytest.mark.parametrize("criterion", ["l1", "l2", "bn_scale", "taylor", "random"])
def test_every_criterion_and_global_ranking(criterion):
    torch.manual_seed(0)
    model = _tv("resnet18")
    batch = (torch.randn(8, 3, 32, 32), torch.randint(0, NUM_CLASSES, (8,)))
    cfg = PruneConfig(ratio=0.3, criterion=criterion, global_pruning=criterion in ("l2", "taylor"))
    model, out = prune(model, (3, 32, 32), cfg, NUM_CLASSES, round_to=8, grad_batch=batch)
    assert out.after["macs"] <= 0.9 * out.before["macs"]
    assert model(torch.zeros(1, 3, 32, 32)).shape == (1, NUM_CLASSES)


def test_target_params_reaches_the_target():
    torch.manual_seed(0)
    model = _tv("mobilenet_v3_small")
    model, out = prune(model, (3, 64, 64), PruneConfig(target_params=0.7), NUM_CLASSES, round_to=8)
    assert out.reached and out.after["params"] <= 0.7 * out.before["params"]
    assert [s.step for s in out.steps] == list(range(1, len(out.steps) + 1))


def test_ignored_layers_are_kept_whole():
    torch.manual_seed(0)
    model = _tv("resnet18")
    cfg = PruneConfig(ratio=0.5, ignored_layers=["layer4"])
    model, _ = prune(model, (3, 32, 32), cfg, NUM_CLASSES, round_to=8)
    assert model.layer4[1].conv1.out_channels == 512 and model.layer4[0].conv1.out_channels == 512
    assert model.layer1[0].conv1.out_channels < 64


def test_unknown_ignored_layer_names_the_module():
    with pytest.raises(StageError, match="no module named 'layer9'"):
        prune(_tv("resnet18"), (3, 32, 32), PruneConfig(ratio=0.3, ignored_layers=["layer9"]), NUM_CLASSES, 8)


def test_head_is_found_by_execution_order_not_by_class_count():
    # 64 classes: every 64-channel conv of ResNet's first stage would look like a head by width alone.
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=64)
    model, _ = prune(model, (3, 32, 32), PruneConfig(ratio=0.5), 64, round_to=8)
    assert model.fc.out_features == 64 and model.layer1[0].conv1.out_channels < 64
