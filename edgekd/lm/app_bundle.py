"""target/app/: what a causal-LM run ships to its board (ONNX Runtime and OpenVINO targets): the final decoder,
the draft and the teacher for speculative decoding, the tokenizer, and generate.py (bench/lm_app.py) with the
runner code that measured the run (lm_runner.py, lm_generation.py, lm_figures.py, runner.py), lm_sampling.py and
lm_prompts.py. Copied to the board, it writes text from a prompt with numpy, the runtime and the `tokenizers` package: no edgekd, PyTorch or
transformers.
Decoders are hard-linked from the run's target/ (no second copy on disk)."""
from __future__ import annotations

import shutil
from pathlib import Path

from ..bench import lm_figures, lm_generation, lm_prompts, lm_runner, lm_sampling, runner
from ..bench.harness import runner_backend
from ..context import RunContext
from ..runs import link_or_copy, write_json, write_text

__all__ = ["APP", "APP_MODULES", "APP_SCRIPT", "tokenizer_entry", "write_app_bundle"]

APP = "app"  # target/app/
APP_SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "lm_app.py"
NEEDS = {"onnxruntime": ["numpy", "onnxruntime", "tokenizers"], "openvino": ["numpy", "openvino", "tokenizers"]}


APP_MODULES = (lm_generation, lm_sampling, lm_prompts)  # what generate.py imports on every board


def _chat_template(tokenizer) -> str | None:
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):  # named templates: the default one
        template = template.get("default")
    return template if isinstance(template, str) and template else None


def tokenizer_entry(tokenizer) -> dict:
    """bundle.json's "tokenizer": the file generate.py reads, the end-of-text token, the chat template and the
    special tokens the template may name."""
    special = {k: v for k, v in (getattr(tokenizer, "special_tokens_map", None) or {}).items() if isinstance(v, str)}
    return {"file": "tokenizer/tokenizer.json", "eos_token_id": tokenizer.eos_token_id,
            "chat_template": _chat_template(tokenizer), "special_tokens": special}


def _readme(bundle: dict, needs: list[str]) -> str:
    spec = bundle.get("speculative") or {}
    teacher = "teacher" in bundle
    lines = [
        f"# {bundle['name']}: the final model for {bundle['target']}",
        "",
        f"Written by edgekd {bundle['edgekd_version']}. Copy this folder to the board, then:",
        "",
        "```",
        f"pip install {' '.join(needs)}" + ("   # --chat also needs jinja2" if bundle["tokenizer"].get("chat_template")
                                          else ""),
        "python3 generate.py --prompt 'def fibonacci(n):'",
        "python3 generate.py --prompt-file prompt.txt --max-new-tokens 128 --json out.json",
        "python3 generate.py --temperature 0.7 --top-p 0.9 --seed 1 --prompt 'def fibonacci(n):'   # sampled",
        "python3 generate.py --prompts prompts.jsonl --json batch.json > results.jsonl   # many prompts, loaded once",
    ]
    if bundle["tokenizer"].get("chat_template"):
        lines.append("python3 generate.py --chat --prompt 'Write a function that reverses a list.'")
    if teacher:
        lines.append("python3 generate.py --speculative --prompt 'def fibonacci(n):'   # the teacher's own output, faster")
    lines += [
        "```",
        "",
        f"- `model/`: the final decoder ({bundle['model']['precision']}), KV cache in and out, greedy decoding.",
    ]
    if teacher:
        lines += [f"- `teacher/` and `{bundle['draft']['file'].split('/')[0]}/`: speculative decoding, the final model "
                  "drafting for the teacher, which checks every token (lossless); the run chose "
                  f"{spec.get('draft_tokens')} drafted tokens a round, floor {spec.get('min_confidence')}, context "
                  f"lookup {'on' if spec.get('lookup') else 'off'}. Leave `teacher/` behind to ship the student alone."]
    lines += [
        "- `tokenizer/`: the teacher's tokenizer (`tokenizer.json` is what generate.py reads).",
        "- `lm_runner.py`, `lm_generation.py`, `lm_figures.py`, `runner.py`: the code that measured the run (`python3 lm_runner.py "
        "--help` times a decoder on prompts as the report did).",
        "- `lm_sampling.py`: `--temperature T [--top-k K] [--top-p P] [--seed N]` samples instead of greedy "
        "decoding (with `--speculative`, speculative sampling: distributed as the teacher's own sampling).",
        "- `lm_prompts.py`: `--messages FILE.json` (a conversation) and `--prompts FILE.jsonl` (one prompt per line, "
        "a text or {\"prompt\"} or {\"messages\"} with an optional \"id\"; a line of JSON out for each, the "
        "decoders loaded once).",
        "- `bundle.json`: which file is which, the KV-cache shapes, the runtime settings and the end-of-text token.",
        "",
    ]
    return "\n".join(lines)


def write_app_bundle(ctx: RunContext, roles: dict, shapes: dict, speculative: dict | None, tokenizer) -> dict:
    """Write target/app/ for `roles` ({"model": the final LMCandidate, "draft": ..., "teacher": ...}: a role
    left out is not shipped; a draft that is the final model itself shares its files) with `shapes` (by
    candidate name, assemble_lm.decoder_shape) and the run's speculative choice; returns the report's entry.
    Without a tokenizer.json (a slow tokenizer only) nothing is written and the entry says why."""
    from .._version import __version__

    run = ctx.run_dir
    out = run / "target" / APP
    tok_json = run / "tokenizer" / "tokenizer.json"
    if not tok_json.is_file():
        return {"path": None, "not_written": "the teacher's tokenizer has no tokenizer.json (a fast tokenizer's file), "
                                            "which the board reads without transformers"}
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    model = roles["model"]
    backend = runner_backend(model.artifact.path, ctx.profile)
    bundle: dict = {"edgekd_version": __version__, "name": ctx.config.name, "target": ctx.profile.name,
                    "backend": backend, "threads": ctx.threads or ctx.profile.threads}
    if backend == "onnxruntime" and ctx.profile.execution_providers:
        bundle["providers"] = list(ctx.profile.execution_providers)
    if backend == "openvino":
        bundle["device"] = ctx.profile.device
    for role, c in roles.items():
        shape = shapes[c.name]
        if role == "draft" and c is model:
            bundle[role] = dict(bundle["model"])
            continue
        (out / role).mkdir()
        for f in c.artifact.files or [c.artifact.path]:
            link_or_copy(f, out / role / f.name)
        bundle[role] = {"file": f"{role}/{c.artifact.path.name}", "precision": c.precision, "label": c.label,
                        "layers": shape["num_hidden_layers"], "kv_heads": shape["num_key_value_heads"],
                        "head_dim": shape["head_dim"], "max_positions": shape["max_positions"]}
    if speculative and "teacher" in roles:
        bundle["speculative"] = {k: speculative[k] for k in ("draft_tokens", "min_confidence", "lookup")}
    shutil.copytree(run / "tokenizer", out / "tokenizer")
    bundle["tokenizer"] = tokenizer_entry(tokenizer)
    for module in (lm_runner, lm_figures, runner, *APP_MODULES):
        name = Path(module.__file__).name
        shutil.copyfile(module.__file__, out / name)
    shutil.copyfile(APP_SCRIPT, out / "generate.py")
    (out / "generate.py").chmod(0o755)
    write_json(out / "bundle.json", bundle)
    needs = NEEDS.get(backend, ["numpy", backend, "tokenizers"])
    write_text(out / "README.md", _readme(bundle, needs))
    files = sorted(str(p.relative_to(run)) for p in out.rglob("*") if p.is_file())
    return {"path": str(out.relative_to(run)), "files": files, "run_on_board": "python3 generate.py --prompt TEXT",
            "needs": needs, "roles": {r: bundle[r]["file"] for r in roles}}
