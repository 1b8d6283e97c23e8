"""The standalone device runner on the aarch64 onnxruntime under qemu user-mode emulation.

The runner, the artifact and the eval data are copied into a temporary folder and run there with the
sysroot's aarch64 Python (relative paths, so qemu's -L prefix never redirects them). The emulated CPU
is the board's (Cortex-A76 for a Raspberry Pi 5), so onnxruntime picks the kernels that board picks:
its predictions are the board's, its timings mean nothing and are never reported.
"""
from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np

from ..config.profiles import Profile, load_profile
from ..errors import BadInputError, DataError, ModelError, StageError
from ..runs import write_json
from .harness import bench_local, resolve_artifact, runner_arguments, runner_backend, runner_files
from .runner import EMULATED_REASON, EXIT_BAD_INPUT
from .sysroot import Sysroot, load_sysroot, qemu_version

HOST_PREFIX = "emulate:"
ARCH = "aarch64"
# The CPU qemu emulates per board: its features (dot product yes, i8mm and SVE no on a Cortex-A76)
# decide which int8 kernels onnxruntime runs. Other aarch64 profiles get qemu's `max`.
BOARD_CPUS = {"raspberry-pi-5": "cortex-a76", "raspberry-pi-4": "cortex-a72"}
DEFAULT_CPU = "max"
QEMU_CPUS = ("a64fx", "cortex-a35", "cortex-a53", "cortex-a57", "cortex-a72", "cortex-a76", "max", "neoverse-n1")
EMULATED_THREADS = 1  # timing is not taken, and a single thread keeps qemu from contending for the host's cores
DEFAULT_TIMEOUT_S = 1800
# Timing fields of the runner's JSON; under emulation they are nulls (explained by not_measured).
_TIMING = ("latency_ms", "throughput", "latency_ci95", "cold_start_ms", "session_create_ms", "runtime_import_ms",
           "first_inference_ms", "peak_rss_mb")
_TIMING_EXTRAS = ("times_ms", "throughput_unit", "warmup", "iterations", "trials", "timed_seconds")


def board_cpu(profile: Profile) -> str:
    """The qemu CPU model that stands in for the profile's board."""
    return BOARD_CPUS.get(profile.name, DEFAULT_CPU)


def parse_emulated_host(host: str, profile: Profile) -> str:
    """`emulate:aarch64[:CPU]` -> the qemu CPU to emulate; BadInputError for another architecture,
    an unknown CPU, or a profile that is not an aarch64 onnxruntime target."""
    parts = host.split(":")
    if parts[0] + ":" != HOST_PREFIX or len(parts) not in (2, 3) or parts[1] != ARCH:
        raise BadInputError(f"--host {host}: emulation supports {HOST_PREFIX}{ARCH} (optionally "
                            f"{HOST_PREFIX}{ARCH}:CPU, CPU one of {', '.join(QEMU_CPUS)})")
    if len(parts) == 3 and parts[2] not in QEMU_CPUS:
        raise BadInputError(f"--host {host}: unknown CPU {parts[2]!r}; qemu-aarch64 emulates {', '.join(QEMU_CPUS)}")
    check_profile(profile, host)
    return parts[2] if len(parts) == 3 else board_cpu(profile)


def check_profile(profile: Profile, where: str = "--verify-arm") -> None:
    """BadInputError unless the target is an aarch64 board served by onnxruntime (what the sysroot holds)."""
    if profile.arch != ARCH or profile.backend != "onnxruntime":
        raise BadInputError(f"{where}: target {profile.name} is {profile.backend} on {profile.arch}; ARM emulation "
                            "runs onnxruntime artifacts for aarch64 boards (e.g. --target raspberry-pi-5)")


def check_ready() -> Sysroot:
    """The built sysroot, or the error a user can act on (qemu missing, sysroot not built): call it
    before long work that ends in an ARM check."""
    return load_sysroot()


def run_emulated(files: list[Path], model_name: str, profile: Profile, *, cpu: str,
                 eval_data: Path | None = None, threads: int | None = None, timeout_s: int | None = None,
                 sysroot: Sysroot | None = None) -> dict:
    """Run runner.py on the aarch64 runtime for `files` (`model_name` the one to load) and return its
    JSON, made explicit about emulation: emulated true, every timing null with not_measured."""
    sysroot = sysroot or load_sysroot()
    files = [Path(f) for f in files]
    missing = [str(f) for f in files + ([Path(eval_data)] if eval_data else []) if not f.is_file()]
    if missing:
        raise BadInputError(f"ARM emulation: {', '.join(missing)} does not exist")
    if model_name not in {f.name for f in files}:
        raise BadInputError(f"ARM emulation: the model {model_name!r} is not among the artifact's files")
    timeout = int(timeout_s or max(profile.remote.timeout_s, DEFAULT_TIMEOUT_S))
    args = runner_arguments(f"model/{model_name}", profile, backend=runner_backend(Path(model_name), profile),
                            eval_data="data/eval.npz" if eval_data else None, threads=threads or EMULATED_THREADS,
                            warmup=0, iterations=1)
    with tempfile.TemporaryDirectory(prefix="edgekd-arm-") as tmp:
        work = Path(tmp)
        (work / "model").mkdir()
        for f in runner_files():
            shutil.copyfile(f, work / f.name)
        for f in files:
            shutil.copyfile(f, work / "model" / f.name)
        if eval_data:
            (work / "data").mkdir()
            shutil.copyfile(eval_data, work / "data" / "eval.npz")
        cmd = sysroot.command(["runner.py", *args, "--no-latency", "--json", "result.json"], cpu)
        try:
            proc = subprocess.run(cmd, cwd=work, env=sysroot.environment({"EDGEKD_EMULATED": "1"}),
                                  stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            raise StageError(f"ARM emulation: {model_name} did not finish within {timeout} s under qemu") from None
        if proc.returncode != 0:
            raise _runner_error(model_name, proc.returncode, proc.stderr)
        try:
            result = json.loads((work / "result.json").read_text())
        except (OSError, ValueError):
            raise StageError(f"ARM emulation: the runner finished but wrote no readable result for {model_name}") from None
    return _as_emulated(result, cpu, sysroot)


def _runner_error(model_name: str, code: int, stderr: str) -> Exception:
    lines = [ln.strip() for ln in stderr.splitlines() if ln.strip()]
    said = [ln for ln in lines if ln.startswith("runner: ")] or lines
    if code < 0:
        return StageError(f"ARM emulation: the aarch64 runtime died with signal {-code} on {model_name} under qemu"
                          + (f" ({said[-1][:300]})" if said else ""))
    line = (said[-1] if said else f"the runner exited with code {code}").removeprefix("runner: ")
    return (ModelError if code == EXIT_BAD_INPUT else StageError)(f"ARM emulation: {line[:300]}")


def _as_emulated(result: dict, cpu: str, sysroot: Sysroot) -> dict:
    """Mark a runner result as emulated: no timing survives, the environment says what ran where."""
    for key in _TIMING:
        result[key] = None
    for key in _TIMING_EXTRAS:
        result.pop(key, None)
    result["emulated"] = True
    result["not_measured"] = EMULATED_REASON
    emulator = qemu_version()
    env = result.setdefault("environment", {})
    if env.get("cpu_model"):
        env["host_cpu_model"] = env["cpu_model"]  # qemu-user shows the host's /proc/cpuinfo
    env["cpu_model"] = f"{cpu} (emulated)"
    env["emulator"] = {"qemu": emulator, "cpu": cpu, "sysroot": sysroot.manifest.get("key")}
    backend = result.get("backend", "onnxruntime")
    result["runtime_version_arm"] = result.get("versions", {}).get(backend)
    result["emulation"] = {"emulator": emulator, "cpu": cpu, "sysroot": str(sysroot.path),
                           "sysroot_key": sysroot.manifest.get("key")}
    return result


def bench_emulated(host: str, files: list[Path], model_name: str, profile: Profile, *,
                   eval_data: Path | None = None, threads: int | None = None, warmup: int | None = None,
                   iterations: int | None = None, duration_s: float | None = None, batch: int = 1,
                   timeout_s: int | None = None) -> dict:
    """`edgekd bench ARTIFACT --host emulate:aarch64`: the runner's JSON from the aarch64 runtime,
    with emulated true, accuracy on the ARM kernels, runtime_version_arm, and latency null with the
    reason "emulated: not representative". warmup, iterations and duration are accepted and unused:
    nothing is timed under emulation."""
    del warmup, iterations, duration_s  # nothing is timed under emulation
    cpu = parse_emulated_host(host, profile)
    if batch != 1:
        raise BadInputError(f"--host {host}: --batch applies to timing, which emulation does not do")
    result = run_emulated(files, model_name, profile, cpu=cpu, eval_data=eval_data, threads=threads,
                          timeout_s=timeout_s)
    result["measured_on"] = host
    result["measured_on_note"] = (f"run under qemu-aarch64 user-mode emulation of a {cpu} on this host: accuracy "
                                  "from the ARM kernels; latency not measured (emulated: not representative)")
    return result


def _host_predictions(x86: object, total: int, samples: int) -> np.ndarray:
    arr = np.asarray(x86)
    preds = arr.reshape(len(arr), -1).argmax(axis=1) if arr.ndim >= 2 else arr.astype(np.int64).ravel()
    if len(preds) != total:
        raise BadInputError(f"verify_arm: {len(preds)} x86 predictions (or rows of logits) for {total} eval samples")
    return preds[:samples].astype(np.int64)


def _eval_subset(eval_npz: Path, max_samples: int | None, out: Path) -> tuple[Path, int, np.ndarray | None]:
    """(the eval file to use, samples in the full set, the labels of the samples used or None)."""
    try:
        with np.load(eval_npz, allow_pickle=False) as z:
            arrays = {k: np.asarray(z[k]) for k in z.files if k in ("x", "y")}
    except (OSError, ValueError) as e:
        raise DataError(f"verify_arm: eval data {eval_npz} cannot be read: {e}") from None
    if "x" not in arrays or len(arrays["x"]) == 0:
        raise DataError(f"verify_arm: eval data {eval_npz} has no samples in array x")
    total = len(arrays["x"])
    labels = arrays["y"].astype(np.int64).ravel() if "y" in arrays else None
    if max_samples is not None and max_samples < 1:
        raise BadInputError(f"verify_arm: max_samples must be at least 1, got {max_samples}")
    if max_samples is None or max_samples >= total:
        return eval_npz, total, labels
    np.savez(out, **{k: v[:max_samples] for k, v in arrays.items()})
    return out, total, None if labels is None else labels[:max_samples]


def verify_arm(run_dir: Path, artifact: Path, eval_npz: Path, x86_predictions: object = None, *,
               profile: Profile | str = "raspberry-pi-5", max_samples: int | None = None,
               threads: int | None = None, timeout_s: int | None = None) -> dict:
    """Evaluate `artifact` on the aarch64 runtime under emulation and compare with x86.

    `x86_predictions` are the host's top-1 classes (or logits, argmax taken) on `eval_npz`; when
    omitted, the same runner measures them here. Returns accuracy_arm, arm_agreement (percent of
    samples whose top-1 agrees), runtime_version_arm, emulated: true and latency_ms: null with its
    not_measured reason; the full comparison is also written to run_dir/verify_arm.json."""
    run_dir = Path(run_dir)
    artifact = artifact if Path(artifact).is_absolute() else run_dir / artifact
    eval_npz = eval_npz if Path(eval_npz).is_absolute() else run_dir / eval_npz
    profile = load_profile(profile) if isinstance(profile, str) else profile
    check_profile(profile)
    if not Path(artifact).is_file():
        raise ModelError(f"verify_arm: artifact {artifact} does not exist")
    if not Path(eval_npz).is_file():
        raise DataError(f"verify_arm: eval data {eval_npz} does not exist")
    sysroot = load_sysroot()
    cpu = board_cpu(profile)
    with tempfile.TemporaryDirectory(prefix="edgekd-verify-arm-") as tmp:
        data, total, labels = _eval_subset(Path(eval_npz), max_samples, Path(tmp) / "eval.npz")
        samples = min(total, max_samples or total)
        host = None
        if x86_predictions is None:
            host = bench_local(Path(artifact), profile, eval_data=data, threads=threads, warmup=0, iterations=1)
            x86 = np.asarray(host["predictions"], dtype=np.int64)
        else:
            x86 = _host_predictions(x86_predictions, total, samples)
        model, files = resolve_artifact(Path(artifact))
        arm = run_emulated(files, model.name, profile, cpu=cpu, eval_data=data, threads=threads,
                           timeout_s=timeout_s, sysroot=sysroot)
    arm_preds = np.asarray(arm.get("predictions", []), dtype=np.int64)
    if len(arm_preds) != samples:
        raise StageError(f"verify_arm: the aarch64 runner returned {len(arm_preds)} predictions for {samples} samples")
    same = arm_preds == x86
    accuracy_x86 = host.get("accuracy") if host else None
    if host is None and labels is not None and len(labels) == samples:
        accuracy_x86 = float(100.0 * np.mean(x86 == labels))
    result = {
        "artifact": _relative(Path(artifact), run_dir), "samples": samples,
        "accuracy_arm": arm.get("accuracy"), "accuracy_x86": accuracy_x86,
        "arm_agreement": float(100.0 * same.mean()), "disagreements": int((~same).sum()),
        "runtime": arm.get("backend", "onnxruntime"), "runtime_version_arm": arm.get("runtime_version_arm"),
        "runtime_version_x86": (host or {}).get("versions", {}).get("onnxruntime"),
        "execution_providers_arm": arm.get("environment", {}).get("execution_providers"),
        "emulated": True, "emulated_cpu": cpu, "emulator": arm["emulation"]["emulator"],
        "sysroot": arm["emulation"]["sysroot_key"], "latency_ms": None, "not_measured": EMULATED_REASON,
    }
    if result["accuracy_arm"] is None:
        result["accuracy_not_measured"] = arm.get("accuracy_not_measured", "eval data has no labels (y)")
    write_json(run_dir / "verify_arm.json", {**result, "disagreeing_samples": np.flatnonzero(~same).tolist(),
                                             "predictions_arm": arm_preds.tolist(), "predictions_x86": x86.tolist()})
    return result


def _relative(path: Path, run_dir: Path) -> str:
    try:
        return str(path.resolve().relative_to(run_dir.resolve()))
    except ValueError:
        return path.name

