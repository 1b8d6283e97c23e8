"""The in-place KV cache: the fused graph takes kv_length, its past and present share one buffer per layer,
and greedy decoding, several-token checks, cutting the cache back (speculative decoding), outgrowing the
buffers and scoring give exactly what the copying path gives; graphs without kv_length keep copying."""
import json
import subprocess
import sys

import numpy as np
import onnx
import pytest

pytest.importorskip("transformers")

from edgekd.backends import get_backend  # noqa: E402
from edgekd.bench import lm_runner  # noqa: E402
from edgekd.bench.lm_figures import decode_once, score  # noqa: E402
from edgekd.bench.lm_generation import speculative_greedy  # noqa: E402
from edgekd.config.profiles import load_profile  # noqa: E402
from edgekd.lm.decode import Decoder  # noqa: E402
from edgekd.lm.export import KV_LENGTH, export_lm_onnx  # noqa: E402
from edgekd.lm.models import load_lm  # noqa: E402
from tests.lm_fixtures import tiny_llama_dir  # noqa: E402


@pytest.fixture(scope="module")
def decoders(tmp_path_factory):
    """(config, {name: (artifact, runner)}): the fused target and draft, and the target's plain graph."""
    tmp = tmp_path_factory.mktemp("inplace")
    target = load_lm(str(tiny_llama_dir(tmp / "t", seed=4, hidden_size=64))).model  # head size 16: fusable
    draft = load_lm(str(tiny_llama_dir(tmp / "d", seed=5, hidden_size=64, num_hidden_layers=1))).model
    profile, backend = load_profile("cpu"), get_backend("onnxruntime")
    out = {}
    for name, model, fused in (("target", target, True), ("draft", draft, True), ("plain", target, False)):
        path = export_lm_onnx(model, tmp / f"{name}.onnx", fused=fused)
        art = backend.compile(path, profile, tmp / name, "fp32")
        out[name] = (art, backend.load(art, profile, 1, spin=False))
    yield target.config, draft.config, out
    for _, runner in out.values():
        runner.close()


def test_the_fused_graph_takes_kv_length_with_a_default_and_the_plain_graph_does_not(decoders):
    cfg, _, out = decoders
    graph = onnx.load(str(out["target"][0].path)).graph  # after ONNX Runtime's offline optimisation
    default = [i for i in graph.initializer if i.name == KV_LENGTH]
    assert KV_LENGTH in {i.name for i in graph.input} and onnx.numpy_helper.to_array(default[0]).tolist() == [-1]
    assert lm_runner.in_place(out["target"][1].session) and not lm_runner.in_place(out["plain"][1].session)
    fast = Decoder(out["target"][1].run, cfg, cfg.num_hidden_layers, session=out["target"][1].session)
    slow = Decoder(out["plain"][1].run, cfg, cfg.num_hidden_layers, session=out["plain"][1].session)
    assert fast.kv is not None and slow.kv is None and fast.empty_cache() == 0 and isinstance(slow.empty_cache(), list)


def test_in_place_decoding_equals_copying_decoding(decoders):
    cfg, _, out = decoders
    runner = out["target"][1]
    copying = Decoder(runner.run, cfg, cfg.num_hidden_layers)  # the same graph fed without kv_length
    layers, heads, size = cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.hidden_size // cfg.num_attention_heads
    inplace = lm_runner.InPlaceKV(runner.session, layers, heads, size, capacity=8)  # outgrown by the prompt
    rng = np.random.default_rng(1)
    ids = rng.integers(0, cfg.vocab_size, (1, 20))
    ref, ref_cache = copying.forward(ids, copying.empty_cache())
    got, length = inplace.forward(ids, inplace.empty_cache())
    assert length == 20 and inplace.capacity >= 20 and np.abs(got - ref).max() < 1e-5
    kept = got.copy()
    check, length = inplace.forward(ids[:, :5], length)  # five tokens after the past: a speculative check
    ref_check, _ = copying.forward(ids[:, :5], ref_cache)
    assert length == 25 and np.abs(check - ref_check).max() < 1e-5
    assert np.array_equal(got, kept)  # a long prefill's logits are its own: later runs leave them as they were
    # cut back to 22 and feed other tokens: what the copying path gives after the same 22
    cut = inplace.cut(length, 22)
    again, length = inplace.forward(ids[:, 10:12], cut)
    ref_again, _ = copying.forward(ids[:, 10:12], copying.cut(copying.forward(ids[:, :5], ref_cache)[1], 22))
    assert cut == 22 and length == 24 and np.abs(again - ref_again).max() < 1e-5
    for prompt in rng.integers(0, cfg.vocab_size, (3, 6)).tolist():  # greedy through the buffers' growth
        small = lm_runner.InPlaceKV(runner.session, layers, heads, size, capacity=4)
        assert decode_once(small, prompt, 30)["tokens"] == copying.greedy(prompt, 30)
        assert small.capacity >= 36
    blocks = rng.integers(0, cfg.vocab_size, (5, 12))  # batches of 4 and 1: the copying path and the buffers
    fast = Decoder(runner.run, cfg, layers, session=runner.session)
    assert score(fast, blocks)["perplexity"] == pytest.approx(score(copying, blocks)["perplexity"], rel=1e-5)


def test_short_passes_reuse_their_buffers_and_each_gives_the_copying_paths_logits(decoders):
    cfg, _, out = decoders
    runner = out["target"][1]
    copying = Decoder(runner.run, cfg, cfg.num_hidden_layers)
    layers, heads, size = cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.hidden_size // cfg.num_attention_heads
    inplace = lm_runner.InPlaceKV(runner.session, layers, heads, size, capacity=4)
    ids = np.random.default_rng(6).integers(0, cfg.vocab_size, (1, 14))
    length, ref_cache, seen = inplace.empty_cache(), copying.empty_cache(), {}
    for start, stop in ((0, 3), (3, 4), (4, 5), (5, 8), (8, 9), (9, 14)):  # prefill, steps, checks; growth at 5
        got, length = inplace.forward(ids[:, start:stop], length)
        ref, ref_cache = copying.forward(ids[:, start:stop], ref_cache)
        assert length == stop and got.shape == ref.shape and np.abs(got - ref).max() < 1e-5
        seen.setdefault(stop - start, []).append(got)
    one = seen[1]  # three one-token passes: one buffer, overwritten by each (no output allocated, no copy)
    assert len(one) == 3 and one[0] is one[1] is one[2] and seen[3][0] is seen[3][1]
    assert seen[1][0] is not seen[3][0] and inplace.capacity >= 14
    long = ids.repeat(2, axis=1)[:, :inplace.REUSED + 1]  # longer than REUSED: a fresh array of its own
    first, _ = inplace.forward(long, 0)
    kept = first.copy()
    second, _ = inplace.forward(long, 0)
    assert first is not second and np.array_equal(first, kept)


def test_speculative_decoding_in_place_is_the_targets_greedy_output(decoders):
    cfg, dcfg, out = decoders
    (_, t_run), (_, d_run) = out["target"], out["draft"]
    target = Decoder(t_run.run, cfg, cfg.num_hidden_layers, session=t_run.session)
    draft = Decoder(d_run.run, dcfg, dcfg.num_hidden_layers, session=d_run.session)
    plain = Decoder(t_run.run, cfg, cfg.num_hidden_layers)
    rng = np.random.default_rng(2)
    for prompt in rng.integers(0, cfg.vocab_size, (3, 8)).tolist():
        prompt = prompt + prompt[:4]  # a repeat: context lookup proposes too
        expect = plain.greedy(prompt, 24)
        for k, lookup in ((3, False), (2, True)):
            res = speculative_greedy(target, draft, prompt, 24, k, lookup=lookup)
            assert res.tokens == expect and res.drafted > 0


def test_the_runner_says_which_cache_it_used_and_both_decode_alike(decoders, tmp_path):
    _, _, out = decoders
    np.savez(tmp_path / "prompts.npz", prompts=np.random.default_rng(3).integers(0, 300, (2, 7)))
    runs = {}
    for mode in ("auto", "copy"):
        args = ["--model", str(out["target"][0].path), "--threads", "1", "--prompts", str(tmp_path / "prompts.npz"),
                "--new-tokens", "12", "--kv-cache", mode, "--json", str(tmp_path / f"{mode}.json")]
        res = subprocess.run([sys.executable, lm_runner.__file__, *args], capture_output=True, text=True, timeout=300)
        assert res.returncode == 0, res.stderr
        runs[mode] = json.loads((tmp_path / f"{mode}.json").read_text())
    assert runs["auto"]["details"]["kv_cache"] == "in place"
    assert runs["copy"]["details"]["kv_cache"] == "copied each step"
    assert runs["auto"]["tokens"] == runs["copy"]["tokens"] and runs["auto"]["decode_tokens_per_s"] > 0
    plain = ["--model", str(out["plain"][0].path), "--threads", "1", "--prompts", str(tmp_path / "prompts.npz"),
             "--new-tokens", "4", "--json", str(tmp_path / "plain.json")]
    res = subprocess.run([sys.executable, lm_runner.__file__, *plain], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    assert json.loads((tmp_path / "plain.json").read_text())["details"]["kv_cache"] == "copied each step"


def test_quantized_fused_graphs_keep_kv_length(decoders, tmp_path):
    from edgekd.quantize.lm_weights import quantize_lm_weights

    cfg, _, out = decoders
    src = out["target"][0].path
    for weights in ("int8", "int4"):
        q = quantize_lm_weights(src, tmp_path / f"q.{weights}.onnx", weights)
        art = get_backend("onnxruntime").compile(q, load_profile("cpu"), tmp_path / weights, weights)
        runner = get_backend("onnxruntime").load(art, load_profile("cpu"), 1)
        try:
            fast = Decoder(runner.run, cfg, cfg.num_hidden_layers, session=runner.session)
            slow = Decoder(runner.run, cfg, cfg.num_hidden_layers)
            assert fast.kv is not None, weights
            assert fast.greedy([5, 6, 7, 8], 12) == slow.greedy([5, 6, 7, 8], 12)
        finally:
            runner.close()
