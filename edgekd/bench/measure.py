"""Accuracy with the serving runtime and interleaved latency for several runners on one host."""
from __future__ import annotations

import numpy as np

from ..backends.base import Runner
from ..progress import NullProgress, Progress
from .harness import calls_for, summarize, time_inference

EVAL_BATCH = 64


def predict(runner: Runner, x: np.ndarray, batch_size: int = EVAL_BATCH) -> np.ndarray:
    """Logits of the runtime for every row of `x`."""
    return np.concatenate([runner.infer(x[i:i + batch_size]) for i in range(0, len(x), batch_size)])


def accuracy_of(logits: np.ndarray, y: np.ndarray) -> float:
    """Top-1 accuracy in percent."""
    return float((logits.argmax(1) == y).mean() * 100)


def agreement_of(a: np.ndarray, b: np.ndarray) -> float:
    """Top-1 agreement in percent between two logit arrays."""
    return float((a.argmax(1) == b.argmax(1)).mean() * 100)


def margin_flip_estimate(reference: np.ndarray, candidate: np.ndarray) -> float:
    """Top-1 disagreement in percent that `candidate` (a quantized model) would show on the population the
    inputs come from, estimated from its margins: a few hundred inputs rarely contain the one in a hundred
    that flips, but they show how far the reference's winner leads (m_i, its margin over the runner-up)
    and how much the candidate moves that lead (d_j, the candidate's margin of the same winner minus
    m_i). An input flips when m + d < 0; pairing every margin with every shift (error independent of the
    margin) gives the estimate, mean over i, j of [m_i + d_j < 0], which sees a flip rate far below 1/n."""
    win = reference.argmax(1)
    rows = np.arange(len(reference))
    rest = reference.astype(np.float64).copy()
    rest[rows, win] = -np.inf
    margin = reference[rows, win].astype(np.float64) - rest.max(1)
    crest = candidate.astype(np.float64).copy()
    crest[rows, win] = -np.inf
    shift = (candidate[rows, win].astype(np.float64) - crest.max(1)) - margin
    margins = np.sort(margin)
    below = np.searchsorted(margins, -shift, side="left")  # per shift: how many margins it overturns
    return float(below.sum() / (len(margins) * len(shift)) * 100)


def sqnr_db(reference: np.ndarray, candidate: np.ndarray) -> float:
    """Signal-to-quantization-noise ratio of `candidate` against `reference` logits, in dB."""
    noise = float(((reference - candidate) ** 2).sum())
    signal = float((reference ** 2).sum())
    return float("inf") if noise == 0 else 10 * float(np.log10(max(signal, 1e-30) / noise))


MIN_ROUND_S, MAX_ROUND_CALLS = 0.1, 2000


def bench_interleaved(runners: dict[str, Runner], sample: np.ndarray, warmup: int, iterations: int,
                      rounds: int = 5, progress: Progress | None = None) -> dict[str, dict]:
    """Latency of each runner on one sample, measured in interleaved rounds (A B C A B C ...) so that a
    drift in the machine's speed affects all alike. Returns summarize() per name plus the samples."""
    progress = progress or NullProgress()
    per_round = max(1, iterations // rounds)
    times: dict[str, list[np.ndarray]] = {k: [] for k in runners}
    counts = {}
    for name, r in runners.items():
        time_inference(r.infer, sample, warmup, 0)
        # A round lasts at least MIN_ROUND_S per runner: a sub-millisecond model gets enough calls per
        # round that one scheduler hiccup cannot decide a comparison; a slow model keeps `iterations`.
        counts[name] = calls_for(r.infer, sample, MIN_ROUND_S, per_round, max(per_round, MAX_ROUND_CALLS))
    with progress.task("benchmarking", sum(counts.values()) * rounds) as bar:
        for _ in range(rounds):
            for name, r in runners.items():
                # A runner with its own device clock (TensorRT: CUDA events on its stream) times itself.
                own = getattr(r, "device_times", None)
                times[name].append(own(sample, 3, counts[name]) if own else
                                   time_inference(r.infer, sample, 3, counts[name], None))
                bar.advance(counts[name])
    out = {}
    for name, chunks in times.items():
        t = np.concatenate(chunks)
        out[name] = {**summarize(t), "iterations": int(len(t)), "warmup": warmup, "rounds": rounds,
                     "samples_ms": [round(float(v), 4) for v in t]}
    return out
