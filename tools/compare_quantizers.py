#!/usr/bin/env python3
"""Peer comparison of INT8 quantizers on one FP32 ONNX model and one calibration set, in one run.

    # a torchvision model (random-init backbone, BN statistics and a 10-class head fitted on
    # synthetic image-like classes so that top-1 means something), with calib.npz and eval.npz
    python tools/compare_quantizers.py make-model torchvision:resnet18 --out /tmp/cmp/resnet18

    # ONNX Runtime's quantize_static with its defaults, NNCF's default quantize on OpenVINO,
    # edgekd's choice for the target, and FP32 on both runtimes: accuracy (or fidelity) and
    # interleaved p50 latency for each
    python tools/compare_quantizers.py compare --model /tmp/cmp/resnet18/model.onnx \\
        --calib-data /tmp/cmp/resnet18/calib.npz [--eval-data /tmp/cmp/resnet18/eval.npz] --target cpu

    # the embedded default (PyTorch entry) against the same peers, on its own model, calib.npz, eval.npz
    python tools/compare_quantizers.py compare --run runs/demo-cpu-...

The calibration set every quantizer gets is the one edgekd calibrated on (the run's calib.npz: the
given set less the quarter held out for fidelity), so all see the same inputs.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MEAN = np.array([0.485, 0.456, 0.406], np.float32).reshape(1, 3, 1, 1)
STD = np.array([0.229, 0.224, 0.225], np.float32).reshape(1, 3, 1, 1)


def synthetic_images(n: int, size: int, classes: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Image-like inputs (smooth colour fields, ImageNet-normalised) of `classes` classes, each class a
    fixed low-resolution pattern under per-sample variation; returns (x, y)."""
    import torch

    protos = np.random.default_rng(1234).uniform(0, 1, (classes, 3, 6, 6)).astype(np.float32)
    rng = np.random.default_rng(seed)
    y = rng.integers(0, classes, n)
    low = 0.7 * protos[y] + 0.3 * rng.uniform(0, 1, (n, 3, 6, 6)).astype(np.float32)
    x = torch.nn.functional.interpolate(torch.from_numpy(low), size=(size, size), mode="bicubic",
                                        align_corners=False).numpy()
    x = np.clip(x + 0.03 * rng.standard_normal(x.shape).astype(np.float32), 0, 1)
    return ((x - MEAN) / STD).astype(np.float32), y.astype(np.int64)


def make_model(spec: str, out: Path, size: int, classes: int, seed: int) -> None:
    """Export a torchvision classifier (random-init backbone, BN statistics and a least-squares head
    fitted on synthetic classes) to out/model.onnx, with out/calib.npz (x) and out/eval.npz (x, y)."""
    import torch
    import torchvision

    torch.manual_seed(seed)
    name = spec.removeprefix("torchvision:")
    model = getattr(torchvision.models, name)(weights=None, num_classes=classes)
    for m in model.modules():  # cumulative BN statistics over the batches below
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.momentum = None
            m.reset_running_stats()
    model.train()
    with torch.no_grad():
        for i in range(4):
            model(torch.from_numpy(synthetic_images(16, size, classes, seed + 100 + i)[0]))
    model.eval()
    head = [m for m in model.modules() if isinstance(m, torch.nn.Linear)][-1]
    feats: list[torch.Tensor] = []
    hook = head.register_forward_hook(lambda _m, inp, _o: feats.append(inp[0].detach()))
    xt, yt = synthetic_images(320, size, classes, seed + 1)
    with torch.no_grad():
        for i in range(0, len(xt), 32):
            model(torch.from_numpy(xt[i:i + 32]))
    hook.remove()
    f = torch.cat(feats).double()
    mu, sd = f.mean(0), f.std(0) + 1e-6
    z = (f - mu) / sd
    target = torch.nn.functional.one_hot(torch.from_numpy(yt), classes).double() * 2 - 1
    # A strong ridge keeps the head well conditioned, as a trained head is: it does not amplify the
    # feature directions that barely vary (and that quantization noise would then dominate).
    w = torch.linalg.solve(z.T @ z + 2000.0 * torch.eye(z.shape[1], dtype=torch.float64), z.T @ target)
    with torch.no_grad():  # fold the standardisation into the head; logits scaled to a few units
        head.weight.copy_((4 * w / sd[:, None]).T.float())
        head.bias.copy_((4 * (-(mu / sd) @ w)).float())
    out.mkdir(parents=True, exist_ok=True)
    torch.onnx.export(model, (torch.zeros(1, 3, size, size),), str(out / "model.onnx"), dynamo=False,
                      opset_version=17, input_names=["input"], output_names=["logits"],
                      dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}})
    xc, _ = synthetic_images(128, size, classes, seed + 2)
    xe, ye = synthetic_images(200, size, classes, seed + 3)
    np.savez(out / "calib.npz", x=xc)
    np.savez(out / "eval.npz", x=xe, y=ye)
    with torch.no_grad():
        acc = float((model(torch.from_numpy(xe)).argmax(1).numpy() == ye).mean() * 100)
    print(f"{out / 'model.onnx'}: {name}, {classes} classes, torch FP32 eval accuracy {acc:.1f}% on {len(ye)} inputs")


def compare(args: argparse.Namespace) -> dict:
    """Run edgekd for the target, then the peers on its calibration set; measure all in one interleaved run."""
    from edgekd.backends import get_backend
    from edgekd.backends.onnxruntime import OrtRunner
    from edgekd.backends.openvino import OpenVinoRunner
    from edgekd.bench.measure import accuracy_of, agreement_of, bench_interleaved, predict, sqnr_db
    from edgekd.config import load_config
    from edgekd.config.profiles import load_profile
    from edgekd.context import usable_cores
    from edgekd.pipeline import Pipeline
    from edgekd.quantize.nncf_ov import quantize_nncf
    from edgekd.quantize.ptq import quantize_ort_default

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.run:  # an existing run (e.g. the embedded default `edgekd compress --target cpu`)
        run = Path(args.run)
        report = json.loads((run / "report.json").read_text())
        args.model, args.target = str(run / "model.fp32.onnx"), report["target"]["name"]
    else:
        if not (args.model and args.calib_data):
            raise SystemExit("compare needs --model and --calib-data, or --run RUN_DIR")
        run = out / f"edgekd-{args.target}"
        report = Pipeline(load_config(args.config, {"seed": args.seed}), args.target, run, model_onnx=args.model,
                          calib_data=args.calib_data, eval_data=args.eval_data).run()
    calib = run / "calib.npz"
    with np.load(run / "eval.npz") as z:
        x, y = z["x"], (z["y"] if "y" in z.files else None)
    n_calib = int(np.load(calib)["x"].shape[0])
    ort_default = quantize_ort_default(Path(args.model), out / "ort_default.int8.onnx", calib)
    nncf_xml = quantize_nncf(Path(args.model), calib, out / "nncf" / "model.int8.xml", subset_size=min(300, n_calib))
    threads = args.threads or usable_cores()
    profile = load_profile(args.target)
    final = report["final"]
    runners = {
        "ORT FP32": OrtRunner(Path(args.model), threads, ["CPUExecutionProvider"]),
        "ORT quantize_static defaults (QDQ S8S8 per-tensor)": OrtRunner(ort_default, threads, ["CPUExecutionProvider"]),
        "OpenVINO FP32": OpenVinoRunner(Path(args.model), "CPU", "fp32", threads),
        "NNCF default INT8 on OpenVINO": OpenVinoRunner(nncf_xml, "CPU", "int8", threads),
    }
    backend = get_backend(profile.backend)
    from edgekd.backends.base import Artifact

    art = Artifact(path=run / final["artifact"], backend=profile.backend, precision=final["precision"])
    edge_name = f"edgekd {args.target}: {final.get('label', final['precision'])} ({profile.backend})"
    runners[edge_name] = backend.load(art, profile, threads)
    logits = {k: predict(r, x) for k, r in runners.items()}
    ref = logits["ORT FP32"]
    lat = bench_interleaved(runners, x[:1], args.warmup, args.iterations, rounds=args.rounds)
    rows = []
    for k in runners:
        rows.append({"name": k, "accuracy": None if y is None else round(accuracy_of(logits[k], y), 2),
                     "top1_agreement_with_fp32": round(agreement_of(ref, logits[k]), 2),
                     "logit_sqnr_db": None if k == "ORT FP32" else round(sqnr_db(ref, logits[k]), 2),
                     "p50_ms": round(lat[k]["p50"], 3), "p90_ms": round(lat[k]["p90"], 3)})
    p50 = {r["name"]: r["p50_ms"] for r in rows}
    ort_def = p50["ORT quantize_static defaults (QDQ S8S8 per-tensor)"]
    fp32_same = p50["OpenVINO FP32" if profile.backend == "openvino" else "ORT FP32"]
    checks = {"edgekd_vs_ort_default": round(p50[edge_name] / ort_def, 3),
              "edgekd_vs_fp32_same_runtime": round(p50[edge_name] / fp32_same, 3)}
    if profile.backend == "openvino":
        checks["edgekd_vs_nncf"] = round(p50[edge_name] / p50["NNCF default INT8 on OpenVINO"], 3)
    result = {"model": args.model, "target": args.target, "eval": "labelled eval data" if y is not None else
              "fidelity on held-out calibration inputs", "eval_samples": int(len(x)), "calibration_samples": n_calib,
              "threads": threads, "iterations": args.iterations, "rounds": args.rounds, "rows": rows,
              "edgekd_choice": final.get("choice", {}).get("why"), "kept_float": _kept(report), "ratios": checks}
    _print(result)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return result


def _kept(report: dict) -> list[str]:
    return next((s.get("kept_float", []) for s in report["stages"] if s["name"] == "quantize"), [])


def _print(res: dict) -> None:
    print(f"\n{res['model']} -> {res['target']}: {res['eval']} ({res['eval_samples']} inputs), "
          f"{res['calibration_samples']} calibration inputs, {res['threads']} threads, "
          f"{res['iterations']} iterations in {res['rounds']} interleaved rounds")
    print(f"{'':56} {'acc %':>7} {'agree %':>8} {'SQNR dB':>8} {'p50 ms':>8} {'p90 ms':>8}")
    for r in res["rows"]:
        acc = "-" if r["accuracy"] is None else f"{r['accuracy']:.2f}"
        sq = "-" if r["logit_sqnr_db"] is None else f"{r['logit_sqnr_db']:.1f}"
        print(f"{r['name'][:56]:56} {acc:>7} {r['top1_agreement_with_fp32']:>8.2f} {sq:>8} "
              f"{r['p50_ms']:>8.3f} {r['p90_ms']:>8.3f}")
    print("ratios of p50:", ", ".join(f"{k} {v}" for k, v in res["ratios"].items()))
    print("edgekd's choice:", res["edgekd_choice"])
    print("kept in float:", ", ".join(res["kept_float"]) or "none")


def main(argv: list[str] | None = None) -> int:
    """Command line: make-model | compare."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("make-model", help="export a torchvision model with calib.npz and eval.npz")
    m.add_argument("model", help="torchvision:NAME, e.g. torchvision:resnet18")
    m.add_argument("--out", required=True)
    m.add_argument("--size", type=int, default=224)
    m.add_argument("--classes", type=int, default=10)
    m.add_argument("--seed", type=int, default=0)
    c = sub.add_parser("compare", help="ORT default vs NNCF default vs edgekd on one model and calibration set")
    c.add_argument("--model")
    c.add_argument("--calib-data")
    c.add_argument("--run", help="compare against this finished run instead of running edgekd")
    c.add_argument("--eval-data")
    c.add_argument("--target", default="cpu")
    c.add_argument("--config", help="edgekd config for its run (e.g. fewer bench iterations)")
    c.add_argument("--out", default="runs/compare-quantizers")
    c.add_argument("--threads", type=int)
    c.add_argument("--warmup", type=int, default=20)
    c.add_argument("--iterations", type=int, default=300)
    c.add_argument("--rounds", type=int, default=10)
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--json", help="write the results as JSON here")
    args = p.parse_args(argv)
    if args.cmd == "make-model":
        make_model(args.model, Path(args.out), args.size, args.classes, args.seed)
    else:
        compare(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
