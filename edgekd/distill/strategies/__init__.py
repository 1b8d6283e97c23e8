"""Distillation strategies beyond plain KD, chosen by distill.strategy; each module's `run(ctx, teacher,
student)` returns (the student to prune and export, the stage metrics) like the KD stage does.

    multi_teacher  several teachers' (weighted) average as the soft target
    self           auxiliary exits on intermediate layers, taught by the deepest exit; dropped at export
    born_again     N generations of one architecture, each distilled from the previous
    mutual         two students trained together, each distilling from the other
    deit           a ViT student with a distillation token; inference averages its two heads
    progressive    a schedule of (alpha, temperature) stages with temperature annealing
    selective      soft targets where the teacher is confident and right, hard labels elsewhere
    data_free      inputs synthesised from the teacher's BatchNorm statistics, then distilled
    adversarial    KD plus a discriminator on the class distributions that the student learns to fool
    federated      clients distil locally on private shards; the server averages their weights (FedAvg)
    cross_modal    the teacher sees the full input, the student a cheaper sensor's (greyscale, fewer
                   channels, lower resolution), and is exported taking that
"""
from __future__ import annotations

import importlib

from torch import nn

from ...config import STRATEGY_MODULES
from ...context import RunContext
from ...errors import ConfigError

MODULES = {name: module for name, module in STRATEGY_MODULES.items() if module is not None}

__all__ = ["MODULES", "run_strategy", "student_for"]


def run_strategy(ctx: RunContext, teacher: nn.Module, student: nn.Module, key: str) -> tuple[nn.Module, dict]:
    """Run the strategy distill.strategy names; returns (student, metrics for the report's distill entry).

    `key` is the stage's cache key (the pipeline records it; the strategies need not)."""
    name = ctx.config.distill.strategy
    if name not in MODULES:
        raise ConfigError(f"distill.strategy {name!r} is not one of kd, {', '.join(MODULES)}")
    module = importlib.import_module(f"{__name__}.{MODULES[name]}")
    teacher.eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    return module.run(ctx, teacher, student)


def student_for(ctx: RunContext, student: nn.Module) -> nn.Module:
    """The module whose weights the configured strategy returns, built from `student` (`student` itself
    except for deit, whose ViT replaces a non-ViT student): what a resumed run loads model.pt into."""
    if ctx.config.distill.strategy != "deit":
        return student
    from .deit import student_for as deit_student

    return deit_student(ctx, student)
