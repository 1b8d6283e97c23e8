"""The pipeline's entry for task causal-lm: teacher and text, the distill stage, the KV-cache export, the
weight-only candidates, the choice on validation, then test perplexity, speed and speculative decoding.

Validation chooses, test reports: candidates are judged on the validation blocks (perplexity against the
FP32 student's, decode speed on validation prompts); the test blocks and test prompts are read only after
the choice, for the reported figures. Every figure comes from the target's runtime on the exported
decoder (teacher included), none from PyTorch. With --host the board times the candidates for the choice and
every reported speed and peak memory (lm/measure.py); otherwise peak memory is measured on this host."""
from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..backends import get_backend
from ..backends.base import Artifact, Runner
from ..bench.lm_bench import generation_bench
from ..config.lm import SpeculativeConfig
from ..context import RunContext
from ..data import SPLIT_SEED
from ..data.text import TextSplits, build_text_splits, resolve_text_files, stdlib_sources
from ..errors import BadInputError, StageError
from ..report import assemble_lm
from ..runs import hash_arrays, write_npz
from .app_bundle import write_app_bundle
from .decode import Decoder
from .export import KVDecoder, export_lm_onnx, fusable
from .measure import check_hosts, on_board, peak_memory_here, speculative_measured
from .models import (
    build_lm_student,
    choice_trials,
    choose_layers,
    count_lm_params,
    lm_macs_per_token,
    load_lm,
    student_shape,
)
from .speculative import DRAFT_TOKEN_GRID, LOOKUP_GRID, MIN_CONFIDENCE_GRID

__all__ = ["LMCandidate", "run_lm_entry"]

PARITY_STEPS = 16
LAYER_CHOICE_BLOCKS, LAYER_CHOICE_TOKENS = 3, 128  # what the greedy layer choice scores each removal on
SELECTION_PROMPTS = 4
SPEED_PROMPTS, SPEED_ROUNDS = 8, 2  # the candidates' validation decode speeds: 8 prompts in 2 interleaved rounds
# (4 prompts in 1 round once put INT4 8% ahead of INT8 where the test found 1%)


@dataclass
class LMCandidate:
    """One exported LM decoder compiled for the target and what was measured of it."""

    name: str
    precision: str
    onnx: Path
    label: str
    artifact: Artifact | None = None
    runner: Runner | None = None
    decoder: Decoder | None = None
    selection: dict = field(default_factory=dict)  # validation figures: what chose
    figures: dict = field(default_factory=dict)  # test figures: what is reported
    speed: dict = field(default_factory=dict)
    footprint: dict = field(default_factory=dict)  # peak memory, its scope and runtime
    measured_on: str = "host"  # where speed and memory were taken: "host" or the board
    board: dict = field(default_factory=dict)  # the board's environment and versions, with --host


def _splits(ctx: RunContext, tokenizer) -> TextSplits:
    d = ctx.config.data
    if isinstance(d.files, list):
        files: list | dict = resolve_text_files(d.files, d.root)
    elif d.files is not None:  # the splits named (TextSplitFiles)
        files = {name: resolve_text_files(getattr(d.files, name), d.root, f"data.files.{name}")
                 for name in ("train", "validation", "test") if getattr(d.files, name)}
    else:
        files = stdlib_sources()
    return build_text_splits(files, tokenizer, d.seq_len, SPLIT_SEED, d.val_fraction, d.test_fraction,
                             d.max_train_tokens, d.max_eval_tokens, d.text_field)


def _draft(ctx: RunContext, final: LMCandidate, config, layers: int, splits: TextSplits, n: int
           ) -> tuple[LMCandidate, dict]:
    """The decoder that drafts: the final model, or (speculative.draft_vocab below the vocabulary) the final
    model with its LM head cut to the n tokens most frequent in the training split (lm/draft_vocab.py);
    with what it is for the report."""
    vocab = splits.vocab_size
    if not n or n >= vocab:
        return final, {"artifact": str(final.artifact.path.relative_to(ctx.run_dir)),  # type: ignore[union-attr]
                       "vocab_tokens": vocab, "vocab_size": vocab, "head": "the whole vocabulary"}
    from .draft_vocab import cut_head, frequent_tokens

    run = ctx.run_dir
    train = splits.train.ids.numpy()
    keep = frequent_tokens(train, vocab, n)
    ov = ctx.profile.backend == "openvino" and final.name != "fp32"  # NNCF compresses the cut graph as the final's
    src = run / ("model.fp32.onnx" if ov or final.name == "fp32" else f"model.{final.name}.onnx")
    path = cut_head(src, run / f"draft.{final.name}.onnx", keep)
    if ov:
        from ..quantize.lm_weights import compress_ov_weights

        path = compress_ov_weights(path, ctx.stage_dir("quantize") / f"draft.{final.name}.xml", final.name)
    c = LMCandidate("draft", final.precision, path, f"{final.label}, LM head cut to {len(keep)} tokens")
    _open(ctx, c, config, layers)
    counts = np.bincount(train.ravel(), minlength=vocab)
    return c, {"artifact": str(c.artifact.path.relative_to(run)), "vocab_tokens": int(len(keep)),  # type: ignore[union-attr]
               "vocab_size": vocab, "train_coverage": round(100.0 * float(counts[keep].sum() / counts.sum()), 3),
               "head": f"the {len(keep)} tokens most frequent in the training split"}


def _choose_speculation(ctx: RunContext, hosts: list[str], teacher: LMCandidate, draft: LMCandidate, shapes: dict,
                        prompts: list[list[int]], spec) -> dict:
    """The draft length, confidence floor and context lookup: as configured, or where any is auto, the fastest
    setting of the grid on the validation prompts (test prompts only report), timed on the first board with
    --host, else on this host."""
    if "auto" not in (spec.draft_tokens, spec.min_confidence, spec.lookup):
        return {"draft_tokens": spec.draft_tokens, "min_confidence": spec.min_confidence, "lookup": spec.lookup}
    grid = (DRAFT_TOKEN_GRID if spec.draft_tokens == "auto" else (spec.draft_tokens,),
            MIN_CONFIDENCE_GRID if spec.min_confidence == "auto" else (spec.min_confidence,),
            LOOKUP_GRID if spec.lookup == "auto" else (spec.lookup,))
    return speculative_measured(ctx, hosts[0] if hosts else None, teacher, draft, shapes, prompts, spec.max_new_tokens,
                                grid)


def _compared(choice: dict) -> list[tuple]:
    """Settings timed beside the chosen one on the test prompts: the other lookup mode (its fastest setting on
    validation where it was tried, else the chosen draft length and floor) and context lookup alone."""
    k, c, lookup = choice["draft_tokens"], choice["min_confidence"], bool(choice["lookup"])
    other = [t for t in choice.get("tried", []) if t["lookup"] != lookup]
    best = max(other, key=lambda t: t["tokens_per_s"]) if other else {"draft_tokens": k, "min_confidence": c}
    return [(best["draft_tokens"], best["min_confidence"], not lookup), (0, 0.0, True)]


def _open(ctx: RunContext, c: LMCandidate, config, layers: int) -> None:
    backend = get_backend(ctx.profile.backend)
    c.artifact = backend.compile(c.onnx, ctx.profile, ctx.run_dir / "target" / c.name, c.precision)
    c.runner = backend.load(c.artifact, ctx.profile, ctx.threads, spin=False)  # sessions take turns: see load
    c.decoder = Decoder(c.runner.run, config, layers, session=getattr(c.runner, "session", None))


def _kv_cache_update(ctx: RunContext, dec: Decoder) -> str:
    """How the decoders that measure speed update their KV cache: in place with ONNX Runtime where the graph
    takes kv_length, in the infer request's states with OpenVINO (bench.lm_runner.StatefulKV), else copied."""
    if dec.kv is not None:
        return "in place"
    return "in place (OpenVINO states)" if ctx.profile.backend == "openvino" else "copied each step"


def _quality(dec: Decoder, blocks: np.ndarray, ref: np.ndarray | None) -> tuple[dict, np.ndarray, np.ndarray]:
    """Perplexity, next-token accuracy against the text and (with `ref`) agreement with a reference's picks;
    the picks and each block's mean next-token NLL. One pass over the blocks."""
    nll, picks = dec.score(blocks)
    nll = nll / max(blocks.shape[1] - 1, 1)
    out = {"perplexity": round(math.exp(float(nll.mean())), 4),
           "accuracy": round(100.0 * float((picks[:, :-1] == blocks[:, 1:]).mean()), 3)}
    if ref is not None:
        out["next_token_agreement"] = round(100.0 * float((picks == ref).mean()), 3)
    return out, picks, nll


def _parity(student: nn.Module, dec: Decoder, blocks: torch.Tensor) -> dict:
    with torch.no_grad():
        ref = student(input_ids=blocks[:2], use_cache=False).logits.numpy()
    got, _ = dec.forward(blocks[:2].numpy(), dec.empty_cache(min(2, len(blocks))))
    prompt = blocks[0, :16].tolist()
    with torch.no_grad():
        ids = torch.tensor([prompt])
        for _ in range(PARITY_STEPS):
            ids = torch.cat([ids, student(input_ids=ids, use_cache=False).logits[:, -1:].argmax(-1)], 1)
    torch_tokens = ids[0, len(prompt):].tolist()
    ort_tokens = dec.greedy(prompt, PARITY_STEPS)
    out = {"max_abs_diff": float(np.abs(ref - got).max()), "greedy_steps": PARITY_STEPS,
           "greedy_identical": torch_tokens == ort_tokens}
    if out["max_abs_diff"] > 1e-2 * max(1.0, float(np.abs(ref).max())) or not out["greedy_identical"]:
        raise StageError(f"export: the KV-cache decoder differs from PyTorch (max logit difference "
                         f"{out['max_abs_diff']:.2e}, greedy tokens identical: {out['greedy_identical']})")
    return out


def _student(ctx: RunContext, teacher: nn.Module, teacher_key: str, splits: TextSplits) -> tuple[nn.Module, dict]:
    """The student, its teacher layers chosen greedily on a few validation blocks (student.layer_choice) unless
    the distill stage will load its trained weights anyway."""
    from ..distill.lm_stage import lm_distill_key

    s = ctx.config.student
    sizes = s.lm_sizes()
    n_teacher = teacher.config.num_hidden_layers
    greedy = (s.init == "teacher" and s.layer_choice == "greedy" and set(sizes) <= {"layers"}
              and sizes.get("layers", n_teacher) < n_teacher)
    hit = ctx.cached("distill", lm_distill_key(ctx, teacher_key, splits)) if "distill" in ctx.config.stages else None
    if hit is not None:  # the stored weights came from the layers the first run chose: rebuild on those
        stored = hit.get("init") if isinstance(hit.get("init"), dict) else None
        layers = (stored or {}).get("layers_from_teacher") if s.init == "teacher" else None
        n_student = int(sizes.get("layers") or n_teacher)
        student, init = build_lm_student(teacher, sizes, s.init, ctx.config.seed,
                                         layers=layers if layers and len(layers) == n_student else None)
        return student, stored or init
    if not greedy:
        return build_lm_student(teacher, sizes, s.init, ctx.config.seed)
    t0 = time.perf_counter()
    blocks = splits.val.ids[:LAYER_CHOICE_BLOCKS, :LAYER_CHOICE_TOKENS]
    with ctx.progress.task("choosing the teacher layers to keep", choice_trials(n_teacher, sizes["layers"])) as bar:
        layers, removals = choose_layers(teacher, sizes["layers"], blocks, bar.advance)
    student, init = build_lm_student(teacher, sizes, s.init, ctx.config.seed, layers=layers)
    init["layer_choice"] = {"method": "greedy", "chosen_on": f"{len(blocks)} validation blocks of "
                            f"{blocks.shape[1]} tokens", "removals": removals,
                            "seconds": round(time.perf_counter() - t0, 2)}
    return student, init


def _distill(ctx: RunContext, teacher: nn.Module, teacher_key: str, student: nn.Module, splits: TextSplits,
             init: dict):
    from ..distill.lm_stage import lm_distill_key, run_lm_distill

    key = lm_distill_key(ctx, teacher_key, splits)
    out = ctx.stage_dir("distill")
    hit = ctx.cached("distill", key)
    baseline = None
    if hit is not None:
        student.load_state_dict(torch.load(out / "model.pt", weights_only=True))
        if (out / "baseline.pt").is_file():
            baseline = copy.deepcopy(student)
            baseline.load_state_dict(torch.load(out / "baseline.pt", weights_only=True))
        ctx.notes.append("distill: resumed from the stored result")
        return student.eval(), {**hit, "resumed": True}, baseline
    student, metrics, baseline = run_lm_distill(ctx, teacher, teacher_key, student, splits)
    torch.save(student.state_dict(), out / "model.pt")
    if baseline is not None:
        torch.save(baseline.state_dict(), out / "baseline.pt")
    metrics["init"] = init  # how the student began: a resumed run rebuilds it on the same teacher layers
    ctx.mark_done("distill", key, metrics)
    return student, metrics, baseline


def _check_context(cfg, teacher_config) -> None:
    """Blocks, and prompts with their continuations, must fit the positions the teacher (and so every decoder)
    takes."""
    limit = int(getattr(teacher_config, "max_position_embeddings", 0) or 0)
    if not limit:
        return
    if cfg.data.seq_len > limit:
        raise BadInputError(f"data.seq_len {cfg.data.seq_len}: the teacher takes at most {limit} positions")
    spec = cfg.speculative or SpeculativeConfig()
    if spec.prompt_tokens + spec.max_new_tokens > limit:
        raise BadInputError(f"speculative.prompt_tokens {spec.prompt_tokens} + max_new_tokens {spec.max_new_tokens}: "
                            f"the teacher takes at most {limit} positions")


def run_lm_entry(ctx: RunContext, hosts: list[str]) -> dict:
    """Run the causal-LM task; returns the report (without gates: the pipeline finishes it)."""
    check_hosts(ctx, hosts)
    if ctx.profile.backend not in ("onnxruntime", "openvino", "tensorrt"):
        raise BadInputError(f"task causal-lm for {ctx.profile.name} ({ctx.profile.backend}): LM decoders are built "
                            "for ONNX Runtime, OpenVINO and TensorRT (Jetson) targets only so far")
    cfg, run = ctx.config, ctx.run_dir
    t0 = time.perf_counter()
    with ctx.progress.task("loading the teacher LM", None):
        loaded = load_lm(cfg.teacher.model)
    teacher = loaded.model
    _check_context(cfg, teacher.config)
    KVDecoder(teacher)  # a family or rotary type the export cannot write stops here, before any training
    for p in teacher.parameters():
        p.requires_grad_(False)
    teacher_key = hash_arrays(*[t.detach().numpy() for t in teacher.state_dict().values()])
    teacher_seconds = round(time.perf_counter() - t0, 2)
    splits = _splits(ctx, loaded.tokenizer)
    if "distill" in cfg.stages and cfg.distill.sequence_kd and cfg.distill.sequence_steps:
        from ..distill.lm_stage import last_step_batches, lm_steps

        # sequence_steps beyond the training batches stops here, before the layer choice and any training
        last_step_batches(len(splits.train.ids), cfg.data.batch_size, lm_steps(ctx, splits), cfg.distill.sequence_steps)
    write_npz(run / "eval.npz", x=splits.test.ids.numpy())
    write_npz(run / "calib.npz", x=splits.val.ids.numpy())
    loaded.tokenizer.save_pretrained(str(run / "tokenizer"))  # for `edgekd generate`
    if "prune" in cfg.stages:  # an amount the student's MLPs cannot reach stops here, before any training
        from ..prune.lm_stage import kept_width

        kept_width(student_shape(teacher, cfg.student.lm_sizes()), *cfg.prune.amount())
    student, init = _student(ctx, teacher, teacher_key, splits)
    stages: list[dict] = [{"name": "teacher", "duration_s": teacher_seconds, "source": loaded.source,
                           "params": count_lm_params(teacher), "macs": lm_macs_per_token(teacher)}]
    baseline = None
    if "distill" in cfg.stages:
        student, entry, baseline = _distill(ctx, teacher, teacher_key, student, splits, init)
        stages.append({"name": "distill", "init": init, **entry})
    unpruned = None  # the student before pruning, where pruning narrowed it: its figures are the distill stage's
    if "prune" in cfg.stages:
        from ..prune.lm_stage import run_lm_prune

        width = student.config.intermediate_size
        pruned, prune_entry = run_lm_prune(ctx, teacher, teacher_key, student.eval(), splits)
        stages.append({"name": "prune", **prune_entry})
        if pruned.config.intermediate_size != width:
            unpruned = student
        student = pruned
    student.eval()
    t_config = teacher.config
    layers = t_config.num_hidden_layers
    s_layers = student.config.num_hidden_layers
    t_export = time.perf_counter()
    ort = ctx.profile.backend == "onnxruntime"  # its fused GroupQueryAttention; the other runtimes read plain graphs
    export_lm_onnx(teacher, run / "teacher.fp32.onnx", ctx.profile.opset, fused=ort and fusable(t_config))
    del teacher  # from here on the teacher runs exported, on the target's runtime: its torch weights can go
    loaded.model = None
    fused = ort and fusable(student.config)
    export_lm_onnx(student, run / "model.fp32.onnx", ctx.profile.opset, fused=fused)
    if ctx.profile.backend == "tensorrt":  # the board builds and times its engines from a bundle (lm/jetson.py)
        from .jetson import run_lm_jetson

        return run_lm_jetson(ctx, loaded.source, {"model": student.config, "teacher": t_config}, splits, stages,
                             {"params": count_lm_params(student), "macs": lm_macs_per_token(student)},
                             lambda dec: _parity(student, dec, splits.test.ids), t_export)
    cands = {"fp32": LMCandidate("fp32", "fp32", run / "model.fp32.onnx", "FP32")}
    unpruned_c = None
    if unpruned is not None:
        path = ctx.stage_dir("prune") / "unpruned.onnx"
        export_lm_onnx(unpruned.eval(), path, ctx.profile.opset, fused=fused)  # pruning keeps the attention shapes
        unpruned_c = LMCandidate("unpruned", "fp32", path, "unpruned FP32")
    teacher_c = LMCandidate("teacher", "fp32", run / "teacher.fp32.onnx", "teacher FP32")
    base_c = None
    if baseline is not None:
        export_lm_onnx(baseline.eval(), ctx.stage_dir("distill") / "baseline.onnx", ctx.profile.opset, fused=fused)
        base_c = LMCandidate("baseline", "fp32", ctx.stage_dir("distill") / "baseline.onnx", "CE baseline FP32")
    if "quantize" in cfg.stages:
        from ..quantize.lm_weights import (
            OV_WEIGHT_FORMATS,
            WEIGHT_FORMATS,
            compress_ov_weights,
            precision,
            quantize_lm_weights,
        )

        tq = time.perf_counter()
        for w in cfg.quantize.weights:
            onnx_q = quantize_lm_weights(run / "model.fp32.onnx", run / f"model.{w}.onnx", w)  # portable ONNX
            if ctx.profile.backend == "openvino":  # NNCF compresses the IR's weights for OpenVINO's kernels
                path = compress_ov_weights(run / "model.fp32.onnx", ctx.stage_dir("quantize") / f"model.{w}.xml", w)
                cands[w] = LMCandidate(w, precision(w), path, OV_WEIGHT_FORMATS[w])
            else:
                cands[w] = LMCandidate(w, precision(w), onnx_q, WEIGHT_FORMATS[w])
        quantize_seconds = round(time.perf_counter() - tq, 2)
    opened = [teacher_c, *cands.values(), *([base_c] if base_c else []), *([unpruned_c] if unpruned_c else [])]
    try:
        for c in opened:
            _open(ctx, c, t_config if c is teacher_c else student.config, layers if c is teacher_c else s_layers)
        stages.append({"name": "export", "duration_s": round(time.perf_counter() - t_export, 2),
                       "opset": ctx.profile.opset, "kv_cache": True,
                       "attention": "fused (ONNX Runtime GroupQueryAttention)" if fused else "plain ONNX operators",
                       "kv_cache_update": _kv_cache_update(ctx, cands["fp32"].decoder),
                       "parity": _parity(student, cands["fp32"].decoder, splits.test.ids)})  # type: ignore[arg-type]
        spec_cfg = cfg.speculative or SpeculativeConfig()
        # Validation chooses: perplexity and agreement with FP32 on the validation blocks, speed on
        # validation prompts, all through the target's runtime.
        val = splits.val.ids.numpy()
        fp32_val, fp32_picks, fp32_nll = _quality(cands["fp32"].decoder, val, None)  # type: ignore[arg-type]
        cands["fp32"].selection = {**fp32_val, "next_token_agreement": 100.0}
        for c in list(cands.values())[1:]:
            c.selection, _, nll = _quality(c.decoder, val, fp32_picks)  # type: ignore[arg-type]
            c.selection.update(assemble_lm.increase_bound(fp32_nll, nll))
        shapes = {n: assemble_lm.decoder_shape(t_config if n == "teacher" else student.config)
                  for n in ("teacher", *cands)}
        val_prompts = splits.val.prompts(SPEED_PROMPTS, spec_cfg.prompt_tokens)
        if hosts:  # the board decides: interleaved rounds there, one SSH session
            board = on_board(ctx, hosts[0], cands, shapes, val_prompts, spec_cfg.max_new_tokens, rounds=SPEED_ROUNDS)
            speed = {n: b["speed"] for n, b in board.items()}
        else:
            speed = generation_bench({n: c.decoder for n, c in cands.items()},  # type: ignore[misc]
                                     val_prompts, spec_cfg.max_new_tokens, rounds=SPEED_ROUNDS)
        for n, c in cands.items():
            c.selection["decode_tokens_per_s"] = speed[n]["decode_tokens_per_s"]
            c.selection["speed_generations"] = speed[n].get("runs")  # prompts x rounds, each timed
            c.selection["speed_measured_on"] = hosts[0] if hosts else "host"
        name, why = assemble_lm.choose(cands, cfg.quantize.max_perplexity_increase)
        draft_c, draft_info = _draft(ctx, cands[name], student.config, s_layers, splits, spec_cfg.draft_vocab)
        if draft_c is not cands[name]:
            opened.append(draft_c)
            shapes[draft_c.name] = shapes[name]
        spec_choice = _choose_speculation(ctx, hosts, teacher_c, draft_c, shapes,  # its finalists on 3x the prompts
                                          splits.val.prompts(SELECTION_PROMPTS * 3, spec_cfg.prompt_tokens), spec_cfg)
        # Test reports: read only now, after the choice.
        test = splits.test.ids.numpy()
        t_bench = time.perf_counter()
        teacher_c.figures, teacher_picks, _ = _quality(teacher_c.decoder, test, None)  # type: ignore[arg-type]
        fp32_test, fp32_test_picks, _ = _quality(cands["fp32"].decoder, test, teacher_picks)  # type: ignore[arg-type]
        fp32_test["teacher_agreement"] = fp32_test.pop("next_token_agreement")
        cands["fp32"].figures = {**fp32_test, "next_token_agreement": 100.0}
        for c in list(cands.values())[1:]:
            c.figures = _quality(c.decoder, test, fp32_test_picks)[0]  # type: ignore[arg-type]
        if base_c is not None:
            base_c.figures = _quality(base_c.decoder, test, teacher_picks)[0]  # type: ignore[arg-type]
            base_c.figures["teacher_agreement"] = base_c.figures.pop("next_token_agreement")
        if unpruned_c is not None:
            unpruned_c.figures = _quality(unpruned_c.decoder, test, teacher_picks)[0]  # type: ignore[arg-type]
            unpruned_c.figures["teacher_agreement"] = unpruned_c.figures.pop("next_token_agreement")
        test_prompts = splits.test.prompts(spec_cfg.prompts, spec_cfg.prompt_tokens)
        if len(test_prompts) < spec_cfg.prompts:
            ctx.notes.append(f"speculative.prompts {spec_cfg.prompts}: the test split has {len(test_prompts)} blocks, "
                             f"one prompt each: {len(test_prompts)} prompts timed")
        timed = {"teacher": teacher_c, **cands}
        if unpruned_c is not None:  # what pruning bought in speed: the unpruned FP32 student in the same rounds
            timed["unpruned"] = unpruned_c
            shapes["unpruned"] = shapes["fp32"]
        remote = []
        if hosts:
            for h in hosts:  # the first board's figures are the report's; every board's are in report["remote"]
                got = on_board(ctx, h, timed, shapes, test_prompts[:SELECTION_PROMPTS * 2], spec_cfg.max_new_tokens)
                remote.append((h, got))
            for n, c in timed.items():
                c.speed, c.footprint, c.board = (remote[0][1][n][k] for k in ("speed", "footprint", "board"))
                c.measured_on = hosts[0]
        else:
            speed = generation_bench({n: c.decoder for n, c in timed.items()},  # type: ignore[misc]
                                     test_prompts[:SELECTION_PROMPTS * 2], spec_cfg.max_new_tokens)
            for n, c in timed.items():
                c.speed = speed[n]
            peak_memory_here(ctx, timed, shapes, test_prompts, spec_cfg.max_new_tokens)
        chosen = (spec_choice["draft_tokens"], spec_choice["min_confidence"], spec_choice["lookup"])
        spec = speculative_measured(ctx, hosts[0] if hosts else None, teacher_c, draft_c, shapes, test_prompts,
                                    spec_cfg.max_new_tokens, [[v] for v in chosen], _compared(spec_choice))
        spec["draft"] = draft_info
        if "tried" in spec_choice:
            spec["selection"] = {"on": "validation prompts", "prompts": spec_choice["prompts"],
                                 "measured_on": spec_choice["measured_on"],
                                 "teacher_tokens_per_s": spec_choice["teacher_tokens_per_s"],
                                 "tried": spec_choice["tried"]}
        bench_seconds = round(time.perf_counter() - t_bench, 2)
    finally:
        for c in opened:
            if c.runner is not None:
                c.runner.close()
    if "distill" in cfg.stages:
        assemble_lm.distill_figures(stages[1], unpruned_c or cands["fp32"], teacher_c, base_c)
    if "prune" in cfg.stages:
        assemble_lm.prune_figures(next(s for s in stages if s["name"] == "prune"), cands["fp32"], unpruned_c)
    if "quantize" in cfg.stages:
        stages.append(assemble_lm.quantize_entry(ctx, cands, name, why, quantize_seconds, hosts[0] if hosts else None))
    stages.append({"name": "bench", "duration_s": bench_seconds, "threads": ctx.threads,
                   "measured_on": hosts[0] if hosts else "host"})
    bundle = write_app_bundle(ctx, {"model": cands[name], "draft": draft_c, "teacher": teacher_c}, shapes, spec_choice,
                              loaded.tokenizer)
    report = assemble_lm.report(ctx, loaded.source, t_config, splits, stages, teacher_c, cands, name, why, spec,
                                {"params": count_lm_params(student), "macs": lm_macs_per_token(student)}, student.config,
                                remote, bundle)
    return report
