"""The linear-time concat index mapping prunes exactly what torch-pruning's own does."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torchvision.models import densenet

import edgekd.prune.pruner as prune_mod
from edgekd.config import PruneConfig
from edgekd.prune.pruner import MAX_STEPS, make_pruner


class _Mixed(nn.Module):
    """Concats of branches, of the same tensor twice, and of a concat's output again."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.a = nn.Conv2d(16, 8, 1)
        self.b = nn.Conv2d(16, 12, 3, padding=1)
        self.mid = nn.Conv2d(16 + 8 + 12, 24, 1)
        self.twice = nn.Conv2d(48, 16, 1)
        self.last = nn.Conv2d(16 + 24, 20, 1)
        self.fc = nn.Linear(20, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = torch.relu(self.stem(x))
        m = torch.relu(self.mid(torch.cat([s, self.a(s), self.b(s)], 1)))
        t = torch.relu(self.twice(torch.cat([m, m], 1)))
        return self.fc(self.last(torch.cat([t, m], 1)).mean((2, 3)))


def _pruned(model: nn.Module, example: torch.Tensor, fast: bool, monkeypatch, **cfg) -> dict[str, torch.Tensor]:
    with monkeypatch.context() as mp:
        if not fast:
            mp.setattr(prune_mod, "fast_patches", lambda: [])
        pruner = make_pruner(model, example, PruneConfig(**cfg), None, 0.9, MAX_STEPS)
        for _ in range(6):
            pruner.step()
    nodes = pruner.pruner.DG.module2node.values()
    assert any(hasattr(n, "_edgekd_concat_memo") for n in nodes) == fast  # which mapping ran
    return model.state_dict()


@pytest.mark.parametrize("build,shape", [
    (lambda: densenet.DenseNet(growth_rate=8, block_config=(3, 3), num_init_features=16, num_classes=5), (3, 32, 32)),
    (_Mixed, (3, 16, 16)),
])
@pytest.mark.parametrize("global_pruning", [False, True])
def test_same_channels_and_weights_as_torch_pruning(build, shape, global_pruning, monkeypatch):
    torch.manual_seed(0)
    model = build().eval()
    example = torch.randn(1, *shape)
    fast = _pruned(copy.deepcopy(model), example, True, monkeypatch, global_pruning=global_pruning)
    orig = _pruned(copy.deepcopy(model), example, False, monkeypatch, global_pruning=global_pruning)
    assert fast.keys() == orig.keys()
    assert sum(v.numel() for v in fast.values()) < sum(v.numel() for v in model.state_dict().values())
    for k in fast:
        assert fast[k].shape == orig[k].shape, k
        assert torch.equal(fast[k], orig[k]), k
