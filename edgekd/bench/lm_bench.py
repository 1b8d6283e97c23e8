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
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..config.profiles import Profile
from ..errors import BadInputError, BoardError, ModelError, StageError
from ..lm.decode import Decoder
from ..lm.speculative import speculative_greedy
from .lm_runner import EXIT_BAD_INPUT, decode_once, figures

__all__ = ["LMJob", "choose_speculation", "decode_once", "figures", "generation_bench", "run_local", "run_remote",
           "speculative_bench"]

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


def speculative_bench(target: Decoder, draft: Decoder, prompts: Sequence[Sequence[int]], new_tokens: int,
                      draft_tokens: int, min_confidence: float = 0.0) -> dict:
    """Speculative decoding against the target's own greedy decoding on each prompt, interleaved: end-to-end
    tokens/s of both (prefill included), acceptance, and whether each output equals the target's."""
    decode_once(target, prompts[0], min(4, new_tokens))
    spec_s = plain_s = 0.0
    drafted = accepted = identical = 0
    differences = []
    for i, prompt in enumerate(prompts):
        def plain(p: Sequence[int] = prompt) -> list[int]:
            return decode_once(target, p, new_tokens)["tokens"]

        def spec(p: Sequence[int] = prompt):
            return speculative_greedy(target, draft, p, new_tokens, draft_tokens, min_confidence)

        first, second = (plain, spec) if i % 2 == 0 else (spec, plain)
        t = time.perf_counter()
        a = first()
        ta = time.perf_counter() - t
        t = time.perf_counter()
        b = second()
        tb = time.perf_counter() - t
        ref, res = (a, b) if first is plain else (b, a)
        plain_s += ta if first is plain else tb
        spec_s += tb if first is plain else ta
        drafted += res.drafted
        accepted += res.accepted
        if res.tokens == ref:
            identical += 1
        else:
            pos = next(j for j, (x, y) in enumerate(zip(res.tokens, ref, strict=False)) if x != y)
            differences.append({"prompt": i, "position": pos})
    n_tokens = new_tokens * len(prompts)
    out = {"draft_tokens": draft_tokens, "min_confidence": min_confidence, "drafted": drafted,
           "acceptance_rate": round(accepted / drafted, 4) if drafted else 0.0,
           "tokens_per_s": round(n_tokens / spec_s, 2), "teacher_tokens_per_s": round(n_tokens / plain_s, 2),
           "speedup": round(plain_s / spec_s, 3), "prompts": len(prompts), "identical": identical,
           "new_tokens": new_tokens}
    if differences:
        out["differences"] = differences
    return out


def choose_speculation(target: Decoder, draft: Decoder, prompts: Sequence[Sequence[int]], new_tokens: int,
                       draft_tokens: Sequence[int], min_confidence: Sequence[float]) -> dict:
    """The fastest (draft_tokens, min_confidence) pair of the grid on `prompts` (validation), with every pair's
    acceptance and tokens/s and the target alone's, all timed prompt by prompt in a rotating order."""
    settings = [(k, c) for k in draft_tokens for c in min_confidence]
    runs = [("teacher", None), *settings]
    seconds = dict.fromkeys(runs, 0.0)
    drafted = dict.fromkeys(settings, 0)
    accepted = dict.fromkeys(settings, 0)
    decode_once(target, prompts[0], min(4, new_tokens))
    for i, prompt in enumerate(prompts):
        for run in runs[i % len(runs):] + runs[:i % len(runs)]:
            t = time.perf_counter()
            if run[0] == "teacher":
                decode_once(target, prompt, new_tokens)
            else:
                res = speculative_greedy(target, draft, prompt, new_tokens, *run)
                drafted[run] += res.drafted
                accepted[run] += res.accepted
            seconds[run] += time.perf_counter() - t
    n_tokens = new_tokens * len(prompts)
    tried = [{"draft_tokens": k, "min_confidence": c, "tokens_per_s": round(n_tokens / seconds[(k, c)], 2),
              "acceptance_rate": round(accepted[(k, c)] / drafted[(k, c)], 4) if drafted[(k, c)] else 0.0}
             for k, c in settings]
    best = max(tried, key=lambda t: t["tokens_per_s"])
    return {"draft_tokens": best["draft_tokens"], "min_confidence": best["min_confidence"], "prompts": len(prompts),
            "teacher_tokens_per_s": round(n_tokens / seconds[runs[0]], 2), "tried": tried}


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


def run_local(jobs: list[LMJob], prompts: Sequence[Sequence[int]], new_tokens: int, profile: Profile,
              threads: int | None, timeout_s: float | None = None) -> dict[str, dict]:
    """{job name: lm_runner's result} with each decoder run in a fresh process on this host, one after the other."""
    from ..quantize.recipes import needs_precise_int8

    env = {k: v for k, v in os.environ.items() if k != "EDGEKD_EMULATED"}
    limit = timeout_s or profile.remote.timeout_s
    out = {}
    with tempfile.TemporaryDirectory(prefix="edgekd-lm-") as tmp:
        _write_prompts(Path(tmp) / "prompts.npz", prompts)
        for job in jobs:
            args = _arguments(job, str(Path(job.model).resolve()), profile, threads, new_tokens, None)
            if "onnxruntime" in args and needs_precise_int8(job.model):
                args.append("--precise-int8")  # as the in-process runner does on this host
            try:
                proc = subprocess.run([sys.executable, str(LM_RUNNER), *args, "--json", "result.json"], cwd=tmp,
                                      env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                      timeout=limit)
            except subprocess.TimeoutExpired:
                raise StageError(f"bench: {job.model.name} did not finish within {limit} s on this host") from None
            if proc.returncode != 0:
                line = (proc.stderr.strip().splitlines() or [f"exited with code {proc.returncode}"])[-1]
                raise (ModelError if proc.returncode == EXIT_BAD_INPUT else StageError)(
                    f"bench on this host: {line.removeprefix('runner: ')}")
            out[job.name] = _pooled([json.loads((Path(tmp) / "result.json").read_text())])
    return out


def run_remote(host: str, jobs: list[LMJob], prompts: Sequence[Sequence[int]], new_tokens: int, profile: Profile,
               threads: int | None, *, rounds: int = 1, ssh_config: str | Path | None = None,
               remote_python: str | None = None, timeout_s: int | None = None) -> dict[str, dict]:
    """{job name: its result on the board `host`}: lm_runner.py, the decoders and the prompts go over in ONE SSH
    connection (bench/remote.py's script: a temporary directory removed by a trap), each decoder runs in a
    process of its own, in `rounds` interleaved rounds whose order rotates. Failures raise as bench_remote's."""
    from .remote import _reply, board_mismatch, parse_host, remote_script, ssh_command

    spec = parse_host(host)
    python = remote_python or profile.remote.python
    timeout_s = int(timeout_s or profile.remote.timeout_s)
    connect = profile.remote.connect_timeout_s
    steps = [["mkdir", "-p", "out"]]
    for r in range(rounds):
        for k in range(len(jobs)):
            i = (r + k) % len(jobs)
            args = _arguments(jobs[i], f"m{i}/{jobs[i].model.name}", profile, threads, new_tokens, None)
            steps.append([python, "lm_runner.py", *args, "--json", f"out/r{r}-m{i}.json"])
    merge = ("import glob, json; json.dump({p[4:-5]: json.load(open(p)) for p in sorted(glob.glob('out/*.json'))}, "
             "open('result.json', 'w'))")
    script = remote_script(profile.remote.workdir, python, [], timeout_s, [*steps, [python, "-c", merge]])
    cmd = ssh_command(spec, ssh_config=Path(ssh_config) if ssh_config else None, connect_timeout_s=connect)
    cmd.append("sh -c " + shlex.quote(script))
    with tempfile.TemporaryDirectory(prefix="edgekd-remote-") as tmp:
        _write_prompts(Path(tmp) / "prompts.npz", prompts)
        bundle = Path(tmp) / "bundle.tar"
        with tarfile.open(bundle, "w", format=tarfile.GNU_FORMAT) as tar:
            tar.add(str(LM_RUNNER), arcname="lm_runner.py")
            tar.add(str(LM_RUNNER.parent / "runner.py"), arcname="runner.py")  # lm_runner imports its helpers
            tar.add(str(Path(tmp) / "prompts.npz"), arcname="prompts.npz")
            for i, job in enumerate(jobs):
                for f in job.files:
                    tar.add(os.path.realpath(f), arcname=f"m{i}/{Path(f).name}")
        limit = timeout_s * max(1, len(steps)) + connect + 60
        with open(bundle, "rb") as stdin:
            try:
                proc = subprocess.run(cmd, stdin=stdin, capture_output=True, timeout=limit)
            except subprocess.TimeoutExpired:
                raise BoardError(f"board {host}: no result within {limit} s (connection or generation hung)") from None
    runs = _reply(proc, host, profile, python, timeout_s)
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
