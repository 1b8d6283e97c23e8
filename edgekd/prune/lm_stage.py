"""The prune stage for task causal-lm: the student's MLPs narrowed, then fine-tuned from the teacher.

Every layer keeps the same number of intermediate channels (a Hugging Face config has one
intermediate_size), a multiple of ROUND_TO so the INT8/INT4 weight blocks, 32 wide along the down
projection's input, stay whole. Which channels a layer keeps follows prune.criterion: `activation` (the
default, as in Minitron, arXiv 2407.14679) ranks each channel by its mean magnitude at the down
projection's input over training blocks; l1/l2 by its weights; random by chance. torch-pruning's
dependency graph finds what a channel couples (the gate and up rows, the down column) and removes them
together.

The fine-tune distils from the teacher's top-k cache over the training blocks as written, the one the
distill stage built (reused, not rebuilt; with distill.sequence_kd that stage's cache holds rewritten blocks,
and this one is built once more), at prune.kd_alpha against next-token cross-entropy, for prune.finetune_steps
steps (default a quarter pass). Validation judges: where the fine-tuned student's validation perplexity
is more than prune.max_perplexity_increase percent over the unpruned student's, the stage prunes half as
far, then keeps the unpruned student."""
from __future__ import annotations

import copy
import math
import time
import warnings

import torch
from torch import nn

from ..context import RunContext
from ..data.text import TextSplits
from ..distill.lm_stage import teacher_topk_cache
from ..distill.lm_trainer import SELECTION_BLOCKS, lm_amp, perplexity, train_lm
from ..distill.trainer import PRECISION_NAMES as PRECISION
from ..errors import BadInputError, StageError
from ..lm.models import count_lm_params, lm_layers, lm_macs_per_token
from ..runs import atomic_path, hash_arrays

__all__ = ["IMPORTANCE_BLOCKS", "ROUND_TO", "kept_width", "narrow_mlps", "narrowed", "run_lm_prune"]

ROUND_TO = 32
IMPORTANCE_BLOCKS = 16  # training blocks whose activations rank the channels
METHOD = ("MLP channels, the same number in every layer (torch-pruning's dependency graph: each channel's gate "
          "and up rows and down column together)")


def _channel_cost(model: nn.Module) -> int:
    """Parameters (and multiply-accumulates per token) one intermediate channel holds in the whole model: a row
    of the gate and up projections and a column of the down projection in every layer."""
    return 3 * int(model.config.hidden_size) * int(model.config.num_hidden_layers)


def kept_width(model: nn.Module, kind: str, value: float) -> int:
    """The intermediate channels every layer keeps for prune.<kind> `value`: a ratio of the channels removed
    (to the nearest block of ROUND_TO), or the share of the student's parameters or linear MACs per token kept
    (at most that share); BadInputError where the MLPs alone cannot reach it or it removes nothing."""
    width = int(model.config.intermediate_size)
    if kind == "ratio":
        keep = math.floor(width * (1 - value) / ROUND_TO + 0.5) * ROUND_TO
    elif kind in ("target_params", "target_macs"):
        base = count_lm_params(model) if kind == "target_params" else lm_macs_per_token(model)
        keep = (width - math.ceil((1 - value) * base / _channel_cost(model))) // ROUND_TO * ROUND_TO
        if keep < ROUND_TO:
            least = (base - (width - ROUND_TO) * _channel_cost(model)) / base
            what = "parameters" if kind == "target_params" else "linear MACs per token"
            raise BadInputError(f"prune.{kind} {value:g}: narrowing the student's MLPs to {ROUND_TO} channels keeps "
                                f"{least:.3f} of its {what} (the embedding, attention and LM head stay); give at "
                                f"least {math.ceil(least * 1000) / 1000:.3f}")
    else:
        raise BadInputError(f"prune.{kind}: task causal-lm takes prune.ratio, target_macs or target_params")
    keep = max(ROUND_TO, keep)
    if keep >= width:
        raise BadInputError(f"prune.{kind} {value:g} removes no block of {ROUND_TO} of the student's {width} MLP "
                            "channels; give a larger amount")
    return keep


def _activation_sums(model: nn.Module, blocks: torch.Tensor, batch_size: int) -> list[torch.Tensor]:
    """Per layer, the summed magnitude of each intermediate channel at the down projection's input."""
    layers = lm_layers(model)
    sums = [torch.zeros(layer.mlp.down_proj.in_features) for layer in layers]
    hooks = []
    for i, layer in enumerate(layers):
        def add(_module, args, _out, i=i):
            x = args[0].detach().float()
            sums[i] += x.abs().reshape(-1, x.shape[-1]).sum(0)
        hooks.append(layer.mlp.down_proj.register_forward_hook(add))
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            for i in range(0, len(blocks), batch_size):
                model.get_decoder()(input_ids=blocks[i:i + batch_size], use_cache=False)  # no LM head needed
    finally:
        for h in hooks:
            h.remove()
        model.train(was)
    return sums


def _importance(criterion: str):
    import torch_pruning as tp

    if criterion == "activation":
        return tp.importance.ActivationImportance()
    if criterion in ("l1", "l2"):
        return tp.importance.GroupMagnitudeImportance(p=1 if criterion == "l1" else 2)
    return tp.importance.RandomImportance()


def narrow_mlps(model: nn.Module, keep: int, criterion: str, blocks: torch.Tensor, batch_size: int) -> dict:
    """Prune every layer of `model` (in place) to `keep` intermediate channels ranked by `criterion` (activation
    on `blocks`); returns what was kept (for activation, the share of the activation mass kept per layer)."""
    import torch_pruning as tp

    layers = lm_layers(model)
    width = int(model.config.intermediate_size)
    sums = _activation_sums(model, blocks, batch_size) if criterion == "activation" else None
    scorer = _importance(criterion)
    with warnings.catch_warnings():  # its note on the norms' weights: they hold the hidden size, which stays
        warnings.simplefilter("ignore")
        graph = tp.DependencyGraph().build_dependency(model, example_inputs={"input_ids": blocks[:1, :8]},
                                                      output_transform=lambda out: out.logits)
    mass = []
    for i, layer in enumerate(layers):
        mlp = layer.mlp
        if sums is not None:
            mlp.down_proj._importance = sums[i]  # what ActivationImportance reads for the down projection's input
        group = graph.get_pruning_group(mlp.gate_proj, tp.prune_linear_out_channels, idxs=list(range(width)))
        scores = scorer(group)
        if scores is None:
            raise StageError(f"prune: no score for layer {i}'s MLP channels (criterion {criterion})")
        order = torch.argsort(scores, descending=True)
        drop = sorted(int(j) for j in order[keep:])
        graph.get_pruning_group(mlp.gate_proj, tp.prune_linear_out_channels, idxs=drop).prune()
        if sums is not None:
            del mlp.down_proj._importance
            mass.append(round(float(sums[i][order[:keep]].sum() / sums[i].sum()), 4))
        shapes = (mlp.gate_proj.out_features, mlp.up_proj.out_features, mlp.down_proj.in_features)
        if shapes != (keep, keep, keep):
            raise StageError(f"prune: layer {i}'s MLP came out {shapes}, not {keep} channels throughout")
        mlp.intermediate_size = keep
    model.config.intermediate_size = keep
    return {"activation_kept": mass} if mass else {}


def narrowed(model: nn.Module, width: int) -> nn.Module:
    """A fresh model of `model`'s config with `width` intermediate channels (what a stored pruned state loads into)."""
    from transformers import AutoModelForCausalLM

    cfg = copy.deepcopy(model.config)
    cfg.intermediate_size = int(width)
    return AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)


def _key(ctx: RunContext, student: nn.Module, teacher_key: str, splits: TextSplits) -> str:
    cfg = ctx.config
    d = cfg.distill
    return ctx.key("lm-prune-v1", teacher_key, hash_arrays(*[t.detach().numpy() for t in student.state_dict().values()]),
                   cfg.prune.model_dump(mode="json"), d.loss, d.temperature, d.beta, d.cache_topk, d.precision,
                   hash_arrays(splits.train.ids.numpy(), splits.val.ids.numpy()), cfg.data.batch_size)


def run_lm_prune(ctx: RunContext, teacher: nn.Module, teacher_key: str, student: nn.Module, splits: TextSplits
                 ) -> tuple[nn.Module, dict]:
    """Narrow `student`'s MLPs and fine-tune it; returns the pruned student (or, over the budget at both
    amounts, `student` itself) and the stage's metrics."""
    cfg = ctx.config
    p, d = cfg.prune, cfg.distill
    out = ctx.stage_dir("prune")
    key = _key(ctx, student, teacher_key, splits)
    hit = ctx.cached("prune", key)
    if hit is not None:
        width = hit["intermediate_size"]["after"]
        model = narrowed(student, width) if width != student.config.intermediate_size else copy.deepcopy(student)
        model.load_state_dict(torch.load(out / "model.pt", weights_only=True))
        ctx.notes.append("prune: resumed from the stored result")
        return model.eval(), {**hit, "resumed": True}
    t0 = time.perf_counter()
    width = int(student.config.intermediate_size)
    first = p.amount()
    amounts = [(first, kept_width(student, *first))]  # an amount the MLPs cannot reach stops here
    gentler = p.gentler() if p.max_perplexity_increase is not None else None
    if gentler is not None:
        try:
            half = kept_width(student, *gentler.amount())
            if half > amounts[0][1]:
                amounts.append((gentler.amount(), half))
        except BadInputError:  # half as far removes no block of channels: only the first amount is tried
            pass
    amp = lm_amp(d.precision)
    steps = p.finetune_steps or max(1, -(-len(splits.train) // cfg.data.batch_size) // 4)
    cache, cache_info = None, None
    if p.kd_alpha > 0 and d.cache_topk:
        cache, cache_info = teacher_topk_cache(ctx, teacher, teacher_key, splits, None, amp)
    val = splits.val.ids[:SELECTION_BLOCKS]
    base = perplexity(student, val)
    before = {"params": count_lm_params(student), "macs": lm_macs_per_token(student)}
    tries: list[dict] = []
    chosen = None
    for (kind, value), keep in amounts:
        model = copy.deepcopy(student)
        torch.manual_seed(cfg.seed)
        kept = narrow_mlps(model, keep, p.criterion, splits.train.ids[:IMPORTANCE_BLOCKS], cfg.data.batch_size)
        pruned = perplexity(model, val)
        res = train_lm(model, splits.train.ids, splits.val.ids, steps=steps, lr=p.lr, batch_size=cfg.data.batch_size,
                       seed=cfg.seed, kind=d.loss, alpha=p.kd_alpha, temperature=d.temperature, beta=d.beta,
                       teacher=teacher if cache is None and p.kd_alpha > 0 else None, cache=cache,
                       progress=ctx.progress, label=f"fine-tuning the pruned LM ({keep} of {width} MLP channels)",
                       amp=amp)
        increase = 100.0 * (res.val_perplexity / base - 1)
        ok = p.max_perplexity_increase is None or increase <= p.max_perplexity_increase
        tries.append({"amount": {kind: value}, "intermediate_size": keep, **kept,
                      "params": count_lm_params(model), "macs": lm_macs_per_token(model),
                      "val_perplexity_pruned": round(pruned, 4), "val_perplexity": round(res.val_perplexity, 4),
                      "val_perplexity_increase": round(increase, 3), "best_step": res.best_step,
                      "train_seconds": res.seconds, "step_curve": res.curve, "accepted": ok})
        if ok:
            chosen = model
            break
    model = chosen if chosen is not None else student
    metrics: dict = {"method": METHOD, "criterion": p.criterion, "amount": dict([amounts[0][0]]), "round_to": ROUND_TO,
                     "intermediate_size": {"before": width, "after": int(model.config.intermediate_size)},
                     "before": before,
                     "after": {"params": count_lm_params(model), "macs": lm_macs_per_token(model)},
                     "reached": chosen is not None and len(tries) == 1,
                     "val_perplexity_unpruned": round(base, 4), "max_perplexity_increase": p.max_perplexity_increase,
                     "chosen_on": f"the first {len(val)} validation blocks",
                     "finetune": {"steps": steps, "lr": p.lr, "alpha": p.kd_alpha, "loss": d.loss,
                                  "precision": PRECISION[amp],
                                  **({"teacher_cache": cache_info} if cache_info else {})},
                     "steps": tries}
    if chosen is None:
        note = (f"pruning added more than prune.max_perplexity_increase {p.max_perplexity_increase:g}% validation "
                f"perplexity at every amount tried ({', '.join(str(t['val_perplexity_increase']) + '%' for t in tries)}); "
                "the unpruned student is kept")
        metrics["note"] = note
        ctx.notes.append(f"prune: {note}")
    with atomic_path(out / "model.pt") as tmp:
        torch.save(model.state_dict(), tmp)
    metrics["duration_s"] = round(time.perf_counter() - t0, 2)
    ctx.mark_done("prune", key, metrics)
    return model.eval(), metrics
