#!/usr/bin/env python3
"""Speculative decoding with the draft's LM head cut to N tokens, side by side in one process: a finished
`edgekd compress` causal-lm run on an ONNX Runtime target, its final decoder cut (edgekd.lm.draft_vocab) to
the N tokens most frequent in the run's training split for every N asked (0: the whole vocabulary), each
drafting for the run's FP32 teacher, and the teacher alone, all timed in the same rounds:

    tokens/s     greedy generation of the run's test prompts (spread over the test split as the run takes
                 them, or with --first its first blocks), the same new tokens for every run, every prompt
                 by every drafting setting in an order that rotates from prompt to prompt, after a warm-up;
                 the teacher and the drafts in ONNX Runtime sessions sharing one thread pool, as the run's
                 lm_runner measures them
    acceptance   guesses the teacher kept / guesses proposed
    identical    outputs equal to the teacher's own greedy output (every one must be)
    coverage     the kept tokens' share of the training split and of the teacher's outputs here

With --temperature T (and --top-k, --top-p) every run samples instead: the teacher alone samples, and the
drafts do speculative sampling (edgekd.bench.lm_sampling), each prompt with its own seed; an output is then
distributed as the teacher's own, not equal to it, so `identical` is not counted.

    python tools/draft_vocab_bench.py --run RUN_DIR [--vocab 0 4096 8192 16384] [--prompts 20]
                 [--new-tokens N] [--first] [--setting K:C:L ...] [--drafts-from RUN_DIR ...]
                 [--temperature T [--top-k K] [--top-p P]] [--threads N] [--json OUT]

--drafts-from adds other finished runs of the same teacher on the same data: their final decoders, cut
the same way, draft for this run's teacher in the same rounds (two students compared as drafts).

--setting DRAFT_TOKENS:MIN_CONFIDENCE:LOOKUP (default: the run's chosen setting, and where it uses context
lookup the same without). A bad run directory or setting prints one line and exits 2."""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

EXIT_BAD_INPUT = 2


class BenchError(Exception):
    pass


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run", type=Path, required=True)
    p.add_argument("--vocab", type=int, nargs="+", default=[0, 4096, 8192, 16384])
    p.add_argument("--prompts", type=int, default=20)
    p.add_argument("--new-tokens", type=int, default=None)
    p.add_argument("--first", action="store_true", help="the first test blocks' prompts instead of spread ones")
    p.add_argument("--setting", nargs="*", default=None)
    p.add_argument("--drafts-from", type=Path, nargs="*", default=[])
    p.add_argument("--temperature", type=float, default=0.0, help="sample at T (default 0: greedy)")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--json", type=Path, default=None)
    return p.parse_args(argv)


def _setting(text: str) -> tuple:
    try:
        k, c, u = text.split(":")
        return int(k), float(c), bool(int(u))
    except ValueError:
        raise BenchError(f"--setting {text!r} is not DRAFT_TOKENS:MIN_CONFIDENCE:LOOKUP (e.g. 2:0:1)") from None


def _load(path: Path, threads: int):
    from edgekd.bench import lm_runner

    args = argparse.Namespace(model=str(path), backend="onnxruntime", threads=threads, providers=None, device="CPU",
                              precision="fp32", precise_int8=False, kv_heads=None, head_dim=None, draft=str(path))
    return lm_runner.load(args)[0]


def bench(args: argparse.Namespace, work: Path) -> dict:
    from transformers import AutoTokenizer

    from edgekd.bench import lm_runner
    from edgekd.bench.lm_figures import decode_once
    from edgekd.bench.lm_generation import Greedy, continue_ids, speculative
    from edgekd.bench.lm_sampling import Sampling, from_flags
    from edgekd.config import from_dict
    from edgekd.config.lm import SpeculativeConfig
    from edgekd.config.profiles import load_profile
    from edgekd.context import RunContext
    from edgekd.lm.draft_vocab import cut_head, frequent_tokens
    from edgekd.lm.student_stage import text_splits

    try:
        asked = from_flags(args.temperature, args.top_k, args.top_p)
    except ValueError as e:
        raise BenchError(str(e)) from None
    sampled = asked is not None

    def rule(seed: int, floor: float):  # each prompt its own seed
        return Greedy(floor) if asked is None else Sampling(asked.temperature, asked.top_k, asked.top_p, seed, floor)

    run = args.run.resolve()
    if not (run / "report.json").is_file():
        raise BenchError(f"{run} has no report.json (not a finished edgekd run)")
    report = json.loads((run / "report.json").read_text())
    if report.get("task") != "causal-lm" or (report.get("final") or {}).get("backend") != "onnxruntime":
        raise BenchError(f"{run}: this tool needs a causal-lm run on an ONNX Runtime target")
    cfg = from_dict(report["config"], f"{run}/report.json config")
    spec_cfg = cfg.speculative or SpeculativeConfig()
    threads = args.threads or int(report["target"].get("threads") or report["environment"]["threads"])
    new_tokens = args.new_tokens or spec_cfg.max_new_tokens
    spec = report.get("speculative") or {}
    chosen = (int(spec.get("draft_tokens") or 2), float(spec.get("min_confidence") or 0.0), bool(spec.get("lookup")))
    settings = [_setting(s) for s in args.setting] if args.setting else (
        [chosen, (chosen[0], chosen[1], False)] if chosen[2] else [chosen])
    tok = AutoTokenizer.from_pretrained(str(run / "tokenizer"))
    splits = text_splits(RunContext(cfg, load_profile(report["target"]["name"]), run, threads=threads), tok)
    train, vocab = splits.train.ids.numpy(), splits.vocab_size
    test = splits.test.ids
    prompts = ([test[i, :spec_cfg.prompt_tokens].tolist() for i in range(min(args.prompts, len(test)))] if args.first
               else splits.test.prompts(args.prompts, spec_cfg.prompt_tokens))
    sources = {run.name: run / f"model.{report['final']['candidate']}.onnx"}
    for other in args.drafts_from:
        other = other.resolve()
        if not (other / "report.json").is_file():
            raise BenchError(f"--drafts-from {other} has no report.json (not a finished edgekd run)")
        theirs = json.loads((other / "report.json").read_text())
        if theirs.get("task") != "causal-lm" or (theirs.get("final") or {}).get("backend") != "onnxruntime":
            raise BenchError(f"--drafts-from {other}: this tool needs a causal-lm run on an ONNX Runtime target")
        for key in ("teacher", "data"):
            if theirs["config"].get(key) != report["config"].get(key):
                raise BenchError(f"--drafts-from {other}: its config's {key} differs from {run}'s (same teacher and "
                                 "data needed)")
        if other.name in sources:
            raise BenchError(f"--drafts-from {other}: two runs named {other.name}")
        sources[other.name] = other / f"model.{theirs['final']['candidate']}.onnx"
    lm_runner._POOL["allowed"] = True  # this process is the bench's own: one shared pool, as in lm_runner
    teacher = _load(run / report["teacher"]["artifact"], threads)
    counts = np.bincount(train.ravel(), minlength=vocab)
    kept = {0 if n <= 0 or n >= vocab else n: np.arange(vocab) if n <= 0 or n >= vocab
            else frequent_tokens(train, vocab, n) for n in args.vocab}  # one choice of tokens for every draft
    drafts = {}
    for label, src in sources.items():
        for n, keep in kept.items():
            drafts[(label, n)] = _load(src if n == 0 else cut_head(src, work / f"draft-{label}-{n}.onnx", keep),
                                       threads)
    runs = [None] + [(d, s) for d in drafts for s in settings]  # d: (run name, vocabulary)
    got = {r: {"seconds": 0.0, "drafted": 0, "accepted": 0, "identical": 0} for r in runs}
    outputs = []
    decode_once(teacher, prompts[0], min(4, new_tokens))
    for d in drafts.values():
        decode_once(d, prompts[0], min(4, new_tokens))
    for i, prompt in enumerate(prompts):
        ref = None
        order = runs[i % len(runs):] + runs[:i % len(runs)]
        results = {}
        for r in order:
            t = time.perf_counter()
            if r is None:
                ref = (continue_ids(teacher, prompt, new_tokens, choice=rule(i, 0.0)) if sampled
                       else decode_once(teacher, prompt, new_tokens)["tokens"])
            else:
                (d, (k, c, u)) = r
                results[r] = speculative(teacher, drafts[d], prompt, new_tokens, k, rule(i, c), u)
            got[r]["seconds"] += time.perf_counter() - t
        outputs.extend(ref)
        for r, res in results.items():
            got[r]["drafted"] += res.drafted
            got[r]["accepted"] += res.accepted
            got[r]["identical"] += int(res.tokens == ref)
        print(f"prompt {i + 1}/{len(prompts)}", file=sys.stderr)
    base = got[None]["seconds"]
    out_counts = np.bincount(np.asarray(outputs), minlength=vocab)
    rows = []
    for r in runs[1:]:
        (label, n), (k, c, u) = r
        g = got[r]
        rows.append({"draft": label, "vocab_tokens": n or vocab, "draft_tokens": k, "min_confidence": c, "lookup": u,
                     "train_coverage": round(100 * float(counts[kept[n]].sum() / counts.sum()), 3),
                     "output_coverage": round(100 * float(out_counts[kept[n]].sum() / out_counts.sum()), 3),
                     "acceptance_rate": round(g["accepted"] / g["drafted"], 4) if g["drafted"] else None,
                     "tokens_per_s": round(len(prompts) * new_tokens / g["seconds"], 2),
                     "speedup": round(base / g["seconds"], 3), "identical": None if sampled else g["identical"]})
    return {"run": str(run), "prompts": len(prompts), "prompt_rows": "first" if args.first else "spread",
            "new_tokens": new_tokens, "threads": threads, "vocab_size": vocab,
            "sampling": {k: v for k, v in asked.record().items() if k != "seed"} if sampled else None,
            "teacher_tokens_per_s": round(len(prompts) * new_tokens / base, 2), "rows": rows}


def table(result: dict) -> str:
    sampling = result.get("sampling")
    how = "greedy" if not sampling else (f"sampled at temperature {sampling['temperature']:g}, top-k "
                                         f"{sampling['top_k']}, top-p {sampling['top_p']:g}")
    lines = [f"teacher alone {result['teacher_tokens_per_s']} tokens/s; {result['prompts']} {result['prompt_rows']} "
             f"test prompts, {result['new_tokens']} new tokens, {result['threads']} threads, same rounds, {how}", "",
             "| draft head | drafting | train coverage | output coverage | acceptance | tokens/s | speedup | identical |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    several = len({r["draft"] for r in result["rows"]}) > 1
    for r in result["rows"]:
        head = "whole vocabulary" if r["vocab_tokens"] == result["vocab_size"] else f"{r['vocab_tokens']} tokens"
        head = f"{r['draft']}: {head}" if several else head
        how = f"up to {r['draft_tokens']}" + (f", p >= {r['min_confidence']:g}" if r["min_confidence"] else "") + (
            " + lookup" if r["lookup"] else "")
        same = "—" if r["identical"] is None else f"{r['identical']}/{result['prompts']}"
        lines.append(f"| {head} | {how} | {r['train_coverage']:.1f}% | {r['output_coverage']:.1f}% "
                     f"| {'—' if r['acceptance_rate'] is None else format(100 * r['acceptance_rate'], '.1f') + '%'} | {r['tokens_per_s']:.1f} | {r['speedup']:.2f}x "
                     f"| {same} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        with tempfile.TemporaryDirectory(prefix="edgekd-draft-vocab-") as tmp:
            result = bench(args, Path(tmp))
    except BenchError as e:
        print(f"draft_vocab_bench: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    print(table(result))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
