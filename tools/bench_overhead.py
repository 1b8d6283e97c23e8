#!/usr/bin/env python3
"""How much `edgekd bench` adds to a bare ONNX Runtime loop: the same model, the same threads, measured
in interleaved rounds (bench, bare, bare, bench, ...) so a drift in the machine's speed hits both alike.

    python tools/bench_overhead.py [--models small-cnn resnet18] [--threads 1] [--rounds 12]

Builds the models from random initial weights (a small CNN at 32x32, torchvision's resnet18 at
224x224) in a child process, so torch is never loaded beside the measured loop. Each round runs the
bench command's run() (which starts runner.py in a fresh process, as `edgekd bench` does) and then a
bare `session.run` loop in this process; the figure is p50(edgekd bench) / p50(bare loop).
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

MODELS = {"small-cnn": (3, 32, 32), "resnet18": (3, 224, 224)}
DEFAULT_ITERATIONS = {"small-cnn": 300, "resnet18": 30}
DEFAULT_WARMUP = {"small-cnn": 50, "resnet18": 10}


def export(name: str, path: Path) -> None:
    """Write `name` with random initial weights to `path` as ONNX (runs in the child process)."""
    import torch
    from torch import nn

    torch.manual_seed(0)
    if name == "resnet18":
        import torchvision

        model = torchvision.models.resnet18(weights=None, num_classes=1000)
    else:
        def block(cin: int, cout: int, stride: int) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU())

        model = nn.Sequential(block(3, 16, 1), block(16, 32, 2), block(32, 64, 2), block(64, 64, 1),
                              nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10))
    model.eval()
    x = torch.randn(1, *MODELS[name])
    torch.onnx.export(model, (x,), str(path), input_names=["input"], output_names=["logits"], opset_version=17,
                      dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}}, dynamo=False)


def bench_p50(model: Path, threads: int, warmup: int, iterations: int, out: Path) -> float:
    """p50 (ms) reported by the bench command for `model` on the cpu target."""
    from edgekd.bench.cli import add_parser, run

    parser = argparse.ArgumentParser(prog="edgekd")
    add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["bench", str(model), "--target", "cpu", "--threads", str(threads), "--warmup",
                              str(warmup), "--iterations", str(iterations), "--json", str(out)])
    with contextlib.redirect_stdout(io.StringIO()):
        code = run(args)
    if code != 0:
        raise SystemExit(f"edgekd bench exited with {code}")
    return float(json.loads(out.read_text())["latency_ms"]["p50"])


def bare_p50(session, feed: dict, warmup: int, iterations: int) -> float:
    """p50 (ms) of a plain `session.run` loop."""
    for _ in range(warmup):
        session.run(None, feed)
    times = np.empty(iterations)
    for i in range(iterations):
        t0 = time.perf_counter()
        session.run(None, feed)
        times[i] = (time.perf_counter() - t0) * 1e3
    return float(np.median(times))


def measure(name: str, model: Path, threads: int, rounds: int, warmup: int, iterations: int) -> dict:
    """Interleaved rounds of edgekd bench and the bare loop; the p50 ratio with a bootstrap interval."""
    import onnxruntime as ort

    from edgekd.bench.runner import bootstrap_ci

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    session = ort.InferenceSession(str(model), so, providers=["CPUExecutionProvider"])
    feed = {"input": np.random.default_rng(0).standard_normal((1, *MODELS[name])).astype(np.float32)}
    bench, bare = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(rounds):
            steps = [("bench", bench), ("bare", bare)]
            for kind, sink in steps if r % 2 == 0 else steps[::-1]:
                if kind == "bench":
                    sink.append(bench_p50(model, threads, warmup, iterations, Path(tmp) / "b.json"))
                else:
                    sink.append(bare_p50(session, feed, warmup, iterations))
    ratios = np.asarray(bench) / np.asarray(bare)
    return {"model": name, "input": list(MODELS[name]), "threads": threads, "rounds": rounds, "warmup": warmup,
            "iterations": iterations, "bench_p50_ms": float(np.median(bench)), "bare_p50_ms": float(np.median(bare)),
            "ratio": float(np.median(ratios)), "ratio_ci95": bootstrap_ci([ratios], 50, resamples=2000),
            "bench_p50_per_round": bench, "bare_p50_per_round": bare}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS))
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--rounds", type=int, default=12)
    p.add_argument("--warmup", type=int, help="per round (default: 50 small-cnn, 10 resnet18)")
    p.add_argument("--iterations", type=int, help="per round (default: 300 small-cnn, 30 resnet18)")
    p.add_argument("--json", help="also write the figures here")
    p.add_argument("--export", nargs=2, metavar=("NAME", "PATH"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.export:
        export(args.export[0], Path(args.export[1]))
        return 0
    import onnxruntime as ort

    from edgekd.bench.runner import capture_environment

    env = capture_environment()
    print(f"bench_overhead: {env.get('cpu_model', env['machine'])}, {env['usable_cores']} usable cores, "
          f"onnxruntime {ort.__version__}, threads {args.threads}, {args.rounds} interleaved rounds")
    results = []
    with tempfile.TemporaryDirectory(prefix="edgekd-overhead-") as tmp:
        for name in args.models:
            path = Path(tmp) / f"{name}.onnx"
            subprocess.run([sys.executable, "-W", "ignore", __file__, "--export", name, str(path)], check=True)
            iterations = args.iterations or DEFAULT_ITERATIONS[name]
            warmup = DEFAULT_WARMUP[name] if args.warmup is None else args.warmup
            r = measure(name, path, args.threads, args.rounds, warmup, iterations)
            results.append(r)
            lo, hi = r["ratio_ci95"]
            verdict = "within 5%" if abs(r["ratio"] - 1) <= 0.05 else "NOT within 5%"
            print(f"{name} {'x'.join(map(str, r['input']))}: edgekd bench p50 {r['bench_p50_ms']:.4f} ms, "
                  f"bare onnxruntime loop p50 {r['bare_p50_ms']:.4f} ms, ratio {r['ratio']:.4f} "
                  f"[95% CI {lo:.4f}, {hi:.4f}] (warmup {warmup}, {iterations} iterations x {args.rounds} rounds "
                  f"each): {verdict}")
    if args.json:
        Path(args.json).write_text(json.dumps({"environment": env, "results": results}, indent=2) + "\n")
    return 0 if all(abs(r["ratio"] - 1) <= 0.05 for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
