"""ONNX Runtime: the `cpu` target here and ARM boards (XNNPACK where the build has it)."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np

from ..config.profiles import Profile
from ..errors import ModelError
from ..quantize.recipes import needs_precise_int8
from .base import Artifact, Backend, Runner


def available_providers() -> list[str]:
    import onnxruntime as ort

    return list(ort.get_available_providers())


def session_options(threads: int | None, optimized_path: Path | None = None, level: str = "all"):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads or (os.cpu_count() or 1)
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.log_severity_level = 3
    so.graph_optimization_level = {
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    }[level]
    if optimized_path is not None:
        so.optimized_model_filepath = str(optimized_path)
    return so


def providers_for(profile: Profile) -> list[str]:
    """The profile's execution providers that this onnxruntime build has (CPU always last)."""
    have = set(available_providers())
    wanted = [p for p in (profile.execution_providers or ["CPUExecutionProvider"]) if p in have]
    if "CPUExecutionProvider" not in wanted:
        wanted.append("CPUExecutionProvider")
    return wanted


def provider_settings(providers: list[str], threads: int | None, so) -> list:
    """Providers with their options; XNNPACK gets the threads and the session's own pool drops to one.

    ONNX Runtime's advice for XNNPACK: it has its own thread pool, so the session's intra-op pool is
    set to 1 without spinning, or the two pools contend for the same cores."""
    out: list = list(providers)
    if "XnnpackExecutionProvider" in providers:
        so.intra_op_num_threads = 1
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        n = threads or (os.cpu_count() or 1)
        out[providers.index("XnnpackExecutionProvider")] = ("XnnpackExecutionProvider", {"intra_op_num_threads": str(n)})
    return out


class OrtRunner(Runner):
    """An ONNX Runtime session on the given providers (XNNPACK configured as its docs advise)."""

    def __init__(self, path: Path, threads: int | None, providers: list[str], spin: bool = True):
        import onnxruntime as ort

        so = session_options(threads)
        if not spin:
            so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.precise_int8 = needs_precise_int8(path)
        if self.precise_int8:
            so.add_session_config_entry("session.x64quantprecision", "1")
        try:
            self.session = ort.InferenceSession(str(path), so, providers=provider_settings(providers, threads, so))
        except Exception as e:  # noqa: BLE001 - ORT raises its own exception types
            raise ModelError(f"onnxruntime cannot load {path}: {str(e).splitlines()[0][:200]}") from None
        inp = self.session.get_inputs()[0]
        self.input_name, self.input_shape = inp.name, tuple(inp.shape)
        self.threads = threads or (os.cpu_count() or 1)

    def _infer(self, batch: np.ndarray) -> np.ndarray:
        return self.session.run(None, {self.input_name: batch})[0]

    def run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        return self.session.run(None, feeds)

    def describe(self) -> dict:
        out = {"providers": self.session.get_providers(), "threads": self.threads}
        if self.precise_int8:
            out["x64quantprecision"] = True
        return out


class OnnxRuntimeBackend(Backend):
    name = "onnxruntime"
    extra = ""

    def _compile(self, onnx_path: Path, profile: Profile, out_dir: Path, precision: str) -> Artifact:
        import onnxruntime as ort

        out = out_dir / f"model.{precision}.onnx"
        # Offline graph optimisation at a portable level: 'all' would bake in x86 layouts (NCHWc),
        # which an ARM board's runtime cannot run.
        level = "extended" if profile.arch == "host" else "basic"
        tmp = out_dir / f".{out.name}.tmp"
        try:
            ort.InferenceSession(str(onnx_path), session_options(1, tmp, level), providers=["CPUExecutionProvider"])
            os.replace(tmp, out)
        except Exception as e:  # noqa: BLE001
            if tmp.exists():
                tmp.unlink()
            raise ModelError(f"onnxruntime cannot load {onnx_path}: {str(e).splitlines()[0][:200]}") from None
        files = [out]
        if profile.arch == "aarch64":
            src = out_dir / f"model.{precision}.source.onnx"
            shutil.copyfile(onnx_path, src)  # unoptimised original for runtimes that re-optimise
            files.append(src)
        # No ORT-format (.ort) copy: with onnxruntime 1.31 (the full build pip installs) ORT-format
        # resnet18/mobilenet_v2 sessions started 24-35% faster on an x86 host, but mobilenet_v2 then ran
        # about 2x (FP32) and 3x (QDQ) slower per inference: the load-time optimisations an .onnx gets
        # are not applied to an .ort model, and a board runs many inferences per start-up.
        return Artifact(path=out, backend=self.name, precision=precision, files=[out],
                        info={"optimization_level": level, "providers": profile.execution_providers,
                              "source_copy": files[1].name if len(files) > 1 else None})

    def _load(self, artifact: Artifact, profile: Profile, threads: int | None, spin: bool = True) -> Runner:
        return OrtRunner(artifact.path, threads, providers_for(profile), spin)

    def versions(self) -> dict:
        import onnxruntime as ort

        return {"onnxruntime": ort.__version__}


BACKEND = OnnxRuntimeBackend()
