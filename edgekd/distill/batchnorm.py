"""BatchNorm re-estimation: running statistics recomputed from training inputs after training.

A BatchNorm layer normalises with the batch's statistics in train mode and with its running averages
in eval mode. Models built with a small momentum (torchvision's MobileNetV3 0.01, MNASNet 0.0003)
train well, yet after a short run their running averages still describe the initial weights, and
every eval-mode prediction falls into one class. One pass over a bounded subset of un-augmented
training inputs, with a cumulative average (momentum None, as torch.optim.swa_utils.update_bn does),
replaces them with the statistics of the trained weights. Only the BatchNorm layers run in train mode
during the pass: dropout and stochastic depth stay off, as they are at inference."""
from __future__ import annotations

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

MAX_SAMPLES = 2048  # enough for stable means and variances; bounded so the pass stays cheap on large sets

__all__ = ["MAX_SAMPLES", "reestimate_bn"]


def _batchnorms(model: nn.Module) -> list[_BatchNorm]:
    return [m for m in model.modules() if isinstance(m, _BatchNorm) and m.track_running_stats]


@torch.no_grad()
def reestimate_bn(model: nn.Module, x: torch.Tensor, *, seed: int = 0, batch_size: int = 64,
                  max_samples: int = MAX_SAMPLES) -> int:
    """Recompute the running statistics of every BatchNorm layer of `model` from up to `max_samples`
    inputs of `x` (a seeded subset when there are more), on the device of the model's parameters.

    Each module keeps its train/eval mode and each layer its momentum. Returns the number of inputs
    used: 0 when the model has no BatchNorm layer (or fewer than two inputs), and nothing changes."""
    layers = _batchnorms(model)
    if not layers or len(x) < 2:
        return 0
    if len(x) > max_samples:
        idx = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))[:max_samples]
    else:
        idx = torch.arange(len(x))
    param = next(iter(model.parameters()), None)
    dev = param.device if param is not None else torch.device("cpu")
    modes = {m: m.training for m in model.modules()}
    momenta = {m: m.momentum for m in layers}
    try:
        model.eval()
        for m in layers:
            m.reset_running_stats()
            m.momentum = None  # cumulative average over the batches
            m.train()
        # near-equal batches of batch_size to 2 * batch_size - 1 inputs (each weighs the same in the
        # average; never one input, which train-mode BatchNorm cannot normalise)
        for chunk in idx.tensor_split(max(1, len(idx) // max(2, batch_size))):
            model(x[chunk].to(dev))
    finally:
        for m, mom in momenta.items():
            m.momentum = mom
        for m, was in modes.items():
            m.training = was
    return len(idx)
