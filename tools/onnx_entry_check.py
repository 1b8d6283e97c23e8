#!/usr/bin/env python3
"""The ONNX entry on torchvision models exported the usual way (fixed batch of 1) at several opsets, for
several targets: a markdown table of the final artifact's top-1 agreement with the FP32 model.

    python tools/onnx_entry_check.py --out /tmp/onnx-entry-check
    python tools/onnx_entry_check.py --models resnet18 --opsets 11 --targets cpu --size 64   # quick

Each model is random-init (weights=None) with its BatchNorm statistics re-estimated on image-like
inputs (smooth random colour fields), so activations are scaled as in a trained network; the
1000-class head stays random. Agreement is what is measured, so trained weights are not needed, but
a random head may give few distinct top-1 classes: the table says how many the FP32 model gives on
the held-out inputs, and agreement over one or two classes says little.

With --fashion-mnist the models are trained on Fashion-MNIST (28x28, greyscale repeated to 3 channels,
[-1, 1]) instead: `--state-dict NAME=PATH` loads a 10-class state_dict (a teacher edgekd trained and
cached, say), the others are trained here for --train-epochs; calibration inputs come from the
training images and the agreement is measured on the official test images.

    python tools/onnx_entry_check.py --fashion-mnist --state-dict resnet18=TEACHER.pt --out /tmp/oec-fm

Per run: `edgekd compress --model M --calib-data C --eval-data E --target T`; the figures come from
its report.json (final.agreement_with_fp32, measured with the target's runtime where it runs on this
host). Exit 0 when every run finished, 1 otherwise.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
FAST_BENCH = "bench: {iterations: 20, warmup: 2}\n"  # latency is not what this checks


def image_like(n: int, size: int, seed: int) -> np.ndarray:
    """Smooth random colour fields (a 7x7 field upsampled bicubically) plus a little noise, normalised
    with ImageNet's mean and std."""
    import torch

    rng = np.random.default_rng(seed)
    low = torch.from_numpy(rng.uniform(0, 1, (n, 3, 7, 7)).astype(np.float32))
    x = torch.nn.functional.interpolate(low, size=(size, size), mode="bicubic", align_corners=False).numpy()
    x = np.clip(x + 0.03 * rng.standard_normal(x.shape).astype(np.float32), 0, 1)
    mean = np.array([0.485, 0.456, 0.406], np.float32).reshape(1, 3, 1, 1)
    std = np.array([0.229, 0.224, 0.225], np.float32).reshape(1, 3, 1, 1)
    return ((x - mean) / std).astype(np.float32)


def build_model(name: str, size: int, seed: int):
    """A random-init torchvision classifier with BatchNorm statistics taken from image-like inputs."""
    import torch
    import torchvision

    torch.manual_seed(seed)
    model = getattr(torchvision.models, name)(weights=None)
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.momentum = None  # a cumulative average over the batches below
            m.reset_running_stats()
    model.train()
    with torch.no_grad():
        for i in range(4):
            model(torch.from_numpy(image_like(16, size, seed + 100 + i)))
    return model.eval()


def fashion_mnist(n_calib: int, n_eval: int, seed: int):
    """(train images as a tensor-indexable store, train labels, calibration inputs, eval inputs, eval
    labels) from the Debian Fashion-MNIST files, preprocessed as edgekd's fashion-mnist dataset does."""
    import torch

    from edgekd.config import DataConfig
    from edgekd.data import build_splits

    splits = build_splits(DataConfig(dataset="fashion-mnist", image_size=28), seed)
    rng = np.random.default_rng(seed)
    calib = splits.train.x.take(torch.from_numpy(np.sort(rng.choice(len(splits.train.y), n_calib, replace=False))))
    test_idx = np.sort(rng.choice(len(splits.test.y), n_eval, replace=False))
    return (splits.train.x, np.asarray(splits.train.y), calib.numpy(), splits.test.x.take(torch.from_numpy(test_idx)).numpy(),
            np.asarray(splits.test.y)[test_idx])


def trained_model(name: str, images, labels: np.ndarray, epochs: int, seed: int, state_dict: Path | None):
    """A 10-class torchvision `name`: the given state_dict, or trained here on Fashion-MNIST (SGD, cosine)."""
    import torch
    import torchvision

    torch.manual_seed(seed)
    model = getattr(torchvision.models, name)(weights=None, num_classes=10)
    if state_dict is not None:
        model.load_state_dict(torch.load(state_dict, map_location="cpu", weights_only=True))
        return model.eval()
    steps = epochs * (len(labels) // 128)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4, nesterov=True)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.05, total_steps=steps)
    g = torch.Generator().manual_seed(seed)
    model.train()
    for step in range(steps):
        idx = torch.randint(0, len(labels), (128,), generator=g)
        loss = torch.nn.functional.cross_entropy(model(images.take(idx)), torch.from_numpy(labels[idx.numpy()]))
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if step % 100 == 0:
            print(f"  training {name}: step {step}/{steps}, loss {loss.item():.3f}", file=sys.stderr, flush=True)
    return model.eval()


def export_fixed(model, path: Path, opset: int, size: int) -> Path:
    """torch.onnx.export as users write it: one example of batch 1, no dynamic axes."""
    import torch

    torch.onnx.export(model, (torch.randn(1, 3, size, size),), str(path), input_names=["input"], dynamo=False,
                      opset_version=opset)
    return path


def distinct_classes(model, x: np.ndarray) -> int:
    import torch

    with torch.no_grad():
        return int(len(np.unique(np.concatenate([model(torch.from_numpy(x[i:i + 32])).argmax(1).numpy()
                                                 for i in range(0, len(x), 32)]))))


def run_one(model: Path, data: Path, out: Path, target: str) -> dict:
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "edgekd.cli", "compress", "--config", str(data / "fast.yaml"),
                        "--model", str(model), "--calib-data", str(data / "calib.npz"), "--eval-data",
                        str(data / "eval.npz"), "--target", target, "--out", str(out), "--quiet"],
                       cwd=ROOT, capture_output=True, text=True)
    row: dict = {"rc": r.returncode, "seconds": round(time.perf_counter() - t0, 1)}
    if r.returncode != 0 or not (out / "report.json").exists():
        row["error"] = (r.stderr.strip().splitlines() or ["no output"])[-1][:200]
        return row
    rep = json.loads((out / "report.json").read_text())
    q = next(s for s in rep["stages"] if s["name"] == "quantize")
    int8 = next((c for c in q["candidates"] if c["name"] == "int8"), {})
    final = rep["final"]
    row.update({"final": final.get("candidate"), "agreement": final.get("agreement_with_fp32"),
                "int8_agreement": (int8.get("fidelity") or {}).get("top1_agreement"),
                "selection_drop": (q.get("fallback") or {}).get("drop"), "kept_float": len(q.get("kept_float", [])),
                "opset_used": rep["onnx_input"]["opset_used"],
                "measured": "this host" + (" (not the board)" if final.get("measured_on_note") else "")})
    return row


def _fmt(v, digits: int = 1) -> str:
    return "—" if v is None else f"{v:.{digits}f}" if isinstance(v, float) else str(v)


def table(rows: list[dict]) -> str:
    head = ("| model | opset (used) | target | exit | final | final vs FP32 top-1 % | int8 vs FP32 top-1 % | "
            "int8 drop on selection % | kept float | FP32 classes on eval | where |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        lines.append(f"| {r['model']} | {r['opset']} ({_fmt(r.get('opset_used'))}) | {r['target']} | {r['rc']} | "
                     f"{_fmt(r.get('final'))} | {_fmt(r.get('agreement'))} | {_fmt(r.get('int8_agreement'))} | "
                     f"{_fmt(r.get('selection_drop'))} | {_fmt(r.get('kept_float'))} | {r['classes']} | "
                     f"{r.get('measured') or r.get('error', '')} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("/tmp/edgekd-onnx-entry-check"))
    ap.add_argument("--models", nargs="+", default=["resnet18", "mobilenet_v2"])
    ap.add_argument("--opsets", nargs="+", type=int, default=[11, 13, 17])
    ap.add_argument("--targets", nargs="+", default=["cpu", "intel-cpu", "raspberry-pi-5"])
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--calib", type=int, default=64, help="calibration inputs (half of them select: eval data is given)")
    ap.add_argument("--eval", type=int, default=200, help="held-out inputs the agreement is measured on")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--fashion-mnist", action="store_true", help="trained 10-class models and real images")
    ap.add_argument("--state-dict", action="append", default=[], metavar="NAME=PATH",
                    help="with --fashion-mnist: a trained state_dict for model NAME")
    ap.add_argument("--train-epochs", type=int, default=2, help="with --fashion-mnist: epochs for the others")
    args = ap.parse_args(argv)
    data = args.out / "data"
    data.mkdir(parents=True, exist_ok=True)
    weights = dict(a.split("=", 1) for a in args.state_dict)
    if args.fashion_mnist:
        args.size = 28
        images, labels, calib_x, eval_x, eval_y = fashion_mnist(args.calib, args.eval, args.seed)
        np.savez(data / "eval.npz", x=eval_x, y=eval_y)
    else:
        calib_x, eval_x, eval_y = image_like(args.calib, args.size, args.seed + 1), image_like(args.eval, args.size,
                                                                                               args.seed + 2), None
        np.savez(data / "eval.npz", x=eval_x)
    np.savez(data / "calib.npz", x=calib_x)
    (data / "fast.yaml").write_text(FAST_BENCH)
    rows = []
    for name in args.models:
        if args.fashion_mnist:
            sd = Path(weights[name]) if name in weights else None
            model = trained_model(name, images, labels, args.train_epochs, args.seed, sd)
        else:
            model = build_model(name, args.size, args.seed)
        classes = distinct_classes(model, eval_x)
        if eval_y is not None:
            import torch

            with torch.no_grad():
                acc = float((model(torch.from_numpy(eval_x)).argmax(1).numpy() == eval_y).mean() * 100)
            print(f"{name}: PyTorch top-1 {acc:.2f}% on the {len(eval_y)} held-out test images", file=sys.stderr)
        for opset in args.opsets:
            path = export_fixed(model, data / f"{name}-opset{opset}.onnx", opset, args.size)
            for target in args.targets:
                row = {"model": name, "opset": opset, "target": target, "classes": classes,
                       "torch_accuracy": acc if eval_y is not None else None,
                       **run_one(path, data, args.out / "runs" / f"{name}-opset{opset}-{target}", target)}
                rows.append(row)
                print(f"{name} opset {opset} {target}: exit {row['rc']} in {row['seconds']} s", file=sys.stderr,
                      flush=True)
    (args.out / "results.json").write_text(json.dumps(rows, indent=2))
    print(table(rows))
    what = "Fashion-MNIST test images" if args.fashion_mnist else "image-like inputs"
    print(f"\n{args.eval} held-out {what} at 3x{args.size}x{args.size}; {args.calib} calibration inputs "
          f"(half of them select the fallback). Results: {args.out / 'results.json'}")
    return 0 if all(r["rc"] == 0 for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
