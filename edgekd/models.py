"""Model construction by name ('torchvision:NAME', 'module:package.module:callable', built-in students,
'teacher'), checkpoints, counts."""
from __future__ import annotations

import copy
import importlib
import os
import re
import sys
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from .errors import ModelError


def _conv_bn(cin: int, cout: int, stride: int = 1, kernel: int = 3) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, kernel, stride, kernel // 2, bias=False), nn.BatchNorm2d(cout),
                         nn.ReLU(inplace=True))


class SmallCNN(nn.Module):
    """A plain five-conv classifier (fast on every runtime). The strides set where resolution drops:
    edge_cnn, the embedded default's student, halves it at the first conv, as ResNet's stem does."""

    def __init__(self, num_classes: int = 10, widths: tuple[int, ...] = (16, 32, 32, 64, 64), in_channels: int = 3,
                 strides: tuple[int, ...] = (1, 2, 1, 2, 1), kernel: int = 3):
        super().__init__()
        layers, cin = [], in_channels
        for w, s in zip(widths, strides, strict=False):
            layers.append(_conv_bn(cin, w, s, kernel))
            cin = w
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.pool(self.features(x)), 1))


class _BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = _conv_bn(cin, cout, stride)
        self.conv2 = nn.Sequential(nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout))
        self.shortcut = nn.Identity() if cin == cout and stride == 1 else nn.Sequential(
            nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.conv2(self.conv1(x)) + self.shortcut(x))


class SmallResNet(nn.Module):
    """A ResNet for small images (28-64 px), a teacher that trains here in minutes: a 3x3 stem at full
    resolution (torchvision's ImageNet stem would take 28x28 down to 7x7 before the first block), then
    four stages of one basic block each, halving the resolution from the second stage on. The last stage
    is the widest (320): at a sixteenth of the pixels its parameters cost little time."""

    def __init__(self, num_classes: int = 10, widths: tuple[int, ...] = (32, 64, 128, 320), in_channels: int = 3):
        super().__init__()
        blocks, cin = [_conv_bn(in_channels, widths[0], 1)], widths[0]
        for i, w in enumerate(widths):
            blocks.append(_BasicBlock(cin, w, 1 if i == 0 else 2))
            cin = w
        self.features = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.pool(self.features(x)), 1))


# The five-conv families: (widths, strides).
CNN_FAMILIES: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = {
    "small_cnn": ((16, 32, 32, 64, 64), (1, 2, 1, 2, 1)),
    "edge_cnn": ((16, 32, 32, 64, 64), (2, 2, 1, 2, 1)),
    "tiny_cnn": ((8, 16, 16, 32, 32), (1, 2, 1, 2, 1)),
    "wide_cnn": ((32, 64, 64, 128, 128), (1, 2, 1, 2, 1)),
}
BUILTIN: dict[str, Callable[[int], nn.Module]] = {
    **{name: (lambda n, w=w, s=s: SmallCNN(n, widths=w, strides=s)) for name, (w, s) in CNN_FAMILIES.items()},
    "small_resnet": lambda n: SmallResNet(n),
}
# torchvision families that take a width multiplier.
TORCHVISION_WIDTH = ("mobilenet_v2", "mobilenet_v3_small", "mobilenet_v3_large", "mnasnet0_5", "mnasnet1_0")


def parse_scaling(spec: str) -> tuple[str, dict[str, float]]:
    """'FAMILY@w1.5,k5,d2' -> ('FAMILY', {'w': 1.5, 'k': 5, 'd': 2}); a spec without '@' -> (spec, {})."""
    if "@" not in spec or spec.startswith("module:") or is_model_file(spec.split("@", 1)[0]):
        return spec, {}
    base, opts = spec.split("@", 1)
    out: dict[str, float] = {}
    for part in filter(None, (p.strip() for p in opts.split(","))):
        key, value = part[:1], part[1:]
        try:
            out[key] = int(value) if key == "k" else float(value)
        except ValueError:
            key = ""
        if key not in ("w", "k", "d") or out[key] <= 0 or (key == "k" and out[key] % 2 == 0) or \
                (key == "d" and out[key] > 1 and out[key] != int(out[key])):
            raise ModelError(f"model {spec!r}: {part!r} is not a scaling (w<width multiplier>, k<odd kernel>, "
                             "d<depth multiplier>)")
    return base, out


def cnn_layout(family: str, w: float = 1.0, d: float = 1.0) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(widths, strides) of a built-in five-conv family scaled by width w and depth d: an integer d repeats
    each conv d times, the later copies at stride 1; below 1, the stride-1 convs are dropped from the last
    one back until round(5 d) remain, never the strided ones (so edge_cnn keeps at least three)."""
    widths, strides = CNN_FAMILIES[family]
    widths = tuple(max(4, int(round(c * w))) for c in widths)
    if d >= 1:
        reps = int(d)
        return (tuple(c for c in widths for _ in range(reps)),
                tuple(s if i == 0 else 1 for s in strides for i in range(reps)))
    keep = list(range(len(widths)))
    for i in reversed(range(len(widths))):
        if len(keep) <= max(1, round(len(widths) * d)):
            break
        if strides[i] == 1:
            keep.remove(i)
    return tuple(widths[i] for i in keep[:-1]) + (widths[-1],), tuple(strides[i] for i in keep)


def _scaled_model(spec: str, base: str, scale: dict[str, float], num_classes: int) -> nn.Module:
    """A built-in five-conv family scaled by width (w), kernel (k) and depth (d, see cnn_layout) or a
    torchvision mobile family scaled by width."""
    w, k, d = scale.get("w", 1.0), int(scale.get("k", 3)), scale.get("d", 1.0)
    key = base.removeprefix("edgekd:")
    if key in CNN_FAMILIES:
        widths, strides = cnn_layout(key, w, d)
        return SmallCNN(num_classes, widths=widths, strides=strides, kernel=k)
    name = base.removeprefix("torchvision:")
    if base.startswith("torchvision:") and name in TORCHVISION_WIDTH and k == 3 and d == 1.0:
        import torchvision

        if name.startswith("mnasnet"):  # MNASNet's alpha is the width: mnasnet0_5@w0.5 has alpha 0.25
            model = torchvision.models.MNASNet(float(name[7:].replace("_", ".")) * w, num_classes=num_classes)
        else:
            model = torchvision.models.get_model(name, weights=None, num_classes=num_classes, width_mult=w)
        if name.startswith(CLASS_SCALED_HEADS) and num_classes != 1000:
            head = [m for m in model.modules() if isinstance(m, nn.Linear)][-1]
            nn.init.normal_(head.weight, 0.0, 0.01)
            nn.init.zeros_(head.bias)
        return model
    raise ModelError(f"model {spec!r}: scaling applies to {', '.join(CNN_FAMILIES)} (w, k, d) and to torchvision's "
                     f"{', '.join(TORCHVISION_WIDTH)} (w only)")


def is_model_file(spec: str) -> bool:
    """Whether `spec` names a whole pickled module on disk (rather than an architecture to build)."""
    return not spec.startswith(("torchvision:", "module:", "edgekd:")) and spec not in BUILTIN and (
        Path(spec).suffix in (".pt", ".pth") or Path(spec).exists())


def build_from_factory(spec: str, num_classes: int) -> nn.Module:
    """'module:package.module:callable': import the module (the working directory is importable, as with
    `python -m`) and call the callable (a dotted attribute path is allowed) with num_classes=."""
    parts = spec.split(":")
    if len(parts) != 3 or not parts[1] or not parts[2]:
        raise ModelError(f"model {spec!r}: expected 'module:package.module:callable'")
    _, module_name, attr = parts
    added = os.getcwd() not in sys.path
    if added:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except Exception as e:  # noqa: BLE001 - any import failure of user code is reported in one line
        raise ModelError(f"model {spec!r}: cannot import {module_name} ({type(e).__name__}: {e})") from None
    finally:
        if added:
            sys.path.remove(os.getcwd())
    factory = module
    for name in attr.split("."):
        factory = getattr(factory, name, None)
        if factory is None:
            raise ModelError(f"model {spec!r}: {module_name} has no attribute {attr!r}")
    if not callable(factory):
        raise ModelError(f"model {spec!r}: {module_name}.{attr} is not callable")
    try:
        model = factory(num_classes=num_classes)
    except Exception as e:  # noqa: BLE001
        raise ModelError(f"model {spec!r}: {module_name}.{attr}(num_classes={num_classes}) failed "
                         f"({type(e).__name__}: {str(e)[:200]})") from None
    if not isinstance(model, nn.Module):
        raise ModelError(f"model {spec!r}: {module_name}.{attr} returned a {type(model).__name__}, not an nn.Module")
    return model


# torchvision scales these classifiers' initial weights by the number of classes (MNASNet: Kaiming
# with fan_out; EfficientNet: uniform within 1/sqrt(classes)): right for ImageNet's 1000, ten times too
# large for 10, where the first logits have a std of 4 to 9 and training stalls. Built for another
# number of classes, their heads start as MobileNet's and RegNet's do: N(0, 0.01), bias 0.
CLASS_SCALED_HEADS = ("mnasnet", "efficientnet")


def build_model(spec: str, num_classes: int, *, trust_checkpoint: bool = False) -> nn.Module:
    """Build a model: 'torchvision:NAME' (random init), 'module:package.module:callable' (called with
    num_classes=), a built-in name, or a trusted module file."""
    if spec.startswith("module:"):
        return build_from_factory(spec, num_classes)
    base, scale = parse_scaling(spec)
    if scale:
        return _scaled_model(spec, base, scale, num_classes)
    if spec.startswith("torchvision:"):
        import torchvision

        name = spec.split(":", 1)[1]
        if name not in torchvision.models.list_models(module=torchvision.models):
            raise ModelError(f"model {spec!r}: torchvision has no classifier named {name!r}")
        kwargs: dict = {"weights": None, "num_classes": num_classes}
        if name.startswith(("googlenet", "inception")):
            kwargs["aux_logits"] = False
            kwargs["init_weights"] = True
        model = torchvision.models.get_model(name, **kwargs)
        if name.startswith(CLASS_SCALED_HEADS) and num_classes != 1000:
            head = [m for m in model.modules() if isinstance(m, nn.Linear)][-1]
            nn.init.normal_(head.weight, 0.0, 0.01)
            nn.init.zeros_(head.bias)
        return model
    key = spec.removeprefix("edgekd:")
    if key in BUILTIN:
        return BUILTIN[key](num_classes)
    if is_model_file(spec):
        return load_module_file(Path(spec), trust_checkpoint)
    raise ModelError(f"model {spec!r}: expected 'torchvision:NAME', 'module:package.module:callable', one of "
                     f"{', '.join(BUILTIN)}, or a model file")


def load_module_file(path: Path, trust: bool) -> nn.Module:
    """Load a whole pickled nn.Module; refused unless the user trusts the file (pickle runs code)."""
    if not path.is_file():
        raise ModelError(f"model file {path} does not exist")
    if not trust:
        raise ModelError(f"model file {path}: a whole pickled module can run arbitrary code when loaded; "
                         "pass --trust-checkpoint (or teacher.trust_checkpoint: true) if you trust it, or use "
                         "'torchvision:NAME' with a state_dict checkpoint")
    warnings.warn(f"loading {path} with full pickle (trusted by the user)", stacklevel=2)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=False)  # trusted explicitly by the user
    except Exception as e:  # noqa: BLE001
        raise ModelError(f"model file {path}: cannot be loaded ({type(e).__name__}: {e})") from None
    if not isinstance(obj, nn.Module):
        raise ModelError(f"model file {path}: holds a {type(obj).__name__}, not a torch nn.Module")
    return obj


def load_state_dict_file(path: str | Path) -> dict[str, torch.Tensor]:
    """Load a checkpoint safely (weights_only=True); accepts a state_dict or {'state_dict'|'model': ...}."""
    p = Path(path)
    if not p.is_file():
        raise ModelError(f"checkpoint {p} does not exist")
    try:
        obj = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch raises UnpicklingError, RuntimeError, EOFError...
        text = re.sub(r"\x1b\[[0-9;]*m", "", str(e)).strip()  # torch colours parts of its message
        found = re.search(r"Unsupported global: GLOBAL (\S+)", text)
        if found:
            raise ModelError(f"checkpoint {p} holds a pickled {found.group(1)} object, not only tensors (a whole "
                             "model saved with torch.save(model)?); edgekd reads checkpoints weights-only: save "
                             "model.state_dict() instead, or give the file as teacher.model with --trust-checkpoint "
                             "if you trust it") from None
        detail = re.search(r"WeightsUnpickler error:\s*(\S[^\n]*)", text)
        first = detail.group(1) if detail else (text.splitlines()[0] if text else type(e).__name__)
        raise ModelError(f"checkpoint {p}: not a loadable weights-only checkpoint ({first[:160]})") from None
    for key in ("state_dict", "model_state_dict", "model"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ModelError(f"checkpoint {p}: does not hold a state_dict of tensors")
    return {k.removeprefix("module."): v for k, v in obj.items()}


def _unwrapped(sd: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """`sd` with a wrapper's prefix taken off its keys where that fits `model` better: a training framework's
    module holding the network as an attribute (PyTorch Lightning's `self.model`) saves `model.conv1.weight`."""
    own = set(model.state_dict())
    fit = sum(k in own for k in sd)
    best = None
    for prefix in sorted({k.split(".", 1)[0] + "." for k in sd if "." in k}):
        n = sum(k[len(prefix):] in own for k in sd if k.startswith(prefix))
        if n > fit:
            best, fit = prefix, n
    return sd if best is None else {k[len(best):]: v for k, v in sd.items() if k.startswith(best)}


def apply_checkpoint(model: nn.Module, path: str | Path) -> nn.Module:
    """Load a state_dict checkpoint into `model`, naming mismatched keys on failure."""
    sd = _unwrapped(load_state_dict_file(path), model)
    try:
        model.load_state_dict(sd, strict=True)
    except RuntimeError as e:
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
        detail = lines[1] if len(lines) > 1 else lines[0]
        raise ModelError(f"checkpoint {path} does not fit the model: {detail[:200]}") from None
    return model


def classifier_layer(model: nn.Module) -> str | None:
    """The name of the model's last nn.Linear (its classifier head), or None."""
    last = None
    for name, m in model.named_modules():
        if isinstance(m, nn.Linear):
            last = name
    return last


def apply_backbone(model: nn.Module, path: str | Path) -> list[str]:
    """Load a checkpoint whose classifier does not fit the task's classes: every weight but the head's.
    Returns the head keys left at their fresh initialisation; a mismatch elsewhere is a ModelError."""
    sd = _unwrapped(load_state_dict_file(path), model)
    head = classifier_layer(model)
    own = model.state_dict()
    head_keys = [k for k in own if head is not None and k.startswith(head + ".")]
    mismatched = [k for k in own if k in sd and sd[k].shape != own[k].shape]
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    outside = [k for k in mismatched + missing + unexpected if k not in head_keys]
    if outside:
        raise ModelError(f"checkpoint {path} does not fit the model beyond its classifier {head!r}: "
                         f"{', '.join(outside[:3])}{' ...' if len(outside) > 3 else ''}")
    model.load_state_dict({k: v for k, v in sd.items() if k in own and k not in head_keys}, strict=False)
    return head_keys


def student_from(spec: str, teacher: nn.Module, num_classes: int) -> nn.Module:
    """The student: a copy of the teacher ('teacher') or a freshly built model."""
    if spec == "teacher":
        student = copy.deepcopy(teacher)
        for p in student.parameters():
            p.requires_grad_(True)
        return student
    return build_model(spec, num_classes)


def adapt_input_channels(model: nn.Module, channels: int) -> list[str]:
    """Make `model` take `channels` input channels by replacing its first convolution: from 3 channels to
    1 its kernels are summed over the channels (a greyscale image repeated 3 times gives the same
    output), from 1 to more they are split evenly. Returns the replaced layer's name ([] when the model
    already takes `channels`)."""
    first = next(((n, m) for n, m in model.named_modules() if isinstance(m, nn.Conv2d)), None)
    if first is None:
        raise ModelError("the student has no Conv2d layer whose input channels could be changed")
    name, conv = first
    if conv.in_channels == channels:
        return []
    if conv.groups != 1:
        raise ModelError(f"the student's first convolution {name} is grouped; its input channels cannot be changed")
    new = nn.Conv2d(channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,  # type: ignore[arg-type]
                    conv.dilation, 1, conv.bias is not None, conv.padding_mode)
    with torch.no_grad():
        w = conv.weight.sum(1, keepdim=True)
        new.weight.copy_(w if channels == 1 else w.repeat(1, channels, 1, 1) / channels)
        if conv.bias is not None:
            new.bias.copy_(conv.bias)  # type: ignore[union-attr]
    parent = model.get_submodule(name.rsplit(".", 1)[0]) if "." in name else model
    setattr(parent, name.rsplit(".", 1)[-1], new)
    return [name]


def count_params(model: nn.Module) -> int:
    """Number of parameters."""
    return int(sum(p.numel() for p in model.parameters()))


def count_macs(model: nn.Module, input_shape: tuple[int, ...]) -> int:
    """Multiply-accumulates of one forward pass at batch 1 (torch-pruning's counter)."""
    import torch_pruning as tp

    was_training = model.training
    model.eval()
    with torch.no_grad():
        macs, _ = tp.utils.count_ops_and_params(model, torch.zeros(1, *input_shape))
    model.train(was_training)
    return int(macs)
