"""Benchmarks on a board over SSH with the system OpenSSH client.

One connection per run: the runner, the artifact and the eval data travel as a tar stream on stdin
into a `mktemp -d` directory on the board, which a shell trap removes whatever happens. The user's
ssh setup (config, agent, ProxyJump, known_hosts) applies; host-key checking stays on and
BatchMode keeps ssh from ever waiting on a prompt.
"""
from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import tarfile
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from ..config.profiles import Profile
from ..errors import BadInputError, BoardError, EdgeKDError, ModelError
from .harness import runner_arguments, runner_backend, runner_files
from .runner import EXIT_BAD_INPUT

MARKER = "--- edgekd bench result ---"
_NAME = r"[A-Za-z0-9_][A-Za-z0-9._-]*"
_HOST_RE = re.compile(rf"^(?:(?P<user>{_NAME})@)?(?:\[(?P<ip6>[0-9A-Fa-f:.]+)\]|(?P<host>{_NAME}))(?::(?P<port>\d+))?$")
# ssh's own failures (exit 255), most specific first, as the cause a user can act on.
_SSH_CAUSES = (
    ("REMOTE HOST IDENTIFICATION HAS CHANGED", "its host key changed since it was recorded in known_hosts"),
    ("Host key verification failed", "host key verification failed (its key is not in known_hosts: "
                                     "connect once with ssh to check and record it)"),
    ("Permission denied", "authentication failed (no key was accepted; check the user, key and agent)"),
    ("Connection refused", "connection refused (no SSH server on that port)"),
    ("Could not resolve hostname", "the host name cannot be resolved"),
    ("No route to host", "no route to the host"),
    ("Network is unreachable", "the network is unreachable"),
    ("timed out", "the connection timed out"),
    ("Connection closed", "the connection was closed by the board"),
)
# Exit codes of the remote script itself, for failures before the runner starts.
_SCRIPT_CAUSES = {90: "cannot create a temporary directory in {workdir}",
                  91: "{python} was not found (install Python 3 or pass --remote-python)",
                  92: "cannot unpack the benchmark files (is tar installed?)",
                  124: "the benchmark did not finish within {timeout} s"}


@dataclass(frozen=True)
class HostSpec:
    """A parsed `[user@]host[:port]`."""

    host: str
    user: str | None = None
    port: int | None = None


def parse_host(spec: str) -> HostSpec:
    """`[user@]host[:port]` (an IPv6 address in brackets) or an alias from the ssh config."""
    m = _HOST_RE.match(spec.strip())
    if not m:
        raise BadInputError(f"--host {spec!r}: expected [user@]host[:port]")
    port = int(m["port"]) if m["port"] else None
    if port is not None and not 0 < port < 65536:
        raise BadInputError(f"--host {spec!r}: port {port} is out of range")
    return HostSpec(host=m["ip6"] or m["host"], user=m["user"], port=port)


def ssh_command(spec: HostSpec, *, ssh_config: Path | None, connect_timeout_s: int) -> list[str]:
    """The ssh invocation up to the destination: batch mode, timeouts, the user's config."""
    ssh = shutil.which("ssh")
    if ssh is None:
        raise BoardError(f"board {spec.host}: the OpenSSH client (ssh) is not installed on this host")
    cmd = [ssh, "-T", "-o", "BatchMode=yes", "-o", f"ConnectTimeout={connect_timeout_s}",
           "-o", "ServerAliveInterval=10", "-o", "ServerAliveCountMax=3", "-o", "LogLevel=ERROR"]
    if ssh_config is not None:
        if not Path(ssh_config).is_file():
            raise BadInputError(f"--ssh-config {ssh_config} does not exist")
        cmd += ["-F", str(ssh_config)]
    if spec.port:
        cmd += ["-p", str(spec.port)]
    if spec.user:
        cmd += ["-l", spec.user]
    return cmd + ["--", spec.host]


def remote_script(workdir: str, python: str, arguments: list[str], timeout_s: int,
                  commands: list[list[str]] | None = None) -> str:
    """The POSIX shell run on the board: temporary directory (removed by a trap), unpack, run, print.
    `commands` (each must succeed, in order; the last writes result.json) replace the runner.py call."""
    q = shlex.quote
    steps = commands or [[python, "runner.py", *arguments, "--json", "result.json"]]
    run = " && ".join("$limit " + " ".join(q(a) for a in cmd) + " >/dev/null" for cmd in steps)
    template = q(workdir.rstrip("/") + "/edgekd-bench.XXXXXX")
    return "\n".join([
        "umask 077",
        f"d=$(mktemp -d {template} 2>/dev/null) || exit 90",
        "trap 'cd /; rm -rf \"$d\"' EXIT",
        "trap 'exit 129' HUP INT TERM PIPE",
        "cd \"$d\" || exit 90",
        f"command -v {q(python)} >/dev/null 2>&1 || exit 91",
        "tar -xf - >/dev/null 2>&1 || exit 92",
        "limit=''",
        f"if command -v timeout >/dev/null 2>&1; then limit='timeout -k 5 {int(timeout_s)}'; fi",
        run,
        "rc=$?",
        f"if [ $rc -eq 0 ]; then printf '%s\\n' {q(MARKER)}; cat result.json; fi",
        "exit $rc",
    ])


def _bundle(files: list[Path], eval_data: Path | None, out: Path) -> None:
    with tarfile.open(out, "w", format=tarfile.GNU_FORMAT) as tar:
        for f in runner_files():
            tar.add(str(f), arcname=f.name)
        for f in files:
            tar.add(os.path.realpath(f), arcname=f"model/{Path(f).name}")
        if eval_data is not None:
            tar.add(os.path.realpath(eval_data), arcname="data/eval.npz")


def _ssh_cause(stderr: str) -> str:
    for needle, cause in _SSH_CAUSES:
        if needle.lower() in stderr.lower():
            return cause
    lines = [ln.strip() for ln in stderr.strip().splitlines() if ln.strip()]
    return lines[-1][:300] if lines else "ssh failed without a message"


def _reply(proc: subprocess.CompletedProcess, host: str, profile: Profile, python: str, timeout_s: int) -> dict:
    """The JSON object the board printed after MARKER, or the error its exit says: ssh's own failure
    (255), the script's (_SCRIPT_CAUSES), the runner's last line (2: the artifact, else the board)."""
    stderr = proc.stderr.decode(errors="replace")
    if proc.returncode == 255:
        raise BoardError(f"board {host}: {_ssh_cause(stderr)}")
    if proc.returncode in _SCRIPT_CAUSES:
        cause = _SCRIPT_CAUSES[proc.returncode].format(workdir=profile.remote.workdir, python=python,
                                                       timeout=timeout_s)
        raise BoardError(f"board {host}: {cause}")
    if proc.returncode != 0:
        lines = [ln.strip() for ln in stderr.splitlines() if ln.strip()]
        line = (lines[-1] if lines else f"the runner exited with code {proc.returncode}").removeprefix("runner: ")
        raise (ModelError if proc.returncode == EXIT_BAD_INPUT else BoardError)(f"board {host}: {line[:300]}")
    _, sep, payload = proc.stdout.decode(errors="replace").partition(MARKER)
    try:
        result = json.loads(payload) if sep else None
    except json.JSONDecodeError:
        result = None
    if not isinstance(result, dict):
        raise BoardError(f"board {host}: the runner finished but returned no readable result")
    return result


def bench_remote(host: str, files: list[Path], model_name: str, profile: Profile, *,
                 eval_data: Path | None = None, threads: int | None = None, warmup: int | None = None,
                 iterations: int | None = None, ssh_config: Path | None = None, remote_python: str | None = None,
                 timeout_s: int | None = None, duration_s: float | None = None, batch: int = 1,
                 keep_times: bool = False) -> dict:
    """Run runner.py on the board `host` ([user@]host[:port]) on `files` (the artifact's files,
    `model_name` the one to load) and return its JSON plus measured_on: host. Any failure to reach,
    authenticate or run on the board raises BoardError (a bad artifact: ModelError), in bounded time."""
    spec = parse_host(host)
    files = [Path(f) for f in files]
    missing = [str(f) for f in files + ([Path(eval_data)] if eval_data else []) if not f.is_file()]
    if missing:
        raise BadInputError(f"bench on {host}: {', '.join(missing)} does not exist")
    if model_name not in {f.name for f in files}:
        raise BadInputError(f"bench on {host}: the model {model_name!r} is not among the files to copy")
    python = remote_python or profile.remote.python
    timeout_s = int(timeout_s or profile.remote.timeout_s)
    connect = profile.remote.connect_timeout_s
    backend = runner_backend(Path(model_name), profile)
    steps = None
    if backend == "tensorrt":  # the Jetson builds and times its own engine; never ONNX Runtime
        from . import tensorrt_board

        model_path = next(f for f in files if f.name == model_name)
        files = tensorrt_board.board_files(model_path, files)
        steps = tensorrt_board.commands(python, model_name, profile, eval_data="data/eval.npz" if eval_data else None,
                                        warmup=warmup, iterations=iterations)
        args: list[str] = []
    else:
        args = runner_arguments(f"model/{model_name}", profile, backend=backend,
                                eval_data="data/eval.npz" if eval_data else None, threads=threads, warmup=warmup,
                                iterations=iterations, duration_s=duration_s, batch=batch)
        if keep_times:
            args.append("--keep-times")
    script = remote_script(profile.remote.workdir, python, args, timeout_s, steps)
    cmd = ssh_command(spec, ssh_config=ssh_config, connect_timeout_s=connect) + ["sh -c " + shlex.quote(script)]
    with tempfile.TemporaryDirectory(prefix="edgekd-remote-") as tmp:
        bundle = Path(tmp) / "bundle.tar"
        _bundle(files, Path(eval_data) if eval_data else None, bundle)
        with open(bundle, "rb") as stdin:
            try:
                proc = subprocess.run(cmd, stdin=stdin, capture_output=True, timeout=timeout_s + connect + 60)
            except subprocess.TimeoutExpired:
                raise BoardError(f"board {host}: no result within {timeout_s + connect + 60} s "
                                 "(connection or benchmark hung)") from None
    result = _reply(proc, host, profile, python, timeout_s)
    result["measured_on"] = host
    note = board_mismatch(profile, result.get("environment") or {})
    if note:
        result["board_mismatch"] = note
    return result


def board_mismatch(profile: Profile, env: dict) -> str | None:
    """What the board reports that contradicts its profile (its core count, its instruction set), or None:
    figures from a different board must not pass as this profile's."""
    problems = []
    cpus = env.get("cpu_count")
    if profile.cores and isinstance(cpus, int) and cpus != profile.cores:
        problems.append(f"{cpus} cores where {profile.name} has {profile.cores}")
    machine = str(env.get("machine", "")).lower()
    if profile.arch == "aarch64" and machine and machine not in ("aarch64", "arm64"):
        problems.append(f"a {machine} processor where {profile.name} is aarch64")
    if profile.arch == "x86_64" and machine and machine not in ("x86_64", "amd64"):
        problems.append(f"a {machine} processor where {profile.name} is x86_64")
    return "the board reports " + " and ".join(problems) if problems else None


def bench_host(host: str, files: list[Path], model_name: str, profile: Profile, **options) -> dict:
    """One host: a board over SSH, or `emulate:ARCH` (handed to edgekd.bench.emulate)."""
    if host.startswith("emulate:"):
        try:
            from .emulate import bench_emulated
        except ImportError as e:
            raise BadInputError(f"--host {host}: emulated benchmarks are not available in this install ({e})") from None
        options = {k: v for k, v in options.items() if k not in ("ssh_config", "remote_python")}
        return bench_emulated(host, files, model_name, profile, **options)
    return bench_remote(host, files, model_name, profile, **options)


def bench_hosts(hosts: list[str], files: list[Path], model_name: str, profile: Profile,
                **options) -> dict[str, dict | EdgeKDError]:
    """Every host at once (one thread each): {host: its result, or the EdgeKDError it failed with}.
    `options` are bench_remote's keyword arguments."""
    unique = list(dict.fromkeys(hosts))
    if not unique:
        return {}
    for h in unique:
        if not h.startswith("emulate:"):
            parse_host(h)  # a malformed spec is the user's input: fail before connecting anywhere

    def one(h: str) -> dict | EdgeKDError:
        try:
            return bench_host(h, files, model_name, profile, **options)
        except EdgeKDError as e:
            return e

    with ThreadPoolExecutor(max_workers=min(len(unique), 16)) as pool:
        return dict(zip(unique, pool.map(one, unique), strict=True))


def bench_remote_many(host: str, models: dict[str, tuple[list[Path], str]], profile: Profile, *, rounds: int,
                      iterations: int, warmup: int, threads: int | None = None, ssh_config: Path | None = None,
                      remote_python: str | None = None, timeout_s: int | None = None) -> dict[str, list[float]]:
    """Time several models on the board `host` in ONE connection, in interleaved rounds (A B C A B C ...):
    `models` maps a name to (its files, the file to load). Returns {name: every per-call time in ms, round
    after round}. Failures raise as bench_remote's do."""
    spec = parse_host(host)
    python = remote_python or profile.remote.python
    timeout_s = int(timeout_s or profile.remote.timeout_s)
    connect = profile.remote.connect_timeout_s
    names = list(models)
    steps = []
    for r in range(rounds):
        for i, name in enumerate(names):
            files, load = models[name]
            backend = runner_backend(Path(load), profile)
            if backend == "tensorrt":
                raise BadInputError("bench: timing several TensorRT models in one session is not supported; "
                                    "time them one by one")
            args = runner_arguments(f"m{i}/{load}", profile, backend=backend, threads=threads, warmup=warmup,
                                    iterations=iterations)
            steps.append([python, "runner.py", *args, "--keep-times", "--json", f"out/r{r}-m{i}.json"])
    merge = ("import glob, json; json.dump({p[4:-5]: json.load(open(p)) for p in sorted(glob.glob('out/*.json'))}, "
             "open('result.json', 'w'))")
    script = remote_script(profile.remote.workdir, python, [], timeout_s,
                           [["mkdir", "-p", "out"], *steps, [python, "-c", merge]])
    cmd = ssh_command(spec, ssh_config=ssh_config, connect_timeout_s=connect) + ["sh -c " + shlex.quote(script)]
    with tempfile.TemporaryDirectory(prefix="edgekd-remote-") as tmp:
        bundle = Path(tmp) / "bundle.tar"
        with tarfile.open(bundle, "w", format=tarfile.GNU_FORMAT) as tar:
            for f in runner_files():
                tar.add(str(f), arcname=f.name)
            for i, name in enumerate(names):
                for f in models[name][0]:
                    tar.add(os.path.realpath(f), arcname=f"m{i}/{Path(f).name}")
        limit = timeout_s * max(1, len(steps)) + connect + 60
        with open(bundle, "rb") as stdin:
            try:
                proc = subprocess.run(cmd, stdin=stdin, capture_output=True, timeout=limit)
            except subprocess.TimeoutExpired:
                raise BoardError(f"board {host}: no result within {limit} s (connection or benchmark hung)") from None
    runs = _reply(proc, host, profile, python, timeout_s)
    out: dict[str, list[float]] = {n: [] for n in names}
    for r in range(rounds):
        for i, name in enumerate(names):
            out[name] += list((runs.get(f"r{r}-m{i}") or {}).get("times_ms") or [])
    return out
