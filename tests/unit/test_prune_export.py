import io

import numpy as np
import pytest
import torch

from edgekd.config import PruneConfig
from edgekd.errors import ModelError
from edgekd.export import export_onnx, parity, torch_logits
from edgekd.models import (
    SmallCNN,
    apply_checkpoint,
    build_model,
    count_macs,
    count_params,
    load_state_dict_file,
)
from edgekd.prune.loop import prune
from edgekd.prune.pruner import load_pruned, save_pruned


def test_ratio_pruning_rounds_channels_and_reloads_weights_only():
    torch.manual_seed(0)
    m = SmallCNN(10)
    before = count_params(m)
    m, out = prune(m, (3, 32, 32), PruneConfig(ratio=0.5), 10, round_to=8)
    assert out.after["params"] < before and out.after["macs"] < out.before["macs"]
    convs = [mod for mod in m.modules() if isinstance(mod, torch.nn.Conv2d)]
    assert all(c.out_channels % 8 == 0 for c in convs)
    assert m.classifier.out_features == 10  # the head is kept whole
    buf = io.BytesIO()
    torch.save(save_pruned(m), buf)
    buf.seek(0)
    again = load_pruned(SmallCNN(10), torch.load(buf, weights_only=True))
    x = torch.randn(2, 3, 32, 32)
    m.eval(), again.eval()
    assert torch.equal(m(x), again(x))


def test_target_macs_reaches_the_target():
    m = build_model("torchvision:resnet18", 10)
    base = count_macs(m, (3, 32, 32))
    m, out = prune(m, (3, 32, 32), PruneConfig(target_macs=0.5), 10, round_to=None)
    assert out.reached and out.after["macs"] <= 0.5 * base
    assert out.steps and out.steps[-1].macs == out.after["macs"]


def test_export_parity_with_pytorch(tmp_path):
    torch.manual_seed(0)
    m = SmallCNN(10).eval()
    path = export_onnx(m, (3, 32, 32), tmp_path / "m.onnx", 17)
    from edgekd.backends.onnxruntime import OrtRunner
    from edgekd.bench.measure import predict

    x = np.random.default_rng(0).standard_normal((20, 3, 32, 32)).astype(np.float32)
    p = parity(torch_logits(m, x), predict(OrtRunner(path, 1, ["CPUExecutionProvider"]), x))
    assert p["max_abs_diff"] < 1e-4 and p["top1_agreement"] == 100.0


def test_checkpoint_that_is_not_one(tmp_path):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint at all")
    with pytest.raises(ModelError, match="not a loadable weights-only checkpoint"):
        load_state_dict_file(bad)


def test_malicious_pickle_is_refused_not_executed(tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            import os
            return (os.system, (f"touch {marker}",))

    import pickle
    p = tmp_path / "evil.pt"
    with open(p, "wb") as f:
        pickle.dump({"w": Evil()}, f)
    with pytest.raises(ModelError):
        load_state_dict_file(p)
    assert not marker.exists()


def test_mismatched_checkpoint_names_the_problem(tmp_path):
    p = tmp_path / "ck.pt"
    torch.save(SmallCNN(5).state_dict(), p)
    with pytest.raises(ModelError, match="does not fit the model"):
        apply_checkpoint(SmallCNN(10), p)


def test_counts():
    m = SmallCNN(10)
    assert count_params(m) == sum(p.numel() for p in m.parameters())
    assert count_macs(m, (3, 32, 32)) > 1e6


def test_attention_models_export_in_eval_mode_without_the_fused_kernel(tmp_path):
    # nn.MultiheadAttention in eval mode without grad takes torch's fused kernel, which has no ONNX
    # export (torchvision's ViT does); export_onnx takes the plain path, with the same numbers.
    class Tiny(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.patch = torch.nn.Conv2d(3, 16, 4, stride=4)
            self.enc = torch.nn.TransformerEncoderLayer(16, 2, 32, batch_first=True, dropout=0.0)
            self.head = torch.nn.Linear(16, 5)

        def forward(self, x):
            t = self.patch(x).flatten(2).transpose(1, 2)
            return self.head(self.enc(t).mean(1))

    torch.manual_seed(0)
    m = Tiny().eval()
    for p in m.parameters():
        p.requires_grad_(False)
    path = export_onnx(m, (3, 16, 16), tmp_path / "vit.onnx", 17)
    x = np.random.default_rng(0).random((4, 3, 16, 16), dtype=np.float32)
    import onnxruntime as ort

    got = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]
    assert np.abs(got - torch_logits(m, x)).max() < 1e-4
    assert torch.backends.mha.get_fastpath_enabled()  # restored after the export
