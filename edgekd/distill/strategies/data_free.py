"""Data-free KD (DeepInversion, Yin et al. 2020): inputs are synthesised from the teacher alone, by
optimising random noise so that the batch statistics at every BatchNorm layer match the layer's running
statistics, each image is classified as an assigned class (cross-entropy), the batch covers the classes
(entropy of the mean prediction), and images stay smooth (total variation; optimised at the native
resolution where the preprocessing upsamples) and within the preprocessing's value range. The student
then learns from the teacher's outputs on those inputs only: the training split is never read (model
selection uses held-out synthetic inputs labelled by the teacher); the test split measures the result."""
from __future__ import annotations

import math
import time

import torch
import torch.nn.functional as F
from torch import nn

from ...config import DataConfig
from ...config.strategies import DataFreeOptions
from ...context import RunContext
from ...data import IMAGENET_MEAN, IMAGENET_STD, UNIT_RANGE_DATASETS, ArrayDataset
from ...errors import ConfigError
from ...progress import NullProgress, Progress
from ..trainer import AUG_DRAWS, augmented_views, predict_logits, train
from .common import device_of, finish, splits_of

__all__ = ["BatchNormStats", "input_bounds", "native_downsample", "run", "synthesize", "total_variation"]

HOLD_OUT = 0.1  # share of the synthetic inputs kept for model selection
DIGITS_NATIVE = 8  # scikit-learn's digits are 8x8 images


class BatchNormStats:
    """Forward hooks on every BatchNorm layer: after a forward pass, `loss()` is the sum over layers of
    ||mean_batch - running_mean||_2 + ||var_batch - running_var||_2 of the layer's input."""

    def __init__(self, model: nn.Module):
        self._terms: list[torch.Tensor] = []
        self._handles = [m.register_forward_hook(self._hook) for m in model.modules()
                         if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
        if not self._handles:
            raise ConfigError("distill.strategy data_free: the teacher has no BatchNorm layer with running "
                              "statistics to invert")

    def _hook(self, module: nn.Module, inputs: tuple, _output: torch.Tensor) -> None:
        x = inputs[0]
        dims = [0] + list(range(2, x.dim()))
        mean = x.mean(dim=dims)
        var = x.var(dim=dims, unbiased=False)
        self._terms.append(torch.norm(mean - module.running_mean, 2) + torch.norm(var - module.running_var, 2))

    @property
    def layers(self) -> int:
        """How many BatchNorm layers are hooked."""
        return len(self._handles)

    def loss(self) -> torch.Tensor:
        """The statistics loss of the last forward pass (then forgotten)."""
        total = torch.stack(self._terms).sum()
        self._terms.clear()
        return total

    def remove(self) -> None:
        """Detach the hooks."""
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._terms.clear()


def total_variation(x: torch.Tensor) -> torch.Tensor:
    """Mean absolute difference between neighbouring pixels (an image prior)."""
    return (x[:, :, 1:, :] - x[:, :, :-1, :]).abs().mean() + (x[:, :, :, 1:] - x[:, :, :, :-1]).abs().mean()


def input_bounds(data: DataConfig, channels: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel bounds of a preprocessed input, from the preprocessing alone (no images read):
    [-1, 1] for the digits demo and IDX sets, ImageNet normalisation of [0, 1] pixels for image folders."""
    if data.dataset in UNIT_RANGE_DATASETS:
        return torch.full((channels,), -1.0), torch.full((channels,), 1.0)
    mean, std = torch.tensor(IMAGENET_MEAN), torch.tensor(IMAGENET_STD)
    return (0 - mean) / std, (1 - mean) / std


def native_downsample(data: DataConfig) -> int:
    """How much the preprocessing upsamples the images, from the preprocessing alone: the digits demo
    enlarges 8x8 images to data.image_size; image folders are resized from unknown sizes (1)."""
    return max(1, data.image_size // DIGITS_NATIVE) if data.dataset == "digits" else 1


def synthesize(teacher: nn.Module, shape: tuple[int, ...], num_classes: int, opts: DataFreeOptions, *, seed: int,
               progress: Progress | None = None, device: torch.device | None = None,
               bounds: tuple[torch.Tensor, torch.Tensor] | None = None
               ) -> tuple[torch.Tensor, torch.Tensor, list[list[float]]]:
    """`opts.samples` inputs synthesised from the frozen `teacher`, their assigned classes, and for each
    synthesis batch the BatchNorm-statistics loss at every step. With `bounds` (per-channel low and
    high), the inputs start inside them and are clamped to them after every step."""
    progress = progress or NullProgress()
    dev = device or torch.device("cpu")
    teacher.eval().to(dev)
    gen = torch.Generator().manual_seed(seed)
    stats = BatchNormStats(teacher)
    images, classes, history = [], [], []
    lo, hi = ((b.view(1, -1, 1, 1).to(dev) for b in bounds) if bounds is not None else (None, None))
    # inputs are optimised at 1/downsample of the resolution and upsampled bilinearly (a smoothness prior)
    low = tuple(max(1, round(s / (opts.downsample or 1))) for s in shape[1:])

    def upsample(t: torch.Tensor) -> torch.Tensor:
        return t if low == tuple(shape[1:]) else F.interpolate(t, size=shape[1:], mode="bilinear",
                                                              align_corners=False)

    batches = math.ceil(opts.samples / opts.batch_size)
    try:
        with progress.task("synthesising inputs from the teacher", batches * opts.synthesis_steps) as bar:
            for b in range(batches):
                n = min(opts.batch_size, opts.samples - b * opts.batch_size)
                target = (torch.arange(n) + b * opts.batch_size) % num_classes
                target = target[torch.randperm(n, generator=gen)].to(dev)
                x = torch.randn(n, shape[0], *low, generator=gen).to(dev)
                if lo is not None and hi is not None:
                    x = torch.max(torch.min(x * (hi - lo) / 4 + (hi + lo) / 2, hi), lo)
                x.requires_grad_(True)
                opt = torch.optim.Adam([x], lr=opts.lr, betas=(0.5, 0.9))
                sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, opts.synthesis_steps)
                curve = []
                for _ in range(opts.synthesis_steps):
                    dx, dy = (torch.randint(-opts.jitter, opts.jitter + 1, (2,), generator=gen).tolist()
                              if opts.jitter else (0, 0))
                    full = upsample(x)
                    logits = teacher(torch.roll(full, shifts=(dx, dy), dims=(2, 3)))
                    bn = stats.loss()
                    mean_p = F.softmax(logits, dim=1).mean(0)
                    diversity = math.log(num_classes) + (mean_p * mean_p.clamp_min(1e-8).log()).sum()
                    loss = (opts.bn_weight * bn + opts.ce_weight * F.cross_entropy(logits, target)
                            + opts.diversity_weight * diversity + opts.tv_weight * total_variation(full)
                            + opts.l2_weight * full.pow(2).mean())
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    sched.step()
                    if lo is not None and hi is not None:
                        with torch.no_grad():
                            x.copy_(torch.max(torch.min(x, hi), lo))
                    curve.append(float(bn.detach()))
                    bar.advance()
                images.append(upsample(x.detach()).cpu())
                classes.append(target.cpu())
                history.append(curve)
    finally:
        stats.remove()
        teacher.cpu()
    return torch.cat(images), torch.cat(classes), history


def run(ctx: RunContext, teacher: nn.Module, student: nn.Module) -> tuple[nn.Module, dict]:
    """Synthesise a transfer set from the teacher, then distil `student` on it alone."""
    started = time.perf_counter()
    cfg, splits = ctx.config, splits_of(ctx)
    d, opts = cfg.distill, cfg.distill.strategy_options.data_free
    t0 = time.perf_counter()
    bounds = input_bounds(cfg.data, splits.input_shape[0]) if opts.clamp else None
    if opts.downsample is None:
        opts = opts.model_copy(update={"downsample": native_downsample(cfg.data)})
    x, assigned, history = synthesize(teacher, splits.input_shape, splits.num_classes, opts, seed=cfg.seed,
                                      progress=ctx.progress, device=device_of(ctx), bounds=bounds)
    synthesis_s = time.perf_counter() - t0
    teacher_pred = predict_logits(teacher, x).argmax(1)
    n_val = max(1, int(len(x) * HOLD_OUT))
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(cfg.seed))
    val_idx, train_idx = order[:n_val], order[n_val:]
    synth_train = ArrayDataset(x[train_idx].numpy(), torch.full((len(train_idx),), -1).numpy())
    synth_val = ArrayDataset(x[val_idx].numpy(), teacher_pred[val_idx].numpy())
    res = train(student, synth_train, synth_val, epochs=d.epochs, steps=d.steps, lr=d.lr, seed=cfg.seed,
                batch_size=cfg.data.batch_size, teacher=teacher, temperature=d.temperature, alpha=1.0,
                views=augmented_views(synth_train.x, cfg.seed, AUG_DRAWS, cfg.data.augment), progress=ctx.progress,
                label="distilling student on synthetic inputs", device=device_of(ctx), precision=d.precision,
                cache_topk=d.cache_topk)
    first = [h[0] for h in history]
    last = [h[-1] for h in history]
    metrics = {"strategy": "data_free", "temperature": d.temperature, "alpha": 1.0,
               "synthesis": {"samples": len(x), "steps": opts.synthesis_steps, "seconds": round(synthesis_s, 2),
                             "downsample": opts.downsample, "clamped": bounds is not None,
                             "bn_loss_first": round(sum(first) / len(first), 5),
                             "bn_loss_last": round(sum(last) / len(last), 5),
                             "teacher_agrees_with_assigned_class": round(
                                 float((teacher_pred == assigned).float().mean() * 100), 2)},
               "transfer_set": {"images": len(synth_train), "synthetic": True, "real_training_images": 0},
               "selection": "held-out synthetic inputs labelled with the teacher's top-1 class",
               "steps": res.steps, "epoch_seconds": [round(s, 4) for s in res.epoch_seconds], "curve": res.curve,
               "val_accuracy_torch": res.val_accuracy}
    return student, finish(ctx, teacher, student, metrics, started)
