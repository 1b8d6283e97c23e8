"""The decode loops of edgekd's LM runner and its board app: greedy or sampled generation (continue_ids), and
speculative decoding (the draft proposes, the target checks) with its context lookup. Needs only numpy: it
travels beside lm_runner.py and lm_figures.py (the timed figures) to a board and into target/app/, and edgekd
imports it too, so a board and the host decode with the same code. The decoders have forward(ids, cache) ->
(logits, cache) and empty_cache() (lm_runner.KVDecoder or edgekd.lm.decode.Decoder)."""
from __future__ import annotations

import time

import numpy as np

# ---------------------------------------------------------------- the decode loop

def continue_ids(decoder, prompt, max_new_tokens: int, eos=None, on_tokens=None, choice=None, penalty=None) -> list:
    """The continuation of `prompt` (token ids): prefill once, then one token a step, each picked by `choice`
    (Greedy(): the most likely; lm_sampling.Sampling: drawn) from its logits as `penalty` (row, text before it)
    leaves them (lm_sampling.RepetitionPenalty; None: as they are), ending with `eos` (kept) or after
    `max_new_tokens`; `on_tokens` is handed each new token as it comes (streaming), and a true answer from it
    ends the text there (a stop string, lm_app.Streamer)."""
    pick = (choice or GREEDY).pick
    logits, cache = decoder.forward(np.asarray([list(prompt)]), decoder.empty_cache())
    out = []
    while True:
        row = logits[0, -1]
        token = pick(row if penalty is None else penalty(row, list(prompt) + out))
        out.append(token)
        if on_tokens is not None and on_tokens([token]):
            return out
        if (eos is not None and token == eos) or len(out) >= max_new_tokens:
            return out
        logits, cache = decoder.forward(np.asarray([[token]]), cache)


def greedy(decoder, prompt, max_new_tokens: int, eos=None, on_tokens=None) -> list:
    """The greedy continuation of `prompt` (continue_ids with the most likely token each step)."""
    return continue_ids(decoder, prompt, max_new_tokens, eos, on_tokens)


# ---------------------------------------------------------------- speculative decoding

def draft_token(logits, min_confidence: float):
    """The most likely token of one row of logits, or None where its probability is under min_confidence."""
    token = int(logits.argmax())
    if min_confidence <= 0.0:
        return token
    row = np.asarray(logits, dtype=np.float32)  # float32 is ample against a floor, at half float64's time
    return token if 1.0 / float(np.exp(row - row[token]).sum()) >= min_confidence else None


class Greedy:
    """Greedy decoding as a loop's `choice` (lm_sampling.Sampling is the sampled one): pick the most likely
    token; as a draft, propose it while its probability reaches `min_confidence`; as the target, keep the
    longest prefix of the proposals it would have picked itself, then its own next token."""

    def __init__(self, min_confidence: float = 0.0):
        self.min_confidence = min_confidence

    @staticmethod
    def pick(row) -> int:
        return int(row.argmax())

    def propose(self, row):
        return draft_token(row, self.min_confidence), None

    @staticmethod
    def check(rows, proposals: list, guesses: list) -> tuple[int, int]:
        preds = rows[:len(proposals) + 1].argmax(-1)
        n = 0
        while n < len(proposals) and proposals[n] == int(preds[n]):
            n += 1
        return n, int(preds[n])


GREEDY = Greedy()


def trim(cache: list, length: int) -> list:
    """The KV cache cut back to its first `length` tokens."""
    return [np.ascontiguousarray(c[:, :, :length]) for c in cache]


def _cut(decoder, cache, length: int):
    """`cache` cut back to `length` tokens: by the decoder where it keeps its cache itself (a TensorRT engine's
    device buffers: cut(cache, length)), else as numpy arrays."""
    cut = getattr(decoder, "cut", None)
    return cut(cache, length) if cut is not None else trim(cache, length)


LOOKUP_TOKENS = 8  # the most a context match proposes in one round (it costs no draft step)
LOOKUP_NGRAMS = (4, 3, 2)  # the context's last n tokens searched for, longest first


def context_lookup(seq, limit: int) -> list:
    """Up to `limit` tokens that followed the most recent earlier occurrence of `seq`'s last 4, 3 or 2 tokens
    (longest first) in `seq` itself, or [] where none recurs: code and structured text repeat themselves, and
    a copied guess costs no draft step (prompt lookup decoding)."""
    arr = np.asarray(seq)
    for n in LOOKUP_NGRAMS:
        if len(arr) <= n or limit < 1:
            continue
        windows = np.lib.stride_tricks.sliding_window_view(arr[:-1], n)  # every start but the tail's own
        hits = np.flatnonzero((windows == arr[-n:]).all(axis=1))
        if len(hits):
            start = int(hits[-1]) + n
            return arr[start:start + limit].tolist()
    return []


class SpeculativeResult:
    """One speculative generation: its tokens, the guesses proposed and kept (all, and those copied from the
    context), the target's passes, and the seconds spent in the target's checks (every pass after the prompt's)
    and in the draft's passes."""

    def __init__(self, tokens: list, drafted: int, accepted: int, target_passes: int, looked_up: int = 0,
                 lookup_accepted: int = 0, check_seconds: float = 0.0, draft_seconds: float = 0.0):
        self.tokens, self.drafted, self.accepted, self.target_passes = tokens, drafted, accepted, target_passes
        self.looked_up, self.lookup_accepted = looked_up, lookup_accepted
        self.check_seconds, self.draft_seconds = check_seconds, draft_seconds

    @property
    def acceptance_rate(self) -> float | None:
        """The share of drafted tokens the target kept; None when nothing was drafted (NOTHING_DRAFTED)."""
        return self.accepted / self.drafted if self.drafted else None


NOTHING_DRAFTED = ("nothing was drafted: no guess of the draft reached the confidence floor and no context lookup "
                   "matched")


def speculative_greedy(target, draft, prompt, max_new_tokens: int, draft_tokens: int,
                       min_confidence: float = 0.0, lookup: bool = False, eos=None, on_tokens=None) -> SpeculativeResult:
    """The target's greedy continuation of `prompt`, `max_new_tokens` long, drafted (speculative with Greedy)."""
    return speculative(target, draft, prompt, max_new_tokens, draft_tokens, Greedy(min_confidence), lookup, eos,
                       on_tokens)


def speculative(target, draft, prompt, max_new_tokens: int, draft_tokens: int, choice=None, lookup: bool = False,
                eos=None, on_tokens=None, penalty=None) -> SpeculativeResult:
    """The target's continuation of `prompt`, `max_new_tokens` long: each round the draft proposes up to
    `draft_tokens` (`choice.propose`: greedy, stopping where its probability for its next token is under the
    floor; or sampled), the target checks them in one pass and keeps what `choice.check` accepts (greedy: the
    longest prefix it agrees with) plus its own next token; both keep their KV caches, cut back to the kept
    tokens. With `lookup`, a round whose last tokens recur earlier in the text proposes what followed them
    there (up to LOOKUP_TOKENS) instead, and the draft catches up on the kept tokens in its next round.
    Lossless: the output is the target's own greedy output (sampled: distributed as the target's own sampled
    output). With `eos`, the output ends at that token (kept), as decoding alone stops there. A decoder with
    cut(cache, length) cuts its own cache (the Jetson bundle's engines keep theirs on the device). `on_tokens`
    is handed the tokens each round keeps, as they are kept (streaming); a true answer from it ends the text
    after them (a stop string). With `penalty` (lm_sampling.RepetitionPenalty) every row the target checks and
    the draft proposes from is penalised from the text before it: the output is then the target's own output
    under the same penalty."""
    choice = choice or GREEDY

    def shaped(row, text):
        return row if penalty is None else penalty(row, text)

    seq = list(prompt)
    logits, t_cache = target.forward(np.asarray([seq]), target.empty_cache())
    t_len, passes = len(seq), 1
    d_cache, d_len = draft.empty_cache(), 0
    nxt = choice.pick(shaped(logits[0, -1], seq))
    produced = drafted = accepted = looked_up = lookup_accepted = 0
    check_s = draft_s = 0.0
    while True:
        seq.append(nxt)
        produced += 1
        if (on_tokens is not None and on_tokens([nxt])) or produced >= max_new_tokens or nxt == eos:
            break
        left = max_new_tokens - produced
        proposals = context_lookup(seq, min(LOOKUP_TOKENS, left)) if lookup else []
        guesses: list = [None] * len(proposals)  # the draft's distribution for each guess (greedy: none needed)
        copied = bool(proposals)
        if not copied and draft_tokens > 0:  # draft_tokens 0: context lookup alone
            k = min(draft_tokens, left)
            t0 = time.perf_counter()
            d_logits, d_cache = draft.forward(np.asarray([seq[d_len:]]), d_cache)
            d_len = len(seq)
            while True:
                token, q = choice.propose(shaped(d_logits[0, -1], seq + proposals))
                if token is None:
                    break
                proposals.append(token)
                guesses.append(q)
                if len(proposals) == k:
                    break
                d_logits, d_cache = draft.forward(np.asarray([[token]]), d_cache)
                d_len += 1
            draft_s += time.perf_counter() - t0
        start = len(seq) - t_len - 1  # the position in the fed tokens whose prediction checks proposals[0]
        t0 = time.perf_counter()
        logits, t_cache = target.forward(np.asarray([seq[t_len:] + proposals]), t_cache)
        check_s += time.perf_counter() - t0
        passes += 1
        rows = logits[0, start:start + len(proposals) + 1]
        if penalty is not None:
            rows = np.stack([penalty(row, seq + proposals[:i]) for i, row in enumerate(rows)])
        n, after = choice.check(rows, proposals, guesses)
        drafted += len(proposals)
        accepted += n
        if copied:
            looked_up += len(proposals)
            lookup_accepted += n
        kept = proposals[:n]
        ended = eos in kept
        if ended:
            kept = kept[:kept.index(eos) + 1]
        seq.extend(kept)
        if on_tokens is not None and kept and on_tokens(kept):
            ended = True
        if ended:
            break
        produced += n
        t_len = len(seq)
        t_cache = _cut(target, t_cache, t_len)
        if d_len > t_len:
            d_len = t_len
            d_cache = _cut(draft, d_cache, d_len)
        if produced >= max_new_tokens:
            break
        nxt = after
    return SpeculativeResult(seq[len(prompt):len(prompt) + max_new_tokens], drafted, accepted, passes,
                             looked_up, lookup_accepted, check_s, draft_s)


