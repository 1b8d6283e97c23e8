"""Causal-LM distillation losses: each against its formula written out in float64 numpy, masking,
the JSD's ends, the top-k (cached teacher) forms, and where the gradients go."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from edgekd.distill import lm_losses
from edgekd.distill.lm_losses import (
    forward_kl,
    forward_kl_topk,
    generalized_jsd,
    generalized_jsd_topk,
    lm_distill_loss,
    lm_distill_loss_topk,
    next_token_ce,
    reverse_kl,
    reverse_kl_topk,
    topk_teacher,
)

B, S, V = 3, 7, 11


def _inputs(seed=0, scale=3.0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    s = (torch.randn(B, S, V, generator=g) * scale).to(dtype)
    t = (torch.randn(B, S, V, generator=g) * scale).to(dtype)
    labels = torch.randint(0, V, (B, S), generator=g)
    mask = torch.ones(B, S, dtype=torch.long)
    mask[0, :2] = 0  # a prompt
    mask[2, 4:] = 0  # padding
    return s, t, labels, mask


def _np_log_softmax(z):
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def _np_kl(log_p, log_q):
    return (np.exp(log_p) * (log_p - log_q)).sum(-1)


def _np_mean(per_token, mask):
    m = mask.numpy().astype(bool)
    return per_token[m].mean()


def _ref(kind, s, t, mask, T=1.0, beta=0.5):
    ls = _np_log_softmax(s.double().numpy() / T)
    lt = _np_log_softmax(t.double().numpy() / T)
    if kind == "forward_kl":
        d = _np_kl(lt, ls)
    elif kind == "reverse_kl":
        d = _np_kl(ls, lt)
    else:
        m = np.log(beta * np.exp(lt) + (1 - beta) * np.exp(ls))
        d = beta * _np_kl(lt, m) + (1 - beta) * _np_kl(ls, m)
    return T * T * _np_mean(d, mask)


def _ref_ce(s, labels, mask):
    ls = _np_log_softmax(s.double().numpy())
    nll = -np.take_along_axis(ls, labels.numpy()[..., None], -1)[..., 0]
    return _np_mean(nll, mask)


@pytest.mark.parametrize("T", [1.0, 2.0, 0.5])
def test_divergences_match_their_formulas(T):
    for seed in range(3):
        s, t, _, mask = _inputs(seed)
        assert float(forward_kl(s, t, mask, T)) == pytest.approx(_ref("forward_kl", s, t, mask, T), abs=1e-5)
        assert float(reverse_kl(s, t, mask, T)) == pytest.approx(_ref("reverse_kl", s, t, mask, T), abs=1e-5)
        for beta in (0.1, 0.5, 0.9):
            want = _ref("jsd", s, t, mask, T, beta)
            assert float(generalized_jsd(s, t, mask, beta, T)) == pytest.approx(want, abs=1e-5)


def test_float64_inputs_stay_float64_and_are_exact():
    s, t, _, mask = _inputs(1, dtype=torch.float64)
    got = forward_kl(s, t, mask, 2.0)
    assert got.dtype == torch.float64
    assert float(got) == pytest.approx(_ref("forward_kl", s, t, mask, 2.0), abs=1e-12)


def test_half_inputs_are_computed_in_float32():
    s, t, _, mask = _inputs(2)
    got = reverse_kl(s.half(), t.half(), mask)
    assert got.dtype == torch.float32
    assert float(got) == pytest.approx(_ref("reverse_kl", s.half().float(), t.half().float(), mask), abs=1e-5)


def test_next_token_ce_matches_formula_and_ignores_masked_labels():
    s, _, labels, mask = _inputs(3)
    want = _ref_ce(s, labels, mask)
    assert float(next_token_ce(s, labels, mask)) == pytest.approx(want, abs=1e-5)
    junk = labels.masked_fill(mask == 0, -100)  # out-of-range ids at masked positions are never looked up
    assert float(next_token_ce(s, junk, mask)) == pytest.approx(want, abs=1e-5)
    assert float(next_token_ce(s, junk, None)) == pytest.approx(want, abs=1e-5)  # no mask: labels >= 0 count



@pytest.mark.parametrize("rows", [2, 32])
def test_next_token_ce_in_row_blocks_matches_torch_values_and_gradients(monkeypatch, rows):
    """The blockwise cross-entropy (its own backward) against F.cross_entropy on the same float32 values:
    a [:, :-1] view of bf16 logits as training passes it, blocks of 2 rows (a short last one) and one
    block; float64 gradcheck with a mask."""
    monkeypatch.setattr(lm_losses, "ROWS", rows)
    s, _, labels, mask = _inputs(33)
    full = torch.cat([s, s[:, :1]], dim=1).bfloat16()  # (B, S + 1, V): the view drops the last position
    z = full.clone().requires_grad_(True)
    got = next_token_ce(z[:, :-1], labels, mask)
    got.backward()
    ref = full.float().requires_grad_(True)
    keep = mask != 0
    per = F.cross_entropy(ref[:, :-1].flatten(0, 1), labels.flatten(), reduction="none").view(B, S)
    want = per[keep].mean()
    want.backward()
    assert got.dtype == torch.float32 and float(got.detach()) == pytest.approx(float(want.detach()), abs=1e-5)
    assert z.grad.dtype == torch.bfloat16
    assert torch.allclose(z.grad.float(), ref.grad.to(torch.bfloat16).float(), atol=1e-3)
    assert torch.equal(z.grad[:, -1], torch.zeros_like(z.grad[:, -1]))  # the dropped position gets nothing
    x = s.double().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda v: next_token_ce(v, labels, mask), (x,))

@pytest.mark.parametrize("kind", ["forward_kl", "reverse_kl", "jsd"])
def test_lm_distill_loss_mixes_divergence_and_ce(kind):
    s, t, labels, mask = _inputs(4)
    for alpha, T, beta in [(0.5, 2.0, 0.3), (1.0, 1.0, 0.5), (0.0, 4.0, 0.5), (0.8, 1.0, 0.7)]:
        want = alpha * _ref(kind, s, t, mask, T, beta) + (1 - alpha) * _ref_ce(s, labels, mask)
        got = lm_distill_loss(s, t, labels, mask, kind=kind, alpha=alpha, temperature=T, beta=beta)
        assert float(got) == pytest.approx(want, abs=1e-5)
    assert float(lm_distill_loss(s, t, None, mask, kind=kind, alpha=1.0)) == pytest.approx(
        _ref(kind, s, t, mask), abs=1e-5)


def test_bad_arguments_are_refused():
    s, t, labels, mask = _inputs()
    with pytest.raises(ValueError, match="unknown"):
        lm_distill_loss(s, t, labels, mask, kind="kd")
    with pytest.raises(ValueError, match="beta"):
        generalized_jsd(s, t, mask, beta=1.5)
    with pytest.raises(ValueError, match="temperature"):
        forward_kl(s, t, mask, temperature=0.0)
    with pytest.raises(ValueError, match="labels"):
        lm_distill_loss(s, t, None, mask, alpha=0.5)


@pytest.mark.parametrize("fn", [forward_kl, reverse_kl, generalized_jsd])
def test_masked_positions_do_not_change_the_loss(fn):
    s, t, _, mask = _inputs(5)
    base = float(fn(s, t, mask))
    g = torch.Generator().manual_seed(9)
    off = (mask == 0).unsqueeze(-1)
    s2 = torch.where(off, torch.randn(B, S, V, generator=g) * 50, s)
    t2 = torch.where(off, torch.randn(B, S, V, generator=g) * 50, t)
    assert float(fn(s2, t2, mask)) == pytest.approx(base, abs=1e-6)
    s3 = torch.where(off, torch.full_like(s, float("nan")), s)  # even garbage at padding cannot leak in
    assert float(fn(s3, t, mask)) == pytest.approx(base, abs=1e-6)
    assert float(fn(s, t, mask.bool())) == pytest.approx(base, abs=1e-6)


@pytest.mark.parametrize("fn", [forward_kl, reverse_kl, generalized_jsd])
def test_all_zero_mask_gives_zero_with_a_gradient_path(fn):
    s, t, _, mask = _inputs(6)
    s.requires_grad_(True)
    loss = fn(s, t, torch.zeros_like(mask))
    assert float(loss.detach()) == 0.0 and loss.requires_grad
    loss.backward()
    assert torch.equal(s.grad, torch.zeros_like(s))
    assert float(next_token_ce(s, torch.zeros(B, S, dtype=torch.long), torch.zeros_like(mask)).detach()) == 0.0


def test_jsd_ends_are_forward_and_reverse_kl():
    """TRL's convention: beta = 0 is forward KL(p_T || p_S), beta = 1 reverse KL(p_S || p_T), exactly."""
    s, t, _, mask = _inputs(7)
    for T in (1.0, 3.0):
        assert torch.equal(generalized_jsd(s, t, mask, beta=0.0, temperature=T), forward_kl(s, t, mask, T))
        assert torch.equal(generalized_jsd(s, t, mask, beta=1.0, temperature=T), reverse_kl(s, t, mask, T))
    # and they are the limits of JSD(beta) / beta and JSD(beta) / (1 - beta)
    s, t = s.double(), t.double()
    eps = 1e-9  # the next term is O(beta * chi^2), large for these far-apart distributions
    assert float(generalized_jsd(s, t, mask, beta=eps)) / eps == pytest.approx(float(forward_kl(s, t, mask)), rel=1e-4)
    assert float(generalized_jsd(s, t, mask, beta=1 - eps)) / (1 - (1 - eps)) == pytest.approx(
        float(reverse_kl(s, t, mask)), rel=1e-4)


def test_jsd_is_symmetric_at_one_half_and_zero_for_equal_distributions():
    s, t, _, mask = _inputs(8)
    assert float(generalized_jsd(s, t, mask, 0.5)) == pytest.approx(float(generalized_jsd(t, s, mask, 0.5)), abs=1e-6)
    for fn in (forward_kl, reverse_kl, generalized_jsd):
        assert abs(float(fn(s, s.clone(), mask))) < 1e-6


@pytest.mark.parametrize("fn", [forward_kl, reverse_kl, generalized_jsd])
def test_minus_inf_logits_give_finite_values_and_gradients(fn):
    """Tokens padded out of the vocabulary with -inf logits in both models do not make NaN (the values
    match the loss over the real tokens), nor do -inf teacher logits in forward KL."""
    s, t, _, mask = _inputs(9)
    want = float(fn(s[..., :-2], t[..., :-2], mask))
    s[..., -2:] = float("-inf")
    t[..., -2:] = float("-inf")
    s.requires_grad_(True)
    loss = fn(s, t, mask)
    loss.backward()
    assert float(loss.detach()) == pytest.approx(want, abs=1e-6) and torch.isfinite(s.grad).all()
    if fn is forward_kl:
        s2 = _inputs(9)[0].requires_grad_(True)
        loss = fn(s2, t, mask)
        loss.backward()
        assert torch.isfinite(loss) and torch.isfinite(s2.grad).all()


@pytest.mark.parametrize("kind", ["forward_kl", "reverse_kl", "jsd"])
def test_gradients_reach_the_student_only(kind):
    s, t, labels, mask = _inputs(10)
    s.requires_grad_(True)
    t.requires_grad_(True)
    lm_distill_loss(s, t, labels, mask, kind=kind, alpha=0.7, temperature=2.0).backward()
    assert t.grad is None
    assert torch.isfinite(s.grad).all() and s.grad.abs().sum() > 0
    assert torch.equal(s.grad[mask == 0], torch.zeros_like(s.grad[mask == 0]))

    s.grad = None
    top = topk_teacher(t, 4)
    values = top.values.clone().requires_grad_(True)
    lm_distill_loss_topk(s, top._replace(values=values), labels, mask, kind=kind, alpha=0.7).backward()
    assert values.grad is None and t.grad is None
    assert torch.isfinite(s.grad).all() and s.grad.abs().sum() > 0


# --- top-k forms ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("T", [1.0, 2.0])
def test_topk_with_k_equal_vocab_is_the_full_loss(T):
    for seed in range(2):
        s, t, labels, mask = _inputs(20 + seed)
        top = topk_teacher(t, V)
        assert float(top.rest_mass.abs().max()) == 0.0
        assert float(forward_kl_topk(s, *top, mask, T)) == pytest.approx(float(forward_kl(s, t, mask, T)), abs=1e-5)
        assert float(reverse_kl_topk(s, *top, mask, T)) == pytest.approx(float(reverse_kl(s, t, mask, T)), abs=1e-5)
        for beta in (0.0, 0.5, 1.0):
            assert float(generalized_jsd_topk(s, *top, mask, beta, T)) == pytest.approx(
                float(generalized_jsd(s, t, mask, beta, T)), abs=1e-5)
        full = lm_distill_loss(s, t, labels, mask, "jsd", 0.6, T, 0.3)
        assert float(lm_distill_loss_topk(s, top, labels, mask, "jsd", 0.6, T, 0.3)) == pytest.approx(
            float(full), abs=1e-5)


def test_topk_with_k_equal_vocab_has_finite_gradients():
    s, t, _, mask = _inputs(22)
    s.requires_grad_(True)
    forward_kl_topk(s, *topk_teacher(t, V), mask).backward()
    assert torch.isfinite(s.grad).all()


def test_topk_rest_mass_is_one_minus_the_topk_probabilities():
    _, t, _, _ = _inputs(23)
    top = topk_teacher(t.double(), 4)
    want = 1.0 - top.values.exp().sum(-1)
    assert torch.allclose(top.rest_mass, want, atol=1e-12)
    assert torch.equal(top.indices, t.topk(4, dim=-1).indices)


def _peaked(seed, vocab=50, k=5):
    """A teacher with over 99% of its mass on its top k tokens at every position, and a random student."""
    g = torch.Generator().manual_seed(seed)
    t = torch.randn(B, S, vocab, generator=g, dtype=torch.float64)
    hot = torch.randint(0, vocab, (B, S, k), generator=g)
    t = t.scatter_add(-1, hot, torch.full((B, S, k), 8.0, dtype=torch.float64))
    s = torch.randn(B, S, vocab, generator=g, dtype=torch.float64) * 2
    return s, t


PEAKED_REL_TOL = 5e-3  # top-5 of 50, teacher rest mass < 1% (mean 0.3%): measured gap 0.12-0.15% of the full KL


def test_topk_forward_kl_is_close_to_full_for_a_peaked_teacher():
    """The bucketed loss is never above the full one (merging tokens cannot increase a KL: the data
    processing inequality); the gap is rest_T * KL(rest conditionals), small when rest_T is small."""
    for seed in range(3):
        s, t = _peaked(seed)
        mask = _inputs()[3]
        top = topk_teacher(t, 5)
        assert float(top.rest_mass.max()) < 0.01
        full, approx = float(forward_kl(s, t, mask)), float(forward_kl_topk(s, *top, mask))
        assert approx <= full + 1e-12
        assert approx == pytest.approx(full, rel=PEAKED_REL_TOL)


def test_lm_distill_loss_ignores_garbage_at_masked_positions_for_every_alpha():
    s, t, labels, mask = _inputs(11)
    s2 = torch.where((mask == 0).unsqueeze(-1), torch.full_like(s, float("nan")), s)
    for alpha in (0.0, 0.5, 1.0):
        want = float(lm_distill_loss(s, t, labels, mask, alpha=alpha))
        assert float(lm_distill_loss(s2, t, labels, mask, alpha=alpha)) == pytest.approx(want, abs=1e-6)


@pytest.mark.parametrize("kind", ["forward_kl", "reverse_kl", "jsd"])
@pytest.mark.parametrize("T", [1.0, 2.0])
@pytest.mark.parametrize("rows", [3, 32])
def test_topk_loss_gradients_match_finite_differences(monkeypatch, kind, T, rows):
    """The bucket pass has its own backward (and at T = 1 the cross-entropy comes out of it): float64
    gradcheck of the whole loss, padding labels and a mask included, in blocks of 3 rows and in one."""
    monkeypatch.setattr(lm_losses, "ROWS", rows)
    s, t, labels, mask = _inputs(31)
    s = s.double().requires_grad_(True)
    top = topk_teacher(t.double(), 4)
    labels = labels.clone()
    labels[0, 0] = -100
    assert torch.autograd.gradcheck(lambda x: lm_distill_loss_topk(x, top, labels, mask, kind, 0.6, T, 0.3), (s,))


def test_topk_loss_at_t1_is_its_divergence_plus_the_cross_entropy():
    s, t, labels, mask = _inputs(32)
    top = topk_teacher(t, 4)
    want = 0.6 * forward_kl_topk(s, *top, mask) + 0.4 * next_token_ce(s, labels, mask)
    assert float(lm_distill_loss_topk(s, top, labels, mask, "forward_kl", 0.6)) == pytest.approx(float(want), abs=1e-6)
    half = lm_distill_loss_topk(s.bfloat16(), top, labels, mask, "forward_kl", 0.6)
    assert half.dtype == torch.float32 and float(half) == pytest.approx(float(want), rel=2e-2)
