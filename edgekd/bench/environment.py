"""Where a figure was measured: this host's CPU, cores, governor, board state and runtime versions.

The probes themselves live in runner.py, so the host and a board describe themselves the same way;
this module adds what only the host knows (edgekd's version, the profile's threads and providers).
"""
from __future__ import annotations

import importlib.metadata

from .._version import __version__
from ..config.profiles import Profile
from .runner import capture_environment, usable_cores

__all__ = ["capture", "runtime_versions", "capture_environment"]

_RUNTIMES = ("onnxruntime", "openvino", "tensorrt", "numpy", "torch", "onnx")


def runtime_versions() -> dict:
    """Installed versions of edgekd and the runtimes it can use; a runtime not installed is left out."""
    out = {"edgekd": __version__}
    for name in _RUNTIMES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return out


def _providers(profile: Profile | None) -> list[str]:
    if profile is None or profile.backend != "onnxruntime":
        return [f"openvino:{profile.device}"] if profile is not None and profile.backend == "openvino" else []
    try:
        import onnxruntime as ort
    except ImportError:
        return []
    have = set(ort.get_available_providers())
    wanted = [p for p in profile.execution_providers if p in have and p != "CPUExecutionProvider"]
    return wanted + ["CPUExecutionProvider"]


def capture(profile: Profile | None = None, threads: int | None = None) -> dict:
    """This host's environment for a report: CPU model, cores, governor, board power/throttling
    state where readable, the threads and execution providers a run would use, runtime versions."""
    env = capture_environment()
    env["threads"] = threads or (profile.threads if profile else None) or usable_cores()
    providers = _providers(profile)
    if providers:
        env["execution_providers"] = providers
    if profile is not None:
        env["backend"] = profile.backend
    env["versions"] = runtime_versions()
    return env
