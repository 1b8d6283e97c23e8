"""The pipeline's entry for task causal-lm: teacher and text, the distill stage, the KV-cache export, the
weight-only candidates, the choice on validation, then test perplexity, speed and speculative decoding.

Validation chooses, test reports: candidates are judged on the validation blocks (perplexity against the
FP32 student's, decode speed on validation prompts); the test blocks and test prompts are read only after
the choice, for the reported figures. Every figure comes from the target's runtime on the exported
decoder (teacher included), none from PyTorch. With --host the board times the candidates for the choice and
every reported speed and peak memory (lm/measure.py); otherwise peak memory is measured on this host."""
from __future__ import annotations

import time

from ..bench.lm_bench import generation_bench
from ..config.lm import SpeculativeConfig
from ..context import RunContext
from ..errors import BadInputError
from ..report import assemble_lm
from ..runs import hash_arrays, write_npz
from .app_bundle import write_app_bundle
from .candidate import LMCandidate, kv_cache_update, open_candidate, parity, quality
from .export import KVDecoder, export_lm_onnx, fusable
from .measure import check_hosts, on_board, peak_memory_here, speculative_measured
from .models import count_lm_params, lm_macs_per_token, load_lm, student_shape
from .speculative import choose_speculation, compared_settings, draft_candidate
from .student_stage import build_student, check_context, distill_student, text_splits

__all__ = ["run_lm_entry"]

SELECTION_PROMPTS = 4
SPEED_PROMPTS, SPEED_ROUNDS = 8, 2  # the candidates' validation decode speeds: 8 prompts in 2 interleaved rounds
# (4 prompts in 1 round once put INT4 8% ahead of INT8 where the test found 1%)


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
    check_context(cfg, teacher.config)
    KVDecoder(teacher)  # a family or rotary type the export cannot write stops here, before any training
    for p in teacher.parameters():
        p.requires_grad_(False)
    teacher_key = hash_arrays(*[t.detach().numpy() for t in teacher.state_dict().values()])
    teacher_seconds = round(time.perf_counter() - t0, 2)
    splits = text_splits(ctx, loaded.tokenizer)
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
    student, init = build_student(ctx, teacher, teacher_key, splits)
    stages: list[dict] = [{"name": "teacher", "duration_s": teacher_seconds, "source": loaded.source,
                           "params": count_lm_params(teacher), "macs": lm_macs_per_token(teacher)}]
    baseline = None
    if "distill" in cfg.stages:
        student, entry, baseline = distill_student(ctx, teacher, teacher_key, student, splits, init)
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
                             lambda dec: parity(student, dec, splits.test.ids), t_export)
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
            open_candidate(ctx, c, t_config if c is teacher_c else student.config, layers if c is teacher_c else s_layers)
        stages.append({"name": "export", "duration_s": round(time.perf_counter() - t_export, 2),
                       "opset": ctx.profile.opset, "kv_cache": True,
                       "attention": "fused (ONNX Runtime GroupQueryAttention)" if fused else "plain ONNX operators",
                       "kv_cache_update": kv_cache_update(ctx, cands["fp32"].decoder),
                       "parity": parity(student, cands["fp32"].decoder, splits.test.ids)})  # type: ignore[arg-type]
        spec_cfg = cfg.speculative or SpeculativeConfig()
        # Validation chooses: perplexity and agreement with FP32 on the validation blocks, speed on
        # validation prompts, all through the target's runtime.
        val = splits.val.ids.numpy()
        fp32_val, fp32_picks, fp32_nll = quality(cands["fp32"].decoder, val, None)  # type: ignore[arg-type]
        cands["fp32"].selection = {**fp32_val, "next_token_agreement": 100.0}
        for c in list(cands.values())[1:]:
            c.selection, _, nll = quality(c.decoder, val, fp32_picks)  # type: ignore[arg-type]
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
        draft_c, draft_info = draft_candidate(ctx, cands[name], student.config, s_layers, splits, spec_cfg.draft_vocab)
        if draft_c is not cands[name]:
            opened.append(draft_c)
            shapes[draft_c.name] = shapes[name]
        spec_choice = choose_speculation(ctx, hosts, teacher_c, draft_c, shapes,  # its finalists on 3x the prompts
                                          splits.val.prompts(SELECTION_PROMPTS * 3, spec_cfg.prompt_tokens), spec_cfg)
        # Test reports: read only now, after the choice.
        test = splits.test.ids.numpy()
        t_bench = time.perf_counter()
        teacher_c.figures, teacher_picks, _ = quality(teacher_c.decoder, test, None)  # type: ignore[arg-type]
        fp32_test, fp32_test_picks, _ = quality(cands["fp32"].decoder, test, teacher_picks)  # type: ignore[arg-type]
        fp32_test["teacher_agreement"] = fp32_test.pop("next_token_agreement")
        cands["fp32"].figures = {**fp32_test, "next_token_agreement": 100.0}
        for c in list(cands.values())[1:]:
            c.figures = quality(c.decoder, test, fp32_test_picks)[0]  # type: ignore[arg-type]
        if base_c is not None:
            base_c.figures = quality(base_c.decoder, test, teacher_picks)[0]  # type: ignore[arg-type]
            base_c.figures["teacher_agreement"] = base_c.figures.pop("next_token_agreement")
        if unpruned_c is not None:
            unpruned_c.figures = quality(unpruned_c.decoder, test, teacher_picks)[0]  # type: ignore[arg-type]
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
                                    spec_cfg.max_new_tokens, [[v] for v in chosen], compared_settings(spec_choice),
                                    spec_cfg.sampling.model_dump() if spec_cfg.sampling else None)
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
