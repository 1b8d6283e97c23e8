#!/usr/bin/env python3
"""Interleaved p50 latency of the CPU backends on torchvision models (random init, 224x224, batch 1).

    python tools/compare_backends.py [--models resnet18 mobilenet_v2] [--threads 2] [--iterations 200]
                                     [--rounds 5] [--calibration 16] [--json OUT] [--keep DIR]

For each model, in one process and one interleaved loop (A B C D E, A B C D E, ...) so that a change
in the machine's speed affects every variant alike:

    ORT FP32        onnxruntime, CPU provider, the FP32 ONNX (the `cpu` target's fp32 artifact)
    ORT QDQ U8S8    onnxruntime on edgekd's QDQ for the `cpu` target (reduce_range as the recipe picks)
    OV FP32         OpenVINO IR of the FP32 ONNX (the intel-cpu target's fp32 artifact)
    OV QDQ          OpenVINO IR of edgekd's QDQ for the intel-cpu target
    NNCF INT8       nncf.quantize (default preset) of the OpenVINO model, on OpenVINO

Calibration and the fidelity check use random N(0, 1) inputs (the weights are random too), so the
top-1 agreement column says how faithfully each variant follows FP32, not how accurate it is; and a
random-init torchvision mobilenet_v2 has logits of about 1e-9, where INT8 cannot follow at all (its
agreement there is no evidence either way). The latencies are what this tool is for.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from edgekd.backends import get_backend  # noqa: E402
from edgekd.bench.harness import summarize, time_inference  # noqa: E402
from edgekd.config import QuantizeConfig  # noqa: E402
from edgekd.config.profiles import load_profile  # noqa: E402
from edgekd.quantize.nncf_ov import quantize_nncf  # noqa: E402
from edgekd.quantize.ptq import quantize_qdq  # noqa: E402
from edgekd.quantize.recipes import resolve  # noqa: E402

VARIANTS = ("ORT FP32", "ORT QDQ U8S8", "OV FP32", "OV QDQ", "NNCF INT8")


def export(name: str, path: Path) -> Path:
    """torchvision `name` with random weights (seed 0), exported with a dynamic batch (legacy exporter)."""
    import torch
    import torchvision

    torch.manual_seed(0)
    model = getattr(torchvision.models, name)(weights=None).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.zeros(1, 3, 224, 224),), str(path), dynamo=False, opset_version=17,
                          input_names=["input"], output_names=["logits"],
                          dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}})
    return path


def build(name: str, work: Path, calibration: int, threads: int) -> tuple[dict, dict]:
    """The five runners for one model, and what each one is (recipe, files)."""
    rng = np.random.default_rng(0)
    fp32 = export(name, work / f"{name}.fp32.onnx")
    calib = work / f"{name}.calib.npz"
    np.savez(calib, x=rng.standard_normal((calibration, 3, 224, 224)).astype(np.float32))
    cpu, intel = load_profile("cpu"), load_profile("intel-cpu")
    cpu_recipe, ov_recipe = resolve(cpu, QuantizeConfig()), resolve(intel, QuantizeConfig())
    cpu_qdq = quantize_qdq(fp32, work / f"{name}.cpu.qdq.onnx", calib, cpu_recipe)
    ov_qdq = quantize_qdq(fp32, work / f"{name}.intel.qdq.onnx", calib, ov_recipe)
    nncf_xml = quantize_nncf(fp32, calib, work / f"{name}.nncf" / "model.xml", subset_size=calibration)
    ort, ov = get_backend("onnxruntime"), get_backend("openvino")
    plan = {
        "ORT FP32": (ort, cpu, fp32, "fp32"), "ORT QDQ U8S8": (ort, cpu, cpu_qdq, "int8"),
        "OV FP32": (ov, intel, fp32, "fp32"), "OV QDQ": (ov, intel, ov_qdq, "int8"),
        "NNCF INT8": (ov, intel, nncf_xml, "int8"),
    }
    runners, about = {}, {}
    for variant, (backend, profile, src, precision) in plan.items():
        art = backend.compile(src, profile, work / name / variant.replace(" ", "_"), precision)
        runners[variant] = backend.load(art, profile, threads)
        about[variant] = {"backend": backend.name, "target": profile.name, "precision": precision,
                          "source": src.name, "size_bytes": art.size_bytes(), "runner": runners[variant].describe()}
    about["ORT QDQ U8S8"]["recipe"] = cpu_recipe.as_dict()
    about["OV QDQ"]["recipe"] = ov_recipe.as_dict()
    about["NNCF INT8"]["recipe"] = {"nncf.quantize": "defaults, preset performance", "subset_size": calibration}
    return runners, about


def interleaved(runners: dict, sample: np.ndarray, warmup: int, iterations: int, rounds: int) -> dict:
    """Per-variant latency summaries from `rounds` rounds, each timing every variant in turn."""
    per_round = max(1, iterations // rounds)
    times: dict = {k: [] for k in runners}
    for r in runners.values():
        time_inference(r.infer, sample, warmup, 0)
    for _ in range(rounds):
        for name, r in runners.items():
            times[name].append(time_inference(r.infer, sample, 3, per_round))
    return {k: {**summarize(np.concatenate(v)), "iterations": int(sum(len(t) for t in v))} for k, v in times.items()}


def fidelity(runners: dict, x: np.ndarray) -> tuple[dict, float]:
    """Top-1 agreement (percent) of every variant with ORT FP32 on `x`, and FP32's largest |logit|."""
    logits = runners["ORT FP32"].infer(x)
    ref = logits.argmax(1)
    return {k: float((r.infer(x).argmax(1) == ref).mean() * 100) for k, r in runners.items()}, float(np.abs(logits).max())


def main(argv: list[str] | None = None) -> int:
    """Run the comparison and print a Markdown table (and JSON with --json)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=["resnet18", "mobilenet_v2"])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--iterations", type=int, default=200, help="timed calls per variant, split over the rounds")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--calibration", type=int, default=16, help="random calibration inputs")
    p.add_argument("--fidelity-samples", type=int, default=32)
    p.add_argument("--json", help="write the results here too")
    p.add_argument("--keep", help="keep the models in this folder (default: a temporary one)")
    args = p.parse_args(argv)
    import nncf
    import onnxruntime
    import openvino

    versions = {"onnxruntime": onnxruntime.__version__, "openvino": openvino.__version__, "nncf": nncf.__version__}
    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")), platform.processor())
    env = {"cpu": cpu, "threads": args.threads, "load_average_start": list(os.getloadavg()),
           "iterations": args.iterations, "rounds": args.rounds, "warmup": args.warmup, "versions": versions}
    results: dict = {"environment": env, "models": {}}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.keep or tmp)
        work.mkdir(parents=True, exist_ok=True)
        for name in args.models:
            t0 = time.perf_counter()
            runners, about = build(name, work, args.calibration, args.threads)
            sample = np.random.default_rng(1).standard_normal((1, 3, 224, 224)).astype(np.float32)
            held_out = np.random.default_rng(2).standard_normal((args.fidelity_samples, 3, 224, 224)).astype(np.float32)
            agree, scale = fidelity(runners, held_out)
            lat = interleaved(runners, sample, args.warmup, args.iterations, args.rounds)
            results["models"][name] = {v: {**about[v], "latency_ms": lat[v], "top1_agreement_vs_ort_fp32": agree[v]}
                                       for v in VARIANTS}
            results["models"][name]["fp32_logit_max_abs"] = scale
            results["models"][name]["seconds"] = round(time.perf_counter() - t0, 1)
            for r in runners.values():
                r.close()
    env["load_average_end"] = list(os.getloadavg())
    print(f"# p50 ms, batch 1, 224x224, {args.threads} threads, {args.iterations} interleaved iterations "
          f"({args.rounds} rounds); {cpu}")
    print("# " + ", ".join(f"{k} {v}" for k, v in versions.items()))
    print("| model | " + " | ".join(VARIANTS) + " |")
    print("|---|" + "---|" * len(VARIANTS))
    for name, r in results["models"].items():
        print(f"| {name} | " + " | ".join(f"{r[v]['latency_ms']['p50']:.2f}" for v in VARIANTS) + " |")
    print("\n# top-1 agreement with ORT FP32 on random inputs (%); meaningless where FP32's logits are ~0")
    for name, r in results["models"].items():
        print(f"| {name} | " + " | ".join(f"{r[v]['top1_agreement_vs_ort_fp32']:.1f}" for v in VARIANTS)
              + f" | max abs FP32 logit {r['fp32_logit_max_abs']:.3g} |")
    recipe = next(iter(results["models"].values()))["ORT QDQ U8S8"]["recipe"] if results["models"] else {}
    print(f"\n# ORT QDQ recipe: {recipe.get('name')}, reduce_range={recipe.get('reduce_range')} ({recipe.get('why')})")
    print(f"# load average start {env['load_average_start']}, end {env['load_average_end']}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
