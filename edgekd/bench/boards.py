"""Figures taken on the user's boards over SSH (`--host`): the chosen artifact's and the teacher's."""
from __future__ import annotations

from ..backends.base import Artifact
from ..context import RunContext
from ..errors import BoardError, EdgeKDError


def bench_on_boards(ctx: RunContext, artifact: Artifact, teacher: Artifact | None, hosts: list[str],
                    ssh_config: str | None, remote_python: str | None) -> tuple[dict, dict]:
    """Benchmark the chosen artifact and the teacher's on every host (in parallel): (figures of the
    artifact by host, figures of the teacher by host, or the error a host gave for it). A board that
    fails on the artifact stops the run (exit 3)."""
    from .remote import bench_hosts

    run, prof = ctx.run_dir, ctx.profile
    options = {"eval_data": run / "eval.npz", "threads": ctx.threads, "ssh_config": ssh_config,
               "remote_python": remote_python, "warmup": prof.bench.warmup, "iterations": prof.bench.iterations}
    files, name = artifact.files or [artifact.path], artifact.path.name
    with ctx.progress.task(f"benchmarking on {len(hosts)} board(s)", None):
        results = bench_hosts(hosts, files, name, prof, **options)
        teacher_results: dict = {}
        if teacher is not None:
            teacher_results = bench_hosts(hosts, teacher.files or [teacher.path], teacher.path.name, prof, **options)
    failed = {h: r for h, r in results.items() if isinstance(r, EdgeKDError)}
    if failed:
        h, err = next(iter(failed.items()))
        raise BoardError(str(err) if h in str(err) else f"board {h}: {err}")
    return results, teacher_results
