"""task causal-lm for a Jetson (TensorRT) target: a bundle in target/jetson-lm/ from which the board builds
and times its own engines, and a report whose board figures are null with the reason.

The bundle holds the student's and the teacher's KV-cache decoders (and with speculative.draft_vocab the
student with its LM head cut to the training split's most frequent tokens, the draft) (FP32 as exported, and a mixed FP16 copy
for strongly typed builds, lm/fp16.py), build_engine.sh (trtexec, one optimization profile covering prefill
and decode, FP16 engines), the board-side runner (tensorrt_bundle/trt_lm_runner.py), the tokenizer, the
run's test prompts and test blocks, and bundle.json; and generate.py (bench/lm_app.py, with the decode loops,
sampling and prompt readers it imports), which writes text from a prompt with the engines once built, through
the same loops (bundle.json's "app" says which engine is which). An engine only runs with the TensorRT and GPU it was
built with, so nothing is built or timed here: no figure of another runtime stands in for TensorRT's. The
export is still checked on this host with ONNX Runtime (parity with PyTorch, and the FP16 copy against the
FP32 decoder), which says the files are right, not how fast the board is."""
from __future__ import annotations

import re
import shutil
import time
from pathlib import Path

import numpy as np

from ..backends.tensorrt import BUNDLE_DIR, tensorrt_status
from ..backends.tensorrt_bundle.trt_lm_decode import context_limits, profile_shapes, shape_flags
from ..bench import lm_figures, lm_generation
from ..config.lm import SpeculativeConfig
from ..context import RunContext
from ..errors import StageError
from ..report import assemble_lm
from ..runs import link_or_copy, write_json, write_npz, write_text
from .app_bundle import APP_MODULES, APP_SCRIPT, tokenizer_entry
from .decode import Decoder
from .draft_vocab import cut_head, frequent_tokens
from .export import io_names, kv_shape
from .fp16 import write_mixed_fp16
from .speculative import pinned

__all__ = ["BUNDLE", "not_measured_reason", "run_lm_jetson", "write_lm_bundle"]

BUNDLE = "jetson-lm"
COPIED = ("trt_lm_runner.py", "trt_lm_decode.py", "trt_runner.py", "trt_device.py")
FP16_STEPS = 16
SAFE = re.compile(r"^[\w./:,=+ -]*$")  # what a value may hold inside the script's single quotes


def not_measured_reason(rel: str) -> str:
    """Why no engine figure is in the report: the words the image task's Jetson path uses, for this bundle."""
    runnable, why = tensorrt_status()
    where = f"build the bundle on the board ({rel}/build_engine.sh) and time it there with trt_lm_runner.py"
    if runnable:
        return f"TensorRT imports here, but edgekd does not build or time LM engines itself; {where}"
    if "fails to import" in why:
        return f"TensorRT fails to import here; {where}"
    return f"TensorRT is not installed here; {where}"


def model_entry(name: str, config, limits: dict, fp32_layers: list[str]) -> dict:
    """bundle.json's description of one decoder: its cache, its tensors and the profile's shapes."""
    layers = config.num_hidden_layers
    _, kv_heads, _, head_dim = kv_shape(config, 1, 0)
    inputs, outputs = io_names(layers)
    keep = [n for n in fp32_layers if SAFE.match(n) and "," not in n and ":" not in n]
    return {"onnx": f"{name}.onnx", "onnx_fp16": f"{name}.fp16.onnx", "engine": f"{name}.engine",
            "layers": layers, "kv_heads": kv_heads, "head_dim": head_dim, "vocab_size": config.vocab_size,
            "inputs": inputs, "outputs": outputs,
            "shapes": profile_shapes(layers, kv_heads, head_dim, limits["max_input"], limits["max_context"],
                                     limits["opt_context"]),
            "fp32_layers": keep}


def render_build_script(profile, models: dict, limits: dict) -> str:
    """build_engine.sh: the template with the profile's settings and one trtexec build per model."""
    blocks = []
    for name, m in models.items():
        values = [f"{name}.onnx", f"{name}.fp16.onnx", *shape_flags(m["shapes"]),
                  ",".join(f"{n}:fp32" for n in m["fp32_layers"])]
        bad = [v for v in values if not SAFE.match(v)]
        if bad:
            raise StageError(f"jetson: build_engine.sh cannot quote {bad[0][:80]!r}")
        args = " \\\n        ".join(f"'{v}'" for v in values)
        blocks.append(f"# {name}: {m['layers']} layers, {m['kv_heads']} KV heads of {m['head_dim']}\n"
                      f"if [ \"$which\" = all ] || [ \"$which\" = {name} ]; then\n"
                      f"    build {name} \\\n        {args} \\\n        \"$@\"\nfi")
    shapes = next(iter(models.values()))["shapes"]
    past = shapes[next(n for n in shapes if n.startswith("past_"))]
    values = {"TARGET": profile.name, "WORKSPACE_MB": str(int(profile.workspace_mb)),
              "MAX_INPUT": str(limits["max_input"]), "MAX_PAST": str(past[2][2]), "OPT_PAST": str(past[1][2]),
              "BUILDS": "\n".join(blocks), "DRAFT": "draft" if "draft" in models else "model"}
    text = (BUNDLE_DIR / "build_lm_engine.sh").read_text()
    for key, value in values.items():
        text = text.replace(f"@{key}@", value)
    left = re.findall(r"@[A-Z_]+@", text)
    if left:
        raise StageError(f"jetson: build_lm_engine.sh template has unfilled fields {', '.join(sorted(set(left)))}")
    return text


def write_lm_bundle(ctx: RunContext, out: Path, configs: dict, prompts: np.ndarray,
                    draft_vocab: np.ndarray | None = None) -> dict:
    """Write the bundle for `configs` ({"model": student config, "teacher": ...}) into `out`, with `draft_vocab`
    (token ids) a third decoder, "draft": the student with its LM head cut to those tokens (lm/draft_vocab.py);
    returns what the report says of it (its files, the shapes, the FP16 copies' float32 layers)."""
    run, cfg = ctx.run_dir, ctx.config
    spec = cfg.speculative or SpeculativeConfig()
    # auto: nothing here times TensorRT
    draft_tokens, min_confidence, lookup = pinned(spec.draft_tokens, spec.min_confidence, spec.lookup)
    out.mkdir(parents=True, exist_ok=True)
    limits = context_limits(cfg.data.seq_len, int(prompts.shape[1]), spec.max_new_tokens, draft_tokens, lookup)
    sources = {"model": run / "model.fp32.onnx", "teacher": run / "teacher.fp32.onnx"}
    if draft_vocab is not None:
        sources["draft"] = cut_head(run / "model.fp32.onnx", run / "draft.fp32.onnx", draft_vocab)
        configs = {**configs, "draft": configs["model"]}
    draft = "draft" if draft_vocab is not None else "model"
    models = {}
    for name, config in configs.items():
        link_or_copy(sources[name], out / f"{name}.onnx")
        keep = write_mixed_fp16(sources[name], out / f"{name}.fp16.onnx")
        models[name] = model_entry(name, config, limits, keep)
    script = out / "build_engine.sh"
    write_text(script, render_build_script(ctx.profile, models, limits))
    script.chmod(0o755)
    for name in COPIED:
        shutil.copyfile(BUNDLE_DIR / name, out / name)
    for module in (lm_figures, *APP_MODULES):  # the loops trt_lm_decode and generate.py run, and their timing
        shutil.copyfile(module.__file__, out / Path(module.__file__).name)
    shutil.copyfile(APP_SCRIPT, out / "generate.py")
    for name in ("trt_lm_runner.py", "generate.py"):
        (out / name).chmod(0o755)
    shutil.copyfile(BUNDLE_DIR / "README_LM.md", out / "README.md")
    write_npz(out / "prompts.npz", prompts=prompts.astype(np.int64))
    link_or_copy(run / "eval.npz", out / "eval.npz")
    if (run / "tokenizer").is_dir():
        shutil.copytree(run / "tokenizer", out / "tokenizer", dirs_exist_ok=True)
    from .._version import __version__

    bundle = {"edgekd_version": __version__, "target": ctx.profile.name, "task": "causal-lm", "precision": "fp16",
              "models": models, **limits, "seq_len": cfg.data.seq_len, "prompts": "prompts.npz",
              "prompt_tokens": int(prompts.shape[1]), "max_new_tokens": spec.max_new_tokens,
              "draft_tokens": draft_tokens, "min_confidence": min_confidence, "lookup": lookup,
              "eval_data": "eval.npz", "tokenizer": "tokenizer",
              "workspace_mb": int(ctx.profile.workspace_mb), "draft": draft,
              "draft_vocab": None if draft_vocab is None else int(len(draft_vocab))}
    app = _app_entry(ctx, configs, models, limits, draft, (draft_tokens, min_confidence, lookup))
    if app is not None:
        bundle["app"] = app
    write_json(out / "bundle.json", bundle)
    rel = str(out.relative_to(run))
    files = sorted(str(p.relative_to(run)) for p in out.rglob("*") if p.is_file())
    return {"path": rel, "files": files, **limits, "precision": "fp16", "prompts": int(prompts.shape[0]),
            "prompt_tokens": int(prompts.shape[1]), "max_new_tokens": spec.max_new_tokens,
            "draft_tokens": draft_tokens, "min_confidence": min_confidence, "lookup": lookup,
            "fp32_layers": {n: len(m["fp32_layers"]) for n, m in models.items()},
            "build_on_board": "./build_engine.sh",
            "bench_on_board": ["python3 trt_lm_runner.py bench --eval-data eval.npz",
                               f"python3 trt_lm_runner.py bench --engine teacher.engine --draft {draft}.engine"],
            "draft": draft, "draft_vocab": bundle["draft_vocab"],
            **({"run_on_board": "python3 generate.py --prompt TEXT"} if app is not None else {})}


def _app_entry(ctx: RunContext, configs: dict, models: dict, limits: dict, draft: str, chosen: tuple) -> dict | None:
    """bundle.json's "app": what generate.py (bench/lm_app.py) reads to write text with the engines the board
    builds: each role's engine and cache, the run's speculative choice and the tokenizer; None without a
    tokenizer.json (generate.py reads no other)."""
    from transformers import AutoTokenizer

    from .._version import __version__

    tok_dir = ctx.run_dir / "tokenizer"
    if not (tok_dir / "tokenizer.json").is_file():
        return None
    draft_tokens, min_confidence, lookup = chosen
    check = max(draft_tokens, lm_generation.LOOKUP_TOKENS if lookup else 0) + 1  # a speculative round's last check
    app: dict = {"edgekd_version": __version__, "name": ctx.config.name, "target": ctx.profile.name,
                 "backend": "tensorrt", "threads": None,
                 "speculative": {"draft_tokens": draft_tokens, "min_confidence": min_confidence, "lookup": lookup},
                 "tokenizer": tokenizer_entry(AutoTokenizer.from_pretrained(str(tok_dir)))}
    for role, name in (("model", "model"), ("draft", draft), ("teacher", "teacher")):
        m, config = models[name], configs[name]
        positions = getattr(config, "max_position_embeddings", None) or limits["max_context"]
        app[role] = {"file": m["engine"], "precision": "fp16", "label": f"{name}.engine (TensorRT, FP16)",
                     "layers": m["layers"], "kv_heads": m["kv_heads"], "head_dim": m["head_dim"],
                     "max_positions": min(positions, limits["max_context"] - check)}
    return app


def _host_decoder(ctx: RunContext, path: Path, config, half: bool = False):
    """(runner, Decoder) for an exported decoder in ONNX Runtime on this host: a check of the files only."""
    from ..backends import Artifact, get_backend
    from ..config.profiles import load_profile

    art = Artifact(path=path, backend="onnxruntime", precision="fp16" if half else "fp32", files=[path])
    runner = get_backend("onnxruntime").load(art, load_profile("cpu"), ctx.threads)

    def in_half(feeds: dict) -> list[np.ndarray]:  # the FP16 copy takes and returns its cache in float16
        out = runner.run({k: v.astype(np.float16) if v.dtype == np.float32 else v for k, v in feeds.items()})
        return [np.asarray(o, dtype=np.float32) for o in out]

    return runner, Decoder(in_half if half else runner.run, config, config.num_hidden_layers)


def _fp16_check(fp32: Decoder, fp16: Decoder, blocks: np.ndarray) -> dict:
    """The FP16 copy against the FP32 decoder (ONNX Runtime): max logit difference on two test blocks and
    whether 16 greedy tokens agree. Reported, not enforced: FP16 may flip a near tie."""
    ids = blocks[:2]
    a, _ = fp32.forward(ids, fp32.empty_cache(len(ids)))
    b, _ = fp16.forward(ids, fp16.empty_cache(len(ids)))
    prompt = blocks[0, :16].tolist()
    return {"max_abs_diff": round(float(np.abs(a - b).max()), 6), "greedy_steps": FP16_STEPS,
            "greedy_identical": fp32.greedy(prompt, FP16_STEPS) == fp16.greedy(prompt, FP16_STEPS),
            "checked_with": "onnxruntime on this host (the ONNX the strongly typed build reads, not the engine)"}


def _portable_weights(ctx: RunContext) -> dict[str, tuple[str, Path]]:
    """{weights: (label, path)}: the weight-only candidates as portable ONNX in ONNX Runtime's formats, which
    the bundle does not serve (TensorRT does not run MatMulNBits)."""
    from ..quantize.lm_weights import WEIGHT_FORMATS, quantize_lm_weights

    run = ctx.run_dir
    return {w: (WEIGHT_FORMATS[w], quantize_lm_weights(run / "model.fp32.onnx", run / f"model.{w}.onnx", w))
            for w in ctx.config.quantize.weights}


def run_lm_jetson(ctx: RunContext, source: str, configs: dict, splits, stages: list[dict], counts: dict,
                  check_parity, t_export: float) -> dict:
    """The rest of a causal-LM run for a TensorRT target once both decoders are exported: the export
    checks, the portable weight-only files, the bundle and the report (its board figures null)."""
    run, cfg = ctx.run_dir, ctx.config
    spec = cfg.speculative or SpeculativeConfig()
    out = run / "target" / BUNDLE
    test = splits.test.ids.numpy()
    prompts = np.asarray(splits.test.prompts(spec.prompts, spec.prompt_tokens), dtype=np.int64)
    vocab = splits.vocab_size
    keep = (frequent_tokens(splits.train.ids.numpy(), vocab, spec.draft_vocab) if 0 < spec.draft_vocab < vocab
            else None)
    with ctx.progress.task("writing the Jetson LM bundle", None):
        info = write_lm_bundle(ctx, out, configs, prompts, keep)
    runners = []
    try:
        runner, fp32 = _host_decoder(ctx, run / "model.fp32.onnx", configs["model"])
        runners.append(runner)
        parity = check_parity(fp32)
        runner, fp16 = _host_decoder(ctx, out / "model.fp16.onnx", configs["model"], half=True)
        runners.append(runner)
        fp16_check = _fp16_check(fp32, fp16, test)
    finally:
        for r in runners:
            r.close()
    stages.append({"name": "export", "duration_s": round(time.perf_counter() - t_export, 2), "opset": ctx.profile.opset,
                   "kv_cache": True, "parity": {**parity, "checked_with": "onnxruntime on this host"},
                   "fp16": fp16_check, "fp32_layers": info["fp32_layers"]})
    reason = not_measured_reason(info["path"])
    if "quantize" in cfg.stages:
        tq = time.perf_counter()
        portable = _portable_weights(ctx)
        stages.append(assemble_lm.bundle_quantize_entry(ctx, info, portable, reason, round(time.perf_counter() - tq, 2)))
    stages.append({"name": "bench", "duration_s": 0.0, "measured_on": None, "not_measured": {"measured_on": reason},
                   "bundle": info["path"],
                   "on_board": [info["build_on_board"], *info["bench_on_board"]]})
    ctx.notes.append(f"jetson: nothing was timed here; {reason}")
    if spec.sampling is not None:
        ctx.notes.append("speculative.sampling: the Jetson bundle times greedy speculative decoding only")
    return assemble_lm.bundle_report(ctx, source, configs, splits, stages, counts, info, reason)
