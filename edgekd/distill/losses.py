"""Distillation losses as pure functions of logits/features (batch-mean unless stated)."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def soft_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """T^2 * KL(softmax(teacher/T) || softmax(student/T)), batch-mean."""
    t = temperature
    log_p_s = F.log_softmax(student_logits / t, dim=1)
    log_p_t = F.log_softmax(teacher_logits / t, dim=1)
    kl = (log_p_t.exp() * (log_p_t - log_p_s)).sum(dim=1)
    return (t * t) * kl.mean()


def hinton_kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor | None,
                   temperature: float, alpha: float) -> torch.Tensor:
    """alpha * T^2 * KL(p_t^T || p_s^T) + (1 - alpha) * CE(student, labels) (Hinton et al. 2015).

    Labels equal to -1 mark unlabeled samples: they get the soft term only; CE averages over the
    labeled ones (and is 0 when none are labeled)."""
    soft = soft_kl(student_logits, teacher_logits, temperature)
    if labels is None or alpha >= 1.0:
        return alpha * soft if labels is not None else soft
    labeled = labels >= 0
    if labeled.all():
        hard = F.cross_entropy(student_logits, labels)
    elif labeled.any():
        hard = F.cross_entropy(student_logits[labeled], labels[labeled])
    else:
        hard = student_logits.sum() * 0.0
    return alpha * soft + (1.0 - alpha) * hard


def reverse_kl_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """T^2 * KL(softmax(student/T) || softmax(teacher/T)) (mode-seeking, as in MiniLLM), batch-mean."""
    return soft_kl(teacher_logits, student_logits, temperature)


def logit_mse_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """Mean squared error between raw logits (Ba & Caruana)."""
    return F.mse_loss(student_logits, teacher_logits)


def cosine_feature_loss(student_feat: torch.Tensor, teacher_feat: torch.Tensor) -> torch.Tensor:
    """MSE between L2-normalised (per sample) feature maps, after resizing the student's to the teacher's."""
    if student_feat.shape[2:] != teacher_feat.shape[2:]:
        student_feat = F.interpolate(student_feat, size=teacher_feat.shape[2:], mode="bilinear", align_corners=False)
    s = F.normalize(student_feat.flatten(1), dim=1)
    t = F.normalize(teacher_feat.flatten(1), dim=1)
    return (s - t).pow(2).sum(dim=1).mean()


def attention_map(feat: torch.Tensor, p: int = 2) -> torch.Tensor:
    """Spatial attention map: channel-mean of |f|^p, flattened and L2-normalised (Zagoruyko & Komodakis)."""
    return F.normalize(feat.abs().pow(p).mean(dim=1).flatten(1), dim=1)


def attention_transfer_loss(student_feat: torch.Tensor, teacher_feat: torch.Tensor, p: int = 2) -> torch.Tensor:
    """Mean squared distance between attention maps (spatial sizes aligned by interpolation)."""
    if student_feat.shape[2:] != teacher_feat.shape[2:]:
        student_feat = F.interpolate(student_feat, size=teacher_feat.shape[2:], mode="bilinear", align_corners=False)
    return (attention_map(student_feat, p) - attention_map(teacher_feat, p)).pow(2).mean()


def rkd_distance_loss(student_emb: torch.Tensor, teacher_emb: torch.Tensor) -> torch.Tensor:
    """RKD distance loss: Huber between mean-normalised pairwise distances (Park et al. 2019)."""
    def _pd(e: torch.Tensor) -> torch.Tensor:
        d = torch.cdist(e.flatten(1), e.flatten(1))
        return d / d[d > 0].mean().clamp_min(1e-12)

    with torch.no_grad():
        t = _pd(teacher_emb)
    return F.smooth_l1_loss(_pd(student_emb), t)


def gram_relation_loss(student_emb: torch.Tensor, teacher_emb: torch.Tensor) -> torch.Tensor:
    """MSE between the batch's normalised Gram (cosine-similarity) matrices."""
    s = F.normalize(student_emb.flatten(1), dim=1)
    t = F.normalize(teacher_emb.flatten(1), dim=1)
    return F.mse_loss(s @ s.T, t @ t.T)
