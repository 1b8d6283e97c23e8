"""Federated distillation: the training split is dealt into `clients` private shards (at random, or
non-IID by class: each client holds `classes_per_client` classes); every round each client starts from
the server's student, distils it locally from the teacher on its own shard for `local_epochs`, and the
server averages the clients' weights, each weighted by its number of samples (FedAvg). No client's
images leave it: the server sees weights only. BatchNorm running statistics are pooled the same way,
means weighted by samples and variances with the spread of the client means added, which is exactly the
statistics of the union of the shards when the clients' features agree. The server keeps the round
whose averaged student scores best on the validation split."""
from __future__ import annotations

import copy
import time

import numpy as np
import torch
from torch import nn

from ...context import RunContext
from ...data import ArrayDataset
from ..losses import combined_loss
from ..trainer import evaluate
from .common import device_of, finish, fit, splits_of, teacher_cache, total_steps, transfer_views

__all__ = ["average_states", "run", "shards"]


def shards(labels: np.ndarray, clients: int, partition: str, classes_per_client: int, seed: int) -> list[np.ndarray]:
    """Sample indices of each client. 'iid': a seeded random deal into near-equal shards. 'by_class':
    client c holds classes c*k .. c*k + k - 1 (mod the number of classes, k = classes_per_client), each
    class's samples split evenly among the clients holding it; unlabeled samples (-1) are dealt at random."""
    rng = np.random.default_rng(seed)
    if partition == "iid":
        return [np.sort(s) for s in np.array_split(rng.permutation(len(labels)), clients)]
    classes = sorted(int(c) for c in np.unique(labels[labels >= 0]))
    holders: dict[int, list[int]] = {c: [] for c in classes}
    for client in range(clients):
        for j in range(classes_per_client):
            holders[classes[(client * classes_per_client + j) % len(classes)]].append(client)
    parts: list[list[np.ndarray]] = [[] for _ in range(clients)]
    for c, who in holders.items():
        idx = rng.permutation(np.nonzero(labels == c)[0])
        owners = who or [int(rng.integers(clients))]  # a class nobody was dealt goes to one client
        for client, piece in zip(owners, np.array_split(idx, len(owners)), strict=True):
            parts[client].append(piece)
    unlabeled = rng.permutation(np.nonzero(labels < 0)[0])
    for client, piece in enumerate(np.array_split(unlabeled, clients)):
        parts[client].append(piece)
    return [np.sort(np.concatenate(p)).astype(np.int64) for p in parts]


def average_states(states: list[dict[str, torch.Tensor]], weights: list[float]) -> dict[str, torch.Tensor]:
    """The sample-weighted average of the clients' state_dicts. A BatchNorm layer's running_var is pooled
    with the between-client spread of its running_mean (var = sum w (var_c + (mean_c - mean)^2)); integer
    buffers (num_batches_tracked) take the largest."""
    w = torch.tensor(weights, dtype=torch.float64)
    w = w / w.sum()
    out: dict[str, torch.Tensor] = {}
    for key, first in states[0].items():
        if not first.is_floating_point():
            out[key] = torch.stack([s[key] for s in states]).max(0).values
            continue
        stacked = torch.stack([s[key].double() for s in states])
        mean = torch.einsum("c,c...->...", w, stacked)
        if key.endswith("running_var"):
            means = torch.stack([s[key[:-len("running_var")] + "running_mean"].double() for s in states])
            pooled_mean = torch.einsum("c,c...->...", w, means)
            mean = mean + torch.einsum("c,c...->...", w, (means - pooled_mean) ** 2)
        out[key] = mean.to(first.dtype)
    return out


class _Rows:
    """The rows `shard` of an augmentation draw, indexed like the draw itself."""

    def __init__(self, view: torch.Tensor, shard: torch.Tensor):
        self.view, self.shard = view, shard

    def __getitem__(self, idx: torch.Tensor) -> torch.Tensor:
        return self.view[self.shard[idx]]

    def __len__(self) -> int:
        return len(self.shard)


def _subset(x, shard: torch.Tensor):
    return x.subset(shard) if hasattr(x, "subset") else x[shard]


def run(ctx: RunContext, teacher: nn.Module, student: nn.Module) -> tuple[nn.Module, dict]:
    """Train `student` by federated rounds of local distillation and weighted averaging."""
    from ...data import transfer_set

    started = time.perf_counter()
    cfg, splits = ctx.config, splits_of(ctx)
    d, opts = cfg.distill, cfg.distill.strategy_options.federated
    kd_set = transfer_set(splits)
    views = transfer_views(ctx, kd_set)
    cache = teacher_cache(ctx, teacher, views)
    parts = shards(kd_set.y.numpy(), opts.clients, opts.partition, opts.classes_per_client, cfg.seed)
    if any(len(p) == 0 for p in parts):
        from ...errors import ConfigError

        raise ConfigError(f"distill.strategy_options.federated: {opts.clients} clients for {len(kd_set)} training "
                          "samples leave a client without data; use fewer clients")
    client_sets = [ArrayDataset(_subset(kd_set.x, torch.from_numpy(p)), kd_set.y[p].numpy()) for p in parts]
    per_round = sum(total_steps(None, opts.local_epochs, len(c), cfg.data.batch_size) for c in client_sets)
    # Equal steps with plain KD unless rounds are given: distill.steps, or distill.epochs of local epochs.
    rounds = opts.rounds if opts.rounds is not None else (
        min(max(1, round(d.steps / per_round)), d.steps) if d.steps is not None else d.epochs // opts.local_epochs)
    best: tuple[float, float, dict | None, int] = (-1.0, float("inf"), None, 0)
    curve, total = [], 0
    for r in range(rounds):
        states, sizes, local_acc = [], [], []
        for c, (shard, local) in enumerate(zip(parts, client_sets, strict=True)):
            model = copy.deepcopy(student)
            shard_t = torch.from_numpy(shard)

            def loss_fn(step: int, xb: torch.Tensor, yb: torch.Tensor, idx: torch.Tensor, draw: int,
                        model: nn.Module = model, shard_t: torch.Tensor = shard_t) -> torch.Tensor:
                loss, _ = combined_loss(model(xb), cache.get(draw, shard_t[idx]).to(xb.device), yb,
                                        temperature=d.temperature, alpha=d.alpha, weights={"kd": 1.0})
                return loss

            steps = total_steps(None, opts.local_epochs, len(local), cfg.data.batch_size)
            fit([model], loss_fn, local, splits.val, watch={}, views=[_Rows(v, shard_t) for v in views],  # type: ignore[misc]
                steps=steps, lr=d.lr, seed=cfg.seed * 1000 + r * opts.clients + c, batch_size=cfg.data.batch_size,
                progress=ctx.progress, label=f"federated round {r + 1}/{rounds}, client {c + 1}/{opts.clients}",
                device=device_of(ctx), precision=d.precision)
            total += steps
            states.append({k: v.detach().cpu() for k, v in model.state_dict().items()})
            sizes.append(float(len(shard)))
            local_acc.append(evaluate(model, splits.val)[0])
        student.load_state_dict(average_states(states, sizes))
        acc, vloss = evaluate(student, splits.val)
        curve.append({"round": r + 1, "epoch": (r + 1) * opts.local_epochs, "val_accuracy": acc, "val_loss": round(vloss, 5),
                      "client_val_accuracy": [round(a, 2) for a in local_acc]})
        if (acc, -vloss) >= (best[0], -best[1]):
            best = (acc, vloss, copy.deepcopy(student.state_dict()), r + 1)
    if best[2] is not None:
        student.load_state_dict(best[2])
    else:  # no round: the student as given, scored
        best = (evaluate(student, splits.val)[0], 0.0, None, 0)
    metrics = {"strategy": "federated", "steps": total, "curve": curve, "temperature": d.temperature, "alpha": d.alpha,
               "clients": opts.clients, "rounds": rounds, "local_epochs": opts.local_epochs,
               "partition": opts.partition, "shard_sizes": [len(p) for p in parts],
               "shard_classes": [sorted({int(v) for v in kd_set.y[p].tolist() if v >= 0}) for p in parts],
               "aggregation": "FedAvg: weights averaged by shard size; BatchNorm statistics pooled",
               "chosen_round": best[3], "val_accuracy_torch": best[0], "teacher_cache_seconds": round(cache.seconds, 3)}
    return student, finish(ctx, teacher, student, metrics, started)
