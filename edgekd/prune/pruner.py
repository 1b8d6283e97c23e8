"""Structured channel pruning on torch-pruning's dependency graph, with KD fine-tuning and latency steps.

Every torchvision classifier family goes through the same MetaPruner; what a family needs beyond the
generic graph (parameters outside modules, attributes read in forward, ops the tracer cannot map)
is collected in an `ArchPlan` by `arch_plan`.
"""
from __future__ import annotations

import contextlib
import copy
import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

import torch
from torch import nn

from ..config import PruneConfig
from ..errors import StageError
from ..models import count_params
from .concat import fast_patches

MAX_STEPS = 40  # granularity of the search toward a MACs/params/latency target
MAX_LAYER_RATIO = 0.95  # no layer loses more than this share of its channels


# (latency of the model in ms, latency of the unpruned model measured alongside in ms)
LatencyFn = Callable[[nn.Module], tuple[float, float]]
# several models timed together: (name, model) pairs, taken one at a time -> {name: (latency, unpruned)}
ManyLatencyFn = Callable[[Iterable[tuple[str, nn.Module]]], dict[str, tuple[float, float]]]


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


@dataclass
class ArchPlan:
    """What torch-pruning's dependency graph needs for one architecture, beyond the generic trace."""

    family: str = "generic"
    ignored: list[nn.Module] = field(default_factory=list)
    unwrapped: list[tuple[nn.Parameter, int]] = field(default_factory=list)
    round_to: int | None = None
    after_step: list[Callable[[], None]] = field(default_factory=list)
    # (namespace, attribute, stand-in) swapped in while the graph is traced
    trace_patches: list[tuple[object, str, object]] = field(default_factory=list)
    kept_whole: int = 0  # layers kept whole because their channel group could not be mapped


def classifier_head(model: nn.Module, example: torch.Tensor) -> nn.Module | None:
    """The last Conv2d/Linear that runs in a forward pass: the layer producing the class logits."""
    order: list[nn.Module] = []
    hooks = [m.register_forward_hook(lambda mod, _i, _o: order.append(mod))
             for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(example)
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    return order[-1] if order else None


def _shuffle_stand_in(x: torch.Tensor, groups: int) -> torch.Tensor:
    return x


def arch_plan(model: nn.Module, example: torch.Tensor, round_to: int | None, ignored_names: list[str]) -> ArchPlan:
    """The family-specific settings for pruning `model`: kept layers, unwrapped parameters, rounding, fixups."""
    from torchvision.models import shufflenetv2
    from torchvision.models.convnext import CNBlock
    from torchvision.models.vision_transformer import VisionTransformer

    plan = ArchPlan(round_to=round_to)
    mods = dict(model.named_modules())
    for name in ignored_names:
        if name not in mods:
            raise StageError(f"prune.ignored_layers: the model has no module named {name!r}")
        plan.ignored.append(mods[name])
    head = classifier_head(model, example)
    if head is not None:
        plan.ignored.append(head)
    if isinstance(model, VisionTransformer):
        # The residual width is also every attention's embed_dim, which must stay divisible by num_heads,
        # and forward() reshapes with the hidden_dim attribute, so it follows the class token after each step.
        heads = [m.num_heads for m in model.modules() if isinstance(m, nn.MultiheadAttention)]
        plan.family = "vit"
        plan.round_to = math.lcm(round_to or 1, *heads)
        plan.unwrapped += [(model.class_token, 2), (model.encoder.pos_embedding, 2)]
        plan.after_step.append(lambda: setattr(model, "hidden_dim", model.class_token.shape[-1]))
    elif any(isinstance(m, CNBlock) for m in model.modules()):
        plan.family = "convnext"
        plan.unwrapped += [(m.layer_scale, 0) for m in model.modules() if isinstance(m, CNBlock)]
    elif isinstance(model, shufflenetv2.ShuffleNetV2):
        # The channel shuffle is a reshape the tracer cannot map back to channels. Block outputs (the last
        # conv of each branch) are kept whole, so nothing pruned crosses a shuffle and the graph may be
        # traced with the shuffle left out; the bottleneck width inside each branch and the stem and
        # final 1x1 conv are pruned.
        plan.family = "shufflenet"
        for m in model.modules():
            if isinstance(m, shufflenetv2.InvertedResidual):
                for branch in (m.branch1, m.branch2):
                    convs = [c for c in branch.modules() if isinstance(c, nn.Conv2d)]
                    if convs:
                        plan.ignored.append(convs[-1])
        plan.trace_patches.append((shufflenetv2, "channel_shuffle", _shuffle_stand_in))
    return plan


def _unmappable_layers(model: nn.Module, example: torch.Tensor, plan: ArchPlan) -> list[nn.Module]:
    """Layers whose channel group torch-pruning cannot map through the graph (reshapes, odd splits):
    they are kept whole rather than failing the whole model."""
    import torch_pruning as tp

    dg = tp.DependencyGraph().build_dependency(model, example, unwrapped_parameters=plan.unwrapped or None)
    bad = []
    for m in dg.module2node:
        if not isinstance(m, (nn.Conv2d, nn.Linear)) or m in plan.ignored:
            continue
        try:
            dg.get_pruning_group(m, dg.get_pruner_of_module(m).prune_out_channels,
                                 list(range(dg.get_out_channels(m))))
        except Exception:  # noqa: BLE001 - any failure means this group cannot be pruned safely
            bad.append(m)
    return bad


@contextlib.contextmanager
def _patched(patches: list[tuple[object, str, object]]) -> Iterator[None]:
    saved = [(ns, attr, getattr(ns, attr)) for ns, attr, _ in patches]
    try:
        for ns, attr, stand_in in patches:
            setattr(ns, attr, stand_in)
        yield
    finally:
        for ns, attr, orig in saved:
            setattr(ns, attr, orig)


class StructuredPruner:
    """torch-pruning's MetaPruner set up for one model, criterion, head and rounding, plus the
    architecture's fixups after each step."""

    def __init__(self, model: nn.Module, example: torch.Tensor, cfg: PruneConfig, round_to: int | None,
                 pruning_ratio: float, iterative_steps: int, stage_ratios: dict[str, float] | None = None):
        import torch_pruning as tp

        self.model = model
        self.plan = arch_plan(model, example, round_to, cfg.ignored_layers)
        mods = dict(model.named_modules())
        # a stage is one module name or several joined by '+', pruned to its own ratio
        ratio_dict = {tuple(mods[n] for n in stage.split("+")): r for stage, r in (stage_ratios or {}).items()}
        kwargs: dict = dict(
            importance=_importance(cfg.criterion), global_pruning=cfg.global_pruning, pruning_ratio=pruning_ratio,
            iterative_steps=iterative_steps, ignored_layers=self.plan.ignored, round_to=self.plan.round_to,
            max_pruning_ratio=MAX_LAYER_RATIO, pruning_ratio_dict=ratio_dict or None,
        )
        if self.plan.unwrapped:
            kwargs["unwrapped_parameters"] = self.plan.unwrapped
        try:
            with _patched(self.plan.trace_patches + fast_patches()):
                try:
                    self.pruner = tp.pruner.MetaPruner(model, example, **kwargs)
                except Exception:  # noqa: BLE001 - retried once with the unmappable groups kept whole
                    unmappable = _unmappable_layers(model, example, self.plan)
                    if not unmappable:
                        raise
                    self.plan.ignored += unmappable
                    self.plan.kept_whole = len(unmappable)
                    self.pruner = tp.pruner.MetaPruner(model, example, **kwargs)
        except Exception as e:  # noqa: BLE001 - the dependency graph fails in many ways on odd models
            raise StageError(f"prune: torch-pruning could not trace {type(model).__name__}: "
                             f"{type(e).__name__}: {str(e)[:200]}") from None

    def step(self) -> None:
        """Remove the next share of channels and bring the model's shape attributes up to date."""
        with _patched(fast_patches()):
            self.pruner.step()
        for fix in self.plan.after_step:
            fix()


def make_pruner(model: nn.Module, example: torch.Tensor, cfg: PruneConfig, round_to: int | None,
                pruning_ratio: float, iterative_steps: int,
                stage_ratios: dict[str, float] | None = None) -> StructuredPruner:
    """A pruner for `model` that removes `pruning_ratio` of the channels over `iterative_steps` steps
    (`stage_ratios`: a ratio of its own for named stages)."""
    return StructuredPruner(model, example, cfg, round_to, pruning_ratio, iterative_steps, stage_ratios)


def latency_stages(model: nn.Module, plan: ArchPlan, most: int = 8) -> list[str]:
    """The network cut into at most `most` consecutive stages with prunable layers: top-level children,
    the largest split into its children until there are four, neighbours joined beyond `most`."""
    def prunable(m: nn.Module) -> bool:
        return any(isinstance(c, (nn.Conv2d, nn.Linear)) and c not in plan.ignored for c in m.modules())

    stages = [(n, m) for n, m in model.named_children() if prunable(m)]
    while len(stages) < 4:
        splittable = [s for s in stages if any(prunable(c) for c in s[1].children())]
        if not splittable:
            break
        big = max(splittable, key=lambda s: count_params(s[1]))
        i = stages.index(big)
        stages[i:i + 1] = [(f"{big[0]}.{n}", c) for n, c in big[1].named_children() if prunable(c)]
    names = [n for n, _ in stages]
    if len(names) > most:
        per = math.ceil(len(names) / most)
        names = ["+".join(names[i:i + per]) for i in range(0, len(names), per)]
    return names


def stage_latency_share(model: nn.Module, example: torch.Tensor, cfg: PruneConfig, round_to: int | None,
                        measure: LatencyFn) -> dict[str, float]:
    """For each stage, the share of the model's latency saved by pruning half of that stage's channels,
    measured on the target (relative to the stage that saves most): where pruning pays off in time."""
    probe_cfg = cfg.model_copy(update={"criterion": "l2", "global_pruning": False})
    stages = latency_stages(model, arch_plan(model, example, round_to, cfg.ignored_layers))
    saved = {}
    for stage in stages:
        trial = copy.deepcopy(model)
        make_pruner(trial, example, probe_cfg, round_to, 0.0, 1, {stage: 0.5}).step()
        latency, reference = measure(trial)
        saved[stage] = max(0.0, 1.0 - latency / reference)
    top = max(saved.values(), default=0.0)
    return {k: (v / top if top > 0 else 1.0) for k, v in saved.items()}


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
