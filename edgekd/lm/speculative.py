"""Greedy speculative decoding: a small draft proposes tokens, the target checks them all in one forward
pass and keeps the longest prefix it agrees with plus its own next token. The output is the target's own
greedy output (lossless); both models run through their KV caches (decode.Decoder or the runner's KVDecoder).
The loop lives in bench/lm_generation.py (beside lm_runner.py), so a board over SSH and this host decode with the same code.

The draft proposes up to `draft_tokens` a round and stops early where its own probability for its next
token falls under `min_confidence` (0: never): a guess it doubts is likely rejected, and drafting it costs a
draft step and a longer check. A round with no proposal is a plain target step.

With `lookup`, a round whose last 4, 3 or 2 tokens occurred earlier in the prompt or the output proposes
what followed them there (up to LOOKUP_TOKENS, prompt lookup decoding) and the draft rests that round: a
copied guess costs no draft step, and code repeats itself. The report times the draft alone, lookup alone
and both side by side, so a figure never credits the draft with what the lookup earned."""
from __future__ import annotations

import numpy as np

from ..bench.lm_generation import (
    LOOKUP_TOKENS,
    SpeculativeResult,
    context_lookup,
    draft_token,
    speculative_greedy,
    trim,
)
from ..context import RunContext
from ..data.text import TextSplits
from .candidate import LMCandidate, open_candidate
from .measure import speculative_measured

__all__ = ["DRAFT_TOKEN_GRID", "LOOKUP_GRID", "LOOKUP_TOKENS", "MIN_CONFIDENCE_GRID", "UNCHOSEN", "SpeculativeResult",
           "choose_speculation", "compared_settings", "context_lookup", "draft_candidate", "draft_token", "pinned",
           "speculative_greedy", "trim"]

# what `speculative.draft_tokens: auto` / `min_confidence: auto` try on validation prompts
DRAFT_TOKEN_GRID = (1, 2, 3, 4, 6)  # 1: where a check of 2 tokens costs much more than one of 1
MIN_CONFIDENCE_GRID = (0.0, 0.3, 0.5)
LOOKUP_GRID = (False, True)
UNCHOSEN = (4, 0.3, True)  # what auto means where nothing here can time the settings (the Jetson bundle): on a
# GPU a check of LOOKUP_TOKENS + 1 tokens costs about what one does, so copied guesses are nearly free


def pinned(draft_tokens: int | str, min_confidence: float | str, lookup: bool | str = False) -> tuple[int, float, bool]:
    """(draft_tokens, min_confidence, lookup) with `auto` replaced by UNCHOSEN's value."""
    return (UNCHOSEN[0] if draft_tokens == "auto" else int(draft_tokens),
            UNCHOSEN[1] if min_confidence == "auto" else float(min_confidence),
            UNCHOSEN[2] if lookup == "auto" else bool(lookup))


def draft_candidate(ctx: RunContext, final: LMCandidate, config, layers: int, splits: TextSplits, n: int
           ) -> tuple[LMCandidate, dict]:
    """The decoder that drafts: the final model, or (speculative.draft_vocab below the vocabulary) the final
    model with its LM head cut to the n tokens most frequent in the training split (lm/draft_vocab.py);
    with what it is for the report."""
    vocab = splits.vocab_size
    if not n or n >= vocab:
        return final, {"artifact": str(final.artifact.path.relative_to(ctx.run_dir)),  # type: ignore[union-attr]
                       "vocab_tokens": vocab, "vocab_size": vocab, "head": "the whole vocabulary"}
    from .draft_vocab import cut_head, frequent_tokens

    run = ctx.run_dir
    train = splits.train.ids.numpy()
    keep = frequent_tokens(train, vocab, n)
    ov = ctx.profile.backend == "openvino" and final.name != "fp32"  # NNCF compresses the cut graph as the final's
    src = run / ("model.fp32.onnx" if ov or final.name == "fp32" else f"model.{final.name}.onnx")
    path = cut_head(src, run / f"draft.{final.name}.onnx", keep)
    if ov:
        from ..quantize.lm_weights import compress_ov_weights

        path = compress_ov_weights(path, ctx.stage_dir("quantize") / f"draft.{final.name}.xml", final.name)
    c = LMCandidate("draft", final.precision, path, f"{final.label}, LM head cut to {len(keep)} tokens")
    open_candidate(ctx, c, config, layers)
    counts = np.bincount(train.ravel(), minlength=vocab)
    return c, {"artifact": str(c.artifact.path.relative_to(run)), "vocab_tokens": int(len(keep)),  # type: ignore[union-attr]
               "vocab_size": vocab, "train_coverage": round(100.0 * float(counts[keep].sum() / counts.sum()), 3),
               "head": f"the {len(keep)} tokens most frequent in the training split"}


def choose_speculation(ctx: RunContext, hosts: list[str], teacher: LMCandidate, draft: LMCandidate, shapes: dict,
                        prompts: list[list[int]], spec) -> dict:
    """The draft length, confidence floor and context lookup: as configured, or where any is auto, the fastest
    setting of the grid on the validation prompts (test prompts only report), timed on the first board with
    --host, else on this host."""
    if "auto" not in (spec.draft_tokens, spec.min_confidence, spec.lookup):
        return {"draft_tokens": spec.draft_tokens, "min_confidence": spec.min_confidence, "lookup": spec.lookup}
    grid = (DRAFT_TOKEN_GRID if spec.draft_tokens == "auto" else (spec.draft_tokens,),
            MIN_CONFIDENCE_GRID if spec.min_confidence == "auto" else (spec.min_confidence,),
            LOOKUP_GRID if spec.lookup == "auto" else (spec.lookup,))
    return speculative_measured(ctx, hosts[0] if hosts else None, teacher, draft, shapes, prompts, spec.max_new_tokens,
                                grid)


def compared_settings(choice: dict) -> list[tuple]:
    """Settings timed beside the chosen one on the test prompts: the other lookup mode (its fastest setting on
    validation where it was tried, else the chosen draft length and floor) and context lookup alone."""
    k, c, lookup = choice["draft_tokens"], choice["min_confidence"], bool(choice["lookup"])
    other = [t for t in choice.get("tried", []) if t["lookup"] != lookup]
    best = max(other, key=lambda t: t["tokens_per_s"]) if other else {"draft_tokens": k, "min_confidence": c}
    return [(best["draft_tokens"], best["min_confidence"], not lookup), (0, 0.0, True)]
