"""Latency measurement: warmup, timed iterations, percentiles."""
from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np


def time_inference(fn: Callable[[np.ndarray], object], sample: np.ndarray, warmup: int, iterations: int,
                   on_iteration: Callable[[], None] | None = None) -> np.ndarray:
    """Per-iteration wall times in milliseconds of `fn(sample)` after `warmup` untimed calls."""
    for _ in range(warmup):
        fn(sample)
    times = np.empty(iterations, dtype=np.float64)
    clock = time.perf_counter
    for i in range(iterations):
        t0 = clock()
        fn(sample)
        times[i] = (clock() - t0) * 1e3
        if on_iteration:
            on_iteration()
    return times


def summarize(times_ms: np.ndarray) -> dict:
    """p50/p90/p95/p99, mean, std, min, max of per-iteration times (ms)."""
    t = np.asarray(times_ms, dtype=np.float64)
    return {
        "p50": float(np.percentile(t, 50)), "p90": float(np.percentile(t, 90)),
        "p95": float(np.percentile(t, 95)), "p99": float(np.percentile(t, 99)),
        "mean": float(t.mean()), "std": float(t.std()), "min": float(t.min()), "max": float(t.max()),
    }
