#!/usr/bin/env python3
"""edgekd's standalone benchmark runner, copied to a board: needs only numpy and the board's runtime.

    python runner.py --model PATH [--backend onnxruntime|openvino] [--threads N] [--providers A,B]
                     [--warmup N] [--iterations N | --duration S] [--batch N] [--eval-data eval.npz]
                     [--no-latency] [--json OUT]

Prints one JSON object (and writes it to --json). Exit 2: a bad artifact or bad eval data;
exit 3: the runtime is missing or failed. Stays importable on Python 3.8 with numpy alone, because
boards (JetPack 5) ship that; edgekd's harness imports the timing and statistics from here.
"""
from __future__ import annotations

import argparse
import functools
import glob
import hashlib
import importlib.util
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

try:
    import numpy as np
except ImportError as missing:  # a board without numpy: one line and exit 3, like a missing runtime
    if __name__ != "__main__":
        raise
    print(f"runner: numpy is not installed for {sys.executable} ({missing})", file=sys.stderr)
    sys.exit(3)

try:  # imported as edgekd.bench.runner, or run as a script with energy.py beside it (on a board)
    from .energy import find_meter, measure
except ImportError:
    try:
        from energy import find_meter, measure  # type: ignore[no-redef]
    except ImportError:  # an older bundle without energy.py
        find_meter = None  # type: ignore[assignment]
        measure = None  # type: ignore[assignment]

RUNNER_VERSION = 1
EXIT_BAD_INPUT = 2
EXIT_RUNTIME = 3
EMULATED_REASON = "emulated: not representative"
_DTYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64,
           "tensor(uint8)": np.uint8, "tensor(int8)": np.int8, "tensor(int32)": np.int32,
           "tensor(int64)": np.int64}


class RunnerError(Exception):
    """A failure reported as one line on stderr with its exit code (2 bad input, 3 runtime)."""

    def __init__(self, message: str, exit_code: int = EXIT_RUNTIME):
        super().__init__(message)
        self.exit_code = exit_code


# ---------------------------------------------------------------- timing and statistics

def time_inference(fn: Callable[[np.ndarray], object], sample: np.ndarray, warmup: int = 0,
                   iterations: int = 100, on_iteration: Callable[[], None] | None = None, *,
                   warmup_s: float | None = None, duration_s: float | None = None) -> np.ndarray:
    """Per-iteration wall times (ms) of `fn(sample)`: `warmup` untimed calls (and for at least
    `warmup_s` seconds when given), then `iterations` timed calls, or calls for `duration_s` seconds."""
    clock = time.perf_counter
    warm_until = clock() + warmup_s if warmup_s else None
    done = 0
    while done < warmup or (warm_until is not None and clock() < warm_until):
        fn(sample)
        done += 1
    if duration_s is not None:
        out = []
        stop = clock() + duration_s
        while True:
            t0 = clock()
            fn(sample)
            t1 = clock()
            out.append((t1 - t0) * 1e3)
            if on_iteration:
                on_iteration()
            if t1 >= stop:
                return np.asarray(out, dtype=np.float64)
    times = np.empty(iterations, dtype=np.float64)
    for i in range(iterations):
        t0 = clock()
        fn(sample)
        times[i] = (clock() - t0) * 1e3
        if on_iteration:
            on_iteration()
    return times


def summarize(times_ms: np.ndarray, batch: int | None = None) -> dict:
    """p50/p90/p95/p99, mean, std, min, max of per-iteration times (ms); with `batch`, also
    throughput (samples/s)."""
    t = np.asarray(times_ms, dtype=np.float64).ravel()
    if t.size == 0:
        raise ValueError("summarize needs at least one timing")
    p50, p90, p95, p99 = (float(v) for v in np.percentile(t, [50, 90, 95, 99]))
    out = {"p50": p50, "p90": p90, "p95": p95, "p99": p99, "mean": float(t.mean()),
           "std": float(t.std()), "min": float(t.min()), "max": float(t.max())}
    if batch is not None:
        out["throughput"] = throughput(t, batch)
    return out


def throughput(times_ms: np.ndarray, batch: int = 1) -> float:
    """Samples per second of one inference stream: batch * iterations / total timed seconds."""
    t = np.asarray(times_ms, dtype=np.float64).ravel()
    if t.size == 0 or t.sum() <= 0:
        raise ValueError("throughput needs positive timings")
    return float(batch * t.size * 1e3 / t.sum())


def bootstrap_ci(trials: list, q: float = 50.0, confidence: float = 0.95, resamples: int = 2000,
                 seed: int = 0) -> list[float]:
    """[low, high] bootstrap interval of the q-th percentile over repeated trials: each resample
    draws trials with replacement, then iterations within each, so drift between trials widens it."""
    groups = [np.asarray(t, dtype=np.float64).ravel() for t in trials]
    groups = [g for g in groups if g.size]
    if not groups:
        raise ValueError("bootstrap_ci needs at least one non-empty trial")
    rng = np.random.default_rng(seed)
    k = len(groups)
    stats = np.empty(resamples, dtype=np.float64)
    for b in range(resamples):
        picked = [groups[i] for i in rng.integers(0, k, k)]
        pooled = np.concatenate([g[rng.integers(0, g.size, g.size)] for g in picked])
        stats[b] = np.percentile(pooled, q)
    tail = (1.0 - confidence) / 2 * 100
    lo, hi = np.percentile(stats, [tail, 100 - tail])
    return [float(lo), float(hi)]


def split_trials(times_ms: np.ndarray, trials: int) -> list:
    """Consecutive blocks of the timings, one per trial."""
    return [b for b in np.array_split(np.asarray(times_ms), max(1, min(trials, len(times_ms)))) if b.size]


def peak_rss_mb() -> float | None:
    """Peak resident memory of this process in MiB, or None where the platform does not say.

    Linux: VmHWM of /proc/self/status, the high-water mark of this program's own address space. Not
    ru_maxrss: that survives execve, so a runner started by a large process would report its parent's
    resident memory at the fork."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    try:
        import resource
    except ImportError:
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return float(peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024)


def cold_start(create: Callable[[], object], first_call: Callable[[object, object], object],
               prepare: Callable[[object], object] | None = None) -> tuple:
    """(session, input, first output, create ms, first-inference ms): the cost a fresh process pays
    to create the session and run it once; building the input with `prepare(session)` is not timed."""
    t0 = time.perf_counter()
    session = create()
    t1 = time.perf_counter()
    given = prepare(session) if prepare is not None else None
    t2 = time.perf_counter()
    out = first_call(session, given)
    t3 = time.perf_counter()
    return session, given, out, (t1 - t0) * 1e3, (t3 - t2) * 1e3


# ---------------------------------------------------------------- environment

def _read(path: str) -> str | None:
    try:
        with open(path, errors="replace") as f:
            text = f.read().replace("\x00", "").strip()
    except OSError:
        return None
    return text or None


def _command(args: list, timeout: float = 5.0) -> str | None:
    if shutil.which(args[0]) is None:
        return None
    try:
        r = subprocess.run(args, capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.SubprocessError):
        return None
    out = r.stdout.strip()
    return out if r.returncode == 0 and out else None


def _cpuinfo() -> dict:
    fields = {}
    for line in (_read("/proc/cpuinfo") or "").splitlines():
        key, _, value = line.partition(":")
        fields.setdefault(key.strip().lower(), value.strip())
    return fields


def usable_cores() -> int:
    """Cores this process may run on (its affinity), else the machine's count."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def capture_environment() -> dict:
    """CPU model, cores, governor and clocks, board power and throttling state where readable;
    anything that cannot be read is left out, never guessed."""
    info = _cpuinfo()
    env = {"hostname": platform.node(), "os": platform.platform(), "machine": platform.machine(),
           "python": platform.python_version(), "cpu_count": os.cpu_count(), "usable_cores": usable_cores()}
    cpu = (info.get("model name") or _command(["sysctl", "-n", "machdep.cpu.brand_string"])
           or info.get("hardware") or platform.processor())
    if not cpu and info.get("cpu part"):
        cpu = f"ARM implementer {info.get('cpu implementer')} part {info.get('cpu part')}"
    if cpu:
        env["cpu_model"] = cpu
    board = _read("/proc/device-tree/model") or (info.get("model") if not info.get("model", "").isdigit() else None)
    if board:
        env["board_model"] = board
    cpufreq = "/sys/devices/system/cpu/cpu0/cpufreq/"
    for key, name in (("governor", "scaling_governor"), ("cur_freq_mhz", "scaling_cur_freq"),
                      ("max_freq_mhz", "cpuinfo_max_freq")):
        value = _read(cpufreq + name)
        if value:
            env[key] = int(value) / 1000 if value.isdigit() else value
    mem = re.search(r"MemTotal:\s+(\d+)", _read("/proc/meminfo") or "")
    if mem:
        env["memory_mb"] = round(int(mem.group(1)) / 1024)
    if hasattr(os, "getloadavg"):
        env["load_average"] = [round(v, 2) for v in os.getloadavg()]
    jetson = _jetson()
    if jetson:
        env["jetson"] = jetson
    throttled = _command(["vcgencmd", "get_throttled"])
    if throttled and "=" in throttled:
        flags = int(throttled.split("=", 1)[1], 16)
        env["raspberry_pi"] = {"throttled": hex(flags), "throttled_now": bool(flags & 0xF),
                               "throttled_since_boot": bool(flags & 0xF0000)}
        temp = _command(["vcgencmd", "measure_temp"])
        if temp:
            env["raspberry_pi"]["temperature"] = temp.split("=", 1)[-1]
    return env


def _jetson() -> dict:
    out: dict = {}
    release = _read("/etc/nv_tegra_release")
    if release:
        out["l4t"] = release.splitlines()[0]
    mode = _command(["nvpmodel", "-q"])
    if mode:
        out["nvpmodel"] = mode.splitlines()[0].split(":", 1)[-1].strip()
    clocks = _command(["jetson_clocks", "--show"])
    if clocks:
        out["clocks"] = clocks.splitlines()[:20]
    if out:
        for cur in sorted(glob.glob("/sys/class/devfreq/*/cur_freq")):
            value = _read(cur)
            if value and value.isdigit():
                out.setdefault("devfreq_mhz", {})[cur.split("/")[-2]] = int(value) / 1e6
    return out


# ---------------------------------------------------------------- runtimes

class Session:
    """A loaded model: first input's name, shape (None where dynamic), dtype; `infer` -> first output."""

    def __init__(self, infer: Callable[[np.ndarray], object], first_output: Callable[[np.ndarray], np.ndarray],
                 shape: list, dtype: type, details: dict, versions: dict):
        self.infer, self.first_output = infer, first_output
        self.shape, self.dtype, self.details, self.versions = shape, dtype, details, versions


def _first_line(e: BaseException) -> str:
    text = str(e).strip() or type(e).__name__
    return text.splitlines()[0][:300]


def import_runtime(backend: str) -> Any:
    """The runtime's module; a board without it is a runtime failure (exit 3) that names the Python."""
    try:
        if backend == "openvino":
            import openvino as module
        else:
            import onnxruntime as module
    except ImportError as e:
        raise RunnerError(f"{backend} is not installed for {sys.executable} ({_first_line(e)})") from None
    return module


def one_input(names: list, path: str) -> None:
    """The runner feeds one input tensor (images); a model that takes more is bad input, named with its inputs."""
    if len(names) != 1:
        raise RunnerError(f"{path} takes {len(names)} inputs ({', '.join(names)}); edgekd bench feeds a model one "
                          "input tensor", EXIT_BAD_INPUT)


def load_onnxruntime(path: str, threads: int, providers: list, precise_int8: bool = False) -> Session:
    """An ONNX Runtime session with `threads` intra-op threads and the providers this build has;
    `precise_int8`: x86 int8 products summed without 16-bit saturation (session.x64quantprecision)."""
    ort = import_runtime("onnxruntime")
    available = ort.get_available_providers()
    chosen = [p for p in providers if p in available and p != "CPUExecutionProvider"] + ["CPUExecutionProvider"]
    so = ort.SessionOptions()
    so.log_severity_level = 4  # errors come back as exceptions, reported in one line
    so.intra_op_num_threads = threads
    if precise_int8:
        so.add_session_config_entry("session.x64quantprecision", "1")
    with_options: list = list(chosen)
    if "XnnpackExecutionProvider" in chosen:
        # ONNX Runtime's advice for XNNPACK: its own pool does the work, the session's pool stays at 1.
        so.intra_op_num_threads = 1
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        with_options[chosen.index("XnnpackExecutionProvider")] = (
            "XnnpackExecutionProvider", {"intra_op_num_threads": str(threads)})
    try:
        sess = ort.InferenceSession(path, so, providers=with_options)
    except Exception as e:  # noqa: BLE001 - onnxruntime raises its own exception types
        raise RunnerError(f"onnxruntime cannot load {path}: {_first_line(e)}", EXIT_BAD_INPUT) from None
    one_input([i.name for i in sess.get_inputs()], path)
    inp = sess.get_inputs()[0]
    name = inp.name
    shape = [d if isinstance(d, int) and d > 0 else None for d in inp.shape]
    details = {"execution_providers": sess.get_providers(), "threads": threads,
               "providers_unavailable": [p for p in providers if p not in available]}
    if precise_int8:
        details["x64quantprecision"] = True

    def run(x: np.ndarray) -> object:
        return sess.run(None, {name: x})

    return Session(run, lambda x: np.asarray(sess.run(None, {name: x})[0]), shape,
                   _DTYPES.get(inp.type, np.float32), details, {"onnxruntime": ort.__version__})


def load_openvino(path: str, threads: int, device: str) -> Session:
    """An OpenVINO compiled model (latency hint, `threads` inference threads) and one infer request."""
    ov = import_runtime("openvino")
    core = ov.Core()
    try:
        model = core.read_model(path)
    except Exception as e:  # noqa: BLE001
        raise RunnerError(f"openvino cannot read {path}: {_first_line(e)}", EXIT_BAD_INPUT) from None
    config: dict = {"PERFORMANCE_HINT": "LATENCY"}
    if device.upper().startswith("CPU"):
        config["INFERENCE_NUM_THREADS"] = threads
    try:
        compiled = core.compile_model(model, device, config)
    except Exception as e:  # noqa: BLE001
        raise RunnerError(f"openvino cannot compile {path} for {device}: {_first_line(e)}") from None
    one_input([p.get_any_name() for p in model.inputs], path)
    request = compiled.create_infer_request()
    port = model.input(0)
    shape = [d.get_length() if d.is_static else None for d in port.get_partial_shape()]
    try:
        dtype = port.get_element_type().to_dtype().type
    except Exception:  # noqa: BLE001 - element types without a numpy twin
        dtype = np.float32

    def first(x: np.ndarray) -> np.ndarray:
        request.infer({0: x})
        return np.array(request.get_output_tensor(0).data)

    return Session(lambda x: request.infer({0: x}), first, shape, dtype,
                   {"device": device, "threads": threads, "execution_providers": [f"openvino:{device}"]},
                   {"openvino": ov.__version__})


# ---------------------------------------------------------------- data

@functools.lru_cache(maxsize=1)
def _eval_data_module() -> Any:
    try:
        from . import eval_data
    except ImportError:  # run as a script, perhaps with -I (its folder then is not on sys.path): read the file
        path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "eval_data.py")
        if not os.path.isfile(path):
            raise RunnerError(f"eval_data.py is not beside the runner ({path})") from None
        spec = importlib.util.spec_from_file_location("eval_data", path)
        eval_data = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
        spec.loader.exec_module(eval_data)  # type: ignore[union-attr]
    return eval_data


@contextmanager
def eval_checks() -> Iterator[Any]:
    """eval_data.py, read only where eval data is given (beside this file on a board; the LM bundles, which
    never score images, carry runner.py without it); what it finds wrong is bad input, exit 2."""
    eval_data = _eval_data_module()
    try:
        yield eval_data
    except eval_data.EvalDataError as e:
        raise RunnerError(str(e), EXIT_BAD_INPUT) from None


def input_shape(model_shape: list, batch: int, sample_shape: tuple | None) -> list:
    """The concrete input shape: the model's static dims, the batch, the eval data's other dims."""
    if sample_shape is not None:
        if len(sample_shape) != len(model_shape):
            raise RunnerError(f"eval data x has rank {len(sample_shape)} per batch, the model expects rank "
                              f"{len(model_shape)} {model_shape}", EXIT_BAD_INPUT)
        for i in range(1, len(model_shape)):
            if model_shape[i] is not None and model_shape[i] != sample_shape[i]:
                raise RunnerError(f"eval data x has size {sample_shape[i]} on axis {i}, the model expects "
                                  f"{model_shape[i]}", EXIT_BAD_INPUT)
    shape = [model_shape[0] or batch]
    for i, m in enumerate(model_shape[1:], start=1):
        if m is None and sample_shape is None:
            raise RunnerError(f"the model's input axis {i} is dynamic; pass --eval-data so its size is known",
                              EXIT_BAD_INPUT)
        shape.append(m if m is not None else sample_shape[i])
    return shape


def predict(session: Session, x: np.ndarray, batch: int, static_batch: bool) -> tuple:
    """(argmax class per sample, classes), in chunks of `batch` (the last one padded when the batch is fixed);
    (None, why) where the first output is not class scores."""
    checks, preds = _eval_data_module(), []
    for start in range(0, len(x), batch):
        chunk = np.ascontiguousarray(x[start:start + batch], dtype=session.dtype)
        n = len(chunk)
        if static_batch and n < batch:
            chunk = np.concatenate([chunk, np.zeros((batch - n,) + chunk.shape[1:], chunk.dtype)])
        try:
            out = session.first_output(chunk)
        except Exception as e:  # noqa: BLE001
            raise RunnerError(f"inference failed on eval samples {start}..{start + n - 1}: {_first_line(e)}") from None
        out, why = checks.class_scores(np.asarray(out))  # raises nothing: (None, why) where not scores
        if why:
            return None, why
        classes = out.shape[1]
        preds.append(out[:n].argmax(axis=1))
    return np.concatenate(preds).astype(np.int64), classes


# ---------------------------------------------------------------- the command

def parse_args(argv: list | None = None) -> argparse.Namespace:
    """The runner's command line (see the module docstring)."""
    p = argparse.ArgumentParser(prog="runner.py", description="Benchmark one model with its runtime; print JSON.")
    p.add_argument("--model", required=True, help="the artifact: .onnx (onnxruntime) or .xml (openvino)")
    p.add_argument("--backend", choices=["onnxruntime", "openvino"], help="default: by the model's suffix")
    p.add_argument("--threads", type=int, help="inference threads (default: the cores this process may use)")
    p.add_argument("--providers", default="", help="onnxruntime execution providers, comma separated")
    p.add_argument("--device", default="CPU", help="openvino device")
    p.add_argument("--precise-int8", action="store_true",
                   help="onnxruntime on x86: int8 products without 16-bit saturation (for S8S8 models made for "
                        "ARM or TensorRT)")
    p.add_argument("--warmup", type=int, default=20, help="untimed calls before timing")
    p.add_argument("--warmup-s", type=float, help="also warm up for at least this many seconds")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--iterations", type=int, help="timed calls (default 200)")
    group.add_argument("--duration", type=float, help="time calls for this many seconds instead")
    p.add_argument("--trials", type=int, default=5, help="blocks the timings are split into for the intervals")
    p.add_argument("--batch", type=int, default=1, help="samples per timed call (a fixed model batch wins)")
    p.add_argument("--eval-data", help=".npz with x (float32 NCHW) and optionally y")
    p.add_argument("--no-latency", action="store_true", help="skip the timing loop")
    p.add_argument("--keep-times", action="store_true", help="include every timing in the JSON (times_ms)")
    p.add_argument("--json", help="also write the JSON object to this file")
    args = p.parse_args(argv)
    for name in ("threads", "iterations", "batch", "trials"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            p.error(f"--{name} must be at least 1")
    if args.warmup < 0 or (args.duration is not None and not 0 < args.duration < float("inf")) or (
            args.warmup_s is not None and not 0 <= args.warmup_s < float("inf")):
        p.error("--warmup and --warmup-s must be >= 0 and --duration > 0, all finite")
    return args


def benchmark(args: argparse.Namespace) -> dict:
    """Load, time, evaluate: the result object the runner prints."""
    emulated = os.environ.get("EDGEKD_EMULATED") == "1"
    model = args.model
    if not os.path.isfile(model):
        raise RunnerError(f"model {model} does not exist", EXIT_BAD_INPUT)
    backend = args.backend or ("openvino" if model.endswith(".xml") else "onnxruntime")
    threads = args.threads or usable_cores()
    providers = [p.strip() for p in args.providers.split(",") if p.strip()]
    eval_shape = None
    if args.eval_data:
        with eval_checks() as checks:
            eval_shape = checks.npz_shape(args.eval_data)

    t0 = time.perf_counter()
    import_runtime(backend)
    import_ms = (time.perf_counter() - t0) * 1e3

    def create() -> Session:
        if backend == "openvino":
            return load_openvino(model, threads, args.device)
        return load_onnxruntime(model, threads, providers, args.precise_int8)

    def first_call(s: Session, sample: np.ndarray) -> object:
        try:
            return s.infer(sample)
        except Exception as e:  # noqa: BLE001
            raise RunnerError(f"first inference of {model} failed: {_first_line(e)}") from None

    session, sample, _, create_ms, first_ms = cold_start(
        create, first_call, lambda s: _sample(s, args.batch, eval_shape))
    result: dict = {"runner_version": RUNNER_VERSION, "model": os.path.basename(model), "backend": backend,
                    "artifact_bytes": _artifact_bytes(model), "batch": int(sample.shape[0]), "emulated": emulated}
    reason = EMULATED_REASON if emulated else ("latency not requested (--no-latency)" if args.no_latency else None)
    if reason:
        result.update(latency_ms=None, not_measured=reason, throughput=None, latency_ci95=None,
                      energy_mj=None, avg_power_w=None, energy_not_measured=reason)
    else:
        timed: dict = {}

        def timed_loop() -> int:
            timed["times"] = time_inference(session.infer, sample, args.warmup, args.iterations or 200,
                                            warmup_s=args.warmup_s, duration_s=args.duration)
            return int(timed["times"].size) * int(sample.shape[0])

        try:
            energy = energy_of(timed_loop)
        except Exception as e:  # noqa: BLE001
            raise RunnerError(f"inference of {model} failed while timing: {_first_line(e)}") from None
        times = timed["times"]
        result.update(energy)
        trials = split_trials(times, args.trials)
        result.update(latency_ms=summarize(times), throughput=throughput(times, int(sample.shape[0])),
                      throughput_unit="samples/s",
                      latency_ci95={"p50": bootstrap_ci(trials, 50), "p90": bootstrap_ci(trials, 90)},
                      warmup=args.warmup, iterations=int(times.size), trials=len(trials),
                      timed_seconds=round(float(times.sum()) / 1e3, 3))
        if args.keep_times:
            result["times_ms"] = [round(float(t), 6) for t in times]
    result["cold_start_ms"] = None if emulated else create_ms + first_ms
    result["session_create_ms"] = None if emulated else create_ms
    result["runtime_import_ms"] = None if emulated else import_ms
    result["first_inference_ms"] = None if emulated else first_ms
    # Measured before the eval set is loaded: the memory serving the model needs, not the test data.
    result["peak_rss_mb"] = None if emulated else peak_rss_mb()
    result.update(_evaluate(session, args.eval_data, sample.shape[0]))
    env = capture_environment()
    env.update(backend=backend, **session.details)
    result["environment"] = env
    result["versions"] = {"runner": RUNNER_VERSION, "python": platform.python_version(),
                          "numpy": np.__version__, **session.versions}
    return result


def energy_of(loop: Callable[[], int]) -> dict:
    """Run the timed loop under this machine's power sensor: energy per inference (mJ) and average power
    (W) while it ran, or nulls with the reason (see energy.py)."""
    if find_meter is None or measure is None:
        loop()
        return {"energy_mj": None, "avg_power_w": None, "energy_not_measured": "energy.py is not beside the runner"}
    meter, why = find_meter()
    return measure(meter, why, loop)


def _sample(session: Session, batch: int, eval_shape: tuple | None) -> np.ndarray:
    shape = input_shape(session.shape, batch, eval_shape)
    rng = np.random.default_rng(0)
    return np.ascontiguousarray(rng.standard_normal(shape).astype(session.dtype))


def _artifact_bytes(model: str) -> int:
    files = [model] + ([model[:-4] + ".bin"] if model.endswith(".xml") else [])
    return int(sum(os.path.getsize(f) for f in files if os.path.isfile(f)))


def _evaluate(session: Session, eval_data: str | None, batch: int) -> dict:
    if not eval_data:
        return {"accuracy": None, "accuracy_not_measured": "no eval data given", "eval_samples": 0}
    with eval_checks() as checks:
        x, y = checks.load_eval(eval_data)
    static = session.shape[0] is not None
    preds, classes = predict(session, x, batch if static else max(batch, 32), static)
    if preds is None:
        if y is not None:
            raise RunnerError(f"eval data {eval_data} has labels (y) but {classes}", EXIT_BAD_INPUT)
        return {"accuracy": None, "accuracy_not_measured": classes, "eval_samples": int(len(x))}
    with eval_checks() as checks:
        checks.check_classes(y, classes, f"eval data {eval_data}")
    out: dict = {"eval_samples": int(len(x)), "predictions": [int(p) for p in preds],
                 "predictions_sha256": hashlib.sha256(preds.astype("<i8").tobytes()).hexdigest()}
    if y is None:
        out.update(accuracy=None, accuracy_not_measured="eval data has no labels (y)")
    else:
        out["accuracy"] = float(100.0 * np.mean(preds == y))
    return out


def main(argv: list | None = None) -> int:
    """Run the benchmark and print its JSON; on failure one line on stderr and exit 2 or 3."""
    args = parse_args(argv)
    try:
        result = benchmark(args)
        text = json.dumps(result, allow_nan=False)
        if args.json:
            tmp = args.json + ".tmp"
            with open(tmp, "w") as f:
                f.write(text + "\n")
            os.replace(tmp, args.json)
    except RunnerError as e:
        print(f"runner: {e}", file=sys.stderr)
        return e.exit_code
    except (OSError, ValueError, MemoryError) as e:
        print(f"runner: {type(e).__name__}: {_first_line(e)}", file=sys.stderr)
        return EXIT_RUNTIME
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
