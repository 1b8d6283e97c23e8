"""distill.strategy_options: the settings of each distillation strategy other than plain KD."""
from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from .base import Section


class ExtraTeacher(Section):
    """One more teacher for distill.strategy multi_teacher: a model spec, a state_dict checkpoint (or trained
    here on the training split, cached), and its weight in the average."""

    model: str = Field(min_length=1)
    checkpoint: str | None = None
    weight: float = Field(1.0, gt=0)
    train_epochs: int = Field(8, ge=0, le=1000)


class MultiTeacherOptions(Section):
    teachers: list[ExtraTeacher] = [ExtraTeacher(model="wide_cnn")]
    teacher_weight: float = Field(1.0, ge=0)  # weight of the configured teacher; 0 leaves it out
    average: Literal["probabilities", "logits"] = "probabilities"


class SelfOptions(Section):
    exits: list[str] = Field(["features.1", "features.3"], min_length=1)  # student module paths
    head_width: int = Field(64, ge=1, le=4096)


class BornAgainOptions(Section):
    generations: int = Field(3, ge=1, le=20)
    first_teacher: Literal["teacher", "labels"] = "teacher"
    keep: Literal["last", "best"] = "best"


class MutualOptions(Section):
    peer: str | None = None  # the second student's model spec; the student's own when unset


class DeitOptions(Section):
    patch_size: int = Field(4, ge=1, le=64)
    hidden_dim: int = Field(64, ge=8, le=4096)
    depth: int = Field(4, ge=1, le=48)
    heads: int = Field(4, ge=1, le=64)
    mlp_dim: int = Field(128, ge=8, le=16384)
    distillation: Literal["hard", "soft"] = "hard"


class ProgressiveStage(Section):
    until: float = Field(gt=0, le=1)  # share of training at which this stage ends
    alpha: float = Field(ge=0, le=1)
    temperature: float | None = Field(None, gt=0, le=100)


class ProgressiveOptions(Section):
    stages: list[ProgressiveStage] = [ProgressiveStage(until=0.5, alpha=0.9), ProgressiveStage(until=1.0, alpha=0.5)]
    temperature_start: float | None = Field(8.0, gt=0, le=100)
    temperature_end: float | None = Field(2.0, gt=0, le=100)
    anneal: Literal["linear", "cosine"] = "linear"


class SelectiveOptions(Section):
    threshold: float = Field(0.8, ge=0, le=1)  # the teacher's top-1 probability (T = 1) to trust it
    require_correct: bool = True


class DataFreeOptions(Section):
    samples: int = Field(256, ge=2, le=1_000_000)
    synthesis_steps: int = Field(100, ge=1, le=100_000)
    batch_size: int = Field(64, ge=2, le=4096)
    lr: float = Field(0.1, gt=0, le=10)
    bn_weight: float = Field(0.05, ge=0)
    ce_weight: float = Field(1.0, ge=0)
    diversity_weight: float = Field(1.0, ge=0)
    tv_weight: float = Field(1e-3, ge=0)
    l2_weight: float = Field(0.0, ge=0)
    jitter: int = Field(2, ge=0, le=64)
    clamp: bool = True  # keep inputs within the preprocessing's value range
    # optimise inputs at 1/downsample of the resolution, upsampled; unset: from the preprocessing
    downsample: int | None = Field(None, ge=1, le=64)


class AdversarialOptions(Section):
    weight: float = Field(0.1, ge=0, le=100)  # the student's fooling term, beside the KD loss
    discriminator_weight: float = Field(1.0, gt=0, le=100)
    hidden: int = Field(64, ge=4, le=4096)  # the discriminator MLP's width


class FederatedOptions(Section):
    clients: int = Field(4, ge=1, le=1000)
    rounds: int | None = Field(None, ge=1, le=10_000)  # unset: distill.epochs // local_epochs (equal steps)
    local_epochs: int = Field(1, ge=1, le=1000)
    partition: Literal["iid", "by_class"] = "iid"
    classes_per_client: int = Field(2, ge=1, le=100_000)  # with partition by_class


class CrossModalOptions(Section):
    """The student's input, made from the teacher's preprocessed input (data/modality.py)."""

    greyscale: bool = True  # luminance of the three channels
    channels: int | None = Field(None, ge=1, le=64)  # unset: 1 with greyscale, else the teacher's
    resolution: int | None = Field(None, ge=4, le=4096)  # unset: the teacher's (data.image_size)


class StrategyOptions(Section):
    """distill.strategy_options: the settings of each strategy other than plain KD (the chosen one is used)."""

    multi_teacher: MultiTeacherOptions = MultiTeacherOptions()
    self: SelfOptions = SelfOptions()
    born_again: BornAgainOptions = BornAgainOptions()
    mutual: MutualOptions = MutualOptions()
    deit: DeitOptions = DeitOptions()
    progressive: ProgressiveOptions = ProgressiveOptions()
    selective: SelectiveOptions = SelectiveOptions()
    data_free: DataFreeOptions = DataFreeOptions()
    adversarial: AdversarialOptions = AdversarialOptions()
    federated: FederatedOptions = FederatedOptions()
    cross_modal: CrossModalOptions = CrossModalOptions()

    @model_validator(mode="after")
    def _consistent(self) -> StrategyOptions:
        p = self.progressive
        ends = [s.until for s in p.stages]
        if ends and (ends != sorted(set(ends)) or ends[-1] != 1.0):
            raise ValueError("progressive.stages: 'until' must increase and the last be 1.0")
        if (p.temperature_start is None) != (p.temperature_end is None):
            raise ValueError("progressive: give temperature_start and temperature_end "
                             "together (or neither)")
        if p.temperature_start is not None and any(s.temperature is not None for s in p.stages):
            raise ValueError("progressive: a stage temperature and temperature_start/_end "
                             "both set the temperature; give one")
        c = self.cross_modal
        if not c.greyscale and c.channels is None and c.resolution is None:
            raise ValueError("cross_modal: the student's input is the teacher's; set greyscale, channels or "
                             "resolution")
        if self.deit.hidden_dim % self.deit.heads:
            raise ValueError(f"deit.hidden_dim {self.deit.hidden_dim} must be divisible "
                             f"by heads {self.deit.heads}")
        return self
