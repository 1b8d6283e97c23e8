#!/usr/bin/env python3
"""Pruning benchmarks: the figures the prune stage claims, each from `edgekd compress` runs.

    python tools/prune_benchmarks.py half-macs [--out DIR] [--threads N ...] [--rounds 20] [--set prune.KEY=VALUE]
    python tools/prune_benchmarks.py archs [--out DIR] [--archs resnet18 vit_b_16 ...]
    python tools/prune_benchmarks.py step-time [--arch densenet121] [--size 224] [--steps 3] [--rounds 2]

half-macs: the embedded default's teacher (ResNet-18, trained once and cached) pruned to half its MACs
with KD fine-tuning (`student.model: teacher`, `stages: [prune]`, `prune.target_macs: 0.5`). The
teacher's and the pruned model's FP32 ONNX files from the run directory are then timed with ONNX
Runtime in this process, same threads, in interleaved rounds (teacher, pruned, pruned, teacher, ...),
and the accuracies come from report.json (ONNX Runtime on the held-out test split).

archs: every torchvision family from random initial weights through `stages: [prune, quantize]`
(`prune.ratio`, no fine-tuning, 64x64 inputs; vit_b_16 at its 224x224), with params and MACs removed
and the chosen artifact's measured latency from report.json.

step-time: seconds per pruning step with torch-pruning's own concat index mapping and with edgekd's
linear-time one (edgekd/prune/concat.py), in interleaved rounds on the same model, and whether the two
pruned models are identical.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from edgekd.config import assign  # noqa: E402

ARCHS = ["resnet18", "resnext50_32x4d", "mobilenet_v2", "mobilenet_v3_small", "efficientnet_b0", "efficientnet_v2_s",
         "regnet_x_400mf", "shufflenet_v2_x0_5", "squeezenet1_1", "mnasnet0_5", "densenet121", "convnext_tiny",
         "vit_b_16"]
IMAGE_SIZE = {"vit_b_16": 224}


def compress(config: dict, out: Path, log: Path) -> tuple[list[str], float, int]:
    """Write `config` beside `out` and run `edgekd compress` on the cpu target; (command, seconds, exit code)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    cfg_path = out.with_suffix(".yaml")
    cfg_path.write_text(yaml.safe_dump(config, sort_keys=False))
    cmd = [sys.executable, "-m", "edgekd.cli", "compress", "--config", str(cfg_path), "--target", "cpu",
           "--out", str(out), "--quiet"]
    t0 = time.perf_counter()
    with open(log, "w") as f:
        rc = subprocess.run(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT).returncode
    return cmd, time.perf_counter() - t0, rc


def session(path: Path, threads: int):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    s = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    name = s.get_inputs()[0].name
    return lambda x: s.run(None, {name: x})


def half_macs(args: argparse.Namespace) -> int:
    from edgekd.bench.harness import interleaved, ratio_ci

    out = Path(args.out) / "half-macs"
    config = assign({"student": {"model": "teacher"}, "stages": ["prune"], "prune": {"target_macs": 0.5}}, args.set)
    cmd, seconds, rc = compress(config, out, out.with_suffix(".log"))
    print("config:", json.dumps(config))
    print("command:", " ".join(str(c) for c in cmd).replace(str(ROOT) + "/", ""), f"({seconds:.0f} s, exit {rc})")
    if rc != 0:
        print(out.with_suffix(".log").read_text()[-3000:])
        return 1
    report = json.loads((out / "report.json").read_text())
    prune = next(s for s in report["stages"] if s["name"] == "prune")
    x = np.load(out / "eval.npz")["x"][:1]
    t_acc, p_acc = report["teacher"]["accuracy"], prune["accuracy"]
    print(f"\nResNet-18 teacher pruned to half its MACs, {x.shape[2]}x{x.shape[3]} input; accuracy: ONNX Runtime on "
          f"the test split; MACs kept {prune['after']['macs'] / prune['before']['macs']:.3f}, params kept "
          f"{prune['after']['params'] / prune['before']['params']:.3f}\n")
    print("| threads | teacher p50 ms | pruned p50 ms | speedup (95% CI) | teacher acc % | pruned + KD acc % |")
    print("|---:|---:|---:|---|---:|---:|")
    speeds = []
    for threads in args.threads or [report["environment"]["threads"]]:
        sessions = {"teacher": session(out / "teacher.fp32.onnx", threads),
                    "pruned": session(out / "model.fp32.onnx", threads)}
        times = interleaved(sessions, x, 20, args.iterations, args.rounds)
        p50 = {k: float(np.median(v)) for k, v in times.items()}
        speed = ratio_ci(times["teacher"], times["pruned"])
        speeds.append(speed["ratio"])
        print(f"| {threads} | {p50['teacher']:.3f} | {p50['pruned']:.3f} | {speed['ratio']:.2f}x "
              f"({speed['ci95'][0]:.2f}-{speed['ci95'][1]:.2f}) | {t_acc:.2f} | {p_acc:.2f} |")
    print(f"\n{args.rounds} interleaved rounds x {args.iterations} iterations per model and thread count; final "
          f"artifact accuracy {report['final'].get('accuracy')}; accuracy change {p_acc - t_acc:+.2f} pt")
    print("\nsteps (validation accuracy in PyTorch at fine-tuning checkpoints; latency beside the unpruned model):")
    print("| step | params | MACs | latency ms | speedup | val acc % |")
    print("|---:|---:|---:|---:|---:|---:|")
    for s in prune["steps"]:
        print(f"| {s['step']} | {s['params']:,} | {s['macs']:,} | {s.get('latency_ms', '')} | {s.get('speedup', '')} "
              f"| {s.get('val_accuracy_torch', '')} |")
    ok = min(speeds) >= 1.6 and p_acc >= t_acc - 0.5
    print(f"\n{'PASS' if ok else 'FAIL'}: >= 1.6x and within 0.5 point of the teacher")
    return 0 if ok else 1


def archs(args: argparse.Namespace) -> int:
    rows, failed, stages = [], 0, []
    for name in args.archs:
        size = IMAGE_SIZE.get(name, 64)
        config = assign({
            "name": f"prune-{name}", "stages": ["prune", "quantize"],
            "data": {"image_size": size, "augment": False, "val_fraction": 0.05, "test_fraction": 0.05},
            "teacher": {"model": f"torchvision:{name}", "train_epochs": 0}, "student": {"model": "teacher"},
            "prune": {"ratio": args.ratio, "finetune_epochs": 0},
            "quantize": {"calibration_samples": 32}, "bench": {"iterations": 50, "warmup": 5},
        }, args.set)
        stages = config["stages"]
        out = Path(args.out) / "archs" / name
        cmd, seconds, rc = compress(config, out, out.with_suffix(".log"))
        if rc != 0:
            failed += 1
            tail = out.with_suffix(".log").read_text().strip().splitlines()[-1:]
            rows.append(f"| {name} | {size} | failed (exit {rc}): {' '.join(tail)[:120]} | | | | | | | FAIL | "
                        f"{seconds:.0f} |")
            continue
        report = json.loads((out / "report.json").read_text())
        prune = next(s for s in report["stages"] if s["name"] == "prune")
        b, a, final = prune["before"], prune["after"], report["final"]
        dp, dm = 1 - a["params"] / b["params"], 1 - a["macs"] / b["macs"]
        lat = (final.get("latency_ms") or {}).get("p50")
        ok = dp >= 0.2 and dm >= 0.2 and lat is not None
        failed += not ok
        rows.append(f"| {name} | {size} | {prune.get('family', '')} | {b['params']:,} -> {a['params']:,} ({dp:.0%}) | "
                    f"{b['macs']:,} -> {a['macs']:,} ({dm:.0%}) | {final['precision']} | "
                    f"{lat if lat is not None else 'n/a'} | {final.get('speedup_vs_teacher')} | {final.get('measured_on', '')} | "
                    f"{'ok' if ok else 'FAIL'} | {seconds:.0f} |")
        print(f"{name}: done in {seconds:.0f} s", file=sys.stderr)
    print(f"\ntorchvision classifiers, random init, stages [{', '.join(stages)}], prune.ratio {args.ratio}, cpu "
          f"target (ONNX Runtime on this host)\n")
    print("| model | input | family plan | params removed | MACs removed | chosen | p50 ms | x teacher | measured on "
          "| >=20% | run s |")
    print("|---|---:|---|---|---|---|---:|---:|---|---|---:|")
    print("\n".join(rows))
    print("\ncommand per model: python -m edgekd.cli compress --config <out>/archs/<model>.yaml --target cpu "
          "--out <out>/archs/<model> --quiet")
    return 1 if failed else 0


def step_time(args: argparse.Namespace) -> int:
    import copy
    import statistics

    import torch

    import edgekd.prune.pruner as prune_mod
    from edgekd.config import PruneConfig
    from edgekd.models import build_model

    torch.manual_seed(0)
    base = build_model(f"torchvision:{args.arch}", 10).eval()
    example = torch.zeros(1, 3, args.size, args.size)
    linear = prune_mod.fast_patches
    per_step: dict[str, list[float]] = {"torch-pruning": [], "edgekd": []}
    states: dict[str, dict] = {}
    try:
        for r in range(args.rounds):
            for name in (("edgekd", "torch-pruning") if r % 2 == 0 else ("torch-pruning", "edgekd")):
                prune_mod.fast_patches = linear if name == "edgekd" else list
                model = copy.deepcopy(base)
                pruner = prune_mod.make_pruner(model, example, PruneConfig(), None, 0.9, prune_mod.MAX_STEPS)
                t = time.perf_counter()
                for _ in range(args.steps):
                    pruner.step()
                per_step[name].append((time.perf_counter() - t) / args.steps)
                states[name] = model.state_dict()
    finally:
        prune_mod.fast_patches = linear
    a, b = states["edgekd"], states["torch-pruning"]
    same = a.keys() == b.keys() and all(a[k].shape == b[k].shape and torch.equal(a[k], b[k]) for k in a)
    med = {k: statistics.median(v) for k, v in per_step.items()}
    print(f"{args.arch} at {args.size}x{args.size}, {args.steps} steps x {args.rounds} interleaved rounds")
    for name, v in per_step.items():
        print(f"  {name} concat mapping: median {med[name]:.3f} s/step ({', '.join(f'{x:.3f}' for x in v)})")
    print(f"  ratio: {med['torch-pruning'] / med['edgekd']:.2f}x; pruned models identical: {same}")
    return 0 if same else 1


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="what", required=True)
    h = sub.add_parser("half-macs", help="ResNet-18 teacher to half its MACs: speedup and accuracy")
    h.add_argument("--threads", type=int, nargs="+", default=None,
                   help="ONNX Runtime thread counts to time (default: the run's)")
    h.add_argument("--rounds", type=int, default=20)
    h.add_argument("--iterations", type=int, default=200)
    a = sub.add_parser("archs", help="every family through prune and quantize")
    a.add_argument("--archs", nargs="+", default=ARCHS, choices=ARCHS)
    a.add_argument("--ratio", type=float, default=0.35)
    t = sub.add_parser("step-time", help="seconds per pruning step, torch-pruning's concat mapping vs edgekd's")
    t.add_argument("--arch", default="densenet121", choices=ARCHS)
    t.add_argument("--size", type=int, default=224)
    t.add_argument("--steps", type=int, default=3)
    t.add_argument("--rounds", type=int, default=2)
    for p in (h, a):
        p.add_argument("--out", default="runs/prune-benchmarks")
        p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                       help="extra config, e.g. prune.latency_guided=true")
    args = ap.parse_args(argv)
    return {"half-macs": half_macs, "archs": archs, "step-time": step_time}[args.what](args)


if __name__ == "__main__":
    sys.exit(main())
