"""student.model: search — the space, timing on the target's runtime before training, the budget,
proxy KD on the validation split, and the chosen student trained by the distill stage."""
import numpy as np
import pytest
import torch

from edgekd.config import from_dict
from edgekd.distill.search import _pick, space
from edgekd.errors import ConfigError
from edgekd.models import build_model

pytestmark = pytest.mark.filterwarnings("ignore:distill.*near-uniform")


def _cfg(**search):
    return from_dict({"student": {"model": "search", "search": {"latency_budget_ms": 5.0, **search}}})


def test_space_spans_widths_depths_and_kernels_and_every_spec_builds():
    cfg = _cfg(space=["edge_cnn", "torchvision:mobilenet_v3_small"], widths=[0.5, 1.0], depths=[1, 2], kernels=[3, 5])
    specs = space(cfg)
    assert specs[:4] == ["edge_cnn@w0.5", "edge_cnn@w0.5,k5", "edge_cnn@w0.5,d2", "edge_cnn@w0.5,d2,k5"]
    assert len(specs) == 8 + 2 and specs[-2:] == ["torchvision:mobilenet_v3_small@w0.5",
                                                  "torchvision:mobilenet_v3_small@w1"]
    x = torch.zeros(2, 3, 16, 16)
    for spec in specs:
        assert build_model(spec, 10).eval()(x).shape == (2, 10)
    assert build_model("edge_cnn@w1", 10).state_dict().keys() == build_model("edge_cnn", 10).state_dict().keys()
    # depth below 1 drops stride-1 convs, never the strided ones
    shallow = build_model("edge_cnn@w1,d0.6", 10)
    assert [layer[0].stride[0] for layer in shallow.features] == [2, 2, 2]
    # small_cnn at depth 0.4 keeps its two strided convs; edge_cnn cannot go below three, so its depth 0.4
    # is the same network as 0.6 and the space lists it once
    assert [layer[0].stride[0] for layer in build_model("small_cnn@w1,d0.4", 10).features] == [2, 2]
    assert space(_cfg(space=["edge_cnn", "small_cnn"], widths=[1.0], depths=[0.4, 0.6], kernels=[3])) == [
        "edge_cnn@w1,d0.4", "small_cnn@w1,d0.4", "small_cnn@w1,d0.6"]
    with pytest.raises(ConfigError, match="space: 'resnet18'"):
        space(_cfg(space=["resnet18"]))


def test_the_budget_is_one_of_two_and_search_needs_its_section():
    with pytest.raises(ConfigError, match="exactly one of latency_budget_ms and target_speedup"):
        from_dict({"student": {"model": "search", "search": {}}})
    with pytest.raises(ConfigError, match="model: search needs student.search"):
        from_dict({"student": {"model": "search"}})
    with pytest.raises(ConfigError, match="kernels odd"):
        _cfg(kernels=[4])


def test_pick_takes_the_largest_by_macs_family_by_family():
    rows = [{"architecture": f"{f}{i}", "family": f, "macs": m} for f, ms in (("a", [9, 5, 1]), ("b", [3, 2]))
            for i, m in enumerate(ms)]
    assert [r["architecture"] for r in _pick(rows, 3)] == ["a0", "b0", "a1"]
    assert len(_pick(rows, 10)) == 5


def test_search_times_on_the_target_then_proxy_trains_within_budget_and_distill_trains_the_choice(tmp_path):
    from edgekd import Pipeline
    from edgekd.report.schema import validate_report

    # a few steps on 8x8 digits: the result is near chance, which is not what this test is about
    cfg = from_dict({"name": "search", "stages": ["distill"], "data": {"image_size": 8}, "allow_collapse": True,
                     "teacher": {"model": "small_cnn", "train_epochs": 1},
                     "student": {"model": "search", "search": {"space": ["edge_cnn", "tiny_cnn"], "widths": [0.5, 1.0],
                                                               "depths": [1], "kernels": [3], "target_speedup": 0.01,
                                                               "trials": 2, "proxy_epochs": 1}},
                     "distill": {"steps": 4, "temperature": 2.0, "alpha": 0.5}, "bench": {"iterations": 20, "warmup": 2}})
    out = tmp_path / "run"
    rep = Pipeline(cfg, out=out).run()
    names = [s["name"] for s in rep["stages"]]
    assert names.index("search") < names.index("distill")
    s = rep["stages"][names.index("search")]
    cands = s["candidates"]
    assert {c["architecture"] for c in cands} == {"edge_cnn@w0.5", "edge_cnn@w1", "tiny_cnn@w0.5", "tiny_cnn@w1"}
    assert all(c["latency_ms"] > 0 and c["measured_on"] == "host" and c["params"] > 0 and c["macs"] > 0 for c in cands)
    # the teacher's figure is rounded to 0.0001 ms, so the budget (from the unrounded one) agrees within 0.005 ms
    assert s["teacher_latency_ms"] > 0 and s["budget_ms"] == pytest.approx(s["teacher_latency_ms"] / 0.01, abs=0.0051)
    tried = [c for c in cands if c["proxy_accuracy"] is not None]
    # two trials, the largest of each family; every one within the budget; the best proxy accuracy is chosen
    assert sorted(c["architecture"] for c in tried) == ["edge_cnn@w1", "tiny_cnn@w1"]
    assert sum(c["chosen"] for c in cands) == 1
    chosen = next(c for c in cands if c["chosen"])
    assert chosen["proxy_accuracy"] == max(c["proxy_accuracy"] for c in tried) and s["chosen"] == chosen["architecture"]
    d = rep["stages"][names.index("distill")]
    assert d["params"] == chosen["params"] and validate_report(rep) == []
    assert "search" in (out / "report.md").read_text() and "budget" in (out / "report.html").read_text()
    # a resumed run reads the search back instead of timing again
    again = Pipeline(cfg, out=out).run()
    s2 = next(st for st in again["stages"] if st["name"] == "search")
    assert s2["resumed"] is True and s2["chosen"] == s["chosen"]


def test_a_budget_nobody_meets_is_one_clear_error(tmp_path):
    from edgekd import Pipeline

    cfg = from_dict({"stages": ["distill"], "data": {"image_size": 8}, "teacher": {"model": "small_cnn", "train_epochs": 1},
                     "student": {"model": "search", "search": {"space": ["tiny_cnn"], "widths": [1.0], "depths": [1],
                                                               "kernels": [3], "latency_budget_ms": 1e-6}},
                     "bench": {"iterations": 10, "warmup": 1}})
    with pytest.raises(ConfigError, match="no candidate meets the .* budget .* tiny_cnn@w1"):
        Pipeline(cfg, out=tmp_path / "run").run()
    assert not (tmp_path / "run" / "report.json").exists() and np.isfinite(1.0)
