"""Feature (hint) distillation plumbing: forward hooks on layers named by module path, and
1x1-conv + BatchNorm adapters from the student's channels to the teacher's.

The hooks live only while training (`FeatureTap.remove`, or the `with` block); the adapters are
trained with the student and dropped afterwards, so the exported student is unchanged."""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ..errors import ConfigError


def find_module(model: nn.Module, path: str, key: str) -> nn.Module:
    """The submodule at dotted `path` (e.g. 'features.3', 'layer3.1.conv2'); a ConfigError names `key`."""
    try:
        return model.get_submodule(path)
    except AttributeError:
        names = [n for n, _ in model.named_modules() if n and n.count(".") <= 1]
        hint = ", ".join(names[:12]) + (" ..." if len(names) > 12 else "")
        raise ConfigError(f"{key}: {type(model).__name__} has no module {path!r} (modules: {hint})") from None


class FeatureTap:
    """Keeps the outputs of the named submodules of `model` during forward passes."""

    def __init__(self, model: nn.Module, paths: Sequence[str], key: str = "distill.feature_layers"):
        self.paths = list(paths)
        self._out: dict[str, torch.Tensor] = {}
        self._handles = []
        for p in self.paths:
            module = find_module(model, p, key)
            self._handles.append(module.register_forward_hook(self._keep(p)))

    def _keep(self, path: str):
        def hook(_module: nn.Module, _inputs: tuple, output) -> None:
            self._out[path] = output[0] if isinstance(output, (tuple, list)) else output
        return hook

    def take(self) -> list[torch.Tensor]:
        """The captured outputs in path order (then forgotten)."""
        missing = [p for p in self.paths if p not in self._out]
        if missing:
            raise RuntimeError(f"feature layer(s) {', '.join(missing)} did not run in the forward pass")
        out = [self._out[p] for p in self.paths]
        self._out.clear()
        return out

    def remove(self) -> None:
        """Detach every hook (idempotent)."""
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._out.clear()

    @property
    def active(self) -> int:
        """How many hooks are still attached."""
        return len(self._handles)

    def __enter__(self) -> FeatureTap:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()


class HintAdapter(nn.Module):
    """Maps student features to the teacher's channel count: 1x1 conv + BN (maps) or linear + BN (vectors)."""

    def __init__(self, student_channels: int, teacher_channels: int, spatial: bool = True):
        super().__init__()
        if spatial:
            self.proj: nn.Module = nn.Conv2d(student_channels, teacher_channels, 1, bias=False)
            self.bn: nn.Module = nn.BatchNorm2d(teacher_channels)
        else:
            self.proj = nn.Linear(student_channels, teacher_channels, bias=False)
            self.bn = nn.BatchNorm1d(teacher_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.proj(x))


@torch.no_grad()
def probe_shapes(model: nn.Module, paths: Sequence[str], example: torch.Tensor, key: str) -> list[torch.Size]:
    """Output shapes of the named layers for `example` (one eval-mode forward pass)."""
    was = model.training
    model.eval()
    with FeatureTap(model, paths, key) as tap:
        model(example)
        shapes = [f.shape for f in tap.take()]
    model.train(was)
    return shapes


class StudentWithAdapters(nn.Module):
    """The student plus its hint adapters, trained together; forward returns
    (logits, raw student features, adapted features) for the layers in `student_paths`."""

    def __init__(self, student: nn.Module, teacher: nn.Module, student_paths: Sequence[str],
                 teacher_paths: Sequence[str], example: torch.Tensor):
        super().__init__()
        self.student = student
        s_shapes = probe_shapes(student, student_paths, example, "distill.feature_layers.student")
        t_shapes = probe_shapes(teacher, teacher_paths, example, "distill.feature_layers.teacher")
        adapters = []
        for sp, ss, ts in zip(student_paths, s_shapes, t_shapes, strict=True):
            if len(ss) not in (2, 4) or len(ts) != len(ss):
                raise ConfigError(f"distill.feature_layers: student layer {sp!r} gives shape {tuple(ss)} and the "
                                  f"teacher's gives {tuple(ts)}; both must be NCHW maps or both (N, C) vectors")
            adapters.append(HintAdapter(ss[1], ts[1], spatial=len(ss) == 4))
        self.adapters = nn.ModuleList(adapters)
        self.tap = FeatureTap(student, student_paths, "distill.feature_layers.student")

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
        logits = self.student(x)
        feats = self.tap.take()
        return logits, feats, [a(f) for a, f in zip(self.adapters, feats, strict=True)]

    def remove_hooks(self) -> None:
        """Detach the student's hooks (after training)."""
        self.tap.remove()
