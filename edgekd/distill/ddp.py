"""The torchrun entry point for data-parallel distillation:

    torchrun --nproc_per_node 2 -m edgekd.distill.ddp --config my.yaml --out runs/ddp

trains the distill stage's student (plain KD or distill.strategy) on every rank and writes, from rank 0,
OUT/model.pt (a state_dict) and OUT/metrics.json. The plumbing (process groups, gradient averaging, the
shared teacher cache) is in `parallel`."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from ..config import load_config
from ..config.profiles import load_profile
from ..context import RunContext
from ..data import build_splits
from ..models import student_from
from ..runs import atomic_path, write_json
from .parallel import barrier, init_from_env
from .stage import distill_student
from .strategies import run_strategy
from .teacher import get_teacher


def main(argv: list[str] | None = None) -> int:
    """Entry point for torchrun: the distill stage's training on every rank; rank 0 writes the results."""
    parser = argparse.ArgumentParser(prog="python -m edgekd.distill.ddp",
                                     description="Distil the configured student with DistributedDataParallel")
    parser.add_argument("--config", help="YAML config (the embedded default when omitted)")
    parser.add_argument("--target", default=None)
    parser.add_argument("--out", required=True, help="folder for model.pt and metrics.json")
    parser.add_argument("--seed", type=int, default=None)
    args = parser.parse_args(argv)
    rank, world = init_from_env()
    cfg = load_config(args.config, {"seed": args.seed})
    out = Path(args.out)
    ctx = RunContext(cfg, load_profile(args.target or cfg.target), out / f"rank{rank}")
    ctx.splits = build_splits(cfg.data, cfg.seed)
    teacher, _ = get_teacher(ctx)
    torch.manual_seed(cfg.seed)
    student = student_from(cfg.student.model, teacher, ctx.splits.num_classes)
    if cfg.distill.strategy == "kd":
        student, metrics, _ = distill_student(ctx, teacher, student)
    else:  # trained data-parallel by the strategies' shared loop, measured on each rank's own run folder
        student, metrics = run_strategy(ctx, teacher, student, "")
    if rank == 0:
        with atomic_path(out / "model.pt") as tmp:
            torch.save(student.state_dict(), tmp)
        write_json(out / "metrics.json", {**metrics, "world_size": world})
    barrier()
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
