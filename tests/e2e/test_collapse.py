"""A student that ends near chance while its teacher is far above it stops the run: exit 3, one line,
no report.json; `allow_collapse: true` lets the same run finish."""
from __future__ import annotations

import json

import pytest

from tests.conftest import run_edgekd

pytestmark = pytest.mark.e2e

# distill.epochs 0 (and a fixed temperature and alpha: no sweep) hands the untrained student on; the
# small teacher is trained for real, to about 80% on the test split at 8x8; one draw keeps its labelling cheap.
UNTRAINED_STUDENT = """
name: collapse
stages: [distill]
data: {image_size: 8}
teacher: {model: small_cnn, train_epochs: 2, lr: 0.01}
student: {model: tiny_cnn}
distill: {epochs: 0, temperature: 4, alpha: 0.7, draws: 1}
bench: {iterations: 20, warmup: 2}
"""


def test_a_collapsed_student_exits_3_with_one_line_and_the_opt_out_finishes(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(UNTRAINED_STUDENT)
    out = tmp_path / "run"
    r = run_edgekd("compress", "--config", str(cfg), "--target", "cpu", "--out", str(out), "--quiet")
    assert r.returncode == 3, r.stderr[-2000:]
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    line = lines[0]
    assert line.startswith("edgekd: error: distill: the model ends near chance"), line
    for part in ("test accuracy against the teacher's", "(chance ", "distill.epochs", "student.model",
                 "distill.temperature", "allow_collapse: true"):
        assert part in line, (part, line)
    assert "Traceback" not in r.stderr
    assert not (out / "report.json").exists() and not (out / "report.md").exists()

    cfg.write_text(UNTRAINED_STUDENT + "allow_collapse: true\n")
    r = run_edgekd("compress", "--config", str(cfg), "--target", "cpu", "--out", str(out), "--quiet")
    assert r.returncode == 0, r.stderr[-2000:]
    rep = json.loads((out / "report.json").read_text())
    distill = next(s for s in rep["stages"] if s["name"] == "distill")
    assert distill["resumed"] is True  # the opt-out keeps the stored result, it does not train again
    chance = 100 / 10
    assert rep["teacher"]["accuracy"] >= chance + 30  # the rule applied: a teacher well above chance ...
    assert rep["final"]["accuracy"] < chance + (rep["teacher"]["accuracy"] - chance) / 5  # ... and a collapsed student
