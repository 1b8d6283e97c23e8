"""The pure-numpy half of the Jetson LM bundle's runner (trt_lm_runner.py): the engines' one optimization
profile, greedy and speculative decoding over any decoder with forward(ids) -> logits, trim(length), reset()
and `length` (the cached tokens), and the JSON figures. Needs numpy only; edgekd's host side reads the same
shape plan to write build_engine.sh."""
from __future__ import annotations

import time

import numpy as np

# ---------------------------------------------------------------- shapes


def context_limits(seq_len: int, prompt_tokens: int, max_new_tokens: int, draft_tokens: int) -> dict:
    """The longest input and context the engine must take: a block of seq_len scored at once, a prompt and its
    first token (the draft's first pass in speculative decoding), a check of draft_tokens + 1 tokens at the
    end of the longest generation."""
    longest = prompt_tokens + max_new_tokens + draft_tokens + 1
    return {"max_input": max(seq_len, prompt_tokens + 1, draft_tokens + 1), "max_context": max(seq_len, longest),
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


def accepted_prefix(proposals: list, preds) -> int:
    """How many leading draft proposals the target's own picks agree with."""
    n = 0
    while n < len(proposals) and proposals[n] == int(preds[n]):
        n += 1
    return n


def draft_token(logits: np.ndarray, min_confidence: float):
    """The most likely token of one row of logits, or None where its probability is under min_confidence."""
    token = int(logits.argmax())
    if min_confidence <= 0.0:
        return token
    row = np.asarray(logits, dtype=np.float64)
    return token if 1.0 / np.exp(row - row[token]).sum() >= min_confidence else None


def speculative_greedy(target, draft, prompt, new_tokens: int, draft_tokens: int, min_confidence: float = 0.0) -> dict:
    """The target's greedy continuation of `prompt`, drafted up to `draft_tokens` at a time (fewer where the
    draft's probability for its next token falls under `min_confidence`); both decoders keep their KV caches,
    cut back to the accepted tokens after every check."""
    target.reset()
    draft.reset()
    seq = list(prompt)
    nxt, passes = int(target.forward(seq)[-1].argmax()), 1
    produced = drafted = accepted = 0
    while True:
        seq.append(nxt)
        produced += 1
        if produced >= new_tokens:
            break
        k = min(draft_tokens, new_tokens - produced)
        logits = draft.forward(seq[draft.length:])
        proposals = []
        while True:
            token = draft_token(logits[-1], min_confidence)
            if token is None:
                break
            proposals.append(token)
            if len(proposals) == k:
                break
            logits = draft.forward([token])
        start = len(seq) - target.length - 1  # the fed position whose prediction checks proposals[0]
        preds = target.forward(seq[target.length:] + proposals)[start:].argmax(-1)
        passes += 1
        n = accepted_prefix(proposals, preds)
        drafted, accepted, produced = drafted + len(proposals), accepted + n, produced + n
        seq.extend(proposals[:n])
        target.trim(len(seq))
        draft.trim(min(draft.length, len(seq)))
        if produced >= new_tokens:
            break
        nxt = int(preds[n])
    return {"tokens": seq[len(prompt):len(prompt) + new_tokens], "drafted": drafted, "accepted": accepted,
            "target_passes": passes}


def speculative_figures(results: list, spec_s: float, plain_s: float, same: list, draft_tokens: int,
                        min_confidence: float = 0.0) -> dict:
    """The speculative block: acceptance, tokens/s with and without the draft, speedup, identical outputs."""
    drafted, accepted = sum(r["drafted"] for r in results), sum(r["accepted"] for r in results)
    tokens = sum(len(r["tokens"]) for r in results)
    spec_tps = tokens / spec_s if spec_s else None
    plain_tps = tokens / plain_s if plain_s else None
    return {"draft_tokens": draft_tokens, "min_confidence": min_confidence, "prompts": len(results), "drafted": drafted, "accepted": accepted,
            "acceptance_rate": round(accepted / drafted, 4) if drafted else None,
            "tokens_per_s": round(spec_tps, 2) if spec_tps else None,
            "teacher_tokens_per_s": round(plain_tps, 2) if plain_tps else None,
            "speedup": round(spec_tps / plain_tps, 3) if spec_tps and plain_tps else None,
            "identical": int(sum(same)), "target_passes": sum(r["target_passes"] for r in results)}


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
