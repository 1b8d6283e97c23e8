"""Typed config models (unknown keys are errors), YAML loading and cross-field validation."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, ValidationError, model_validator

from ..errors import ConfigError
from .base import Section, first_set
from .data import FILES_TAGS, DataConfig, IdxFiles
from .distill import (
    DEFAULT_SWEEP,
    DISTILL_LOSSES,
    FEATURE_LOSSES,
    LOGIT_LOSSES,
    STRATEGIES,
    STRATEGY_MODULES,
    DistillConfig,
    FeatureLayers,
)
from .lm import LM_ONLY_PRUNE, TASKS, SpeculativeConfig, check_task, lm_defaults
from .paths import resolve_paths

__all__ = ["DEFAULT_SWEEP", "DISTILL_LOSSES", "FEATURE_LOSSES", "LOGIT_LOSSES", "STAGES", "STRATEGIES",
           "STRATEGY_MODULES", "BenchConfig", "Config", "DataConfig", "DistillConfig", "FeatureLayers", "GatesConfig",
           "IdxFiles", "PruneConfig", "QuantizeConfig", "SpeculativeConfig", "StudentConfig", "StudentSearch",
           "TeacherConfig", "assign", "from_dict", "load_config", "onnx_entry_unread", "to_dict"]

STAGES = ("distill", "prune", "quantize")


class TeacherConfig(Section):
    model: str = "torchvision:resnet18"
    checkpoint: str | None = None
    trust_checkpoint: bool = False
    train_epochs: int = Field(12, ge=0, le=1000)
    lr: float = Field(2e-3, gt=0, le=10)


class StudentSearch(Section):
    """student.model: search — the space, the latency budget (one of the two), and the proxy training."""

    space: list[str] = Field(["edge_cnn", "small_cnn"], min_length=1)  # built-in CNN or torchvision mobile families
    widths: list[float] = Field([0.25, 0.375, 0.5, 0.625, 0.75, 1.0, 1.25, 1.5, 2.0], min_length=1)
    # built-in CNNs: d < 1 drops stride-1 convs (0.6: 3 of 5, 0.4: small_cnn's two strided convs alone),
    # an integer d repeats each conv d times
    depths: list[float] = Field([0.4, 0.6, 1, 2], min_length=1)
    kernels: list[int] = Field([3, 5], min_length=1)  # built-in CNNs
    latency_budget_ms: float | None = Field(None, gt=0)
    target_speedup: float | None = Field(None, gt=0)  # the budget as the teacher's p50 over this
    trials: int = Field(4, ge=1, le=100)  # candidates within the budget that get proxy training
    proxy_epochs: int = Field(2, ge=1, le=100)

    @model_validator(mode="after")
    def _one_budget(self) -> StudentSearch:
        if (self.latency_budget_ms is None) == (self.target_speedup is None):
            raise ValueError("give exactly one of latency_budget_ms and target_speedup")
        if any(w <= 0 or w > 8 for w in self.widths):
            raise ValueError("widths must be in (0, 8]")
        if any(d <= 0 or d > 4 or (d > 1 and d != int(d)) for d in self.depths) or \
                any(k < 1 or k % 2 == 0 or k > 9 for k in self.kernels):
            raise ValueError("depths must be in (0, 1] or an integer up to 4, and kernels odd, 1-9")
        return self


class StudentConfig(Section):
    model: str = "edge_cnn"  # or 'search' with student.search
    search: StudentSearch | None = None
    # task causal-lm: the teacher's family at these sizes (None: the teacher's own), initialised from the
    # teacher (embeddings and a subset of its layers) or from scratch
    layers: int | None = Field(None, ge=1, le=512)
    hidden_size: int | None = Field(None, ge=8, le=65536)
    heads: int | None = Field(None, ge=1, le=512)
    kv_heads: int | None = Field(None, ge=1, le=512)
    intermediate_size: int | None = Field(None, ge=8, le=262144)
    init: Literal["teacher", "scratch"] = "teacher"
    # which teacher layers init: teacher copies: greedy drops, one at a time, the layer whose removal costs
    # the least perplexity on a few validation blocks; even takes them evenly spaced
    layer_choice: Literal["greedy", "even"] = "greedy"

    def lm_sizes(self) -> dict:
        return {k: getattr(self, k) for k in ("layers", "hidden_size", "heads", "kv_heads", "intermediate_size")
                if getattr(self, k) is not None}

    @model_validator(mode="after")
    def _search(self) -> StudentConfig:
        if self.model == "search" and self.search is None:
            raise ValueError("model: search needs student.search with latency_budget_ms or target_speedup")
        if self.search is not None and self.model != "search":
            raise ValueError("student.search is read only with model: search")
        return self


class PruneConfig(Section):
    ratio: float | None = Field(None, gt=0, lt=1)
    target_macs: float | None = Field(None, gt=0, lt=1)
    target_params: float | None = Field(None, gt=0, lt=1)
    target_speedup: float | None = Field(None, gt=1, le=100)
    target_latency_ms: float | None = Field(None, gt=0)
    # activation (task causal-lm, its default there): each MLP channel's mean magnitude on training blocks
    criterion: Literal["l1", "l2", "bn_scale", "taylor", "random", "activation"] = "l2"
    global_pruning: bool = False
    ignored_layers: list[str] = []
    steps: int = Field(1, ge=1, le=50)
    finetune_epochs: int = Field(15, ge=0, le=1000)
    # Recovery is gentle and leans on the unpruned model: a pruned network that stays close to the model
    # it came from keeps its accuracy (BENCHMARKS.md, issue 6); kd_alpha weighs its soft targets
    # against the labels' cross-entropy.
    lr: float = Field(1e-3, gt=0, le=10)
    kd_alpha: float = Field(0.9, ge=0, le=1)
    # prune faster where pruning saves more measured latency; None: on for every target (MACs, params,
    # speedup, latency), off for a plain ratio. At equal MACs it buys real speed: BENCHMARKS.md (issue 6)
    latency_guided: bool | None = None
    # The most validation accuracy (points) pruning may cost against the unpruned model after fine-tuning;
    # over it the stage prunes half as far, then keeps the unpruned model. None: no limit.
    max_accuracy_drop: float | None = Field(3.0, ge=0, le=100)
    # task causal-lm: the fine-tune's optimizer steps (None: a quarter pass over the training batches) and the
    # most validation perplexity (percent) pruning may add against the unpruned student (None: no limit)
    finetune_steps: int | None = Field(None, ge=1, le=1_000_000)
    max_perplexity_increase: float | None = Field(None, ge=0, le=1000)

    @model_validator(mode="after")
    def _one_amount(self) -> PruneConfig:
        given = [k for k in ("ratio", "target_macs", "target_params", "target_speedup", "target_latency_ms")
                 if getattr(self, k) is not None]
        if len(given) > 1:
            raise ValueError(f"prune: give one of ratio, target_macs, target_params, target_speedup, "
                             f"target_latency_ms, not {' and '.join(given)}")
        return self

    def key_dump(self) -> dict:
        """The settings for cache keys of the image task (the causal-LM keys left out, as keys were before)."""
        return {k: v for k, v in self.model_dump(mode="json").items() if k not in LM_ONLY_PRUNE}

    def amount(self) -> tuple[str, float]:
        """The pruning amount as (kind, value); defaults to a 0.25 channel ratio."""
        for k in ("ratio", "target_macs", "target_params", "target_speedup", "target_latency_ms"):
            v = getattr(self, k)
            if v is not None:
                return k, float(v)
        return "ratio", 0.25

    def gentler(self) -> PruneConfig | None:
        """The same settings pruning half as far toward the unpruned model, or None where the amount
        cannot be halved without measuring (a latency in ms)."""
        kind, value = self.amount()
        half = {"ratio": value / 2, "target_macs": (1 + value) / 2, "target_params": (1 + value) / 2,
                "target_speedup": (1 + value) / 2}.get(kind)
        if half is None or (kind == "target_speedup" and half <= 1):
            return None
        return self.model_copy(update={k: None for k in ("ratio", "target_macs", "target_params", "target_speedup")}
                               | {kind: half})

    def guided(self, kind: str) -> bool:
        """Whether stage ratios follow measured latency for this amount kind (never for a plain ratio)."""
        if kind == "ratio":
            return False
        return self.latency_guided if self.latency_guided is not None else True


class QuantizeConfig(Section):
    calibration_samples: int = Field(256, ge=1, le=100000)
    method: Literal["minmax", "entropy", "percentile"] = "minmax"
    per_channel: bool = True
    symmetric_activations: bool | None = None
    percentile: float = Field(99.999, gt=90, le=100)
    max_accuracy_drop: float = Field(0.5, ge=0, le=100)
    recipe: Literal["auto", "ort-x86", "ort-arm", "openvino", "tensorrt"] | None = None
    # task causal-lm: weight-only candidates and the most test perplexity (percent) they may add
    weights: list[Literal["int8", "int4", "int4_mixed"]] = ["int8", "int4", "int4_mixed"]
    max_perplexity_increase: float = Field(10.0, ge=0, le=1000)


class GatesConfig(Section):
    max_size_mb: float | None = Field(None, gt=0)
    max_latency_ms: float | None = Field(None, gt=0)
    percentile: Literal[50, 90, 99] = 90
    min_accuracy: float | None = Field(None, ge=0, le=100)
    max_accuracy_drop: float | None = Field(None, ge=0, le=100)
    max_regression: float | None = Field(None, ge=0)
    baseline: str | None = None
    min_accuracy_arm: float | None = Field(None, ge=0, le=100)
    min_arm_agreement: float | None = Field(None, ge=0, le=100)
    max_memory_mb: float | None = Field(None, gt=0)
    max_energy_mj: float | None = Field(None, gt=0)
    min_decode_tokens_per_s: float | None = Field(None, gt=0)
    max_perplexity: float | None = Field(None, gt=0)
    max_perplexity_increase: float | None = Field(None, ge=0)
    min_speculative_speedup: float | None = Field(None, gt=0)


class BenchConfig(Section):
    warmup: int = Field(20, ge=0)
    iterations: int = Field(300, ge=1)
    threads: int | None = Field(None, ge=1, le=256)


class Config(Section):
    name: str = "demo"
    seed: int = Field(0, ge=0, lt=2**32)  # what torch, numpy and random all take
    task: Literal[TASKS] = "image-classification"  # type: ignore[valid-type]
    stages: list[Literal["distill", "prune", "quantize"]] = list(STAGES)
    target: str = "cpu"
    verify_arm: bool = False
    # A stage whose model ends near chance while the teacher is well above it stops the run (exit 3);
    # true keeps such a result (with a note) instead.
    allow_collapse: bool = False
    data: DataConfig = DataConfig()
    teacher: TeacherConfig = TeacherConfig()
    student: StudentConfig = StudentConfig()
    distill: DistillConfig = DistillConfig()
    prune: PruneConfig = PruneConfig()
    quantize: QuantizeConfig = QuantizeConfig()
    gates: GatesConfig = GatesConfig()
    bench: BenchConfig = BenchConfig()
    speculative: SpeculativeConfig | None = None

    @model_validator(mode="before")
    @classmethod
    def _task_defaults(cls, data: Any) -> Any:
        return lm_defaults(data)

    @model_validator(mode="after")
    def _task_keys(self) -> Config:
        check_task(self)
        return self

    @model_validator(mode="after")
    def _stage_order(self) -> Config:
        if len(set(self.stages)) != len(self.stages):
            raise ValueError("stages lists a stage twice")
        order = [s for s in STAGES if s in self.stages]
        if list(self.stages) != order:
            raise ValueError(f"stages must run in the order {', '.join(STAGES)}")
        if self.student.model == "teacher" and "distill" in self.stages and self.distill.strategy == "kd" \
                and "prune" not in self.stages and self.task != "causal-lm":
            raise ValueError("student.model: teacher with only distill would distil a model into itself; "
                             "add prune to stages")
        if self.distill.strategy == "cross_modal" and "prune" in self.stages:
            raise ValueError("distill.strategy cross_modal: the prune stage fine-tunes with the teacher on the "
                             "student's input and is not supported; use stages [distill, quantize]")
        if self.distill.strategy == "cross_modal" and self.student.model == "search":
            raise ValueError("student.model search times students on the teacher's input; it does not combine "
                             "with distill.strategy cross_modal yet")
        if self.student.model == "search" and "distill" not in self.stages:
            raise ValueError("student.model search needs the distill stage in stages")
        if self.distill.strategy == "cross_modal" and "distill" not in self.stages:
            raise ValueError("distill.strategy cross_modal needs the distill stage in stages")
        return self


def onnx_entry_unread(cfg: Config) -> str | None:
    """The first key set in `cfg` that the ONNX entry (--model) does not read: it quantizes a given model,
    so nothing of the data, the teacher, the student, distillation or pruning, and stages only as [quantize]."""
    if list(cfg.stages) not in (list(STAGES), ["quantize"]):
        return "stages"
    return first_set(cfg, {name: tuple(type(getattr(cfg, name)).model_fields)
                           for name in ("data", "teacher", "student", "distill", "prune")})


def _union_tag(part: Any) -> bool:
    """Whether a location part names a member of a union (pydantic's `constrained-int`, `literal['auto']`)."""
    return isinstance(part, str) and (part.startswith(("constrained-", "literal["))
                                      or part in ("int", "float", "str", "bool", *FILES_TAGS))


def _format_error(e: ValidationError, source: str) -> str:
    errors = e.errors()
    err = errors[0]
    path = [p for p in err["loc"] if not _union_tag(p)]
    # a value that fits no member of a union: one error per member, said together
    same = [x for x in errors if [p for p in x["loc"] if not _union_tag(p)] == path]
    loc = ".".join(_key_text(p) for p in path)
    msg = err["msg"]
    if err["type"] == "extra_forbidden":
        msg = "unknown key"
    elif len(same) > 1:
        msg = " or ".join(dict.fromkeys(x["msg"] for x in same))
    msg = msg.removeprefix("Value error, ")
    where = f"{source}: {loc}" if loc else source
    rest = len(errors) - len(same) if len(same) > 1 else len(errors) - 1
    more = f" (and {rest} more)" if rest > 0 else ""
    return _one_line(f"{where}: {msg}{more}")


def _key_text(part: Any) -> str:
    """A key path part as written in YAML; quoted when it has spaces, dots or unprintable characters."""
    text = str(part)
    return text if text and text.isprintable() and not any(c in text for c in " .:") else repr(text)


def _one_line(text: str) -> str:
    """The error on one line: control characters from user input are escaped, never printed raw."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def from_dict(raw: Any, source: str = "config") -> Config:
    """Validate a plain dict into a Config; errors name the key path."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: the top level must be a mapping of keys, not {type(raw).__name__}")
    try:
        return Config.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(_format_error(e, source)) from None


def assign(raw: dict[str, Any], assignments: list[str]) -> dict[str, Any]:
    """`raw` with dotted KEY=VALUE assignments applied in place (values parsed as YAML), e.g.
    `prune.latency_guided=true` or `distill.sweep={temperature: [1, 2]}`; returns `raw`."""
    for a in assignments:
        key, _, value = a.partition("=")
        *path, last = key.split(".")
        node = raw
        for k in path:
            node = node.setdefault(k, {})
        node[last] = yaml.safe_load(value)
    return raw


def load_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> Config:
    """Load a YAML config file (or the embedded default when `path` is None) and apply overrides."""
    raw: dict[str, Any] = {}
    source = "embedded default config"
    if path is not None:
        p = Path(path)
        source = str(p)
        if not p.is_file():
            raise ConfigError(f"config file {p} does not exist")
        try:
            loaded = yaml.safe_load(p.read_text())
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f" line {mark.line + 1}" if mark is not None else ""
            raise ConfigError(f"config file {p}{where}: not valid YAML ({getattr(e, 'problem', e)})") from None
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(f"config file {p}: cannot be read ({e})") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"{p}: the top level must be a mapping of keys, not {type(loaded).__name__}")
        raw = dict(loaded or {})
        resolve_paths(raw, p.parent)
    for k, v in (overrides or {}).items():
        if v is not None:
            raw[k] = v
    return from_dict(raw, source)


def to_dict(cfg: Config) -> dict[str, Any]:
    """The config as a plain dict (for reports and cache keys)."""
    return cfg.model_dump(mode="json")
