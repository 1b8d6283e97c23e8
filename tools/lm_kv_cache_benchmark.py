#!/usr/bin/env python3
"""The KV cache copied each step against the cache kept in place, side by side on a finished causal-lm run
(an ONNX Runtime or OpenVINO target): the run's own artifacts (FP32 teacher, final student, speculative
draft), each loaded once and decoded both ways in one process, same threads, interleaved:

    copied    the past fed in and a new present (past + new) returned every step, as numpy arrays
    in place  ONNX Runtime: one buffer per layer bound as both past and present (IOBinding), the graph's
              kv_length says how many positions hold tokens: GroupQueryAttention writes the new keys and
              values into it. OpenVINO: the IR made stateful, the cache kept in the infer request's states

    decode tokens/s, TPOT p50   greedy decoding of the run's test prompts (the first prompt_tokens of test
                                blocks spread over eval.npz, as the run takes them); both ways give the same tokens
    speculative decoding        the draft for the teacher with the run's chosen setting and the student alone
                                (its draft length, no lookup), each against the teacher alone in the same mode

    python tools/lm_kv_cache_benchmark.py --run RUN_DIR [--prompts 20] [--new-tokens 64] [--prompt-tokens N]
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", required=True, type=Path, help="a finished causal-lm run on an ONNX Runtime or "
                   "OpenVINO target")
    p.add_argument("--prompts", type=int, default=20)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--prompt-tokens", type=int, default=None, help="the run's speculative.prompt_tokens unless given "
                   "(at most its seq_len): longer contexts make a copied cache costlier")
    args = p.parse_args()

    import numpy as np

    from edgekd.bench.lm_bench import generation_bench
    from edgekd.bench.lm_figures import decode_once, speculative_bench
    from edgekd.config.profiles import load_profile

    report = json.loads((args.run / "report.json").read_text())
    profile = load_profile(report["target"]["name"])
    if profile.backend not in ("onnxruntime", "openvino"):
        print(f"{args.run} was built for {profile.name} ({profile.backend}): this tool runs ONNX Runtime and "
              "OpenVINO targets", file=sys.stderr)
        return 2
    threads = int(report["target"].get("threads") or 2)
    spec = report["speculative"]
    blocks = {"teacher": report["teacher"], "final": report["final"], "draft": {**report["final"], **spec["draft"]}}
    prompt_tokens = args.prompt_tokens or int((report["config"].get("speculative") or {}).get("prompt_tokens") or 32)
    test = np.load(args.run / "eval.npz")["x"]
    rows = np.linspace(0, len(test) - 1, min(args.prompts, len(test))).round().astype(int)  # as the run takes them
    prompts = [test[int(i), :prompt_tokens].tolist() for i in rows]
    runners, decoders = [], {}
    try:
        for name, block in blocks.items():
            pair = _load_pair(args.run / block["artifact"], block, profile, threads, runners)
            if isinstance(pair, str):
                print(pair, file=sys.stderr)
                return 2
            decoders[f"{name}, copied"], decoders[f"{name}, in place"] = pair
        speed = generation_bench(decoders, prompts, args.new_tokens)
        chosen = (int(spec["draft_tokens"]), float(spec.get("min_confidence") or 0.0), bool(spec.get("lookup")))
        alone = [(int(c["draft_tokens"]), float(c.get("min_confidence") or 0.0), False)
                 for c in [spec, *spec.get("compared", [])] if not c.get("lookup") and int(c["draft_tokens"]) > 0]
        alone = alone[0] if alone else (chosen[0], chosen[1], False)  # the student alone: the run's own setting
        same = {name: all(decode_once(decoders[f"{name}, copied"], q, args.new_tokens)["tokens"]
                          == decode_once(decoders[f"{name}, in place"], q, args.new_tokens)["tokens"]
                          for q in prompts[:3]) for name in blocks}
        specs = {}
        for setting in dict.fromkeys([chosen, alone]):
            for mode in ("copied", "in place"):
                specs[(setting, mode)] = speculative_bench(decoders[f"teacher, {mode}"], decoders[f"draft, {mode}"],
                                                           prompts, args.new_tokens, *setting)
    finally:
        for r in runners:
            r.close()
    print(f"{len(prompts)} spread test prompts of {prompt_tokens} tokens, {args.new_tokens} new, {threads} threads, "
          f"interleaved ({report['target']['name']}, {profile.backend})\n")
    print("| decoder | copied: decode tokens/s | in place: decode tokens/s | in place / copied | TPOT p50 ms, "
          "copied / in place | same greedy tokens (3 prompts) |")
    print("|---|---:|---:|---:|---:|---:|")
    for name in blocks:
        a, b = speed[f"{name}, copied"], speed[f"{name}, in place"]
        print(f"| {name} ({blocks[name].get('precision', 'fp32')}) | {a['decode_tokens_per_s']:.1f} | "
              f"{b['decode_tokens_per_s']:.1f} | {b['decode_tokens_per_s'] / a['decode_tokens_per_s']:.3f}x | "
              f"{a['tpot_ms']['p50']:.2f} / {b['tpot_ms']['p50']:.2f} | "
              f"{'yes' if same[name] else 'NO'} |")
    print("\n| speculative setting | mode | tokens/s | teacher alone | speedup | acceptance | identical |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for (setting, mode), s in specs.items():
        label = f"up to {setting[0]}" + (f", p >= {setting[1]:g}" if setting[1] else "") + (" + lookup" if setting[2] else "")
        print(f"| {label} | {mode} | {s['tokens_per_s']:.1f} | {s['teacher_tokens_per_s']:.1f} | {s['speedup']:.3f}x | "
              f"{'—' if s['acceptance_rate'] is None else format(s['acceptance_rate'], '.1%')} | {s['identical']}/{s['prompts']} |")
    return 0


def _load_pair(path: Path, block: dict, profile, threads: int, runners: list):
    """(copying decoder, in-place decoder) for one artifact of the run, or the line saying why not; ONNX
    Runtime's sessions go into `runners` (closed by the caller)."""
    from types import SimpleNamespace

    from edgekd.lm.decode import Decoder, openvino_decoder

    precision, cfg = block.get("precision", "fp32"), SimpleNamespace(**block["decoder"])
    if profile.backend == "openvino":
        pair = tuple(openvino_decoder(path, cfg, threads, profile.device, precision, kv) for kv in ("copy", "auto"))
        return pair if pair[1].kv is not None else f"{path}: OpenVINO could not make the IR stateful"
    from edgekd.backends import Artifact, get_backend

    art = Artifact(path=path, backend="onnxruntime", precision=precision, files=[path])
    runners.append(get_backend("onnxruntime").load(art, profile, threads, spin=False))  # sessions take turns
    run = runners[-1]
    pair = (Decoder(run.run, cfg, cfg.num_hidden_layers),
            Decoder(run.run, cfg, cfg.num_hidden_layers, session=run.session))
    return pair if pair[1].kv is not None else (f"{path}: the graph does not take kv_length (exported before "
                                                "the in-place cache)")


if __name__ == "__main__":
    sys.exit(main())
