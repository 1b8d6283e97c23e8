"""Generation speed of LM decoders, measured side by side: prefill and decode tokens/s, time to first
token, time per output token, and speculative decoding against the target alone.

Every model decodes the same prompts for a fixed number of new tokens (no early stop at end-of-text, so
each run does the same work), in interleaved rounds whose order rotates, so a drift in the machine's
speed touches all of them alike."""
from __future__ import annotations

import time
from collections.abc import Sequence

import numpy as np

from ..lm.decode import Decoder
from ..lm.speculative import speculative_greedy

__all__ = ["decode_once", "figures", "generation_bench", "speculative_bench"]


def decode_once(decoder: Decoder, prompt: Sequence[int], new_tokens: int) -> dict:
    """One greedy generation, timed: prefill seconds (which give the first token) and each later step's."""
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


def figures(runs: list[dict]) -> dict:
    """The report's speed figures from several timed generations."""
    prefill = sum(r["prefill_s"] for r in runs)
    steps = np.asarray([s for r in runs for s in r["step_s"]]) * 1000
    ttft = np.asarray([r["prefill_s"] for r in runs]) * 1000
    out = {"prefill_tokens_per_s": round(sum(r["prompt_tokens"] for r in runs) / prefill, 2) if prefill else None,
           "decode_tokens_per_s": round(len(steps) / (steps.sum() / 1000), 2) if len(steps) else None,
           "ttft_ms": round(float(np.median(ttft)), 3),
           "tpot_ms": ({"p50": round(float(np.percentile(steps, 50)), 3), "p90": round(float(np.percentile(steps, 90)), 3),
                        "p99": round(float(np.percentile(steps, 99)), 3)} if len(steps) else None),
           "runs": len(runs), "new_tokens": len(runs[0]["tokens"]) if runs else 0}
    if out["decode_tokens_per_s"] is None or out["tpot_ms"] is None:
        out["not_measured"] = "one new token per run: no decode step to time"
    return out


def generation_bench(decoders: dict[str, Decoder], prompts: Sequence[Sequence[int]], new_tokens: int,
                     rounds: int = 1, warmup: int = 1) -> dict[str, dict]:
    """{name: figures} for every decoder over `rounds` passes of the prompts, interleaved."""
    names = list(decoders)
    for name in names:  # warm-up: the first sessions' runs allocate and plan
        for p in prompts[:warmup]:
            decode_once(decoders[name], p, min(new_tokens, 4))
    runs: dict[str, list[dict]] = {n: [] for n in names}
    for r in range(rounds):
        for i, prompt in enumerate(prompts):
            order = names[(r + i) % len(names):] + names[:(r + i) % len(names)]
            for name in order:
                runs[name].append(decode_once(decoders[name], prompt, new_tokens))
    return {n: figures(runs[n]) for n in names}


def speculative_bench(target: Decoder, draft: Decoder, prompts: Sequence[Sequence[int]], new_tokens: int,
                      draft_tokens: int) -> dict:
    """Speculative decoding against the target's own greedy decoding on each prompt, interleaved: end-to-end
    tokens/s of both (prefill included), acceptance, and whether each output equals the target's."""
    decode_once(target, prompts[0], min(4, new_tokens))
    spec_s = plain_s = 0.0
    drafted = accepted = identical = 0
    differences = []
    for i, prompt in enumerate(prompts):
        def plain(p: Sequence[int] = prompt) -> list[int]:
            return decode_once(target, p, new_tokens)["tokens"]

        def spec(p: Sequence[int] = prompt):
            return speculative_greedy(target, draft, p, new_tokens, draft_tokens)

        first, second = (plain, spec) if i % 2 == 0 else (spec, plain)
        t = time.perf_counter()
        a = first()
        ta = time.perf_counter() - t
        t = time.perf_counter()
        b = second()
        tb = time.perf_counter() - t
        ref, res = (a, b) if first is plain else (b, a)
        plain_s += ta if first is plain else tb
        spec_s += tb if first is plain else ta
        drafted += res.drafted
        accepted += res.accepted
        if res.tokens == ref:
            identical += 1
        else:
            pos = next(j for j, (x, y) in enumerate(zip(res.tokens, ref, strict=False)) if x != y)
            differences.append({"prompt": i, "position": pos})
    n_tokens = new_tokens * len(prompts)
    out = {"draft_tokens": draft_tokens, "acceptance_rate": round(accepted / drafted, 4) if drafted else 0.0,
           "tokens_per_s": round(n_tokens / spec_s, 2), "teacher_tokens_per_s": round(n_tokens / plain_s, 2),
           "speedup": round(plain_s / spec_s, 3), "prompts": len(prompts), "identical": identical,
           "new_tokens": new_tokens}
    if differences:
        out["differences"] = differences
    return out
