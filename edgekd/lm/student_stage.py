"""The causal-lm student before export: the text splits, the student built from the teacher (its layers chosen
greedily on a few validation blocks), and the distill stage run or resumed from its stored weights."""
from __future__ import annotations

import copy
import time

import torch
from torch import nn

from ..config.lm import SpeculativeConfig
from ..context import RunContext
from ..data import SPLIT_SEED
from ..data.text import TextSplits, build_text_splits, resolve_text_files, stdlib_sources
from ..errors import BadInputError
from .models import build_lm_student, choice_trials, choose_layers

__all__ = ["build_student", "check_context", "distill_student", "text_splits"]

LAYER_CHOICE_BLOCKS, LAYER_CHOICE_TOKENS = 3, 128  # what the greedy layer choice scores each removal on


def text_splits(ctx: RunContext, tokenizer) -> TextSplits:
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


def check_context(cfg, teacher_config) -> None:
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


def build_student(ctx: RunContext, teacher: nn.Module, teacher_key: str, splits: TextSplits) -> tuple[nn.Module, dict]:
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


def distill_student(ctx: RunContext, teacher: nn.Module, teacher_key: str, student: nn.Module, splits: TextSplits,
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
