"""Data-parallel plumbing for distillation under torchrun: process-group set-up (gloo on CPU, nccl on GPU),
the DistributedDataParallel wrapper, gradient averaging and buffer sharing for loops that drive several
modules, and a teacher-logit cache computed once by rank 0. `train()` uses DDP by itself whenever a
process group is up, and so does the strategies' shared loop (`strategies.common.fit`)."""
from __future__ import annotations

import os

import torch
from torch import nn

from .cache import TeacherLogitCache


def rank_and_world() -> tuple[int, int]:
    """(rank, world size) of the current process group, (0, 1) without one."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def local_rank() -> int:
    """This process's rank on its machine (torchrun's LOCAL_RANK), 0 outside torchrun."""
    return int(os.environ.get("LOCAL_RANK", "0"))


def init_from_env(backend: str | None = None) -> tuple[int, int]:
    """Join the process group torchrun describes in the environment (a no-op without RANK/WORLD_SIZE).

    Backend: nccl when CUDA is available, else gloo."""
    import torch.distributed as dist

    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ or dist.is_initialized():
        return rank_and_world()
    backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    if backend == "nccl":
        torch.cuda.set_device(local_rank())
    dist.init_process_group(backend=backend)
    return rank_and_world()


def wrap(module: nn.Module, device: torch.device) -> nn.Module:
    """`module` under DistributedDataParallel (SyncBatchNorm on GPU, so BN sees the global batch)."""
    from torch.nn.parallel import DistributedDataParallel

    if device.type == "cuda":
        module = nn.SyncBatchNorm.convert_sync_batchnorm(module)
        return DistributedDataParallel(module, device_ids=[device.index], output_device=device.index)
    return DistributedDataParallel(module)


def barrier() -> None:
    """Wait for every rank (no-op without a process group)."""
    import torch.distributed as dist

    if rank_and_world()[1] > 1:
        dist.barrier()


def mean_over_ranks(total: float, count: int) -> float:
    """sum(total) / sum(count) over the ranks: an epoch's mean loss over the global batch."""
    import torch.distributed as dist

    if rank_and_world()[1] == 1:
        return total / max(count, 1)
    t = torch.tensor([total, float(count)], dtype=torch.float64)
    dist.all_reduce(t)
    return float(t[0] / t[1].clamp_min(1))


def average_gradients(params: list[nn.Parameter]) -> None:
    """What DistributedDataParallel does after backward, for loops that drive several modules through
    their own loss: each gradient becomes its mean over the ranks. A parameter that no rank gave a
    gradient keeps none (the optimizer skips it, as in one process)."""
    import torch.distributed as dist

    world = rank_and_world()[1]
    if world == 1 or not params:
        return
    has = torch.tensor([p.grad is not None for p in params], dtype=torch.float32, device=params[0].device)
    dist.all_reduce(has)
    used = [p for p, h in zip(params, has.tolist(), strict=True) if h > 0]
    if not used:
        return
    flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1).float() for p in used])
    dist.all_reduce(flat)
    flat /= world
    offset = 0
    for p in used:
        n = p.numel()
        p.grad = flat[offset:offset + n].view_as(p).to(p.dtype).clone()
        offset += n


def broadcast_buffers(modules: list[nn.Module]) -> None:
    """Rank 0's buffers (BatchNorm running statistics) to every rank, as DistributedDataParallel keeps
    them, so that all ranks evaluate, and choose their best epoch on, the same model."""
    import torch.distributed as dist

    if rank_and_world()[1] == 1:
        return
    for m in modules:
        for b in m.buffers():
            dist.broadcast(b, src=0)


def shared_cache(teacher: nn.Module, views: list[torch.Tensor], topk: int | None = None,
                 device: torch.device | None = None):
    """A TeacherLogitCache computed once (on `device` when given): rank 0 runs the teacher and stores the
    table; the other ranks wait, then read it from disk."""
    rank, world = rank_and_world()
    if world == 1:
        return TeacherLogitCache(teacher, views, topk=topk, device=device)
    if rank == 0:
        cache = TeacherLogitCache(teacher, views, topk=topk, device=device)
        barrier()
        return cache
    barrier()
    return TeacherLogitCache(teacher, views, topk=topk, device=device)
