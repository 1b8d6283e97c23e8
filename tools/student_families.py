"""torchvision student families through the whole default pipeline on the embedded default (digits at
32x32, torchvision resnet18 teacher trained once and cached): one `edgekd compress --target cpu` per
family with a config that sets only `student.model: torchvision:NAME` (plus --set overrides).

A family passes when it ends at or above --min-accuracy (exit 0) or stops with exit 3 and a one-line
error; it must never end near chance with exit 0. Final accuracy is report.json's final.accuracy
(the chosen artifact on the target's runtime, held-out test split). The teacher's accuracy comes from
report.json, or, when the run stopped before writing it, from the run's teacher.fp32.onnx on its
eval.npz with ONNX Runtime. Wall time: the whole command on this host.

Prints a markdown table and writes it (and the rows as JSON) to --out.

    python tools/student_families.py [--families mobilenet_v3_small,...] [--out DIR] [--set distill.epochs=10]
                                     [--resume]
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
FAMILIES = ("mobilenet_v3_small", "mobilenet_v3_large", "mnasnet0_5", "mobilenet_v2", "efficientnet_b0",
            "shufflenet_v2_x0_5", "regnet_x_400mf", "resnet18")


def _teacher_accuracy(run: Path) -> float | None:
    """The teacher's test accuracy with ONNX Runtime from the run's own files (None when absent)."""
    import numpy as np
    import onnxruntime as ort

    onnx_path, eval_path = run / "teacher.fp32.onnx", run / "eval.npz"
    if not onnx_path.is_file() or not eval_path.is_file():
        return None
    data = np.load(eval_path)
    s = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    logits = s.run(None, {s.get_inputs()[0].name: data["x"]})[0]
    return float((logits.argmax(1) == data["y"]).mean() * 100)


def run_family(name: str, out: Path, target: str, overrides: list[str]) -> dict:
    """One compress run for torchvision:`name`; its exit code, accuracies, wall seconds and error line."""
    raw: dict = {"name": f"family-{name}", "student": {"model": f"torchvision:{name}"}}
    for a in overrides:
        key, _, value = a.partition("=")
        *path, last = key.split(".")
        node = raw
        for k in path:
            node = node.setdefault(k, {})
        node[last] = yaml.safe_load(value)
    cfg = out / f"{name}.yaml"
    cfg.write_text(yaml.safe_dump(raw, sort_keys=False))
    run = out / name
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "edgekd.cli", "compress", "--target", target, "--config", str(cfg),
                           "--out", str(run), "--quiet"], cwd=ROOT, text=True, capture_output=True)
    wall = time.perf_counter() - t0
    (out / f"{name}.log").write_text(proc.stdout + proc.stderr)
    row = {"family": name, "exit": proc.returncode, "final_accuracy": None, "teacher_accuracy": None,
           "wall_s": round(wall, 1), "error": None, "error_lines": 0}
    report = run / "report.json"
    if proc.returncode == 0 and report.is_file():
        rep = json.loads(report.read_text())
        row["final_accuracy"] = rep.get("final", {}).get("accuracy")
        row["teacher_accuracy"] = rep.get("teacher", {}).get("accuracy")
    else:
        lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("edgekd: error:")]
        row["error"] = lines[-1] if lines else (proc.stderr.strip().splitlines() or ["(no message)"])[-1]
        row["error_lines"] = len(proc.stderr.strip().splitlines())
        row["report_left"] = report.is_file()
        row["teacher_accuracy"] = _teacher_accuracy(run)
    return row


def verdict(row: dict, min_accuracy: float) -> str:
    if row["exit"] == 0:
        acc = row["final_accuracy"]
        return "ok" if acc is not None and acc >= min_accuracy else "BELOW TARGET"
    if row["exit"] == 3 and row["error_lines"] == 1 and not row.get("report_left"):
        return "stopped (exit 3, one line)"
    return "FAILED"


def table(rows: list[dict], min_accuracy: float) -> str:
    def pct(v: float | None) -> str:
        return "-" if v is None else f"{v:.2f}"

    lines = ["| family | exit | final accuracy % | teacher accuracy % | wall s | verdict | error |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        err = (r["error"] or "").replace("|", "\\|")
        lines.append(f"| {r['family']} | {r['exit']} | {pct(r['final_accuracy'])} | {pct(r['teacher_accuracy'])} "
                     f"| {r['wall_s']:.0f} | {verdict(r, min_accuracy)} | {err} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--families", default=",".join(FAMILIES), help="comma-separated torchvision model names")
    p.add_argument("--out", default=str(ROOT / "runs" / "student-families"))
    p.add_argument("--target", default="cpu")
    p.add_argument("--min-accuracy", type=float, default=95.0)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="a config override for every family (YAML value), e.g. distill.epochs=10")
    p.add_argument("--resume", action="store_true",
                   help="keep the families --out/results.json already has (but those stopped by a signal); an "
                        "interrupted one resumes its run")
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = json.loads((out / "results.json").read_text()) if args.resume and (out / "results.json").is_file() else []
    rows = [r for r in rows if r["exit"] >= 0]  # a run stopped by a signal is run again (it resumes)
    done = {r["family"] for r in rows}
    for name in [f.strip() for f in args.families.split(",") if f.strip() and f.strip() not in done]:
        rows.append(run_family(name, out, args.target, args.set))
        r = rows[-1]
        print(f"{name}: exit {r['exit']}, final {r['final_accuracy']}, teacher {r['teacher_accuracy']}, "
              f"{r['wall_s']:.0f} s", file=sys.stderr, flush=True)
        (out / "results.json").write_text(json.dumps(rows, indent=2))
        (out / "table.md").write_text(table(rows, args.min_accuracy) + "\n")  # so far, should the run stop
    md = table(rows, args.min_accuracy)
    print(md)
    return 0 if all(verdict(r, args.min_accuracy) in ("ok", "stopped (exit 3, one line)") for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
