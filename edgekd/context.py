"""The run context every stage receives: config, target, run directory, data, progress, stage cache."""
from __future__ import annotations

import json
import os
import platform
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ._version import __version__
from .config import Config, to_dict
from .config.profiles import Profile
from .data import Splits
from .progress import NullProgress, Progress
from .runs import hash_obj, write_json


def library_versions() -> dict[str, str]:
    """Versions of the libraries whose behaviour shapes results (part of every cache key)."""
    import importlib.metadata as md

    out = {"edgekd": __version__, "python": platform.python_version()}
    for pkg in ("torch", "torchvision", "onnx", "onnxruntime", "torch-pruning", "openvino", "nncf", "numpy"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    return out


def cpu_name() -> str:
    """The processor's model name, where Linux tells it."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith(("model name", "hardware", "cpu model")):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def usable_cores() -> int:
    """CPU cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


@dataclass
class RunContext:
    """State shared by the stages of one run."""

    config: Config
    profile: Profile
    run_dir: Path
    progress: Progress = field(default_factory=NullProgress)
    splits: Splits | None = None
    threads: int = 1
    versions: dict[str, str] = field(default_factory=library_versions)
    notes: list[str] = field(default_factory=list)
    board: tuple[str, str | None, str | None] | None = None  # (host, ssh config, remote python) of --host

    def stage_dir(self, name: str) -> Path:
        d = self.run_dir / "stages" / name
        d.mkdir(parents=True, exist_ok=True)
        return d

    def key(self, *parts: Any) -> str:
        """A cache key over the given parts, the seed and the library versions."""
        return hash_obj(self.config.seed, self.versions, *parts)

    def cached(self, name: str, key: str) -> dict | None:
        """The stored metrics of stage `name` if it finished with this key, else None."""
        meta = self.run_dir / "stages" / name / "done.json"
        if not meta.is_file():
            return None
        try:
            data = json.loads(meta.read_text())
        except (OSError, ValueError):
            return None
        return data.get("metrics") if data.get("key") == key else None

    def mark_done(self, name: str, key: str, metrics: dict) -> None:
        """Record that stage `name` finished with `key` (written last, atomically)."""
        write_json(self.stage_dir(name) / "done.json", {"key": key, "metrics": metrics})

    def environment(self) -> dict:
        import torch

        runtimes = {k: v for k, v in self.versions.items() if k in ("onnxruntime", "openvino", "nncf", "onnx")}
        return {
            "python": platform.python_version(), "torch": torch.__version__, "runtimes": runtimes,
            "cpu": cpu_name(), "cores": usable_cores(), "threads": self.threads,
            "host": platform.node(), "platform": f"{platform.system()} {platform.machine()}",
            "argv": sys.argv[1:],
        }

    def config_dict(self) -> dict:
        return to_dict(self.config)
