"""Where the LM decoders are measured apart from the pipeline's process: peak memory on this host, and every
speed figure with peak memory on the boards given with `--host`, through bench/lm_runner.py (one process per
decoder, so its peak resident memory is the decoder's own) and bench/remote.py's SSH machinery.

A figure says where it was taken: `measured_on` is "host" or the board's name; memory figures carry their
scope and the runtime that produced them."""
from __future__ import annotations

from collections.abc import Sequence

from ..bench.lm_bench import LMJob, run_local, run_remote, speculative_local, speculative_remote
from ..bench.lm_runner import MEMORY_SCOPE
from ..context import RunContext
from ..errors import BadInputError

__all__ = ["MEMORY_PROMPTS", "check_hosts", "on_board", "peak_memory_here", "speculative_measured"]

MEMORY_PROMPTS = 2  # the first test prompts: memory needs a few generations, not a benchmark
SPEED = ("decode_tokens_per_s", "prefill_tokens_per_s", "ttft_ms", "tpot_ms", "runs", "new_tokens", "not_measured")


def check_hosts(ctx: RunContext, hosts: list[str]) -> None:
    """Refuse what --host cannot measure for an LM before any work: a Jetson (it builds and times its own
    engines from the bundle), emulation (its timing is never a figure), a malformed host."""
    from ..bench.remote import parse_host

    if not hosts:
        return
    if ctx.profile.backend == "tensorrt":
        raise BadInputError(f"--host with task causal-lm on {ctx.profile.name} (TensorRT): the Jetson builds and times "
                            "its own engines; run target/jetson-lm/build_engine.sh and trt_lm_runner.py on the board")
    for h in hosts:
        if h.startswith("emulate:"):
            raise BadInputError(f"--host {h} with task causal-lm: emulated timing is never reported as speed; "
                                "give a board over SSH")
        parse_host(h)


def _jobs(cands: dict, shapes: dict) -> list[LMJob]:
    return [LMJob(n, c.artifact.path, list(c.artifact.files or [c.artifact.path]), c.precision,
                  shapes[n]["num_key_value_heads"], shapes[n]["head_dim"]) for n, c in cands.items()]


def _runtime(res: dict, backend: str) -> str:
    version = (res.get("versions") or {}).get(backend)
    return f"{backend} {version}" if version else backend


def peak_memory_here(ctx: RunContext, cands: dict, shapes: dict, prompts: Sequence[Sequence[int]],
                     new_tokens: int) -> None:
    """Each decoder's peak memory on this host, in a fresh runner process (the target's runtime), into c.footprint."""
    with ctx.progress.task("measuring the decoders' peak memory", None):
        res = run_local(_jobs(cands, shapes), prompts[:MEMORY_PROMPTS], new_tokens, ctx.profile, ctx.threads)
    for n, c in cands.items():
        c.footprint = {"peak_memory_mb": res[n].get("peak_rss_mb"), "memory_scope": MEMORY_SCOPE + ", on this host",
                       "memory_runtime": _runtime(res[n], res[n].get("backend") or ctx.profile.backend)}


def on_board(ctx: RunContext, host: str, cands: dict, shapes: dict, prompts: Sequence[Sequence[int]],
             new_tokens: int, rounds: int = 1) -> dict[str, dict]:
    """{name: the board's figures} for every decoder, all in one SSH session (interleaved rounds)."""
    _, ssh_config, remote_python = ctx.board or (host, None, None)
    with ctx.progress.task(f"generating on {host} ({len(cands)} decoders)", None):
        res = run_remote(host, _jobs(cands, shapes), prompts, new_tokens, ctx.profile, ctx.threads, rounds=rounds,
                         ssh_config=ssh_config, remote_python=remote_python)
    out = {}
    for n, r in res.items():
        out[n] = {"speed": {k: r[k] for k in SPEED if k in r},
                  "footprint": {"peak_memory_mb": r.get("peak_rss_mb"), "memory_scope": MEMORY_SCOPE + f", on {host}",
                                "memory_runtime": _runtime(r, r.get("backend") or ctx.profile.backend)},
                  "board": {"host": host, "environment": r.get("environment"), "versions": r.get("versions"),
                            "details": r.get("details"), "board_mismatch": r.get("board_mismatch")}}
    return out


def speculative_measured(ctx: RunContext, host: str | None, teacher, draft, shapes: dict,
                         prompts: Sequence[Sequence[int]], new_tokens: int, grid: Sequence[Sequence],
                         compare: Sequence[tuple] = (), sampling: dict | None = None) -> dict:
    """Speculative decoding with `draft` for `teacher` (LMCandidates) in a runner process of its own, on the
    board `host` or on this host (None): one setting of grid (draft lengths, floors, lookups) timed against
    the teacher alone with `compare`'s settings beside it (and with `sampling`, speculative sampling against the
    teacher's own), or the fastest setting of the grid."""
    target_job, draft_job = _jobs({"teacher": teacher, "draft": draft}, {"teacher": shapes["teacher"],
                                                                         "draft": shapes[draft.name]})
    choosing = len(grid[0]) * len(grid[1]) * len(grid[2]) > 1
    what = "choosing how to draft" if choosing else "speculative decoding"
    if host is None:
        with ctx.progress.task(f"{what} on this host", None):
            return speculative_local(target_job, draft_job, prompts, new_tokens, ctx.profile, ctx.threads, grid, compare,
                                     sampling=sampling)
    _, ssh_config, remote_python = ctx.board or (host, None, None)
    with ctx.progress.task(f"{what} on {host}", None):
        return speculative_remote(host, target_job, draft_job, prompts, new_tokens, ctx.profile, ctx.threads, grid,
                                  compare, ssh_config=ssh_config, remote_python=remote_python, sampling=sampling)
