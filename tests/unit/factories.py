"""Model factories for `module:tests.unit.factories:NAME` specs (what a user's own package provides)."""
from __future__ import annotations

from torch import nn


def small_net(num_classes: int) -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(8, num_classes))


class Registry:
    @staticmethod
    def build(num_classes: int) -> nn.Module:
        return small_net(num_classes)


NOT_CALLABLE = 3


def not_a_module(num_classes: int) -> int:
    return num_classes


def broken(num_classes: int) -> nn.Module:
    raise ValueError("no such width")
