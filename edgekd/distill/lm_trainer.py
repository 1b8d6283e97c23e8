"""Training and scoring causal LMs on token blocks: distillation from a live or cached teacher, the
cross-entropy baseline, perplexity and next-token agreement.

Batches have a fixed composition (batch b is blocks[b*bs:(b+1)*bs]) so the teacher's top-k cache can be
built once and addressed by batch index; each epoch visits the batches in a seeded order. The weights
with the lowest validation perplexity are kept (checked every `eval_every` steps and at the end)."""
from __future__ import annotations

import copy
import math
import random
import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field

import torch
from torch import nn

from ..progress import NullProgress, Progress
from .lm_cache import TopKCache
from .lm_losses import lm_distill_loss, lm_distill_loss_topk, next_token_ce
from .lm_sequence import sample_continuations

__all__ = ["LMTrainResult", "build_topk_cache", "lm_amp", "lm_logits", "next_token_agreement", "perplexity", "train_lm"]

EVAL_BATCH = 8
SELECTION_BLOCKS = 32  # validation blocks scored during training to keep the best weights (a bounded cost)


@dataclass
class LMTrainResult:
    """How training went: the kept weights' validation perplexity, the steps taken and the curve."""

    val_perplexity: float
    steps: int
    seconds: float
    curve: list[dict] = field(default_factory=list)
    best_step: int = 0
    on_policy_steps: int = 0


def lm_amp(precision: str) -> torch.dtype | None:
    """The autocast dtype for training on the CPU: distill.precision 'auto' is bf16 where the CPU multiplies
    bf16 natively (AVX512-BF16 or AMX; about 2x faster training than fp32 on such a CPU), else fp32
    (None); 'bf16' and 'fp32' as written. fp16 autocast is a GPU setting and is fp32 here."""
    if precision == "bf16":
        return torch.bfloat16
    if precision == "auto" and _native_bf16():
        return torch.bfloat16
    return None


def _native_bf16() -> bool:
    checks = [getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    return any(bool(check()) for check in checks if check is not None)


def _autocast(amp: torch.dtype | None):
    return torch.autocast("cpu", dtype=amp) if amp is not None else nullcontext()


def lm_logits(model: nn.Module, ids: torch.Tensor, amp: torch.dtype | None = None, head_fp32: bool = False
              ) -> torch.Tensor:
    """Next-token logits for every position of `ids` (batch, seq) -> (batch, seq, vocab), the matrix
    products under `amp` autocast when given; with `head_fp32` the LM head multiplies in fp32 (targets kept
    to fp32 precision, at a fifth of a teacher's cost)."""
    if amp is None:
        return model(input_ids=ids, use_cache=False).logits
    if head_fp32:
        with _autocast(amp):
            hidden = model.get_decoder()(input_ids=ids, use_cache=False).last_hidden_state
        return model.get_output_embeddings()(hidden.float())
    with _autocast(amp):
        return model(input_ids=ids, use_cache=False).logits


def _fusable(params: Sequence[torch.Tensor]) -> bool:
    """AdamW's fused kernel (one pass over each parameter, its gradient and both moments: about 5x faster
    than the per-tensor loop on a CPU for a student of 70M parameters) takes float parameters on the CPU
    or CUDA."""
    return bool(params) and all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in params)


def _batches(blocks: torch.Tensor, batch_size: int) -> list[torch.Tensor]:
    return [blocks[i:i + batch_size] for i in range(0, len(blocks), batch_size)]


@torch.no_grad()
def perplexity(model: nn.Module, blocks: torch.Tensor, batch_size: int = EVAL_BATCH) -> float:
    """exp(mean next-token negative log-likelihood) over every predicted token of `blocks` (PyTorch)."""
    was = model.training
    model.eval()
    total, count = 0.0, 0
    for ids in _batches(blocks, batch_size):
        logits = lm_logits(model, ids)[:, :-1].float()
        nll = nn.functional.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten(), reduction="sum")
        total += float(nll)
        count += ids[:, 1:].numel()
    model.train(was)
    mean = total / max(count, 1)
    return math.exp(mean) if mean < 700 else math.inf  # a diverged model: inf, not an OverflowError


@torch.no_grad()
def next_token_agreement(a: nn.Module | Callable, b: nn.Module | Callable, blocks: torch.Tensor,
                         batch_size: int = EVAL_BATCH) -> float:
    """Percentage of positions where the two models' most likely next token is the same."""
    same, count = 0, 0
    for ids in _batches(blocks, batch_size):
        pa, pb = lm_logits(a, ids).argmax(-1), lm_logits(b, ids).argmax(-1)
        same += int((pa == pb).sum())
        count += pa.numel()
    return 100.0 * same / max(count, 1)


@torch.no_grad()
def build_topk_cache(teacher: nn.Module, blocks: torch.Tensor, batch_size: int, cache: TopKCache,
                     progress: Progress | None = None, amp: torch.dtype | None = None) -> int:
    """Write the teacher's top-k next-token distributions of every batch the cache lacks (its layers under
    `amp` autocast when given, its LM head in fp32); returns how many batches were computed (0 when the
    cache was complete)."""
    progress = progress or NullProgress()
    batches = _batches(blocks, batch_size)
    todo = [i for i in range(len(batches)) if not cache.has(i)]
    teacher.eval()
    with progress.task("teacher top-k cache", len(todo)) as bar:
        for i in todo:
            cache.write(i, lm_logits(teacher, batches[i], amp, head_fp32=True)[:, :-1])
            bar.advance()
    return len(todo)


def train_lm(student: nn.Module, train: torch.Tensor, val: torch.Tensor, *, steps: int, lr: float, batch_size: int,
             seed: int, kind: str = "forward_kl", alpha: float = 0.5, temperature: float = 1.0, beta: float = 0.5,
             teacher: nn.Module | None = None, cache: TopKCache | None = None, eval_every: int | None = None,
             warmup: float = 0.05, progress: Progress | None = None, label: str = "training",
             on_policy: float = 0.0, policy_teacher: nn.Module | None = None,
             policy_tokens: int = 32, amp: torch.dtype | None = None,
             last_batches: Sequence[int] = ()) -> LMTrainResult:
    """Train `student` in place for `steps` optimizer steps (AdamW, linear warm-up then cosine decay).

    With a teacher (live) or a cache (its top-k, as build_topk_cache wrote it for these blocks and this
    batch size) and alpha > 0 the loss is alpha * divergence(kind) + (1 - alpha) * next-token CE;
    otherwise CE alone (the baseline). Keeps the weights with the lowest validation perplexity (on the first
    SELECTION_BLOCKS validation blocks).

    With `on_policy` > 0 (and `policy_teacher`, a live teacher) that share of the steps, drawn with the
    seed, is on-policy (GKD): the student samples the last `policy_tokens` tokens of each block at the
    temperature, and the divergence to the teacher's distributions on those sampled tokens is the loss.

    `amp` (lm_amp) runs the forward passes under autocast; weights, optimizer state, losses and the
    validation perplexity stay fp32.

    `last_batches` (batch indices) are trained on in the last len(last_batches) steps, once each in a seeded
    order, and not before; the other steps visit the other batches as usual."""
    if steps < 1:
        raise ValueError("steps must be >= 1")
    if teacher is not None and cache is not None:
        raise ValueError("give a live teacher or a cache, not both")
    if on_policy > 0 and policy_teacher is None:
        raise ValueError("on-policy steps need the live teacher (policy_teacher)")
    if on_policy > 0 and not 1 <= policy_tokens < train.shape[1]:
        raise ValueError(f"policy_tokens {policy_tokens} must be between 1 and seq_len - 1 ({train.shape[1] - 1})")
    progress = progress or NullProgress()
    policy_rng = random.Random(seed + 7919)
    sampler = torch.Generator().manual_seed(seed)
    policy_steps = 0
    distil = (teacher is not None or cache is not None) and alpha > 0
    batches = _batches(train, batch_size)
    tail = list(last_batches)
    if len(set(tail)) != len(tail) or any(not 0 <= b < len(batches) for b in tail):
        raise ValueError(f"last_batches must be distinct batch indices below {len(batches)}")
    if tail and (len(tail) > steps or len(tail) == len(batches)):
        raise ValueError(f"last_batches: {len(tail)} of {len(batches)} batches in {steps} steps leaves no room "
                         "for the others")
    rest = sorted(set(range(len(batches))) - set(tail))
    rng = random.Random(seed)
    random.Random(seed + 1).shuffle(tail)
    torch.manual_seed(seed)
    params = [p for p in student.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01, fused=_fusable(params))
    warm = max(1, int(steps * warmup))

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        return 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, steps - warm)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
    every = eval_every or max(1, steps // 4)
    val = val[:SELECTION_BLOCKS]
    best = (perplexity(student, val), 0, copy.deepcopy(student.state_dict()))
    curve: list[dict] = [{"step": 0, "val_perplexity": round(best[0], 4)}]
    order: list[int] = []
    t0 = time.perf_counter()
    running = 0.0
    student.train()
    with progress.task(label, steps) as bar:
        for step in range(steps):
            if step >= steps - len(tail):
                b = tail[step - (steps - len(tail))]
            else:
                if not order:
                    order = list(rest)
                    rng.shuffle(order)
                b = order.pop()
            ids = batches[b]
            if on_policy > 0 and policy_rng.random() < on_policy:
                prompt = ids.shape[1] - policy_tokens
                ids = sample_continuations(student, ids[:, :prompt], policy_tokens, temperature, sampler)
                with torch.no_grad():
                    t_logits = lm_logits(policy_teacher, ids, amp)[:, :-1]  # type: ignore[arg-type]
                logits = lm_logits(student, ids, amp)[:, :-1]
                mask = torch.zeros_like(ids[:, 1:], dtype=torch.bool)
                mask[:, prompt - 1:] = True  # the targets the student sampled
                loss = lm_distill_loss(logits, t_logits, None, mask, kind, 1.0, temperature, beta)
                policy_steps += 1
            elif not distil:
                loss = next_token_ce(lm_logits(student, ids, amp)[:, :-1], ids[:, 1:], None)
            elif cache is not None:
                top, mask = cache.read(b)
                loss = lm_distill_loss_topk(lm_logits(student, ids, amp)[:, :-1], top, ids[:, 1:], mask, kind, alpha,
                                            temperature, beta)
            else:
                logits, labels = lm_logits(student, ids, amp)[:, :-1], ids[:, 1:]
                with torch.no_grad():
                    t_logits = lm_logits(teacher, ids, amp)[:, :-1]  # type: ignore[arg-type]
                loss = lm_distill_loss(logits, t_logits, labels, None, kind, alpha, temperature, beta)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(student.parameters(), 1.0)
            opt.step()
            sched.step()
            running += loss.item()
            if (step + 1) % every == 0 or step + 1 == steps:
                ppl = perplexity(student, val)
                curve.append({"step": step + 1, "loss": round(running / ((step % every) + 1), 5),
                              "val_perplexity": round(ppl, 4) if math.isfinite(ppl) else None, "seconds": round(time.perf_counter() - t0, 2)})
                running = 0.0
                if ppl < best[0]:
                    best = (ppl, step + 1, copy.deepcopy(student.state_dict()))
                student.train()
            bar.advance()
    student.load_state_dict(best[2])
    student.eval()
    return LMTrainResult(val_perplexity=best[0], steps=steps, seconds=round(time.perf_counter() - t0, 2),
                         curve=curve, best_step=best[1], on_policy_steps=policy_steps)
