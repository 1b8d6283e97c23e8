"""The distill section of the config: plain KD and its temperature/alpha sweep, the strategies, the
losses and feature pairs, and the causal-LM divergences."""
from __future__ import annotations

import math
from typing import Any, Literal

from pydantic import Field, model_validator

from .base import Section
from .strategies import StrategyOptions

__all__ = ["DEFAULT_SWEEP", "DISTILL_LOSSES", "FEATURE_LOSSES", "LM_ONLY_DISTILL_KEYS", "LOGIT_LOSSES", "STRATEGIES",
           "STRATEGY_MODULES", "DistillConfig", "FeatureLayers"]

# The one registry of distill.strategy names: name -> module under edgekd.distill.strategies (kd: the stage's own loop).
STRATEGY_MODULES: dict[str, str | None] = {
    "kd": None, "multi_teacher": "multi_teacher", "self": "self_distill", "born_again": "born_again",
    "mutual": "mutual", "deit": "deit", "progressive": "progressive", "selective": "selective",
    "data_free": "data_free", "adversarial": "adversarial", "federated": "federated",
    "cross_modal": "cross_modal",
}
STRATEGIES = tuple(STRATEGY_MODULES)
LOGIT_LOSSES = ("kd", "reverse_kl", "logit_mse")
FEATURE_LOSSES = ("feature", "attention", "rkd_distance", "rkd_angle", "gram")
DISTILL_LOSSES = LOGIT_LOSSES + FEATURE_LOSSES
LM_ONLY_DISTILL_KEYS = ("loss", "beta", "sequence_kd", "sequence_share", "sequence_steps", "on_policy")


class FeatureLayers(Section):
    """One student/teacher layer pair for feature terms, each a module path (e.g. 'features.3', 'layer3')."""

    student: str = Field(min_length=1)
    teacher: str = Field(min_length=1)


DEFAULT_SWEEP = {"temperature": [1.0, 2.0, 4.0], "alpha": [0.5, 0.9]}


class DistillConfig(Section):
    epochs: int = Field(30, ge=0, le=10000)
    steps: int | None = Field(None, ge=1)
    temperature: float = Field(4.0, gt=0, le=100)
    alpha: float = Field(0.7, ge=0, le=1)
    lr: float = Field(3e-3, gt=0, le=10)
    strategy: str = "kd"
    strategy_options: StrategyOptions = StrategyOptions()
    # Unless the config sets them (or `sweep: null`), plain KD chooses temperature and alpha on the
    # validation split from DEFAULT_SWEEP; each point trains for `sweep_epochs` (default: a sixth of
    # `epochs`, so the whole search costs about one full run).
    sweep: dict[str, list[float]] | None = None
    sweep_epochs: int | None = Field(None, ge=1, le=10000)
    baseline: bool = False
    # loss = (1 - alpha) * CE(labeled) + alpha * sum_k losses[k] * L_k
    losses: dict[str, float] | None = None
    feature_layers: FeatureLayers | list[FeatureLayers] | None = None
    cache_topk: int | None = Field(None, ge=1)
    # augmentation draws the teacher labels once each (plain KD and its baseline); None: 8 to 30, as many
    # as a float32 copy of each would fit in 1 GiB. Fewer save teacher passes on large training sets.
    draws: int | None = Field(None, ge=1, le=1000)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    # task causal-lm: the divergence over token distributions (jsd: generalized JSD, beta 0 = forward KL,
    # 1 = reverse KL)
    loss: Literal["forward_kl", "reverse_kl", "jsd"] = "forward_kl"
    beta: float = Field(0.5, ge=0, le=1)
    # task causal-lm, sequence-level KD: the teacher continues each training block's first seq_len - N
    # tokens greedily for N tokens, and the student trains on the blocks as the teacher wrote them (null: off)
    sequence_kd: int | None = Field(None, ge=1, le=4096)
    # the share of the training blocks the teacher continues (one fixed draw for every run seed); the rest
    # stay as written
    sequence_share: float = Field(1.0, gt=0, le=1)
    # instead of a share: the blocks of this many batches (one fixed draw for every run seed) are the
    # teacher-written ones, and the student trains on them in its last steps, so it ends on the text a draft
    # meets (the teacher's own greedy text); the other steps see the text as written
    sequence_steps: int | None = Field(None, ge=1, le=100_000)
    # task causal-lm, on-policy share (GKD): on this share of the steps the student samples continuations of
    # the batch's prompts and the live teacher's distributions on them are the targets
    on_policy: float = Field(0.0, ge=0, le=1)

    @model_validator(mode="before")
    @classmethod
    def _default_sweep(cls, data: Any) -> Any:
        """Plain KD sweeps the temperature and alpha the config leaves out (none when alpha is 0: no KD).
        Written into the config itself, so a saved config reloads to the same search."""
        if not isinstance(data, dict) or "sweep" in data or data.get("strategy", "kd") != "kd":
            return data
        if "alpha" in data and isinstance(data["alpha"], (int, float)) and data["alpha"] == 0:
            return data
        grid = {k: list(v) for k, v in DEFAULT_SWEEP.items() if k not in data}
        return {**data, "sweep": grid} if grid else data

    @model_validator(mode="after")
    def _known_strategy(self) -> DistillConfig:
        if self.strategy not in STRATEGIES:
            raise ValueError(f"distill.strategy {self.strategy!r} is not one of {', '.join(STRATEGIES)}")
        if self.sweep is not None:
            bad = set(self.sweep) - {"temperature", "alpha"}
            if bad:
                raise ValueError(f"distill.sweep accepts temperature and alpha, not {', '.join(sorted(bad))}")
            for k, values in self.sweep.items():
                if not values:
                    raise ValueError(f"distill.sweep.{k} is empty; list at least one value")
                lo_ok = (lambda v: v > 0) if k == "temperature" else (lambda v: 0 <= v <= 1)
                wrong = [v for v in values if not lo_ok(v)]
                if wrong:
                    rule = "> 0" if k == "temperature" else "between 0 and 1"
                    raise ValueError(f"distill.sweep.{k}: {wrong[0]} is out of range (each must be {rule})")
        if self.losses is not None:
            unknown = sorted(set(self.losses) - set(DISTILL_LOSSES))
            if unknown:
                raise ValueError(f"distill.losses: unknown loss {unknown[0]!r} (known: {', '.join(DISTILL_LOSSES)})")
            negative = [k for k, w in self.losses.items() if w < 0]
            if negative:
                raise ValueError(f"distill.losses.{negative[0]}: a weight must be >= 0")
            if not any(w > 0 for w in self.losses.values()):
                raise ValueError("distill.losses: every weight is 0; give one a weight > 0 (or set distill.alpha: 0)")
            feats = [k for k, w in self.losses.items() if k in FEATURE_LOSSES and w > 0]
            if feats and self.feature_layers is None:
                raise ValueError(f"distill.losses.{feats[0]} needs distill.feature_layers "
                                 "(e.g. {student: features.3, teacher: layer3})")
        return self

    def key_dump(self) -> dict:
        """The settings for cache keys of the image task (the LM-only keys left out, see DataConfig.key_dump)."""
        out = self.model_dump(mode="json")
        for k in LM_ONLY_DISTILL_KEYS:
            out.pop(k, None)
        return out

    def sweep_budget(self) -> int:
        """Epochs per sweep point: sweep_epochs, or a sixth of the full run's epochs (at least one)."""
        return self.sweep_epochs if self.sweep_epochs is not None else max(1, math.ceil(self.epochs / 6))

    def loss_weights(self) -> dict[str, float]:
        """The distillation terms and their weights ({kd: 1.0} unless distill.losses says otherwise)."""
        return dict(self.losses) if self.losses is not None else {"kd": 1.0}

    def layer_pairs(self) -> list[tuple[str, str]]:
        """distill.feature_layers as (student path, teacher path) pairs."""
        fl = self.feature_layers
        if fl is None:
            return []
        return [(p.student, p.teacher) for p in (fl if isinstance(fl, list) else [fl])]
