#!/usr/bin/env python3
"""edgekd's standalone LM runner, copied to a board: needs only numpy and the board's runtime.

    python lm_runner.py --model PATH [--backend onnxruntime|openvino] [--threads N] [--providers A,B]
                        [--device CPU] [--precision fp32|int8|int4] [--precise-int8] [--kv-heads H --head-dim D]
                        --prompts prompts.npz [--prompt-count K] --new-tokens N [--warmup N]
                        [--eval-data eval.npz [--eval-blocks M]] [--keep-times] [--json OUT]
                        [--draft PATH [--draft-precision P] [--draft-kv-heads H --draft-head-dim D]
                         [--draft-tokens K[,K...]] [--min-confidence C[,C...]]]

Loads one KV-cache decoder (the ONNX that edgekd.lm.export writes, or its OpenVINO IR), decodes every prompt
greedily for N new tokens after a warm-up (no early stop, so every run does the same work) and prints one JSON
object: prefill and decode tokens/s, time to first token, time per output token (p50/p90/p99), the peak resident
memory of this process and the generated tokens; with --eval-data, perplexity and next-token picks on the
blocks. With --draft, speculative decoding instead: --model verifies what the draft proposes, timed against
--model alone on every prompt (one draft length and floor), or the fastest pair of the lists given.
Exit 2: a bad model or bad data; exit 3: the runtime is missing or failed. edgekd.bench.lm_bench
imports the decode loop and the figures from here, so a board and the host measure with the same code.
"""
from __future__ import annotations

import argparse
import json
import math
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
    from .runner import EXIT_BAD_INPUT, EXIT_RUNTIME, RunnerError, _first_line, peak_rss_mb
else:  # a script on a board: runner.py travels beside this file
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from runner import EXIT_BAD_INPUT, EXIT_RUNTIME, RunnerError, _first_line, peak_rss_mb  # type: ignore[no-redef]

LM_RUNNER_VERSION = 1
MEMORY_SCOPE = "peak resident memory of its own runner process: Python, the runtime, the decoder, generation at batch 1"


# ---------------------------------------------------------------- the decode loop and its figures

def decode_once(decoder, prompt, new_tokens: int) -> dict:
    """One greedy generation, timed: prefill seconds (which give the first token) and each later step's.
    `decoder` has forward(ids, cache) -> (logits, cache) and empty_cache() (this module's or edgekd's)."""
    t0 = time.perf_counter()
    logits, cache = decoder.forward(np.asarray([list(prompt)]), decoder.empty_cache())
    token = int(logits[0, -1].argmax())
    prefill = time.perf_counter() - t0
    steps, tokens = [], [token]
    for _ in range(new_tokens - 1):
        t = time.perf_counter()
        logits, cache = decoder.forward(np.asarray([[token]]), cache)
        token = int(logits[0, -1].argmax())
        steps.append(time.perf_counter() - t)
        tokens.append(token)
    return {"prefill_s": prefill, "prompt_tokens": len(prompt), "step_s": steps, "tokens": tokens}


def figures(runs: list) -> dict:
    """The report's speed figures from several timed generations."""
    prefill = sum(r["prefill_s"] for r in runs)
    steps = np.asarray([s for r in runs for s in r["step_s"]]) * 1000
    ttft = np.asarray([r["prefill_s"] for r in runs]) * 1000
    out = {"prefill_tokens_per_s": round(sum(r["prompt_tokens"] for r in runs) / prefill, 2) if prefill else None,
           "decode_tokens_per_s": round(len(steps) / (steps.sum() / 1000), 2) if len(steps) else None,
           "ttft_ms": round(float(np.median(ttft)), 3) if len(ttft) else None,
           "tpot_ms": ({"p50": round(float(np.percentile(steps, 50)), 3), "p90": round(float(np.percentile(steps, 90)), 3),
                        "p99": round(float(np.percentile(steps, 99)), 3)} if len(steps) else None),
           "runs": len(runs), "new_tokens": len(runs[0]["tokens"]) if runs else 0}
    if out["decode_tokens_per_s"] is None or out["tpot_ms"] is None:
        out["not_measured"] = "one new token per run: no decode step to time"
    return out


def generate(decoder, prompts, new_tokens: int, warmup: int = 1) -> list:
    """Warm-up generations (short: the first runs allocate and plan), then one timed generation per prompt."""
    for p in prompts[:warmup]:
        decode_once(decoder, p, min(new_tokens, 4))
    return [decode_once(decoder, p, new_tokens) for p in prompts]


def score(decoder, blocks, batch_size: int = 4) -> dict:
    """Perplexity (exp of the mean next-token NLL, each block prefilled), next-token accuracy and the picks."""
    total, count, picks = 0.0, 0, []
    for i in range(0, len(blocks), batch_size):
        ids = blocks[i:i + batch_size]
        logits, _ = decoder.forward(ids, decoder.empty_cache(len(ids)))
        lg = np.asarray(logits[:, :-1], dtype=np.float32)
        top = lg.max(-1, keepdims=True)
        lse = top[..., 0] + np.log(np.exp(lg - top).sum(-1))
        picked = np.take_along_axis(lg, ids[:, 1:][..., None], -1)[..., 0]
        total += float((lse - picked).astype(np.float64).sum())
        count += ids[:, 1:].size
        picks.append(logits.argmax(-1))
    p = np.concatenate(picks)
    return {"perplexity": round(math.exp(total / max(count, 1)), 4),
            "accuracy": round(100.0 * float((p[:, :-1] == blocks[:, 1:]).mean()), 3), "next_tokens": p.tolist()}


# ---------------------------------------------------------------- speculative decoding

def draft_token(logits, min_confidence: float):
    """The most likely token of one row of logits, or None where its probability is under min_confidence."""
    token = int(logits.argmax())
    if min_confidence <= 0.0:
        return token
    row = np.asarray(logits, dtype=np.float64)
    return token if 1.0 / np.exp(row - row[token]).sum() >= min_confidence else None


def trim(cache: list, length: int) -> list:
    """The KV cache cut back to its first `length` tokens."""
    return [np.ascontiguousarray(c[:, :, :length]) for c in cache]


class SpeculativeResult:
    """One speculative generation: its tokens, the draft tokens proposed and kept, the target's passes."""

    def __init__(self, tokens: list, drafted: int, accepted: int, target_passes: int):
        self.tokens, self.drafted, self.accepted, self.target_passes = tokens, drafted, accepted, target_passes

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0


def speculative_greedy(target, draft, prompt, max_new_tokens: int, draft_tokens: int,
                       min_confidence: float = 0.0) -> SpeculativeResult:
    """The target's greedy continuation of `prompt`, `max_new_tokens` long: each round the draft proposes up to
    `draft_tokens` (stopping where its probability for its next token is under `min_confidence`), the target
    checks them in one pass and keeps the longest prefix it agrees with plus its own next token; both keep
    their KV caches, cut back to the kept tokens. Lossless: the output is the target's own greedy output."""
    seq = list(prompt)
    logits, t_cache = target.forward(np.asarray([seq]), target.empty_cache())
    t_len, passes = len(seq), 1
    d_cache, d_len = draft.empty_cache(), 0
    nxt = int(logits[0, -1].argmax())
    produced = drafted = accepted = 0
    while True:
        seq.append(nxt)
        produced += 1
        if produced >= max_new_tokens:
            break
        k = min(draft_tokens, max_new_tokens - produced)
        d_logits, d_cache = draft.forward(np.asarray([seq[d_len:]]), d_cache)
        d_len = len(seq)
        proposals: list = []
        while True:
            token = draft_token(d_logits[0, -1], min_confidence)
            if token is None:
                break
            proposals.append(token)
            if len(proposals) == k:
                break
            d_logits, d_cache = draft.forward(np.asarray([[token]]), d_cache)
            d_len += 1
        start = len(seq) - t_len - 1  # the position in the fed tokens whose prediction checks proposals[0]
        logits, t_cache = target.forward(np.asarray([seq[t_len:] + proposals]), t_cache)
        passes += 1
        preds = logits[0, start:].argmax(-1)
        n = 0
        while n < len(proposals) and proposals[n] == int(preds[n]):
            n += 1
        drafted += len(proposals)
        accepted += n
        seq.extend(proposals[:n])
        produced += n
        t_len = len(seq)
        t_cache = trim(t_cache, t_len)
        d_len = min(d_len, t_len)
        d_cache = trim(d_cache, d_len)
        if produced >= max_new_tokens:
            break
        nxt = int(preds[n])
    return SpeculativeResult(seq[len(prompt):len(prompt) + max_new_tokens], drafted, accepted, passes)


def speculative_bench(target, draft, prompts, new_tokens: int, draft_tokens: int, min_confidence: float = 0.0) -> dict:
    """Speculative decoding against the target's own greedy decoding on each prompt, interleaved: end-to-end
    tokens/s of both (prefill included), acceptance, and whether each output equals the target's."""
    decode_once(target, prompts[0], min(4, new_tokens))
    spec_s = plain_s = 0.0
    drafted = accepted = identical = 0
    differences = []
    for i, prompt in enumerate(prompts):
        plain_first = i % 2 == 0
        times = {}
        for kind in (("plain", "spec") if plain_first else ("spec", "plain")):
            t = time.perf_counter()
            if kind == "plain":
                ref = decode_once(target, prompt, new_tokens)["tokens"]
            else:
                res = speculative_greedy(target, draft, prompt, new_tokens, draft_tokens, min_confidence)
            times[kind] = time.perf_counter() - t
        plain_s += times["plain"]
        spec_s += times["spec"]
        drafted += res.drafted
        accepted += res.accepted
        if res.tokens == ref:
            identical += 1
        else:
            pos = next(j for j, (x, y) in enumerate(zip(res.tokens, ref)) if x != y)  # noqa: B905 - Python 3.8 boards
            differences.append({"prompt": i, "position": pos})
    n_tokens = new_tokens * len(prompts)
    out = {"draft_tokens": draft_tokens, "min_confidence": min_confidence, "drafted": drafted,
           "acceptance_rate": round(accepted / drafted, 4) if drafted else 0.0,
           "tokens_per_s": round(n_tokens / spec_s, 2), "teacher_tokens_per_s": round(n_tokens / plain_s, 2),
           "speedup": round(plain_s / spec_s, 3), "prompts": len(prompts), "identical": identical,
           "new_tokens": new_tokens}
    if differences:
        out["differences"] = differences
    return out


def choose_speculation(target, draft, prompts, new_tokens: int, draft_tokens, min_confidence) -> dict:
    """The fastest (draft_tokens, min_confidence) pair of the grid on `prompts` (validation), with every pair's
    acceptance and tokens/s and the target alone's, all timed prompt by prompt in a rotating order."""
    settings = [(k, c) for k in draft_tokens for c in min_confidence]
    runs = [None, *settings]  # None: the target alone
    seconds = {r: 0.0 for r in runs}
    drafted = {r: 0 for r in settings}
    accepted = {r: 0 for r in settings}
    decode_once(target, prompts[0], min(4, new_tokens))
    for i, prompt in enumerate(prompts):
        for run in runs[i % len(runs):] + runs[:i % len(runs)]:
            t = time.perf_counter()
            if run is None:
                decode_once(target, prompt, new_tokens)
            else:
                res = speculative_greedy(target, draft, prompt, new_tokens, *run)
                drafted[run] += res.drafted
                accepted[run] += res.accepted
            seconds[run] += time.perf_counter() - t
    n_tokens = new_tokens * len(prompts)
    tried = [{"draft_tokens": k, "min_confidence": c, "tokens_per_s": round(n_tokens / seconds[(k, c)], 2),
              "acceptance_rate": round(accepted[(k, c)] / drafted[(k, c)], 4) if drafted[(k, c)] else 0.0}
             for k, c in settings]
    best = max(tried, key=lambda t: t["tokens_per_s"])
    return {"draft_tokens": best["draft_tokens"], "min_confidence": best["min_confidence"], "prompts": len(prompts),
            "teacher_tokens_per_s": round(n_tokens / seconds[None], 2), "tried": tried}


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


def _kv_dims(shapes: dict, args) -> tuple:
    """(layers, kv heads, head size) from the past_key_* inputs' shapes, or the arguments given."""
    layers = sum(1 for n in shapes if n.startswith("past_key_"))
    if "input_ids" not in shapes or layers == 0 or layers * 2 != sum(1 for n in shapes if n.startswith("past_")):
        raise RunnerError(f"{args.model} is not a KV-cache decoder (inputs input_ids, past_key_i, past_value_i; got "
                          f"{', '.join(list(shapes)[:6])})", EXIT_BAD_INPUT)
    dims = list(shapes["past_key_0"])
    heads = args.kv_heads or (dims[1] if len(dims) == 4 and isinstance(dims[1], int) else None)
    size = args.head_dim or (dims[3] if len(dims) == 4 and isinstance(dims[3], int) else None)
    if not heads or not size:
        raise RunnerError(f"{args.model}: the KV heads and head size are not static in the model; pass "
                          "--kv-heads and --head-dim", EXIT_BAD_INPUT)
    return layers, int(heads), int(size)


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
        try:
            compiled = core.compile_model(model, args.device, config)
        except Exception as e:  # noqa: BLE001
            raise RunnerError(f"openvino cannot compile {args.model} for {args.device}: {_first_line(e)}") from None
        request = compiled.create_infer_request()

        def run(feeds):
            res = request.infer(feeds)
            return [np.array(res[o], copy=True) for o in compiled.outputs]

        details = {"device": args.device, "threads": args.threads, "config": {k: str(v) for k, v in config.items()}}
        return KVDecoder(run, *dims), details, {"openvino": rt.__version__}
    so = rt.SessionOptions()  # what edgekd.backends.onnxruntime.session_options sets
    so.intra_op_num_threads = args.threads or (os.cpu_count() or 1)
    so.inter_op_num_threads = 1
    so.execution_mode = rt.ExecutionMode.ORT_SEQUENTIAL
    so.log_severity_level = 3
    so.graph_optimization_level = rt.GraphOptimizationLevel.ORT_ENABLE_ALL
    if args.precise_int8:
        so.add_session_config_entry("session.x64quantprecision", "1")
    if getattr(args, "draft", None):  # two sessions taking turns: an idle spinning pool would hold the cores
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    available = rt.get_available_providers()
    wanted = [p for p in (args.providers.split(",") if args.providers else []) if p in available]
    providers: list = [p for p in wanted if p != "CPUExecutionProvider"] + ["CPUExecutionProvider"]
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
    details = {"execution_providers": sess.get_providers(), "threads": args.threads}
    return KVDecoder(lambda feeds: sess.run(None, feeds), *dims), details, {"onnxruntime": rt.__version__}


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


def run_speculative(args: argparse.Namespace, prompts: list) -> dict:
    """--model verified, --draft drafting: one pair timed against the target alone, or the fastest of a grid."""
    lengths = _grid(args.draft_tokens, int, "--draft-tokens", lambda k: k >= 1)
    floors = _grid(args.min_confidence, float, "--min-confidence", lambda c: 0.0 <= c < 1.0)
    target, details, versions = load(args)  # both sessions sleep between calls: they take turns on the cores
    draft, draft_details, _ = load(argparse.Namespace(**{**vars(args), "model": args.draft, "precision": args.draft_precision,
                                                          "kv_heads": args.draft_kv_heads, "head_dim": args.draft_head_dim}))
    try:
        if len(lengths) * len(floors) > 1:
            spec = choose_speculation(target, draft, prompts, args.new_tokens, lengths, floors)
        else:
            spec = speculative_bench(target, draft, prompts, args.new_tokens, lengths[0], floors[0])
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
        runs = generate(decoder, prompts, args.new_tokens, args.warmup)
        peak = peak_rss_mb()  # generation's peak, before any eval blocks are scored at a larger batch
        scored = score(decoder, _array(args.eval_data, "x", args.eval_blocks)) if args.eval_data else None
    except RunnerError:
        raise
    except Exception as e:  # noqa: BLE001 - a runtime's failure mid-run
        raise RunnerError(f"{args.backend} failed while decoding {args.model}: {_first_line(e)}") from None
    out = {"runner": "lm", "runner_version": LM_RUNNER_VERSION, "model": os.path.basename(args.model),
           "backend": args.backend, "details": details, "versions": versions, "environment": environment(),
           "load_ms": round(load_ms, 3), "prompts": len(prompts), **figures(runs),
           "tokens": [r["tokens"] for r in runs], "peak_rss_mb": peak, "memory_scope": MEMORY_SCOPE}
    if args.keep_times:
        out["timings"] = [{k: r[k] for k in ("prefill_s", "prompt_tokens", "step_s")} for r in runs]
    if scored is not None:
        out.update(scored)
    return out


def main(argv=None) -> int:
    """Run and print the JSON; on failure one line on stderr and exit 2 or 3."""
    args = parse_args(argv)
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
