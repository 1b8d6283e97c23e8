#!/usr/bin/env python3
"""x86 vs ARM accuracy of a run's FP32 and INT8 models on its eval.npz.

    python tools/arm_accuracy.py [RUN_DIR] [--target raspberry-pi-5] [--samples N] [--json OUT]

Each model is evaluated by the device runner twice: on this host's onnxruntime and on the aarch64
onnxruntime under qemu user-mode emulation of the target's CPU (edgekd.bench.emulate). Without RUN_DIR the
embedded default is compressed for the target first (runs/arm-accuracy-<target>, reused once it has
finished). Prints one table row per model; emulation yields no timing, so none is shown.
Needs the aarch64 sysroot: python -m edgekd.bench.sysroot
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from edgekd.bench.emulate import check_profile, check_ready, verify_arm  # noqa: E402
from edgekd.config.profiles import load_profile  # noqa: E402
from edgekd.errors import EdgeKDError  # noqa: E402

MODELS = ("model.fp32.onnx", "model.int8.onnx")


def default_run(target: str) -> Path:
    """The embedded default compressed for `target`, made once under runs/."""
    out = ROOT / "runs" / f"arm-accuracy-{target}"
    if not (out / "report.json").is_file():
        print(f"compressing the embedded default for {target} into {out} ...", file=sys.stderr)
        cmd = [sys.executable, "-m", "edgekd.cli", "compress", "--target", target, "--out", str(out), "--quiet"]
        proc = subprocess.run(cmd, cwd=ROOT)
        if proc.returncode not in (0, 1):  # 1: a gate failed, the models are still there
            sys.exit(f"arm_accuracy: {' '.join(cmd)} failed with exit code {proc.returncode}")
    return out


def models_of(run: Path) -> list[Path]:
    """The run's FP32 and INT8 models, then its final artifact when that is another file."""
    found = [run / m for m in MODELS if (run / m).is_file()]
    try:
        final = json.loads((run / "report.json").read_text())["final"]["artifact"]
    except (OSError, ValueError, KeyError, TypeError):
        final = None
    if final and (run / final).suffix == ".onnx" and (run / final).is_file() and run / final not in found:
        found.append(run / final)
    return found


def main(argv: list[str] | None = None) -> int:
    """Evaluate every model on both sides and print the table; returns the exit code."""
    p = argparse.ArgumentParser(description="x86 vs ARM (emulated) accuracy of a run's models")
    p.add_argument("run", nargs="?", help="run directory (default: the embedded default, compressed first)")
    p.add_argument("--target", default="raspberry-pi-5", help="aarch64 onnxruntime profile (sets the emulated CPU)")
    p.add_argument("--samples", type=int, help="evaluate only the first N eval samples")
    p.add_argument("--json", help="also write the results here")
    args = p.parse_args(argv)
    try:
        profile = load_profile(args.target)
        check_profile(profile, "arm_accuracy")
        check_ready()
        run = Path(args.run) if args.run else default_run(profile.name)
        if not (run / "eval.npz").is_file():
            raise EdgeKDError(f"arm_accuracy: {run} has no eval.npz")
        rows = []
        for model in models_of(run):
            t0 = time.perf_counter()
            with tempfile.TemporaryDirectory(prefix="arm-accuracy-") as tmp:
                r = verify_arm(Path(tmp), model, run / "eval.npz", profile=profile, max_samples=args.samples)
            r["model"] = str(model.relative_to(run))
            r["seconds"] = round(time.perf_counter() - t0, 1)
            rows.append(r)
            print(f"  {r['model']}: done in {r['seconds']} s", file=sys.stderr)
    except EdgeKDError as e:
        print(f"arm_accuracy: {e}", file=sys.stderr)
        return e.exit_code
    if not rows:
        print(f"arm_accuracy: {run} holds none of {', '.join(MODELS)}", file=sys.stderr)
        return 2
    first = rows[0]
    print(f"run {run} · {first['samples']} eval samples · x86: onnxruntime {first['runtime_version_x86']} on this "
          f"host · ARM: onnxruntime {first['runtime_version_arm']} (aarch64) under {first['emulator'].split(' (')[0]}, "
          f"-cpu {first['emulated_cpu']}")
    header = ("model", "x86 accuracy %", "ARM accuracy %", "ARM - x86 (points)", "top-1 agreement %", "differ")
    table = [header] + [(r["model"], _pct(r["accuracy_x86"]), _pct(r["accuracy_arm"]),
                         _diff(r["accuracy_arm"], r["accuracy_x86"]), f"{r['arm_agreement']:.2f}",
                         str(r["disagreements"])) for r in rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    print("| " + " | ".join(c.ljust(w) for c, w in zip(header, widths, strict=True)) + " |")
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for row in table[1:]:
        print("| " + " | ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) + " |")
    print("latency: not measured under emulation (emulated: not representative)")
    if args.json:
        Path(args.json).write_text(json.dumps({"run": str(run), "target": profile.name, "rows": rows}, indent=2) + "\n")
    return 0


def _pct(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.2f}"


def _diff(a: float | None, b: float | None) -> str:
    return "n/a" if a is None or b is None else f"{a - b:+.2f}"


if __name__ == "__main__":
    sys.exit(main())
