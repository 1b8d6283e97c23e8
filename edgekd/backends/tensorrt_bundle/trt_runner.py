#!/usr/bin/env python3
"""Build and benchmark this bundle's TensorRT engine on the Jetson itself (TensorRT 8.5 to 11, JetPack 5 to 7).

    python3 trt_runner.py build [--onnx model.onnx] [--engine model.engine] [--precision int8|fp16|fp32]
                                [--workspace-mb N] [--dla-core N] [--timing-cache timing.cache]
    python3 trt_runner.py bench [--engine model.engine] [--eval-data eval.npz] [--warmup N]
                                [--iterations N] [--json OUT]

Defaults come from bundle.json beside this file. `build` parses the explicitly quantized (QDQ) ONNX with
the builder API of the installed TensorRT: from 10.12 (and in 11, which removed the precision flags) a
strongly typed network whose precision comes from the model; below 10.12 the INT8 + FP16 flags (FP16 for
layers without Q/DQ; no calibrator). It reuses and updates the timing cache and saves the engine. `bench` times host-to-device copy + execute + device-to-host
copy with CUDA events and prints one JSON object with the fields of edgekd's bench runner.
Device memory comes from trt_device.py: cuda-python (`pip3 install cuda-python`) when it imports, else
torch.cuda. Needs only tensorrt and numpy besides; exit 2: bad input, exit 3: runtime failure.
"""
from __future__ import annotations

import argparse
import glob
import hashlib
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import time

import numpy as np

try:  # imported as edgekd.backends.tensorrt_bundle.trt_runner
    from .trt_device import DeviceError, cuda_memory
except ImportError:  # run as a script in the bundle
    from trt_device import DeviceError, cuda_memory
try:  # the board's power sensor, when the bundle carries energy.py (edgekd's, beside this file)
    from ...bench.energy import find_meter, measure
except ImportError:
    try:
        from energy import find_meter, measure  # type: ignore[no-redef]
    except ImportError:
        find_meter = measure = None  # type: ignore[assignment]

HERE = os.path.dirname(os.path.abspath(__file__))
EXIT_BAD_INPUT, EXIT_RUNTIME = 2, 3
TIMING = "CUDA events around host-to-device copy, execute_async_v3 and device-to-host copy, batch of the engine"


class RunnerError(Exception):
    """One line on stderr and an exit code (2 bad input, 3 runtime)."""

    def __init__(self, message: str, exit_code: int = EXIT_RUNTIME):
        super().__init__(message)
        self.exit_code = exit_code


def _first_line(e: BaseException) -> str:
    text = str(e).strip() or type(e).__name__
    return text.splitlines()[0][:300]


def _import_tensorrt():
    try:
        import tensorrt as trt
    except ImportError as e:
        raise RunnerError(f"tensorrt does not import for {sys.executable} ({_first_line(e)}); on a Jetson it "
                          "comes with JetPack (python3-libnvinfer)") from None
    return trt


# ---------------------------------------------------------------- build

# TensorRT 10.12 deprecated BuilderFlag.INT8 / FP16 and TensorRT 11 removed them: from 10.12 the network
# is strongly typed, its precision coming from the model (Q/DQ pairs give int8, FP16 tensors fp16).
STRONGLY_TYPED_FROM = (10, 12)


def trt_version(text: str) -> tuple:
    """(major, minor) of a TensorRT version string such as '10.3.0.30' or '11.0.0'."""
    parts = [int(p) for p in re.findall(r"\d+", text)[:2]]
    return tuple((parts + [0, 0])[:2]) if parts else (0, 0)


def builder_api(version: tuple, has_precision_flags: bool = True) -> str:
    """'strongly-typed' from TensorRT 10.12 (or wherever the INT8/FP16 flags are gone), else 'flags'."""
    return "strongly-typed" if version >= STRONGLY_TYPED_FROM or not has_precision_flags else "flags"


def dla_problem(version: tuple, precision: str, dla_core) -> str | None:
    """Why this build cannot use the DLA, or None. DLA runs int8 and fp16; TensorRT 10.8 to 11.3 ship no DLA
    support, and explicitly quantized (Q/DQ) int8 on the DLA needs TensorRT 8.6 (JetPack 6): JetPack 5's 8.5
    builds it for the GPU only."""
    if dla_core is None:
        return None
    v = ".".join(str(x) for x in version)
    if precision == "fp32":
        return "DLA runs int8 or fp16 only; build fp32 without --dla-core"
    if (10, 8) <= version < (11, 4):
        return f"TensorRT {v} has no DLA support (10.7 was the last before 11.4); build without --dla-core"
    if precision == "int8" and version < (8, 6):
        return (f"explicitly quantized (Q/DQ) int8 on the DLA needs TensorRT 8.6 or later (JetPack 6); this board "
                f"has {v}: build without --dla-core")
    return None


def network_flags(trt, api: str, version: tuple) -> int:
    """Network creation flags: explicit batch before TensorRT 10, strongly typed for the new API."""
    flags = 0
    if version[0] < 10:
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH)
    if api == "strongly-typed" and hasattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED"):
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    return flags


def build_engine(onnx_path: str, engine_path: str, precision: str = "int8", workspace_mb: int = 1024,
                 timing_cache: str | None = "timing.cache", dla_core: int | None = None) -> dict:
    """Parse `onnx_path` and build the engine with the API this TensorRT has (see builder_api): a strongly
    typed network from 10.12, the INT8/FP16 flags below it; reuse and update the timing cache; save."""
    trt = _import_tensorrt()
    if precision not in ("int8", "fp16", "fp32"):
        raise RunnerError(f"precision {precision!r} is not int8, fp16 or fp32", EXIT_BAD_INPUT)
    if not os.path.isfile(onnx_path):
        raise RunnerError(f"ONNX model {onnx_path} does not exist", EXIT_BAD_INPUT)
    version = trt_version(trt.__version__)
    api = builder_api(version, hasattr(trt.BuilderFlag, "INT8") and hasattr(trt.BuilderFlag, "FP16"))
    problem = dla_problem(version, precision, dla_core)
    if problem:
        raise RunnerError(problem, EXIT_BAD_INPUT)
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(network_flags(trt, api, version))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(onnx_path):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RunnerError(f"TensorRT cannot parse {onnx_path}: {errors[:500]}", EXIT_BAD_INPUT)
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_mb) << 20)
    if api == "flags":
        if precision == "int8":
            config.set_flag(trt.BuilderFlag.INT8)  # Q/DQ nodes give the scales: no calibrator
        if precision in ("int8", "fp16"):
            config.set_flag(trt.BuilderFlag.FP16)  # layers outside Q/DQ pairs may run in FP16
    _static_profile(trt, builder, network, config)
    if dla_core is not None:
        if builder.num_DLA_cores <= dla_core:
            raise RunnerError(f"DLA core {dla_core} requested; this device has {builder.num_DLA_cores}",
                              EXIT_BAD_INPUT)
        config.default_device_type = trt.DeviceType.DLA
        config.DLA_core = int(dla_core)
        config.set_flag(trt.BuilderFlag.GPU_FALLBACK)
    cache_bytes = b""
    if timing_cache and os.path.isfile(timing_cache):
        with open(timing_cache, "rb") as f:
            cache_bytes = f.read()
    cache = config.create_timing_cache(cache_bytes)
    cache_used = bool(config.set_timing_cache(cache, ignore_mismatch=False))
    if not cache_used and cache_bytes:  # a cache from another TensorRT or GPU: start a new one
        cache = config.create_timing_cache(b"")
        cache_used = bool(config.set_timing_cache(cache, ignore_mismatch=False))
    t0 = time.perf_counter()
    serialized = builder.build_serialized_network(network, config)
    build_s = time.perf_counter() - t0
    if serialized is None:
        raise RunnerError(f"TensorRT failed to build an engine from {onnx_path} (see the log above)")
    _write(engine_path, memoryview(serialized))
    if timing_cache and cache_used:
        _write(timing_cache, memoryview(config.get_timing_cache().serialize()))
    return {"engine": engine_path, "engine_bytes": os.path.getsize(engine_path), "build_s": round(build_s, 3),
            "precision": precision, "dla_core": dla_core, "workspace_mb": int(workspace_mb),
            "builder_api": api, "timing_cache": timing_cache if cache_used else None,
            "timing_cache_reused": bool(cache_bytes) and cache_used, "tensorrt": trt.__version__}


def _static_profile(trt, builder, network, config) -> None:
    """An optimization profile with min = opt = max at batch 1 for an input whose batch is dynamic."""
    profile = None
    for i in range(network.num_inputs):
        inp = network.get_input(i)
        shape = list(inp.shape)
        if all(d >= 0 for d in shape):
            continue
        if any(d < 0 for d in shape[1:]):
            raise RunnerError(f"input {inp.name!r} has dynamic dimensions {shape} beyond the batch; export it "
                              "with a static C, H, W", EXIT_BAD_INPUT)
        shape[0] = 1
        profile = profile or builder.create_optimization_profile()
        profile.set_shape(inp.name, shape, shape, shape)
    if profile is not None:
        config.add_optimization_profile(profile)


def _write(path: str, data) -> None:
    tmp = path + ".part"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


# ---------------------------------------------------------------- engine

class TrtEngine:
    """A deserialized engine with one execution context and device buffers for one input and its outputs."""

    def __init__(self, engine_path: str):
        trt = _import_tensorrt()
        if not os.path.isfile(engine_path):
            raise RunnerError(f"engine {engine_path} does not exist: build it first (./build_engine.sh)",
                              EXIT_BAD_INPUT)
        t0 = time.perf_counter()
        self.trt, self.logger = trt, trt.Logger(trt.Logger.WARNING)
        with open(engine_path, "rb") as f:
            self.engine = trt.Runtime(self.logger).deserialize_cuda_engine(f.read())
        if self.engine is None:
            raise RunnerError(f"cannot deserialize {engine_path}: engines only load with the TensorRT version "
                              "and GPU they were built with; rebuild it on this device")
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        if len(inputs) != 1:
            raise RunnerError(f"engine {engine_path} has {len(inputs)} inputs; this runner handles one",
                              EXIT_BAD_INPUT)
        self.input_name, self.output_names = inputs[0], [n for n in names if n not in inputs]
        shape = tuple(self.engine.get_tensor_shape(self.input_name))
        if any(d < 0 for d in shape):  # dynamic input: run the profile's optimal shape
            shape = tuple(self.engine.get_tensor_profile_shape(self.input_name, 0)[1])
            self.context.set_input_shape(self.input_name, shape)
        self.cuda = cuda_memory()
        self.host, self.device = {}, {}
        for name in names:
            dims = shape if name == self.input_name else tuple(self.context.get_tensor_shape(name))
            dtype = trt.nptype(self.engine.get_tensor_dtype(name))
            pinned = getattr(self.cuda, "host_empty", None)  # page-locked, so the copies are what is timed
            self.host[name] = pinned(tuple(dims), dtype) if pinned else np.empty(dims, dtype=dtype)
            self.device[name] = self.cuda.alloc(max(1, self.host[name].nbytes))
            self.context.set_tensor_address(name, self.device[name])
        self.input_shape = shape
        self.load_ms = (time.perf_counter() - t0) * 1e3

    def _enqueue(self, x: np.ndarray) -> None:
        np.copyto(self.host[self.input_name], x, casting="same_kind")
        self.cuda.to_device(self.device[self.input_name], self.host[self.input_name])
        if not self.context.execute_async_v3(self.cuda.handle):
            raise RunnerError("TensorRT execute_async_v3 failed")
        for name in self.output_names:
            self.cuda.to_host(self.host[name], self.device[name])

    def run(self, x: np.ndarray) -> np.ndarray:
        """First output for exactly the engine's input shape."""
        self._enqueue(x)
        self.cuda.synchronize()
        return self.host[self.output_names[0]].copy()

    def infer(self, batch: np.ndarray) -> np.ndarray:
        """First output for any number of rows: chunks of the engine's batch, the last one zero-padded."""
        b, outs = self.input_shape[0], []
        for start in range(0, len(batch), b):
            chunk = batch[start:start + b]
            n = len(chunk)
            if n < b:
                chunk = np.concatenate([chunk, np.zeros((b - n,) + chunk.shape[1:], chunk.dtype)])
            outs.append(self.run(chunk)[:n].reshape(n, -1))
        return np.concatenate(outs)

    def time_ms(self, sample: np.ndarray, warmup: int, iterations: int) -> np.ndarray:
        """Per-iteration GPU-stream times (ms) from CUDA events after `warmup` untimed runs."""
        for _ in range(warmup):
            self.run(sample)
        start, end = self.cuda.event(), self.cuda.event()
        times = np.empty(iterations, dtype=np.float64)
        for i in range(iterations):
            self.cuda.record(start)
            self._enqueue(sample)
            self.cuda.record(end)
            times[i] = self.cuda.elapsed_ms(start, end)
        return times

    def close(self) -> None:
        for ptr in self.device.values():
            self.cuda.free(ptr)
        self.device = {}
        self.host = {}
        release = getattr(self.cuda, "free_host", None)
        if release:
            release()


# ---------------------------------------------------------------- environment and statistics

def summarize(times_ms: np.ndarray) -> dict:
    """p50/p90/p95/p99, mean, std, min, max (ms)."""
    t = np.asarray(times_ms, dtype=np.float64)
    p50, p90, p95, p99 = (float(v) for v in np.percentile(t, [50, 90, 95, 99]))
    return {"p50": p50, "p90": p90, "p95": p95, "p99": p99, "mean": float(t.mean()), "std": float(t.std()),
            "min": float(t.min()), "max": float(t.max())}


def _read(path: str) -> str | None:
    try:
        with open(path, errors="replace") as f:
            return f.read().replace("\x00", "").strip() or None
    except OSError:
        return None


def _command(args: list) -> str | None:
    if shutil.which(args[0]) is None:
        return None
    try:
        r = subprocess.run(args, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return r.stdout.strip() if r.returncode == 0 and r.stdout.strip() else None


def versions(trt=None, cuda=None) -> dict:
    """TensorRT, CUDA, JetPack (the nvidia-jetpack package) and L4T (/etc/nv_tegra_release) versions."""
    out: dict = {"tensorrt": getattr(trt, "__version__", None), "python": platform.python_version(),
                 "numpy": np.__version__}
    if cuda is not None:
        out.update(cuda=cuda.version(), cuda_memory=cuda.name)
    release = _read("/etc/nv_tegra_release")
    out["nv_tegra_release"] = release.splitlines()[0] if release else None
    m = re.search(r"R(\d+)\s*\(release\),\s*REVISION:\s*([\d.]+)", release or "")
    out["l4t"] = f"{m.group(1)}.{m.group(2)}" if m else None
    out["jetpack"] = _command(["dpkg-query", "-W", "-f=${Version}", "nvidia-jetpack"])
    return out


def environment() -> dict:
    """Power mode (nvpmodel) and clocks: GPU devfreq and CPU frequencies in MHz, where readable."""
    env: dict = {"hostname": platform.node(), "machine": platform.machine(),
                 "board_model": _read("/proc/device-tree/model")}
    mode = _command(["nvpmodel", "-q"])
    env["nvpmodel"] = mode.splitlines()[0].split(":", 1)[-1].strip() if mode else None
    clocks: dict = {}
    for cur in sorted(glob.glob("/sys/class/devfreq/*/cur_freq")):
        base, value = os.path.dirname(cur), _read(cur)
        if value and value.isdigit():
            top = _read(os.path.join(base, "max_freq"))
            clocks[os.path.basename(base)] = {"cur_mhz": int(value) / 1e6,
                                              "max_mhz": int(top) / 1e6 if top and top.isdigit() else None}
    cpus = [_read(p) for p in sorted(glob.glob("/sys/devices/system/cpu/cpu[0-9]*/cpufreq/scaling_cur_freq"))]
    clocks["cpu_mhz"] = [int(c) / 1e3 for c in cpus if c and c.isdigit()]
    env["clocks"] = clocks
    shown = _command(["jetson_clocks", "--show"])  # readable only as root; left out otherwise
    if shown:
        env["jetson_clocks"] = shown.splitlines()[:20]
    return env


# ---------------------------------------------------------------- commands

def bench(engine_path: str, eval_data: str | None, warmup: int, iterations: int) -> dict:
    """Latency (CUDA events), cold start, accuracy on eval.npz: the bench JSON object."""
    t0 = time.perf_counter()
    eng = TrtEngine(engine_path)
    sample = np.random.default_rng(0).standard_normal(eng.input_shape).astype(eng.host[eng.input_name].dtype)
    eng.run(sample)
    cold_ms = (time.perf_counter() - t0) * 1e3
    timed: dict = {}

    def loop() -> int:
        timed["t"] = eng.time_ms(sample, warmup, iterations)
        return iterations * int(eng.input_shape[0])

    if find_meter is not None and measure is not None:
        meter, why = find_meter()
        energy = measure(meter, why, loop)  # the Jetson's INA3221 board input rail while the loop runs
    else:
        loop()
        energy = {"energy_mj": None, "avg_power_w": None, "energy_not_measured": "energy.py is not in the bundle"}
    times = timed["t"]
    batch = int(eng.input_shape[0])
    try:
        import resource

        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    except ImportError:
        rss = None
    result: dict = {"model": os.path.basename(engine_path), "backend": "tensorrt", "batch": batch,
                    "artifact_bytes": os.path.getsize(engine_path), "emulated": False,
                    "latency_ms": summarize(times), "throughput": float(batch * 1e3 / times.mean()),
                    "throughput_unit": "samples/s", "warmup": warmup, "iterations": iterations, "timing": TIMING,
                    "cold_start_ms": cold_ms, "session_create_ms": eng.load_ms, "peak_rss_mb": rss, **energy}
    result.update(_evaluate(eng, eval_data))
    result["environment"] = {**environment(), "backend": "tensorrt", "input_shape": list(eng.input_shape)}
    result["versions"] = versions(eng.trt, eng.cuda)
    eng.close()
    return result


def _evaluate(eng: TrtEngine, eval_data: str | None) -> dict:
    if not eval_data:
        return {"accuracy": None, "accuracy_not_measured": "no eval data given", "eval_samples": 0}
    try:  # the eval data checks of edgekd's bench runner (eval_data.py beside this file in the image bundle)
        from ...bench import eval_data as checks
    except ImportError:
        import eval_data as checks  # type: ignore[no-redef]
    try:
        return _scored(eng, eval_data, checks)
    except checks.EvalDataError as e:
        raise RunnerError(str(e), EXIT_BAD_INPUT) from None


def _scored(eng: TrtEngine, eval_data: str, checks) -> dict:
    try:
        with np.load(eval_data, allow_pickle=False) as z:
            x = np.asarray(z["x"], dtype=np.float32)
            y = np.asarray(z["y"]) if "y" in z.files else None
    except (OSError, KeyError, ValueError) as e:
        raise RunnerError(f"eval data {eval_data}: {_first_line(e)}", EXIT_BAD_INPUT) from None
    if x.ndim != len(eng.input_shape) or tuple(x.shape[1:]) != tuple(eng.input_shape[1:]):
        raise RunnerError(f"eval data {eval_data}: x has shape {x.shape}; the engine takes {eng.input_shape}",
                          EXIT_BAD_INPUT)
    if y is not None:
        y = checks.labels(y, len(x), f"eval data {eval_data}")
    scores = []
    for i in range(0, len(x), 64):
        chunk, why = checks.class_scores(np.asarray(eng.infer(x[i:i + 64])))
        if why:
            if y is not None:
                raise RunnerError(f"eval data {eval_data} has labels (y) but {why}", EXIT_BAD_INPUT)
            return {"accuracy": None, "accuracy_not_measured": why, "eval_samples": int(len(x))}
        scores.append(chunk)
    checks.check_classes(y, scores[0].shape[1], f"eval data {eval_data}")
    preds = np.concatenate([s.argmax(1) for s in scores]).astype(np.int64)
    out: dict = {"eval_samples": int(len(x)), "predictions": [int(p) for p in preds],
                 "predictions_sha256": hashlib.sha256(preds.astype("<i8").tobytes()).hexdigest()}
    if y is None:
        out.update(accuracy=None, accuracy_not_measured="eval data has no labels (y)")
    else:
        out["accuracy"] = float(100.0 * np.mean(preds == y))
    return out


def _bundle_defaults() -> dict:
    text = _read(os.path.join(HERE, "bundle.json"))
    return json.loads(text) if text else {}


def parse_args(argv: list | None = None) -> argparse.Namespace:
    """The command line (see the module docstring); defaults from bundle.json."""
    d = _bundle_defaults()
    p = argparse.ArgumentParser(prog="trt_runner.py", description="Build and benchmark a TensorRT engine.")
    sub = p.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="ONNX -> engine with the tensorrt Python API")
    b.add_argument("--onnx", default=os.path.join(HERE, d.get("model", "model.onnx")))
    b.add_argument("--engine", default=os.path.join(HERE, d.get("engine", "model.engine")))
    b.add_argument("--precision", choices=["int8", "fp16", "fp32"], default=d.get("precision", "int8"))
    b.add_argument("--workspace-mb", type=int, default=d.get("workspace_mb", 1024))
    b.add_argument("--dla-core", type=int, default=d.get("dla_core"))
    b.add_argument("--timing-cache", default=os.path.join(HERE, d.get("timing_cache", "timing.cache")))
    r = sub.add_parser("bench", help="latency with CUDA events and accuracy on eval data; prints JSON")
    r.add_argument("--engine", default=os.path.join(HERE, d.get("engine", "model.engine")))
    r.add_argument("--eval-data", default=None, help=".npz with x (NCHW float32) and y (labels)")
    r.add_argument("--warmup", type=int, default=d.get("warmup", 50))
    r.add_argument("--iterations", type=int, default=d.get("iterations", 500))
    r.add_argument("--json", help="also write the JSON object to this file")
    args = p.parse_args(argv)
    if args.command == "bench" and (args.warmup < 0 or args.iterations < 1):
        p.error("--warmup must be >= 0 and --iterations >= 1")
    return args


def main(argv: list | None = None) -> int:
    """Run one command; JSON on stdout, or one line on stderr and exit 2 or 3."""
    args = parse_args(argv)
    try:
        if args.command == "build":
            result = build_engine(args.onnx, args.engine, args.precision, args.workspace_mb, args.timing_cache,
                                  args.dla_core)
        else:
            result = bench(args.engine, args.eval_data, args.warmup, args.iterations)
        text = json.dumps(result, allow_nan=False)
        if getattr(args, "json", None):
            _write(args.json, (text + "\n").encode())
    except RunnerError as e:
        print(f"trt_runner: {e}", file=sys.stderr)
        return e.exit_code
    except DeviceError as e:
        print(f"trt_runner: {e}", file=sys.stderr)
        return EXIT_RUNTIME
    except (OSError, ValueError, MemoryError) as e:
        print(f"trt_runner: {type(e).__name__}: {_first_line(e)}", file=sys.stderr)
        return EXIT_RUNTIME
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
