#!/usr/bin/env python3
"""Greedy and speculative decoding with this bundle's TensorRT LM engines, on the Jetson (TensorRT 8.5 to 11).

    python3 trt_lm_runner.py bench [--engine model.engine] [--draft DRAFT.engine] [--prompts prompts.npz]
                                   [--eval-data eval.npz] [--max-new-tokens N] [--draft-tokens K]
                                   [--min-confidence C] [--lookup 0|1] [--json OUT]

Defaults come from bundle.json beside this file. The engine runs the exported KV-cache decoder (inputs
input_ids and past_key_i/past_value_i, outputs logits and present_*) under one optimization profile:
prefill passes the prompt with an empty past, each decode step one token with the cache it got back. Every
layer's cache lives in two device buffers used in turn (the present written into one is the next step's
past read from it), so nothing is copied between steps; cutting the cache back (speculative decoding,
after a rejected draft) is one strided device copy per buffer. `bench` times prefill and each decode step
(host wall clock, synchronized) on the bundle's prompts and prints one JSON object: prefill and decode
tokens/s, time to first token, time per output token (p50/p90), with --eval-data the perplexity and
next-token accuracy of the engine, with --draft speculative greedy decoding (the draft proposes, this
engine verifies; the output is this engine's own greedy output) with its acceptance rate and speedup,
with --lookup 1 context lookup beside the draft, and the draft alone and lookup alone timed in the same
rounds. The decoding itself is trt_lm_decode.py and lm_generation.py (numpy only). Needs tensorrt, numpy and cuda-python or torch
(trt_device.py); exit 2: bad input, exit 3: runtime failure.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

try:  # imported as edgekd.backends.tensorrt_bundle.trt_lm_runner
    from .trt_device import DeviceError, cuda_memory
    from .trt_lm_decode import greedy_timed, quality, speculative_bench, speculative_greedy, speed_figures
    from .trt_runner import (
        EXIT_BAD_INPUT,
        EXIT_RUNTIME,
        RunnerError,
        _first_line,
        _import_tensorrt,
        _write,
        environment,
        versions,
    )
except ImportError:  # run as a script in the bundle
    from trt_device import DeviceError, cuda_memory  # type: ignore[no-redef]
    from trt_lm_decode import (  # type: ignore[no-redef]
        greedy_timed,
        quality,
        speculative_bench,
        speculative_greedy,
        speed_figures,
    )
    from trt_runner import (  # type: ignore[no-redef]
        EXIT_BAD_INPUT,
        EXIT_RUNTIME,
        RunnerError,
        _first_line,
        _import_tensorrt,
        _write,
        environment,
        versions,
    )

HERE = os.path.dirname(os.path.abspath(__file__))
TIMING = "host wall clock around each engine call, synchronized: prefill (first token) and every decode step"


# ---------------------------------------------------------------- engine

def copy_rows(cuda, dst: int, src: int, rows: int, width: int, src_pitch: int, staging: np.ndarray) -> None:
    """Copy the first `width` bytes of each of `rows` rows `src_pitch` bytes apart into a packed `dst`: one
    strided device copy with cuda-python, else through the host (torch.cuda)."""
    rt = getattr(cuda, "rt", None)
    if rt is not None:
        err = rt.cudaMemcpy2DAsync(dst, width, src, src_pitch, width, rows,
                                   rt.cudaMemcpyKind.cudaMemcpyDeviceToDevice, cuda.stream)[0]
        if err != rt.cudaError_t.cudaSuccess:
            raise DeviceError(f"CUDA runtime error {err} in cudaMemcpy2DAsync")
        return
    buf = staging[:rows * src_pitch]
    cuda.to_host(buf, src)
    cuda.synchronize()
    cuda.to_device(dst, np.ascontiguousarray(buf.reshape(rows, src_pitch)[:, :width]))
    cuda.synchronize()


class EngineDecoder:
    """A KV-cache decoder engine with its buffers: forward(ids) -> logits (n, vocab), trim(length), reset()."""

    def __init__(self, trt, engine, cuda):
        self.trt, self.engine, self.cuda = trt, engine, cuda
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        inputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.past = [n for n in inputs if n.startswith("past_")]
        self.present = ["present_" + n[len("past_"):] for n in self.past]
        missing = [n for n in ["input_ids", "logits", *self.present] if n not in names]
        if missing or not self.past or len(inputs) != len(self.past) + 1:
            raise RunnerError(f"engine tensors {names[:6]}... are not a KV-cache decoder's (missing {missing[:3]})",
                              EXIT_BAD_INPUT)
        ids_max = list(engine.get_tensor_profile_shape("input_ids", 0)[2])
        past_max = list(engine.get_tensor_profile_shape(self.past[0], 0)[2])
        self.kv_heads, self.head_dim = int(past_max[1]), int(past_max[3])
        self.max_input, self.max_past = int(ids_max[1]), int(past_max[2])
        logits = engine.get_tensor_shape("logits")
        self.vocab = int(logits[len(logits) - 1])
        dtype = {n: np.dtype(trt.nptype(engine.get_tensor_dtype(n))) for n in names}
        self.item = dtype[self.past[0]].itemsize
        if any(dtype[p] != dtype["present_" + p[len("past_"):]] for p in self.past):
            raise RunnerError("the engine's past and present tensors differ in type", EXIT_BAD_INPUT)
        pinned = getattr(cuda, "host_empty", None)
        empty = pinned or (lambda shape, dt: np.empty(shape, dt))
        self.host_ids = empty((self.max_input,), dtype["input_ids"])
        self.host_logits = empty((self.max_input, self.vocab), dtype["logits"])
        self.row = self.kv_heads * self.head_dim * self.item  # bytes of one token's keys (or values), batch 1
        cache_bytes = self.row * (self.max_past + self.max_input)
        self.buffers = {"input_ids": cuda.alloc(self.host_ids.nbytes), "logits": cuda.alloc(self.host_logits.nbytes)}
        self.cache = [(cuda.alloc(cache_bytes), cuda.alloc(cache_bytes)) for _ in self.past]
        self.staging = np.empty(cache_bytes, np.uint8)
        self.buffer_bytes = self.host_ids.nbytes + self.host_logits.nbytes + 2 * cache_bytes * len(self.past)
        self.context = engine.create_execution_context()
        for name in ("input_ids", "logits"):
            self.context.set_tensor_address(name, self.buffers[name])
        self.cur, self.length = 0, 0

    @classmethod
    def load(cls, trt, engine_path: str, cuda) -> EngineDecoder:
        """Deserialize the engine at `engine_path` (built on this device by build_engine.sh)."""
        if not os.path.isfile(engine_path):
            raise RunnerError(f"engine {engine_path} does not exist: build it first (./build_engine.sh)", EXIT_BAD_INPUT)
        with open(engine_path, "rb") as f:
            engine = trt.Runtime(trt.Logger(trt.Logger.WARNING)).deserialize_cuda_engine(f.read())
        if engine is None:
            raise RunnerError(f"cannot deserialize {engine_path}: engines only load with the TensorRT version and GPU "
                              "they were built with; rebuild it on this device")
        return cls(trt, engine, cuda)

    def reset(self) -> None:
        """Start a new sequence: the cache is empty (its buffers are reused)."""
        self.length = 0

    def forward(self, ids: list) -> np.ndarray:
        """Logits for `ids` after the cached tokens (a view, valid until the next call); the cache grows by them."""
        n, past = len(ids), self.length
        if not 1 <= n <= self.max_input or past > self.max_past:
            raise RunnerError(f"{n} tokens after {past} cached are outside the engine's profile (at most "
                              f"{self.max_input} at once, {self.max_past} cached): rebuild with larger shapes",
                              EXIT_BAD_INPUT)
        ctx = self.context
        self.host_ids[:n] = ids
        ctx.set_input_shape("input_ids", (1, n))
        for i, name in enumerate(self.past):  # ping-pong: read one buffer, write the other
            ctx.set_input_shape(name, (1, self.kv_heads, past, self.head_dim))
            ctx.set_tensor_address(name, self.cache[i][self.cur])
            ctx.set_tensor_address(self.present[i], self.cache[i][1 - self.cur])
        self.cuda.to_device(self.buffers["input_ids"], self.host_ids[:n])
        if not ctx.execute_async_v3(self.cuda.handle):
            raise RunnerError("TensorRT execute_async_v3 failed")
        self.cuda.to_host(self.host_logits[:n], self.buffers["logits"])
        self.cuda.synchronize()
        self.cur, self.length = 1 - self.cur, past + n
        return self.host_logits[:n]

    def trim(self, length: int) -> None:
        """Keep the first `length` cached tokens: each layer's (1, kv_heads, cached, head_dim) buffer is packed
        into the other buffer of its pair, unless the first rows already are the cut (one KV head)."""
        if length >= self.length:
            return
        if self.kv_heads > 1 and length > 0:
            width, pitch = length * self.head_dim * self.item, self.length * self.head_dim * self.item
            for a, b in self.cache:
                src, dst = (a, b) if self.cur == 0 else (b, a)
                copy_rows(self.cuda, dst, src, self.kv_heads, width, pitch, self.staging)
            self.cur = 1 - self.cur
        self.length = length

    def memory(self) -> dict:
        """Device memory of the engine's activations (TensorRT's own figure) and of this decoder's buffers."""
        size = getattr(self.engine, "device_memory_size_v2", None) or getattr(self.engine, "device_memory_size", None)
        return {"activation_mb": round(size / 2**20, 2) if size else None,
                "buffers_mb": round(self.buffer_bytes / 2**20, 2)}

    def close(self) -> None:
        """Free the device buffers."""
        for ptr in [*self.buffers.values(), *(p for pair in self.cache for p in pair)]:
            self.cuda.free(ptr)
        self.buffers, self.cache = {}, []


# ---------------------------------------------------------------- commands

def _npz(path: str, key: str) -> np.ndarray:
    try:
        with np.load(path, allow_pickle=False) as z:
            return np.asarray(z[key], dtype=np.int64)
    except (OSError, KeyError, ValueError) as e:
        raise RunnerError(f"{path}: {_first_line(e)} (expected an .npz with {key!r})", EXIT_BAD_INPUT) from None


def bench(engine: str, draft: str | None, prompts_path: str, eval_data: str | None, new_tokens: int,
          draft_tokens: int, min_confidence: float = 0.0, lookup: bool = False) -> dict:
    """The engine's speed on the prompts, its quality on eval data and (with a draft) speculative decoding."""
    trt, cuda = _import_tensorrt(), cuda_memory()
    t0 = time.perf_counter()
    target = EngineDecoder.load(trt, engine, cuda)
    prompts = [[int(t) for t in p] for p in _npz(prompts_path, "prompts")]
    if not prompts:
        raise RunnerError(f"{prompts_path} holds no prompt", EXIT_BAD_INPUT)
    greedy_timed(target, prompts[0], min(new_tokens, 4))  # warm-up: first calls allocate and plan
    cold_ms = (time.perf_counter() - t0) * 1e3
    out: dict = {"engine": os.path.basename(engine), "backend": "tensorrt", "timing": TIMING,
                 "prompts": len(prompts), "prompt_tokens": len(prompts[0]), "cold_start_ms": round(cold_ms, 2),
                 **speed_figures([greedy_timed(target, p, new_tokens) for p in prompts])}
    if eval_data:
        out.update(quality(target, _npz(eval_data, "x")))
    else:
        out.setdefault("not_measured", {})["perplexity"] = "no --eval-data given"
    out["memory"] = {"engine_mb": round(os.path.getsize(engine) / 2**20, 2), **target.memory()}
    if draft:
        d = EngineDecoder.load(trt, draft, cuda)
        speculative_greedy(target, d, prompts[0], min(new_tokens, 4), draft_tokens, min_confidence, lookup)  # warm-up
        out["speculative"] = {"draft": os.path.basename(draft),
                              **speculative_bench(target, d, prompts, new_tokens, draft_tokens, min_confidence, lookup)}
        d.close()
    try:
        import resource

        out["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    except ImportError:
        out["peak_rss_mb"] = None
    out["environment"], out["versions"] = environment(), versions(trt, cuda)
    target.close()
    return out


def parse_args(argv: list | None = None) -> argparse.Namespace:
    """The command line (see the module docstring); defaults from bundle.json."""
    try:
        with open(os.path.join(HERE, "bundle.json")) as f:
            d = json.load(f)
    except (OSError, ValueError):
        d = {}
    here = lambda name: os.path.join(HERE, name)  # noqa: E731
    p = argparse.ArgumentParser(prog="trt_lm_runner.py", description="Time a TensorRT LM engine on this device.")
    sub = p.add_subparsers(dest="command", required=True)
    b = sub.add_parser("bench", help="prefill/decode speed, quality and speculative decoding; prints JSON")
    b.add_argument("--engine", default=here(d.get("models", {}).get("model", {}).get("engine", "model.engine")))
    b.add_argument("--draft", help="a draft engine (e.g. model.engine with --engine teacher.engine)")
    b.add_argument("--prompts", default=here(d.get("prompts", "prompts.npz")), help=".npz with prompts (n, tokens)")
    b.add_argument("--eval-data", help=".npz with x (blocks of token ids): perplexity and next-token accuracy")
    b.add_argument("--max-new-tokens", type=int, default=d.get("max_new_tokens", 32))
    b.add_argument("--draft-tokens", type=int, default=d.get("draft_tokens", 4), help="the most a round drafts")
    b.add_argument("--min-confidence", type=float, default=d.get("min_confidence", 0.0),
                   help="the draft stops where its probability for its next token is under this (0: never)")
    b.add_argument("--lookup", type=int, choices=(0, 1), default=int(bool(d.get("lookup", False))),
                   help="1: a round whose last tokens occurred earlier proposes what followed them there instead "
                        "of drafting (the draft alone and lookup alone are then timed beside it)")
    b.add_argument("--json", help="also write the JSON object to this file")
    args = p.parse_args(argv)
    if args.max_new_tokens < 2 or args.draft_tokens < 1 or not 0.0 <= args.min_confidence < 1.0:
        p.error("--max-new-tokens must be >= 2, --draft-tokens >= 1 and --min-confidence in [0, 1)")
    return args


def main(argv: list | None = None) -> int:
    """Run one command; JSON on stdout, or one line on stderr and exit 2 or 3."""
    args = parse_args(argv)
    try:
        result = bench(args.engine, args.draft, args.prompts, args.eval_data, args.max_new_tokens, args.draft_tokens,
                       args.min_confidence, bool(args.lookup))
        text = json.dumps(result, allow_nan=False)
        if args.json:
            _write(args.json, (text + "\n").encode())
    except RunnerError as e:
        print(f"trt_lm_runner: {e}", file=sys.stderr)
        return e.exit_code
    except DeviceError as e:
        print(f"trt_lm_runner: {e}", file=sys.stderr)
        return EXIT_RUNTIME
    except (OSError, ValueError, MemoryError) as e:
        print(f"trt_lm_runner: {type(e).__name__}: {_first_line(e)}", file=sys.stderr)
        return EXIT_RUNTIME
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
