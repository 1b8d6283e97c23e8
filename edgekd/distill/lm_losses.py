"""Distillation losses for causal language models, as pure functions of token distributions.

Shapes: logits (batch, seq, vocab); a mask (batch, seq), nonzero for the target tokens that count
and 0 for padding and prompt tokens (None: every token counts). Position i of the student's logits,
the teacher's logits, the labels and the mask all describe the same target token: the caller does the
next-token shift (logits[:, :-1] against input_ids[:, 1:]) once, before calling any of these.

Every loss is a per-token divergence averaged over the unmasked tokens. An all-zero mask gives 0 with
a gradient path (a batch of only prompt tokens must not stop training with a NaN). The teacher is a
fixed target: its logits are detached, so gradients reach the student only.

    loss = alpha * divergence(teacher, student) + (1 - alpha) * CE(student, labels)

Divergences, on distributions softened by a temperature T and scaled by T^2 as in Hinton et al. 2015:
forward KL(p_T || p_S) (mean-seeking), reverse KL(p_S || p_T) (mode-seeking, MiniLLM, Gu et al. 2023)
and the generalized Jensen-Shannon divergence of GKD (Agarwal et al. 2023, arXiv:2306.13649) with TRL's
beta convention (see `generalized_jsd`).

The `*_topk` forms take a cached teacher (lm_cache.py): its top-k log-probabilities at temperature 1,
their token ids and the remaining probability mass. Both distributions are then compared over k + 1
buckets: the k cached tokens and one "rest" bucket holding everything else (the teacher's cached rest
mass against the student's probability outside those k tokens). With k = vocab this is the full loss.
"""
from __future__ import annotations

import itertools
import math
from typing import NamedTuple

import torch
import torch.nn.functional as F

__all__ = ["LM_DIVERGENCES", "TopKTeacher", "forward_kl", "forward_kl_topk", "generalized_jsd",
           "generalized_jsd_topk", "lm_distill_loss", "lm_distill_loss_topk", "masked_token_mean", "next_token_ce",
           "reverse_kl", "reverse_kl_topk", "topk_teacher"]

LM_DIVERGENCES = ("forward_kl", "reverse_kl", "jsd")


class TopKTeacher(NamedTuple):
    """A teacher distribution kept as its k most likely tokens per position (as lm_cache stores it).

    values: (batch, seq, k) log-probabilities at temperature 1, largest first; indices: (batch, seq, k)
    token ids; rest_mass: (batch, seq) probability of all other tokens, 1 - sum(exp(values))."""

    values: torch.Tensor
    indices: torch.Tensor
    rest_mass: torch.Tensor


def _compute_dtype(x: torch.Tensor) -> torch.Tensor:
    """float16/bfloat16 inputs are upcast to float32 (softmax over a large vocabulary needs it)."""
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def _finite(log_p: torch.Tensor) -> torch.Tensor:
    """Clamp -inf log-probabilities (tokens masked out with -inf logits, an empty rest bucket) to the
    most negative finite value: then p * (log p - log q) is exactly 0 there, and no 0 * inf NaN
    appears in the values or the gradients (clamp passes no gradient to the clamped entries)."""
    return log_p.clamp_min(torch.finfo(log_p.dtype).min)


def _log_softmax(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    return _finite(F.log_softmax(_compute_dtype(logits) / temperature, dim=-1))


def _kl(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """Per-token KL(p || q) = sum_v p_v (log p_v - log q_v) over the last dimension."""
    return (log_p.exp() * (log_p - log_q)).sum(dim=-1)


def _jsd(log_p_s: torch.Tensor, log_p_t: torch.Tensor, beta: float) -> torch.Tensor:
    """Per-token generalized JSD with mixture m = beta * p_T + (1 - beta) * p_S, in log space."""
    if beta == 0.0:
        return _kl(log_p_t, log_p_s)
    if beta == 1.0:
        return _kl(log_p_s, log_p_t)
    log_m = torch.logaddexp(log_p_t + math.log(beta), log_p_s + math.log1p(-beta))
    return beta * _kl(log_p_t, log_m) + (1.0 - beta) * _kl(log_p_s, log_m)


def _check(temperature: float, beta: float = 0.5) -> None:
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must be in [0, 1], got {beta}")


def masked_token_mean(per_token: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Mean of a (batch, seq) tensor over the tokens where mask != 0; 0 (with a graph) when none are.

    Masked entries are selected away (torch.where), not multiplied by 0, so a NaN or inf computed at a
    padding position cannot leak into the mean."""
    if mask is None:
        return per_token.mean()
    keep = mask.to(device=per_token.device) != 0
    total = torch.where(keep, per_token, torch.zeros_like(per_token)).sum()
    return total / keep.sum().clamp_min(1).to(per_token.dtype)


def forward_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, mask: torch.Tensor | None,
               temperature: float = 1.0) -> torch.Tensor:
    """T^2 * KL(p_T || p_S), both softened by T, averaged over the unmasked tokens (Hinton's KD per token)."""
    _check(temperature)
    kl = _kl(_log_softmax(teacher_logits.detach(), temperature), _log_softmax(student_logits, temperature))
    return temperature ** 2 * masked_token_mean(kl, mask)


def reverse_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, mask: torch.Tensor | None,
               temperature: float = 1.0) -> torch.Tensor:
    """T^2 * KL(p_S || p_T), both softened by T, averaged over the unmasked tokens (MiniLLM's objective)."""
    _check(temperature)
    kl = _kl(_log_softmax(student_logits, temperature), _log_softmax(teacher_logits.detach(), temperature))
    return temperature ** 2 * masked_token_mean(kl, mask)


def generalized_jsd(student_logits: torch.Tensor, teacher_logits: torch.Tensor, mask: torch.Tensor | None,
                    beta: float = 0.5, temperature: float = 1.0) -> torch.Tensor:
    """T^2 * generalized JSD(beta), averaged over the unmasked tokens, with TRL's convention
    (trl GKDTrainer.generalized_jsd_loss):

        m = beta * p_T + (1 - beta) * p_S
        JSD(beta) = beta * KL(p_T || m) + (1 - beta) * KL(p_S || m)

    beta = 0.5 is the symmetric Jensen-Shannon divergence. The formula tends to 0 at both ends (m becomes
    p_S or p_T), so, as TRL does, the ends are defined separately: beta = 0 is forward KL(p_T || p_S) and
    beta = 1 is reverse KL(p_S || p_T), exactly `forward_kl` and `reverse_kl` (JSD(beta) / beta tends to
    forward KL as beta -> 0, and JSD(beta) / (1 - beta) to reverse KL as beta -> 1). The mixture is taken
    in log space (logaddexp). Unlike TRL, the value is scaled by T^2 like the two KLs, so that the ends
    match them at every temperature; at T = 1 it equals TRL's."""
    _check(temperature, beta)
    jsd = _jsd(_log_softmax(student_logits, temperature), _log_softmax(teacher_logits.detach(), temperature), beta)
    return temperature ** 2 * masked_token_mean(jsd, mask)


def next_token_ce(student_logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Cross-entropy of the student on the target tokens `labels` (batch, seq), averaged over the unmasked
    ones. Labels at masked positions are ignored whatever they hold (-100, pad ids). Computed in float32
    (float64 for float64 logits) a block of rows at a time, with a hand-written backward (see _RowCE)."""
    keep = labels >= 0 if mask is None else (mask.to(labels.device) != 0)
    safe = torch.where(keep, labels, torch.zeros_like(labels)).long()
    ce = _RowCE.apply(student_logits, safe)
    return masked_token_mean(ce, keep)


ROWS = 32  # rows of the vocabulary-wide passes computed together (a few MB: they stay in the CPU's cache)


def _row_blocks(shape: torch.Size, rows: int = ROWS):
    """Index tuples covering a (..., seq, vocab) tensor a block of at most `rows` positions at a time;
    each block is contiguous whenever the last dimension is (a [:, :-1] view included)."""
    lead, seq = shape[:-2], shape[-2]
    for outer in itertools.product(*(range(n) for n in lead)):
        for start in range(0, seq, rows):
            yield (*outer, slice(start, min(start + rows, seq)))


def _cdt(logits: torch.Tensor) -> torch.dtype:
    return torch.float64 if logits.dtype == torch.float64 else torch.float32


class _RowCE(torch.autograd.Function):
    """Per-token cross-entropy log(sum exp z) - z[label], (..., vocab) logits of any float dtype, in
    float32 a block of rows at a time: the full-vocabulary float32 copies of F.cross_entropy on bf16
    logits (the upcast, the log-softmax it saves, the gradient) are never made. Backward recomputes
    softmax(z) per block from the saved logits and log-sum-exp: d nll / dz = p - onehot(label)."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, labels: torch.Tensor):  # type: ignore[override]
        cdt = _cdt(logits)
        lse = torch.empty(logits.shape[:-1], dtype=cdt, device=logits.device)
        for at in _row_blocks(logits.shape):
            z = logits[at].to(cdt, copy=True)
            m = z.amax(dim=-1, keepdim=True)
            lse[at] = z.sub_(m).exp_().sum(dim=-1).log_().add_(m.squeeze(-1))
        nll = lse - logits.gather(-1, labels.unsqueeze(-1)).squeeze(-1).to(cdt)
        ctx.save_for_backward(logits, labels, lse)
        return nll

    @staticmethod
    def backward(ctx, g_nll):  # type: ignore[override]
        logits, labels, lse = ctx.saved_tensors
        cdt = lse.dtype
        grad = torch.empty_like(logits)
        g_nll = g_nll.to(cdt)
        for at in _row_blocks(logits.shape):
            g = g_nll[at].unsqueeze(-1)
            p = logits[at].to(cdt, copy=True).sub_(lse[at].unsqueeze(-1)).exp_().mul_(g)
            grad[at] = p.scatter_add_(-1, labels[at].unsqueeze(-1), -g)
        return grad, None


def _mix_check(alpha: float, labels: torch.Tensor | None) -> None:
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    if alpha < 1.0 and labels is None:
        raise ValueError("labels are needed when alpha < 1 (the cross-entropy term)")


def _mix(divergence: torch.Tensor | None, student_logits: torch.Tensor, labels: torch.Tensor | None,
         mask: torch.Tensor | None, alpha: float) -> torch.Tensor:
    _mix_check(alpha, labels)
    terms = [] if divergence is None else [alpha * divergence]  # divergence is None only when alpha = 0
    if alpha < 1.0:
        terms.append((1.0 - alpha) * next_token_ce(student_logits, labels, mask))  # type: ignore[arg-type]
    return terms[0] if len(terms) == 1 else terms[0] + terms[1]


def _kind(kind: str) -> None:
    if kind not in LM_DIVERGENCES:
        raise ValueError(f"unknown LM distillation divergence {kind!r} (known: {', '.join(LM_DIVERGENCES)})")


def lm_distill_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor | None,
                    mask: torch.Tensor | None, kind: str = "forward_kl", alpha: float = 0.5,
                    temperature: float = 1.0, beta: float = 0.5) -> torch.Tensor:
    """alpha * divergence + (1 - alpha) * next_token_ce, kind in LM_DIVERGENCES ("jsd" uses beta).

    A term whose weight is 0 is not computed; labels may be None when alpha = 1."""
    _kind(kind)
    div = None
    if alpha > 0.0:
        if kind == "forward_kl":
            div = forward_kl(student_logits, teacher_logits, mask, temperature)
        elif kind == "reverse_kl":
            div = reverse_kl(student_logits, teacher_logits, mask, temperature)
        else:
            div = generalized_jsd(student_logits, teacher_logits, mask, beta, temperature)
    return _mix(div, student_logits, labels, mask, alpha)


# --- cached (top-k) teachers -------------------------------------------------------------------------------


def topk_teacher(teacher_logits: torch.Tensor, k: int) -> TopKTeacher:
    """The k most likely tokens of a live teacher at temperature 1, as lm_cache stores them (full precision).

    The rest mass is the sum of the other probabilities (the k zeroed in place), which equals
    1 - sum(exp(values)) without that subtraction's cancellation when the top k hold nearly everything."""
    log_p = F.log_softmax(_compute_dtype(teacher_logits.detach()), dim=-1)
    vocab = log_p.shape[-1]
    if not 1 <= k <= vocab:
        raise ValueError(f"k must be in [1, {vocab}], got {k}")
    values, indices = log_p.topk(k, dim=-1)
    if k == vocab:
        return TopKTeacher(values, indices, torch.zeros_like(values[..., 0]))
    rest = log_p.exp_().scatter_(-1, indices, 0.0).sum(dim=-1)  # log_p (a new tensor) is not needed any more
    return TopKTeacher(values, indices, rest)


class _Buckets(torch.autograd.Function):
    """The student's log-probabilities over the k + 1 buckets at temperature T, and (with labels, T = 1)
    its per-token cross-entropy, in one pass over the vocabulary forward and one backward, a block of
    rows at a time (float32 whatever the logits' dtype; float64 stays float64).

    Forward, per block: e = exp((z - max z) / T); the k bucket entries are read from it and zeroed, so the
    rest bucket's sum is exact (no 1 - sum cancellation) and the total is that sum plus the k read
    entries. Backward recomputes e per block from the saved logits (no vocabulary-wide float32 tensor is
    kept between the passes): with L = log of the total, d s_top / dz = onehot(idx) - p,
    d s_rest / dz = e'/rest - p (e' zero on the k tokens), d nll / dz = p - onehot(label); a rest bucket
    with no mass (k = vocab) passes no gradient."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, idx: torch.Tensor, labels: torch.Tensor | None,
                temperature: float):  # type: ignore[override]
        cdt = _cdt(logits)
        lead = logits.shape[:-1]
        m = torch.empty((*lead, 1), dtype=cdt, device=logits.device)
        e_top = torch.empty(idx.shape, dtype=cdt, device=logits.device)
        rest = torch.empty_like(m)
        for at in _row_blocks(logits.shape):
            e = logits[at].to(cdt, copy=True)
            m[at] = e.amax(dim=-1, keepdim=True)
            e.sub_(m[at])
            if temperature != 1.0:
                e.div_(temperature)
            e.exp_()
            e_top[at] = e.gather(-1, idx[at])
            rest[at] = e.scatter_(-1, idx[at], 0.0).sum(dim=-1, keepdim=True)
        total = rest + e_top.sum(dim=-1, keepdim=True)
        log_total = total.log()
        s_top = (logits.gather(-1, idx).to(cdt) - m) / temperature - log_total
        s_rest = rest.log() - log_total
        nll = None
        if labels is not None:  # temperature 1 only (the caller's contract)
            nll = (log_total - (logits.gather(-1, labels.unsqueeze(-1)).to(cdt) - m)).squeeze(-1)
        ctx.save_for_backward(logits, m, e_top, total, rest, idx, labels if labels is not None else idx[..., :0])
        ctx.temperature, ctx.has_labels = temperature, labels is not None
        return s_top, s_rest, nll if nll is not None else s_rest.new_zeros(s_rest.shape[:-1])

    @staticmethod
    def backward(ctx, g_top, g_rest, g_nll):  # type: ignore[override]
        logits, m, e_top, total, rest, idx, labels = ctx.saved_tensors
        temperature = ctx.temperature
        g_top = torch.zeros_like(e_top) if g_top is None else g_top
        g_rest = torch.zeros_like(rest) if g_rest is None else g_rest
        has_nll = ctx.has_labels and g_nll is not None
        g_l = -(g_top.sum(-1, keepdim=True) + g_rest)  # d loss / d log_total
        if has_nll:
            g_l = g_l + g_nll.unsqueeze(-1)
        per_rest = torch.where(rest > 0, g_rest / rest.clamp_min(torch.finfo(rest.dtype).tiny), torch.zeros_like(rest))
        scale = (g_l / total + per_rest) / temperature  # d loss / dz = e * scale, before the k and the label
        top = (g_top + g_l * e_top / total) / temperature
        label = (-g_nll.unsqueeze(-1) / temperature) if has_nll else None
        grad = torch.empty_like(logits)
        for at in _row_blocks(logits.shape):
            e = logits[at].to(m.dtype, copy=True).sub_(m[at])
            if temperature != 1.0:
                e.div_(temperature)
            e = e.exp_().scatter_(-1, idx[at], 0.0).mul_(scale[at])
            e.scatter_add_(-1, idx[at], top[at])
            if label is not None:
                e.scatter_add_(-1, labels[at].unsqueeze(-1), label[at])
            grad[at] = e
        return grad, None, None, None


def _bucket_log_probs(student_logits: torch.Tensor, teacher: TopKTeacher,
                      temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Student and teacher log-probabilities over k + 1 buckets (the k cached tokens, then the rest).

    Student: its exact tempered distribution, softmax(z / T), summed outside the k tokens for the rest
    bucket. Teacher: the cached temperature-1 log-probabilities and log(rest_mass), divided by T and
    re-normalised over the k + 1 buckets. At T = 1 this is exact (up to the cache's float16 rounding,
    which the re-normalisation absorbs). At T != 1 it treats the rest as one token: the true tempered
    rest is sum_j p_j^(1/T) over the other tokens, and (sum_j p_j)^(1/T) under-counts it for T > 1 (and
    over-counts it for T < 1); the gap is small when the rest mass is small, i.e. when k covers the teacher."""
    log_s, _ = _student_buckets(student_logits, teacher, temperature, None)
    return log_s, _teacher_buckets(teacher, temperature, log_s)


def _student_buckets(student_logits: torch.Tensor, teacher: TopKTeacher, temperature: float,
                     labels: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The student's k + 1 bucket log-probabilities, and with `labels` (T = 1 only) its per-token CE."""
    if labels is not None and temperature != 1.0:
        raise ValueError("the fused cross-entropy is at temperature 1 only")
    idx = teacher.indices.to(device=student_logits.device).long()
    safe = None if labels is None else labels.clamp_min(0).long()
    s_top, s_rest, nll = _Buckets.apply(student_logits, idx, safe, float(temperature))
    return _finite(torch.cat([s_top, s_rest], dim=-1)), (nll if labels is not None else None)


def _teacher_buckets(teacher: TopKTeacher, temperature: float, like: torch.Tensor) -> torch.Tensor:
    values = teacher.values.detach().to(device=like.device, dtype=like.dtype)
    rest = teacher.rest_mass.detach().to(device=like.device, dtype=like.dtype).clamp_min(0.0).unsqueeze(-1)
    return _finite(F.log_softmax(torch.cat([values, rest.log()], dim=-1) / temperature, dim=-1))


def forward_kl_topk(student_logits: torch.Tensor, topk_values: torch.Tensor, topk_indices: torch.Tensor,
                    rest_mass: torch.Tensor, mask: torch.Tensor | None, temperature: float = 1.0) -> torch.Tensor:
    """`forward_kl` against a cached top-k teacher, over k + 1 buckets (see _bucket_log_probs)."""
    _check(temperature)
    log_s, log_t = _bucket_log_probs(student_logits, TopKTeacher(topk_values, topk_indices, rest_mass), temperature)
    return temperature ** 2 * masked_token_mean(_kl(log_t, log_s), mask)


def reverse_kl_topk(student_logits: torch.Tensor, topk_values: torch.Tensor, topk_indices: torch.Tensor,
                    rest_mass: torch.Tensor, mask: torch.Tensor | None, temperature: float = 1.0) -> torch.Tensor:
    """`reverse_kl` against a cached top-k teacher, over k + 1 buckets (see _bucket_log_probs)."""
    _check(temperature)
    log_s, log_t = _bucket_log_probs(student_logits, TopKTeacher(topk_values, topk_indices, rest_mass), temperature)
    return temperature ** 2 * masked_token_mean(_kl(log_s, log_t), mask)


def generalized_jsd_topk(student_logits: torch.Tensor, topk_values: torch.Tensor, topk_indices: torch.Tensor,
                         rest_mass: torch.Tensor, mask: torch.Tensor | None, beta: float = 0.5,
                         temperature: float = 1.0) -> torch.Tensor:
    """`generalized_jsd` against a cached top-k teacher, over k + 1 buckets (see _bucket_log_probs)."""
    _check(temperature, beta)
    log_s, log_t = _bucket_log_probs(student_logits, TopKTeacher(topk_values, topk_indices, rest_mass), temperature)
    return temperature ** 2 * masked_token_mean(_jsd(log_s, log_t, beta), mask)


def lm_distill_loss_topk(student_logits: torch.Tensor, teacher: TopKTeacher, labels: torch.Tensor | None,
                         mask: torch.Tensor | None, kind: str = "forward_kl", alpha: float = 0.5,
                         temperature: float = 1.0, beta: float = 0.5) -> torch.Tensor:
    """`lm_distill_loss` with a cached top-k teacher (a TopKTeacher, as lm_cache.TopKCache.read returns).

    At temperature 1 the cross-entropy term comes out of the same pass over the student's vocabulary as
    the buckets (the same value as next_token_ce)."""
    _kind(kind)
    _check(temperature, beta)
    _mix_check(alpha, labels)
    if alpha == 0.0:
        return _mix(None, student_logits, labels, mask, alpha)
    fuse = alpha < 1.0 and labels is not None and temperature == 1.0
    log_s, nll = _student_buckets(student_logits, teacher, temperature, labels if fuse else None)
    log_t = _teacher_buckets(teacher, temperature, log_s)
    if kind == "forward_kl":
        per_token = _kl(log_t, log_s)
    elif kind == "reverse_kl":
        per_token = _kl(log_s, log_t)
    else:
        per_token = _jsd(log_s, log_t, beta)
    div = temperature ** 2 * masked_token_mean(per_token, mask)
    if not fuse:
        return _mix(div, student_logits, labels, mask, alpha)
    keep = labels >= 0 if mask is None else (mask.to(labels.device) != 0)  # type: ignore[union-attr]
    return alpha * div + (1.0 - alpha) * masked_token_mean(nll, keep)  # type: ignore[arg-type]
