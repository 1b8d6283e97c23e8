"""Structured channel pruning on torch-pruning's dependency graph, with KD fine-tuning and latency steps."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from .config import PruneConfig
from .errors import StageError
from .models import count_macs, count_params

MAX_STEPS = 40  # granularity of the search toward a MACs/params/latency target


@dataclass
class PruneStep:
    """One pruning step's figures, for the report's per-step table."""

    step: int
    params: int
    macs: int
    latency_ms: float | None = None
    accuracy: float | None = None


@dataclass
class PruneOutcome:
    before: dict
    after: dict
    steps: list[PruneStep] = field(default_factory=list)
    reached: bool = True
    note: str = ""


def _importance(criterion: str):
    import torch_pruning as tp

    if criterion == "l1":
        return tp.importance.MagnitudeImportance(p=1)
    if criterion == "l2":
        return tp.importance.MagnitudeImportance(p=2)
    if criterion == "bn_scale":
        return tp.importance.BNScaleImportance()
    if criterion == "taylor":
        return tp.importance.TaylorImportance()
    return tp.importance.RandomImportance()


def _head_layers(model: nn.Module, num_classes: int, ignored: list[str]) -> list[nn.Module]:
    """Layers kept whole: every layer producing the class logits, plus the user's ignored module names."""
    mods = dict(model.named_modules())
    keep: list[nn.Module] = []
    for name in ignored:
        if name not in mods:
            raise StageError(f"prune.ignored_layers: the model has no module named {name!r}")
        keep.append(mods[name])
    for m in model.modules():
        if isinstance(m, nn.Linear) and m.out_features == num_classes:
            keep.append(m)
        elif isinstance(m, nn.Conv2d) and m.out_channels == num_classes:
            keep.append(m)
    # Attention blocks (ViT) keep their fused qkv/out projections whole; MLPs are pruned.
    for m in model.modules():
        if isinstance(m, nn.MultiheadAttention):
            keep.append(m)
    return keep


def _vit_extras(model: nn.Module) -> dict:
    """torch-pruning needs the class token / positional embedding of torchvision ViTs as unwrapped params."""
    extra = {}
    if hasattr(model, "class_token") and hasattr(model, "encoder"):
        extra[model.class_token] = 2
        pos = getattr(model.encoder, "pos_embedding", None)
        if pos is not None:
            extra[pos] = 2
    return extra


def make_pruner(model: nn.Module, example: torch.Tensor, cfg: PruneConfig, num_classes: int, round_to: int | None,
                pruning_ratio: float, iterative_steps: int):
    """A torch-pruning MetaPruner set up for this model, criterion, head and rounding."""
    import torch_pruning as tp

    kwargs = dict(
        importance=_importance(cfg.criterion), global_pruning=cfg.global_pruning, pruning_ratio=pruning_ratio,
        iterative_steps=iterative_steps, ignored_layers=_head_layers(model, num_classes, cfg.ignored_layers),
        round_to=round_to, max_pruning_ratio=0.95,
    )
    extras = _vit_extras(model)
    if extras:
        kwargs["unwrapped_parameters"] = list(extras.items())
    try:
        return tp.pruner.MetaPruner(model, example, **kwargs)
    except Exception as e:  # noqa: BLE001 - the dependency graph fails in many ways on odd models
        raise StageError(f"prune: torch-pruning could not trace {type(model).__name__}: {e}") from None


def _taylor_grads(model: nn.Module, data: tuple[torch.Tensor, torch.Tensor] | None) -> None:
    if data is None:
        return
    x, y = data
    model.zero_grad()
    loss = nn.functional.cross_entropy(model(x), y.clamp_min(0))
    loss.backward()


def prune(model: nn.Module, input_shape: tuple[int, ...], cfg: PruneConfig, num_classes: int, round_to: int | None,
          *, finetune: Callable[[nn.Module, int], float] | None = None,
          measure_latency: Callable[[nn.Module], float] | None = None,
          baseline_latency_ms: float | None = None,
          grad_batch: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[nn.Module, PruneOutcome]:
    """Prune `model` in place to the configured amount; returns it with before/after figures and steps.

    ratio prunes that share of channels in `cfg.steps` steps; target_macs/target_params step until the
    counted figure reaches the target; target_speedup/target_latency_ms step until the latency
    measured by `measure_latency` (on the target's runtime) reaches it. `finetune(model, step)` runs KD
    recovery after each step and returns the validation accuracy."""
    example = torch.zeros(1, *input_shape)
    model.eval()
    base_params, base_macs = count_params(model), count_macs(model, input_shape)
    outcome = PruneOutcome(before={"params": base_params, "macs": base_macs}, after={})
    kind, amount = cfg.amount()
    if kind == "ratio":
        pruner = make_pruner(model, example, cfg, num_classes, round_to, amount, cfg.steps)
        for i in range(cfg.steps):
            _taylor_grads(model, grad_batch if cfg.criterion == "taylor" else None)
            pruner.step()
            model.zero_grad(set_to_none=True)
            acc = finetune(model, i) if finetune else None
            lat = measure_latency(model) if measure_latency else None
            outcome.steps.append(PruneStep(i + 1, count_params(model), count_macs(model, input_shape), lat, acc))
    else:
        target_latency = None
        if kind == "target_speedup":
            if baseline_latency_ms is None or measure_latency is None:
                raise StageError("prune.target_speedup needs a measured baseline latency")
            target_latency = baseline_latency_ms / amount
        elif kind == "target_latency_ms":
            if measure_latency is None:
                raise StageError("prune.target_latency_ms needs a latency measurement on the target")
            target_latency = amount
        pruner = make_pruner(model, example, cfg, num_classes, round_to, 0.9, MAX_STEPS)
        # Fine-tune at the configured number of checkpoints along the way, not after each micro-step.
        ft_every = max(1, MAX_STEPS // (cfg.steps * 4)) if target_latency is None else 2
        reached = False
        for i in range(MAX_STEPS):
            _taylor_grads(model, grad_batch if cfg.criterion == "taylor" else None)
            pruner.step()
            model.zero_grad(set_to_none=True)
            params, macs = count_params(model), count_macs(model, input_shape)
            lat = None
            if target_latency is not None:
                lat = measure_latency(model)  # type: ignore[misc]
                reached = lat <= target_latency
            elif kind == "target_macs":
                reached = macs <= amount * base_macs
            else:
                reached = params <= amount * base_params
            acc = None
            if finetune and (reached or (i + 1) % ft_every == 0):
                acc = finetune(model, i)
            outcome.steps.append(PruneStep(i + 1, params, macs, lat, acc))
            if reached:
                break
        outcome.reached = reached
        if not reached:
            outcome.note = f"prune.{kind} {amount} not reached after {MAX_STEPS} steps"
    model.eval()
    outcome.after = {"params": count_params(model), "macs": count_macs(model, input_shape)}
    return model, outcome


def _int_attrs(m: nn.Module) -> dict:
    out = {}
    for k, v in vars(m).items():
        if k.startswith("_") or isinstance(v, bool):
            continue
        if isinstance(v, int) or (isinstance(v, (tuple, list)) and v and all(isinstance(i, int) for i in v)):
            out[k] = list(v) if isinstance(v, (tuple, list)) else v
    return out


def save_pruned(model: nn.Module) -> dict:
    """A weights-only-loadable description of a pruned model: every module's integer shape attributes
    (channels, features, groups...) plus the state_dict."""
    shapes = {name: _int_attrs(m) for name, m in model.named_modules()}
    return {"format": "edgekd-pruned-v1", "shapes": shapes, "state_dict": model.state_dict()}


def load_pruned(fresh: nn.Module, saved: dict) -> nn.Module:
    """Rebuild the pruned shapes on an unpruned instance of the same architecture and load the weights."""
    mods = dict(fresh.named_modules())
    for name, attrs in saved["shapes"].items():
        m = mods.get(name)
        if m is None:
            raise StageError(f"pruned model description names module {name!r} the architecture lacks")
        for k, v in attrs.items():
            old = getattr(m, k, None)
            setattr(m, k, tuple(v) if isinstance(old, tuple) else v)
    for key, tensor in saved["state_dict"].items():
        mod_name, _, attr = key.rpartition(".")
        m = mods[mod_name]
        if attr in m._parameters:
            m._parameters[attr] = nn.Parameter(tensor.clone(), requires_grad=m._parameters[attr].requires_grad)
        elif attr in m._buffers:
            m._buffers[attr] = tensor.clone()
    fresh.load_state_dict(saved["state_dict"], strict=True)
    return fresh
