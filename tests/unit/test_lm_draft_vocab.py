"""The draft's LM head cut to the training split's most frequent tokens: the kept logits equal the source
model's bit for bit in every weight format, the others sit at the floor, the graph keeps its interface, and
speculative decoding through the cut draft is still the target's own greedy output."""
import numpy as np
import pytest
import torch

pytest.importorskip("transformers")

from edgekd.backends import get_backend  # noqa: E402
from edgekd.config.profiles import load_profile  # noqa: E402
from edgekd.errors import StageError  # noqa: E402
from edgekd.lm.decode import Decoder  # noqa: E402
from edgekd.lm.draft_vocab import FLOOR, cut_head, frequent_tokens  # noqa: E402
from edgekd.lm.export import export_lm_onnx  # noqa: E402
from edgekd.lm.models import load_lm  # noqa: E402
from edgekd.lm.speculative import speculative_greedy  # noqa: E402
from edgekd.quantize.lm_weights import quantize_lm_weights  # noqa: E402
from tests.lm_fixtures import tiny_llama_dir  # noqa: E402


def _decoder(path, config, tmp, name, precision):
    profile, backend = load_profile("cpu"), get_backend("onnxruntime")
    runner = backend.load(backend.compile(path, profile, tmp / name, precision), profile, 1)
    return Decoder(runner.run, config, config.num_hidden_layers)


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("vocab")
    model = load_lm(str(tiny_llama_dir(tmp / "teacher", seed=4))).model
    return model, tmp, export_lm_onnx(model, tmp / "fp32.onnx")


def test_frequent_tokens_rank_by_count_then_id():
    ids = np.array([[5, 5, 5, 2, 2, 9], [9, 9, 7, 5, 1, 1]])
    # 5 four times, 9 three, 1 and 2 twice (the lower id first), 7 once, then the unseen tokens by id
    assert frequent_tokens(ids, 12, 6).tolist() == [5, 9, 1, 2, 7, 0]
    assert frequent_tokens(ids, 12, 50).tolist()[:5] == [5, 9, 1, 2, 7] and len(frequent_tokens(ids, 12, 50)) == 12


@pytest.mark.parametrize("weights", ["fp32", "int8", "int4_mixed"])
def test_the_cut_head_keeps_its_rows_exactly_and_floors_the_rest(lm, weights):
    import onnx

    model, tmp, fp32 = lm
    cfg = model.config
    src = fp32 if weights == "fp32" else quantize_lm_weights(fp32, tmp / f"{weights}.onnx", weights)
    keep = np.random.default_rng(0).permutation(cfg.vocab_size)[:100]
    cut = cut_head(src, tmp / f"draft.{weights}.onnx", keep)
    graph = onnx.load(str(cut)).graph
    head = next(n for n in graph.node if "draft_kept_logits" in n.output)
    assert head.op_type == ("MatMul" if weights == "fp32" else "MatMulNBits")
    assert [o.name for o in graph.output] == [o.name for o in onnx.load(str(src)).graph.output]
    precision = "int4" if weights == "int4_mixed" else weights
    ref = _decoder(src, cfg, tmp, f"ref-{weights}", precision)
    got = _decoder(cut, cfg, tmp, f"cut-{weights}", precision)
    ids = np.random.default_rng(1).integers(0, cfg.vocab_size, (2, 9))
    a, a_cache = ref.forward(ids, ref.empty_cache(2))
    b, b_cache = got.forward(ids, got.empty_cache(2))
    assert b.shape == a.shape == (2, 9, cfg.vocab_size)
    np.testing.assert_array_equal(b[..., keep], a[..., keep])  # the same rows, the same kernel
    rest = np.setdiff1d(np.arange(cfg.vocab_size), keep)
    assert (b[..., rest] == np.float32(FLOOR)).all()
    assert np.isin(b.argmax(-1), keep).all()
    for x, y in zip(a_cache, b_cache, strict=True):  # every other weight is the source's
        np.testing.assert_array_equal(x, y)


def test_speculative_decoding_through_a_cut_draft_is_the_targets_output(lm):
    model, tmp, fp32 = lm
    cfg = model.config
    target = _decoder(fp32, cfg, tmp, "target", "fp32")
    prompt = torch.randint(0, cfg.vocab_size, (12,), generator=torch.Generator().manual_seed(2)).tolist()
    expect = target.greedy(prompt, 24)
    keep = frequent_tokens(np.asarray(expect), cfg.vocab_size, 40)  # most of what the target writes, not all
    draft = _decoder(cut_head(fp32, tmp / "self-draft.onnx", keep), cfg, tmp, "self-draft", "fp32")
    res = speculative_greedy(target, draft, prompt, 24, draft_tokens=4)
    assert res.tokens == expect
    missing = sum(t not in set(keep.tolist()) for t in expect)
    assert res.accepted > 0 and (missing == 0 or res.acceptance_rate < 1.0)


def test_a_head_that_is_not_a_constant_matmul_is_one_clear_error(lm, tmp_path):
    import onnx
    from onnx import helper

    _, _, fp32 = lm
    m = onnx.load(str(fp32))
    head = next(n for n in m.graph.node if "logits" in n.output)
    head.output[0] = "pre"
    m.graph.node.append(helper.make_node("Relu", ["pre"], ["logits"], name="odd_head"))
    onnx.save(m, str(tmp_path / "odd.onnx"))
    with pytest.raises(StageError, match="LM head of odd.onnx is a Relu node"):
        cut_head(tmp_path / "odd.onnx", tmp_path / "out.onnx", np.arange(5))
    with pytest.raises(StageError, match="distinct ids"):
        cut_head(fp32, tmp_path / "dup.onnx", np.array([1, 1, 2]))
    old = onnx.load(str(fp32))  # the scatter back needs Shape's end attribute (opset 15)
    next(o for o in old.opset_import if o.domain in ("", "ai.onnx")).version = 14
    onnx.save(old, str(tmp_path / "old.onnx"))
    with pytest.raises(StageError, match="old.onnx is at opset 14; the cut needs opset 15 or later"):
        cut_head(tmp_path / "old.onnx", tmp_path / "out.onnx", np.arange(5))
