"""`edgekd bench ARTIFACT --target NAME`: latency, throughput, memory and accuracy of an artifact, here
or on boards over SSH. Both paths run the same runner.py, so their JSON has the same fields."""
from __future__ import annotations

import argparse
import math
from pathlib import Path

from ..config.profiles import Profile, load_profile
from ..errors import EXIT_BAD_INPUT, EXIT_OK, EXIT_STAGE_FAILED, BadInputError, EdgeKDError
from ..runs import check_output_file, write_json
from .harness import artifact_size_bytes, bench_local, resolve_artifact
from .lm_cli import decoder_dims, describe_lm, lm_bench
from .remote import bench_hosts

EPILOG = "exit codes: 0 done, 2 bad input (artifact, data, arguments), 3 a board or the runtime failed"


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register `edgekd bench` on the main command's subparsers."""
    p = subparsers.add_parser("bench", help="measure an artifact's latency and accuracy here or on boards",
                              description="Benchmark an artifact with its runtime: warmup, timed iterations, "
                                          "percentiles with bootstrap intervals, cold start, peak memory, accuracy.",
                              epilog=EPILOG)
    p.add_argument("artifact", metavar="ARTIFACT", help="a .onnx or OpenVINO .xml file, or a directory holding one")
    p.add_argument("--target", required=True, help="target name, alias or profile file")
    p.add_argument("--threads", type=int, help="inference threads (default: the profile's, else every usable core)")
    p.add_argument("--warmup", type=int, help="untimed calls first (default: the profile's)")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--iterations", type=int, help="timed calls (default: the profile's)")
    group.add_argument("--duration", type=float, metavar="S", help="time calls for S seconds instead")
    p.add_argument("--batch", type=int, default=1, help="samples per call (default 1)")
    p.add_argument("--eval-data", help=".npz with x (float32 NCHW) and y: accuracy with the runtime; for a KV-cache "
                                       "decoder (a causal-lm run's artifact), token blocks x (the run's eval.npz): "
                                       "the prompts and the perplexity")
    p.add_argument("--new-tokens", type=int, help="KV-cache decoders: tokens generated per prompt (default 64)")
    p.add_argument("--prompts", type=int, help="KV-cache decoders: prompts, spread over the blocks (default 8)")
    p.add_argument("--prompt-tokens", type=int, help="KV-cache decoders: each prompt's first tokens of its block "
                                                     "(default 32)")
    p.add_argument("--json", dest="json_out", metavar="OUT", help="write the result JSON here")
    p.add_argument("--host", action="append", default=[], metavar="[user@]host[:port]",
                   help="benchmark on this board over SSH (repeatable: boards run in parallel); "
                        "emulate:aarch64 runs under emulation")
    p.add_argument("--ssh-config", help="ssh config file for --host")
    p.add_argument("--remote-python", help="python on the board (default: the profile's)")
    p.add_argument("--timeout", type=int, metavar="S", help="limit per board run (default: the profile's)")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    p.set_defaults(func=run)
    return p


def _check(args: argparse.Namespace) -> None:
    for name, low in (("threads", 1), ("iterations", 1), ("batch", 1), ("warmup", 0), ("timeout", 1),
                      ("new_tokens", 1), ("prompts", 1), ("prompt_tokens", 1)):
        value = getattr(args, name)
        if value is not None and value < low:
            raise BadInputError(f"bench: --{name.replace('_', '-')} must be at least {low}, got {value}")
    if args.duration is not None and not 0 < args.duration < math.inf:  # nan and inf too: a run that never ends
        raise BadInputError(f"bench: --duration must be a positive number of seconds, got {args.duration}")
    if args.eval_data and not Path(args.eval_data).is_file():
        raise BadInputError(f"bench: --eval-data {args.eval_data} does not exist")
    if args.json_out:
        check_output_file(args.json_out, "bench: --json", (args.artifact, args.eval_data))


def run(args: argparse.Namespace) -> int:
    """Run `edgekd bench`; returns the exit code (errors of a single run are raised)."""
    _check(args)
    profile = load_profile(args.target)
    model, files = resolve_artifact(Path(args.artifact))
    dims = decoder_dims(model)
    if dims:
        return _run_lm(args, profile, model, files, dims)
    lm_only = [f"--{k.replace('_', '-')}" for k in ("new_tokens", "prompts", "prompt_tokens") if getattr(args, k)]
    if lm_only:
        raise BadInputError(f"bench: {lm_only[0]} is for KV-cache decoders (causal-lm runs); {model.name} is not one")
    eval_data = Path(args.eval_data) if args.eval_data else None
    options = {"eval_data": eval_data, "threads": args.threads, "warmup": args.warmup,
               "iterations": args.iterations, "duration_s": args.duration, "batch": args.batch,
               "timeout_s": args.timeout}
    if not args.host:
        results: dict[str, dict | EdgeKDError] = {"host": bench_local(model, profile, **options)}
    else:
        ssh_config = Path(args.ssh_config) if args.ssh_config else None
        results = bench_hosts(args.host, files, model.name, profile, ssh_config=ssh_config,
                              remote_python=args.remote_python, **options)
    size = artifact_size_bytes(files)
    for result in results.values():
        if isinstance(result, dict):
            result["artifact_bytes"] = size
            result["target"] = {"name": profile.name, "backend": profile.backend, "device": profile.device,
                                "measures_here": profile.measures_here}
    return _finish(args, results, profile, describe)


def _run_lm(args: argparse.Namespace, profile: Profile, model: Path, files: list[Path], dims: tuple) -> int:
    """`edgekd bench` on a KV-cache decoder: the same output, exit codes and JSON layout as the image path."""
    if args.batch != 1 or args.iterations or args.duration or args.warmup is not None:
        raise BadInputError("bench: --batch, --iterations, --duration and --warmup are for single-pass models; a "
                            "KV-cache decoder takes --prompts, --prompt-tokens and --new-tokens")
    results = lm_bench(args, profile, model, files, dims)
    size = artifact_size_bytes(files)
    for result in results.values():
        if isinstance(result, dict):
            result.pop("next_tokens", None)  # every block's picks: the perplexity and accuracy stand for them
            result.update(artifact_bytes=size, target={"name": profile.name, "backend": profile.backend,
                                                       "device": profile.device, "measures_here": profile.measures_here})
    return _finish(args, results, profile, describe_lm)


def _finish(args: argparse.Namespace, results: dict, profile: Profile, show) -> int:
    """Write the JSON, print each result (or its error) and say how it went: one run's failure raises."""
    if len(results) == 1:
        only = next(iter(results.values()))
        if isinstance(only, EdgeKDError):
            raise only
        _write(args.json_out, only)
        print(show(only, profile))
        return EXIT_OK
    _write(args.json_out, {"hosts": {h: r if isinstance(r, dict) else {"error": str(r), "exit_code": r.exit_code}
                                     for h, r in results.items()}})
    for result in results.values():
        print(show(result, profile) if isinstance(result, dict) else f"edgekd: error: {result}")
    failed = [r.exit_code for r in results.values() if isinstance(r, EdgeKDError)]
    if not failed:
        return EXIT_OK
    return EXIT_STAGE_FAILED if EXIT_STAGE_FAILED in failed else EXIT_BAD_INPUT


def _write(path: str | None, obj: dict) -> None:
    if path:
        write_json(path, obj)


def _fmt(v: float | None, nd: int = 3) -> str:
    return "n/a" if v is None else f"{v:.{nd}f}"


def describe(result: dict, profile: Profile) -> str:
    """A few lines for a person: where and how it was measured, then the figures."""
    env = result.get("environment", {})
    runtime = result.get("backend", profile.backend)
    providers = ", ".join(env.get("execution_providers", []))
    where = result.get("measured_on", "host")
    head = (f"{result.get('model')} on {profile.name}, measured on {where} "
            f"({env.get('cpu_model', env.get('machine', '?'))}): {runtime} "
            f"{result.get('versions', {}).get(runtime, '')}, {env.get('threads', '?')} threads"
            + (f", {providers}" if providers else ""))
    lines = [head]
    if result.get("measured_on_note"):
        lines.append(f"  note: {result['measured_on_note']}")
    lat, ci = result.get("latency_ms"), result.get("latency_ci95") or {}
    if lat:
        lines.append(f"  latency ms  p50 {_fmt(lat['p50'])} [{_fmt(ci.get('p50', [None])[0])}, "
                     f"{_fmt(ci.get('p50', [None, None])[1])}]  p90 {_fmt(lat['p90'])}  p95 {_fmt(lat['p95'])}  "
                     f"p99 {_fmt(lat['p99'])}  mean {_fmt(lat['mean'])}  std {_fmt(lat['std'])}  "
                     f"(batch {result.get('batch')}, warmup {result.get('warmup')}, "
                     f"{result.get('iterations')} iterations)")
        lines.append(f"  throughput {_fmt(result.get('throughput'), 1)} samples/s")
    else:
        lines.append(f"  latency not measured: {result.get('not_measured', 'unknown reason')}")
    acc = result.get("accuracy")
    lines.append(f"  cold start {_fmt(result.get('cold_start_ms'), 1)} ms · peak RSS "
                 f"{_fmt(result.get('peak_rss_mb'), 1)} MiB · size {result.get('artifact_bytes')} bytes · accuracy "
                 + (f"{acc:.2f}% on {result.get('eval_samples')} samples" if acc is not None
                    else f"not measured ({result.get('accuracy_not_measured', 'unknown reason')})"))
    return "\n".join(lines)
