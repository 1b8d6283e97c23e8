"""The ONNX entry's model normalisation and calibration-input split, on small exported models."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from edgekd.errors import ModelError
from edgekd.quantize.onnx_input import normalise_onnx, split_inputs

SHAPE = (3, 16, 16)


def _net(flatten: str):
    import torch
    from torch import nn

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3, padding=1)
            self.head = nn.Linear(4 * 16 * 16, 5)

        def forward(self, x):
            y = torch.relu(self.conv(x))
            return self.head(y.view(1, -1) if flatten == "pinned" else y.flatten(1))

    torch.manual_seed(0)
    return Net().eval()


def _export(model, path: Path, **kw) -> Path:
    import torch

    torch.onnx.export(model, (torch.randn(1, *SHAPE),), str(path), input_names=["input"], dynamo=False, **kw)
    return path


def _run(path: Path, x: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    s = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return s.run(None, {s.get_inputs()[0].name: x})[0]


def _x(n: int) -> np.ndarray:
    return np.random.default_rng(0).standard_normal((n, *SHAPE)).astype(np.float32)


def test_reshape_that_spells_the_fixed_batch_is_freed(tmp_path):
    src = _export(_net("pinned"), tmp_path / "m.onnx", opset_version=11)
    info = normalise_onnx(src, tmp_path / "out.onnx", _x(4), 17)
    assert info["batch"]["declared"] == 1 and info["batch"]["reshapes_unpinned"]
    assert info["opset"] == 11 and info["opset_used"] == 17
    x = _x(3)
    got = _run(tmp_path / "out.onnx", x)
    want = np.concatenate([_run(src, x[i:i + 1]) for i in range(3)])
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_dynamic_batch_kept_and_symbolic_dims_taken_from_the_data(tmp_path):
    src = _export(_net("flatten"), tmp_path / "m.onnx", opset_version=17, keep_initializers_as_inputs=True,
                  dynamic_axes={"input": {0: "N", 2: "H", 3: "W"}})
    info = normalise_onnx(src, tmp_path / "out.onnx", _x(2), 17)
    assert info["batch"] == {"declared": "dynamic", "handling": "dynamic in the file: kept", "reshapes_unpinned": []}
    assert info["input_shape"] == ["N", *SHAPE]
    assert info["initializers_removed_from_inputs"] == 4 and not info["opset_converted"]
    assert _run(tmp_path / "out.onnx", _x(5)).shape == (5, 5)


def test_first_output_without_a_row_per_input_is_a_model_error(tmp_path):
    from torch import nn

    class Stat(nn.Module):
        def forward(self, x):
            return x.mean(dim=(0, 2, 3)), x.flatten(1)

    src = _export(Stat(), tmp_path / "m.onnx", opset_version=13, dynamic_axes={"input": {0: "N"}})
    with pytest.raises(ModelError, match="first output .* not one row per input") as e:
        normalise_onnx(src, tmp_path / "out.onnx", _x(2), 17)
    assert str(src) in str(e.value) and "\n" not in str(e.value)
    assert not (tmp_path / "out.onnx").exists()


def test_split_is_seeded_disjoint_and_complete():
    cal, sel, rep = split_inputs(32, 7, hold_report=True)
    assert (len(cal), len(sel), len(rep)) == (12, 10, 10)
    assert sorted(np.concatenate([cal, sel, rep]).tolist()) == list(range(32))
    again = split_inputs(32, 7, hold_report=True)
    assert all(np.array_equal(a, b) for a, b in zip((cal, sel, rep), again, strict=True))
    cal, sel, rep = split_inputs(32, 7, hold_report=False)
    assert (len(cal), len(sel), len(rep)) == (16, 16, 0)
    cal, sel, rep = split_inputs(2, 0, hold_report=True)
    assert (len(cal), len(sel), len(rep)) == (2, 0, 0)
    cal, sel, rep = split_inputs(1, 0, hold_report=False)
    assert (len(cal), len(sel), len(rep)) == (1, 0, 0)
    cal, sel, rep = split_inputs(12, 0, hold_report=True)  # a selection share of 4 would judge nothing: it calibrates
    assert (len(cal), len(sel), len(rep)) == (8, 0, 4)
    assert sorted(np.concatenate([cal, rep]).tolist()) == list(range(12))
