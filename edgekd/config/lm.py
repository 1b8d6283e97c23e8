"""Config for the causal-LM task: the speculative-decoding section and the cross-field rules that hold
when `task: causal-lm` (the LM keys of data, student, distill and quantize live in those sections)."""
from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Field

from .base import Section, first_set
from .distill import LM_ONLY_DISTILL_KEYS as LM_ONLY_DISTILL

TASKS = ("image-classification", "causal-lm")
LM_TEACHER_DEFAULT = "smollm2-135m"  # lm.models.EMBEDDED_LM
LM_STUDENT_SIZES = ("layers", "hidden_size", "heads", "kv_heads", "intermediate_size")
LM_ONLY_STUDENT = (*LM_STUDENT_SIZES, "init", "layer_choice")
# prune keys each task reads alone (a key at its default is not refused: saved configs load again)
LM_ONLY_PRUNE = ("finetune_steps", "max_perplexity_increase")
IMAGE_ONLY_PRUNE = ("target_speedup", "target_latency_ms", "global_pruning", "ignored_layers", "steps",
                    "finetune_epochs", "latency_guided", "max_accuracy_drop")
# a fine-tune of an already distilled student: a tenth of the distill stage's learning rate and its alpha (on
# SmolLM2's student with a quarter of its MLP channels pruned, 100 steps: validation perplexity +4.2% against
# the unpruned student at 1e-4 and alpha 0.5, +9.4% at alpha 0.9, +13.2% at 1e-3 and 0.9; BENCHMARKS.md)
LM_PRUNE_DEFAULTS = {"criterion": "activation", "max_perplexity_increase": 10.0, "lr": 1e-4, "kd_alpha": 0.5}
# keys the other task reads alone: a causal LM loads its teacher from teacher.model, quantizes weights only
# and reads text; an image run quantizes with calibration and reads no LM weight keys
IMAGE_ONLY = {"teacher": ("checkpoint", "trust_checkpoint", "train_epochs", "lr"),
              "quantize": ("calibration_samples", "method", "per_channel", "symmetric_activations", "percentile",
                           "max_accuracy_drop", "recipe"),
              "data": ("image_size", "labeled_fraction", "unlabeled_root", "augment", "decoded_cache_mb")}
LM_ONLY = {"quantize": ("weights", "max_perplexity_increase"), "data": ("seq_len", "max_train_tokens", "max_eval_tokens")}
LM_ONLY_GATES = ("min_decode_tokens_per_s", "max_perplexity", "max_perplexity_increase", "min_speculative_speedup")
# one pass over the training blocks at a learning rate for a pretrained-initialised transformer, with the
# teacher's top 64 tokens per position cached on disk; no temperature/alpha sweep (too costly for an LM)
LM_DISTILL_DEFAULTS = {"sweep": None, "temperature": 1.0, "alpha": 0.5, "epochs": 1, "lr": 1e-3, "cache_topk": 64}


class SpeculativeSampling(Section):
    """speculative.sampling: speculative sampling with the chosen setting, timed on the test prompts in the
    same rounds against the teacher's own sampling with these settings (the i-th prompt seeded seed + i)."""

    temperature: float = Field(gt=0.0, le=100.0)
    top_k: int = Field(0, ge=0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    seed: int = Field(0, ge=0, lt=2 ** 32)


class SpeculativeConfig(Section):
    # auto: the fastest of lm.speculative's grid on validation prompts; a number pins it
    draft_tokens: Annotated[int, Field(ge=1, le=64)] | Literal["auto"] = "auto"
    min_confidence: Annotated[float, Field(ge=0.0, lt=1.0)] | Literal["auto"] = "auto"
    # true: a round whose last tokens recur in the text proposes what followed them (no draft step)
    lookup: bool | Literal["auto"] = "auto"
    # the draft's LM head kept for the N tokens most frequent in the training split (a cheaper draft step;
    # the target still checks every guess); 0: the whole vocabulary
    draft_vocab: int = Field(8192, ge=0, le=10_000_000)
    prompts: int = Field(20, ge=1, le=10000)
    max_new_tokens: int = Field(32, ge=1, le=4096)
    prompt_tokens: int = Field(32, ge=1, le=4096)
    sampling: SpeculativeSampling | None = None  # also time speculative sampling (the chosen setting) in the report


def lm_defaults(data: Any) -> Any:
    """With task causal-lm, the defaults that differ from the image task, filled in before validation:
    the embedded LM teacher, text data, the teacher's own family as student, no temperature/alpha sweep."""
    if not isinstance(data, dict) or data.get("task") != "causal-lm":
        return data
    out = dict(data)
    out["teacher"] = {"model": LM_TEACHER_DEFAULT, **(out.get("teacher") or {})}
    out["data"] = {"dataset": "text", **(out.get("data") or {})}
    out["student"] = {"model": "teacher", **(out.get("student") or {})}
    out["data"].setdefault("batch_size", 8)
    distill = dict(out.get("distill") or {})
    for key, value in LM_DISTILL_DEFAULTS.items():
        distill.setdefault(key, value)
    out["distill"] = distill
    out["prune"] = {**LM_PRUNE_DEFAULTS, **(out.get("prune") or {})}
    out.setdefault("stages", ["distill", "quantize"])
    return out


def check_task(cfg) -> None:
    """Raise ValueError for keys that do not belong to the config's task."""
    lm = cfg.task == "causal-lm"
    if lm:
        if cfg.data.dataset != "text":
            raise ValueError(f"task causal-lm reads text: data.dataset must be text, not {cfg.data.dataset}")
        _check_lm_prune(cfg.prune)
        if cfg.student.model != "teacher":
            raise ValueError("task causal-lm: student.model must be teacher (the teacher's family, sized by "
                             "student.layers, hidden_size, heads, kv_heads, intermediate_size)")
        seq = cfg.distill.sequence_kd
        if seq is not None and seq >= cfg.data.seq_len:
            raise ValueError(f"distill.sequence_kd {seq} must be less than data.seq_len {cfg.data.seq_len}: the "
                             "teacher continues the first seq_len - sequence_kd tokens of each block")
        steps = cfg.distill.sequence_steps
        if steps is not None and seq is None:
            raise ValueError(f"distill.sequence_steps {steps} needs distill.sequence_kd (how many tokens of each "
                             "block the teacher writes)")
        if steps is not None and cfg.distill.sequence_share != 1.0:
            raise ValueError("distill.sequence_steps and distill.sequence_share both choose the teacher-written "
                             "blocks; set one of them")
        spec = cfg.speculative
        if spec is not None and spec.prompt_tokens > cfg.data.seq_len:
            raise ValueError(f"speculative.prompt_tokens {spec.prompt_tokens} is more than data.seq_len "
                             f"{cfg.data.seq_len}: the prompts are the first tokens of test blocks")
        if cfg.distill.strategy != "kd":
            raise ValueError(f"task causal-lm: distill.strategy {cfg.distill.strategy} is for image classifiers")
        if "distill" in cfg.stages and cfg.distill.epochs == 0 and cfg.distill.steps is None:
            raise ValueError("distill.epochs 0 trains nothing: take distill out of stages to keep the student as "
                             "initialised from the teacher")
        key = first_set(cfg, IMAGE_ONLY)
        if key:
            raise ValueError(f"{key} is for image classifiers; task causal-lm does not read it")
        return
    if cfg.data.dataset == "text":
        raise ValueError("data.dataset text needs task: causal-lm")
    if cfg.data.text_field != type(cfg.data).model_fields["text_field"].default:
        raise ValueError("data.text_field is read only with task: causal-lm (JSON Lines text)")
    if cfg.speculative is not None:
        raise ValueError("speculative is read only with task: causal-lm")
    # a key at its default is not refused: a saved config (every key written out) must load again
    set_student = [k for k in LM_ONLY_STUDENT if getattr(cfg.student, k) != type(cfg.student).model_fields[k].default]
    set_distill = [k for k in LM_ONLY_DISTILL if getattr(cfg.distill, k) != type(cfg.distill).model_fields[k].default]
    if set_student or set_distill:
        key = f"student.{set_student[0]}" if set_student else f"distill.{set_distill[0]}"
        raise ValueError(f"{key} is read only with task: causal-lm")
    set_prune = [k for k in LM_ONLY_PRUNE if getattr(cfg.prune, k) is not None]
    if set_prune:
        raise ValueError(f"prune.{set_prune[0]} is read only with task: causal-lm")
    if cfg.prune.criterion == "activation":
        raise ValueError("prune.criterion activation is read only with task: causal-lm")
    key = first_set(cfg, LM_ONLY)
    if key:
        raise ValueError(f"{key} is read only with task: causal-lm")
    set_gates = [k for k in LM_ONLY_GATES if getattr(cfg.gates, k, None) is not None]
    if set_gates:
        raise ValueError(f"gates.{set_gates[0]} is read only with task: causal-lm")


def _check_lm_prune(prune) -> None:
    """The prune keys a causal LM reads: it narrows the student's MLPs to a ratio, target_macs or
    target_params (no latency-guided amounts yet) by activation, weight magnitude or chance."""
    fields = type(prune).model_fields
    for key in IMAGE_ONLY_PRUNE:
        if getattr(prune, key) != fields[key].default:
            raise ValueError(f"prune.{key} is for image classifiers; task causal-lm narrows the student's MLPs "
                             "to prune.ratio, target_macs or target_params and checks prune.max_perplexity_increase")
    if prune.criterion not in ("activation", "l1", "l2", "random"):
        raise ValueError(f"prune.criterion {prune.criterion} is for image classifiers; task causal-lm takes "
                         "activation, l1, l2 or random")
