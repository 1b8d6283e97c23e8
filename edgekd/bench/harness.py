"""Latency measurement: warmup, timed iterations, percentiles, intervals, interleaved A/B, local runs.

The timing and statistics live in runner.py (the file copied to boards) and are imported from
there, so a board and this host measure with the same code.
"""
from __future__ import annotations

import json
import math
import os
import platform
import subprocess
import sys
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np

from ..config.profiles import Profile
from ..errors import BadInputError, ModelError, StageError
from ..quantize.recipes import needs_precise_int8
from .runner import (
    EXIT_BAD_INPUT,
    bootstrap_ci,
    cold_start,
    peak_rss_mb,
    split_trials,
    summarize,
    throughput,
    time_inference,
)

__all__ = ["time_inference", "summarize", "throughput", "bootstrap_ci", "split_trials", "peak_rss_mb",
           "cold_start", "measure_trials", "latency_with_ci", "interleaved", "ratio_ci", "artifact_size_bytes",
           "runner_files", "runner_path", "runner_backend", "runner_arguments", "bench_local"]

RUNNER = Path(__file__).with_name("runner.py")


def measure_trials(fn: Callable[[np.ndarray], object], sample: np.ndarray, warmup: int, iterations: int,
                   trials: int) -> list[np.ndarray]:
    """`trials` repeated blocks of `iterations` timings each (ms), after one warmup."""
    if trials < 1 or iterations < 1:
        raise ValueError("measure_trials needs at least one trial of one iteration")
    first = time_inference(fn, sample, warmup, iterations)
    return [first] + [time_inference(fn, sample, 0, iterations) for _ in range(trials - 1)]


def latency_with_ci(trials: list[np.ndarray], batch: int = 1) -> dict:
    """Statistics of the pooled trials plus bootstrap 95% intervals of p50 and p90."""
    pooled = np.concatenate([np.asarray(t, dtype=np.float64).ravel() for t in trials])
    return {"latency_ms": summarize(pooled), "throughput": throughput(pooled, batch),
            "latency_ci95": {"p50": bootstrap_ci(trials, 50), "p90": bootstrap_ci(trials, 90)},
            "iterations": int(pooled.size), "trials": len(trials)}


def calls_for(fn: Callable[[np.ndarray], object], sample: np.ndarray, seconds: float, least: int, most: int,
              warmup: int = 0) -> int:
    """How many calls of `fn(sample)` take about `seconds` (from the median of a few timed calls),
    within [least, most]: enough samples for a fast model, no more time than asked for a slow one."""
    per_call_ms = float(np.median(time_inference(fn, sample, warmup, 5)))
    return max(least, min(most, math.ceil(seconds * 1000 / max(per_call_ms, 1e-3))))


def interleaved(fns: Mapping[str, Callable[[np.ndarray], object]], sample: np.ndarray, warmup: int,
                iterations: int, rounds: int) -> dict[str, np.ndarray]:
    """Times of several functions measured in alternating rounds (A B, B A, A B ...), so a drift in
    the machine's speed hits each alike. Returns {name: array of shape (rounds, iterations)} in ms;
    each round re-warms its function with `warmup` untimed calls."""
    names = list(fns)
    if not names or rounds < 1 or iterations < 1:
        raise ValueError("interleaved needs at least one function, one round and one iteration")
    out = {n: np.empty((rounds, iterations), dtype=np.float64) for n in names}
    for r in range(rounds):
        order = names if r % 2 == 0 else names[::-1]
        for n in order:
            out[n][r] = time_inference(fns[n], sample, warmup, iterations)
    return out


def ratio_ci(times_a: np.ndarray, times_b: np.ndarray, confidence: float = 0.95, resamples: int = 2000,
             seed: int = 0) -> dict:
    """p50(a) / p50(b) with a bootstrap interval. Two (rounds, iterations) arrays from `interleaved`
    are resampled round by round, paired, so the interval carries the drift between rounds;
    1-D arrays are resampled as independent samples."""
    a, b = np.asarray(times_a, dtype=np.float64), np.asarray(times_b, dtype=np.float64)
    if a.size == 0 or b.size == 0:
        raise ValueError("ratio_ci needs timings for both sides")
    paired = a.ndim == 2 and b.ndim == 2 and a.shape[0] == b.shape[0]
    ra = a if paired else a.reshape(1, -1)
    rb = b if paired else b.reshape(1, -1)
    rng = np.random.default_rng(seed)
    ratios = np.empty(resamples, dtype=np.float64)
    for i in range(resamples):
        rows = rng.integers(0, ra.shape[0], ra.shape[0]) if paired else np.zeros(1, dtype=np.int64)
        sa, sb = ra[rows], rb[rows]
        pa = sa[np.arange(len(rows))[:, None], rng.integers(0, sa.shape[1], sa.shape)]
        pb = sb[np.arange(len(rows))[:, None], rng.integers(0, sb.shape[1], sb.shape)]
        ratios[i] = np.median(pa) / np.median(pb)
    tail = (1.0 - confidence) / 2 * 100
    lo, hi = np.percentile(ratios, [tail, 100 - tail])
    return {"ratio": float(np.median(a) / np.median(b)), "ci95": [float(lo), float(hi)],
            "paired_rounds": int(ra.shape[0]) if paired else 0}


def artifact_size_bytes(files: list[Path]) -> int:
    """Bytes on disk of the files a board loads (weights included)."""
    return int(sum(Path(f).stat().st_size for f in files if Path(f).is_file()))


def runner_path() -> Path:
    """The standalone runner that is copied to boards."""
    return RUNNER


def runner_files() -> list[Path]:
    """What travels to a board for runner.py: itself, its power sensor reader and its eval data checks."""
    return [RUNNER, *(RUNNER.with_name(n) for n in ("energy.py", "eval_data.py"))]


def runner_backend(model: Path, profile: Profile) -> str:
    """Which runtime measures this artifact: TensorRT (the bundle's trt_runner.py) for a Jetson profile,
    OpenVINO for IR (.xml) or an OpenVINO profile, ONNX Runtime for other .onnx files."""
    suffix = Path(model).suffix.lower()
    if profile.backend == "tensorrt":
        if suffix != ".onnx":
            raise BadInputError(f"bench: {model} is not the bundle's ONNX model; a Jetson builds its TensorRT "
                                "engine from model.onnx in the bundle folder")
        return "tensorrt"  # never ONNX Runtime under a Jetson profile
    if suffix == ".xml":
        return "openvino"
    if suffix == ".onnx":
        return "openvino" if profile.backend == "openvino" else "onnxruntime"
    raise BadInputError(f"bench: {model} is neither an ONNX model (.onnx) nor an OpenVINO IR (.xml); "
                        "those are what the bench runner loads")


def runner_arguments(model: str, profile: Profile, *, backend: str, eval_data: str | None = None,
                     threads: int | None = None, warmup: int | None = None, iterations: int | None = None,
                     duration_s: float | None = None, batch: int = 1) -> list[str]:
    """The runner's command-line arguments for this profile (threads, providers, warmup, iterations)."""
    args = ["--model", model, "--backend", backend, "--warmup", str(profile.bench.warmup if warmup is None else warmup),
            "--batch", str(batch)]
    threads = threads or profile.threads
    if threads:
        args += ["--threads", str(threads)]
    if backend == "onnxruntime" and profile.execution_providers:
        args += ["--providers", ",".join(profile.execution_providers)]
    if backend == "openvino":
        args += ["--device", profile.device]
    if duration_s is not None:
        args += ["--duration", str(duration_s)]
    else:
        args += ["--iterations", str(profile.bench.iterations if iterations is None else iterations)]
    if eval_data:
        args += ["--eval-data", eval_data]
    return args


def bench_local(model: Path, profile: Profile, *, eval_data: Path | None = None, threads: int | None = None,
                warmup: int | None = None, iterations: int | None = None, duration_s: float | None = None,
                batch: int = 1, timeout_s: float | None = None) -> dict:
    """Run runner.py on this host in a fresh process (as a board would) and return its JSON plus
    measured_on; a board profile measured here says so in `measured_on_note`."""
    model = Path(model)
    if not model.is_file():
        raise ModelError(f"bench: artifact {model} does not exist")
    if eval_data is not None and not Path(eval_data).is_file():
        raise BadInputError(f"bench: eval data {eval_data} does not exist")
    backend = runner_backend(model, profile)
    if backend == "tensorrt":
        from .tensorrt_board import bench_here

        result = bench_here(model, [model], profile, sys.executable, eval_data=eval_data, warmup=warmup,
                            iterations=iterations, timeout_s=timeout_s or profile.remote.timeout_s)
        result["measured_on"] = "host"
        return result
    args = runner_arguments(str(model), profile, backend=backend,
                            eval_data=str(eval_data) if eval_data else None, threads=threads, warmup=warmup,
                            iterations=iterations, duration_s=duration_s, batch=batch)
    if args[args.index("--backend") + 1] == "onnxruntime" and needs_precise_int8(model):
        # This host stands in for a board whose int8 kernels do not saturate (see needs_precise_int8).
        args.append("--precise-int8")
    env = {k: v for k, v in os.environ.items() if k != "EDGEKD_EMULATED"}
    with tempfile.TemporaryDirectory(prefix="edgekd-bench-") as tmp:
        out = Path(tmp) / "result.json"
        try:
            proc = subprocess.run([sys.executable, str(RUNNER), *args, "--json", str(out)], env=env,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                  timeout=timeout_s or profile.remote.timeout_s)
        except subprocess.TimeoutExpired:
            raise StageError(f"bench: {model} did not finish within {timeout_s or profile.remote.timeout_s} s "
                             "on this host") from None
        if proc.returncode != 0:
            line = (proc.stderr.strip().splitlines() or [f"runner exited with code {proc.returncode}"])[-1]
            line = line.removeprefix("runner: ")
            raise (ModelError if proc.returncode == EXIT_BAD_INPUT else StageError)(f"bench on this host: {line}")
        result = json.loads(out.read_text())
    result["measured_on"] = "host"
    if not profile.measures_here:
        result["measured_on_note"] = (f"measured on this host ({platform.machine()}), not on a {profile.name}: "
                                      "not the board's latency")
    return result


def resolve_artifact(path: Path) -> tuple[Path, list[Path]]:
    """(the model file to load, every file a board needs): .onnx plus its external data, .xml plus
    its .bin, or the one model in a directory."""
    if path.is_dir():
        found = sorted(path.glob("*.xml")) or sorted(p for p in path.glob("*.onnx")
                                                     if not p.name.endswith(".source.onnx"))
        if len(found) != 1:
            names = ", ".join(p.name for p in found) or "none"
            raise BadInputError(f"bench: {path} must hold exactly one .xml or .onnx model (found: {names}); "
                                "name the file instead")
        path = found[0]
    if not path.is_file():
        raise ModelError(f"bench: artifact {path} does not exist")
    if path.suffix.lower() == ".xml":
        weights = path.with_suffix(".bin")
        if not weights.is_file():
            raise ModelError(f"bench: OpenVINO IR {path} has no weights file {weights.name} beside it")
        return path, [path, weights]
    if path.suffix.lower() != ".onnx":
        raise BadInputError(f"bench: {path} is neither an ONNX model (.onnx) nor an OpenVINO IR (.xml)")
    return path, [path, *_external_data(path)]


def _external_data(path: Path) -> list[Path]:
    try:
        import onnx

        model = onnx.load(str(path), load_external_data=False)
    except Exception:  # noqa: BLE001 - a corrupt file is reported by the runner, with exit 2
        return []
    names = {e.value for t in model.graph.initializer for e in t.external_data if e.key == "location"}
    return [path.parent / n for n in sorted(names) if (path.parent / n).is_file()]
