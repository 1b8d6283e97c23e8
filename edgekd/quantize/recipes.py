"""Per-target INT8 recipes: which types, symmetry and granularity suit each runtime and processor."""
from __future__ import annotations

import platform
from dataclasses import asdict, dataclass
from pathlib import Path

from ..config import QuantizeConfig
from ..config.profiles import Profile


@dataclass(frozen=True)
class Recipe:
    """A resolved quantization recipe: enough to call the quantizer and to explain the choice."""

    name: str
    format: str
    activation_type: str
    weight_type: str
    per_channel: bool
    symmetric_activations: bool
    symmetric_weights: bool
    reduce_range: bool
    method: str
    why: str

    def as_dict(self) -> dict:
        return asdict(self)


def cpu_flags() -> set[str]:
    """CPU feature flags of this machine (Linux /proc/cpuinfo), empty where unreadable."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def has_vnni(flags: set[str] | None = None) -> bool:
    """Whether this x86 CPU has VNNI (u8*s8 without intermediate saturation)."""
    f = cpu_flags() if flags is None else flags
    return bool({"avx512_vnni", "avx_vnni", "amx_int8"} & f)


def host_arch() -> str:
    m = platform.machine().lower()
    return "aarch64" if m in ("aarch64", "arm64") else "x86_64"


def int8_activations(path: Path) -> bool:
    """Whether the model quantizes activations to signed int8 (the ARM and TensorRT recipes: S8S8)."""
    import onnx

    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception:  # noqa: BLE001 - an unreadable file is reported by the session that follows
        return False
    inits = {t.name: t.data_type for t in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "QuantizeLinear" and len(node.input) > 2 and inits.get(node.input[2]) == onnx.TensorProto.INT8:
            return True
    return False


def needs_precise_int8(path: Path) -> bool:
    """Whether this x86 host must run `path` in ONNX Runtime's precise int8 mode to compute what its board does.

    An S8S8 model is made for kernels that sum int8 products in 32 bits (ARM dot products, TensorRT).
    x86 without VNNI sums pairs of u8*s8 products in saturating 16 bits; full-range int8 weights then
    clip, and a Pi artifact measured here lost 5.6 points (93.1% against 98.6% on the aarch64 kernels).
    `session.x64quantprecision` makes ONNX Runtime use u8*u8 there (exact, slower): 100% agreement."""
    return host_arch() == "x86_64" and not has_vnni() and int8_activations(path)


def _base(profile: Profile, q: QuantizeConfig) -> Recipe:
    """The recipe's own settings for this target, 'auto' resolved by this processor."""
    name = q.recipe or profile.quantization.recipe
    pq = profile.quantization
    if name == "auto":
        arch = host_arch() if profile.arch == "host" else profile.arch
        name = "ort-arm" if arch == "aarch64" else "ort-x86"
    per_channel = q.per_channel and pq.per_channel
    sym_act = q.symmetric_activations if q.symmetric_activations is not None else pq.symmetric_activations
    if name == "ort-x86":
        vnni = has_vnni()
        rr = (not vnni) if pq.reduce_range == "auto" else bool(pq.reduce_range)
        why = ("x86 without VNNI: U8S8 with 7-bit weights (reduce_range) avoids u8*s8 saturation in AVX2 kernels"
               if rr else "x86 with VNNI: U8S8, full-range weights")
        return Recipe(name, "qdq", "uint8", "int8", per_channel, sym_act, True, rr, q.method, why)
    if name == "ort-arm":
        return Recipe(name, "qdq", "int8", "int8", per_channel, sym_act, True, False, q.method,
                      "ARM: S8S8 QDQ with per-channel weights maps onto the int8 dot-product kernels")
    if name == "openvino":
        return Recipe(name, "qdq", "uint8", "int8", per_channel, sym_act, True, False, q.method,
                      "OpenVINO fuses U8S8 QDQ into its int8 CPU kernels")
    return Recipe(name, "qdq", "int8", "int8", True, True, True, False, q.method,
                  "TensorRT explicit quantization: symmetric int8 activations and weights, zero points 0, "
                  "per-channel weights on the output-channel axis")


def resolve(profile: Profile, q: QuantizeConfig) -> Recipe:
    """The recipe for this target and config: the profile's recipe, 'auto' resolved by this processor,
    then the profile's quantization.format / activation_type / weight_type where they say otherwise."""
    from dataclasses import replace

    from ..errors import ConfigError

    r = _base(profile, q)
    pq = profile.quantization
    where = f"target {profile.name}: quantization"
    if pq.format == "nncf" and r.name != "openvino":
        raise ConfigError(f"{where}.format nncf makes OpenVINO IR; the {r.name} recipe needs qdq or qoperator")
    if r.name == "tensorrt" and (pq.format != "qdq" or pq.activation_type == "uint8" or pq.weight_type == "uint8"):
        raise ConfigError(f"{where}: TensorRT takes explicitly quantized QDQ models with int8 activations and "
                          "weights only (format qdq, activation_type int8, weight_type int8)")
    act = r.activation_type if pq.activation_type == "auto" else pq.activation_type
    if act == "uint8" and pq.weight_type == "uint8":
        raise ConfigError(f"{where}: activation_type uint8 with weight_type uint8 (U8U8) is not an ONNX Runtime "
                          "int8 kernel format; use weight_type int8")
    changed = [f"{k} {v}" for k, v, base in (("format", pq.format, r.format), ("activation_type", act, r.activation_type),
                                            ("weight_type", pq.weight_type, r.weight_type)) if v != base]
    if not changed:
        return r
    return replace(r, format=pq.format, activation_type=act, weight_type=pq.weight_type,
                   why=f"{r.why}; the target profile sets {', '.join(changed)}")
