"""report.json's schema: the fixture is accepted, broken reports are rejected with the place named."""
from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

from edgekd.errors import BadInputError
from edgekd.report import load_report, validate_report
from edgekd.report.schema import not_measured_reason, schema

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "report_example.json"


@pytest.fixture
def report() -> dict:
    return json.loads(FIXTURE.read_text())


def _write(tmp_path: Path, obj) -> Path:
    p = tmp_path / "report.json"
    p.write_text(json.dumps(obj) if not isinstance(obj, str) else obj)
    return p


def test_schema_is_draft_2020_12_and_valid():
    import jsonschema

    s = schema()
    assert s["$schema"].endswith("2020-12/schema")
    jsonschema.Draft202012Validator.check_schema(s)


def test_fixture_is_valid(report):
    assert validate_report(report) == []
    assert load_report(FIXTURE)["final"]["precision"] == "int8"


@pytest.mark.parametrize("path", [
    ("schema_version",), ("edgekd_version",), ("target",), ("environment",), ("stages",), ("final",),
    ("target", "name"), ("target", "backend"),
    ("final", "artifact"), ("final", "precision"), ("final", "accuracy"), ("final", "size_bytes"),
    ("final", "latency_ms"), ("final", "speedup_vs_teacher"), ("final", "compression_vs_teacher"),
    ("teacher",), ("teacher", "accuracy"),
])
def test_missing_required_field_is_rejected(report, path):
    broken = copy.deepcopy(report)
    holder = broken
    for key in path[:-1]:
        holder = holder[key]
    del holder[path[-1]]
    problems = validate_report(broken)
    assert problems, f"removing {'.'.join(path)} was accepted"
    assert any(path[-1] in p for p in problems), problems


def test_onnx_entry_needs_no_teacher(report):
    onnx_entry = copy.deepcopy(report)
    del onnx_entry["teacher"]
    onnx_entry["stages"] = [s for s in onnx_entry["stages"] if s["name"] in ("quantize", "compile", "bench")]
    assert validate_report(onnx_entry) == []


def test_wrong_types_name_the_place(report):
    report["final"]["accuracy"] = "high"
    report["stages"][1]["params"] = -5
    problems = validate_report(report)
    assert any(p.startswith("report.final.accuracy") for p in problems), problems
    assert any(p.startswith("report.stages[1].params") for p in problems), problems


def test_null_figure_needs_a_not_measured_reason(report):
    report["teacher"]["latency_ms"] = None
    problems = validate_report(report)
    assert problems == ["report.teacher: latency_ms null without a not_measured reason beside it"]
    report["teacher"]["not_measured"] = {"latency_ms": "teacher not benchmarked on the board"}
    assert validate_report(report) == []
    assert not_measured_reason(report["teacher"], "latency_ms") == "teacher not benchmarked on the board"


def test_null_measured_figures_are_allowed_with_a_reason(report):
    final = report["final"]
    final.update(accuracy=None, latency_ms=None, speedup_vs_teacher=None, measured_on=None)
    final["not_measured"] = "the board was unreachable"
    assert validate_report(report) == []
    assert not_measured_reason(final, "latency_ms") == "the board was unreachable"


def test_newer_schema_version_is_a_clear_error(tmp_path, report):
    report["schema_version"] = 2
    p = _write(tmp_path, report)
    with pytest.raises(BadInputError) as e:
        load_report(p)
    assert str(e.value) == f"report {p} has schema_version 2; this edgekd reads up to 1 (upgrade edgekd to read it)"
    assert e.value.exit_code == 2


def test_missing_file_is_bad_input(tmp_path):
    with pytest.raises(BadInputError, match="no such file"):
        load_report(tmp_path / "nope.json")


def test_unreadable_json_is_bad_input(tmp_path):
    with pytest.raises(BadInputError, match=r"not valid JSON \(line 1"):
        load_report(_write(tmp_path, '{"schema_version": 1,'))
    with pytest.raises(BadInputError, match="expected a JSON object"):
        load_report(_write(tmp_path, "[1, 2]"))


def test_invalid_report_lists_problems(tmp_path, report):
    del report["final"]["artifact"]
    with pytest.raises(BadInputError, match="'artifact' is a required property"):
        load_report(_write(tmp_path, report))
    assert load_report(tmp_path / "report.json", validate=False)["name"] == "digits-rpi5"


LM_FIXTURE = FIXTURE.with_name("report_lm_example.json")


def _lm() -> dict:
    return json.loads(LM_FIXTURE.read_text())


def test_a_causal_lm_report_is_checked_for_its_own_figures():
    assert validate_report(_lm()) == []
    breaks = {"report.final.perplexity": lambda r: r["final"].update(perplexity=0.5),
              "report.speculative.acceptance_rate": lambda r: r["speculative"].update(acceptance_rate=60),
              "report.teacher: decode_tokens_per_s null": lambda r: r["teacher"].update(decode_tokens_per_s=None),
              "report.final: 'runtime' is a required property": lambda r: r["final"].pop("runtime"),
              "report.final.tpot_ms: 'p90' is a required": lambda r: r["final"]["tpot_ms"].pop("p90"),
              "report.speculative.speedup: 9 is not tokens/s with the draft": lambda r: r["speculative"].update(speedup=9),
              "report.final.speedup_vs_teacher: 0.1 is not": lambda r: r["final"].update(speedup_vs_teacher=0.1),
              "report.speculative.identical: 4 of 3 prompts": lambda r: r["speculative"].update(identical=4),
              "report.task": lambda r: r.update(task="chat")}
    for expected, brk in breaks.items():
        report = _lm()
        brk(report)
        problems = validate_report(report)
        assert any(p.startswith(expected) for p in problems), (expected, problems)
    report = _lm()
    report["teacher"].update(decode_tokens_per_s=None, not_measured={"decode_tokens_per_s": "timed on the board"})
    report["final"]["speedup_vs_teacher"] = None
    report["final"]["not_measured"] = {"speedup_vs_teacher": "needs the teacher's decode tokens/s"}
    assert validate_report(report) == []
