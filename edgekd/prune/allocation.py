"""Where to prune for a MACs or params target: candidate allocations of the pruning across the
network's stages, each pruned on a copy to the target, timed side by side on the target's runtime;
the fastest is the one the prune stage then runs with fine-tuning.

At equal MACs, latency still differs by where the channels go: layers at low resolution hold most of
the weights (memory traffic), small convolutions parallelise badly, and channel counts meet the
kernels' blocking or not. Measuring the finished shapes captures all of that at once. Channel counts
under per-layer pruning depend on the stage ratios and the step alone, not on the weights, so the
pruned shapes found here are the shapes the real run reaches (under global pruning, nearly)."""
from __future__ import annotations

import copy
from collections.abc import Callable, Iterator

import torch
from torch import nn

from ..config import PruneConfig
from ..models import count_macs, count_params
from .pruner import MAX_STEPS, LatencyFn, ManyLatencyFn, make_pruner

FAST, SLOW = 0.9, 0.4  # a favoured stage's channel ratio at the end of the schedule, and the others'
# Channel counts move in steps of round_to, so on narrow layers (DenseNet's 32-channel convolutions)
# one pruning step can overshoot the target by a lot. Pruning further than asked buys speed with
# accuracy the target did not give up, so only candidates that kept within this share of the least
# pruned one's MACs (params) compete on latency.
NEAR_TARGET = 0.95


def candidates(stages: list[str]) -> dict[str, dict[str, float] | None]:
    """Uniform pruning, then each stage and each pair of neighbouring stages pruned faster than the rest."""
    out: dict[str, dict[str, float] | None] = {"uniform": None}
    groups = [[s] for s in stages] + [[a, b] for a, b in zip(stages, stages[1:], strict=False)]
    for group in groups:
        out["favour " + ", ".join(group)] = {s: FAST if s in group else SLOW for s in stages}
    return out


def search(model: nn.Module, example: torch.Tensor, cfg: PruneConfig, round_to: int | None, stages: list[str],
           reached: Callable[[int, int], bool], measure_many: ManyLatencyFn,
           counted: str = "macs") -> tuple[dict[str, float] | None, list[dict]]:
    """Prune a copy of `model` under each candidate allocation until `reached(params, macs)`, time the
    results together, and return (the stage ratios of the fastest allocation near the target, one
    report row per candidate). `counted` ("macs" or "params") is what the target counts."""
    shape = tuple(example.shape[1:])
    # The criterion decides which channels go, not how many: magnitude stands in for one that needs data.
    sim_cfg = cfg.model_copy(update={"criterion": "l2"}) if cfg.criterion == "taylor" else cfg
    rows: dict[str, dict] = {}
    plans = candidates(stages)

    def pruned() -> Iterator[tuple[str, nn.Module]]:  # one copy at a time, handed on to be timed
        for name, ratios in plans.items():
            trial = copy.deepcopy(model).eval()
            for p in trial.parameters():
                p.requires_grad_(True)
            pruner = make_pruner(trial, example, sim_cfg, round_to, 0.9, MAX_STEPS, ratios)
            for step in range(1, MAX_STEPS + 1):
                pruner.step()
                params, macs = count_params(trial), count_macs(trial, shape)
                if reached(params, macs):
                    rows[name] = {"allocation": name, "stage_ratios": ratios, "steps": step, "params": params,
                                  "macs": macs}
                    yield name, trial
                    break
            del trial, pruner

    timed = measure_many(pruned())
    if not timed:
        return None, []
    for name, (latency, reference) in timed.items():
        rows[name].update(latency_ms=round(latency, 4), speedup=round(reference / latency, 3))
    closest = max(rows[n][counted] for n in timed)
    near = [n for n in timed if rows[n][counted] >= NEAR_TARGET * closest]
    best = min(near, key=lambda n: (timed[n][0] / timed[n][1], n != "uniform"))
    for name, row in rows.items():
        row["near_target"] = name in near
        row["chosen"] = name == best
    return plans[best], list(rows.values())


def one_at_a_time(measure: LatencyFn) -> ManyLatencyFn:
    """A ManyLatencyFn from a single-model measurement (each candidate timed beside its own reference)."""
    return lambda models: {name: measure(m) for name, m in models}
