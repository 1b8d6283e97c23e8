"""The student's own view of the input, for cross-modal distillation: the teacher sees the preprocessed
image, the student what a cheaper sensor gives (greyscale, fewer channels, a lower resolution). The
transform is applied to the preprocessed input, so a deployment feeds the student what it would feed the
teacher, transformed the same way (`InputTransform.describe` says how)."""
from __future__ import annotations

import dataclasses
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .images import Images, _hash, as_index, fingerprint

__all__ = ["InputTransform", "TransformedImages", "transform_splits"]

LUMA = (0.299, 0.587, 0.114)  # ITU-R BT.601 luminance weights


class InputTransform(nn.Module):
    """NCHW -> the student's NCHW: luminance (greyscale, 3 channels to 1), then `channels` (1: the
    channels' mean; more, from 1: repeated), then a square `resolution` (area-averaged down,
    bilinear up). Parameter-free and deterministic."""

    def __init__(self, greyscale: bool = False, channels: int | None = None, resolution: int | None = None):
        super().__init__()
        self.greyscale, self.channels, self.resolution = greyscale, channels, resolution

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.greyscale and x.shape[1] == 3:
            w = torch.tensor(LUMA, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
            x = (x * w).sum(1, keepdim=True)
        if self.channels is not None and x.shape[1] != self.channels:
            if self.channels == 1:
                x = x.mean(1, keepdim=True)
            elif x.shape[1] == 1:
                x = x.repeat(1, self.channels, 1, 1)
            else:
                raise ValueError(f"cannot make {self.channels} channels from {x.shape[1]}")
        r = self.resolution
        if r is not None and tuple(x.shape[-2:]) != (r, r):
            down = r < x.shape[-1]
            x = F.interpolate(x, size=(r, r), mode="area") if down else \
                F.interpolate(x, size=(r, r), mode="bilinear", align_corners=False)
        return x

    def output_shape(self, shape: tuple[int, ...]) -> tuple[int, int, int]:
        """The student's (C, H, W) for a teacher input of `shape` (C, H, W)."""
        with torch.no_grad():
            return tuple(self(torch.zeros(1, *shape[-3:])).shape[1:])  # type: ignore[return-value]

    def describe(self, shape: tuple[int, ...]) -> str:
        steps = []
        if self.greyscale and shape[-3] == 3:
            steps.append("luminance 0.299 R + 0.587 G + 0.114 B of the preprocessed channels")
        if self.channels is not None:
            steps.append(f"{self.channels} channel(s)")
        if self.resolution is not None:
            steps.append(f"resized to {self.resolution}x{self.resolution} (area average down, bilinear up)")
        out = self.output_shape(shape)
        return f"{'; '.join(steps) or 'unchanged'}: {tuple(shape[-3:])} -> {out}"

    def key(self) -> str:
        return f"greyscale={self.greyscale},channels={self.channels},resolution={self.resolution}"


class TransformedImages(Images):
    """`base` (a tensor or Images, including augmentation draws) seen through `transform`, per batch."""

    def __init__(self, base: Images | torch.Tensor, transform: InputTransform):
        self.base, self.transform = base, transform
        self.shape = (len(base), *transform.output_shape(tuple(base.shape[1:])))  # type: ignore[assignment]

    def take(self, idx: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.transform(self.base[idx])

    def __getitem__(self, key: Any) -> torch.Tensor:
        idx, scalar = as_index(key, len(self))
        out = self.take(idx)
        return out[0] if scalar else out

    def fingerprint(self) -> str:
        return _hash("modality", fingerprint(self.base), self.transform.key())


def transform_splits(splits: Any, transform: InputTransform) -> Any:
    """A copy of `splits` whose inputs (train, val, test, unlabeled) are the student's view; labels,
    classes and sizes are unchanged."""
    from . import ArrayDataset

    def view(ds: ArrayDataset | None) -> ArrayDataset | None:
        return None if ds is None else ArrayDataset(TransformedImages(ds.x, transform), ds.y.numpy())

    return dataclasses.replace(splits, train=view(splits.train), val=view(splits.val), test=view(splits.test),
                               unlabeled=view(splits.unlabeled),
                               input_shape=transform.output_shape(splits.input_shape),
                               description=f"{splits.description}; student input: "
                                           f"{transform.describe(splits.input_shape)}")
