"""The prune stage on digits: KD recovery, the per-step table with latency measured on the target's
runtime, resume from the stored result, and the latency-target stepping with a controlled clock."""
import pytest
import torch

from edgekd.config import PruneConfig, from_dict
from edgekd.config.profiles import load_profile
from edgekd.context import RunContext
from edgekd.data import build_splits
from edgekd.distill.trainer import evaluate, train
from edgekd.models import build_model, count_macs
from edgekd.prune.loop import prune
from edgekd.prune.pruner import arch_plan, latency_stages
from edgekd.prune.stage import LatencyProbe, run_prune

DATA = {"image_size": 16}


@pytest.fixture(scope="module")
def teacher():
    torch.manual_seed(0)
    splits = build_splits(from_dict({"data": DATA}).data, 0)
    model = build_model("small_cnn", 10)
    train(model, splits.train, splits.val, epochs=2, lr=1e-2, seed=0)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def _ctx(tmp_path, target="cpu", **prune_cfg) -> RunContext:
    prune_cfg.setdefault("max_accuracy_drop", None)  # the mechanics; the guard has its own tests
    cfg = from_dict({"student": {"model": "teacher"}, "stages": ["prune"], "data": DATA, "prune": prune_cfg})
    ctx = RunContext(cfg, load_profile(target), tmp_path / "run", threads=1)
    ctx.splits = build_splits(cfg.data, cfg.seed)
    return ctx


def _student(teacher):
    import copy

    s = copy.deepcopy(teacher)
    for p in s.parameters():
        p.requires_grad_(True)
    return s


def test_target_macs_with_kd_recovery_steps_and_resume(tmp_path, teacher):
    ctx = _ctx(tmp_path, target_macs=0.5, finetune_epochs=2)
    model, m = run_prune(ctx, teacher, _student(teacher), "up")
    assert m["before"]["macs"] == count_macs(teacher, (3, 16, 16))
    assert m["after"]["macs"] <= 0.5 * m["before"]["macs"] and m["reached"]
    assert m["after"]["params"] < m["before"]["params"]
    steps = m["steps"]
    assert [s["step"] for s in steps] == list(range(1, len(steps) + 1))
    assert steps[-1]["macs"] == m["after"]["macs"]
    # the last step was fine-tuned with KD and measured on the target's runtime beside the unpruned model
    last = steps[-1]
    assert last["latency_ms"] > 0 and last["speedup"] > 0 and "val_accuracy_torch" in last
    assert m["latency_measured_on"].startswith("host (onnxruntime")
    # latency guidance timed every candidate allocation on the target's runtime and ran the fastest
    search = m["allocation_search"]
    assert {r["allocation"] for r in search} >= {"uniform", "favour features.0"}
    chosen = [r for r in search if r["chosen"]]
    assert len(chosen) == 1 and all(r["latency_ms"] > 0 for r in search)
    assert chosen[0]["near_target"]
    assert chosen[0]["latency_ms"] / chosen[0]["speedup"] == pytest.approx(min(r["latency_ms"] / r["speedup"]
                                                                               for r in search if r["near_target"]),
                                                                           rel=0.01)
    assert chosen[0]["macs"] == m["after"]["macs"] and chosen[0]["params"] == m["after"]["params"]
    assert not list((ctx.run_dir / "prune" / "probe").glob("candidate-*"))
    teacher_acc, _ = evaluate(teacher, ctx.splits.val)
    assert last["val_accuracy_torch"] >= teacher_acc - 5.0
    # resume: the stored description rebuilds the same model without pruning again
    again, hit = run_prune(ctx, teacher, _student(teacher), "up")
    assert hit["resumed"] and hit["after"] == m["after"]
    x = ctx.splits.test.x[:8]
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(x), again.eval()(x))


def test_ratio_steps_each_report_latency(tmp_path, teacher):
    ctx = _ctx(tmp_path, ratio=0.4, steps=2, finetune_epochs=0)
    _, m = run_prune(ctx, teacher, _student(teacher), "up")
    assert len(m["steps"]) == 2 and m["latency_probes"] == 2
    assert all(s["latency_ms"] > 0 and s["speedup"] > 0 for s in m["steps"])
    assert m["steps"][1]["macs"] < m["steps"][0]["macs"] < m["before"]["macs"]


def test_board_profile_latency_is_labelled_as_a_stand_in(tmp_path, teacher):
    ctx = _ctx(tmp_path, "raspberry-pi-5", ratio=0.3)
    probe = LatencyProbe(ctx, teacher)
    try:
        latency, reference = probe(teacher)
    finally:
        probe.close()
    assert latency > 0 and reference > 0
    assert "standing in for raspberry-pi-5" in probe.measured_on


SHAPE = (3, 16, 16)


def test_probe_exports_a_frozen_vit(tmp_path):
    from torchvision.models import VisionTransformer

    cfg = from_dict({"student": {"model": "teacher"}, "stages": ["prune"], "data": {"image_size": 32}})
    ctx = RunContext(cfg, load_profile("cpu"), tmp_path / "run", threads=1)
    ctx.splits = build_splits(cfg.data, cfg.seed)
    vit = VisionTransformer(image_size=32, patch_size=8, num_layers=1, num_heads=2, hidden_dim=32, mlp_dim=32,
                            num_classes=10).eval()
    for p in vit.parameters():  # frozen like the unpruned reference: eval mode takes the fused attention kernel
        p.requires_grad_(False)
    probe = LatencyProbe(ctx, vit)
    try:
        latency, reference = probe(vit)
    finally:
        probe.close()
    assert latency > 0 and reference > 0


def _mac_clock(model_ref):
    """A latency 'measurement' proportional to MACs: deterministic stepping without a noisy clock."""
    base = count_macs(model_ref, SHAPE)
    calls = []

    def measure(m):
        calls.append(1)
        return count_macs(m, SHAPE) / 1e6, base / 1e6

    return measure, calls


def test_target_speedup_steps_until_the_measured_ratio_is_reached():
    torch.manual_seed(0)
    model = build_model("wide_cnn", 10)
    measure, calls = _mac_clock(model)
    cfg = PruneConfig(target_speedup=2.0, latency_guided=False)
    model, out = prune(model, SHAPE, cfg, 10, 8, measure_latency=measure)
    assert out.reached and out.steps[-1].speedup >= 2.0
    assert all(s.speedup < 2.0 for s in out.steps[:-1])
    assert all(s.latency_ms is not None for s in out.steps) and len(calls) == len(out.steps)


def test_latency_guidance_prunes_the_stages_that_save_most_time_faster():
    torch.manual_seed(0)
    model = build_model("wide_cnn", 10)
    stages = latency_stages(model, arch_plan(model, torch.zeros(1, *SHAPE), 8, []))
    assert stages == [f"features.{i}" for i in range(5)]

    def last_block_clock(m):  # only the last block's width costs time
        return float(m.features[4][0].out_channels), 128.0

    model, out = prune(model, SHAPE, PruneConfig(target_speedup=1.5), 10, 8, measure_latency=last_block_clock)
    share = out.stage_latency_share
    assert share["features.4"] == 1.0 and all(share[f"features.{i}"] == 0.0 for i in range(4))
    assert out.reached and out.steps[-1].speedup >= 1.5
    assert model.features[4][0].out_channels / 128 < model.features[3][0].out_channels / 128


def test_a_macs_target_runs_the_allocation_that_measured_fastest():
    torch.manual_seed(0)
    model = build_model("wide_cnn", 10)
    base = count_macs(model, SHAPE)

    def last_block_clock(m):  # only the last block's width costs time
        return float(m.features[4][0].out_channels), 128.0

    model, out = prune(model, SHAPE, PruneConfig(target_macs=0.6), 10, 8, measure_latency=last_block_clock)
    rows = {r["allocation"]: r for r in out.allocation_search}
    assert rows["favour features.4"]["chosen"] and sum(r["chosen"] for r in rows.values()) == 1
    assert rows["favour features.4"]["latency_ms"] < rows["uniform"]["latency_ms"]
    assert all(r["macs"] <= 0.6 * base for r in rows.values())
    # the real run reaches exactly the shapes the search timed
    assert out.after["macs"] == rows["favour features.4"]["macs"]
    assert model.features[4][0].out_channels == rows["favour features.4"]["latency_ms"]


def test_candidates_pruned_past_the_target_do_not_compete():
    torch.manual_seed(0)
    model = build_model("small_cnn", 10)
    base = count_macs(model, SHAPE)

    def macs_clock(m):  # fewer MACs, less time: the most pruned candidate is the fastest
        return float(count_macs(m, SHAPE)), float(base)

    model, out = prune(model, SHAPE, PruneConfig(target_macs=0.5), 10, 8, measure_latency=macs_clock)
    rows = out.allocation_search
    closest = max(r["macs"] for r in rows)
    assert all(r["near_target"] == (r["macs"] >= 0.95 * closest) for r in rows)
    assert not all(r["near_target"] for r in rows)  # some overshot the target in this setting
    chosen = next(r for r in rows if r["chosen"])
    assert chosen["near_target"] and chosen["macs"] == min(r["macs"] for r in rows if r["near_target"])
    assert chosen["macs"] > min(r["macs"] for r in rows)  # the overall fastest went too far
    assert out.after["macs"] == chosen["macs"] <= 0.5 * base


def test_latency_target_without_a_measurement_is_an_error():
    from edgekd.errors import StageError

    with pytest.raises(StageError, match="target_latency_ms needs a latency measurement"):
        prune(build_model("small_cnn", 10), (3, 16, 16), PruneConfig(target_latency_ms=1.0), 10, 8)


def test_accuracy_guard_halves_then_keeps_the_unpruned_model(tmp_path, teacher):
    # pruning 70% of the channels without fine-tuning loses more than 0 points: the stage tries half as
    # far, then keeps the unpruned model, and says so, judged on the validation split
    ctx = _ctx(tmp_path, ratio=0.7, finetune_epochs=0, max_accuracy_drop=0.0)
    model, m = run_prune(ctx, teacher, _student(teacher), "up")
    guard = m["accuracy_guard"]
    assert [next(iter(t.items())) for t in guard["tries"]] == [("ratio", 0.7), ("ratio", 0.35)]
    assert all(not t["accepted"] and t["drop"] > 0 for t in guard["tries"])
    assert guard["kept"] == "unpruned" and guard["chosen_on"] == "validation split"
    assert guard["unpruned_val_accuracy"] == pytest.approx(evaluate(teacher, ctx.splits.val)[0], abs=0.01)
    assert m["after"] == m["before"] and "kept the unpruned model" in m["note"]
    x = ctx.splits.val.x[:8]
    with torch.no_grad():
        assert torch.equal(model.eval()(x), teacher(x))


def test_accuracy_guard_accepts_a_gentle_prune_and_can_be_turned_off(tmp_path, teacher):
    ctx = _ctx(tmp_path / "on", ratio=0.125, finetune_epochs=1, max_accuracy_drop=20.0)
    _, m = run_prune(ctx, teacher, _student(teacher), "up")
    assert m["accuracy_guard"]["kept"] == "pruned" and len(m["accuracy_guard"]["tries"]) == 1
    assert m["after"]["params"] < m["before"]["params"]
    ctx = _ctx(tmp_path / "off", ratio=0.7, finetune_epochs=0, max_accuracy_drop=None)
    _, m = run_prune(ctx, teacher, _student(teacher), "up")
    assert "accuracy_guard" not in m and m["after"]["params"] < m["before"]["params"]


def test_gentler_amounts_go_halfway_to_no_pruning():
    assert PruneConfig(ratio=0.5).gentler().amount() == ("ratio", 0.25)
    assert PruneConfig(target_macs=0.5).gentler().amount() == ("target_macs", 0.75)
    assert PruneConfig(target_params=0.2).gentler().amount() == ("target_params", 0.6)
    assert PruneConfig(target_speedup=3.0).gentler().amount() == ("target_speedup", 2.0)
    assert PruneConfig(target_latency_ms=1.0).gentler() is None
    assert PruneConfig().gentler().amount() == ("ratio", 0.125)


def test_a_stage_that_ran_again_reports_its_new_model_not_the_stale_onnx(tmp_path, teacher):
    import copy

    from edgekd.report.assemble import model_entry

    ctx = _ctx(tmp_path)
    x, y = ctx.splits.test.x[:64].numpy(), ctx.splits.test.y[:64].numpy()
    path = ctx.stage_dir("prune") / "model.onnx"
    small = build_model("small_cnn", 10).eval()  # an earlier run's model, left on disk
    first = model_entry(ctx, "prune", small, path, x, y, extra={})
    again = model_entry(ctx, "prune", copy.deepcopy(teacher), path, x, y, extra={})
    assert again["accuracy"] == pytest.approx(evaluate_on(teacher, x, y)) and again["accuracy"] != first["accuracy"]
    resumed = model_entry(ctx, "prune", small, path, x, y, extra={"resumed": True})  # resume reuses the file
    assert resumed["accuracy"] == again["accuracy"]


def evaluate_on(model, x, y):
    with torch.no_grad():
        return float((model.eval()(torch.from_numpy(x)).argmax(1) == torch.from_numpy(y)).float().mean() * 100)
