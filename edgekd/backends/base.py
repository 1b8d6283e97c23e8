"""The backend interface: public methods check inputs and outputs around the private ones."""
from __future__ import annotations

import abc
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..config.profiles import Profile
from ..errors import ModelError, StageError


@dataclass
class Artifact:
    """What compile produced for a board: its main file and every file the board needs."""

    path: Path
    backend: str
    precision: str
    files: list[Path] = field(default_factory=list)
    runnable_here: bool = True
    not_runnable_reason: str = ""
    info: dict = field(default_factory=dict)

    def size_bytes(self) -> int:
        """Bytes on disk of the files the board loads (weights included)."""
        files = self.files or [self.path]
        return int(sum(f.stat().st_size for f in files if f.is_file()))


class Runner(abc.ABC):
    """A loaded artifact ready to infer. `infer` checks the batch around the backend's `_infer`."""

    input_name: str = "input"
    input_shape: tuple = ()

    def infer(self, batch: np.ndarray) -> np.ndarray:
        if not isinstance(batch, np.ndarray):
            raise TypeError("infer expects a numpy array")
        if batch.dtype != np.float32:
            batch = batch.astype(np.float32)
        if self.input_shape and batch.ndim != len(self.input_shape):
            raise ModelError(f"input {self.input_name!r} expects rank {len(self.input_shape)} "
                             f"{tuple(self.input_shape)}, got shape {batch.shape}")
        out = self._infer(np.ascontiguousarray(batch))
        if out.shape[0] != batch.shape[0]:
            raise StageError(f"runner returned {out.shape[0]} rows for a batch of {batch.shape[0]}")
        return out

    @abc.abstractmethod
    def _infer(self, batch: np.ndarray) -> np.ndarray: ...

    def run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        """Every output for named inputs (models with several inputs: an LM decoder and its KV cache)."""
        raise ModelError(f"{type(self).__name__} runs single-input models only")

    def close(self) -> None:  # noqa: B027 - optional hook, most runtimes need nothing
        """Release the session."""

    def describe(self) -> dict:
        """Runtime details for the report (providers, device, threads)."""
        return {}


class Backend(abc.ABC):
    """compile(onnx, profile, out_dir) -> Artifact; load(artifact) -> Runner; versions()."""

    name: str = ""
    extra: str = ""  # the pip extra that installs this runtime

    def compile(self, onnx_path: Path, profile: Profile, out_dir: Path, precision: str) -> Artifact:
        onnx_path = Path(onnx_path)
        if not onnx_path.is_file():
            raise ModelError(f"compile: ONNX model {onnx_path} does not exist")
        out_dir.mkdir(parents=True, exist_ok=True)
        art = self._compile(onnx_path, profile, out_dir, precision)
        missing = [f for f in (art.files or [art.path]) if not f.exists()]
        if missing:
            raise StageError(f"compile ({self.name}) did not produce {', '.join(str(m) for m in missing)}")
        return art

    def load(self, artifact: Artifact, profile: Profile, threads: int | None = None, *, spin: bool = True) -> Runner:
        """A runner for `artifact`. spin=False: the runtime's threads sleep between calls instead of spinning,
        for sessions that take turns on the same cores (speculative decoding alternates draft and target
        every few milliseconds, and a spinning idle pool would hold the cores the other one needs)."""
        if not artifact.runnable_here:
            raise StageError(f"{self.name} artifact {artifact.path} cannot run here: {artifact.not_runnable_reason}")
        if not artifact.path.exists():
            raise ModelError(f"artifact {artifact.path} does not exist")
        return self._load(artifact, profile, threads, spin)

    @abc.abstractmethod
    def _compile(self, onnx_path: Path, profile: Profile, out_dir: Path, precision: str) -> Artifact: ...

    @abc.abstractmethod
    def _load(self, artifact: Artifact, profile: Profile, threads: int | None, spin: bool = True) -> Runner: ...

    @abc.abstractmethod
    def versions(self) -> dict: ...


@dataclass(frozen=True)
class Source:
    """A model to compile as candidate: its precision, the file (ONNX, or an OpenVINO IR), a label."""

    precision: str
    path: Path
    label: str = ""
