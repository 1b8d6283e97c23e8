#!/usr/bin/env python3
"""The plain and the fused-attention ONNX decoders of a finished causal-lm run, side by side in ONNX Runtime:
the run's distilled student (INT8 weights, as the run quantizes them) and its teacher (FP32), each exported
both ways (edgekd.lm.export: plain operators, or one GroupQueryAttention node per layer), then in one
process, same threads, sessions that take turns as in the pipeline:

    decode tokens/s, TPOT p50, prefill tokens/s   greedy decoding of the run's test prompts (the first
                                                  prompt_tokens of its test blocks, eval.npz), interleaved
    perplexity                                    over the first test blocks (both graphs must agree)
    speculative decoding                          the student drafting for the teacher, each pair in its own
                                                  form, with the run's chosen draft length and floor

    python tools/lm_attention_benchmark.py --run RUN_DIR [--prompts 8] [--new-tokens 64] [--blocks 16]
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def student_and_teacher(run: Path, report: dict):
    """The run's teacher and its distilled student (torch), rebuilt with edgekd's own code."""
    import torch

    from edgekd.config import from_dict
    from edgekd.lm.models import build_lm_student, load_lm

    cfg = from_dict(report["config"], f"{run}/report.json config")
    teacher = load_lm(cfg.teacher.model).model.eval()
    student, _ = build_lm_student(teacher, cfg.student.lm_sizes(), cfg.student.init, cfg.seed)
    student.load_state_dict(torch.load(run / "stages" / "distill" / "model.pt", weights_only=True))
    return student.eval(), teacher


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", required=True, type=Path, help="a finished causal-lm run on an ONNX Runtime target")
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--blocks", type=int, default=16)
    args = p.parse_args()

    import numpy as np
    import torch

    from edgekd.backends import Artifact, get_backend
    from edgekd.bench.lm_bench import generation_bench, speculative_bench
    from edgekd.config.profiles import load_profile
    from edgekd.lm.decode import Decoder
    from edgekd.lm.export import export_lm_onnx
    from edgekd.quantize.lm_weights import quantize_lm_weights

    report = json.loads((args.run / "report.json").read_text())
    threads = int(report["target"].get("threads") or 2)
    torch.set_num_threads(threads)
    student, teacher = student_and_teacher(args.run, report)
    profile, backend = load_profile("cpu"), get_backend("onnxruntime")
    spec = report.get("speculative") or {}
    pair = (int(spec.get("draft_tokens") or 2), float(spec.get("min_confidence") or 0.0))
    blocks = np.load(args.run / "eval.npz")["x"]
    prompt_tokens = int((report["config"].get("speculative") or {}).get("prompt_tokens") or 32)
    prompts = [blocks[i, :prompt_tokens].tolist() for i in range(args.prompts)]
    decoders, runners = {}, []
    with tempfile.TemporaryDirectory(prefix="edgekd-attn-") as tmp:
        work = Path(tmp)
        for form in ("plain", "fused"):
            fused = form == "fused"
            s = export_lm_onnx(student, work / f"student-{form}.onnx", fused=fused)
            paths = {f"student INT8, {form}": (quantize_lm_weights(s, work / f"student-{form}.int8.onnx", "int8"),
                                               student.config),
                     f"teacher FP32, {form}": (export_lm_onnx(teacher, work / f"teacher-{form}.onnx", fused=fused),
                                               teacher.config)}
            for name, (path, config) in paths.items():
                art = Artifact(path=path, backend="onnxruntime", precision="fp32", files=[path])
                runners.append(backend.load(art, profile, threads, spin=False))
                decoders[name] = Decoder(runners[-1].run, config, config.num_hidden_layers)
        try:
            ppl = {n: d.perplexity(blocks[:args.blocks]) for n, d in decoders.items()}
            speed = generation_bench(decoders, prompts, args.new_tokens)
            specs = {form: speculative_bench(decoders[f"teacher FP32, {form}"], decoders[f"student INT8, {form}"],
                                             prompts, args.new_tokens, *pair) for form in ("plain", "fused")}
        finally:
            for r in runners:
                r.close()
    print(f"{args.prompts} test prompts of {prompt_tokens} tokens, {args.new_tokens} new, {threads} threads, "
          f"interleaved; perplexity over {args.blocks} test blocks\n")
    print("| decoder | decode tokens/s | fused / plain | TPOT p50 ms | prefill tokens/s | perplexity |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, fig in speed.items():
        other = speed[name.replace("fused", "plain")]["decode_tokens_per_s"]
        ratio = f"{fig['decode_tokens_per_s'] / other:.2f}x" if name.endswith("fused") else ""
        print(f"| {name} | {fig['decode_tokens_per_s']:.1f} | {ratio} | {fig['tpot_ms']['p50']:.2f} | "
              f"{fig['prefill_tokens_per_s']:.0f} | {ppl[name]:.4f} |")
    print(f"\nspeculative decoding, up to {pair[0]} draft tokens, floor {pair[1]:g}:")
    for form, s in specs.items():
        print(f"  {form}: {s['tokens_per_s']:.1f} against {s['teacher_tokens_per_s']:.1f} tokens/s for the teacher "
              f"alone, {s['speedup']:.3f}x, {s['identical']}/{s['prompts']} identical")
    return 0


if __name__ == "__main__":
    sys.exit(main())
