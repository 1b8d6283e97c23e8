"""No silent collapse: the rules of edgekd/collapse.py on their own, and the ONNX entry's input checks beside them."""
from __future__ import annotations

import numpy as np
import pytest

from edgekd.collapse import chance_of, check_collapse, check_fp32_scores, check_teacher, reference_accuracy
from edgekd.config import from_dict, onnx_entry_unread
from edgekd.config.profiles import load_profile
from edgekd.context import RunContext
from edgekd.data import load_npz, shared_rows
from edgekd.errors import BadInputError, DataError, StageError


def _ctx(tmp_path, allow: bool = False) -> RunContext:
    return RunContext(from_dict({"allow_collapse": allow}), load_profile("cpu"), tmp_path / "run", threads=1)


def test_chance_is_the_largest_class_share_on_a_skewed_split():
    assert chance_of(np.array([0, 1, 2, 3]), 4) == 25.0
    assert chance_of(np.array([0] * 61 + [1, 2]), 3) == pytest.approx(100 * 61 / 63)
    assert chance_of(np.array([0, 1, -1, -1]), 10) == 50.0  # unlabelled samples (-1) do not count


def test_near_chance_far_below_it_and_the_opt_out(tmp_path):
    ctx = _ctx(tmp_path)
    check_collapse(ctx, "distill", 90.0, 99.0, 10.0)  # well above
    with pytest.raises(StageError, match=r"distill: the model ends near chance, 20.00% .* teacher's 99.00%"):
        check_collapse(ctx, "distill", 20.0, 99.0, 10.0)
    skewed = 100 * 61 / 63  # the teacher is at chance there, so the margin rule says nothing; far below it does
    with pytest.raises(StageError, match="final: the model ends far below always answering the largest class"):
        check_collapse(ctx, "final", 36.5, 96.83, skewed, "teacher")
    with pytest.raises(StageError, match="FP32 model's 52.90%"):
        check_collapse(ctx, "final", 10.3, 52.9, 10.0, "FP32 model")
    kept = _ctx(tmp_path, allow=True)
    check_collapse(kept, "final", 10.3, 52.9, 10.0, "FP32 model")
    assert len(kept.notes) == 1 and "allow_collapse: true keeps it" in kept.notes[0]


def test_a_teacher_at_chance_teaches_nothing(tmp_path):
    with pytest.raises(StageError, match=r"teacher: the teacher scores 33.33% on the test split, at chance"):
        check_teacher(_ctx(tmp_path), 33.33, 33.33)
    check_teacher(_ctx(tmp_path), 60.0, 33.33)


def test_the_onnx_entry_is_judged_against_its_fp32_model_and_needs_its_class_scores_first():
    report = {"teacher": {"accuracy": None},
              "stages": [{"name": "quantize", "candidates": [{"precision": "int8", "accuracy": 50.1},
                                                             {"precision": "fp32", "accuracy": 52.9}]}]}
    assert reference_accuracy(report) == (52.9, "FP32 model")
    check_fp32_scores(report, 10.0, "--model m.onnx", "--eval-data e.npz")
    report["stages"][0]["candidates"][1]["accuracy"] = 1.1  # a feature output judged as scores
    with pytest.raises(BadInputError, match="its first output scores 1.10% on --eval-data e.npz, under half of chance"):
        check_fp32_scores(report, 10.0, "--model m.onnx", "--eval-data e.npz")
    assert reference_accuracy({"teacher": {"accuracy": 99.0}}) == (99.0, "teacher")


def test_the_onnx_entry_reads_stages_only_as_quantize():
    assert onnx_entry_unread(from_dict({})) is None
    assert onnx_entry_unread(from_dict({"stages": ["quantize"]})) is None
    assert onnx_entry_unread(from_dict({"stages": ["prune"]})) == "stages"
    assert onnx_entry_unread(from_dict({"stages": ["distill", "quantize"]})) == "stages"


def test_eval_inputs_shared_with_calibration_and_unread_arrays_are_found(tmp_path):
    x = np.random.default_rng(0).standard_normal((20, 1, 2, 2)).astype(np.float32)
    assert shared_rows(x[:10], x[5:]) == 5 and shared_rows(x[:10], x[10:]) == 0
    np.savez(tmp_path / "e.npz", x=x, y=np.zeros(20, np.int64), w=np.ones(3))
    with pytest.raises(DataError, match=r"holds arrays edgekd does not read \(w\)"):
        load_npz(tmp_path / "e.npz", "eval data")
