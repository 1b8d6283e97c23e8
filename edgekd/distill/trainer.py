"""Training loops: supervised (teacher, baselines) and distillation from a cached teacher-logit table,
with optional feature terms, DistributedDataParallel under torchrun and mixed precision on GPU."""
from __future__ import annotations

import copy
import math
import time
import warnings
from collections.abc import Mapping, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from ..data import ArrayDataset
from ..data.images import AugmentedView, Images
from ..progress import NullProgress, Progress
from . import parallel
from .batchnorm import reestimate_bn
from .cache import TeacherLogitCache, frozen
from .features import FeatureTap, StudentWithAdapters
from .losses import FEATURE_LOSSES, combined_loss, soft_target_entropy

AUG_DRAWS = 8  # augmentation draws per sample whose teacher logits are cached and reused
# Plain KD and its no-KD twin: up to KD_DRAWS draws while the views, were they stored as float32, would
# fit in KD_VIEWS_BYTES. Views are made per batch, never stored; the bound keeps the teacher's labelling
# (one pass over every view) in proportion as the set grows. The more distinct views the teacher labels,
# the closer the student matches its function (BENCHMARKS.md, issue 7: 30 draws against 8 on the
# embedded default).
KD_DRAWS, KD_VIEWS_BYTES = 30, 1 << 30
NEAR_UNIFORM = 0.95  # soft targets whose mean entropy exceeds this share of log C carry little signal

__all__ = ["AUG_DRAWS", "KD_DRAWS", "KD_VIEWS_BYTES", "TeacherLogitCache", "TrainResult", "accuracy", "agreement",
           "augmented_views", "evaluate", "kd_draws", "predict_logits", "train"]


@dataclass
class TrainResult:
    """What a training run produced, for the report."""

    val_accuracy: float
    val_loss: float = float("nan")
    epoch_seconds: list[float] = field(default_factory=list)
    curve: list[dict] = field(default_factory=list)
    steps: int = 0
    cache_seconds: float = 0.0
    cache_hit: bool = False
    soft_target_entropy: float | None = None
    samples: int = 0
    world_size: int = 1
    device: str = "cpu"
    precision: str = "fp32"


def _device_of(model: nn.Module) -> torch.device:
    p = next(iter(model.parameters()), None)
    return p.device if p is not None else torch.device("cpu")


@torch.no_grad()
def predict_logits(model: nn.Module, x: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """Logits of `model` in eval mode for all of `x` (returned on the CPU, float32)."""
    was = model.training
    model.eval()
    dev = _device_of(model)
    out = torch.cat([model(x[i:i + batch_size].to(dev)).float().cpu() for i in range(0, len(x), batch_size)])
    model.train(was)
    return out


def evaluate(model: nn.Module, ds: ArrayDataset) -> tuple[float, float]:
    """Top-1 accuracy in percent and mean cross-entropy (PyTorch; for model selection, never in reports)."""
    logits = predict_logits(model, ds.x)
    acc = float((logits.argmax(1) == ds.y).float().mean() * 100)
    return acc, float(nn.functional.cross_entropy(logits, ds.y))


def accuracy(model: nn.Module, ds: ArrayDataset) -> float:
    """Top-1 accuracy in percent (PyTorch; used for model selection only, never in reports)."""
    return evaluate(model, ds)[0]


def kd_draws(x: torch.Tensor | Images) -> int:
    """Augmentation draws for distilling on `x`: KD_DRAWS while they would fit in KD_VIEWS_BYTES as
    float32, never fewer than AUG_DRAWS."""
    per_view = max(1, 4 * math.prod(x.shape))
    return max(AUG_DRAWS, min(KD_DRAWS, KD_VIEWS_BYTES // per_view))


def augmented_views(x: torch.Tensor | Images, seed: int, draws: int,
                    augment: bool) -> list[torch.Tensor | Images]:
    """`draws` deterministic augmentation draws of the whole training set, each made per batch when
    indexed (draw d translates every sample by offsets from a generator seeded with seed * 1000 + d),
    so memory holds the base images once whatever the number of draws."""
    if not augment:
        return [x]
    return [AugmentedView(x, seed * 1000 + d) for d in range(draws)]


def resolve_device(device: str | torch.device | None) -> torch.device:
    """'auto' (or None): this rank's GPU when CUDA is available, else the CPU."""
    if isinstance(device, torch.device):
        return device
    if device in (None, "auto"):
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        return torch.device("cuda", parallel.local_rank() % max(1, torch.cuda.device_count()))
    return torch.device(device)


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype: bf16 (or fp16 where bf16 is unsupported) on GPU for 'auto'; none on the CPU."""
    if device.type != "cuda" or precision == "fp32":
        return None
    if precision == "fp16" or (precision == "auto" and not torch.cuda.is_bf16_supported()):
        return torch.float16
    return torch.bfloat16


PRECISION_NAMES = {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}  # autocast dtype -> report


def warn_if_near_uniform(cache: TeacherLogitCache, temperature: float, progress: Progress) -> float:
    """Mean normalised entropy of the soft targets at `temperature`; warns when close to log C."""
    ratio = soft_target_entropy(cache.all_logits(0), temperature)
    if ratio > NEAR_UNIFORM:
        msg = (f"distill: the teacher's soft targets at temperature {temperature:g} are near-uniform (entropy "
               f"{ratio:.0%} of log C); they carry little signal: lower distill.temperature")
        progress.note(msg)
        warnings.warn(msg, stacklevel=3)
    return ratio


def train(model: nn.Module, train_set: ArrayDataset, val_set: ArrayDataset, *, epochs: int, lr: float,
          seed: int, batch_size: int = 64, steps: int | None = None, teacher: nn.Module | None = None,
          temperature: float = 4.0, alpha: float = 0.0, augment: bool = True,
          cache: TeacherLogitCache | None = None, progress: Progress | None = None, label: str = "training",
          losses: Mapping[str, float] | None = None, feature_layers: Sequence[tuple[str, str]] = (),
          views: list[torch.Tensor] | None = None, device: str | torch.device | None = "cpu",
          precision: str = "auto", cache_topk: int | None = None) -> TrainResult:
    """Train `model` in place with CE (alpha=0 or no teacher) or distillation; keeps the best-val weights.

    Distillation trains on every sample (labels of -1 get only the teacher's terms) with
    losses.combined_loss; CE-only training uses the labeled samples alone. `steps`, when given, fixes
    the number of optimizer steps (epochs are then derived from it); otherwise epochs * ceil(n / batch).
    After each epoch the BatchNorm statistics are re-estimated on `train_set`'s un-augmented inputs
    (batchnorm.reestimate_bn) before the model is scored, so the kept weights carry their own.
    Under torchrun each global batch is split across the ranks (DistributedDataParallel), so the
    result matches a single-process run up to floating-point reduction order."""
    rank, world = parallel.rank_and_world()
    progress = (progress or NullProgress()) if rank == 0 else NullProgress()
    dev = resolve_device(device)
    torch.manual_seed(seed)
    n = len(train_set)
    total_steps = steps if steps is not None else epochs * max(1, math.ceil(n / batch_size))
    weights = dict(losses or {"kd": 1.0})
    use_kd = teacher is not None and alpha > 0
    if total_steps <= 0:
        acc, loss = evaluate(model, val_set)
        return TrainResult(val_accuracy=acc, val_loss=loss)
    views = cache.views if cache is not None else views or augmented_views(train_set.x, seed, AUG_DRAWS, augment)
    if use_kd and cache is None:
        cache = parallel.shared_cache(teacher, views, topk=cache_topk)  # type: ignore[arg-type]
    pool = torch.arange(n) if use_kd else torch.nonzero(train_set.y >= 0).flatten()
    if len(pool) == 0:
        raise ValueError("no labeled training samples")
    result = TrainResult(val_accuracy=-1.0, samples=int(len(pool)), world_size=world, device=str(dev))
    if use_kd and cache is not None:
        result.cache_seconds, result.cache_hit = cache.seconds, cache.hit
        if any(weights.get(k, 0) > 0 for k in ("kd", "reverse_kl")):
            result.soft_target_entropy = round(warn_if_near_uniform(cache, temperature, progress), 4)
        cache.to(dev)
    feature_pairs = list(feature_layers) if use_kd and any(weights.get(k, 0) > 0 for k in FEATURE_LOSSES) else []
    teacher_dev = _device_of(teacher) if teacher is not None else None
    trainable: nn.Module = model
    teacher_tap = None
    if feature_pairs:
        frozen(teacher).to(dev)  # type: ignore[union-attr]
        trainable = StudentWithAdapters(model, teacher, [s for s, _ in feature_pairs],  # type: ignore[arg-type]
                                        [t for _, t in feature_pairs], views[0][:2].to(dev))
        teacher_tap = FeatureTap(teacher, [t for _, t in feature_pairs], "distill.feature_layers.teacher")  # type: ignore[arg-type]
    trainable.to(dev)
    net = parallel.wrap(trainable, dev) if world > 1 else trainable
    amp = autocast_dtype(precision, dev)
    result.precision = PRECISION_NAMES[amp]
    scaler = torch.amp.GradScaler("cuda") if amp is torch.float16 else None
    opt = torch.optim.AdamW(trainable.parameters(), lr=lr, weight_decay=5e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=total_steps, pct_start=0.15)
    gen = torch.Generator().manual_seed(seed)
    labels = train_set.y
    best_state, best = None, (-1.0, float("inf"))
    step, epoch = 0, 0
    try:
        with progress.task(label, total_steps) as bar:
            while step < total_steps:
                net.train()
                t0 = time.perf_counter()
                draw = epoch % len(views)
                order = pool[torch.randperm(len(pool), generator=gen)]
                loss_sum, seen = torch.zeros((), dtype=torch.float64), 0
                for i in range(0, len(order), batch_size):
                    if step >= total_steps:
                        break
                    idx = order[i:i + batch_size]
                    if world > 1:
                        if len(idx) < world:
                            continue  # every rank skips alike: they share the order
                        idx = idx[rank::world]
                    xb, yb = views[draw][idx].to(dev, non_blocking=True), labels[idx].to(dev, non_blocking=True)
                    with torch.autocast(dev.type, dtype=amp) if amp is not None else nullcontext():
                        out = net(xb)
                        sf: Sequence[torch.Tensor] = ()
                        af: Sequence[torch.Tensor] = ()
                        tf: Sequence[torch.Tensor] = ()
                        if teacher_tap is not None:
                            out, sf, af = out
                            with torch.no_grad():
                                teacher(xb)  # type: ignore[misc]
                            tf = [f.float() for f in teacher_tap.take()]
                            sf, af = [f.float() for f in sf], [f.float() for f in af]
                    if use_kd:
                        loss, _ = combined_loss(out.float(), cache.get(draw, idx), yb,  # type: ignore[union-attr]
                                                temperature=temperature, alpha=alpha, weights=weights,
                                                student_feats=sf, adapted_feats=af, teacher_feats=tf)
                    else:
                        loss = nn.functional.cross_entropy(out.float(), yb)
                    opt.zero_grad(set_to_none=True)
                    if scaler is not None:
                        scaler.scale(loss).backward()
                        scaler.step(opt)
                        scaler.update()
                    else:
                        loss.backward()
                        opt.step()
                    sched.step()
                    step += 1
                    loss_sum += loss.detach().double().cpu() * len(idx)
                    seen += len(idx)
                    bar.advance()
                if dev.type == "cuda":
                    torch.cuda.synchronize(dev)
                result.epoch_seconds.append(time.perf_counter() - t0)
                epoch_loss = parallel.mean_over_ranks(float(loss_sum), seen)
                # the running statistics of the weights just trained, before they are scored and chosen
                reestimate_bn(model, train_set.x, seed=seed, batch_size=batch_size)
                acc, vloss = evaluate(model, val_set)
                result.curve.append({"epoch": epoch + 1, "loss": round(epoch_loss, 5), "val_accuracy": acc,
                                     "val_loss": round(vloss, 5), "seconds": round(result.epoch_seconds[-1], 4)})
                if (acc, -vloss) >= (best[0], -best[1]):
                    best, best_state = (acc, vloss), copy.deepcopy(model.state_dict())
                epoch += 1
    finally:
        if isinstance(trainable, StudentWithAdapters):
            trainable.remove_hooks()
        if teacher_tap is not None:
            teacher_tap.remove()
            teacher.to(teacher_dev)  # type: ignore[union-attr]
    if best_state is not None:
        model.load_state_dict(best_state)
    model.to("cpu")
    if cache is not None:
        cache.to(torch.device("cpu"))
    result.val_accuracy, result.val_loss = best
    result.steps = step
    return result


def agreement(a: np.ndarray, b: np.ndarray) -> float:
    """Top-1 agreement in percent between two logit arrays."""
    return float((a.argmax(1) == b.argmax(1)).mean() * 100)
