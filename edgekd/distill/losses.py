"""Distillation losses as pure functions of logits and features (batch-mean unless stated).

Logit terms compare the student's logits with the teacher's; feature terms compare activations taken
at layers named in the config (see features.py). `combined_loss` weighs them as the config says:

    loss = (1 - alpha) * CE(student, labels on labeled samples) + alpha * sum_k w_k * L_k
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F

from ..config import DISTILL_LOSSES as LOSS_NAMES
from ..config import FEATURE_LOSSES, LOGIT_LOSSES

__all__ = ["FEATURE_LOSSES", "LOGIT_LOSSES", "LOSS_NAMES", "attention_transfer_loss", "combined_loss",
           "cosine_feature_loss", "gram_relation_loss", "hinton_kd_loss", "logit_mse_loss", "reverse_kl_loss",
           "rkd_angle_loss", "rkd_distance_loss", "soft_kl", "soft_target_entropy"]


def soft_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """T^2 * KL(softmax(teacher/T) || softmax(student/T)), batch-mean."""
    t = temperature
    log_p_s = F.log_softmax(student_logits / t, dim=1)
    log_p_t = F.log_softmax(teacher_logits / t, dim=1)
    kl = (log_p_t.exp() * (log_p_t - log_p_s)).sum(dim=1)
    return (t * t) * kl.mean()


def labeled_cross_entropy(student_logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy averaged over the labeled samples (label >= 0); 0 (with a graph) when none are."""
    labeled = labels >= 0
    if labeled.all():
        return F.cross_entropy(student_logits, labels)
    if labeled.any():
        return F.cross_entropy(student_logits[labeled], labels[labeled])
    return student_logits.sum() * 0.0


def hinton_kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor | None,
                   temperature: float, alpha: float) -> torch.Tensor:
    """alpha * T^2 * KL(p_t^T || p_s^T) + (1 - alpha) * CE(student, labels) (Hinton et al. 2015).

    Labels equal to -1 mark unlabeled samples: they get the soft term only; CE averages over the
    labeled ones (and is 0 when none are labeled)."""
    soft = soft_kl(student_logits, teacher_logits, temperature)
    if labels is None or alpha >= 1.0:
        return alpha * soft if labels is not None else soft
    return alpha * soft + (1.0 - alpha) * labeled_cross_entropy(student_logits, labels)


def reverse_kl_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """T^2 * KL(softmax(student/T) || softmax(teacher/T)) (mode-seeking, as in MiniLLM), batch-mean."""
    return soft_kl(teacher_logits, student_logits, temperature)


def logit_mse_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """Mean squared error between raw logits (Ba & Caruana 2014)."""
    return F.mse_loss(student_logits, teacher_logits)


def align_spatial(feat: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Resize a NCHW map to `like`'s spatial size (bilinear); 2-D features pass through."""
    if feat.dim() == 4 and like.dim() == 4 and feat.shape[2:] != like.shape[2:]:
        return F.interpolate(feat, size=like.shape[2:], mode="bilinear", align_corners=False)
    return feat


def cosine_feature_loss(student_feat: torch.Tensor, teacher_feat: torch.Tensor) -> torch.Tensor:
    """Cosine-normalised MSE (FitNets hint): sum of squared differences of the per-sample L2-normalised
    features (= 2 - 2 cos), batch-mean, after resizing the student's map to the teacher's."""
    student_feat = align_spatial(student_feat, teacher_feat)
    s = F.normalize(student_feat.flatten(1), dim=1)
    t = F.normalize(teacher_feat.flatten(1), dim=1)
    return (s - t).pow(2).sum(dim=1).mean()


def attention_map(feat: torch.Tensor, p: int = 2) -> torch.Tensor:
    """Spatial attention map: channel-mean of |f|^p, flattened and L2-normalised (Zagoruyko & Komodakis)."""
    return F.normalize(feat.abs().pow(p).mean(dim=1).flatten(1), dim=1)


def attention_transfer_loss(student_feat: torch.Tensor, teacher_feat: torch.Tensor, p: int = 2) -> torch.Tensor:
    """Mean squared distance between attention maps (spatial sizes aligned by interpolation)."""
    student_feat = align_spatial(student_feat, teacher_feat)
    return (attention_map(student_feat, p) - attention_map(teacher_feat, p)).pow(2).mean()


def rkd_distance_loss(student_emb: torch.Tensor, teacher_emb: torch.Tensor) -> torch.Tensor:
    """RKD distance loss: Huber between pairwise distances, each divided by its mean (Park et al. 2019)."""
    def _pd(e: torch.Tensor) -> torch.Tensor:
        d = torch.cdist(e.flatten(1), e.flatten(1))
        return d / d[d > 0].mean().clamp_min(1e-12)

    with torch.no_grad():
        t = _pd(teacher_emb)
    return F.smooth_l1_loss(_pd(student_emb), t)


def rkd_angle_loss(student_emb: torch.Tensor, teacher_emb: torch.Tensor) -> torch.Tensor:
    """RKD angle loss: Huber between cos(angle e_i e_j e_k) over all triplets (Park et al. 2019)."""
    def _angles(e: torch.Tensor) -> torch.Tensor:
        e = e.flatten(1)
        diff = F.normalize(e.unsqueeze(0) - e.unsqueeze(1), p=2, dim=2)  # [j, i] = e_i - e_j, normalised
        return torch.bmm(diff, diff.transpose(1, 2)).flatten()  # [j, i, k] = <e_i - e_j, e_k - e_j>

    with torch.no_grad():
        t = _angles(teacher_emb)
    return F.smooth_l1_loss(_angles(student_emb), t)


def gram_relation_loss(student_emb: torch.Tensor, teacher_emb: torch.Tensor) -> torch.Tensor:
    """MSE between the batch's normalised Gram (cosine-similarity) matrices."""
    s = F.normalize(student_emb.flatten(1), dim=1)
    t = F.normalize(teacher_emb.flatten(1), dim=1)
    return F.mse_loss(s @ s.T, t @ t.T)


def pooled(feat: torch.Tensor) -> torch.Tensor:
    """A per-sample embedding of a feature map: global average pooling over the spatial dimensions."""
    return feat.flatten(2).mean(2) if feat.dim() > 2 else feat


def soft_target_entropy(teacher_logits: torch.Tensor, temperature: float) -> float:
    """Mean entropy of softmax(teacher/T) divided by log C: 1.0 means uniform soft targets."""
    log_p = F.log_softmax(teacher_logits.float() / temperature, dim=1)
    ent = -(log_p.exp() * log_p).sum(1).mean()
    return float(ent) / math.log(teacher_logits.shape[1])


def combined_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor | None, labels: torch.Tensor,
                  *, temperature: float, alpha: float, weights: Mapping[str, float],
                  student_feats: Sequence[torch.Tensor] = (), adapted_feats: Sequence[torch.Tensor] = (),
                  teacher_feats: Sequence[torch.Tensor] = ()) -> tuple[torch.Tensor, dict[str, float]]:
    """(1 - alpha) * CE(labeled) + alpha * sum_k weights[k] * L_k, with the terms' values for logging.

    Logit terms: kd (soft_kl), reverse_kl, logit_mse. Feature terms, summed over the layer pairs:
    feature (cosine_feature_loss on the adapted student map), attention (attention_transfer_loss),
    rkd_distance, rkd_angle, gram (on pooled features). With weights {kd: 1} this is hinton_kd_loss."""
    parts: dict[str, torch.Tensor] = {}
    for name, w in weights.items():
        if w == 0:
            continue
        if name == "kd":
            parts[name] = soft_kl(student_logits, teacher_logits, temperature)  # type: ignore[arg-type]
        elif name == "reverse_kl":
            parts[name] = reverse_kl_loss(student_logits, teacher_logits, temperature)  # type: ignore[arg-type]
        elif name == "logit_mse":
            parts[name] = logit_mse_loss(student_logits, teacher_logits)  # type: ignore[arg-type]
        elif name in FEATURE_LOSSES:
            terms = []
            for s, a, t in zip(student_feats, adapted_feats, teacher_feats, strict=True):
                if name == "feature":
                    terms.append(cosine_feature_loss(a, t))
                elif name == "attention":
                    terms.append(attention_transfer_loss(s, t))
                else:
                    fn = {"rkd_distance": rkd_distance_loss, "rkd_angle": rkd_angle_loss,
                          "gram": gram_relation_loss}[name]
                    terms.append(fn(pooled(s), pooled(t)))
            if terms:
                parts[name] = torch.stack(terms).sum()
        else:
            raise ValueError(f"unknown distillation loss {name!r} (known: {', '.join(LOSS_NAMES)})")
    total = student_logits.sum() * 0.0
    if alpha < 1.0:
        total = total + (1.0 - alpha) * labeled_cross_entropy(student_logits, labels)
    if alpha > 0.0:
        for name, value in parts.items():
            total = total + alpha * float(weights[name]) * value
    return total, {k: float(v.detach()) for k, v in parts.items()}
