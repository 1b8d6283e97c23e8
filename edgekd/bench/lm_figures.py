"""The figures of edgekd's standalone LM runner: greedy generation timed (prefill, each step), scoring
(perplexity, next-token accuracy), speculative decoding timed against the target alone, and the choice of
draft length, confidence floor and context lookup. The decode loops are lm_generation.py's. Needs only numpy:
it travels beside lm_runner.py and lm_generation.py to a board, and edgekd.bench.lm_bench imports it too, so a
board and the host measure with the same code. The decoders have forward(ids, cache) -> (logits, cache) and
empty_cache() (lm_runner.KVDecoder or edgekd.lm.decode.Decoder)."""
from __future__ import annotations

import math
import os
import sys
import time

import numpy as np

if __package__:  # imported as edgekd.bench.lm_figures
    from .lm_generation import NOTHING_DRAFTED, Greedy, continue_ids, speculative
else:  # a script's helper on a board: lm_generation.py beside this file
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from lm_generation import NOTHING_DRAFTED, Greedy, continue_ids, speculative  # type: ignore[no-redef]

# ---------------------------------------------------------------- timed generation and scoring

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


def block_nll(logits, ids) -> np.ndarray:
    """Each row's summed next-token NLL (float64) of `ids` (batch, seq) under `logits` (batch, seq, vocab)."""
    lg = np.asarray(logits[:, :-1], dtype=np.float32)
    top = lg.max(-1, keepdims=True)
    lse = top[..., 0] + np.log(np.exp(lg - top).sum(-1))  # log-sum-exp, no full log-softmax array
    picked = np.take_along_axis(lg, ids[:, 1:][..., None], -1)[..., 0]
    return (lse - picked).astype(np.float64).sum(-1)


def score(decoder, blocks, batch_size: int = 4) -> dict:
    """Perplexity (exp of the mean next-token NLL, each block prefilled), next-token accuracy and the picks."""
    total, count, picks = 0.0, 0, []
    for i in range(0, len(blocks), batch_size):
        ids = blocks[i:i + batch_size]
        logits, _ = decoder.forward(ids, decoder.empty_cache(len(ids)))
        total += float(block_nll(logits, ids).sum())
        count += ids[:, 1:].size
        picks.append(logits.argmax(-1))
    p = np.concatenate(picks)
    return {"perplexity": round(math.exp(total / max(count, 1)), 4),
            "accuracy": round(100.0 * float((p[:, :-1] == blocks[:, 1:]).mean()), 3), "next_tokens": p.tolist()}


# ---------------------------------------------------------------- speculative decoding, timed

Setting = tuple  # (draft_tokens, min_confidence, lookup); draft_tokens 0 with lookup: context lookup alone


COUNTS = ("seconds", "drafted", "accepted", "looked_up", "lookup_accepted", "checks", "check_seconds",
          "draft_seconds", "later_tokens", "steps", "step_seconds")  # summed over prompts by _timed_settings


SAMPLED = "sampled"  # a setting's fourth field where it is timed with sampling; the teacher's own sampling's key
TEACHER_SAMPLED = "teacher sampled"
SAMPLED_IDENTICAL = ("sampled: the text is distributed as the teacher's own sampling, not the same tokens as its "
                     "run with the same seed")


def _timed_settings(target, draft, prompts, new_tokens: int, settings: list, sampling=None) -> dict:
    """{setting: {tokens, and COUNTS summed}} with the target alone as the setting None (its decode steps and
    their seconds), every prompt run by each in an order that rotates from prompt to prompt. A speculative
    run's checks are the target's passes after the prompt's, and its later tokens those after the first. A
    setting (k, c, lookup, SAMPLED) samples with `sampling` (lm_sampling.Sampling) seeded for each prompt
    (for_prompt), as the target's own sampling (TEACHER_SAMPLED, timed when `sampling` is given) does."""
    runs = [None, *settings, *([TEACHER_SAMPLED] if sampling is not None else [])]
    got: dict = {r: {**dict.fromkeys(COUNTS, 0), "tokens": []} for r in runs}
    decode_once(target, prompts[0], min(4, new_tokens))
    for i, prompt in enumerate(prompts):
        for run in runs[i % len(runs):] + runs[:i % len(runs)]:
            g = got[run]
            t = time.perf_counter()
            if run is None:
                once = decode_once(target, prompt, new_tokens)
                g["tokens"].append(once["tokens"])
                g["steps"] += len(once["step_s"])
                g["step_seconds"] += sum(once["step_s"])
            elif run == TEACHER_SAMPLED:
                g["tokens"].append(continue_ids(target, prompt, new_tokens, choice=sampling.for_prompt(i)))
            else:
                k, c, lookup = run[:3]
                choice = sampling.for_prompt(i).drafting(c) if run[3:] == (SAMPLED,) else Greedy(c)
                res = speculative(target, draft, prompt, new_tokens, k, choice, lookup)
                g["tokens"].append(res.tokens)
                for key in ("drafted", "accepted", "looked_up", "lookup_accepted", "check_seconds", "draft_seconds"):
                    g[key] += getattr(res, key)
                g["checks"] += res.target_passes - 1
                g["later_tokens"] += len(res.tokens) - 1
            g["seconds"] += time.perf_counter() - t
    return got


def _round(g: dict) -> dict | None:
    """What one round cost and gave on average: the tokens it kept (the target's own included), the target's
    check and the draft's passes in milliseconds; None without a round."""
    if not g["checks"]:
        return None
    return {"tokens": round(g["later_tokens"] / g["checks"], 3),
            "check_ms": round(1000 * g["check_seconds"] / g["checks"], 3),
            "draft_ms": round(1000 * g["draft_seconds"] / g["checks"], 3)}


def _figures(setting: Setting, g: dict, plain_s: float, n_tokens: int) -> dict:
    k, c, lookup = setting[:3]
    out = {"draft_tokens": k, "min_confidence": c, "lookup": bool(lookup), "drafted": g["drafted"],
           "acceptance_rate": round(g["accepted"] / g["drafted"], 4) if g["drafted"] else None,
           "tokens_per_s": round(n_tokens / g["seconds"], 2), "speedup": round(plain_s / g["seconds"], 3)}
    if not g["drafted"]:
        out["not_measured"] = {"acceptance_rate": NOTHING_DRAFTED}
    rnd = _round(g)
    if rnd is not None:
        out["round"] = rnd
    if lookup:
        student = g["drafted"] - g["looked_up"]
        out["sources"] = {"draft": {"proposed": student, "accepted": g["accepted"] - g["lookup_accepted"]},
                          "lookup": {"proposed": g["looked_up"], "accepted": g["lookup_accepted"]}}
    return out


def speculative_bench(target, draft, prompts, new_tokens: int, draft_tokens: int, min_confidence: float = 0.0,
                      lookup: bool = False, compare: tuple = (), sampling=None) -> dict:
    """Speculative decoding against the target's own greedy decoding on each prompt, interleaved: end-to-end
    tokens/s of both (prefill included), acceptance, and whether each output equals the target's. Each
    setting of `compare` ((draft_tokens, min_confidence, lookup)) is timed in the same rounds, into "compared".
    With `sampling` (lm_sampling.Sampling), speculative sampling with the same setting is timed in the same
    rounds too, against the target's own sampling with the same settings and seeds, into "sampled"."""
    chosen = (draft_tokens, min_confidence, bool(lookup))
    settings = [chosen, *[tuple(s) for s in compare if tuple(s) != chosen]]
    sampled = (*chosen, SAMPLED)
    got = _timed_settings(target, draft, prompts, new_tokens, settings + ([sampled] if sampling is not None else []),
                          sampling)
    plain_s, n_tokens = got[None]["seconds"], new_tokens * len(prompts)
    identical, differences = 0, []
    for i, (res, ref) in enumerate(zip(got[chosen]["tokens"], got[None]["tokens"])):  # noqa: B905 - Python 3.8 boards
        if res == ref:
            identical += 1
        else:
            pos = next(j for j, (x, y) in enumerate(zip(res, ref)) if x != y)  # noqa: B905
            differences.append({"prompt": i, "position": pos})
    alone = got[None]
    out = {**_figures(chosen, got[chosen], plain_s, n_tokens), "teacher_tokens_per_s": round(n_tokens / plain_s, 2),
           "teacher_token_ms": round(1000 * alone["step_seconds"] / alone["steps"], 3) if alone["steps"] else None,
           "prompts": len(prompts), "identical": identical, "new_tokens": new_tokens}
    if differences:
        out["differences"] = differences
    if settings[1:]:
        out["compared"] = [dict(_figures(s, got[s], plain_s, n_tokens),
                                identical=sum(a == b for a, b in zip(got[s]["tokens"], got[None]["tokens"])))  # noqa: B905
                           for s in settings[1:]]
    if sampling is not None:
        own_s = got[TEACHER_SAMPLED]["seconds"]
        row = _figures(sampled, got[sampled], own_s, n_tokens)
        row["not_measured"] = {**row.get("not_measured", {}), "identical": SAMPLED_IDENTICAL}
        out["sampled"] = {**row, **sampling.record(), "seeds": f"{sampling.seed} + the prompt's index",
                          "prompts": len(prompts), "teacher_tokens_per_s": round(n_tokens / own_s, 2), "identical": None}
    return out


SELECTION_FIRST = 4  # every setting of the grid is timed on the first 4 prompts; the FINALISTS fastest, and
FINALISTS = 3  # the fastest of each lookup mode, on the rest too: a few prompts' content swings a setting's rate


def choose_speculation(target, draft, prompts, new_tokens: int, draft_tokens, min_confidence,
                       lookup=(False,)) -> dict:
    """The fastest (draft_tokens, min_confidence, lookup) of the grid on `prompts` (validation), with every
    setting's acceptance, tokens/s, speedup and prompt count and the target alone's, all timed prompt by prompt
    in a rotating order: the whole grid on the first SELECTION_FIRST prompts, then the finalists on the rest,
    and the finalist fastest over all of them is chosen."""
    settings = [(k, c, bool(u)) for u in lookup for k in draft_tokens for c in min_confidence]
    first, rest = prompts[:SELECTION_FIRST], prompts[SELECTION_FIRST:]
    got = _timed_settings(target, draft, first, new_tokens, settings)
    counts = {s: len(first) for s in settings}
    plain = {len(first): got[None]["seconds"]}  # the target alone's seconds over the first n prompts
    ranked = sorted(settings, key=lambda s: got[s]["seconds"])
    finalists = list(dict.fromkeys(ranked[:FINALISTS] + [next(s for s in ranked if s[2] == u)
                                                           for u in dict.fromkeys(s[2] for s in settings)]))
    if rest and len(settings) > 1:
        more = _timed_settings(target, draft, rest, new_tokens, finalists)
        for key in [None, *finalists]:
            for field in COUNTS:
                got[key][field] += more[key][field]
        for s in finalists:
            counts[s] = len(prompts)
        plain[len(prompts)] = got[None]["seconds"]
    else:
        finalists = settings
    tried = []
    for s in settings:
        f = _figures(s, got[s], plain[counts[s]], new_tokens * counts[s])
        tried.append({**{key: f[key] for key in ("draft_tokens", "min_confidence", "lookup", "tokens_per_s",
                                                 "acceptance_rate", "speedup", "not_measured") if key in f},
                      "prompts": counts[s]})
    best = max((t for t in tried if (t["draft_tokens"], t["min_confidence"], t["lookup"]) in finalists),
               key=lambda t: t["tokens_per_s"])
    n = max(plain)  # the target alone over every prompt it ran
    return {"draft_tokens": best["draft_tokens"], "min_confidence": best["min_confidence"], "lookup": best["lookup"],
            "prompts": len(prompts), "teacher_tokens_per_s": round(new_tokens * n / plain[n], 2), "tried": tried}
