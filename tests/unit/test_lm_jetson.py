"""The Jetson LM bundle without a GPU: the shape plan, the figures and the decoding bookkeeping of
trt_lm_decode.py; trt_lm_runner.py's engine decoder against a stand-in TensorRT (the exported ONNX run by
ONNX Runtime) and stand-in device memory; the mixed FP16 copy; build_engine.sh against a stand-in trtexec."""
from __future__ import annotations

import ast
import os
import py_compile
import shutil
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest

from edgekd.backends.tensorrt import BUNDLE_DIR
from edgekd.backends.tensorrt_bundle import trt_lm_decode as lm
from edgekd.backends.tensorrt_bundle import trt_lm_runner
from edgekd.backends.tensorrt_bundle.trt_runner import RunnerError
from edgekd.bench.lm_generation import LOOKUP_TOKENS
from edgekd.config.profiles import load_profile

SCRIPTS = ("trt_lm_runner.py", "trt_lm_decode.py", "trt_runner.py", "trt_device.py")
LOOPS = [Path(__file__).resolve().parents[2] / "edgekd" / "bench" / f"lm_{n}.py" for n in ("generation", "figures")]
# the decode loop and its timing, copied beside them


# ---------------------------------------------------------------- the shape plan

def test_the_profile_covers_prefill_decode_and_a_speculative_check():
    limits = lm.context_limits(seq_len=64, prompt_tokens=32, max_new_tokens=32, draft_tokens=4)
    assert limits == {"max_input": 64, "max_context": 69, "opt_context": 48}
    shapes = lm.profile_shapes(2, kv_heads=3, head_dim=16, **limits)
    assert list(shapes) == ["input_ids", "past_key_0", "past_value_0", "past_key_1", "past_value_1"]
    assert shapes["input_ids"] == [[1, 1], [1, 1], [1, 64]]  # decode is the optimal shape, a block the longest
    assert shapes["past_value_1"] == [[1, 3, 0, 16], [1, 3, 48, 16], [1, 3, 68, 16]]  # prefill has no past
    # a speculative check at the end of the longest generation fits: its past plus its tokens
    past = 32 + 32 - 1
    assert past <= shapes["past_key_0"][2][2] and past + 4 + 1 <= limits["max_context"]
    # with context lookup a round may copy LOOKUP_TOKENS guesses: the check and the context grow to take them
    copied = lm.context_limits(seq_len=4, prompt_tokens=3, max_new_tokens=8, draft_tokens=2, lookup=True)
    assert copied == {"max_input": LOOKUP_TOKENS + 1, "max_context": 3 + 8 + LOOKUP_TOKENS + 1, "opt_context": 7}
    assert lm.context_limits(4, 3, 8, 2)["max_input"] == 4


def test_shape_flags_are_trtexec_syntax():
    shapes = lm.profile_shapes(1, 2, 8, max_input=5, max_context=9, opt_context=100)
    assert lm.shape_flags(shapes) == ["--minShapes=input_ids:1x1,past_key_0:1x2x0x8,past_value_0:1x2x0x8",
                                      "--optShapes=input_ids:1x1,past_key_0:1x2x8x8,past_value_0:1x2x8x8",
                                      "--maxShapes=input_ids:1x5,past_key_0:1x2x8x8,past_value_0:1x2x8x8"]


# ---------------------------------------------------------------- figures and bookkeeping

class Clock:
    """A clock that advances by the given steps, one per reading."""

    def __init__(self, steps):
        self.t, self.steps = 0.0, iter(steps)

    def __call__(self):
        self.t += next(self.steps, 0.0)
        return self.t


def test_speed_figures_from_timed_runs():
    runs = [{"prefill_s": 0.2, "prompt_tokens": 10, "step_s": [0.01, 0.03], "tokens": [1, 2, 3]},
            {"prefill_s": 0.4, "prompt_tokens": 20, "step_s": [0.02, 0.04], "tokens": [1, 2, 3]}]
    f = lm.speed_figures(runs)
    assert f["prefill_tokens_per_s"] == pytest.approx(30 / 0.6, rel=1e-3)
    assert f["decode_tokens_per_s"] == pytest.approx(4 / 0.1, rel=1e-3)
    assert f["ttft_ms"] == pytest.approx(300.0) and f["tpot_ms"]["p50"] == pytest.approx(25.0)
    assert f["tpot_ms"]["p50"] <= f["tpot_ms"]["p90"] <= f["tpot_ms"]["p99"] and "not_measured" not in f
    one = lm.speed_figures([{"prefill_s": 0.1, "prompt_tokens": 4, "step_s": [], "tokens": [5]}])
    assert one["decode_tokens_per_s"] is None and one["tpot_ms"] is None
    assert set(one["not_measured"]) == {"decode_tokens_per_s", "tpot_ms"}


class ToyDecoder:
    """A numpy 'model' over a KV cache of token ids: the next token is a fixed function of the last token and
    the position; `bias` makes a draft that sometimes disagrees. Counts the cache cuts."""

    def __init__(self, vocab=11, bias=0):
        self.vocab, self.bias, self.cache, self.trims = vocab, bias, [], 0

    @property
    def length(self):
        return len(self.cache)

    def reset(self):
        self.cache = []

    def forward(self, ids):
        out = np.zeros((len(ids), self.vocab), np.float32)
        for i, t in enumerate(ids):
            pos = len(self.cache) + i
            pick = (3 * t + pos + (self.bias if pos % 3 == 0 else 0)) % self.vocab
            out[i, pick] = 1.0
        self.cache.extend(ids)
        return out

    def trim(self, length):
        if length < len(self.cache):
            self.trims += 1
        self.cache = self.cache[:length]


def test_greedy_timed_times_the_prefill_and_each_step():
    run = lm.greedy_timed(ToyDecoder(), [1, 2, 3], 4, clock=Clock([0, 0.5, 0, 0.1, 0, 0.1, 0, 0.1]))
    assert run["prompt_tokens"] == 3 and len(run["tokens"]) == 4
    assert run["prefill_s"] == pytest.approx(0.5) and run["step_s"] == pytest.approx([0.1, 0.1, 0.1])


@pytest.mark.parametrize(("bias", "full"), [(0, True), (4, False)])
def test_speculative_decoding_is_the_targets_greedy_output(bias, full):
    target, draft = ToyDecoder(), ToyDecoder(bias=bias)
    for prompt in ([1, 2, 3], [7], [4, 4, 4, 4, 4]):
        plain = lm.greedy_timed(target, prompt, 12)["tokens"]
        res = lm.speculative_greedy(target, draft, prompt, 12, draft_tokens=3)
        assert res["tokens"] == plain  # lossless
        assert 0 < res["drafted"] and (res["accepted"] == res["drafted"]) == full
        assert res["target_passes"] < 12 if full else res["target_passes"] <= 12
    assert (target.trims > 0) == (not full)  # a rejected draft cuts the target's cache back
    # the toy's top token has probability e / (e + 10) = 0.214: a floor under it drafts as before, one over
    # it drafts nothing, and both stay lossless
    plain = lm.greedy_timed(target, [1, 2, 3], 12)["tokens"]
    free = lm.speculative_greedy(target, draft, [1, 2, 3], 12, draft_tokens=3)
    low = lm.speculative_greedy(target, draft, [1, 2, 3], 12, draft_tokens=3, min_confidence=0.2)
    high = lm.speculative_greedy(target, draft, [1, 2, 3], 12, draft_tokens=3, min_confidence=0.25)
    assert low == free and high["tokens"] == plain
    assert high["drafted"] == 0 and high["target_passes"] == 12


def test_context_lookup_on_the_engines_stays_lossless_and_counts_its_guesses():
    target, draft = ToyDecoder(), ToyDecoder(bias=4)
    text = [1, *lm.greedy_timed(target, [1], 80)["tokens"]]  # the toy's text repeats every 55 tokens
    rounds = []
    for prompt in ([1, 2, 3], [4, 4, 4, 4, 4], text[:60]):
        plain = lm.greedy_timed(target, prompt, 40)["tokens"]
        res = lm.speculative_greedy(target, draft, prompt, 40, draft_tokens=3, lookup=True)
        alone = lm.speculative_greedy(target, draft, prompt, 40, draft_tokens=0, lookup=True)  # no draft step
        assert res["tokens"] == plain and alone["tokens"] == plain  # lossless
        assert 0 <= res["lookup_accepted"] <= res["looked_up"] <= res["drafted"]
        assert alone["drafted"] == alone["looked_up"]  # every guess copied
        rounds.append(res["looked_up"])
    assert rounds[-1] > 0 and res["lookup_accepted"] > 0  # the prompt that holds a period is copied from


def test_engine_loop_feeds_a_long_input_in_pieces_the_profile_takes():
    whole, limited = ToyDecoder(), ToyDecoder()
    limited.max_input = 4
    ids = [3, 1, 4, 1, 5, 9, 2, 6, 5, 3]
    ref = whole.forward(ids)
    loop = lm.EngineLoop(limited)
    cache = loop.empty_cache()
    logits, cache = loop.forward(np.asarray([ids]), cache)
    assert logits.shape == (1, 10, 11) and np.array_equal(logits[0], ref) and cache == limited.length == 10
    assert loop.cut(cache, 6) == 6 and limited.cache == ids[:6]


def test_quality_scores_every_predicted_token():
    dec = ToyDecoder(vocab=7)
    blocks = np.array([[1, 3, 0, 3], [2, 2, 2, 2]])
    q = lm.quality(dec, blocks)
    # the toy puts all its logit on one token: a hit costs log(1 + 6/e), a miss log(e + 6) - 0
    picks = [[(3 * t + p) % 7 for p, t in enumerate(b[:-1])] for b in blocks.tolist()]
    hits = sum(p == t for row, b in zip(picks, blocks.tolist(), strict=True) for p, t in zip(row, b[1:], strict=True))
    nll = hits * np.log(np.e + 6) - hits + (6 - hits) * np.log(np.e + 6)
    assert q["accuracy"] == pytest.approx(100 * hits / 6, abs=1e-3)
    assert q["perplexity"] == pytest.approx(float(np.exp(nll / 6)), rel=1e-3) and q["eval_blocks"] == 2


# ---------------------------------------------------------------- the runner's engine decoder, on stand-ins

class FakeCuda:
    """Device memory as one byte arena (pointers are offsets into it); with `strided`, a cuda-python-like
    runtime whose cudaMemcpy2DAsync copies rows inside the arena."""

    name, handle, stream = "fake", 0, "stream"

    def __init__(self, size: int = 1 << 22, strided: bool = False):
        self.arena, self.next, self.copies2d = np.zeros(size, np.uint8), 256, 0
        if strided:
            ok = types.SimpleNamespace(cudaSuccess=0)
            self.rt = types.SimpleNamespace(cudaError_t=ok, cudaMemcpyKind=types.SimpleNamespace(
                cudaMemcpyDeviceToDevice="d2d"), cudaMemcpy2DAsync=self._memcpy2d)

    def _memcpy2d(self, dst, dpitch, src, spitch, width, height, kind, stream):
        assert kind == "d2d" and stream == self.stream and width <= min(dpitch, spitch)
        for r in range(height):
            self.arena[dst + r * dpitch:dst + r * dpitch + width] = self.arena[src + r * spitch:src + r * spitch + width]
        self.copies2d += 1
        return (0,)

    def alloc(self, nbytes):
        ptr, self.next = self.next, self.next + (nbytes + 255) // 256 * 256
        assert self.next <= len(self.arena)
        return ptr

    def to_device(self, ptr, host):
        data = np.ascontiguousarray(host).reshape(-1).view(np.uint8)
        self.arena[ptr:ptr + data.size] = data

    def to_host(self, host, ptr):
        host.reshape(-1).view(np.uint8)[:] = self.arena[ptr:ptr + host.nbytes]

    def synchronize(self):
        pass

    def free(self, ptr):
        pass

    def version(self):
        return "12.6"


FAKE_TRT = types.SimpleNamespace(TensorIOMode=types.SimpleNamespace(INPUT="in", OUTPUT="out"), nptype=np.dtype)
ORT_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(int64)": np.int64}


class FakeEngine:
    """The engine API trt_lm_runner uses, over an ONNX Runtime session of the exported decoder: tensors read
    from and written to the fake device at the addresses the runner set, shapes checked against the profile."""

    def __init__(self, path: Path, cuda: FakeCuda, max_input: int, max_past: int):
        import onnxruntime as ort

        self.session, self.cuda = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]), cuda
        ins, outs = self.session.get_inputs(), self.session.get_outputs()
        self.names = [t.name for t in (*ins, *outs)]
        self.num_io_tensors = len(self.names)
        self.modes = {**{t.name: "in" for t in ins}, **{t.name: "out" for t in outs}}
        self.dtypes = {t.name: np.dtype(ORT_TYPES[t.type]) for t in (*ins, *outs)}
        kv, hd = ins[1].shape[1], ins[1].shape[3]
        self.vocab = outs[0].shape[-1]
        self.profile = {"input_ids": ([1, 1], [1, 1], [1, max_input])}
        self.profile.update({t.name: ([1, kv, 0, hd], [1, kv, 1, hd], [1, kv, max_past, hd]) for t in ins[1:]})
        self.device_memory_size_v2 = 3 << 20

    def get_tensor_name(self, i):
        return self.names[i]

    def get_tensor_mode(self, name):
        return self.modes[name]

    def get_tensor_dtype(self, name):
        return self.dtypes[name]

    def get_tensor_shape(self, name):
        return (-1, -1, self.vocab) if name == "logits" else (-1, -1)

    def get_tensor_profile_shape(self, name, index):
        assert index == 0
        return self.profile[name]

    def create_execution_context(self):
        return FakeContext(self)


class FakeContext:
    def __init__(self, engine: FakeEngine):
        self.engine, self.shapes, self.addresses = engine, {}, {}

    def set_input_shape(self, name, shape):
        lo, _, hi = self.engine.profile[name]
        assert all(a <= s <= b for a, s, b in zip(lo, shape, hi, strict=True)), (name, shape)
        self.shapes[name] = tuple(shape)
        return True

    def set_tensor_address(self, name, ptr):
        self.addresses[name] = ptr

    def execute_async_v3(self, stream):
        e, arena = self.engine, self.engine.cuda.arena
        feeds = {}
        for name, shape in self.shapes.items():
            dt, ptr = e.dtypes[name], self.addresses[name]
            feeds[name] = arena[ptr:ptr + int(np.prod(shape)) * dt.itemsize].view(dt).reshape(shape).copy()
        for name, value in zip(e.names[len(feeds):], e.session.run(None, feeds), strict=True):
            ptr, data = self.addresses[name], np.ascontiguousarray(value).reshape(-1).view(np.uint8)
            arena[ptr:ptr + data.size] = data
        return True


@pytest.fixture(scope="module")
def decoders(tmp_path_factory):
    """The tiny teacher (4 layers) and a 2-layer draft exported as KV-cache ONNX, FP32 and mixed FP16."""
    pytest.importorskip("transformers")
    from edgekd.lm.export import export_lm_onnx
    from edgekd.lm.fp16 import write_mixed_fp16
    from edgekd.lm.models import load_lm
    from tests.lm_fixtures import tiny_llama_dir

    root = tmp_path_factory.mktemp("jetson-lm")
    out = {}
    for name, layers, seed in (("teacher", 4, 0), ("draft", 2, 1)):
        hf = load_lm(str(tiny_llama_dir(root / name, seed=seed, num_hidden_layers=layers))).model
        out[name] = export_lm_onnx(hf, root / f"{name}.onnx")
        out[f"{name}_fp32_layers"] = write_mixed_fp16(out[name], root / f"{name}.fp16.onnx")
        out[f"{name}.fp16"] = root / f"{name}.fp16.onnx"
        out[f"{name}_config"] = hf.config
    return out


def _ort_decoder(path, config):
    import onnxruntime as ort

    from edgekd.lm.decode import Decoder

    s = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return Decoder(lambda feeds: s.run(None, feeds), config, config.num_hidden_layers)


def _engine(path, cuda, max_input=16, max_past=40):
    return trt_lm_runner.EngineDecoder(FAKE_TRT, FakeEngine(path, cuda, max_input, max_past), cuda)


@pytest.mark.parametrize("strided", [True, False])
def test_engine_decoder_decodes_as_the_exported_model_and_cuts_its_cache(decoders, strided):
    from edgekd.lm.speculative import speculative_greedy

    cuda = FakeCuda(strided=strided)
    target, draft = _engine(decoders["teacher"], cuda), _engine(decoders["draft"], cuda)
    assert (target.kv_heads, target.head_dim, target.max_input, target.max_past) == (2, 8, 16, 40)
    ref_t = _ort_decoder(decoders["teacher"], decoders["teacher_config"])
    ref_d = _ort_decoder(decoders["draft"], decoders["draft_config"])
    prompt = [5, 17, 3, 99, 42, 7]
    assert lm.greedy_timed(target, prompt, 10)["tokens"] == ref_t.greedy(prompt, 10)
    ref = speculative_greedy(ref_t, ref_d, prompt, 12, 3)
    res = lm.speculative_greedy(target, draft, prompt, 12, draft_tokens=3)
    assert res["tokens"] == ref.tokens == ref_t.greedy(prompt, 12)  # lossless, through ping-pong buffers
    assert (res["drafted"], res["accepted"], res["target_passes"]) == (ref.drafted, ref.accepted, ref.target_passes)
    assert res["accepted"] < res["drafted"]  # a random draft: rejections, so the caches were cut
    assert (cuda.copies2d > 0) == strided
    # after a cut the cache still continues the text: one more step equals a fresh prefill of the same tokens
    target.reset()
    target.forward(prompt + [1, 2, 3, 4])
    target.trim(len(prompt) + 1)
    after_cut = target.forward([8]).copy()
    target.reset()
    assert np.allclose(after_cut, target.forward(prompt + [1, 8])[-1:], atol=1e-5)
    assert target.memory() == {"activation_mb": 3.0, "buffers_mb": pytest.approx(target.buffer_bytes / 2**20, abs=0.01)}


def test_engine_decoder_runs_the_fp16_copy_with_its_own_tensor_types(decoders):
    cuda = FakeCuda()
    target = _engine(decoders["teacher.fp16"], cuda)
    assert target.item == 2 and target.host_logits.dtype == np.float32  # FP16 cache, FP32 logits
    prompt = [5, 17, 3, 99, 42, 7]
    ref = _ort_decoder(decoders["teacher"], decoders["teacher_config"]).greedy(prompt, 8)
    got = lm.greedy_timed(target, prompt, 8)["tokens"]
    assert sum(a == b for a, b in zip(got, ref, strict=True)) >= 7  # FP16 may flip a near tie, not the text


def test_engine_decoder_refuses_shapes_outside_its_profile(decoders):
    target = _engine(decoders["teacher"], FakeCuda(), max_input=4, max_past=6)
    with pytest.raises(RunnerError, match="outside the engine's profile") as e:
        target.forward(list(range(5)))
    assert e.value.exit_code == 2
    target.forward([1, 2, 3, 4])
    target.forward([5, 6, 7])
    with pytest.raises(RunnerError, match="rebuild with larger shapes"):
        target.forward([8])


def test_bench_prints_an_engines_figures_and_speculative_decoding_with_its_draft(decoders, tmp_path, monkeypatch):
    import json

    cuda = FakeCuda(size=1 << 23, strided=True)
    sources = {"teacher.engine": decoders["teacher"], "model.engine": decoders["draft"]}
    for name in sources:
        (tmp_path / name).write_bytes(name.encode())

    class Runtime:
        def __init__(self, logger):
            pass

        def deserialize_cuda_engine(self, data):
            return FakeEngine(sources[data.decode()], cuda, max_input=32, max_past=48)

    class Logger:
        WARNING = 2

        def __init__(self, level):
            pass

    trt = types.SimpleNamespace(**vars(FAKE_TRT), Runtime=Runtime, Logger=Logger, __version__="10.3.0.30")
    monkeypatch.setattr(trt_lm_runner, "_import_tensorrt", lambda: trt)
    monkeypatch.setattr(trt_lm_runner, "cuda_memory", lambda: cuda)
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "prompts.npz", prompts=rng.integers(0, 300, (3, 6)))
    blocks = rng.integers(0, 300, (2, 24))
    np.savez(tmp_path / "eval.npz", x=blocks)
    out = tmp_path / "teacher.json"
    code = trt_lm_runner.main(["bench", "--engine", str(tmp_path / "teacher.engine"), "--draft",
                               str(tmp_path / "model.engine"), "--prompts", str(tmp_path / "prompts.npz"),
                               "--eval-data", str(tmp_path / "eval.npz"), "--max-new-tokens", "8",
                               "--draft-tokens", "3", "--lookup", "0", "--json", str(out)])
    assert code == 0
    j = json.loads(out.read_text())
    assert j["engine"] == "teacher.engine" and j["prompts"] == 3 and j["runs"] == 3 and j["new_tokens"] == 8
    assert j["decode_tokens_per_s"] > 0 and j["prefill_tokens_per_s"] > 0 and j["ttft_ms"] > 0
    assert j["tpot_ms"]["p50"] <= j["tpot_ms"]["p90"]
    ref = _ort_decoder(decoders["teacher"], decoders["teacher_config"]).perplexity(blocks)
    assert j["perplexity"] == pytest.approx(ref, rel=1e-4) and 0 <= j["accuracy"] <= 100 and j["eval_blocks"] == 2
    s = j["speculative"]
    assert s["draft"] == "model.engine" and s["identical"] == 3 and s["prompts"] == 3 and s["draft_tokens"] == 3
    assert 0 <= s["acceptance_rate"] <= 1 and s["speedup"] > 0 and s["tokens_per_s"] > 0
    assert s["lookup"] is False and "compared" not in s
    assert s["round"]["check_ms"] > 0 and s["round"]["draft_ms"] > 0 and s["teacher_token_ms"] > 0
    assert j["memory"]["activation_mb"] == 3.0 and j["versions"]["tensorrt"] == "10.3.0.30"
    assert j["versions"]["cuda"] == "12.6" and "environment" in j
    # with context lookup the draft alone and lookup alone are timed in the same rounds, all lossless
    np.savez(tmp_path / "prompts.npz", prompts=np.tile(rng.integers(0, 300, (3, 3)), 2))  # prompts that repeat
    assert trt_lm_runner.main(["bench", "--engine", str(tmp_path / "teacher.engine"), "--draft",
                               str(tmp_path / "model.engine"), "--prompts", str(tmp_path / "prompts.npz"),
                               "--max-new-tokens", "8", "--draft-tokens", "3", "--lookup", "1", "--json", str(out)]) == 0
    s = json.loads(out.read_text())["speculative"]
    assert s["lookup"] is True and s["identical"] == 3 and set(s["sources"]) == {"draft", "lookup"}
    assert [(c["draft_tokens"], c["lookup"], c["identical"]) for c in s["compared"]] == [(3, False, 3), (0, True, 3)]


@pytest.mark.parametrize("sampled", [False, True])
def test_the_bundles_generate_py_over_engines_writes_what_it_writes_over_onnx_runtime(decoders, sampled):
    """generate.py's loop (bench/lm_app.py) over the engine decoders gives the tokens it gives over the same
    decoders in ONNX Runtime: greedy and sampled, alone and speculative, a repetition penalty in every check
    (the engines hand back views of their host buffers, which the loops must read before the next call)."""
    from edgekd.bench import lm_app
    from edgekd.bench.lm_sampling import RepetitionPenalty, Sampling

    cuda = FakeCuda(strided=True)
    bundle = {"tokenizer": {"eos_token_id": None}, "speculative": {"draft_tokens": 3, "min_confidence": 0.0,
                                                                     "lookup": True}}
    engines = {"teacher": lm.EngineLoop(_engine(decoders["teacher"], cuda)),
               "draft": lm.EngineLoop(_engine(decoders["draft"], cuda))}
    onnx = {"teacher": _ort_decoder(decoders["teacher"], decoders["teacher_config"]),
            "draft": _ort_decoder(decoders["draft"], decoders["draft_config"])}
    prompt = [5, 17, 3, 99, 42, 7, 5, 17]

    def text(loaded, speculative):
        roles = loaded if speculative else {"model": loaded["draft"]}
        rule = Sampling(1.5, 0, 0.95, seed=3) if sampled else None
        return lm_app.generate(bundle, roles, prompt, 14, sampling=rule, penalty=RepetitionPenalty(1.2))["token_ids"]

    for speculative in (False, True):
        got = text(engines, speculative)
        assert len(got) == 14 and got == text(onnx, speculative), speculative
    if not sampled:  # lossless: the teacher's own greedy text under the same penalty
        alone = lm_app.generate(bundle, {"model": engines["teacher"]}, prompt, 14, penalty=RepetitionPenalty(1.2))
        assert text(engines, True) == alone["token_ids"]


def test_mixed_fp16_keeps_positions_norm_statistics_and_logits_in_fp32(decoders):
    import onnx

    m = onnx.load(str(decoders["teacher.fp16"]))
    types_in = {i.name: i.type.tensor_type.elem_type for i in m.graph.input}
    types_out = {o.name: o.type.tensor_type.elem_type for o in m.graph.output}
    assert types_in["input_ids"] == onnx.TensorProto.INT64 and types_in["past_key_0"] == onnx.TensorProto.FLOAT16
    assert types_out["logits"] == onnx.TensorProto.FLOAT and types_out["present_value_3"] == onnx.TensorProto.FLOAT16
    kept = {n.split("/")[-1].rstrip("_0123456789") for n in decoders["teacher_fp32_layers"]}
    assert {"Cos", "Sin", "Where", "Pow", "ReduceMean", "Sqrt"} <= kept and "MatMul" not in kept
    weights = [i for i in m.graph.initializer if len(i.dims) == 2]
    assert weights and all(i.data_type == onnx.TensorProto.FLOAT16 for i in weights)


# ---------------------------------------------------------------- build_engine.sh and the scripts

def _fake_trtexec(tmp_path: Path, version: str) -> str:
    fake = tmp_path / "trtexec"
    fake.write_text('#!/bin/sh\n'
                    f'if [ "$1" = --help ]; then echo "&&&& RUNNING TensorRT.trtexec [TensorRT v{version}]"; exit 0; fi\n'
                    'for a; do case $a in --saveEngine=*) out="${a#--saveEngine=}";; esac; done\n'
                    'printf "%s\\n" "$@" > "args.${out%.engine.part}.txt"\necho engine > "$out"\n')
    fake.chmod(0o755)
    return str(fake)


def _script(decoders) -> str:
    from edgekd.lm.jetson import model_entry, render_build_script

    limits = lm.context_limits(32, 8, 8, 3)
    models = {"model": model_entry("model", decoders["draft_config"], limits, decoders["draft_fp32_layers"]),
              "teacher": model_entry("teacher", decoders["teacher_config"], limits, decoders["teacher_fp32_layers"])}
    return render_build_script(load_profile("jetson"), models, limits)


@pytest.mark.parametrize(("version", "strongly_typed"), [("8601", False), ("100300", False), ("101200", True),
                                                       ("110000", True)])
def test_build_script_builds_both_engines_in_fp16_by_trtexec_version(decoders, tmp_path, version, strongly_typed):
    script = tmp_path / "build_engine.sh"
    script.write_text(_script(decoders))
    r = subprocess.run(["bash", str(script), "all", "--verbose"], cwd=tmp_path, text=True, capture_output=True,
                       env={**os.environ, "TRTEXEC": _fake_trtexec(tmp_path, version)})
    assert r.returncode == 0, r.stderr
    for name in ("model", "teacher"):
        args = (tmp_path / f"args.{name}.txt").read_text().split("\n")
        assert (tmp_path / f"{name}.engine").read_text() == "engine\n" and args[-2] == "--verbose"
        assert any(a.startswith("--minShapes=input_ids:1x1,past_key_0:1x2x0x8") for a in args)
        if strongly_typed:  # TensorRT 10.12 deprecated --fp16, 11 removed it: the FP16 copy carries the types
            assert f"--onnx={name}.fp16.onnx" in args and "--stronglyTyped" in args and "--fp16" not in args
        else:
            assert f"--onnx={name}.onnx" in args and "--fp16" in args and "--precisionConstraints=prefer" in args
            layers = next(a for a in args if a.startswith("--layerPrecisions="))
            assert "Pow:fp32" in layers and "/Cos:fp32" in layers


def test_build_script_builds_one_engine_when_asked(decoders, tmp_path):
    script = tmp_path / "build_engine.sh"
    script.write_text(_script(decoders))
    r = subprocess.run(["bash", str(script), "teacher"], cwd=tmp_path, text=True, capture_output=True,
                       env={**os.environ, "TRTEXEC": _fake_trtexec(tmp_path, "101000")})
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "teacher.engine").is_file() and not (tmp_path / "model.engine").exists()


def test_build_script_refuses_a_name_it_cannot_quote(decoders):
    from edgekd.errors import StageError
    from edgekd.lm.jetson import render_build_script

    models = {"model": {"layers": 1, "kv_heads": 1, "head_dim": 2, "fp32_layers": ["it's"],
                        "shapes": lm.profile_shapes(1, 1, 2, 2, 4, 1)}}
    with pytest.raises(StageError, match="cannot quote"):
        render_build_script(load_profile("jetson"), models, {"max_input": 2})


def test_runner_scripts_compile_for_the_boards_python():
    for path in (BUNDLE_DIR / "trt_lm_runner.py", BUNDLE_DIR / "trt_lm_decode.py", *LOOPS):
        py_compile.compile(str(path), doraise=True)
        ast.parse(path.read_text(), feature_version=(3, 8))  # JetPack 5 ships Python 3.8
        assert "strict=" not in path.read_text()  # zip(strict=) is Python 3.10+


def test_runner_run_as_a_script_in_a_bundle_without_tensorrt_exits_3(tmp_path):
    for name in SCRIPTS:
        shutil.copyfile(BUNDLE_DIR / name, tmp_path / name)
    for loop in LOOPS:
        shutil.copyfile(loop, tmp_path / loop.name)
    np.savez(tmp_path / "prompts.npz", prompts=np.zeros((2, 4), np.int64))
    env = {**os.environ, "PYTHONPATH": ""}
    code = "import sys; sys.modules['tensorrt'] = None; sys.argv[0] = 'trt_lm_runner.py'; " \
           "import runpy; runpy.run_path('trt_lm_runner.py', run_name='__main__')"
    r = subprocess.run([sys.executable, "-c", code, "bench"], cwd=tmp_path, text=True, capture_output=True, env=env)
    assert r.returncode == 3, r.stderr
    assert "tensorrt does not import" in r.stderr and "Traceback" not in r.stderr


def test_runner_arguments_default_to_the_bundle(monkeypatch, tmp_path):
    monkeypatch.setattr(trt_lm_runner, "HERE", str(tmp_path))
    (tmp_path / "bundle.json").write_text('{"max_new_tokens": 12, "draft_tokens": 5, "prompts": "p.npz", '
                                          '"models": {"model": {"engine": "m.engine"}}}')
    args = trt_lm_runner.parse_args(["bench"])
    assert (args.max_new_tokens, args.draft_tokens) == (12, 5)
    assert args.engine == str(tmp_path / "m.engine") and args.prompts == str(tmp_path / "p.npz")
    with pytest.raises(SystemExit):
        trt_lm_runner.parse_args(["bench", "--max-new-tokens", "1"])
