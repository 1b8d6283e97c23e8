"""The pure-numpy half of the Jetson LM bundle's runner (trt_lm_runner.py): the engines' one optimization
profile, greedy decoding over any decoder with forward(ids) -> logits, trim(length), reset() and `length`
(the cached tokens), and the JSON figures. Speculative decoding is lm_generation.py's loop, timed by
lm_figures.py (both copied beside this file into the bundle), the one edgekd runs on the host and on other boards, through EngineLoop. Needs numpy
only; edgekd's host side reads the same shape plan to write build_engine.sh."""
from __future__ import annotations

import time

import numpy as np

try:  # imported as edgekd.backends.tensorrt_bundle.trt_lm_decode
    from ...bench.lm_figures import speculative_bench as _speculative_bench
    from ...bench.lm_generation import LOOKUP_TOKENS
    from ...bench.lm_generation import speculative_greedy as _speculative_greedy
except ImportError:  # run as a script in the bundle, lm_generation.py and lm_figures.py beside it
    from lm_figures import speculative_bench as _speculative_bench  # type: ignore[no-redef]
    from lm_generation import LOOKUP_TOKENS  # type: ignore[no-redef]
    from lm_generation import speculative_greedy as _speculative_greedy  # type: ignore[no-redef]

# ---------------------------------------------------------------- shapes


def context_limits(seq_len: int, prompt_tokens: int, max_new_tokens: int, draft_tokens: int,
                   lookup: bool = False) -> dict:
    """The longest input and context the engine must take: a block of seq_len scored at once, a prompt and its
    first token (the draft's first pass in speculative decoding), a check of draft_tokens + 1 tokens (with
    `lookup`, at least LOOKUP_TOKENS + 1: a round may copy that many) at the end of the longest generation."""
    check = max(draft_tokens, LOOKUP_TOKENS if lookup else 0) + 1
    longest = prompt_tokens + max_new_tokens + check
    return {"max_input": max(seq_len, prompt_tokens + 1, check), "max_context": max(seq_len, longest),
            "opt_context": prompt_tokens + max_new_tokens // 2}


def profile_shapes(layers: int, kv_heads: int, head_dim: int, max_input: int, max_context: int,
                   opt_context: int) -> dict:
    """{input: [min, opt, max]} of the one optimization profile: batch 1, input_ids 1..max_input tokens
    (optimal at 1: decode), every past 0 (prefill) to max_context - 1 tokens."""
    past_max = max_context - 1
    opt = min(max(opt_context, 0), past_max)
    shapes = {"input_ids": [[1, 1], [1, 1], [1, max_input]]}
    for i in range(layers):
        for kind in ("key", "value"):
            shapes[f"past_{kind}_{i}"] = [[1, kv_heads, 0, head_dim], [1, kv_heads, opt, head_dim],
                                          [1, kv_heads, past_max, head_dim]]
    return shapes


def shape_flags(shapes: dict) -> list:
    """trtexec's --minShapes/--optShapes/--maxShapes for `shapes` (name:1x2x0x64,...)."""
    return [f"--{which}Shapes=" + ",".join(f"{n}:{'x'.join(str(d) for d in s[k])}" for n, s in shapes.items())
            for k, which in enumerate(("min", "opt", "max"))]


# ---------------------------------------------------------------- decoding and figures

def greedy_timed(dec, prompt, new_tokens: int, clock=time.perf_counter) -> dict:
    """One greedy generation: prefill seconds (which give the first token) and each later step's seconds."""
    dec.reset()
    t0 = clock()
    token = int(dec.forward(list(prompt))[-1].argmax())
    prefill = clock() - t0
    steps, tokens = [], [token]
    for _ in range(new_tokens - 1):
        t = clock()
        token = int(dec.forward([token])[-1].argmax())
        steps.append(clock() - t)
        tokens.append(token)
    return {"prefill_s": prefill, "prompt_tokens": len(prompt), "step_s": steps, "tokens": tokens}


def speed_figures(runs: list) -> dict:
    """Prefill and decode tokens/s, time to first token (median) and per output token (p50/p90/p99), in ms."""
    prefill = sum(r["prefill_s"] for r in runs)
    steps = np.asarray([s for r in runs for s in r["step_s"]], dtype=np.float64) * 1e3
    out = {"prefill_tokens_per_s": round(sum(r["prompt_tokens"] for r in runs) / prefill, 2) if prefill else None,
           "decode_tokens_per_s": round(len(steps) / (steps.sum() / 1e3), 2) if steps.sum() else None,
           "ttft_ms": round(float(np.median([r["prefill_s"] * 1e3 for r in runs])), 3) if runs else None,
           "tpot_ms": ({k: round(float(np.percentile(steps, q)), 3) for k, q in (("p50", 50), ("p90", 90), ("p99", 99))}
                       if len(steps) else None),
           "runs": len(runs), "new_tokens": len(runs[0]["tokens"]) if runs else 0}
    missing = [k for k in ("prefill_tokens_per_s", "decode_tokens_per_s", "ttft_ms", "tpot_ms") if out[k] is None]
    if missing:
        out["not_measured"] = {k: "no prompt, or one new token per run: nothing to time" for k in missing}
    return out


class EngineLoop:
    """An engine decoder (forward(ids) -> logits, its cache on the device) as lm_generation's decode loops take a
    decoder: forward(ids, cache) -> (logits (1, n, vocab), cache), empty_cache() and cut(cache, length), the
    cache being the engine's cached length. The logits are the engine's host buffer (no copy: the loop reads
    them before that engine runs again). Longer inputs than the engine's profile takes (the draft catching
    up on a run of copied guesses) go in pieces."""

    def __init__(self, dec):
        self.dec = dec

    def empty_cache(self, batch: int = 1) -> int:
        self.dec.reset()
        return 0

    def forward(self, ids, cache):
        ids = [int(t) for t in np.asarray(ids).reshape(-1)]
        step = int(getattr(self.dec, "max_input", 0) or len(ids))
        if len(ids) <= step:  # the engine's own buffer, read by the loop before this engine runs again
            return self.dec.forward(ids)[None], self.dec.length
        parts = [np.array(self.dec.forward(ids[i:i + step])) for i in range(0, len(ids), step)]
        return np.concatenate(parts)[None], self.dec.length

    def cut(self, cache, length: int) -> int:
        self.dec.trim(length)
        return self.dec.length


def speculative_greedy(target, draft, prompt, new_tokens: int, draft_tokens: int, min_confidence: float = 0.0,
                       lookup: bool = False) -> dict:
    """The target's greedy continuation of `prompt` by lm_generation.speculative_greedy (the loop edgekd runs on
    the host and on other boards): drafted up to `draft_tokens` at a time (fewer where the draft's probability
    for its next token falls under `min_confidence`; with `lookup`, what followed the last tokens where they
    occurred earlier instead, when they did), both engines' caches cut back to the accepted tokens."""
    res = _speculative_greedy(EngineLoop(target), EngineLoop(draft), prompt, new_tokens, draft_tokens,
                              min_confidence, lookup)
    return {"tokens": res.tokens, "drafted": res.drafted, "accepted": res.accepted, "target_passes": res.target_passes,
            "looked_up": res.looked_up, "lookup_accepted": res.lookup_accepted}


def speculative_bench(target, draft, prompts, new_tokens: int, draft_tokens: int, min_confidence: float = 0.0,
                      lookup: bool = False) -> dict:
    """lm_generation.speculative_bench on the engines: the target alone and speculative decoding on every prompt,
    interleaved; with `lookup`, the draft alone and context lookup alone timed in the same rounds ("compared"),
    so no figure credits the draft with what the lookup earned."""
    compare = [(draft_tokens, min_confidence, False), (0, 0.0, True)] if lookup else []
    return _speculative_bench(EngineLoop(target), EngineLoop(draft), prompts, new_tokens, draft_tokens,
                              min_confidence, lookup, compare)


def quality(dec, blocks: np.ndarray) -> dict:
    """Perplexity and next-token accuracy over every predicted token of `blocks` (n, seq), one block a pass."""
    nll, hits, count = 0.0, 0, 0
    for block in np.asarray(blocks):
        dec.reset()
        lg = np.asarray(dec.forward([int(t) for t in block])[:-1], dtype=np.float64)
        target = block[1:]
        top = lg.max(-1)
        lse = top + np.log(np.exp(lg - top[:, None]).sum(-1))
        nll += float((lse - lg[np.arange(len(target)), target]).sum())
        hits += int((lg.argmax(-1) == target).sum())
        count += len(target)
    return {"perplexity": round(float(np.exp(nll / max(count, 1))), 4),
            "accuracy": round(100.0 * hits / max(count, 1), 3), "eval_blocks": int(len(blocks))}
