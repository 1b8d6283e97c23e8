"""The student search against edge_cnn scaled down by hand, at a latency budget of half edge_cnn's p50.

1. edge_cnn (FP32) is timed on this host's ONNX Runtime (the cpu target), interleaved rounds, with the
   run's threads (bench.threads); the budget is --fraction (default half) of its p50.
2. `student.model: search` over its default space (edge_cnn and small_cnn in width, depth and kernel size)
   at that budget, then the chosen student distilled in full.
3. The hand-scaled baseline: edge_cnn scaled down the way a user would by hand, narrower (the widths
   below) and shallower (three convs instead of five), timed the same way; the largest that fits the
   same budget is distilled with the same settings.

Both final students are reported with their test accuracy (ONNX Runtime, held-out test split) and their
p50 from the run's own interleaved bench; the search's wall time is its stage's duration.

    python tools/search_benchmark.py --config examples/fashion-mnist.yaml [--epochs 15] [--threads 1]
                                     [--fraction 0.5] [--proxy-epochs N] [--out DIR]
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from edgekd import Pipeline, load_config  # noqa: E402

HAND_WIDTHS = [0.25, 0.375, 0.5, 0.625, 0.75, 0.875, 1.0]


def edge_cnn_p50(cfg, out: Path, threads: int) -> float:
    """edge_cnn's p50 (ms) on this host's ONNX Runtime at batch 1, interleaved rounds, the run's threads."""
    from edgekd.bench.measure import bench_interleaved
    from edgekd.export import export_onnx, host_session
    from edgekd.models import build_model

    size = cfg.data.image_size
    path = out / "edge_cnn.onnx"
    export_onnx(build_model("edge_cnn", 10).eval(), (3, size, size), path, 17)
    runner = host_session(path, threads)
    try:
        res = bench_interleaved({"edge_cnn": runner}, torch.zeros(1, 3, size, size).numpy(), 50, 2000)
    finally:
        runner.close()
    return float(res["edge_cnn"]["p50"])


def run(config: str | None, out: Path, search: dict, epochs: int | None, threads: int | None) -> dict:
    overrides: dict = {"stages": ["distill"], "student": {"model": "search", "search": search},
                       "bench": {"threads": threads}}
    if epochs is not None:
        overrides["distill"] = {"epochs": epochs}
    cfg = load_config(config, overrides)
    t0 = time.perf_counter()
    rep = Pipeline(cfg, out=out).run()
    s = next(st for st in rep["stages"] if st["name"] == "search")
    d = next(st for st in rep["stages"] if st["name"] == "distill")
    f = rep["final"]
    return {"chosen": s["chosen"], "budget_ms": s["budget_ms"], "search_seconds": s["duration_s"],
            "candidates": len(s["candidates"]), "within_budget": sum(c["within_budget"] for c in s["candidates"]),
            "proxy": {c["architecture"]: c["proxy_accuracy"] for c in s["candidates"] if c["proxy_accuracy"] is not None},
            "chosen_search_p50": next(c["latency_ms"] for c in s["candidates"] if c["chosen"]),
            "params": d["params"], "macs": d["macs"], "accuracy": f["accuracy"],
            "final_p50": (f.get("latency_ms") or {}).get("p50"), "teacher_accuracy": rep["teacher"]["accuracy"],
            "wall_seconds": round(time.perf_counter() - t0, 1)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default=None, help="a run config (default: the embedded default)")
    p.add_argument("--epochs", type=int, default=None, help="distill.epochs of both final students")
    p.add_argument("--threads", type=int, default=None,
                   help="ONNX Runtime threads for every timing (bench.threads; default: the usable cores)")
    p.add_argument("--proxy-epochs", type=int, default=None, help="student.search.proxy_epochs (default: its default)")
    p.add_argument("--fraction", type=float, default=0.5, help="the budget as this fraction of edge_cnn's p50")
    p.add_argument("--out", type=Path, default=Path("runs/search-benchmark"))
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    cfg = load_config(args.config)
    from edgekd.context import usable_cores

    threads = args.threads or usable_cores()
    p50 = edge_cnn_p50(cfg, args.out, threads)
    budget = round(p50 * args.fraction, 5)
    print(f"edge_cnn p50 {p50:.4f} ms on this host's ONNX Runtime ({threads} threads): budget {budget:.4f} ms",
          file=sys.stderr, flush=True)
    proxy = {} if args.proxy_epochs is None else {"proxy_epochs": args.proxy_epochs}
    searched = run(args.config, args.out / "search", {"latency_budget_ms": budget, **proxy}, args.epochs, threads)
    hand = run(args.config, args.out / "hand", {"latency_budget_ms": budget, "space": ["edge_cnn"],
                                                "widths": HAND_WIDTHS, "depths": [0.6, 1], "kernels": [3],
                                                "trials": 1, **proxy}, args.epochs, threads)
    results = {"edge_cnn_p50_ms": p50, "budget_ms": budget, "threads": threads, "search": searched,
               "hand_scaled_edge_cnn": hand}
    (args.out / "results.json").write_text(json.dumps(results, indent=1))
    print(f"\nBudget: {args.fraction:g} x edge_cnn's p50 ({p50:.4f} ms) = {budget:.4f} ms "
          f"(onnxruntime, {threads} threads, this host)\n")
    print("| student | architecture | params | MACs | p50 in the search | p50 final (run's bench) | "
          "test accuracy | search time |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for label, r in (("searched", searched), ("edge_cnn scaled by hand", hand)):
        print(f"| {label} | {r['chosen']} | {r['params']:,} | {r['macs']:,} | {r['chosen_search_p50']:.4f} ms | "
              f"{r['final_p50']:.4f} ms | {r['accuracy']:.2f}% | {r['search_seconds']:.0f} s |")
    print(f"\nteacher {searched['teacher_accuracy']:.2f}%; {searched['candidates']} candidates, "
          f"{searched['within_budget']} within budget; proxy accuracies: {searched['proxy']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
