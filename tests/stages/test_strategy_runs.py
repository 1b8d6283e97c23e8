"""Each strategy run end to end through the distill stage's hook on digits at 8x8 with tiny models and a
few optimizer steps, checking what defines it: the teacher ensemble, the plain exported student of
self-distillation, the born-again teacher chain, the mutual peer, the DeiT student, the progressive
schedule applied per step, selective KD's counts, and data-free training on synthetic inputs only."""
import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from edgekd.config import from_dict
from edgekd.config.profiles import load_profile
from edgekd.context import RunContext
from edgekd.data import build_splits
from edgekd.distill.cache import model_hash
from edgekd.distill.stage import run_distill
from edgekd.distill.strategies import born_again, data_free, multi_teacher, progressive
from edgekd.distill.strategies.deit import DistilledViT
from edgekd.distill.trainer import train
from edgekd.models import build_model

pytestmark = pytest.mark.filterwarnings("ignore:distill.*near-uniform")

DATA = {"image_size": 8}
DEIT = {"patch_size": 4, "hidden_dim": 16, "depth": 1, "heads": 2, "mlp_dim": 32}


@pytest.fixture(autouse=True)
def _one_thread():
    # the CPU is shared: one thread avoids oversubscription stalls in these tiny workloads
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def teacher():
    torch.set_num_threads(1)
    splits = build_splits(from_dict({"data": DATA}).data, 0)
    torch.manual_seed(0)
    model = build_model("small_cnn", 10)
    train(model, splits.train, splits.val, epochs=1, lr=1e-2, seed=0, augment=False)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def _ctx(tmp_path, strategy, options=None, **distill) -> RunContext:
    cfg = from_dict({"student": {"model": "tiny_cnn"}, "data": {**DATA, "augment": False},
                     "distill": {"strategy": strategy, "steps": 6, **distill,
                                 "strategy_options": {strategy: options or {}}}})
    ctx = RunContext(cfg, load_profile("cpu"), tmp_path / "run", threads=1)
    ctx.splits = build_splits(cfg.data, cfg.seed)
    return ctx


def _student():
    torch.manual_seed(0)
    return build_model("tiny_cnn", 10)


def _onnx_outputs(path) -> int:
    return len(onnx.load(str(path)).graph.output)


def _measured(ctx, m) -> None:
    """The stage's contract: accuracies from ONNX Runtime on the test split, a curve, a duration."""
    assert 0 <= m["accuracy"] <= 100 and 0 <= m["teacher_accuracy"] <= 100 and 0 <= m["agreement"] <= 100
    assert m["curve"] and all("epoch" in r for r in m["curve"]) and m["duration_s"] >= 0
    s = ort.InferenceSession(str(ctx.stage_dir("distill") / "model.onnx"), providers=["CPUExecutionProvider"])
    x, y = ctx.splits.test.x.numpy(), ctx.splits.test.y.numpy()
    assert abs(float((s.run(None, {"input": x})[0].argmax(1) == y).mean() * 100) - m["accuracy"]) < 1e-6


def test_multi_teacher_distils_from_the_weighted_ensemble(tmp_path, teacher, monkeypatch):
    seen = []
    monkeypatch.setattr(multi_teacher, "train", lambda *a, **k: seen.append(k.get("teacher")) or train(*a, **k))
    opts = {"teacher_weight": 3.0, "teachers": [{"model": "tiny_cnn", "train_epochs": 1, "weight": 1.0}]}
    ctx = _ctx(tmp_path, "multi_teacher", opts)
    student, m = run_distill(ctx, teacher, _student(), "k")
    ens = next(t for t in seen if isinstance(t, multi_teacher.TeacherEnsemble))
    assert ens.teachers[0] is teacher and len(ens.teachers) == 2
    assert [t["weight"] for t in m["teachers"]] == [0.75, 0.25] and m["average"] == "probabilities"
    assert all(0 <= t["accuracy"] <= 100 for t in m["teachers"]) and 0 <= m["ensemble_accuracy"] <= 100
    assert m["teachers"][0]["accuracy"] == m["teacher_accuracy"]
    _measured(ctx, m)
    # the extra teacher was trained once and is reused from the cache
    _, again = multi_teacher.extra_teacher(ctx, ctx.config.distill.strategy_options.multi_teacher.teachers[0], 0)
    assert again.startswith("trained earlier")


def test_self_distillation_returns_the_plain_student(tmp_path, teacher):
    ctx = _ctx(tmp_path, "self", {"exits": ["features.1", "features.3"], "head_width": 8})
    student, m = run_distill(ctx, teacher, _student(), "k")
    assert student.state_dict().keys() == build_model("tiny_cnn", 10).state_dict().keys()
    assert all(not mod._forward_hooks for mod in student.modules())  # the exits' hooks are gone
    assert [e["layer"] for e in m["exits"]] == ["features.1", "features.3"] and m["auxiliary_params"] > 0
    assert _onnx_outputs(ctx.stage_dir("distill") / "model.onnx") == 1
    _measured(ctx, m)
    bad = _ctx(tmp_path / "bad", "self", {"exits": ["features.9"]})
    from edgekd.errors import ConfigError

    with pytest.raises(ConfigError, match="strategy_options.self.exits"):
        run_distill(bad, teacher, _student(), "k")


def test_born_again_generation_k_learns_from_generation_k_minus_1(tmp_path, teacher, monkeypatch):
    calls = []

    def spy(model, *a, **k):
        calls.append({"teacher": None if k["teacher"] is None else model_hash(k["teacher"])})
        res = train(model, *a, **k)
        calls[-1]["trained"] = model_hash(model)
        return res

    monkeypatch.setattr(born_again, "train", spy)
    ctx = _ctx(tmp_path, "born_again", {"generations": 3, "keep": "last"}, steps=4)
    student, m = run_distill(ctx, teacher, _student(), "k")
    assert len(calls) == 3 and calls[0]["teacher"] == model_hash(teacher)
    for k in (1, 2):
        assert calls[k]["teacher"] == calls[k - 1]["trained"]
    assert [g["teacher"] for g in m["generations"]] == ["distill teacher", "generation 1", "generation 2"]
    assert all(0 <= g["accuracy"] <= 100 for g in m["generations"]) and 0 <= m["ensemble_accuracy"] <= 100
    assert m["kept_generation"] == 3 and model_hash(student) == calls[2]["trained"]
    assert m["steps"] == 12
    _measured(ctx, m)


def test_mutual_trains_two_students_and_returns_the_configured_one(tmp_path, teacher):
    ctx = _ctx(tmp_path, "mutual", {"peer": "small_cnn"})
    given = _student()
    before = {k: v.clone() for k, v in given.state_dict().items()}
    student, m = run_distill(ctx, teacher, given, "k")
    assert student is given and any(not torch.equal(before[k], v) for k, v in student.state_dict().items())
    assert m["peer"]["model"] == "small_cnn" and 0 <= m["peer"]["accuracy"] <= 100
    assert set(m["last_losses"]) == {"student", "peer"}
    assert all("val_accuracy_student" in r and "val_accuracy_peer" in r for r in m["curve"])
    _measured(ctx, m)


def test_deit_trains_a_vit_whose_export_is_the_mean_of_its_heads(tmp_path, teacher):
    ctx = _ctx(tmp_path, "deit", DEIT)
    student, m = run_distill(ctx, teacher, _student(), "k")
    assert isinstance(student, DistilledViT) and m["replaced_student_model"] == "tiny_cnn"
    assert set(m["heads_val_accuracy_torch"]) == {"class_head", "distillation_head", "mean"}
    path = ctx.stage_dir("distill") / "model.onnx"
    assert _onnx_outputs(path) == 1
    x = ctx.splits.test.x[:16]
    with torch.no_grad():
        c, d = student.eval().heads(x)
    got = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"input": x.numpy()})[0]
    assert np.allclose(got, ((c + d) / 2).numpy(), atol=1e-4)
    _measured(ctx, m)
    # a resumed run rebuilds the same ViT for the stored weights
    from edgekd.distill.strategies import student_for

    again = student_for(ctx, _student())
    again.load_state_dict(torch.load(ctx.stage_dir("distill") / "model.pt", weights_only=True))
    with torch.no_grad():
        assert torch.allclose(again.eval()(x), student(x), atol=1e-6)
    plain = _ctx(tmp_path / "kd", "selective")
    given = _student()
    assert student_for(plain, given) is given


def test_progressive_applies_the_schedule_at_every_step(tmp_path, teacher, monkeypatch):
    used = []
    real = progressive.hinton_kd_loss
    monkeypatch.setattr(progressive, "hinton_kd_loss",
                        lambda s, t, y, temperature, alpha: used.append((alpha, temperature)) or real(s, t, y,
                                                                                                       temperature, alpha))
    opts = {"stages": [{"until": 0.5, "alpha": 0.9}, {"until": 1.0, "alpha": 0.4}], "temperature_start": 6.0,
            "temperature_end": 1.0}
    ctx = _ctx(tmp_path, "progressive", opts)
    _, m = run_distill(ctx, teacher, _student(), "k")
    assert used == [(0.9, 6.0), (0.9, 5.0), (0.9, 4.0), (0.4, 3.0), (0.4, 2.0), (0.4, 1.0)]
    assert m["schedule"][0] == {"step": 0, "alpha": 0.9, "temperature": 6.0}
    assert m["schedule"][-1] == {"step": 5, "alpha": 0.4, "temperature": 1.0}
    _measured(ctx, m)


def test_selective_counts_soft_and_hard_targets(tmp_path, teacher):
    ctx = _ctx(tmp_path, "selective", {"threshold": 0.0, "require_correct": False})
    _, m = run_distill(ctx, teacher, _student(), "k")
    assert m["soft_target_share"] == 1.0  # threshold 0 and no correctness check: every sample is soft
    ctx = _ctx(tmp_path / "b", "selective", {"threshold": 1.0})
    _, m = run_distill(ctx, teacher, _student(), "k")
    assert m["soft_target_share"] == 0.0  # no probability reaches 1.0 exactly: every sample is hard
    _measured(ctx, m)


def test_data_free_synthesis_matches_bn_statistics_and_the_student_sees_only_synthetic_inputs(
        tmp_path, teacher, monkeypatch):
    opts = {"samples": 40, "synthesis_steps": 30, "batch_size": 20, "jitter": 1, "bn_weight": 1.0}
    ctx = _ctx(tmp_path, "data_free", opts)
    x, _, history = data_free.synthesize(teacher, (3, 8, 8), 10, ctx.config.distill.strategy_options.data_free,
                                         seed=0, bounds=data_free.input_bounds(ctx.config.data, 3))
    for curve in history:  # the BatchNorm-statistics loss falls over the synthesis steps
        assert len(curve) == 30 and np.mean(curve[-5:]) < 0.75 * np.mean(curve[:5])
    assert all(not mod._forward_hooks for mod in teacher.modules())
    seen = {}

    def spy(model, train_set, val_set, **k):
        seen.update(train=train_set, val=val_set, teacher=k["teacher"], alpha=k["alpha"])
        return train(model, train_set, val_set, **k)

    monkeypatch.setattr(data_free, "train", spy)
    _, m = run_distill(ctx, teacher, _student(), "k")
    real = torch.cat([ctx.splits.train.x, ctx.splits.val.x]).flatten(1)
    synth = seen["train"].x.flatten(1)
    assert len(synth) == 36 and len(seen["val"]) == 4 and (seen["train"].y == -1).all()
    assert torch.cdist(synth, real).min() > 1e-3  # none of the real images is among the inputs
    assert synth.min() >= -1 and synth.max() <= 1  # clamped to the digits' preprocessing range
    assert torch.allclose(synth[:4], x[torch.randperm(40, generator=torch.Generator().manual_seed(0))[4:8]].flatten(1))
    assert seen["teacher"] is teacher and seen["alpha"] == 1.0
    assert m["transfer_set"] == {"images": 36, "synthetic": True, "real_training_images": 0}
    assert m["synthesis"]["bn_loss_last"] < m["synthesis"]["bn_loss_first"]
    assert m["synthesis"]["downsample"] == 1 and m["synthesis"]["clamped"]
    _measured(ctx, m)


def test_pipeline_report_for_a_strategy(tmp_path):
    from edgekd import Pipeline
    from edgekd.report.schema import validate_report

    cfg = from_dict({"name": "self", "stages": ["distill"], "data": DATA,
                     "teacher": {"model": "small_cnn", "train_epochs": 1}, "student": {"model": "tiny_cnn"},
                     "distill": {"strategy": "self", "steps": 4, "strategy_options": {"self": {"head_width": 8}}},
                     "bench": {"iterations": 20, "warmup": 2}})
    rep = Pipeline(cfg, out=tmp_path / "run").run()
    d = next(s for s in rep["stages"] if s["name"] == "distill")
    assert d["strategy"] == "self" and d["exits"] and np.isfinite(d["accuracy"])
    assert validate_report(rep) == []
    assert _onnx_outputs(tmp_path / "run" / "model.fp32.onnx") == 1


def test_a_zero_budget_returns_the_untrained_student_measured(tmp_path, teacher):
    ctx = _ctx(tmp_path, "selective", steps=None, epochs=0)
    given = _student()
    before = {k: v.clone() for k, v in given.state_dict().items()}
    student, m = run_distill(ctx, teacher, given, "k")
    assert m["steps"] == 0 and m["curve"] == [] and 0 <= m["val_accuracy_torch"] <= 100
    assert all(torch.equal(before[k], v) for k, v in student.state_dict().items())
    assert 0 <= m["accuracy"] <= 100


def test_adversarial_trains_a_discriminator_the_student_learns_to_fool(tmp_path, teacher):
    ctx = _ctx(tmp_path, "adversarial", {"weight": 0.5, "hidden": 8}, steps=8)
    student, m = run_distill(ctx, teacher, _student(), "k")
    disc = m["discriminator"]
    assert disc["hidden"] == 8 and disc["per_epoch"] and m["weight"] == 0.5
    for row in disc["per_epoch"]:
        assert 0 <= row["discriminator_accuracy"] <= 1 and 0 <= row["fooled"] <= 1
    # the discriminator lives only in training: the export is the plain student
    assert student.state_dict().keys() == build_model("tiny_cnn", 10).state_dict().keys()
    assert _onnx_outputs(ctx.stage_dir("distill") / "model.onnx") == 1
    _measured(ctx, m)


def test_federated_clients_train_on_their_own_classes_and_the_server_averages(tmp_path, teacher, monkeypatch):
    from edgekd.distill.strategies import federated

    seen = []
    real_fit = federated.fit

    def spy(trainable, loss_fn, train_set, *a, **k):
        seen.append(sorted(set(train_set.y.tolist())))
        return real_fit(trainable, loss_fn, train_set, *a, **k)

    monkeypatch.setattr(federated, "fit", spy)
    averaged = []
    real_avg = federated.average_states
    monkeypatch.setattr(federated, "average_states", lambda s, w: averaged.append(w) or real_avg(s, w))
    opts = {"clients": 5, "rounds": 2, "partition": "by_class", "classes_per_client": 2}
    ctx = _ctx(tmp_path, "federated", opts, steps=None, epochs=2)
    student, m = run_distill(ctx, teacher, _student(), "k")
    assert m["clients"] == 5 and m["rounds"] == 2 and len(m["curve"]) == 2 and m["chosen_round"] in (1, 2)
    assert m["shard_classes"] == [[0, 1], [2, 3], [4, 5], [6, 7], [8, 9]]
    assert seen == m["shard_classes"] * 2  # each client saw only its own shard, every round
    assert averaged == [[float(n) for n in m["shard_sizes"]]] * 2 and sum(m["shard_sizes"]) == len(ctx.splits.train)
    _measured(ctx, m)


def test_cross_modal_pipeline_deploys_a_student_on_the_cheaper_input(tmp_path):
    from edgekd import Pipeline
    from edgekd.report.schema import validate_report

    cfg = from_dict({"name": "xm", "stages": ["distill", "quantize"], "data": {"image_size": 16},
                     "teacher": {"model": "small_cnn", "train_epochs": 1}, "student": {"model": "tiny_cnn"},
                     "distill": {"strategy": "cross_modal", "steps": 6,
                                 "strategy_options": {"cross_modal": {"greyscale": True, "resolution": 8}}},
                     "bench": {"iterations": 20, "warmup": 2}})
    out = tmp_path / "run"
    rep = Pipeline(cfg, out=out).run()
    d = next(s for s in rep["stages"] if s["name"] == "distill")
    assert d["strategy"] == "cross_modal" and d["student_input"]["shape"] == [1, 8, 8]
    assert d["student_input"]["teacher_shape"] == [3, 16, 16] and "luminance" in d["student_input"]["transform"]
    teacher_in = onnx.load(str(out / "teacher.fp32.onnx")).graph.input[0].type.tensor_type.shape.dim
    final_in = onnx.load(str(out / rep["final"]["artifact"])).graph.input[0].type.tensor_type.shape.dim
    assert [x.dim_value for x in teacher_in[1:]] == [3, 16, 16] and [x.dim_value for x in final_in[1:]] == [1, 8, 8]
    with np.load(out / "eval.npz") as z, np.load(out / "calib.npz") as c:
        assert z["x"].shape[1:] == (1, 8, 8) and c["x"].shape[1:] == (1, 8, 8)
    # the deployed student is measured on its own input; the teacher's speedup figure is the same runtime's
    assert 0 <= rep["final"]["accuracy"] <= 100 and rep["final"]["speedup_vs_teacher"] > 0
    assert any("cross_modal" in n for n in rep["notes"]) and validate_report(rep) == []
