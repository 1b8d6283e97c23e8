#!/usr/bin/env python3
"""edgekd's standalone LM runner, copied to a board: needs only numpy and the board's runtime.

    python lm_runner.py --model PATH [--backend onnxruntime|openvino] [--threads N] [--providers A,B]
                        [--device CPU] [--precision fp32|int8|int4] [--precise-int8] [--kv-heads H --head-dim D]
                        [--kv-cache auto|copy]
                        --prompts prompts.npz [--prompt-count K] --new-tokens N [--warmup N]
                        [--eval-data eval.npz [--eval-blocks M]] [--keep-times] [--json OUT]
                        [--draft PATH [--draft-precision P] [--draft-kv-heads H --draft-head-dim D]
                         [--draft-tokens K[,K...]] [--min-confidence C[,C...]] [--lookup 0|1[,...]]
                         [--compare K:C:L[,K:C:L...]]]

Loads one KV-cache decoder (the ONNX that edgekd.lm.export writes, or its OpenVINO IR), decodes every prompt
greedily for N new tokens after a warm-up (no early stop, so every run does the same work) and prints one JSON
object: prefill and decode tokens/s, time to first token, time per output token (p50/p90/p99), the peak resident
memory of this process and the generated tokens; with --eval-data, perplexity and next-token picks on the
blocks. With --draft, speculative decoding instead: --model verifies what the draft proposes, timed against
--model alone on every prompt (one draft length, floor and lookup), or the fastest setting of the lists given;
--compare times other settings in the same rounds (draft length 0 with lookup 1: context lookup alone). With
ONNX Runtime the two sessions share one pool of threads, as they take turns on the cores, and a graph that
takes kv_length (edgekd's fused export) keeps its cache in place (InPlaceKV), and OpenVINO keeps it in the infer
request's states (StatefulKV); --kv-cache copy: a new cache each step.
Exit 2: a bad model or bad data; exit 3: the runtime is missing or failed. The decode loops and their
figures are lm_generation.py's, which travels beside this file and which edgekd.bench.lm_bench imports too,
so a board and the host measure with the same code.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

try:
    import numpy as np
except ImportError as missing:  # a board without numpy: one line and exit 3, like a missing runtime
    if __name__ != "__main__":
        raise
    print(f"runner: numpy is not installed for {sys.executable} ({missing})", file=sys.stderr)
    sys.exit(3)

if __package__:  # imported as edgekd.bench.lm_runner: one runner module, one RunnerError
    from .lm_figures import choose_speculation, figures, generate, score, speculative_bench
    from .lm_generation import trim
    from .runner import EXIT_BAD_INPUT, EXIT_RUNTIME, RunnerError, _first_line, peak_rss_mb
else:  # a script on a board: runner.py, lm_generation.py and lm_figures.py travel beside this file
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from lm_figures import choose_speculation, figures, generate, score, speculative_bench  # type: ignore[no-redef]
    from lm_generation import trim  # type: ignore[no-redef]
    from runner import EXIT_BAD_INPUT, EXIT_RUNTIME, RunnerError, _first_line, peak_rss_mb  # type: ignore[no-redef]

LM_RUNNER_VERSION = 1
MEMORY_SCOPE = "peak resident memory of its own runner process: Python, the runtime, the decoder, generation at batch 1"


# ---------------------------------------------------------------- loading a decoder

class KVDecoder:
    """A decoder through `run(feeds) -> [logits, present_key_0, present_value_0, ...]`."""

    def __init__(self, run, layers: int, kv_heads: int, head_dim: int):
        self.run, self.kv_heads, self.head_dim = run, kv_heads, head_dim
        self.past = [f"past_{kind}_{i}" for i in range(layers) for kind in ("key", "value")]

    def empty_cache(self, batch: int = 1) -> list:
        return [np.zeros((batch, self.kv_heads, 0, self.head_dim), dtype=np.float32) for _ in self.past]

    def forward(self, ids, cache):
        feeds = {"input_ids": np.ascontiguousarray(ids, dtype=np.int64)}
        feeds.update({name: cache[i] for i, name in enumerate(self.past)})  # no zip(strict=): Python 3.8 boards
        out = self.run(feeds)
        return np.asarray(out[0]), [np.asarray(o) for o in out[1:]]


KV_LENGTH = "kv_length"  # the fused graph's (edgekd.lm.export) count of cached positions, -1: all of them
POSITIONS_KEY = "edgekd.max_positions"  # a decoder's metadata (edgekd.lm.export): the positions the model takes


class CountedKV(KVDecoder):
    """A decoder that keeps its cache itself (InPlaceKV, StatefulKV): the cache the decode loops pass around
    is the number of cached tokens for one sequence; batches over one take KVDecoder's copying path."""

    def empty_cache(self, batch: int = 1):
        return 0 if batch == 1 else super().empty_cache(batch)

    def cut(self, cache, length: int):
        """The cache cut back to its first `length` tokens (lm_generation's speculative loop calls this)."""
        return min(cache, length) if isinstance(cache, int) else trim(cache, length)


class InPlaceKV(CountedKV):
    """An ONNX Runtime decoder whose graph takes kv_length (edgekd's fused export): each layer's cache is one
    buffer bound as both its past and its present, so GroupQueryAttention writes each step's keys and values
    into it in place and nothing is copied between steps (as ONNX Runtime GenAI's generator does). The cache
    the decode loops pass around is then the number of cached tokens, and cutting it back (speculative
    decoding) is a smaller number. One generation at a time per decoder; batches over one (scoring) take the
    copying path. The buffers start at `capacity` positions and double when a generation outgrows them."""

    def __init__(self, sess, layers: int, kv_heads: int, head_dim: int, capacity: int = 256):
        super().__init__(lambda feeds: sess.run(None, feeds), layers, kv_heads, head_dim)
        import onnxruntime as ort

        self.ort, self.sess, self.capacity = ort, sess, 0
        self.present = [f"present_{kind}_{i}" for i in range(layers) for kind in ("key", "value")]
        self.buffers: list = []
        self.binding = None
        self.fed: list = []  # the step's input values, alive until the next run
        vocab = sess.get_outputs()[0].shape[-1]
        self.vocab = vocab if isinstance(vocab, int) and vocab > 0 else None  # None: no reused logits
        self.slots: dict = {}  # passes of n tokens: their input and logits buffers (_slot)
        self.bound = None  # the length whose slot the binding holds
        self._grow(capacity, 0)

    def _grow(self, need: int, keep: int) -> None:
        """Buffers for at least `need` positions, the first `keep` copied from the old ones."""
        size = max(need, 2 * self.capacity)
        shape = (1, self.kv_heads, size, self.head_dim)
        old, self.buffers = self.buffers, [np.zeros(shape, dtype=np.float32) for _ in self.past]
        for i, prev in enumerate(old):  # no zip(strict=): Python 3.8 boards
            self.buffers[i][:, :, :keep] = prev[:, :, :keep]
        io = self.sess.io_binding()
        io.bind_output("logits")  # first: the logits are output 0 of every run
        for i, buf in enumerate(self.buffers):
            value = self.ort.OrtValue.ortvalue_from_numpy(buf)  # the numpy buffer's memory, not a copy
            io.bind_ortvalue_input(self.past[i], value)
            io.bind_ortvalue_output(self.present[i], value)
        self.binding, self.capacity, self.bound = io, size, None

    def forward(self, ids, cache):
        """Logits for `ids` after `cache` tokens and the new length. The logits of a pass of up to REUSED
        tokens are this decoder's own buffer for that length, overwritten by its next pass of the same length
        (the decode loops read them first): no output is allocated and nothing is copied on a decode step."""
        if not isinstance(cache, int):
            return super().forward(ids, cache)
        ids = np.asarray(ids)
        if ids.ndim != 2 or ids.shape[0] != 1:
            raise ValueError(f"the in-place cache takes one sequence, got ids of shape {ids.shape}")
        n = ids.shape[1]
        total = cache + n
        if total > self.capacity:
            self._grow(total, cache)
        io = self.binding
        if n > self.REUSED or self.vocab is None:  # a long prefill: a fresh logits tensor, as long as the prompt
            self.bound = None
            io.bind_output("logits")
            self.fed = [self.ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(ids, dtype=np.int64)),
                        self.ort.OrtValue.ortvalue_from_numpy(np.array([cache], dtype=np.int64))]
            io.bind_ortvalue_input("input_ids", self.fed[0])
            io.bind_ortvalue_input(KV_LENGTH, self.fed[1])
            self.sess.run_with_iobinding(io)
            return io.get_outputs()[0].numpy(), total
        slot = self.slots.get(n)
        if slot is None:
            slot = self.slots[n] = self._slot(n)
        fed, length, logits, values = slot
        fed[0] = ids[0]
        length[0] = cache
        if self.bound != n:  # the inputs and logits of this length, bound once until another length runs
            io.bind_ortvalue_input("input_ids", values[0])
            io.bind_ortvalue_input(KV_LENGTH, values[1])
            io.bind_ortvalue_output("logits", values[2])
            self.bound = n
        self.sess.run_with_iobinding(io)
        return logits, total

    REUSED = 16  # passes of up to this many tokens (decode steps, speculative checks) reuse their buffers

    def _slot(self, n: int) -> tuple:
        """Input ids, kv_length and logits arrays for passes of `n` tokens, and their OrtValues (the arrays'
        own memory: writing an array changes what the next run reads)."""
        fed, length = np.zeros((1, n), dtype=np.int64), np.zeros(1, dtype=np.int64)
        logits = np.zeros((1, n, self.vocab), dtype=np.float32)
        return fed, length, logits, [self.ort.OrtValue.ortvalue_from_numpy(a) for a in (fed, length, logits)]


class StatefulKV(CountedKV):
    """An OpenVINO decoder whose KV cache lives in its infer request's states: the IR made stateful with
    OpenVINO's MakeStateful transformation (each past_* input becomes a state its present_* output writes),
    as OpenVINO GenAI decodes, so no cache travels in or out between steps. The cache the decode loops pass
    around is the number of cached tokens; cutting it back (speculative decoding) keeps the states' first
    tokens, a copy made only then. One generation at a time; batches over one (scoring) run the plain graph
    through `run`."""

    def __init__(self, request, logits, run, layers: int, kv_heads: int, head_dim: int):
        super().__init__(run, layers, kv_heads, head_dim)
        import openvino as ov

        self.ov, self.request, self.logits, self.length = ov, request, logits, 0

    def _set(self, length: int) -> None:
        """The states cut to their first `length` tokens (0: empty, for a new generation)."""
        for state in self.request.query_state():
            if length == 0:
                data = np.zeros((1, self.kv_heads, 0, self.head_dim), dtype=np.float32)
            else:
                data = np.ascontiguousarray(state.state.data[:, :, :length])
            state.state = self.ov.Tensor(data)
        self.length = length

    def forward(self, ids, cache):
        if not isinstance(cache, int):
            return super().forward(ids, cache)
        ids = np.ascontiguousarray(ids, dtype=np.int64)
        if ids.ndim != 2 or ids.shape[0] != 1:
            raise ValueError(f"the stateful cache takes one sequence, got ids of shape {ids.shape}")
        if cache == 0 or cache < self.length:
            self._set(cache)
        elif cache > self.length:
            raise ValueError(f"the states hold {self.length} tokens, not {cache}")
        logits = self.request.infer({"input_ids": ids})[self.logits]  # a copy of the request's output
        self.length = cache + ids.shape[1]
        return logits, self.length  # a cut (CountedKV.cut) reaches the states at the next forward


def _state_pairs(model) -> dict | None:
    """{past_*: present_*} of an OpenVINO model whose every past input has its present output (edgekd's
    export), for the MakeStateful transformation; None where one is missing or the runtime lacks it."""
    try:
        from openvino._offline_transformations import apply_make_stateful_transformation  # noqa: F401
    except ImportError:
        return None
    inputs = {n for p in model.inputs for n in p.get_names()}
    outputs = {n for p in model.outputs for n in p.get_names()}
    pairs = {n: "present_" + n[len("past_"):] for n in inputs if n.startswith("past_")}
    return pairs if pairs and "logits" in outputs and set(pairs.values()) <= outputs else None


def in_place(sess) -> bool:
    """Whether an ONNX Runtime session's graph takes kv_length (an overridable initializer)."""
    try:
        return KV_LENGTH in {i.name for i in sess.get_overridable_initializers()}
    except Exception:  # noqa: BLE001 - an older runtime without the call
        return False


def kv_layout(shapes: dict) -> tuple | None:
    """(layers, kv heads, head size) of a KV-cache decoder from its inputs' shapes ({name: dims}), the sizes None
    where they are not static; None for a model that is not one (inputs input_ids, past_key_i, past_value_i)."""
    layers = sum(1 for n in shapes if n.startswith("past_key_"))
    if "input_ids" not in shapes or layers == 0 or layers * 2 != sum(1 for n in shapes if n.startswith("past_")):
        return None
    dims = list(shapes.get("past_key_0") or [])

    def size(i: int):
        return dims[i] if len(dims) == 4 and isinstance(dims[i], int) and dims[i] > 0 else None

    return layers, size(1), size(3)


def _kv_dims(shapes: dict, args) -> tuple:
    """(layers, kv heads, head size) from the past_key_* inputs' shapes, or the arguments given."""
    layout = kv_layout(shapes)
    if layout is None:
        raise RunnerError(f"{args.model} is not a KV-cache decoder (inputs input_ids, past_key_i, past_value_i; got "
                          f"{', '.join(list(shapes)[:6])})", EXIT_BAD_INPUT)
    layers, heads, size = layout[0], args.kv_heads or layout[1], args.head_dim or layout[2]
    if not heads or not size:
        raise RunnerError(f"{args.model}: the KV heads and head size are not static in the model; pass "
                          "--kv-heads and --head-dim", EXIT_BAD_INPUT)
    return layers, int(heads), int(size)


_POOL: dict = {"allowed": False, "threads": None}  # main() allows it: a process-wide pool would refuse any later
# per-session pool in a program that imports this module; "threads" once made


def _shared_pool(rt, threads: int) -> bool:
    """Whether this process's ONNX Runtime sessions can share one pool of `threads` intra-op threads
    (set before the first session; runtimes without global pools say no)."""
    if _POOL["threads"] is None:
        if not _POOL["allowed"] or not hasattr(rt, "set_global_thread_pool_sizes"):
            return False
        try:
            rt.set_global_thread_pool_sizes(threads, 1)
        except Exception:  # noqa: BLE001 - already set up by an earlier session
            return False
        _POOL["threads"] = threads
    return _POOL["threads"] == threads


def load(args) -> tuple:
    """(decoder, details, versions) for --model on --backend, with --threads."""
    if not os.path.isfile(args.model):
        raise RunnerError(f"model {args.model} does not exist", EXIT_BAD_INPUT)
    try:
        if args.backend == "openvino":
            import openvino as rt
        else:
            import onnxruntime as rt
    except ImportError as e:
        raise RunnerError(f"{args.backend} is not installed for {sys.executable} ({_first_line(e)})") from None
    if args.backend == "openvino":
        core = rt.Core()
        try:
            model = core.read_model(args.model)
        except Exception as e:  # noqa: BLE001 - OpenVINO raises RuntimeError subclasses
            raise RunnerError(f"openvino cannot read {args.model}: {_first_line(e)}", EXIT_BAD_INPUT) from None
        shapes = {p.get_any_name(): [d.get_length() if d.is_static else None for d in p.get_partial_shape()]
                  for p in model.inputs}
        dims = _kv_dims(shapes, args)
        try:
            supported = set(core.get_property(args.device.split(":")[0], "SUPPORTED_PROPERTIES"))
        except Exception:  # noqa: BLE001 - virtual devices may not answer
            supported = set()
        config: dict = {"PERFORMANCE_HINT": "LATENCY"}  # what edgekd.backends.openvino.compile_config sets
        if args.threads and (not supported or "INFERENCE_NUM_THREADS" in supported):
            config["INFERENCE_NUM_THREADS"] = int(args.threads)
        if args.precision in ("fp32", "int8", "int4") and "INFERENCE_PRECISION_HINT" in supported:
            config["INFERENCE_PRECISION_HINT"] = "f32"

        def compiled_for(graph):
            try:
                return core.compile_model(graph, args.device, config)
            except Exception as e:  # noqa: BLE001
                raise RunnerError(f"openvino cannot compile {args.model} for {args.device}: {_first_line(e)}") from None

        pairs = _state_pairs(model) if getattr(args, "kv_cache", "auto") != "copy" else None
        plain: dict = {}  # with states, the plain graph is compiled only when a batch over one is scored

        def open_plain() -> None:
            plain["compiled"] = compiled_for(model)
            plain["request"] = plain["compiled"].create_infer_request()

        def run(feeds):
            if "request" not in plain:
                open_plain()
            res = plain["request"].infer(feeds)
            return [np.array(res[o], copy=True) for o in plain["compiled"].outputs]

        details = {"device": args.device, "threads": args.threads, "config": {k: str(v) for k, v in config.items()},
                   "kv_cache": "in place" if pairs else "copied each step"}
        if not pairs:
            open_plain()
            return KVDecoder(run, *dims), details, {"openvino": rt.__version__}
        from openvino._offline_transformations import apply_make_stateful_transformation

        stateful = core.read_model(args.model)
        apply_make_stateful_transformation(stateful, pairs)
        if "KV_CACHE_PRECISION" in supported:  # the CPU plugin would keep a stateful cache in u8 (or bf16): a
            config["KV_CACHE_PRECISION"] = "f32"  # lossy copy of the keys and values; the copying path keeps f32
            details["config"]["KV_CACHE_PRECISION"] = "f32"
        compiled = compiled_for(stateful)
        return (StatefulKV(compiled.create_infer_request(), compiled.output("logits"), run, *dims), details,
                {"openvino": rt.__version__})
    so = rt.SessionOptions()  # what edgekd.backends.onnxruntime.session_options sets
    so.intra_op_num_threads = args.threads or (os.cpu_count() or 1)
    so.inter_op_num_threads = 1
    so.execution_mode = rt.ExecutionMode.ORT_SEQUENTIAL
    so.log_severity_level = 3
    so.graph_optimization_level = rt.GraphOptimizationLevel.ORT_ENABLE_ALL
    if args.precise_int8:
        so.add_session_config_entry("session.x64quantprecision", "1")
    available = rt.get_available_providers()
    wanted = [p for p in (args.providers.split(",") if args.providers else []) if p in available]
    providers: list = [p for p in wanted if p != "CPUExecutionProvider"] + ["CPUExecutionProvider"]
    pool = "own"
    if getattr(args, "draft", None):  # two sessions taking turns on the cores
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        if ("XnnpackExecutionProvider" not in providers and so.intra_op_num_threads <= cores  # spinning threads
                and _shared_pool(rt, so.intra_op_num_threads)):  # beyond the cores would fight over them
            so.use_per_session_threads = False  # one spinning pool serves both, none idles holding a core
            so.intra_op_num_threads = so.inter_op_num_threads = 0  # the pool's sizes (set here, ONNX Runtime warns)
            pool = "shared"
        else:  # separate pools: an idle spinning one would hold the cores
            so.add_session_config_entry("session.intra_op.allow_spinning", "0")
            pool = "own, not spinning"
    if "XnnpackExecutionProvider" in providers:  # its own pool does the work, the session's stays at 1
        so.intra_op_num_threads = 1
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        providers[providers.index("XnnpackExecutionProvider")] = (
            "XnnpackExecutionProvider", {"intra_op_num_threads": str(args.threads or os.cpu_count() or 1)})
    try:
        sess = rt.InferenceSession(args.model, so, providers=providers)
    except Exception as e:  # noqa: BLE001 - onnxruntime raises its own exception types
        raise RunnerError(f"onnxruntime cannot load {args.model}: {_first_line(e)}", EXIT_BAD_INPUT) from None
    dims = _kv_dims({i.name: i.shape for i in sess.get_inputs()}, args)
    shared = getattr(args, "kv_cache", "auto") != "copy" and in_place(sess)
    details = {"execution_providers": sess.get_providers(), "threads": args.threads, "thread_pool": pool,
               "kv_cache": "in place" if shared else "copied each step"}
    decoder = InPlaceKV(sess, *dims) if shared else KVDecoder(lambda feeds: sess.run(None, feeds), *dims)
    return decoder, details, {"onnxruntime": rt.__version__}


# ---------------------------------------------------------------- data, environment, main

def _array(path: str, key: str, rows: int | None) -> np.ndarray:
    try:
        with np.load(path) as z:
            a = np.asarray(z[key], dtype=np.int64)
    except Exception as e:  # noqa: BLE001 - a missing file, a missing key, a corrupt archive
        raise RunnerError(f"{path}: cannot read array {key!r} ({_first_line(e)})", EXIT_BAD_INPUT) from None
    if a.ndim != 2 or not a.size:
        raise RunnerError(f"{path}: {key} must be (n, tokens) token ids, got shape {a.shape}", EXIT_BAD_INPUT)
    return a[:rows] if rows else a


def environment() -> dict:
    try:
        usable = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        usable = os.cpu_count() or 1
    return {"hostname": platform.node(), "os": platform.platform(), "machine": platform.machine(),
            "python": platform.python_version(), "cpu_count": os.cpu_count(), "usable_cores": usable}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="lm_runner.py", description="Greedy generation speed of one KV-cache decoder")
    p.add_argument("--model", required=True)
    p.add_argument("--backend", choices=["onnxruntime", "openvino"], default="onnxruntime")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--providers", default=None)
    p.add_argument("--device", default="CPU")
    p.add_argument("--precision", default="fp32")
    p.add_argument("--precise-int8", action="store_true")
    p.add_argument("--kv-heads", type=int, default=None)
    p.add_argument("--head-dim", type=int, default=None)
    p.add_argument("--kv-cache", choices=["auto", "copy"], default="auto",
                   help="auto: in place where the graph takes kv_length (ONNX Runtime) and in the infer request's "
                   "states (OpenVINO); copy: a new cache each step")
    p.add_argument("--prompts", required=True, help=".npz with prompts (n, tokens) int")
    p.add_argument("--prompt-count", type=int, default=None)
    p.add_argument("--new-tokens", type=int, required=True)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--eval-data", default=None, help=".npz with x (n, seq_len) token blocks")
    p.add_argument("--eval-blocks", type=int, default=None)
    p.add_argument("--keep-times", action="store_true", help="also return every run's prefill and step seconds")
    p.add_argument("--draft", default=None, help="a draft decoder: speculative decoding for --model instead")
    p.add_argument("--draft-precision", default="fp32")
    p.add_argument("--draft-kv-heads", type=int, default=None)
    p.add_argument("--draft-head-dim", type=int, default=None)
    p.add_argument("--draft-tokens", default="4", help="the most a round drafts; a comma list: the fastest is chosen")
    p.add_argument("--min-confidence", default="0", help="the draft's probability floor; a comma list as above")
    p.add_argument("--lookup", default="0", help="1: a round whose last tokens recur earlier proposes what followed "
                   "them there instead of drafting; a comma list as above")
    p.add_argument("--compare", default="", help="settings DRAFT_TOKENS:MIN_CONFIDENCE:LOOKUP timed in the same rounds")
    p.add_argument("--temperature", type=float, default=0.0, help="above 0: speculative sampling with the setting is "
                   "timed in the same rounds too, against the target's own sampling (lm_sampling.py beside this file)")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0, help="the first prompt's sampling seed (the i-th: seed + i)")
    p.add_argument("--json", default=None)
    return p.parse_args(argv)


def _grid(text: str, kind, name: str, ok) -> list:
    try:
        values = [kind(v) for v in text.split(",")]
    except ValueError:
        values = []
    if not values or not all(ok(v) for v in values):
        raise RunnerError(f"{name} {text!r} is not a comma list of valid values", EXIT_BAD_INPUT)
    return values


def _setting(text: str) -> tuple:
    """(draft_tokens, min_confidence, lookup) from K:C:L."""
    try:
        k, c, u = text.split(":")
        setting = (int(k), float(c), bool(int(u)))
    except ValueError:
        raise RunnerError(f"--compare {text!r} is not DRAFT_TOKENS:MIN_CONFIDENCE:LOOKUP", EXIT_BAD_INPUT) from None
    if setting[0] < 0 or not 0.0 <= setting[1] < 1.0 or (setting[0] == 0 and not setting[2]):
        raise RunnerError(f"--compare {text!r}: draft tokens >= 0 (0 only with lookup), confidence in [0, 1)",
                          EXIT_BAD_INPUT)
    return setting


def _sampling(args: argparse.Namespace):
    """lm_sampling.Sampling for --temperature, --top-k, --top-p and --seed (lm_sampling.py travels beside this
    file); settings it refuses are bad input."""
    if __package__:
        from .lm_sampling import Sampling, settings_error
    else:
        from lm_sampling import Sampling, settings_error  # type: ignore[import-not-found,no-redef]
    problem = settings_error(args.temperature, args.top_k, args.top_p)
    if problem:
        raise RunnerError(f"sampling: {problem}", EXIT_BAD_INPUT)
    return Sampling(args.temperature, args.top_k, args.top_p, args.seed)


def run_speculative(args: argparse.Namespace, prompts: list) -> dict:
    """--model verified, --draft drafting: one pair timed against the target alone, or the fastest of a grid."""
    lengths = _grid(args.draft_tokens, int, "--draft-tokens", lambda k: k >= 1)
    floors = _grid(args.min_confidence, float, "--min-confidence", lambda c: 0.0 <= c < 1.0)
    lookups = _grid(args.lookup, int, "--lookup", lambda u: u in (0, 1))
    compare = [_setting(t) for t in args.compare.split(",") if t]
    sampling = _sampling(args) if args.temperature else None
    if sampling is not None and len(lengths) * len(floors) * len(lookups) > 1:
        raise RunnerError("--temperature times one setting: give one --draft-tokens, --min-confidence and --lookup",
                          EXIT_BAD_INPUT)
    target, details, versions = load(args)  # both sessions sleep between calls: they take turns on the cores
    draft, draft_details, _ = load(argparse.Namespace(**{**vars(args), "model": args.draft, "precision": args.draft_precision,
                                                          "kv_heads": args.draft_kv_heads, "head_dim": args.draft_head_dim}))
    try:
        if len(lengths) * len(floors) * len(lookups) > 1:
            spec = choose_speculation(target, draft, prompts, args.new_tokens, lengths, floors,
                                      [bool(u) for u in lookups])
        else:
            spec = speculative_bench(target, draft, prompts, args.new_tokens, lengths[0], floors[0],
                                     bool(lookups[0]), compare, sampling)
    except RunnerError:
        raise
    except Exception as e:  # noqa: BLE001 - a runtime's failure mid-run
        raise RunnerError(f"{args.backend} failed in speculative decoding: {_first_line(e)}") from None
    return {"runner": "lm", "runner_version": LM_RUNNER_VERSION, "model": os.path.basename(args.model),
            "draft": os.path.basename(args.draft), "backend": args.backend, "details": details,
            "draft_details": draft_details, "versions": versions, "environment": environment(), "speculative": spec}


def run(args: argparse.Namespace) -> dict:
    if args.new_tokens < 1:
        raise RunnerError(f"--new-tokens must be at least 1, got {args.new_tokens}", EXIT_BAD_INPUT)
    prompts = _array(args.prompts, "prompts", args.prompt_count).tolist()
    if args.draft:
        return run_speculative(args, prompts)
    t0 = time.perf_counter()
    decoder, details, versions = load(args)
    load_ms = (time.perf_counter() - t0) * 1e3
    try:
        t1 = time.perf_counter()  # cold start: loading, then the first prompt's prefill (first calls plan and allocate)
        decoder.forward(np.asarray(prompts[:1], dtype=np.int64), decoder.empty_cache())
        first_ms = (time.perf_counter() - t1) * 1e3
        runs = generate(decoder, prompts, args.new_tokens, args.warmup)
        peak = peak_rss_mb()  # generation's peak, before any eval blocks are scored at a larger batch
        scored = score(decoder, _array(args.eval_data, "x", args.eval_blocks)) if args.eval_data else None
    except RunnerError:
        raise
    except Exception as e:  # noqa: BLE001 - a runtime's failure mid-run
        raise RunnerError(f"{args.backend} failed while decoding {args.model}: {_first_line(e)}") from None
    out = {"runner": "lm", "runner_version": LM_RUNNER_VERSION, "model": os.path.basename(args.model),
           "backend": args.backend, "details": details, "versions": versions, "environment": environment(),
           "load_ms": round(load_ms, 3), "cold_start_ms": round(load_ms + first_ms, 3), "emulated": False,
           "prompts": len(prompts), **figures(runs),
           "tokens": [r["tokens"] for r in runs], "peak_rss_mb": peak, "memory_scope": MEMORY_SCOPE}
    if args.keep_times:
        out["timings"] = [{k: r[k] for k in ("prefill_s", "prompt_tokens", "step_s")} for r in runs]
    if scored is not None:
        out.update(scored)
    return out


def main(argv=None) -> int:
    """Run and print the JSON; on failure one line on stderr and exit 2 or 3."""
    args = parse_args(argv)
    _POOL["allowed"] = True  # this process is the runner's own
    try:
        text = json.dumps(run(args), allow_nan=False)
        if args.json:
            with open(args.json + ".tmp", "w") as f:
                f.write(text + "\n")
            os.replace(args.json + ".tmp", args.json)
    except RunnerError as e:
        print(f"runner: {e}", file=sys.stderr)
        return e.exit_code
    except (OSError, ValueError, MemoryError) as e:
        print(f"runner: {type(e).__name__}: {_first_line(e)}", file=sys.stderr)
        return EXIT_RUNTIME
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
