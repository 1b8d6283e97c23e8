"""A tiny trained CNN, its FP32 ONNX and calibration/eval sets, shared by the backend conformance suite.

The model is trained for a few hundred steps on class prototypes plus noise, so its logits have
clear margins: top-1 agreement then measures the backend, not ties between near-equal logits.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

CLASSES, SIZE = 10, 16


class TinyCNN(nn.Module):
    """conv-bn-relu x2, global pooling, linear head: the ops every backend must handle."""

    def __init__(self, classes: int = CLASSES):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
            nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(16, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def synthetic(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """n images of CLASSES fixed prototypes plus Gaussian noise, with their labels."""
    protos = np.random.default_rng(1234).standard_normal((CLASSES, 3, SIZE, SIZE)).astype(np.float32)
    rng = np.random.default_rng(seed)
    y = rng.integers(0, CLASSES, n)
    x = protos[y] + 0.5 * rng.standard_normal((n, 3, SIZE, SIZE)).astype(np.float32)
    return x.astype(np.float32), y.astype(np.int64)


@dataclass(frozen=True)
class TinySet:
    """Paths and arrays the conformance tests share."""

    fp32_onnx: Path
    calib_npz: Path
    eval_x: np.ndarray
    eval_y: np.ndarray
    root: Path


def export(model: nn.Module, path: Path, input_axes: dict | None = None) -> Path:
    """Legacy (TorchScript) ONNX export with a dynamic batch dimension, as edgekd's export stage does."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model.eval(), (torch.zeros(1, 3, SIZE, SIZE),), str(path), dynamo=False, opset_version=17,
                          input_names=["input"], output_names=["logits"],
                          dynamic_axes={"input": input_axes or {0: "batch"}, "logits": {0: "batch"}})
    return path


@pytest.fixture(scope="session")
def tiny_set(tmp_path_factory) -> TinySet:
    """Train TinyCNN (a second or two), export it, write calib.npz (64 rows) and keep 200 eval rows."""
    torch.manual_seed(0)
    model = TinyCNN()
    x, y = synthetic(512, seed=1)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: more threads only contend with the other tests' runtimes
    try:
        for step in range(80):
            idx = torch.arange(step * 64, step * 64 + 64) % len(xt)
            opt.zero_grad()
            nn.functional.cross_entropy(model(xt[idx]), yt[idx]).backward()
            opt.step()
    finally:
        torch.set_num_threads(threads)
    root = tmp_path_factory.mktemp("tiny")
    onnx_path = export(model, root / "model.fp32.onnx")
    calib = root / "calib.npz"
    np.savez(calib, x=synthetic(64, seed=2)[0])
    ex, ey = synthetic(200, seed=3)
    return TinySet(onnx_path, calib, ex, ey, root)


def ort_logits(path: Path, x: np.ndarray) -> np.ndarray:
    """Reference logits from ONNX Runtime's CPU provider."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: x})[0]
