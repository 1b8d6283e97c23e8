"""Each distillation strategy against plain KD at an equal training budget on the embedded default
(torchvision resnet18 teacher trained once and cached, the default student or --student, digits at
32x32).

Equal budget means the same number of optimizer steps for the student: every strategy gets
--steps (default: the embedded default's distill.epochs over the training split); born_again splits
them evenly across its generations. Work beyond the student's steps is part of the strategy and is
in its wall time (mutual's peer, self's auxiliary heads, data_free's synthesis); one-time work
cached across runs (the teachers' training) is not, and is listed in the notes.

Accuracy: top-1 on the held-out test split, measured with ONNX Runtime (FP32, CPU provider) on
the exported student, as the report's distill stage does. Wall time: the distill stage from start to
the measured student, on this host. Prints a markdown table and writes it (and the raw metrics as
JSON) to --out.

    python tools/strategy_benchmarks.py [--steps N] [--strategies kd,self,...] [--threads 1] [--out DIR]
        [--config examples/fashion-mnist.yaml] [--federated-by-class]
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from edgekd.config import STRATEGIES, load_config  # noqa: E402
from edgekd.config.profiles import load_profile  # noqa: E402
from edgekd.context import RunContext  # noqa: E402
from edgekd.data import build_splits  # noqa: E402
from edgekd.models import student_from  # noqa: E402


def _notes(name: str, m: dict) -> str:
    """The strategy's own figures worth a glance, in a few words."""
    if name == "multi_teacher":
        return "teachers " + ", ".join(f"{t['model']} {t['accuracy']:.2f}% (w {t['weight']:.2f})"
                                       for t in m["teachers"]) + f"; ensemble {m['ensemble_accuracy']:.2f}%"
    if name == "self":
        return "aux exits (val, torch) " + ", ".join(f"{e['layer']} {e['val_accuracy_torch']:.1f}%" for e in m["exits"])
    if name == "born_again":
        gens = ", ".join(f"g{g['generation']} {g['accuracy']:.2f}%" for g in m["generations"])
        return f"{gens}; ensemble {m['ensemble_accuracy']:.2f}%; kept g{m['kept_generation']}"
    if name == "mutual":
        return f"peer {m['peer']['model']} {m['peer']['accuracy']:.2f}%"
    if name == "deit":
        return f"ViT student ({m['student_model'].removeprefix('DistilledViT ')}), {m.get('distillation')} targets"
    if name == "progressive":
        s = m["schedule"]
        return f"alpha {s[0]['alpha']}->{s[-1]['alpha']}, T {s[0]['temperature']:g}->{s[-1]['temperature']:g}"
    if name == "selective":
        return f"soft targets on {100 * m['soft_target_share']:.1f}% of samples (threshold {m['threshold']})"
    if name == "data_free":
        syn = m["synthesis"]
        return (f"{syn['samples']} synthetic inputs, {syn['seconds']:.0f} s synthesis, BN loss "
                f"{syn['bn_loss_first']:.2f}->{syn['bn_loss_last']:.2f}; no training images")
    if name == "adversarial":
        last = m["discriminator"]["per_epoch"][-1] if m["discriminator"]["per_epoch"] else {}
        return (f"weight {m['weight']}; last epoch: discriminator right on {100 * last.get('discriminator_accuracy', 0):.0f}%, "
                f"student taken for the teacher on {100 * last.get('fooled', 0):.0f}%")
    if name == "cross_modal":
        si = m["student_input"]
        return f"student input {si['shape']} (teacher {si['teacher_shape']}): {si['transform'].split(':')[0]}"
    if name == "federated":
        return (f"{m['clients']} clients ({m['partition']}), {m['rounds']} rounds x {m['local_epochs']} local epoch(s), "
                f"best round {m['chosen_round']}")
    return f"T {m.get('temperature')}, alpha {m.get('alpha')}"


def run_one(name: str, steps: int, out: Path, teacher: torch.nn.Module, splits, student_model: str | None,
            config: str | None = None, options: dict | None = None) -> dict:
    """Distil the student (the embedded default's unless named) with strategy `name` for `steps` student
    optimizer steps."""
    from edgekd.distill.stage import run_distill

    distill: dict = {"strategy": name, "steps": steps}
    if name == "cross_modal" and not options:  # a greyscale sensor at half the teacher's resolution
        options = {"greyscale": True, "resolution": load_config(config).data.image_size // 2}
    if options:
        distill["strategy_options"] = {name: options}
    if name == "born_again":
        gens = load_config(config).distill.strategy_options.born_again.generations
        distill["steps"] = max(1, steps // gens)
    overrides: dict = {"stages": ["distill"], "distill": distill}
    if student_model:
        overrides["student"] = {"model": student_model}
    cfg = load_config(config, overrides)
    ctx = RunContext(cfg, load_profile("cpu"), out / name, threads=1)
    ctx.splits = splits
    torch.manual_seed(cfg.seed)
    student = student_from(cfg.student.model, teacher, splits.num_classes)
    if name == "cross_modal":  # the student takes the cheaper input: built for it, as the pipeline does
        from edgekd.distill.strategies.cross_modal import prepare_student

        prepare_student(ctx, student, splits.input_shape)
    t0 = time.perf_counter()
    _, m = run_distill(ctx, teacher, student, name)
    m["wall_s"] = round(time.perf_counter() - t0, 1)
    return m


def prepare(ctx: RunContext, teacher: torch.nn.Module, names: list[str]) -> dict:
    """One-time work cached across runs, done before the timed runs so that none of them pays for it:
    the teacher's logits on the training views and multi_teacher's extra teachers."""
    from edgekd.distill.cache import TeacherLogitCache
    from edgekd.distill.trainer import AUG_DRAWS, augmented_views

    cfg, splits = ctx.config, ctx.splits
    t0 = time.perf_counter()
    TeacherLogitCache(teacher, augmented_views(splits.train.x, cfg.seed, AUG_DRAWS, cfg.data.augment),
                      topk=cfg.distill.cache_topk)
    done = {"teacher_logits_s": time.perf_counter() - t0}
    if "multi_teacher" in names:
        from edgekd.distill.strategies.multi_teacher import extra_teacher

        t0 = time.perf_counter()
        for i, spec in enumerate(cfg.distill.strategy_options.multi_teacher.teachers):
            extra_teacher(ctx, spec, i)
        done["extra_teachers_s"] = time.perf_counter() - t0
    return done


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=None, help="student optimizer steps (default: distill.epochs "
                                                               "of the embedded default over the training split)")
    parser.add_argument("--strategies", default=",".join(STRATEGIES), help="comma-separated, kd included")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 keeps timings steady on a shared CPU)")
    parser.add_argument("--out", default="runs/strategy-benchmarks")
    parser.add_argument("--student", default=None, help="student model spec (default: the embedded default's)")
    parser.add_argument("--config", default=None, help="a run config (e.g. examples/fashion-mnist.yaml) instead of "
                                                       "the embedded default: its data, teacher and student")
    parser.add_argument("--federated-by-class", action="store_true",
                        help="also run federated with shards non-IID by class (2 classes per client)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cfg = load_config(args.config)
    splits = build_splits(cfg.data, cfg.seed)
    steps = args.steps or cfg.distill.epochs * math.ceil(len(splits.train) / cfg.data.batch_size)
    from edgekd.distill.teacher import get_teacher

    ctx = RunContext(cfg, load_profile("cpu"), out / "teacher", threads=1)
    ctx.splits = splits
    t0 = time.perf_counter()
    teacher, info = get_teacher(ctx)
    teacher_s = time.perf_counter() - t0
    names = [s.strip() for s in args.strategies.split(",") if s.strip()]
    unknown = [n for n in names if n not in STRATEGIES]
    if unknown:
        parser.error(f"unknown strategy {unknown[0]!r} (known: {', '.join(STRATEGIES)})")
    warm = prepare(ctx, teacher, names)
    results: dict[str, dict] = {}
    for name in names:
        print(f"running {name} ...", file=sys.stderr, flush=True)
        results[name] = run_one(name, steps, out, teacher, splits, args.student, args.config)
        (out / "metrics.json").write_text(json.dumps(results, indent=1, default=str))
        if name == "federated" and args.federated_by_class:
            results["federated (by class)"] = run_one(name, steps, out / "by-class", teacher, splits, args.student,
                                                      args.config, {"partition": "by_class"})
            (out / "metrics.json").write_text(json.dumps(results, indent=1, default=str))
    kd = results.get("kd", {}).get("accuracy")
    teacher_acc = next(iter(results.values()))["teacher_accuracy"] if results else None
    lines = [f"{cfg.name if args.config else 'Embedded default'}: teacher {cfg.teacher.model} ({teacher_acc:.2f}% test, ONNX Runtime; "
             f"{info['source'].split(',')[0]}), student {args.student or cfg.student.model}, {cfg.data.dataset} "
             f"{cfg.data.image_size}x{cfg.data.image_size}, {len(splits.train)} training / {len(splits.test)} "
             f"test images, {steps} student optimizer steps each, {args.threads} torch thread(s), "
             f"seed {cfg.seed}.", "",
             "| strategy | test accuracy (ORT) | vs KD | wall time | student steps | notes |",
             "|---|---:|---:|---:|---:|---|"]
    for name, m in results.items():
        delta = "" if kd is None or name == "kd" else f"{m['accuracy'] - kd:+.2f}"
        lines.append(f"| {name} | {m['accuracy']:.2f}% | {delta} | {m['wall_s']:.0f} s | {m['steps']} | "
                     f"{_notes(m.get('strategy', name), m)} |")
    lines += ["", f"Outside the wall times (one-time, cached): the teacher ({teacher_s:.0f} s, "
              f"{info['source'].split(',')[0]}), its logits on the training views ({warm['teacher_logits_s']:.0f} s, "
              f"shared by every strategy that reads them), and multi_teacher's extra teacher(s) "
              f"({warm.get('extra_teachers_s', 0):.0f} s)."]
    table = "\n".join(lines)
    (out / "table.md").write_text(table + "\n")
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
