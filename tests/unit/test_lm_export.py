"""The KV-cache ONNX decoder: the same logits as the Hugging Face forward, prefill + decode steps equal to
one full forward, ONNX Runtime parity (logits, greedy tokens for 16 steps, perplexity)."""
import numpy as np
import pytest
import torch

pytest.importorskip("transformers")

from edgekd.backends import get_backend  # noqa: E402
from edgekd.config.profiles import load_profile  # noqa: E402
from edgekd.distill.lm_trainer import perplexity  # noqa: E402
from edgekd.errors import ModelError  # noqa: E402
from edgekd.lm.decode import Decoder  # noqa: E402
from edgekd.lm.export import KVDecoder, export_lm_onnx, kv_shape  # noqa: E402
from edgekd.lm.models import load_lm  # noqa: E402
from tests.lm_fixtures import tiny_llama_dir  # noqa: E402


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    return load_lm(str(tiny_llama_dir(tmp_path_factory.mktemp("lm") / "teacher", seed=3))).model


@pytest.fixture(scope="module")
def ort_decoder(hf, tmp_path_factory):
    out = tmp_path_factory.mktemp("onnx")
    path = export_lm_onnx(hf, out / "decoder.onnx")
    profile = load_profile("cpu")
    backend = get_backend("onnxruntime")
    runner = backend.load(backend.compile(path, profile, out / "compiled", "fp32"), profile, 1)
    yield Decoder(runner.run, hf.config, hf.config.num_hidden_layers)
    runner.close()


def _ids(hf, n=2, t=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, hf.config.vocab_size, (n, t), generator=g)


@torch.no_grad()
def test_torch_decoder_matches_hugging_face_and_its_cache_steps(hf):
    dec = KVDecoder(hf).eval()
    ids = _ids(hf)
    ref = hf(input_ids=ids, use_cache=False).logits
    empty = [torch.zeros(kv_shape(hf.config, 2, 0)) for _ in range(2 * hf.config.num_hidden_layers)]
    full, *_ = dec(ids, *empty)
    assert (full - ref).abs().max() < 1e-4
    # prefill 8 tokens, then 4 single-token steps through the cache: the same logits as the full forward
    logits, *cache = dec(ids[:, :8], *empty)
    steps = [logits]
    for i in range(8, 12):
        logits, *cache = dec(ids[:, i:i + 1], *cache)
        steps.append(logits)
    assert (torch.cat(steps, 1) - ref).abs().max() < 1e-4
    assert cache[0].shape == kv_shape(hf.config, 2, 12)


def test_onnx_runtime_parity_logits_greedy_tokens_and_perplexity(hf, ort_decoder):
    ids = _ids(hf, seed=1)
    with torch.no_grad():
        ref = hf(input_ids=ids, use_cache=False).logits.numpy()
    got, cache = ort_decoder.forward(ids.numpy(), ort_decoder.empty_cache(2))
    assert np.abs(got - ref).max() < 1e-4 and cache[-1].shape == kv_shape(hf.config, 2, 12)
    prompt = ids[0, :5].tolist()
    with torch.no_grad():
        expect = hf.generate(torch.tensor([prompt]), max_new_tokens=16, do_sample=False, min_new_tokens=16,
                             pad_token_id=0)[0, 5:].tolist()
    assert ort_decoder.greedy(prompt, 16) == expect
    blocks = _ids(hf, n=3, t=16, seed=2)
    assert ort_decoder.perplexity(blocks.numpy(), batch_size=2) == pytest.approx(perplexity(hf, blocks), rel=1e-4)
    assert (ort_decoder.next_tokens(blocks.numpy()) == hf(input_ids=blocks).logits.argmax(-1).numpy()).all()


def test_unsupported_family_is_a_clear_model_error(hf):
    class Other(torch.nn.Module):
        config = type("C", (), {"model_type": "gpt2"})()

    with pytest.raises(ModelError, match="model family 'gpt2' is not supported"):
        KVDecoder(Other())


def test_the_fused_attention_graph_decodes_what_the_plain_graph_decodes(tmp_path):
    import onnx

    from edgekd.lm.export import fusable
    from edgekd.quantize.lm_weights import eight_bit_matmuls, quantize_lm_weights

    wide = load_lm(str(tiny_llama_dir(tmp_path / "wide", seed=4, hidden_size=64))).model  # head size 16
    assert fusable(wide.config) and not fusable(load_lm(str(tiny_llama_dir(tmp_path / "narrow"))).model.config)
    profile, backend = load_profile("cpu"), get_backend("onnxruntime")
    decoders, runners = {}, []
    for fused in (False, True):
        path = export_lm_onnx(wide, tmp_path / f"d{int(fused)}.onnx", fused=fused)
        nodes = onnx.load(str(path)).graph.node
        ops = {n.op_type for n in nodes}
        assert ("GroupQueryAttention" in ops) == fused and ("Softmax" in ops) != fused
        if fused:  # query, key and value in one projection; each residual Add with the norm after it
            layers = wide.config.num_hidden_layers
            assert all(n.input[1] == n.input[2] == "" for n in nodes if n.op_type == "GroupQueryAttention")
            assert sum(n.op_type == "MatMul" for n in nodes) == 5 * layers + 1  # qkv, o, gate, up, down; head
            assert sum(n.op_type == "SkipSimplifiedLayerNormalization" for n in nodes) == 2 * layers
        runners.append(backend.load(backend.compile(path, profile, tmp_path / f"c{int(fused)}", "fp32"), profile, 1))
        decoders[fused] = Decoder(runners[-1].run, wide.config, wide.config.num_hidden_layers)
    try:
        ids = _ids(wide, n=3, t=16, seed=5).numpy()
        with torch.no_grad():
            ref = wide(input_ids=torch.tensor(ids), use_cache=False).logits.numpy()
        plain, fused = decoders[False], decoders[True]
        full, _ = fused.forward(ids, fused.empty_cache(3))
        assert np.abs(full - ref).max() < 1e-4  # prefill of a batch
        _, cache = fused.forward(ids[:1, :9], fused.empty_cache())
        chunk, cache = fused.forward(ids[:1, 9:13], cache)  # several new tokens after a past: a speculative check
        assert np.abs(chunk - ref[:1, 9:13]).max() < 1e-4 and cache[0].shape == kv_shape(wide.config, 1, 13)
        prompt = ids[0, :6].tolist()
        assert fused.greedy(prompt, 16) == plain.greedy(prompt, 16)
        assert fused.perplexity(ids) == pytest.approx(plain.perplexity(ids), rel=1e-4)
    finally:
        for r in runners:
            r.close()
    q = quantize_lm_weights(tmp_path / "d1.onnx", tmp_path / "d1.int4.onnx", "int4")  # the contrib op stays
    ops = {n.op_type for n in onnx.load(str(q)).graph.node}
    assert {"GroupQueryAttention", "MatMulNBits"} <= ops
    # int4_mixed keeps the packed query-key-value projection in 8 bits, as it keeps key and value apart
    fused_graph = onnx.load(str(tmp_path / "d1.onnx"))
    kept = set(eight_bit_matmuls(fused_graph))
    packed = {n.input[0] for n in fused_graph.graph.node if n.op_type == "GroupQueryAttention"}
    assert {n.name for n in fused_graph.graph.node if n.op_type == "MatMul" and n.output[0] in packed} <= kept
    cfg = wide.config  # per layer qkv (and down where it narrows), then the head
    assert len(kept) == cfg.num_hidden_layers * (2 if cfg.intermediate_size > cfg.hidden_size else 1) + 1


def _family(kind: str):
    import transformers as tf

    sizes = dict(hidden_size=64, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                 intermediate_size=96, max_position_embeddings=128, vocab_size=200)
    torch.manual_seed(7)
    if kind == "qwen2":  # biases on the query, key and value projections; two layers with a sliding window
        cfg = tf.Qwen2Config(**sizes, use_sliding_window=True, sliding_window=9, max_window_layers=2)
    elif kind == "mistral":  # every layer windowed
        cfg = tf.MistralConfig(**sizes, sliding_window=9)
    else:  # smollm3: every fourth layer without rotary positions (NoPE)
        cfg = tf.SmolLM3Config(**sizes, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    model = tf.AutoModelForCausalLM.from_config(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 1 and p.shape[0] != sizes["hidden_size"]:  # biases large enough to matter
                p.normal_(0, 0.5)
    return model


@pytest.mark.parametrize("kind", ["qwen2", "mistral", "smollm3"])
@pytest.mark.parametrize("fused", [False, True])
def test_sliding_windows_biases_and_nope_layers_export_as_hugging_face_computes_them(tmp_path, kind, fused):
    from edgekd.lm.export import layer_windows

    model = _family(kind)
    cfg = model.config
    windows, rotary = layer_windows(cfg, 4), KVDecoder(model).rotary
    assert {"qwen2": [None, None, 9, 9], "mistral": [9] * 4, "smollm3": [None] * 4}[kind] == windows
    assert rotary == ([True, True, True, False] if kind == "smollm3" else [True] * 4)
    path = export_lm_onnx(model, tmp_path / "d.onnx", fused=fused)
    profile, backend = load_profile("cpu"), get_backend("onnxruntime")
    runner = backend.load(backend.compile(path, profile, tmp_path / "c", "fp32"), profile, 1)
    try:
        dec = Decoder(runner.run, cfg, cfg.num_hidden_layers)
        ids = _ids(model, n=1, t=30, seed=2).numpy()  # longer than the window
        with torch.no_grad():
            ref = model(input_ids=torch.tensor(ids), use_cache=False).logits.numpy()
        logits, cache = dec.forward(ids[:, :8], dec.empty_cache())
        steps = [logits]
        for j in range(8, 30, 3):  # decode in chunks, as a speculative check feeds its proposals
            logits, cache = dec.forward(ids[:, j:j + 3], cache)
            steps.append(logits)
        assert np.abs(np.concatenate(steps, 1) - ref).max() < 1e-4
    finally:
        runner.close()


def test_a_student_keeps_the_per_layer_settings_of_the_teacher_layers_it_copies():
    from edgekd.lm.models import build_lm_student

    teacher = _family("smollm3")
    assert teacher.config.no_rope_layers == [1, 1, 1, 0]
    student, info = build_lm_student(teacher, {"layers": 2}, layers=[1, 3])
    assert student.config.no_rope_layers == [1, 0] and info["layers_from_teacher"] == [1, 3]
    whole, _ = build_lm_student(teacher, {"layers": 4}, layers=[0, 1, 2, 3])  # the teacher itself again
    ids = _ids(teacher, n=1, t=20, seed=4)
    with torch.no_grad():
        assert torch.allclose(whole(input_ids=ids).logits, teacher(input_ids=ids).logits, atol=1e-5)
    qwen = _family("qwen2")
    assert build_lm_student(qwen, {"layers": 2}, layers=[0, 3])[0].config.layer_types == ["full_attention",
                                                                                           "sliding_attention"]


@pytest.mark.parametrize("rope", [
    {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
     "original_max_position_embeddings": 16, "rope_theta": 500000.0},  # Llama 3.x
    {"rope_type": "linear", "factor": 4.0, "rope_theta": 10000.0},
    {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16, "rope_theta": 10000.0},  # scales cos, sin
])
def test_scaled_rotary_positions_export_as_the_model_computes_them(tmp_path, rope):
    import transformers as tf

    cfg = tf.LlamaConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         intermediate_size=96, max_position_embeddings=128, vocab_size=200, rope_parameters=rope)
    torch.manual_seed(1)
    model = tf.AutoModelForCausalLM.from_config(cfg).eval()
    plain = tf.LlamaConfig(**{**cfg.to_dict(), "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0}})
    assert not torch.allclose(model.model.rotary_emb.inv_freq, tf.AutoModelForCausalLM.from_config(plain).model
                              .rotary_emb.inv_freq) or model.model.rotary_emb.attention_scaling != 1.0
    ids = _ids(model, n=1, t=60, seed=3).numpy()  # past the original positions
    with torch.no_grad():
        ref = model(input_ids=torch.tensor(ids), use_cache=False).logits.numpy()
    profile, backend = load_profile("cpu"), get_backend("onnxruntime")
    for fused in (False, True):
        path = export_lm_onnx(model, tmp_path / f"d{int(fused)}.onnx", fused=fused)
        runner = backend.load(backend.compile(path, profile, tmp_path / f"c{int(fused)}", "fp32"), profile, 1)
        try:
            dec = Decoder(runner.run, cfg, cfg.num_hidden_layers)
            logits, cache = dec.forward(ids[:, :40], dec.empty_cache())
            rest, _ = dec.forward(ids[:, 40:], cache)
            assert np.abs(np.concatenate([logits, rest], 1) - ref).max() < 1e-4
        finally:
            runner.close()


def test_rotary_positions_that_change_with_the_length_are_a_clear_model_error():
    import transformers as tf

    cfg = tf.LlamaConfig(hidden_size=64, num_hidden_layers=1, num_attention_heads=4, intermediate_size=96,
                         vocab_size=200, rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 1e4})
    with pytest.raises(ModelError, match="rope type 'dynamic' changes with the sequence length"):
        KVDecoder(tf.AutoModelForCausalLM.from_config(cfg))


def test_the_greedy_layer_choice_scores_each_subset_with_its_own_layer_types():
    from edgekd.lm.models import choose_layers

    teacher = _family("qwen2")  # layers 2 and 3 slide over 9 tokens
    ids = _ids(teacher, n=1, t=24, seed=6)
    types = list(teacher.config.layer_types)
    index = {id(layer): i for i, layer in enumerate(teacher.model.layers)}
    seen = []
    original = type(teacher.model).forward

    def spy(self, *args, **kwargs):
        ran = [index[id(layer)] for layer in self.layers]
        seen.append((ran, list(self.config.layer_types[:len(self.layers)])))
        return original(self, *args, **kwargs)

    type(teacher.model).forward = spy
    try:
        keep, steps = choose_layers(teacher, 3, ids)
    finally:
        type(teacher.model).forward = original
    assert len(keep) == 3 and len(steps) == 1 and teacher.config.layer_types == types  # restored
    # every run, whole or from a cached layer input, had the types of the layers it ran
    assert seen and all(t == [types[i] for i in ran] for ran, t in seen)
    # the trials without layers 1, 2 and 3 ran only the layers after them (from the cached inputs)
    assert {tuple(ran) for ran, _ in seen} >= {(1, 2, 3), (2, 3), (3,), ()}
