"""Greedy speculative decoding: a small draft proposes tokens, the target checks them all in one forward
pass and keeps the longest prefix it agrees with plus its own next token. The output is the target's own
greedy output (lossless); both models run through their KV caches (decode.Decoder).

The draft proposes up to `draft_tokens` a round and stops early where its own probability for its next
token falls under `min_confidence` (0: never): a guess it doubts is likely rejected, and drafting it costs a
draft step and a longer check. A round with no proposal is a plain target step."""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ..backends.tensorrt_bundle.trt_lm_decode import draft_token  # numpy only; the board runner's too
from .decode import Decoder

__all__ = ["DRAFT_TOKEN_GRID", "MIN_CONFIDENCE_GRID", "UNCHOSEN", "SpeculativeResult", "draft_token", "pinned",
           "speculative_greedy", "trim"]

# what `speculative.draft_tokens: auto` / `min_confidence: auto` try on validation prompts
DRAFT_TOKEN_GRID = (2, 3, 4, 6)
MIN_CONFIDENCE_GRID = (0.0, 0.3, 0.5)
UNCHOSEN = (4, 0.3)  # what auto means where nothing here can time the pair (the Jetson bundle)


def pinned(draft_tokens: int | str, min_confidence: float | str) -> tuple[int, float]:
    """(draft_tokens, min_confidence) with `auto` replaced by UNCHOSEN's value."""
    return (UNCHOSEN[0] if draft_tokens == "auto" else int(draft_tokens),
            UNCHOSEN[1] if min_confidence == "auto" else float(min_confidence))


@dataclass
class SpeculativeResult:
    tokens: list[int]
    drafted: int  # draft tokens proposed
    accepted: int  # draft tokens the target kept
    target_passes: int  # forward passes of the target (prefill included)

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0


def trim(cache: list[np.ndarray], length: int) -> list[np.ndarray]:
    """The KV cache cut back to its first `length` tokens."""
    return [np.ascontiguousarray(c[:, :, :length]) for c in cache]


def speculative_greedy(target: Decoder, draft: Decoder, prompt: Sequence[int], max_new_tokens: int,
                       draft_tokens: int, min_confidence: float = 0.0) -> SpeculativeResult:
    """The target's greedy continuation of `prompt`, `max_new_tokens` long, drafted up to `draft_tokens` at a
    time (fewer where the draft's confidence falls under `min_confidence`)."""
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
        proposals: list[int] = []
        while (token := draft_token(d_logits[0, -1], min_confidence)) is not None:
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
