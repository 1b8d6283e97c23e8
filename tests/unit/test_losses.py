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
