"""The standalone LM runner (copied to boards): the same greedy tokens as edgekd.lm.decode.Decoder, the same
perplexity, its figures and peak memory in one JSON object, and one line with exit 2 for a bad model."""
import json
import subprocess
import sys

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")

from edgekd.backends import get_backend  # noqa: E402
from edgekd.bench import lm_runner  # noqa: E402
from edgekd.bench.lm_bench import LMJob, run_local  # noqa: E402
from edgekd.config.profiles import load_profile  # noqa: E402
from edgekd.lm.decode import Decoder  # noqa: E402
from edgekd.lm.export import export_lm_onnx  # noqa: E402


@pytest.fixture(scope="module")
def decoder(tmp_path_factory):
    from transformers import LlamaConfig, LlamaForCausalLM

    tmp = tmp_path_factory.mktemp("lmrunner")
    cfg = LlamaConfig(vocab_size=96, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, intermediate_size=64, max_position_embeddings=128)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).eval()
    onnx_path = export_lm_onnx(model, tmp / "m.onnx")
    profile, backend = load_profile("cpu"), get_backend("onnxruntime")
    artifact = backend.compile(onnx_path, profile, tmp / "target", "fp32")
    rng = np.random.default_rng(0)
    prompts = rng.integers(0, 96, (3, 7))
    np.savez(tmp / "prompts.npz", prompts=prompts)
    np.savez(tmp / "eval.npz", x=rng.integers(0, 96, (5, 16)))
    return cfg, artifact, prompts, tmp


def _args(artifact, tmp, *extra):
    return ["--model", str(artifact.path), "--threads", "1", "--prompts", str(tmp / "prompts.npz"),
            "--new-tokens", "9", *extra]


@pytest.mark.parametrize("backend", ["onnxruntime", "openvino"])
def test_runner_decodes_exactly_what_the_decoder_decodes(decoder, backend):
    if backend == "openvino":
        pytest.importorskip("openvino")
    cfg, artifact, prompts, tmp = decoder
    profile = load_profile("cpu" if backend == "onnxruntime" else "intel-cpu")
    runner = get_backend(backend).load(
        artifact if backend == "onnxruntime" else get_backend(backend).compile(artifact.path, profile, tmp / "ov", "fp32"),
        profile, 1)
    try:
        ref = Decoder(runner.run, cfg, 2)
        expect = [ref.greedy(p.tolist(), 9) for p in prompts]
        blocks = np.load(tmp / "eval.npz")["x"]
        ppl = ref.perplexity(blocks)
        picks = ref.next_tokens(blocks)
    finally:
        runner.close()
    model = str(artifact.path) if backend == "onnxruntime" else str(tmp / "ov" / "model.fp32.xml")
    args = lm_runner.parse_args(["--model", model, "--backend", backend, "--threads", "1", "--prompts",
                                 str(tmp / "prompts.npz"), "--new-tokens", "9", "--eval-data", str(tmp / "eval.npz"),
                                 "--keep-times"])
    out = lm_runner.run(args)
    assert out["tokens"] == expect
    assert out["perplexity"] == pytest.approx(ppl, rel=1e-4) and out["next_tokens"] == picks.tolist()
    assert out["runs"] == 3 and out["new_tokens"] == 9 and len(out["timings"]) == 3
    assert out["decode_tokens_per_s"] > 0 and out["prefill_tokens_per_s"] > 0 and out["ttft_ms"] > 0
    assert 0 < out["tpot_ms"]["p50"] <= out["tpot_ms"]["p90"] <= out["tpot_ms"]["p99"]


def test_runner_as_a_script_prints_one_json_object_with_its_peak_memory(decoder):
    _, artifact, prompts, tmp = decoder
    res = subprocess.run([sys.executable, lm_runner.__file__, *_args(artifact, tmp, "--prompt-count", "2")],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    assert out["peak_rss_mb"] > 10 and out["memory_scope"].startswith("peak resident memory of its own runner")
    assert out["prompts"] == 2 and len(out["tokens"]) == 2 and "timings" not in out
    assert out["versions"]["onnxruntime"] and out["environment"]["cpu_count"] >= 1
    # the same through lm_bench.run_local (a fresh process per decoder, as on a board)
    job = LMJob("m", artifact.path, [artifact.path], "fp32", 2, 8)
    local = run_local([job], prompts[:2].tolist(), 9, load_profile("cpu"), 1)["m"]
    assert local["tokens"] == out["tokens"] and local["peak_rss_mb"] > 10 and local["decode_tokens_per_s"] > 0


def test_runner_refuses_a_model_that_is_not_a_kv_decoder(decoder, tmp_path):
    import onnx
    from onnx import TensorProto, helper

    _, artifact, _, tmp = decoder
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), tmp_path / "id.onnx")
    for model, needle in ((tmp_path / "id.onnx", "is not a KV-cache decoder"), (tmp_path / "none.onnx", "does not exist")):
        res = subprocess.run([sys.executable, lm_runner.__file__, "--model", str(model), "--prompts",
                              str(tmp / "prompts.npz"), "--new-tokens", "2"], capture_output=True, text=True, timeout=120)
        assert res.returncode == 2 and needle in res.stderr and len(res.stderr.strip().splitlines()) == 1


def test_runner_with_a_draft_decodes_speculatively_and_losslessly(decoder):
    from edgekd.lm.speculative import speculative_greedy

    cfg, artifact, prompts, tmp = decoder
    base = _args(artifact, tmp, "--draft", str(artifact.path), "--draft-kv-heads", "2", "--draft-head-dim", "8")
    one = lm_runner.run(lm_runner.parse_args([*base, "--draft-tokens", "3", "--min-confidence", "0"]))
    s = one["speculative"]  # the model drafting for itself: every proposal kept, every output its own
    assert s["identical"] == 3 and s["prompts"] == 3 and s["acceptance_rate"] == 1.0 and s["draft_tokens"] == 3
    assert s["tokens_per_s"] > 0 and s["teacher_tokens_per_s"] > 0 and one["draft"] == artifact.path.name
    # a floor no guess of this random model reaches: nothing drafted, so no acceptance, and the reason says why
    none = lm_runner.run(lm_runner.parse_args([*base, "--draft-tokens", "2", "--min-confidence", "0.99"]))["speculative"]
    assert none["drafted"] == 0 and none["acceptance_rate"] is None and none["identical"] == 3
    assert none["not_measured"]["acceptance_rate"].startswith("nothing was drafted")
    grid = lm_runner.run(lm_runner.parse_args([*base, "--draft-tokens", "2,4", "--min-confidence", "0,0.5"]))["speculative"]
    assert [(t["draft_tokens"], t["min_confidence"]) for t in grid["tried"]] == [(2, 0.0), (2, 0.5), (4, 0.0), (4, 0.5)]
    best = max(grid["tried"], key=lambda t: t["tokens_per_s"])
    assert (grid["draft_tokens"], grid["min_confidence"]) == (best["draft_tokens"], best["min_confidence"])
    # the loop is the one edgekd runs on this host, and it travels beside the runner
    from edgekd.bench import lm_generation

    assert speculative_greedy is lm_generation.speculative_greedy
    for bad, needle in ((["--draft-tokens", "0"], "--draft-tokens"), (["--min-confidence", "1.5"], "--min-confidence"),
                        (["--min-confidence", "x"], "--min-confidence")):
        res = subprocess.run([sys.executable, lm_runner.__file__, *base, *bad], capture_output=True, text=True,
                             timeout=120)
        assert res.returncode == 2 and needle in res.stderr and len(res.stderr.strip().splitlines()) == 1


def test_openvino_keeps_the_cache_in_its_states_and_decodes_as_the_copying_path(decoder):
    pytest.importorskip("openvino")
    from edgekd.bench.lm_figures import decode_once
    from edgekd.bench.lm_generation import speculative_greedy

    cfg, artifact, prompts, tmp = decoder
    ir = tmp / "ov-states"
    get_backend("openvino").compile(artifact.path, load_profile("intel-cpu"), ir, "fp32")
    base = ["--model", str(ir / "model.fp32.xml"), "--backend", "openvino", "--threads", "1",
            "--prompts", str(tmp / "prompts.npz"), "--new-tokens", "9"]
    states, details, _ = lm_runner.load(lm_runner.parse_args(base))
    copying, copy_details, _ = lm_runner.load(lm_runner.parse_args([*base, "--kv-cache", "copy"]))
    assert isinstance(states, lm_runner.StatefulKV) and details["kv_cache"] == "in place"
    kept = states.request.get_compiled_model().get_property("KV_CACHE_PRECISION")  # not the plugin's lossy u8
    assert str(kept) in ("<Type: 'float32'>", "f32") and details["config"]["KV_CACHE_PRECISION"] == "f32"
    assert type(copying) is lm_runner.KVDecoder and copy_details["kv_cache"] == "copied each step"
    ids = np.random.default_rng(7).integers(0, cfg.vocab_size, (1, 14))
    got, length = states.forward(ids, states.empty_cache())
    ref, ref_cache = copying.forward(ids, copying.empty_cache())
    assert length == 14 and np.abs(got - ref).max() < 1e-5
    check, length = states.forward(ids[:, :4], length)  # a speculative check of 4 tokens after the 14
    ref_check, ref_cache = copying.forward(ids[:, :4], ref_cache)
    assert length == 18 and np.abs(check - ref_check).max() < 1e-5
    cut = states.cut(length, 15)  # two guesses rejected: the states keep their first 15 tokens
    again, length = states.forward(ids[:, 5:7], cut)
    ref_again, _ = copying.forward(ids[:, 5:7], lm_runner.trim(ref_cache, 15))
    assert cut == 15 and length == 17 and np.abs(again - ref_again).max() < 1e-5
    fresh, _ = states.forward(ids[:, :3], 0)  # a new generation starts from empty states
    assert np.abs(fresh - copying.forward(ids[:, :3], copying.empty_cache())[0]).max() < 1e-5
    draft, _, _ = lm_runner.load(lm_runner.parse_args(base))  # the model drafting for itself: every guess kept
    for p in prompts.tolist():
        expect = decode_once(copying, p, 12)["tokens"]
        res = speculative_greedy(states, draft, p, 12, 3)
        assert res.tokens == expect and res.accepted == res.drafted > 0
        assert speculative_greedy(states, draft, p + p[:3], 12, 2, lookup=True).tokens == decode_once(
            copying, p + p[:3], 12)["tokens"]
