"""Generation speed of LM decoders, measured side by side: prefill and decode tokens/s, time to first
token, time per output token, and speculative decoding against the target alone.

Every model decodes the same prompts for a fixed number of new tokens (no early stop at end-of-text, so
each run does the same work), in interleaved rounds whose order rotates, so a drift in the machine's
speed touches all of them alike. The decode loop and the figures live in lm_runner.py, the standalone runner
copied to boards; `run_local` and `run_remote` run it in a fresh process of its own (peak memory) on this
host or on a board over SSH (the image runner's remote machinery: bench/remote.py)."""
from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..config.profiles import Profile
from ..errors import BadInputError, BoardError, ModelError, StageError
from ..lm.decode import Decoder
from .lm_figures import choose_speculation, decode_once, figures, speculative_bench
from .lm_runner import EXIT_BAD_INPUT

__all__ = ["LMJob", "choose_speculation", "decode_once", "figures", "generation_bench", "run_local", "run_remote",
           "speculative_bench", "speculative_local", "speculative_remote"]

LM_RUNNER = Path(__file__).with_name("lm_runner.py")


def generation_bench(decoders: dict[str, Decoder], prompts: Sequence[Sequence[int]], new_tokens: int,
                     rounds: int = 1, warmup: int = 1) -> dict[str, dict]:
    """{name: figures} for every decoder over `rounds` passes of the prompts, interleaved."""
    names = list(decoders)
    for name in names:  # warm-up: the first sessions' runs allocate and plan
        for p in prompts[:warmup]:
            decode_once(decoders[name], p, min(new_tokens, 4))
    runs: dict[str, list[dict]] = {n: [] for n in names}
    for r in range(rounds):
        for i, prompt in enumerate(prompts):
            order = names[(r + i) % len(names):] + names[:(r + i) % len(names)]
            for name in order:
                runs[name].append(decode_once(decoders[name], prompt, new_tokens))
    return {n: figures(runs[n]) for n in names}


# ---- one decoder per process, through lm_runner.py: on this host or on a board over SSH ----

@dataclass
class LMJob:
    """One decoder for lm_runner.py: the file it loads, every file it needs, and its KV cache's shape."""

    name: str
    model: Path
    files: list[Path]
    precision: str
    kv_heads: int
    head_dim: int


def _arguments(job: LMJob, model: str, profile: Profile, threads: int | None, new_tokens: int,
               prompt_count: int | None) -> list[str]:
    from .harness import runner_backend

    backend = runner_backend(job.model, profile)
    if backend == "tensorrt":
        raise BadInputError(f"{job.model.name}: a Jetson builds and times its own engines (target/jetson-lm/)")
    args = ["--model", model, "--backend", backend, "--precision", job.precision, "--kv-heads", str(job.kv_heads),
            "--head-dim", str(job.head_dim), "--prompts", "prompts.npz", "--new-tokens", str(new_tokens),
            "--keep-times"]
    if threads or profile.threads:
        args += ["--threads", str(threads or profile.threads)]
    if backend == "onnxruntime" and profile.execution_providers:
        args += ["--providers", ",".join(profile.execution_providers)]
    if backend == "openvino":
        args += ["--device", profile.device]
    if prompt_count:
        args += ["--prompt-count", str(prompt_count)]
    return args


def _pooled(rounds: list[dict]) -> dict:
    """One decoder's result from its runs in several rounds: the figures over every timed generation, the
    highest peak memory, the first round's tokens and details."""
    first = dict(rounds[0])
    timings = [dict(t, tokens=tok) for r in rounds for t, tok in zip(r["timings"], r["tokens"], strict=True)]
    first.pop("not_measured", None)
    first.update(figures(timings))
    peaks = [r["peak_rss_mb"] for r in rounds if r.get("peak_rss_mb") is not None]
    first["peak_rss_mb"] = max(peaks) if peaks else None
    first["rounds"] = len(rounds)
    first.pop("timings", None)
    return first


def _write_prompts(path: Path, prompts: Sequence[Sequence[int]]) -> None:
    np.savez(path, prompts=np.asarray([list(p) for p in prompts], dtype=np.int64))


def _write_blocks(path: Path, blocks: np.ndarray) -> None:
    np.savez(path, x=np.asarray(blocks, dtype=np.int64))


def run_local(jobs: list[LMJob], prompts: Sequence[Sequence[int]], new_tokens: int, profile: Profile,
              threads: int | None, timeout_s: float | None = None, *, score: np.ndarray | None = None
              ) -> dict[str, dict]:
    """{job name: lm_runner's result} with each decoder run in a fresh process on this host, one after the other;
    with `score` (token blocks), also each decoder's perplexity and next-token accuracy on them."""
    from ..quantize.recipes import needs_precise_int8

    limit = timeout_s or profile.remote.timeout_s
    out = {}
    with tempfile.TemporaryDirectory(prefix="edgekd-lm-") as tmp:
        _write_prompts(Path(tmp) / "prompts.npz", prompts)
        if score is not None:
            _write_blocks(Path(tmp) / "eval.npz", score)
        for job in jobs:
            args = _arguments(job, str(Path(job.model).resolve()), profile, threads, new_tokens, None)
            if score is not None:
                args += ["--eval-data", "eval.npz"]
            if "onnxruntime" in args and needs_precise_int8(job.model):
                args.append("--precise-int8")  # as the in-process runner does on this host
            out[job.name] = _pooled([_run_here(args, tmp, limit, f"bench of {job.model.name}")])
    return out


def _run_here(args: list[str], tmp: str, limit: float, what: str) -> dict:
    """lm_runner's JSON from a fresh process on this host run in `tmp` (where prompts.npz is); its failure as
    one line: ModelError for bad input, StageError otherwise."""
    env = {k: v for k, v in os.environ.items() if k != "EDGEKD_EMULATED"}
    try:
        proc = subprocess.run([sys.executable, str(LM_RUNNER), *args, "--json", "result.json"], cwd=tmp, env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, timeout=limit)
    except subprocess.TimeoutExpired:
        raise StageError(f"{what} did not finish within {limit:.0f} s on this host") from None
    if proc.returncode != 0:
        line = (proc.stderr.strip().splitlines() or [f"exited with code {proc.returncode}"])[-1]
        raise (ModelError if proc.returncode == EXIT_BAD_INPUT else StageError)(
            f"{what} on this host: {line.removeprefix('runner: ')}")
    return json.loads((Path(tmp) / "result.json").read_text())


def _on_board(host: str, files: list[tuple[str, str]], prompts: Sequence[Sequence[int]], steps: list[list[str]],
              profile: Profile, ssh_config: str | Path | None, python: str, timeout_s: int,
              score: np.ndarray | None = None) -> dict:
    """{result name: JSON} of lm_runner `steps` (each writing out/NAME.json) run on `host` in ONE SSH connection
    (bench/remote.py's script: a temporary directory removed by a trap) with the runner, the prompts and
    `files` ((path here, name there)) sent over. Failures raise as bench_remote's."""
    from .remote import _reply, parse_host, remote_script, ssh_command

    spec = parse_host(host)
    connect = profile.remote.connect_timeout_s
    merge = ("import glob, json; json.dump({p[4:-5]: json.load(open(p)) for p in sorted(glob.glob('out/*.json'))}, "
             "open('result.json', 'w'))")
    script = remote_script(profile.remote.workdir, python, [], timeout_s,
                           [["mkdir", "-p", "out"], *steps, [python, "-c", merge]])
    cmd = ssh_command(spec, ssh_config=Path(ssh_config) if ssh_config else None, connect_timeout_s=connect)
    cmd.append("sh -c " + shlex.quote(script))
    with tempfile.TemporaryDirectory(prefix="edgekd-remote-") as tmp:
        _write_prompts(Path(tmp) / "prompts.npz", prompts)
        bundle = Path(tmp) / "bundle.tar"
        with tarfile.open(bundle, "w", format=tarfile.GNU_FORMAT) as tar:
            tar.add(str(LM_RUNNER), arcname="lm_runner.py")
            for helper in ("runner.py", "lm_generation.py", "lm_figures.py", "lm_sampling.py"):  # lm_runner's helpers
                tar.add(str(LM_RUNNER.parent / helper), arcname=helper)
            tar.add(str(Path(tmp) / "prompts.npz"), arcname="prompts.npz")
            if score is not None:  # the blocks lm_runner scores (--eval-data eval.npz)
                _write_blocks(Path(tmp) / "eval.npz", score)
                tar.add(str(Path(tmp) / "eval.npz"), arcname="eval.npz")
            for path, name in files:
                tar.add(os.path.realpath(path), arcname=name)
        limit = timeout_s * max(1, len(steps) + 1) + connect + 60
        with open(bundle, "rb") as stdin:
            try:
                proc = subprocess.run(cmd, stdin=stdin, capture_output=True, timeout=limit)
            except subprocess.TimeoutExpired:
                raise BoardError(f"board {host}: no result within {limit} s (connection or generation hung)") from None
    return _reply(proc, host, profile, python, timeout_s)


def _job_files(job: LMJob, folder: str) -> list[tuple[str, str]]:
    return [(str(f), f"{folder}/{Path(f).name}") for f in job.files]


def run_remote(host: str, jobs: list[LMJob], prompts: Sequence[Sequence[int]], new_tokens: int, profile: Profile,
               threads: int | None, *, rounds: int = 1, ssh_config: str | Path | None = None,
               remote_python: str | None = None, timeout_s: int | None = None, score: np.ndarray | None = None
               ) -> dict[str, dict]:
    """{job name: its result on the board `host`}: each decoder runs in a process of its own, in `rounds`
    interleaved rounds whose order rotates, all in one SSH connection (_on_board); with `score` (token
    blocks), the first round also scores each decoder on them."""
    from .remote import board_mismatch

    python = remote_python or profile.remote.python
    timeout_s = int(timeout_s or profile.remote.timeout_s)
    steps = []
    for r in range(rounds):
        for k in range(len(jobs)):
            i = (r + k) % len(jobs)
            args = _arguments(jobs[i], f"m{i}/{jobs[i].model.name}", profile, threads, new_tokens, None)
            if score is not None and r == 0:
                args += ["--eval-data", "eval.npz"]
            steps.append([python, "lm_runner.py", *args, "--json", f"out/r{r}-m{i}.json"])
    files = [f for i, job in enumerate(jobs) for f in _job_files(job, f"m{i}")]
    runs = _on_board(host, files, prompts, steps, profile, ssh_config, python, timeout_s, score)
    out = {}
    for i, job in enumerate(jobs):
        got = [runs[f"r{r}-m{i}"] for r in range(rounds) if isinstance(runs.get(f"r{r}-m{i}"), dict)]
        if len(got) != rounds:
            raise BoardError(f"board {host}: the LM runner returned no result for {job.model.name}")
        res = _pooled(got)
        res["measured_on"] = host
        note = board_mismatch(profile, res.get("environment") or {})
        if note:
            res["board_mismatch"] = note
        out[job.name] = res
    return out


Setting = tuple  # (draft_tokens, min_confidence, lookup): see lm_generation.speculative_greedy


def _speculative_arguments(target: LMJob, draft: LMJob, target_path: str, draft_path: str, profile: Profile,
                           threads: int | None, new_tokens: int, grid: Sequence[Sequence], compare: Sequence[Setting],
                           sampling: dict | None = None) -> list[str]:
    """lm_runner's arguments for speculative decoding: grid = (draft lengths, floors, lookups); one value in
    each times that setting (and `compare`'s) against the target alone, more choose the fastest. `sampling`
    ({temperature, top_k, top_p, seed}) times speculative sampling with the setting too."""
    lengths, floors, lookups = grid
    args = _arguments(target, target_path, profile, threads, new_tokens, None)
    args += ["--draft", draft_path, "--draft-precision", draft.precision,
             "--draft-kv-heads", str(draft.kv_heads), "--draft-head-dim", str(draft.head_dim),
             "--draft-tokens", ",".join(str(k) for k in lengths),
             "--min-confidence", ",".join(f"{c:g}" for c in floors),
             "--lookup", ",".join(str(int(bool(u))) for u in lookups)]
    if compare:
        args += ["--compare", ",".join(f"{k}:{c:g}:{int(bool(u))}" for k, c, u in compare)]
    if sampling:
        args += ["--temperature", f"{sampling['temperature']!r}", "--top-k", str(sampling.get("top_k", 0)),
                 "--top-p", f"{sampling.get('top_p', 1.0)!r}", "--seed", str(sampling.get("seed", 0))]
    return args


def _settings(grid: Sequence[Sequence]) -> int:
    return len(grid[0]) * len(grid[1]) * len(grid[2])


def speculative_local(target: LMJob, draft: LMJob, prompts: Sequence[Sequence[int]], new_tokens: int, profile: Profile,
                      threads: int | None, grid: Sequence[Sequence], compare: Sequence[Setting] = (),
                      timeout_s: float | None = None, sampling: dict | None = None) -> dict:
    """Speculative decoding on this host in a fresh lm_runner process (the code a board runs, with the two
    sessions sharing one thread pool): one setting timed against the target alone, or the fastest of `grid`."""
    limit = (timeout_s or profile.remote.timeout_s) * (1 + _settings(grid) + len(compare) + 2 * bool(sampling))
    with tempfile.TemporaryDirectory(prefix="edgekd-lm-") as tmp:
        _write_prompts(Path(tmp) / "prompts.npz", prompts)
        args = _speculative_arguments(target, draft, str(Path(target.model).resolve()), str(Path(draft.model).resolve()),
                                      profile, threads, new_tokens, grid, compare, sampling)
        got = _run_here(args, tmp, limit, "speculative decoding")
    return {**got["speculative"], "measured_on": "host"}


def speculative_remote(host: str, target: LMJob, draft: LMJob, prompts: Sequence[Sequence[int]], new_tokens: int,
                       profile: Profile, threads: int | None, grid: Sequence[Sequence], compare: Sequence[Setting] = (),
                       *, ssh_config: str | Path | None = None, remote_python: str | None = None,
                       timeout_s: int | None = None, sampling: dict | None = None) -> dict:
    """Speculative decoding on the board `host` (lm_runner.py --draft, the code this host runs): one setting
    timed against the target alone, or the fastest of `grid`; its result with measured_on."""
    from .remote import board_mismatch

    python = remote_python or profile.remote.python
    timeout_s = int(timeout_s or profile.remote.timeout_s)
    args = _speculative_arguments(target, draft, f"t/{target.model.name}", f"d/{draft.model.name}", profile, threads,
                                  new_tokens, grid, compare, sampling)
    runs = _on_board(host, [*_job_files(target, "t"), *_job_files(draft, "d")], prompts,
                     [[python, "lm_runner.py", *args, "--json", "out/spec.json"]], profile, ssh_config, python,
                     timeout_s * (1 + _settings(grid) + len(compare) + 2 * bool(sampling)))
    got = runs.get("spec")
    if not isinstance(got, dict) or not isinstance(got.get("speculative"), dict):
        raise BoardError(f"board {host}: the LM runner returned no speculative result")
    out = {**got["speculative"], "measured_on": host}
    note = board_mismatch(profile, got.get("environment") or {})
    if note:
        out["board_mismatch"] = note
    return out
