"""The distillation strategies' defining behaviours, on hand-built tensors and tiny models: the
multi-teacher soft target, the self-distillation and mutual losses, the DeiT token and heads, the
progressive schedule, the selective mask, and the strategy_options config checks."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from edgekd.config import from_dict
from edgekd.config.strategies import ProgressiveOptions
from edgekd.distill.strategies.deit import DistilledViT, deit_loss
from edgekd.distill.strategies.multi_teacher import TeacherEnsemble, ensemble_soft_target
from edgekd.distill.strategies.mutual import mutual_losses
from edgekd.distill.strategies.progressive import schedule
from edgekd.distill.strategies.selective import selection_mask, selective_kd_loss
from edgekd.distill.strategies.self_distill import self_distill_loss
from edgekd.errors import ConfigError
from edgekd.models import build_model


@pytest.fixture(autouse=True)
def _one_thread():
    # the CPU is shared: one thread avoids oversubscription stalls in these tiny workloads
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _models(n=2, seed=0):
    torch.manual_seed(seed)
    return [build_model("tiny_cnn", 10).eval() for _ in range(n)]


def test_multi_teacher_soft_target_is_the_weighted_mean_of_softened_outputs():
    a, b = _models()
    x = torch.randn(6, 3, 8, 8)
    za, zb = a(x).detach(), b(x).detach()
    t = 3.0
    want = 0.75 * F.softmax(za / t, 1) + 0.25 * F.softmax(zb / t, 1)
    ens = TeacherEnsemble([a, b], [3.0, 1.0], t, "probabilities")
    assert torch.allclose(ens.weights, torch.tensor([0.75, 0.25]))
    with torch.no_grad():
        got = F.softmax(ens(x) / t, 1)  # what soft_kl reads from the cached "teacher logits"
    assert torch.allclose(got, want, atol=1e-6)
    assert torch.allclose(ensemble_soft_target([za, zb], [3, 1], t), want, atol=1e-6)
    logit_ens = TeacherEnsemble(_models(), [3.0, 1.0], t, "logits")
    with torch.no_grad():
        assert torch.allclose(logit_ens(x), 0.75 * za + 0.25 * zb, atol=1e-5)
    assert torch.allclose(ensemble_soft_target([za, zb], [3, 1], t, "logits"),
                          F.softmax((0.75 * za + 0.25 * zb) / t, 1), atol=1e-6)
    assert all(not p.requires_grad for p in ens.parameters()) and not ens.teachers[0].training


def test_self_distillation_deepest_exit_teaches_the_shallower_ones():
    labels = torch.tensor([0, 1, 2, -1])
    exits = [torch.randn(4, 5, requires_grad=True) for _ in range(3)]
    total, terms = self_distill_loss(exits, labels, temperature=2.0, alpha=1.0)
    assert len(terms) == 3 and math.isclose(float(total.detach()), sum(terms), rel_tol=1e-6)
    total.backward()
    # alpha = 1: the shallow exits learn only the deepest exit's softened output ...
    for z in exits[:-1]:
        assert z.grad.abs().sum() > 0
    target = F.softmax(exits[-1].detach() / 2.0, 1)
    want = 2.0 * (F.softmax(exits[0].detach() / 2.0, 1) - target) / 4  # d(T^2 KL)/dz = T (p_s - p_t) / N
    assert torch.allclose(exits[0].grad, want, atol=1e-6)
    # ... and the deepest exit gets no gradient from teaching: only its own CE on the labeled samples
    deep = exits[-1].detach().requires_grad_(True)
    F.cross_entropy(deep[:3], labels[:3]).backward()
    assert torch.allclose(exits[-1].grad, deep.grad, atol=1e-6)


def test_mutual_losses_are_symmetric_and_each_kl_trains_its_own_student():
    torch.manual_seed(0)
    a, b = torch.randn(5, 4), torch.randn(5, 4)
    labels = torch.tensor([0, 1, 2, 3, -1])
    la, lb = mutual_losses(a, b, labels, 3.0, 0.6)
    lb2, la2 = mutual_losses(b, a, labels, 3.0, 0.6)
    assert torch.allclose(la, la2) and torch.allclose(lb, lb2)
    # with alpha = 1 only the KL terms remain: both students receive gradients from them
    ga, gb = a.clone().requires_grad_(True), b.clone().requires_grad_(True)
    ka, kb = mutual_losses(ga, gb, labels, 3.0, 1.0)
    (ka + kb).backward()
    assert ga.grad.abs().sum() > 0 and gb.grad.abs().sum() > 0
    # each student's KL term trains that student only (the other's output is its detached target)
    ga2, gb2 = a.clone().requires_grad_(True), b.clone().requires_grad_(True)
    mutual_losses(ga2, gb2, labels, 3.0, 1.0)[0].backward()
    assert ga2.grad.abs().sum() > 0 and gb2.grad is None


def test_deit_has_a_distillation_token_and_infers_with_the_mean_of_both_heads(tmp_path):
    torch.manual_seed(0)
    vit = DistilledViT(10, image_size=8, patch_size=4, hidden_dim=16, depth=1, heads=2, mlp_dim=32).eval()
    names = dict(vit.named_parameters())
    assert names["dist_token"].shape == (1, 1, 16) and "head_dist.weight" in names and "cls_token" in names
    x = torch.randn(3, 3, 8, 8)
    with torch.no_grad():
        c, d = vit.heads(x)
        out = vit(x)
    assert not torch.allclose(c, d)
    assert torch.allclose(out, (c + d) / 2, atol=1e-6)
    from edgekd.export import export_onnx

    path = export_onnx(vit, (3, 8, 8), tmp_path / "vit.onnx", 17)
    import onnx
    import onnxruntime as ort

    graph = onnx.load(str(path)).graph
    assert len(graph.output) == 1
    assert not [n.op_type for n in graph.node if n.op_type == "Shape"]  # static reshapes: batch as -1 only
    got = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"input": x.numpy()})[0]
    assert np.allclose(got, out.numpy(), atol=1e-4)
    # hard distillation: the distillation head learns the teacher's top-1 class, the class head the label
    teacher = torch.tensor([[0.0, 5.0, 1.0], [3.0, 0.0, 1.0]])
    cl, dl, y = torch.randn(2, 3), torch.randn(2, 3), torch.tensor([2, 0])
    got = deit_loss(cl, dl, teacher, y, alpha=0.5, temperature=1.0)
    want = 0.5 * F.cross_entropy(cl, y) + 0.5 * F.cross_entropy(dl, torch.tensor([1, 0]))
    assert torch.isclose(got, want)


def _progressive(**kw) -> ProgressiveOptions:
    return from_dict({"distill": {"strategy": "progressive", "strategy_options": {"progressive": kw}}}) \
        .distill.strategy_options.progressive


def test_progressive_schedule_gives_the_configured_values_at_given_steps():
    opts = _progressive(stages=[{"until": 0.25, "alpha": 0.9}, {"until": 1.0, "alpha": 0.3}],
                        temperature_start=10.0, temperature_end=2.0)
    total = 9  # steps 0..8; the temperature falls by 1 per step
    assert schedule(0, total, opts, 0.7, 4.0) == (0.9, 10.0)
    assert schedule(2, total, opts, 0.7, 4.0) == (0.9, 8.0)  # 2/9 of training done: still stage 1
    assert schedule(3, total, opts, 0.7, 4.0) == (0.3, 7.0)  # 3/9 >= 0.25: stage 2
    assert schedule(8, total, opts, 0.7, 4.0) == (0.3, 2.0)  # the last step reaches temperature_end
    cos = _progressive(stages=[{"until": 1.0, "alpha": 0.5}], temperature_start=8.0, temperature_end=2.0,
                       anneal="cosine")
    assert schedule(0, 11, cos, 0.7, 4.0) == (0.5, 8.0)
    assert schedule(5, 11, cos, 0.7, 4.0)[1] == pytest.approx(5.0)
    assert schedule(10, 11, cos, 0.7, 4.0)[1] == pytest.approx(2.0)
    stepped = _progressive(stages=[{"until": 0.5, "alpha": 1.0, "temperature": 6.0}, {"until": 1.0, "alpha": 0.2}],
                           temperature_start=None, temperature_end=None)
    assert schedule(0, 10, stepped, 0.7, 4.0) == (1.0, 6.0)
    assert schedule(5, 10, stepped, 0.7, 4.0) == (0.2, 4.0)  # a stage without temperature keeps distill's


def test_selective_mask_and_loss_on_a_hand_built_batch():
    big = 6.0
    teacher = torch.tensor([
        [big, 0.0, 0.0],   # confident (p ~ 0.995), right            -> soft
        [big, 0.0, 0.0],   # confident, wrong (label 1)              -> hard
        [0.2, 0.0, 0.1],   # not confident, right                    -> hard
        [0.0, big, 0.0],   # confident, unlabeled                     -> soft
        [0.1, 0.0, 0.0],   # not confident, unlabeled                 -> not counted
    ])
    labels = torch.tensor([0, 1, 0, -1, -1])
    mask = selection_mask(teacher, labels, threshold=0.9)
    assert mask.tolist() == [True, False, False, True, False]
    assert selection_mask(teacher, labels, 0.9, require_correct=False).tolist() == [True, True, False, True, False]
    student = torch.randn(5, 3)
    t = 2.0
    loss, got_mask = selective_kd_loss(student, teacher, labels, temperature=t, threshold=0.9)
    assert torch.equal(got_mask, mask)
    soft = [(t * t) * F.kl_div(F.log_softmax(student[i:i + 1] / t, 1), F.softmax(teacher[i:i + 1] / t, 1),
                               reduction="sum") for i in (0, 3)]
    hard = [F.cross_entropy(student[i:i + 1], labels[i:i + 1]) for i in (1, 2)]
    assert torch.isclose(loss, (sum(soft) + sum(hard)) / 4, atol=1e-6)


def test_data_free_input_bounds_and_resolution_come_from_the_preprocessing():
    from edgekd.data import IMAGENET_MEAN, IMAGENET_STD
    from edgekd.distill.strategies.data_free import input_bounds

    lo, hi = input_bounds(from_dict({}).data, 3)
    assert lo.tolist() == [-1.0] * 3 and hi.tolist() == [1.0] * 3
    from edgekd.distill.strategies.data_free import native_downsample

    assert native_downsample(from_dict({}).data) == 4  # 8x8 digits enlarged to 32x32
    assert native_downsample(from_dict({"data": {"image_size": 8}}).data) == 1
    assert native_downsample(from_dict({"data": {"dataset": "imagefolder", "root": "x"}}).data) == 1
    lo, hi = input_bounds(from_dict({"data": {"dataset": "imagefolder", "root": "x"}}).data, 3)
    assert torch.allclose(lo, -torch.tensor(IMAGENET_MEAN) / torch.tensor(IMAGENET_STD))
    assert torch.allclose(hi, (1 - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD))


def test_strategy_options_are_checked():
    cfg = from_dict({"distill": {"strategy": "born_again", "strategy_options": {"born_again": {"generations": 2}}}})
    assert cfg.distill.strategy_options.born_again.generations == 2
    assert cfg.distill.strategy_options.self.exits == ["features.1", "features.3"]
    cases = [
        ({"progressive": {"stages": [{"until": 0.5, "alpha": 0.3}]}}, "last be 1.0"),
        ({"progressive": {"temperature_start": 4.0, "temperature_end": None}}, "together"),
        ({"progressive": {"stages": [{"until": 1.0, "alpha": 0.3, "temperature": 2}]}}, "give one"),
        ({"deit": {"hidden_dim": 30, "heads": 4}}, "divisible"),
        ({"born_again": {"generation": 2}}, "unknown key"),
        ({"selective": {"threshold": 1.5}}, "selective.threshold"),
        ({"multi_teacher": {"teachers": [{"model": "wide_cnn", "weight": 0}]}}, "weight"),
    ]
    for opts, words in cases:
        with pytest.raises(ConfigError, match=words):
            from_dict({"distill": {"strategy_options": opts}})


def test_adversarial_losses_train_each_side_only():
    from edgekd.distill.losses import soft_kl
    from edgekd.distill.strategies.adversarial import Discriminator, adversarial_losses

    torch.manual_seed(0)
    disc = Discriminator(10, 8)
    s = torch.randn(6, 10, requires_grad=True)
    t, y = torch.randn(6, 10), torch.tensor([0, 1, 2, 3, -1, -1])
    s_loss, d_loss, figs = adversarial_losses(s, t, y, disc, temperature=2.0, alpha=0.5, weight=0.3)
    # the student's loss trains no discriminator weight; the discriminator's loss trains no student output
    assert all(g is None for g in torch.autograd.grad(s_loss, list(disc.parameters()), allow_unused=True))
    assert torch.autograd.grad(d_loss, s, allow_unused=True)[0] is None
    assert all(g is not None for g in torch.autograd.grad(d_loss, list(disc.parameters())))
    # weight 0: exactly the KD objective
    s0, _, _ = adversarial_losses(s, t, y, disc, temperature=2.0, alpha=0.5, weight=0.0)
    kd = 0.5 * F.cross_entropy(s[:4], y[:4]) + 0.5 * soft_kl(s, t, 2.0)
    assert torch.allclose(s0, kd, atol=1e-6)
    fool = disc(F.log_softmax(s / 2.0, 1))
    assert torch.allclose(s_loss - s0, 0.3 * F.binary_cross_entropy_with_logits(fool, torch.ones(6)), atol=1e-6)
    assert 0 <= figs["discriminator_accuracy"] <= 1 and figs["fooled"] == float((fool > 0).float().mean())


def test_federated_shards_are_disjoint_complete_and_non_iid_when_asked():
    from edgekd.distill.strategies.federated import shards

    y = np.repeat(np.arange(10), 30)
    y[::7] = -1  # some unlabeled samples are dealt at random
    for parts in (shards(y, 4, "iid", 2, 0), shards(y, 4, "by_class", 3, 0)):
        joined = np.concatenate(parts)
        assert sorted(joined.tolist()) == list(range(len(y)))
    by_class = shards(y, 4, "by_class", 3, 0)
    owned = [sorted({int(v) for v in y[p] if v >= 0}) for p in by_class]
    assert owned == [[0, 1, 2], [3, 4, 5], [6, 7, 8], [0, 1, 9]]
    assert [len(p) for p in shards(y, 4, "iid", 2, 0)] == [75] * 4
    assert all(np.array_equal(a, b) for a, b in zip(shards(y, 4, "iid", 2, 1), shards(y, 4, "iid", 2, 1),
                                                    strict=True))


def test_federated_average_is_fedavg_and_pools_batchnorm_statistics_exactly():
    from edgekd.distill.strategies.federated import average_states

    rng = np.random.default_rng(0)
    a, b = rng.normal(1.0, 2.0, (30, 3)), rng.normal(-2.0, 0.5, (90, 3))

    def state(x, w):
        return {"w": torch.tensor(w), "bn.running_mean": torch.tensor(x.mean(0)),
                "bn.running_var": torch.tensor(x.var(0)), "bn.num_batches_tracked": torch.tensor(len(x))}
    out = average_states([state(a, [1.0, 2.0]), state(b, [3.0, 6.0])], [30.0, 90.0])
    assert out["w"].dtype == torch.float32 and torch.allclose(out["w"], torch.tensor([2.5, 5.0]))
    union = np.concatenate([a, b])
    assert np.allclose(out["bn.running_mean"].numpy(), union.mean(0))
    assert np.allclose(out["bn.running_var"].numpy(), union.var(0))  # the union's statistics, from the shards' own
    assert int(out["bn.num_batches_tracked"]) == 90


def test_cross_modal_input_transform_and_first_conv_adaptation():
    from edgekd.data.modality import InputTransform, TransformedImages
    from edgekd.models import adapt_input_channels

    torch.manual_seed(0)
    grey = torch.rand(4, 1, 16, 16) * 2 - 1
    rgb = grey.repeat(1, 3, 1, 1)
    t = InputTransform(greyscale=True)
    assert torch.allclose(t(rgb), grey, atol=1e-6)  # luminance weights sum to 1: a grey image is unchanged
    colour = torch.rand(2, 3, 8, 8)
    want = 0.299 * colour[:, 0] + 0.587 * colour[:, 1] + 0.114 * colour[:, 2]
    assert torch.allclose(t(colour)[:, 0], want, atol=1e-6)
    small = InputTransform(greyscale=True, resolution=8)
    assert small(rgb).shape == (4, 1, 8, 8) and small.output_shape((3, 16, 16)) == (1, 8, 8)
    assert torch.allclose(small(rgb), F.avg_pool2d(grey, 2), atol=1e-6)  # area average down
    assert InputTransform(channels=3)(grey).shape == (4, 3, 16, 16)
    view = TransformedImages(rgb, small)
    assert view.shape == (4, 1, 8, 8) and torch.equal(view[1:3], small(rgb[1:3])) and view.numpy().shape == (4, 1, 8, 8)
    # the student's first convolution takes one channel and, on a grey image, computes what it did on RGB
    model = build_model("tiny_cnn", 10).eval()
    with torch.no_grad():
        before = model(rgb)
        assert adapt_input_channels(model, 1) == ["features.0.0"]
        assert torch.allclose(model(grey), before, atol=1e-5)
    assert adapt_input_channels(model, 1) == []


def test_cross_modal_with_prune_is_a_config_error():
    with pytest.raises(ConfigError, match="cross_modal"):
        from_dict({"stages": ["distill", "prune", "quantize"], "distill": {"strategy": "cross_modal"}})
    with pytest.raises(ConfigError, match="set greyscale, channels or resolution"):
        from_dict({"distill": {"strategy": "cross_modal",
                               "strategy_options": {"cross_modal": {"greyscale": False}}}})
