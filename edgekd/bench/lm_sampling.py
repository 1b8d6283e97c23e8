"""Sampled decoding for edgekd's decode loops: temperature, top-k and top-p (nucleus) filtering, a seeded
generator, and speculative sampling (Leviathan et al., arXiv 2211.17192; Chen et al., arXiv 2302.01318),
where the target keeps a drafted token x with probability min(1, p(x)/q(x)) and otherwise draws its own
token from max(0, p - q), renormalised: the output is distributed exactly as the target's own sampling with
the same settings (lossless in distribution, not the same text as plain sampling with the same seed, which
draws its random numbers in another order). Needs only numpy: it travels with lm_generation.py to a board.

A `Sampling` is the `choice` of lm_generation's loops (`continue_ids`, `speculative`): pick(row) for one token,
propose(row) for a draft's guess and check(rows, proposals, guesses) for the target's verdict, as
lm_generation.Greedy has them for greedy decoding. A `RepetitionPenalty` reshapes each row of logits from the text
before it (the loops take it as `penalty`), greedy or sampled."""
from __future__ import annotations

import numpy as np

__all__ = ["RepetitionPenalty", "Sampling", "from_flags", "penalty_from_flags", "settings_error"]


NUCLEUS_ROWS = 1024  # the most likely tokens top-p sorts first (the whole row only where they fall short)


def from_flags(temperature: float, top_k: int | None = None, top_p: float | None = None,
               seed: int | None = None) -> Sampling | None:
    """The Sampling that generate's flags ask for, or None for greedy decoding (temperature 0); what is
    wrong with them raises ValueError with the line to show."""
    if not temperature:
        loose = [flag for flag, value in (("--top-k", top_k), ("--top-p", top_p), ("--seed", seed)) if value is not None]
        if loose:
            raise ValueError(f"{loose[0]} sets sampling, and decoding is greedy; add --temperature T")
        return None
    if seed is not None and not 0 <= seed < 2 ** 32:
        raise ValueError(f"--seed must be an integer from 0 to {2 ** 32 - 1}, got {seed}")
    return Sampling(temperature, top_k or 0, 1.0 if top_p is None else top_p, seed)


def penalty_from_flags(penalty: float | None, window: int | None = None) -> RepetitionPenalty | None:
    """The RepetitionPenalty that --repetition-penalty and --repetition-window ask for, or None (no penalty:
    not given, or 1); what is wrong with them raises ValueError with the line to show."""
    if penalty is None:
        if window is not None:
            raise ValueError("--repetition-window sets the repetition penalty's window; add --repetition-penalty R")
        return None
    if not penalty > 0.0 or not np.isfinite(penalty):
        raise ValueError(f"the repetition penalty must be above 0 (1: none, above 1: fewer repeats), got {penalty}")
    if window is not None and window < 0:
        raise ValueError(f"the repetition window must be 0 (the whole text) or more tokens, got {window}")
    return None if penalty == 1.0 else RepetitionPenalty(penalty, window or 0)


class RepetitionPenalty:
    """The repetition penalty of Keskar et al. (CTRL, arXiv 1909.05858) as Hugging Face's generate and
    llama.cpp apply it: every token that occurs in the text so far (prompt included; with `window`, its last
    `window` tokens only) has its logit divided by `penalty` where positive and multiplied where negative, so
    above 1 it makes a repeat less likely whatever the logit's sign. It depends only on the text before the
    row, so a speculative loop applies it to each checked row from that row's own text and stays lossless."""

    def __init__(self, penalty: float, window: int = 0):
        self.penalty, self.window = float(penalty), int(window)

    def __call__(self, row, context) -> np.ndarray:
        """`row` (one row of logits) penalised for the tokens of `context` (the token ids before it)."""
        seen = np.unique(np.asarray(context[-self.window:] if self.window else context, dtype=np.int64))
        out = np.array(row, dtype=np.float32)
        seen = seen[(seen >= 0) & (seen < out.shape[-1])]
        v = out[seen]
        out[seen] = np.where(v > 0, v / self.penalty, v * self.penalty)
        return out

    def record(self) -> dict:
        return {"penalty": self.penalty, "window": self.window}

    def describe(self) -> str:
        """`repetition penalty 1.2` (over the whole text) or `repetition penalty 1.2 over the last 64 tokens`."""
        return f"repetition penalty {self.penalty:g}" + (f" over the last {self.window} tokens" if self.window else "")


def settings_error(temperature: float, top_k: int, top_p: float, min_confidence: float = 0.0) -> str | None:
    """What is wrong with these sampling settings, or None."""
    if not temperature > 0.0 or not np.isfinite(temperature):
        return f"the temperature must be above 0 (0 is greedy decoding), got {temperature}"
    if top_k < 0:
        return f"top-k must be 0 (off) or more, got {top_k}"
    if not 0.0 < top_p <= 1.0:
        return f"top-p must be in (0, 1], got {top_p}"
    if not 0.0 <= min_confidence < 1.0:
        return f"the draft's confidence floor must be in [0, 1), got {min_confidence}"
    return None


class Sampling:
    """Draws tokens from logits at `temperature`, keeping the `top_k` most likely (0: all) and then the
    fewest whose probabilities reach `top_p` (1: all), with a numpy generator seeded by `seed` (None: fresh
    entropy; `seed` then holds the one drawn, so a run can be repeated). As a draft's rule, a guess whose
    filtered probability is under `min_confidence` ends the draft's round."""

    def __init__(self, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, seed: int | None = None,
                 min_confidence: float = 0.0):
        problem = settings_error(temperature, top_k, top_p, min_confidence)
        if problem:
            raise ValueError(problem)
        self.temperature, self.top_k, self.top_p = float(temperature), int(top_k), float(top_p)
        self.min_confidence = float(min_confidence)
        self.seed = int(np.random.SeedSequence().entropy % (2 ** 32)) if seed is None else int(seed)
        self.rng = np.random.default_rng(self.seed)

    def drafting(self, min_confidence: float) -> Sampling:
        """These settings and seed with the draft's confidence floor: the rule of a speculative loop."""
        return Sampling(self.temperature, self.top_k, self.top_p, self.seed, min_confidence)

    def for_prompt(self, i: int) -> Sampling:
        """These settings seeded for the i-th prompt of a benchmark (seed + i), so each prompt draws its own."""
        return Sampling(self.temperature, self.top_k, self.top_p, self.seed + i, self.min_confidence)

    def record(self) -> dict:
        """How the text was sampled, for its JSON (the same settings and seed repeat it)."""
        return {"temperature": self.temperature, "top_k": self.top_k, "top_p": self.top_p, "seed": self.seed}

    def describe(self) -> str:
        """`sampled at temperature 0.8, top-k 40, top-p 0.9, seed 7`."""
        parts = [f"sampled at temperature {self.temperature:g}"]
        if self.top_k:
            parts.append(f"top-k {self.top_k}")
        if self.top_p < 1.0:
            parts.append(f"top-p {self.top_p:g}")
        return ", ".join(parts + [f"seed {self.seed}"])

    def probs(self, row) -> np.ndarray:
        """The filtered distribution (float64, summing to 1) over the vocabulary for one row of logits."""
        z = np.asarray(row, dtype=np.float64) / self.temperature
        if 0 < self.top_k < z.shape[-1]:
            kth = np.partition(z, -self.top_k)[-self.top_k]
            z = np.where(z >= kth, z, -np.inf)
        p = np.exp(z - z.max())
        p /= p.sum()
        if self.top_p < 1.0:
            order = self._ranked(p)
            ranked = np.cumsum(p[order])
            keep = int(np.searchsorted(ranked, self.top_p, side="left")) + 1  # the fewest reaching top_p
            cut = np.zeros_like(p)
            cut[order[:keep]] = p[order[:keep]]
            p = cut / cut.sum()
        return p

    def _ranked(self, p: np.ndarray) -> np.ndarray:
        """Token ids by falling probability, far enough to hold top_p of the mass: the NUCLEUS_ROWS most
        likely (a partial sort, a tenth of a whole vocabulary's) where they reach it, else the whole row."""
        if len(p) > NUCLEUS_ROWS:
            head = np.argpartition(p, len(p) - NUCLEUS_ROWS)[len(p) - NUCLEUS_ROWS:]
            if float(p[head].sum()) >= self.top_p:
                return head[np.argsort(-p[head], kind="stable")]
        return np.argsort(-p, kind="stable")

    def draw(self, p: np.ndarray) -> int:
        """One token drawn from the distribution `p` (a token of probability 0 never)."""
        c = np.cumsum(p)
        return min(int(np.searchsorted(c, self.rng.random() * c[-1], side="right")), len(p) - 1)

    def pick(self, row) -> int:
        return self.draw(self.probs(row))

    def propose(self, row):
        """(token, its distribution) drawn from a draft's logits, or (None, None) under the confidence floor."""
        q = self.probs(row)
        if self.min_confidence > 0.0 and float(q.max()) < self.min_confidence:
            return None, None
        return self.draw(q), q

    def check(self, rows, proposals: list, guesses: list) -> tuple[int, int]:
        """(how many of `proposals` the target keeps, the token that follows them) from the target's logits
        `rows` (one row per proposal, then one more). A guess without a distribution (a context lookup's copy)
        counts as proposed with certainty."""
        for i, x in enumerate(proposals):
            p = self.probs(rows[i])
            q = guesses[i]
            q_x = 1.0 if q is None else float(q[x])
            if self.rng.random() * q_x < p[x]:  # kept with probability min(1, p(x) / q(x))
                continue
            rest = p.copy()
            if q is None:
                rest[x] = 0.0
            else:
                rest = np.maximum(rest - q, 0.0)
            total = rest.sum()
            return i, self.draw(rest / total if total > 0.0 else p)
        return len(proposals), self.pick(rows[len(proposals)])
