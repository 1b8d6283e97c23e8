"""report.json's blocks for task causal-lm: the choice among weight-only candidates, the distill stage's
perplexities against its cross-entropy baseline, the teacher, the final model and speculative decoding; for
a Jetson bundle (lm/jetson.py), the same blocks with every figure of the board's engines null and the reason."""
from __future__ import annotations

import math

import numpy as np

from ..context import RunContext
from .assemble import skeleton

__all__ = ["bundle_quantize_entry", "bundle_report", "choose", "distill_figures", "increase_bound", "quantize_entry",
           "report"]

SPEED_KEYS = ("decode_tokens_per_s", "prefill_tokens_per_s", "ttft_ms", "tpot_ms")
NO_PEAK = "the runner's platform does not report peak resident memory (resource.getrusage)"


SPEED_TIE = 0.05  # decode speeds within 5% of the fastest are a tie on one machine's validation timing


BOUND_CONFIDENCE = 0.95  # one-sided: a candidate's validation perplexity increase over FP32 is at most its
BOUND_GROUPS = 16  # bound with this confidence; the blocks averaged in up to 16 groups of consecutive blocks
# (batch means), since neighbouring blocks come from the same files and vary together


def increase_bound(base_nll: np.ndarray, cand_nll: np.ndarray) -> dict:
    """A candidate's perplexity increase over FP32 (percent) on the same equal-length blocks, from each
    block's mean next-token NLL, and its one-sided BOUND_CONFIDENCE upper bound: Student's t over the paired
    differences averaged in up to BOUND_GROUPS groups of consecutive blocks. Under two blocks, no bound."""
    from scipy.stats import t as student_t

    diff = np.asarray(cand_nll, dtype=np.float64) - np.asarray(base_nll, dtype=np.float64)
    mean = float(diff.mean())
    out = {"perplexity_increase": round(100 * math.expm1(mean), 3), "perplexity_increase_upper": None}
    groups = min(BOUND_GROUPS, diff.size)
    if groups < 2:
        return out
    means = np.asarray([g.mean() for g in np.array_split(diff, groups)])
    spread = float(means.std(ddof=1)) / math.sqrt(groups)
    out["perplexity_increase_upper"] = round(100 * math.expm1(mean + student_t.ppf(BOUND_CONFIDENCE, groups - 1)
                                                              * spread), 3)
    out["bound_groups"] = groups
    return out


def choose(cands: dict, max_increase: float) -> tuple[str, str]:
    """The candidate with the fastest decode on validation prompts among those whose validation perplexity
    increase over the FP32 student's is within `max_increase` percent (where the selection gives it, its
    upper bound: increase_bound); speeds within SPEED_TIE of the fastest count as a tie, which the lower
    validation perplexity wins (timing noise never buys a worse model)."""
    base = cands["fp32"].selection["perplexity"]
    limit = base * (1 + max_increase / 100)

    def upper(c) -> float:  # percent
        bound = c.selection.get("perplexity_increase_upper")
        return bound if bound is not None else 100 * (c.selection["perplexity"] / base - 1)

    within = {n: c for n, c in cands.items() if n == "fp32" or upper(c) <= max_increase}
    speed = {n: c.selection.get("decode_tokens_per_s") or 0.0 for n, c in within.items()}
    fastest = max(within, key=lambda n: speed[n])
    tied = [n for n in within if speed[n] >= (1 - SPEED_TIE) * speed[fastest]]
    name = min(tied, key=lambda n: within[n].selection["perplexity"])
    c = cands[name]
    bounded = any(o.selection.get("perplexity_increase_upper") is not None for o in cands.values())
    why = (f"fastest decode on the validation prompts ({speed[name]} tokens/s) among the candidates within "
           f"quantize.max_perplexity_increase {max_increase}% of FP32's validation perplexity {base:.3f} "
           + (f"at {BOUND_CONFIDENCE:.0%} confidence (one-sided, over groups of consecutive validation blocks)"
              if bounded else f"(<= {limit:.3f})") + f"; {c.label}: {c.selection['perplexity']:.3f}")
    if name != "fp32" and c.selection.get("perplexity_increase_upper") is not None:
        why += f" (+{c.selection['perplexity_increase']:.2f}%, at most +{c.selection['perplexity_increase_upper']:.2f}%)"
    if name != fastest:
        why += (f"; {cands[fastest].label} decoded {speed[fastest]} tokens/s, within {SPEED_TIE:.0%}: a tie, "
                "which the lower perplexity wins")
    for n, other in cands.items():
        other.selection["within_budget"] = n in within
    return name, why


def distill_figures(entry: dict, fp32, teacher, baseline) -> None:
    """The distill stage's test figures (the FP32 student through the target's runtime), its baseline's and
    the share of the baseline's perplexity gap to the teacher that distillation recovered."""
    entry.update({"perplexity": fp32.figures["perplexity"], "accuracy": fp32.figures["accuracy"],
                  "teacher_agreement": fp32.figures.get("teacher_agreement"),
                  "teacher_perplexity": teacher.figures["perplexity"],
                  "measured_with": "the exported FP32 decoder on the target's runtime, test split"})
    if baseline is not None:
        entry["baseline"] = {**entry.get("baseline", {}), **baseline.figures}
        gap = baseline.figures["perplexity"] - teacher.figures["perplexity"]
        if gap > 0:
            entry["gap_recovered"] = round((baseline.figures["perplexity"] - fp32.figures["perplexity"]) / gap, 4)
        entry["perplexity_vs_baseline"] = round(fp32.figures["perplexity"] / baseline.figures["perplexity"] - 1, 4)


def prune_figures(entry: dict, pruned, unpruned) -> None:
    """The prune stage's test figures (the pruned FP32 student through the target's runtime) beside the unpruned
    student's (None where the stage kept it)."""
    entry.update({k: pruned.figures.get(k) for k in ("perplexity", "accuracy", "teacher_agreement")})
    entry["measured_with"] = "the exported FP32 decoder on the target's runtime, test split"
    if unpruned is None:
        return
    entry["unpruned"] = {k: unpruned.figures.get(k) for k in ("perplexity", "accuracy", "teacher_agreement")}
    entry["perplexity_increase"] = round(100.0 * (pruned.figures["perplexity"] / unpruned.figures["perplexity"] - 1), 3)
    mine, theirs = pruned.speed.get("decode_tokens_per_s"), unpruned.speed.get("decode_tokens_per_s")
    if isinstance(mine, (int, float)) and isinstance(theirs, (int, float)):  # FP32 both, in the same rounds
        entry["decode_tokens_per_s"], entry["unpruned"]["decode_tokens_per_s"] = mine, theirs
        entry["speedup_vs_unpruned"] = round(mine / theirs, 3)
        entry["speed_measured_on"] = pruned.measured_on


def _memory(c) -> dict:
    """peak_memory_mb with its scope and the runtime that produced it, or null with the reason."""
    fp = getattr(c, "footprint", None) or {}
    out = {"peak_memory_mb": fp.get("peak_memory_mb"), **{k: fp[k] for k in ("memory_scope", "memory_runtime") if k in fp}}
    if out["peak_memory_mb"] is None:
        out["not_measured"] = {"peak_memory_mb": NO_PEAK if fp else "not measured"}
    return out


def _candidate(ctx: RunContext, n: str, c, chosen: bool) -> dict:
    mem = _memory(c)
    nm = mem.pop("not_measured", {})
    if c.speed.get("not_measured"):
        nm.update(dict.fromkeys(("decode_tokens_per_s", "tpot_ms"), c.speed["not_measured"]))
    out = {"name": n, "precision": c.precision, "label": c.label, "chosen": chosen,
           "artifact": str(c.artifact.path.relative_to(ctx.run_dir)), "size_bytes": c.artifact.size_bytes(),
           "selection": c.selection, **c.figures, **{k: c.speed.get(k) for k in SPEED_KEYS}, **mem,
           "measured_on": c.measured_on}
    if nm:
        out["not_measured"] = nm
    return out


def quantize_entry(ctx: RunContext, cands: dict, name: str, why: str, seconds: float, board: str | None = None) -> dict:
    where = f"{board}, the board, with the target's runtime" if board else "this host, with the target's runtime"
    return {"name": "quantize", "duration_s": seconds, "kind": "weight-only",
            "max_perplexity_increase": ctx.config.quantize.max_perplexity_increase,
            "budget_confidence": BOUND_CONFIDENCE,
            "candidates": [_candidate(ctx, n, c, n == name) for n, c in cands.items()],
            "choice": {"candidate": name, "precision": cands[name].precision, "why": why, "measured": True,
                       "measured_where": where,
                       "chosen_on": "validation split (perplexity, agreement with FP32) and validation prompts "
                                    "(decode speed" + (f", on {board}" if board else "") + "), through the target's runtime"}}


def _speed_block(c) -> dict:
    s = c.speed
    tpot = s.get("tpot_ms") or {}
    out = {k: s.get(k) for k in SPEED_KEYS}
    out["latency_ms"] = {"p50": tpot.get("p50"), "p90": tpot.get("p90"), "p99": tpot.get("p99")} if tpot else None
    if s.get("not_measured"):
        out["not_measured"] = s["not_measured"]
    return out


def decoder_shape(config) -> dict:
    """What a runner of the exported decoder needs to build its empty KV cache."""
    heads = config.num_attention_heads
    return {"num_hidden_layers": config.num_hidden_layers, "num_attention_heads": heads,
            "num_key_value_heads": getattr(config, "num_key_value_heads", None) or heads,
            "head_dim": getattr(config, "head_dim", None) or config.hidden_size // heads,
            "hidden_size": config.hidden_size,
            "max_positions": int(getattr(config, "max_position_embeddings", 2048))}  # the rotary table's length


def _skeleton(ctx: RunContext, splits, teacher_block: dict, stages: list[dict]) -> dict:
    summary = splits.summary()
    data_extra = {"task": "causal-lm", "seq_len": splits.seq_len, "vocab_size": splits.vocab_size, **summary,
                  "chosen_on": f"validation split ({summary['validation']['blocks']} blocks of {splits.seq_len} tokens)",
                  "reported_on": f"test split ({summary['test']['blocks']} blocks, eval.npz)",
                  "calib_npz": "the validation blocks the candidates were chosen on (weight-only quantization "
                               "reads no calibration data)"}
    rep = skeleton(ctx, "text: " + ("data.files" if ctx.config.data.files is not None
                                    else "Python's standard library sources"), None, teacher=teacher_block,
                   data_extra=data_extra)
    rep["task"] = "causal-lm"
    rep["stages"] = stages
    return rep


def _remote(host: str, got: dict, name: str) -> dict:
    """One board's entry in report["remote"]: the final decoder's and the teacher's figures there."""
    f, t = got[name], got["teacher"]
    entry = {"host": host, **{k: f["speed"].get(k) for k in SPEED_KEYS}, "peak_memory_mb": f["footprint"]["peak_memory_mb"],
             "teacher_decode_tokens_per_s": t["speed"].get("decode_tokens_per_s"),
             "teacher_peak_memory_mb": t["footprint"]["peak_memory_mb"],
             "environment": f["board"].get("environment"), "versions": f["board"].get("versions")}
    if f["board"].get("board_mismatch"):
        entry["board_mismatch"] = f["board"]["board_mismatch"]
    nulls = [k for k, v in entry.items() if v is None]
    if nulls:
        entry["not_measured"] = dict.fromkeys(nulls, f"{host} did not report it")
    return entry


def _where(block: dict, c, prof) -> None:
    """measured_on and, for a figure taken elsewhere than on the profile's board, the note that says so."""
    block["measured_on"] = c.measured_on
    if c.measured_on != "host":
        block["runtime_details"] = c.board.get("details")
        if c.board.get("board_mismatch"):
            block["measured_on_note"] = f"{c.measured_on}: {c.board['board_mismatch']}"
    elif not prof.measures_here:
        block["measured_on_note"] = f"measured on this host, not on a {prof.name}: not the board's speed"


def report(ctx: RunContext, source: str, teacher_config, splits, stages: list[dict], teacher, cands: dict, name: str,
           why: str, spec: dict, counts: dict, student_config, remote: list | None = None,
           bundle: dict | None = None) -> dict:
    """The whole report for a causal-LM run (the pipeline adds gates and writes it). `remote`: (host, its
    figures by decoder) for every board of --host, the first one's already in the candidates; `bundle`: what
    ships to the board (lm/app_bundle.py), final.bundle as a Jetson run's."""
    prof = ctx.profile
    where = teacher.measured_on
    runtime = f"{prof.backend} fp32, {ctx.threads} threads" + ("" if where == "host" else f", on {where}")
    t_mem = _memory(teacher)
    t_nm = t_mem.pop("not_measured", None)
    tentry = stages[0]
    teacher_block = {"model": ctx.config.teacher.model, "source": source, **teacher.figures,
                     "artifact": str(teacher.artifact.path.relative_to(ctx.run_dir)),
                     "decoder": decoder_shape(teacher_config),
                     "params": tentry["params"], "macs": tentry["macs"], "macs_per": "token (linear layers)",
                     "size_bytes": teacher.artifact.size_bytes(), **_speed_block(teacher),
                     "latency_runtime": runtime, "accuracy_runtime": f"{prof.backend} fp32",
                     "accuracy_kind": "next-token accuracy on the test split", **t_mem}
    _where(teacher_block, teacher, prof)
    if t_nm:
        speed_nm = teacher_block.get("not_measured")
        teacher_block["not_measured"] = {**(dict.fromkeys(("decode_tokens_per_s", "tpot_ms"), speed_nm)
                                            if isinstance(speed_nm, str) else {}), **t_nm}
    rep = _skeleton(ctx, splits, teacher_block, stages)
    c = cands[name]
    board_version = ((c.board.get("versions") or {}).get(prof.backend)) if c.measured_on != "host" else None
    final = {"artifact": str(c.artifact.path.relative_to(ctx.run_dir)), "precision": c.precision, "label": c.label,
             "backend": prof.backend, "files": [str(f.relative_to(ctx.run_dir)) for f in c.artifact.files],
             **c.figures, "size_bytes": c.artifact.size_bytes(), **counts, "macs_per": "token (linear layers)",
             **_speed_block(c),
             "runtime": {"name": prof.backend, "version": board_version or ctx.versions.get(prof.backend)},
             "candidate": name, "choice": {"why": why, "measured": prof.measures_here or c.measured_on != "host"},
             "decoder": decoder_shape(student_config), **_memory(c)}
    nm = dict(final.pop("not_measured", {}) or {})
    t_tps, f_tps = teacher.speed.get("decode_tokens_per_s"), c.speed.get("decode_tokens_per_s")
    if t_tps and f_tps:
        final["speedup_vs_teacher"] = round(f_tps / t_tps, 3)
    else:
        final["speedup_vs_teacher"] = None
        nm["speedup_vs_teacher"] = "needs both decode speeds"
    final["compression_vs_teacher"] = round(teacher.artifact.size_bytes() / final["size_bytes"], 3)
    if teacher.figures.get("perplexity"):
        final["perplexity_increase_vs_fp32"] = round(
            100 * (c.figures["perplexity"] / cands["fp32"].figures["perplexity"] - 1), 3)
    _where(final, c, prof)
    if c.measured_on != "host":
        final["accuracy_source"] = f"{prof.backend} on this host (perplexity and next-token figures)"
    if nm:
        final["not_measured"] = nm
    if bundle is not None:
        final["bundle"] = bundle
    rep["final"] = final
    if remote:
        rep["remote"] = [_remote(h, got, name) for h, got in remote]
    spec = {"measured_on": "host", **spec}
    mismatch = spec.pop("board_mismatch", None)
    if mismatch:
        spec["measured_on_note"] = mismatch
    elif spec["measured_on"] == "host" and not prof.measures_here:
        spec["measured_on_note"] = f"measured on this host, not on a {prof.name}: not the board's speed"
    rep["speculative"] = spec
    return rep


# ---- a Jetson bundle: built and timed on the board, so every engine figure is null with its reason ----

ENGINE_FIGURES = ("perplexity", "accuracy", *SPEED_KEYS, "latency_ms", "peak_memory_mb")
SPECULATIVE_FIGURES = ("acceptance_rate", "tokens_per_s", "teacher_tokens_per_s", "speedup", "identical")


def _nulls(keys, reason: str) -> dict:
    return {**dict.fromkeys(keys), "not_measured": dict.fromkeys(keys, reason)}


def _bundle_size(ctx: RunContext, info: dict, name: str) -> int:
    return (ctx.run_dir / info["path"] / f"{name}.fp16.onnx").stat().st_size


UNSERVED = ("ONNX Runtime's weight-only format (MatMulNBits), which TensorRT does not run: the "
            "Jetson bundle serves the FP16 engine; this file is for ONNX Runtime targets")


def bundle_quantize_entry(ctx: RunContext, info: dict, portable: dict, reason: str, seconds: float) -> dict:
    """The quantize stage for a Jetson bundle: the FP16 engine it serves (chosen, not measured) and the
    portable weight-only files ({weights: (label, path)}) written beside it, not served."""
    unserved = [{"name": w, "precision": w, "label": label, "chosen": False, "served": False,
                 "artifact": str(path.relative_to(ctx.run_dir)), "size_bytes": path.stat().st_size,
                 **_nulls(("perplexity", "accuracy", "decode_tokens_per_s"), UNSERVED)}
                for w, (label, path) in portable.items()]
    engine = {"name": "fp16", "precision": "fp16", "label": "FP16 engine (TensorRT, built on the board)",
              "chosen": True, "served": True, "artifact": f"{info['path']}/model.fp16.onnx",
              "size_bytes": _bundle_size(ctx, info, "model"), **_nulls(("perplexity", "accuracy", *SPEED_KEYS), reason)}
    return {"name": "quantize", "duration_s": seconds, "kind": "weight-only",
            "max_perplexity_increase": ctx.config.quantize.max_perplexity_increase,
            "budget_confidence": BOUND_CONFIDENCE,
            "candidates": [engine, *unserved],
            "choice": {"candidate": "fp16", "precision": "fp16", "measured": False,
                       "why": "the Jetson bundle serves FP16 engines of the distilled student; the weight-only "
                              "formats are ONNX Runtime's, which TensorRT does not run",
                       "chosen_on": f"not measured: {reason}"}}


def _bundle_distill(entry: dict, reason: str) -> None:
    """The distill (or prune) stage keeps what training measured (PyTorch, validation split); its test figures
    would be the engine's, so they are null with the reason."""
    entry["measured_with"] = "PyTorch during training, validation split (val_perplexity)"
    entry.update(_nulls(("perplexity", "accuracy", "teacher_agreement"), reason))
    if isinstance(entry.get("baseline"), dict):
        entry["baseline"].update(_nulls(("perplexity", "accuracy", "teacher_agreement"), reason))


def bundle_report(ctx: RunContext, source: str, configs: dict, splits, stages: list[dict], counts: dict, info: dict,
                  reason: str) -> dict:
    """The whole report for a causal-LM run whose target builds and times its engines itself (Jetson)."""
    path, tentry = info["path"], stages[0]
    for st in stages:
        if st["name"] in ("distill", "prune"):
            _bundle_distill(st, reason)
    served = {"precision": "fp16", "backend": "tensorrt", "measured_on": None,
              "latency_runtime": "tensorrt fp16, on the board (not measured here)"}
    teacher = {"model": ctx.config.teacher.model, "source": source, "label": "teacher (FP16 engine)",
               "artifact": f"{path}/teacher.fp16.onnx", "engine": f"{path}/teacher.engine (built on the board)",
               "decoder": decoder_shape(configs["teacher"]), "params": tentry["params"], "macs": tentry["macs"],
               "macs_per": "token (linear layers)", "size_bytes": _bundle_size(ctx, info, "teacher"), **served,
               **_nulls((*ENGINE_FIGURES, "measured_on"), reason)}
    rep = _skeleton(ctx, splits, teacher, stages)
    final = {"artifact": f"{path}/model.fp16.onnx", "engine": f"{path}/model.engine (built on the board)",
             "label": "FP16 engine (TensorRT)", "files": info["files"], "candidate": "fp16", **served,
             "size_bytes": _bundle_size(ctx, info, "model"), **counts, "macs_per": "token (linear layers)",
             "runtime": {"name": "tensorrt", "where": "on the board"}, "decoder": decoder_shape(configs["model"]),
             "compression_vs_teacher": round(teacher["size_bytes"] / _bundle_size(ctx, info, "model"), 3),
             "choice": {"why": "the Jetson bundle's FP16 engine of the distilled student", "measured": False},
             "bundle": {k: v for k, v in info.items() if k != "files"},
             **_nulls((*ENGINE_FIGURES, "measured_on", "next_token_agreement", "teacher_agreement",
                       "speedup_vs_teacher", "perplexity_increase_vs_fp32"), reason)}
    rep["final"] = final
    rep["speculative"] = {"draft_tokens": info["draft_tokens"], "min_confidence": info.get("min_confidence", 0.0),
                          "lookup": bool(info.get("lookup", False)),
                          "prompts": info["prompts"], "prompt_tokens": info["prompt_tokens"],
                          "max_new_tokens": info["max_new_tokens"], "on_board": info["bench_on_board"][-1],
                          "draft": {"artifact": f"{path}/{info.get('draft', 'model')}.fp16.onnx",
                                    "vocab_tokens": info.get("draft_vocab") or configs["model"].vocab_size,
                                    "vocab_size": configs["model"].vocab_size,
                                    "head": (f"the {info['draft_vocab']} tokens most frequent in the training split"
                                             if info.get("draft_vocab") else "the whole vocabulary")},
                          **_nulls(SPECULATIVE_FIGURES, reason)}
    return rep
