"""Greedy speculative decoding: a small draft proposes tokens, the target checks them all in one forward
pass and keeps the longest prefix it agrees with plus its own next token. The output is the target's own
greedy output (lossless); both models run through their KV caches (decode.Decoder)."""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from .decode import Decoder

__all__ = ["SpeculativeResult", "speculative_greedy", "trim"]


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
                       draft_tokens: int) -> SpeculativeResult:
    """The target's greedy continuation of `prompt`, `max_new_tokens` long, drafted `draft_tokens` at a time."""
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
        proposals = [int(d_logits[0, -1].argmax())]
        for _ in range(k - 1):
            d_logits, d_cache = draft.forward(np.asarray([[proposals[-1]]]), d_cache)
            d_len += 1
            proposals.append(int(d_logits[0, -1].argmax()))
        start = len(seq) - t_len - 1  # the position in the fed tokens whose prediction checks proposals[0]
        logits, t_cache = target.forward(np.asarray([seq[t_len:] + proposals]), t_cache)
        passes += 1
        preds = logits[0, start:].argmax(-1)
        n = 0
        while n < k and proposals[n] == int(preds[n]):
            n += 1
        drafted += k
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
