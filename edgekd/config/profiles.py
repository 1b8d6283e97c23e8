"""Target profiles: data in targets/*.yaml (shipped in the package), validated, found by name or alias."""
from __future__ import annotations

import platform
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ..errors import ConfigError

TARGETS_DIR = Path(__file__).parents[1] / "targets"


class _P(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class QuantRecipe(_P):
    """How INT8 is produced for this target (see quantize/recipes.py)."""

    recipe: Literal["auto", "ort-x86", "ort-arm", "openvino", "tensorrt"] = "auto"
    format: Literal["qdq", "qoperator", "nncf"] = "qdq"
    activation_type: Literal["auto", "uint8", "int8"] = "auto"
    weight_type: Literal["int8", "uint8"] = "int8"
    per_channel: bool = True
    symmetric_activations: bool = False
    reduce_range: Literal["auto", True, False] = "auto"  # type: ignore[valid-type]


class Tolerances(_P):
    parity_max_abs: float = Field(1e-3, gt=0)
    parity_min_agreement: float = Field(99.0, ge=0, le=100)


class BenchDefaults(_P):
    warmup: int = Field(20, ge=0)
    iterations: int = Field(300, ge=1)


class RemoteDefaults(_P):
    python: str = "python3"
    workdir: str = "/tmp"
    timeout_s: int = Field(600, ge=1)
    connect_timeout_s: int = Field(15, ge=1)


class Profile(_P):
    name: str
    aliases: list[str] = []
    description: str = ""
    backend: Literal["onnxruntime", "openvino", "tensorrt"]
    device: str = "CPU"
    arch: Literal["host", "x86_64", "aarch64"] = "host"
    cores: int | None = Field(None, ge=1)
    threads: int | None = Field(None, ge=1)
    precisions: list[Literal["int8", "fp16", "fp32"]] = ["int8", "fp32"]
    opset: int = Field(17, ge=11, le=23)
    round_to: int | None = Field(None, ge=1)
    quantization: QuantRecipe = QuantRecipe()
    tolerances: Tolerances = Tolerances()
    bench: BenchDefaults = BenchDefaults()
    remote: RemoteDefaults = RemoteDefaults()
    execution_providers: list[str] = []
    dla_core: int | None = None
    workspace_mb: int = 1024
    verify_arm: bool = False
    measure_on_matching_host: bool = False  # a host with the board's instruction set stands in for it
    source: str = ""

    @property
    def measures_here(self) -> bool:
        """True when latency measured on this host decides for this target: the `cpu` profile, a profile
        that accepts any host of its instruction set (intel-cpu on an x86 host), or a Jetson profile when
        edgekd runs on that Jetson itself."""
        return (self.arch == "host" or (self.measure_on_matching_host and self.host_matches_arch())
                or (self.backend == "tensorrt" and self.is_this_board()))

    def is_this_board(self, model: str | None = None) -> bool:
        """Whether this machine is the board the profile names: a Jetson whose device-tree model has every
        word of the profile's name after 'jetson' (jetson-orin-nano: 'NVIDIA Jetson Orin Nano ...')."""
        if model is None:
            try:
                model = Path("/proc/device-tree/model").read_text(errors="replace").strip("\x00 \n")
            except OSError:
                return False
        words = [w for w in self.name.lower().split("-") if w and w != "jetson"]
        text = model.lower()
        return "jetson" in text and bool(words) and all(w in text.split() for w in words)

    def host_matches_arch(self) -> bool:
        """Whether this machine has the board's instruction set (never that it is the board)."""
        m = platform.machine().lower()
        if self.arch == "host":
            return True
        return {"x86_64": ("x86_64", "amd64"), "aarch64": ("aarch64", "arm64")}[self.arch].__contains__(m)


def _read(path: Path) -> Profile:
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"target profile {path}: not valid YAML ({getattr(e, 'problem', e)})") from None
    except OSError as e:
        raise ConfigError(f"target profile {path}: cannot be read ({e.strerror})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"target profile {path}: the top level must be a mapping")
    raw.setdefault("name", path.stem)
    try:
        return Profile.model_validate({**raw, "source": str(path)})
    except ValidationError as e:
        err = e.errors()[0]
        loc = ".".join(str(p) for p in err["loc"])
        msg = "unknown key" if err["type"] == "extra_forbidden" else err["msg"]
        raise ConfigError(f"target profile {path}: {loc}: {msg}") from None


def list_profiles() -> list[Profile]:
    """Every shipped profile, sorted by name."""
    return sorted((_read(p) for p in TARGETS_DIR.glob("*.yaml")), key=lambda p: p.name)


def load_profile(name_or_path: str) -> Profile:
    """A shipped profile by name or alias, or a user's profile file by path."""
    p = Path(name_or_path)
    if p.suffix in (".yaml", ".yml") or p.is_file():
        if not p.is_file():
            raise ConfigError(f"target profile file {p} does not exist")
        return _read(p)
    key = name_or_path.lower()
    profiles = list_profiles()
    for prof in profiles:
        if key == prof.name or key in prof.aliases:
            return prof
    names = ", ".join(f"{pr.name}" + (f" ({'/'.join(pr.aliases)})" if pr.aliases else "") for pr in profiles)
    raise ConfigError(f"unknown target {name_or_path!r}; known targets: {names}")
