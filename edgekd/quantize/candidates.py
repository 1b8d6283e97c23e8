"""INT8 candidates per target: the recipe's QDQ model plus the alternatives worth measuring.

Which alternatives a recipe has is data (ALTERNATIVES), not code: they are produced only where the
choice between them is measured with the target's runtime on the target's processor (this host for
`cpu` and, on an x86 host, intel-cpu; a board over SSH). Without a measurement the recipe's own
format is the one a board gets.
"""
from __future__ import annotations

from dataclasses import dataclass

from .recipes import Recipe

# Measured on an AVX2 x86 host without VNNI (issue 3's table): QOperator U8S8 beat QDQ U8S8 on
# mobilenet_v3_small under ONNX Runtime, and NNCF's INT8 IR and OpenVINO's fused QDQ each won on
# some models, so both are tried where a measurement can decide.
ALTERNATIVES: dict[str, tuple[str, ...]] = {
    "ort-x86": ("qoperator",),
    "ort-arm": (),
    "openvino": ("nncf",),
    "tensorrt": (),
}

QUANTIZERS = ("qdq", "qoperator", "nncf")


@dataclass(frozen=True)
class Int8Spec:
    """One INT8 model to produce: its candidate name, which quantizer makes it, and the recipe."""

    name: str
    quantizer: str
    recipe: Recipe

    def label(self) -> str:
        """A short description for reports, e.g. 'QDQ U8S8 per-channel reduce_range minmax'."""
        if self.quantizer == "nncf":
            return "NNCF INT8 (OpenVINO IR, performance preset)"
        r = self.recipe
        types = {"uint8": "U8", "int8": "S8"}
        parts = [self.quantizer.upper().replace("QOPERATOR", "QOperator"),
                 f"{types[r.activation_type]}{types[r.weight_type]}",
                 "per-channel" if r.per_channel else "per-tensor"]
        if r.symmetric_activations:
            parts.append("symmetric")
        if r.reduce_range:
            parts.append("reduce_range")
        parts.append(r.method)
        return " ".join(parts)


def int8_specs(recipe: Recipe, measured: bool) -> list[Int8Spec]:
    """The INT8 models to produce for `recipe`: its own QDQ model ('int8'), then, when the choice is
    measured on the target's runtime and processor, the recipe's alternatives ('int8-qoperator', ...)."""
    specs = [Int8Spec("int8", recipe.format, recipe)]  # the profile's quantization.format (qdq by default)
    if measured:
        alternatives = ("qdq", *ALTERNATIVES.get(recipe.name, ())) if recipe.format != "qdq" else \
            ALTERNATIVES.get(recipe.name, ())
        specs += [Int8Spec(f"int8-{q}", q, recipe) for q in alternatives if q != recipe.format]
    return specs
