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

from ..bench.lm_generation import (
    LOOKUP_TOKENS,
    SpeculativeResult,
    context_lookup,
    draft_token,
    speculative_greedy,
    trim,
)

__all__ = ["DRAFT_TOKEN_GRID", "LOOKUP_GRID", "LOOKUP_TOKENS", "MIN_CONFIDENCE_GRID", "UNCHOSEN", "SpeculativeResult",
           "context_lookup", "draft_token", "pinned", "speculative_greedy", "trim"]

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
