"""Measure what distillation earns on the embedded default (the figures BENCHMARKS.md records).

  (a) default budget, `stages: [distill]`: the KD student (config temperature/alpha) against the same
      student with alpha 0 (distill.baseline: the no-KD twin from the same initial weights at the same
      optimizer steps), accuracies measured with ONNX Runtime on the held-out test split; mean over
      seeds, and the share of the teacher-student gap recovered.
  (b) data.labeled_fraction 0.1: KD over all training images against the same student on the labeled
      10% alone at equal optimizer steps (distill.steps); mean over seeds. The teacher is the one from
      (a), trained on the fully labeled training split: a teacher that already exists, while the site's
      own data is mostly unlabeled.
  (c) a KD epoch (teacher logits from the cache) against a no-KD epoch of the same student: the medians
      of epoch_seconds from (a), and the same measured in interleaved rounds (KD, no-KD, KD, ...).

    python tools/distill_benchmarks.py [--seeds 0 1 2] [--parts a b c] [--out runs/distill-bench]
                                       [--config FILE] [--labeled-fraction F] [--steps N]
                                       [--teacher-epochs N] [--set KEY=VALUE ...]

  --config: a run config (e.g. examples/fashion-mnist.yaml) every part starts from instead of the
  embedded default; its stages are replaced by [distill].
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from edgekd import Pipeline  # noqa: E402
from edgekd.config import assign, from_dict  # noqa: E402

BENCH = {"iterations": 50, "warmup": 5}  # the stages' latency is not what this measures


def _distill_entry(report: dict) -> dict:
    return next(s for s in report["stages"] if s["name"] == "distill")


EXTRA: dict = {}  # --set KEY=VALUE assignments, merged into every part's config


def _merged(raw: dict) -> dict:
    """`raw` with the --set assignments applied on top (nested keys merge)."""
    def merge(a: dict, b: dict) -> dict:
        out = dict(a)
        for k, v in b.items():
            out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
        return out

    return merge(raw, EXTRA)


def _run(raw: dict, out: Path, force: dict | None = None) -> dict:
    merged = _merged(raw)
    for section, values in (force or {}).items():  # what a part must have whatever --config/--set say
        merged[section] = {**merged.get(section, {}), **values}
    cfg = from_dict(merged, "benchmark config")
    t0 = time.perf_counter()
    d = _distill_entry(Pipeline(cfg, out=out).run())
    row = {k: d.get(k) for k in ("accuracy", "baseline_accuracy", "teacher_accuracy", "gap_recovered",
                                 "kd_gain", "temperature", "alpha", "steps", "baseline_steps", "agreement")}
    row["kd_epoch_s"] = statistics.median(d["epoch_seconds"])
    row["base_epoch_s"] = statistics.median(d["baseline_epoch_seconds"])
    row["kd_samples"] = d["transfer_set"]["used_by_student"]
    row["base_samples"] = d["baseline_samples"]
    row["wall_s"] = round(time.perf_counter() - t0, 1)
    print(f"  {out.name}: {json.dumps(row)}", flush=True)
    return row


def _mean(rows: list[dict], key: str) -> float:
    return round(statistics.mean(r[key] for r in rows), 3)


def _teacher(epochs: int | None) -> dict:
    return {} if epochs is None else {"teacher": {"train_epochs": epochs}}


def part_a(seeds: list[int], out: Path, teacher_epochs: int | None = None) -> dict:
    """KD vs alpha 0 at the embedded default's budget."""
    rows = [_run({"name": f"kd-default-s{s}", "seed": s, "stages": ["distill"], "bench": BENCH,
                  "distill": {"baseline": True}, **_teacher(teacher_epochs)}, out / f"a-seed{s}") for s in seeds]
    kd, base, teacher = (_mean(rows, k) for k in ("accuracy", "baseline_accuracy", "teacher_accuracy"))
    gap = round(100 * (kd - base) / (teacher - base), 1) if teacher > base else None
    ratios = [r["kd_epoch_s"] / r["base_epoch_s"] for r in rows]
    return {"rows": rows, "kd_accuracy": kd, "no_kd_accuracy": base, "teacher_accuracy": teacher,
            "kd_minus_no_kd": round(kd - base, 3), "gap_recovered_of_means": gap,
            "epoch_time_ratio_median": round(statistics.median(ratios), 3)}


def default_teacher_checkpoint(out: Path, teacher_epochs: int | None = None) -> Path:
    """The embedded default's teacher (trained on the fully labeled training split), as a state_dict file."""
    import torch

    from edgekd.config.profiles import load_profile
    from edgekd.context import RunContext
    from edgekd.data import build_splits
    from edgekd.distill.teacher import get_teacher

    raw = _merged(_teacher(teacher_epochs))
    cfg = from_dict({k: raw[k] for k in ("teacher", "data", "student") if k in raw})
    ctx = RunContext(cfg, load_profile("cpu"), out / "teacher")
    ctx.splits = build_splits(cfg.data, cfg.seed)
    teacher, _ = get_teacher(ctx)
    path = out / "teacher-full-labels.pt"
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(teacher.state_dict(), path)
    return path


def part_b(seeds: list[int], out: Path, steps: int, teacher_epochs: int | None = None,
           fraction: float = 0.1) -> dict:
    """labeled_fraction F: KD on all images vs the labeled share alone, equal optimizer steps."""
    ckpt = default_teacher_checkpoint(out, teacher_epochs)
    rows = [_run({"name": f"kd-transfer-s{s}", "seed": s, "stages": ["distill"], "bench": BENCH,
                  "data": {"labeled_fraction": fraction}, "teacher": {"checkpoint": str(ckpt)},
                  "distill": {"baseline": True, "steps": steps}}, out / f"b-seed{s}",
                 force={"teacher": {"checkpoint": str(ckpt), "train_epochs": 0}}) for s in seeds]
    kd, base = _mean(rows, "accuracy"), _mean(rows, "baseline_accuracy")
    return {"rows": rows, "steps": steps, "labeled_fraction": fraction, "kd_all_images_accuracy": kd, "labeled_only_accuracy": base,
            "gain_points": round(kd - base, 3), "teacher": "embedded default teacher, fully labeled training split"}


def part_c(out: Path, rounds: int, teacher_epochs: int | None = None) -> dict:
    """Interleaved KD and no-KD epochs of the default student (teacher logits cached)."""
    import copy

    import torch

    from edgekd.config.profiles import load_profile
    from edgekd.context import RunContext
    from edgekd.data import build_splits
    from edgekd.distill.cache import TeacherLogitCache
    from edgekd.distill.teacher import get_teacher
    from edgekd.distill.trainer import augmented_views, kd_draws, train
    from edgekd.models import build_model

    cfg = from_dict(_merged(_teacher(teacher_epochs)))
    ctx = RunContext(cfg, load_profile("cpu"), out / "teacher")
    ctx.splits = splits = build_splits(cfg.data, cfg.seed)
    teacher, _ = get_teacher(ctx)
    views = augmented_views(splits.train.x, cfg.seed, kd_draws(splits.train.x), cfg.data.augment)
    cache = TeacherLogitCache(teacher, views)
    torch.manual_seed(0)
    kd_model = build_model(cfg.student.model, splits.num_classes)
    ce_model = copy.deepcopy(kd_model)
    d = cfg.distill
    kd_s, ce_s = [], []
    for r in range(rounds + 1):
        kd = train(kd_model, splits.train, splits.val, epochs=1, lr=d.lr, seed=r, teacher=teacher,
                   temperature=d.temperature, alpha=d.alpha, cache=cache)
        ce = train(ce_model, splits.train, splits.val, epochs=1, lr=d.lr, seed=r, views=views)
        if r > 0:  # the first round warms up allocators and kernels
            kd_s.append(kd.epoch_seconds[0])
            ce_s.append(ce.epoch_seconds[0])
    ratio = statistics.median(kd_s) / statistics.median(ce_s)
    return {"rounds": rounds, "kd_epoch_s": [round(s, 4) for s in kd_s], "no_kd_epoch_s": [round(s, 4) for s in ce_s],
            "kd_epoch_median_s": round(statistics.median(kd_s), 4),
            "no_kd_epoch_median_s": round(statistics.median(ce_s), 4), "ratio": round(ratio, 3),
            "teacher_cache_seconds": round(cache.seconds, 3), "cache_hit": cache.hit}


def main(argv: list[str] | None = None) -> int:
    """Run the chosen parts, print each figure and write OUT/results.json."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--parts", nargs="+", choices=["a", "b", "c"], default=["a", "b", "c"])
    p.add_argument("--out", type=Path, default=Path("runs/distill-bench"))
    p.add_argument("--steps", type=int, default=510, help="optimizer steps for (b); 510 = the default's 30 epochs")
    p.add_argument("--rounds", type=int, default=8, help="interleaved rounds for (c)")
    p.add_argument("--teacher-epochs", type=int, default=None,
                   help="teacher.train_epochs for every part (default: the embedded default's)")
    p.add_argument("--config", type=Path, help="a run config every part starts from (default: the embedded one)")
    p.add_argument("--labeled-fraction", type=float, default=0.1, help="data.labeled_fraction for (b)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="config assignment for every part, e.g. student.model=small_cnn (YAML values)")
    args = p.parse_args(argv)
    if args.config is not None:
        import yaml

        base = yaml.safe_load(args.config.read_text()) or {}
        base.pop("stages", None)
        base.pop("name", None)
        base.pop("seed", None)
        EXTRA.update(base)
    assign(EXTRA, args.set)
    results: dict = {"seeds": args.seeds, "teacher_epochs": args.teacher_epochs, "set": args.set,
                     "config": str(args.config) if args.config else None}
    path = args.out / "results.json"
    args.out.mkdir(parents=True, exist_ok=True)
    if "a" in args.parts:
        print("(a) embedded default, KD vs alpha 0", flush=True)
        results["a"] = a = part_a(args.seeds, args.out, args.teacher_epochs)
        print(f"(a) KD {a['kd_accuracy']:.2f}% vs no KD {a['no_kd_accuracy']:.2f}% (teacher {a['teacher_accuracy']:.2f}%):"
              f" {a['kd_minus_no_kd']:+.2f} points, gap recovered {a['gap_recovered_of_means']}%,"
              f" KD/no-KD epoch time {a['epoch_time_ratio_median']}x", flush=True)
        path.write_text(json.dumps(results, indent=2))
    if "b" in args.parts:
        print(f"(b) labeled_fraction {args.labeled_fraction}, KD on all images vs the labeled share alone", flush=True)
        results["b"] = b = part_b(args.seeds, args.out, args.steps, args.teacher_epochs, args.labeled_fraction)
        print(f"(b) KD over all images {b['kd_all_images_accuracy']:.2f}% vs labeled only "
              f"{b['labeled_only_accuracy']:.2f}% at {b['steps']} steps: {b['gain_points']:+.2f} points", flush=True)
        path.write_text(json.dumps(results, indent=2))
    if "c" in args.parts:
        print("(c) KD epoch vs no-KD epoch, interleaved", flush=True)
        results["c"] = c = part_c(args.out, args.rounds, args.teacher_epochs)
        print(f"(c) KD epoch {c['kd_epoch_median_s']}s vs no-KD epoch {c['no_kd_epoch_median_s']}s: "
              f"{c['ratio']}x", flush=True)
        path.write_text(json.dumps(results, indent=2))
    print(f"results: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
