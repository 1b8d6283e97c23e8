import numpy as np
import torch

from edgekd.distill import hinton_kd_loss
from edgekd.distill.losses import logit_mse_loss, reverse_kl_loss


def _reference(s, t, y, T, a):
    s, t = s.double().numpy(), t.double().numpy()

    def softmax(z):
        e = np.exp(z - z.max(1, keepdims=True))
        return e / e.sum(1, keepdims=True)

    ps, pt = softmax(s / T), softmax(t / T)
    kl = (pt * (np.log(pt) - np.log(ps))).sum(1).mean()
    ce = -np.log(softmax(s)[np.arange(len(y)), y.numpy()]).mean()
    return a * T * T * kl + (1 - a) * ce


def test_hinton_matches_formula_on_random_inputs():
    g = torch.Generator().manual_seed(0)
    for T, a in [(1.0, 0.5), (4.0, 0.7), (8.0, 0.9), (2.0, 0.0), (3.0, 1.0)]:
        s, t = torch.randn(32, 10, generator=g) * 3, torch.randn(32, 10, generator=g) * 3
        y = torch.randint(0, 10, (32,), generator=g)
        got = float(hinton_kd_loss(s, t, y, T, a))
        assert abs(got - _reference(s, t, y, T, a)) < 1e-5


def test_hinton_is_zero_soft_term_when_student_equals_teacher():
    z = torch.randn(8, 5)
    assert float(hinton_kd_loss(z, z.clone(), torch.zeros(8, dtype=torch.long), 4.0, 1.0)) < 1e-6


def test_unlabeled_samples_get_only_the_soft_term():
    g = torch.Generator().manual_seed(1)
    s, t = torch.randn(6, 4, generator=g), torch.randn(6, 4, generator=g)
    y = torch.tensor([0, 1, -1, -1, 2, -1])
    got = float(hinton_kd_loss(s, t, y, 2.0, 0.6))
    lab = y >= 0
    ref = 0.6 * _reference(s, t, torch.zeros(6, dtype=torch.long), 2.0, 1.0) + \
        0.4 * float(torch.nn.functional.cross_entropy(s[lab], y[lab]))
    assert abs(got - ref) < 1e-5


def test_reverse_kl_and_mse():
    s, t = torch.randn(4, 3), torch.randn(4, 3)
    assert float(reverse_kl_loss(s, s, 2.0)) < 1e-7
    assert abs(float(logit_mse_loss(s, t)) - float(((s - t) ** 2).mean())) < 1e-7


# ---------------------------------------------------------------- the rest of the family, each against
# a direct transcription of its published formula (numpy, float64, explicit loops where the paper has sums)

def _np(t):
    return t.detach().double().numpy()


def _log_softmax(z):
    z = z - z.max(1, keepdims=True)
    return z - np.log(np.exp(z).sum(1, keepdims=True))


def _huber(a, b):
    d = np.abs(a - b)
    return np.where(d < 1.0, 0.5 * d * d, d - 0.5).mean()


def test_reverse_kl_matches_formula():
    from edgekd.distill.losses import reverse_kl_loss

    g = torch.Generator().manual_seed(2)
    s, t = torch.randn(16, 7, generator=g) * 2, torch.randn(16, 7, generator=g) * 2
    for T in (1.0, 3.0):
        ls, lt = _log_softmax(_np(s) / T), _log_softmax(_np(t) / T)
        ref = T * T * (np.exp(ls) * (ls - lt)).sum(1).mean()
        assert abs(float(reverse_kl_loss(s, t, T)) - ref) < 1e-5
        forward = float(hinton_kd_loss(s, t, None, T, 1.0))
        assert abs(float(reverse_kl_loss(s, t, T)) - forward) > 1e-3  # not the forward KL


def test_cosine_feature_loss_is_two_minus_two_cos_after_resizing():
    from edgekd.distill.losses import cosine_feature_loss

    g = torch.Generator().manual_seed(3)
    s, t = torch.randn(4, 6, 8, 8, generator=g), torch.randn(4, 6, 4, 4, generator=g)
    resized = torch.nn.functional.interpolate(s, size=(4, 4), mode="bilinear", align_corners=False)
    a, b = _np(resized).reshape(4, -1), _np(t).reshape(4, -1)
    cos = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    assert abs(float(cosine_feature_loss(s, t)) - (2 - 2 * cos).mean()) < 1e-5
    assert float(cosine_feature_loss(t * 3.0, t)) < 1e-6  # scale-invariant: normalised before the MSE


def test_attention_transfer_matches_formula():
    from edgekd.distill.losses import attention_transfer_loss

    g = torch.Generator().manual_seed(4)
    s, t = torch.randn(3, 5, 6, 6, generator=g), torch.randn(3, 9, 6, 6, generator=g)  # channels may differ

    def amap(f):
        q = (np.abs(_np(f)) ** 2).mean(1).reshape(len(f), -1)
        return q / np.linalg.norm(q, axis=1, keepdims=True)

    ref = ((amap(s) - amap(t)) ** 2).mean()
    assert abs(float(attention_transfer_loss(s, t)) - ref) < 1e-6


def test_rkd_distance_matches_formula():
    from edgekd.distill.losses import rkd_distance_loss

    g = torch.Generator().manual_seed(5)
    s, t = torch.randn(6, 4, generator=g), torch.randn(6, 12, generator=g)

    def dist(e):
        e = _np(e)
        d = np.array([[np.linalg.norm(e[i] - e[j]) for j in range(len(e))] for i in range(len(e))])
        return d / d[d > 0].mean()

    assert abs(float(rkd_distance_loss(s, t)) - _huber(dist(s), dist(t))) < 1e-5
    assert float(rkd_distance_loss(t * 5.0, t)) < 1e-6  # distances are normalised by their mean


def test_rkd_angle_matches_formula():
    from edgekd.distill.losses import rkd_angle_loss

    g = torch.Generator().manual_seed(6)
    s, t = torch.randn(5, 3, generator=g), torch.randn(5, 8, generator=g)

    def angles(e):
        e = _np(e)
        n = len(e)
        out = np.zeros((n, n, n))
        for i in range(n):
            for j in range(n):
                for k in range(n):
                    u, v = e[i] - e[j], e[k] - e[j]
                    nu, nv = np.linalg.norm(u), np.linalg.norm(v)
                    out[j, i, k] = 0.0 if nu == 0 or nv == 0 else (u @ v) / (nu * nv)
        return out

    assert abs(float(rkd_angle_loss(s, t)) - _huber(angles(s), angles(t))) < 1e-5


def test_gram_relation_matches_formula():
    from edgekd.distill.losses import gram_relation_loss

    g = torch.Generator().manual_seed(7)
    s, t = torch.randn(6, 4, generator=g), torch.randn(6, 10, generator=g)

    def gram(e):
        e = _np(e)
        e = e / np.linalg.norm(e, axis=1, keepdims=True)
        return e @ e.T

    assert abs(float(gram_relation_loss(s, t)) - ((gram(s) - gram(t)) ** 2).mean()) < 1e-6


def test_combined_loss_weighs_terms_as_configured():
    from edgekd.distill.losses import (
        attention_transfer_loss,
        combined_loss,
        cosine_feature_loss,
        logit_mse_loss,
        soft_kl,
    )

    g = torch.Generator().manual_seed(8)
    s, t = torch.randn(8, 10, generator=g), torch.randn(8, 10, generator=g)
    y = torch.randint(0, 10, (8,), generator=g)
    plain, _ = combined_loss(s, t, y, temperature=4.0, alpha=0.7, weights={"kd": 1.0})
    assert abs(float(plain) - float(hinton_kd_loss(s, t, y, 4.0, 0.7))) < 1e-6
    fs, ft = torch.randn(8, 4, 6, 6, generator=g), torch.randn(8, 4, 3, 3, generator=g)
    fa = torch.randn(8, 4, 6, 6, generator=g)
    w = {"kd": 1.0, "logit_mse": 0.25, "feature": 0.5, "attention": 2.0}
    got, parts = combined_loss(s, t, y, temperature=2.0, alpha=0.6, weights=w, student_feats=[fs],
                               adapted_feats=[fa], teacher_feats=[ft])
    ce = torch.nn.functional.cross_entropy(s, y)
    ref = 0.4 * ce + 0.6 * (soft_kl(s, t, 2.0) + 0.25 * logit_mse_loss(s, t) + 0.5 * cosine_feature_loss(fa, ft)
                            + 2.0 * attention_transfer_loss(fs, ft))
    assert abs(float(got) - float(ref)) < 1e-5
    assert set(parts) == {"kd", "logit_mse", "feature", "attention"}
    ce_only, _ = combined_loss(s, t, y, temperature=2.0, alpha=0.0, weights=w)
    assert abs(float(ce_only) - float(ce)) < 1e-6


def test_combined_loss_rejects_unknown_term():
    import pytest

    from edgekd.distill.losses import combined_loss

    with pytest.raises(ValueError, match="unknown distillation loss 'crd'"):
        combined_loss(torch.randn(2, 3), torch.randn(2, 3), torch.zeros(2, dtype=torch.long), temperature=1.0,
                      alpha=0.5, weights={"crd": 1.0})


def test_soft_target_entropy_spans_zero_to_one():
    from edgekd.distill.losses import soft_target_entropy

    assert abs(soft_target_entropy(torch.zeros(4, 10), 1.0) - 1.0) < 1e-6
    confident = torch.full((4, 10), -50.0)
    confident[:, 0] = 50.0
    assert soft_target_entropy(confident, 1.0) < 1e-3
    assert soft_target_entropy(confident, 1000.0) > 0.95  # a very high temperature flattens anything
