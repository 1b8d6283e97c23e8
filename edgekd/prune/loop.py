"""The pruning loop: step a structured pruner toward a ratio, a MACs/params target or a latency target,
fine-tuning at checkpoints and timing candidates on the target's runtime."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from ..config import PruneConfig
from ..errors import StageError
from ..models import count_macs, count_params
from .allocation import one_at_a_time, search
from .pruner import (
    MAX_STEPS,
    LatencyFn,
    ManyLatencyFn,
    StructuredPruner,
    arch_plan,
    latency_stages,
    make_pruner,
    stage_latency_share,
)


@dataclass
class PruneStep:
    """One pruning step's figures, for the report's per-step table."""

    step: int
    params: int
    macs: int
    latency_ms: float | None = None
    accuracy: float | None = None
    speedup: float | None = None  # over the unpruned model, measured in the same interleaved rounds


@dataclass
class PruneOutcome:
    """Before/after counts, the per-step table and what the pruning found on the way."""

    before: dict
    after: dict
    steps: list[PruneStep] = field(default_factory=list)
    reached: bool = True
    note: str = ""
    family: str = "generic"
    kept_whole: int = 0  # layers whose channel group could not be mapped, left unpruned
    stage_latency_share: dict[str, float] = field(default_factory=dict)
    allocation_search: list[dict] = field(default_factory=list)  # candidates timed for a MACs/params target


def _taylor_grads(model: nn.Module, data: tuple[torch.Tensor, torch.Tensor] | None) -> None:
    if data is None:
        return
    x, y = data
    model.zero_grad()
    loss = nn.functional.cross_entropy(model(x), y.clamp_min(0))
    loss.backward()


def prune(model: nn.Module, input_shape: tuple[int, ...], cfg: PruneConfig, num_classes: int, round_to: int | None,
          *, finetune: Callable[[nn.Module, int], float] | None = None, measure_latency: LatencyFn | None = None,
          measure_many: ManyLatencyFn | None = None,
          grad_batch: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[nn.Module, PruneOutcome]:
    """Prune `model` in place to the configured amount; returns it with before/after figures and steps.

    ratio prunes that share of channels in `cfg.steps` steps; target_macs/target_params step until the
    counted figure reaches the target; target_speedup/target_latency_ms step until the latency measured
    by `measure_latency` (on the target's runtime) reaches it. With latency guidance, a MACs/params target
    takes the fastest of several stage allocations, each pruned to the target on a copy and timed
    together (`measure_many`, else one by one), and a latency target prunes faster the stages whose
    probes saved more time. `finetune(model, step)` runs KD recovery at checkpoints and returns the
    validation accuracy; `num_classes` is kept for callers, the head is found by tracing."""
    example = torch.zeros(1, *input_shape)
    model.eval()
    base_params, base_macs = count_params(model), count_macs(model, input_shape)
    outcome = PruneOutcome(before={"params": base_params, "macs": base_macs}, after={})
    kind, amount = cfg.amount()
    on_latency = kind in ("target_speedup", "target_latency_ms")
    if on_latency and measure_latency is None:
        raise StageError(f"prune.{kind} needs a latency measurement on the target")

    def one_step(pruner: StructuredPruner) -> tuple[int, int]:
        _taylor_grads(model, grad_batch if cfg.criterion == "taylor" else None)
        pruner.step()
        model.zero_grad(set_to_none=True)
        return count_params(model), count_macs(model, input_shape)

    def measured() -> tuple[float | None, float | None]:
        if measure_latency is None:
            return None, None
        latency, reference = measure_latency(model)
        return latency, reference / latency

    def counted_target(params: int, macs: int) -> bool:
        return macs <= amount * base_macs if kind == "target_macs" else params <= amount * base_params

    if kind == "ratio":
        pruner = make_pruner(model, example, cfg, round_to, amount, cfg.steps)
        outcome.family, outcome.kept_whole = pruner.plan.family, pruner.plan.kept_whole
        for i in range(cfg.steps):
            params, macs = one_step(pruner)
            acc = finetune(model, i) if finetune else None
            latency, speedup = measured()
            outcome.steps.append(PruneStep(i + 1, params, macs, latency, acc, speedup))
        if count_params(model) == base_params:
            outcome.note = (f"prune.ratio {amount} removed no channel: torch-pruning rounds each layer's kept "
                            f"channels to {round_to or 1}; try another ratio or a target_macs")
    else:
        stage_ratios = None
        if cfg.guided(kind) and measure_latency is not None and on_latency:
            outcome.stage_latency_share = stage_latency_share(model, example, cfg, round_to, measure_latency)
            # the stage that saves most time is pruned twice as fast as one that saves none
            stage_ratios = {k: 0.9 * (0.5 + 0.5 * w) for k, w in outcome.stage_latency_share.items()}
        elif cfg.guided(kind) and measure_latency is not None:
            stages = latency_stages(model, arch_plan(model, example, round_to, cfg.ignored_layers))
            stage_ratios, outcome.allocation_search = search(
                model, example, cfg, round_to, stages, counted_target, measure_many or one_at_a_time(measure_latency),
                "macs" if kind == "target_macs" else "params")
        pruner = make_pruner(model, example, cfg, round_to, 0.9, MAX_STEPS, stage_ratios)
        outcome.family, outcome.kept_whole = pruner.plan.family, pruner.plan.kept_whole
        # Fine-tune at checkpoints along the way (four per configured step of the 40), not after each
        # micro-step; latency does not depend on the weights, so it is measured before recovery.
        ft_every = max(1, MAX_STEPS // (cfg.steps * 4))
        reached = False
        for i in range(MAX_STEPS):
            params, macs = one_step(pruner)
            latency = speedup = None
            if on_latency:
                latency, speedup = measured()
                reached = (speedup >= amount) if kind == "target_speedup" else latency <= amount  # type: ignore[operator]
            else:
                reached = counted_target(params, macs)
            checkpoint = reached or (i + 1) % ft_every == 0
            acc = finetune(model, i) if finetune and checkpoint else None
            if latency is None and checkpoint:
                latency, speedup = measured()
            outcome.steps.append(PruneStep(i + 1, params, macs, latency, acc, speedup))
            if reached:
                break
        outcome.reached = reached
        if not reached:
            outcome.note = f"prune.{kind} {amount} not reached after {MAX_STEPS} steps"
    model.eval()
    outcome.after = {"params": count_params(model), "macs": count_macs(model, input_shape)}
    return model, outcome
