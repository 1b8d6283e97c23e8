#!/usr/bin/env python3
"""Causal-LM distillation side by side: the same student (same initial weights, same batches, same steps)
trained with forward KL, reverse KL, generalized JSD, sequence-level KD (cross-entropy on the training
blocks as the teacher continues them), on-policy GKD steps, and next-token cross-entropy alone, each for
every seed; test perplexity of each exported FP32 decoder through ONNX Runtime, and how much lower the KD
students' perplexity is than the cross-entropy student's.

    python tools/lm_distill_benchmark.py --config examples/smollm2.yaml --seeds 0 1

The teacher's top-k cache is the one `edgekd compress` builds (the user cache), so a run after compress
reuses it. Prints a Markdown table and writes results.json under --out."""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

LOSSES = ("forward_kl", "reverse_kl", "jsd", "sequence", "on_policy", "ce")
DEFAULT_LOSSES = ("forward_kl", "reverse_kl", "jsd", "sequence", "ce")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", type=Path, default=ROOT / "examples" / "smollm2.yaml")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--losses", nargs="+", choices=LOSSES, default=list(DEFAULT_LOSSES))
    p.add_argument("--sequence-tokens", type=int, help="tokens the teacher writes per block for sequence-level KD "
                   "(default: distill.sequence_kd, else half of data.seq_len)")
    p.add_argument("--steps", type=int, help="optimizer steps for every student (default: the config's)")
    p.add_argument("--layers-from", type=Path, metavar="RUN_DIR",
                   help="copy the teacher layers a finished compress run chose (its report's distill init) "
                        "instead of choosing them again")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", type=Path, default=ROOT / "runs" / "lm-distill-bench")
    args = p.parse_args(argv)

    import torch

    from edgekd.backends import get_backend
    from edgekd.config import load_config
    from edgekd.config.profiles import load_profile
    from edgekd.context import RunContext, usable_cores
    from edgekd.distill.lm_sequence import sequence_kd_blocks
    from edgekd.distill.lm_stage import lm_steps, teacher_topk_cache
    from edgekd.distill.lm_trainer import lm_amp, train_lm
    from edgekd.lm.decode import Decoder
    from edgekd.lm.entry import LAYER_CHOICE_BLOCKS, LAYER_CHOICE_TOKENS, _splits
    from edgekd.lm.export import export_lm_onnx
    from edgekd.lm.models import build_lm_student, choose_layers, load_lm
    from edgekd.runs import hash_arrays

    cfg = load_config(args.config)
    if cfg.task != "causal-lm":
        sys.exit(f"{args.config}: not a causal-lm config")
    args.out.mkdir(parents=True, exist_ok=True)
    threads = args.threads or usable_cores()
    profile = load_profile("cpu")
    ctx = RunContext(cfg, profile, args.out, threads=threads)
    lm = load_lm(cfg.teacher.model)
    teacher = lm.model
    for q in teacher.parameters():
        q.requires_grad_(False)
    teacher_key = hash_arrays(*[t.detach().numpy() for t in teacher.state_dict().values()])
    splits = _splits(ctx, lm.tokenizer)
    steps = args.steps or lm_steps(ctx, splits)
    # every row trains on the same blocks: with --steps below one pass, the first `steps` batches (one pass
    # each), so the teacher's cache and its sequence-KD text cover only what is trained on
    train = splits.train.ids[:steps * cfg.data.batch_size]
    amp = lm_amp(cfg.distill.precision)  # the autocast the distill stage trains under, and its cache's key
    cache, info = teacher_topk_cache(ctx, teacher, teacher_key, splits, train, amp)
    print(f"teacher cache: {info}", file=sys.stderr)
    sizes = cfg.student.lm_sizes()
    layers = None  # the teacher layers the student copies: chosen as `edgekd compress` chooses them
    if args.layers_from:
        report = json.loads((args.layers_from / "report.json").read_text())
        layers = next(st for st in report["stages"] if st["name"] == "distill")["init"]["layers_from_teacher"]
        print(f"teacher layers kept (from {args.layers_from}): {layers}", file=sys.stderr)
    elif cfg.student.init == "teacher" and cfg.student.layer_choice == "greedy" and set(sizes) == {"layers"}:
        layers, _ = choose_layers(teacher, sizes["layers"], splits.val.ids[:LAYER_CHOICE_BLOCKS, :LAYER_CHOICE_TOKENS])
        print(f"teacher layers kept: {layers}", file=sys.stderr)
    seq_blocks = None
    if "sequence" in args.losses:
        n = args.sequence_tokens or cfg.distill.sequence_kd or splits.seq_len // 2
        seq_blocks, seq_info = sequence_kd_blocks(teacher, teacher_key, train, n)
        print(f"sequence-KD blocks: {seq_info}", file=sys.stderr)
    backend = get_backend("onnxruntime")
    test = splits.test.ids.numpy()
    rows = []
    for seed in args.seeds:
        for loss in args.losses:
            student, _ = build_lm_student(teacher, sizes, cfg.student.init, seed, layers=layers)
            t0 = time.perf_counter()
            kind = loss if loss in ("forward_kl", "reverse_kl", "jsd") else cfg.distill.loss
            plain = loss in ("ce", "sequence")  # cross-entropy alone, on the text or on the teacher's text
            res = train_lm(student, seq_blocks if loss == "sequence" else train, splits.val.ids,
                           steps=steps, lr=cfg.distill.lr, batch_size=cfg.data.batch_size, seed=seed, kind=kind,
                           alpha=0.0 if plain else cfg.distill.alpha, temperature=cfg.distill.temperature,
                           beta=cfg.distill.beta, cache=None if plain else cache,
                           on_policy=(cfg.distill.on_policy or 0.5) if loss == "on_policy" else 0.0,
                           policy_teacher=teacher if loss == "on_policy" else None,
                           policy_tokens=cfg.distill.sequence_kd or splits.seq_len // 4, amp=amp)
            seconds = time.perf_counter() - t0
            onnx = export_lm_onnx(student.eval(), args.out / f"{loss}-{seed}" / "model.onnx")
            art = backend.compile(onnx, profile, args.out / f"{loss}-{seed}" / "compiled", "fp32")
            runner = backend.load(art, profile, threads)
            try:
                ppl = Decoder(runner.run, student.config, student.config.num_hidden_layers).perplexity(test)
            finally:
                runner.close()
            rows.append({"seed": seed, "loss": loss, "steps": steps, "test_perplexity": round(ppl, 4),
                         "val_perplexity": round(res.val_perplexity, 4), "train_seconds": round(seconds, 1)})
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
            (args.out / "results.json").write_text(json.dumps(rows, indent=2))
            del student
            torch.set_num_threads(usable_cores())
    mean = {loss: sum(r["test_perplexity"] for r in rows if r["loss"] == loss) / len(args.seeds)
            for loss in args.losses}
    print(f"| loss | test perplexity (mean of seeds {', '.join(map(str, args.seeds))}) | vs cross-entropy alone |")
    print("|---|---:|---:|")
    for loss in args.losses:
        vs = ""
        if "ce" in mean and loss != "ce":
            lower = 100 * (1 - mean[loss] / mean["ce"])
            vs = f"{lower:.1f}% lower" if lower >= 0 else f"{-lower:.1f}% higher"
        print(f"| {loss} | {mean[loss]:.3f} | {vs} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
