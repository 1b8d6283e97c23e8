"""CI gates: verdicts, unmeasured figures failing, regression against a baseline, JUnit XML."""
from __future__ import annotations

import copy
import json
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from edgekd.errors import BadInputError
from edgekd.report import apply_gates, evaluate, write_junit
from edgekd.report.gate import GateResult, all_passed, print_gate_table

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "report_example.json"


@pytest.fixture
def report() -> dict:
    return json.loads(FIXTURE.read_text())


def _by_gate(results: list[GateResult]) -> dict[str, GateResult]:
    return {r.gate: r for r in results}


def test_passing_gates_pass(report):
    results = evaluate(report, {"max_size_mb": 2, "max_latency_ms": 8, "percentile": 90, "min_accuracy": 97,
                                "max_accuracy_drop": 1.5})
    assert [r.gate for r in results] == ["max_size_mb", "max_latency_ms", "min_accuracy", "max_accuracy_drop"]
    assert all(r.passed is True for r in results)
    assert all_passed(results)
    size = _by_gate(results)["max_size_mb"]
    assert size.measured == pytest.approx(report["final"]["size_bytes"] / 1e6, abs=1e-4)


def test_failing_gate_is_named_and_others_still_pass(report):
    p90 = report["final"]["latency_ms"]["p90"]
    results = _by_gate(evaluate(report, {"max_latency_ms": p90 / 2, "min_accuracy": 90.0, "percentile": 90}))
    lat = results["max_latency_ms"]
    assert lat.passed is False and lat.verdict == "fail"
    assert lat.measured == p90
    assert "p90" in lat.detail and ">" in lat.detail
    assert results["min_accuracy"].passed is True
    assert not all_passed(list(results.values()))


def test_percentile_picks_the_latency(report):
    lat = report["final"]["latency_ms"]
    threshold = (lat["p50"] + lat["p99"]) / 2
    assert evaluate(report, {"max_latency_ms": threshold, "percentile": 50})[0].passed is True
    assert evaluate(report, {"max_latency_ms": threshold, "percentile": 99})[0].passed is False
    with pytest.raises(BadInputError, match="percentile"):
        evaluate(report, {"max_latency_ms": 1, "percentile": 95})


def test_accuracy_drop_in_points(report):
    drop = report["teacher"]["accuracy"] - report["final"]["accuracy"]
    ok = evaluate(report, {"max_accuracy_drop": drop + 0.01})[0]
    bad = evaluate(report, {"max_accuracy_drop": drop - 0.01})[0]
    assert ok.passed is True and bad.passed is False
    assert bad.measured == pytest.approx(drop)
    assert "points below the teacher" in bad.detail


def test_accuracy_drop_with_onnx_entry_uses_the_fp32_model(report):
    del report["teacher"]
    result = evaluate(report, {"max_accuracy_drop": 0.5})[0]
    assert result.passed is True
    assert "FP32 model" in result.detail


@pytest.mark.parametrize("gate, figure", [("min_accuracy", "accuracy"), ("max_size_mb", "size_bytes"),
                                          ("max_latency_ms", "latency_ms")])
def test_unmeasured_figure_fails_with_its_reason(report, gate, figure):
    report["final"][figure] = None
    report["final"]["not_measured"] = {figure: "the board was unreachable over SSH"}
    result = evaluate(report, {gate: 1.0})[0]
    assert result.passed is False
    assert result.measured is None
    assert result.detail == "not measured: the board was unreachable over SSH"
    # report.json's entry explains its null the way every null is explained
    assert result.to_dict()["not_measured"] == "the board was unreachable over SSH"


def test_arm_gates_fail_when_not_requested(report):
    results = evaluate(report, {"min_accuracy_arm": 90, "min_arm_agreement": 99})
    assert [r.passed for r in results] == [False, False]
    assert results[0].detail == "not measured: not requested (run compress with --verify-arm)"
    report["final"].update(accuracy_arm=97.5, arm_agreement=99.7)
    assert [r.passed for r in evaluate(report, {"min_accuracy_arm": 97, "min_arm_agreement": 99.5})] == [True, True]


def test_host_latency_does_not_pass_a_board_gate(report):
    report["final"]["measured_on"] = "host"
    result = evaluate(report, {"max_latency_ms": 100.0})[0]
    assert result.passed is False
    assert result.detail.startswith("not measured on the board")
    report["target"]["measures_here"] = True
    assert evaluate(report, {"max_latency_ms": 100.0})[0].passed is True


def test_unknown_gate_or_non_number_is_bad_input(report):
    with pytest.raises(BadInputError, match="unknown gate 'max_sise_mb'"):
        evaluate(report, {"max_sise_mb": 2})
    with pytest.raises(BadInputError, match="gates.min_accuracy"):
        evaluate(report, {"min_accuracy": "high"})
    with pytest.raises(BadInputError, match="min_decode_tokens_per_s is for causal-lm reports; this report is "
                                            "image-classification"):
        evaluate(report, {"min_accuracy": 90, "min_decode_tokens_per_s": 10})


def test_baseline_comparison_of_a_report_with_itself_passes(report):
    result = evaluate(report, {"max_regression": 5}, baseline=copy.deepcopy(report))[0]
    assert result.gate == "max_regression"
    assert result.passed is True
    assert result.measured == 0
    assert "interval" in result.detail


def _with_latency(report: dict, p90: float, ci: tuple[float, float] | None) -> dict:
    r = copy.deepcopy(report)
    r["final"]["latency_ms"]["p90"] = p90
    if ci is None:
        r["final"].pop("latency_ci_ms", None)
    else:
        r["final"]["latency_ci_ms"] = {"p90": list(ci)}
    return r


def test_regression_beyond_the_interval_fails(report):
    base = _with_latency(report, 1.00, (0.99, 1.01))
    slow = _with_latency(report, 1.20, (1.19, 1.21))
    result = evaluate(slow, {"max_regression": 5}, baseline=base)[0]
    assert result.passed is False
    assert result.measured == pytest.approx(20.0)
    assert "beyond the 5% threshold" in result.detail


def test_noisy_regression_is_inconclusive_and_does_not_fail(report):
    base = _with_latency(report, 1.00, (0.90, 1.10))
    noisy = _with_latency(report, 1.06, (0.95, 1.18))
    results, passed = apply_gates(noisy, {"max_regression": 5, "min_accuracy": 90}, baseline=base)
    reg = _by_gate(results)["max_regression"]
    assert reg.passed is None and reg.verdict == "inconclusive"
    assert reg.detail.startswith("inconclusive:") and "straddles the 5% threshold" in reg.detail
    assert passed is True
    assert {g["gate"]: g["passed"] for g in noisy["gates"]} == {"min_accuracy": True, "max_regression": None}


def test_regression_without_an_interval_uses_the_point_estimate(report):
    base = _with_latency(report, 1.00, None)
    assert evaluate(_with_latency(report, 1.04, None), {"max_regression": 5}, base)[0].passed is True
    slow = evaluate(_with_latency(report, 1.10, None), {"max_regression": 5}, base)[0]
    assert slow.passed is False
    assert "without an interval" in slow.detail


def test_regression_without_baseline_fails(report):
    result = evaluate(report, {"max_regression": 5}, baseline=None)[0]
    assert result.passed is False and "no baseline" in result.detail


def test_apply_gates_stores_verdicts(report):
    report.pop("gates")
    cfg = {"max_size_mb": 0.01, "max_latency_ms": None, "percentile": 90, "min_accuracy": 97.0, "baseline": None}
    results, passed = apply_gates(report, cfg, None)
    assert passed is False
    assert report["gates"] == [r.to_dict() for r in results]
    assert report["gates"][0] == {"gate": "max_size_mb", "threshold": 0.01, "measured": results[0].measured,
                                  "passed": False, "detail": results[0].detail}


def test_junit_has_a_testcase_per_gate_and_a_failure_per_failed_one(report, tmp_path):
    base = _with_latency(report, 1.00, (0.90, 1.10))
    noisy = _with_latency(report, 1.06, (0.95, 1.18))
    noisy["final"]["accuracy_arm"] = None
    results = evaluate(noisy, {"max_size_mb": 0.01, "max_latency_ms": 8, "min_accuracy": 99.5,
                               "max_regression": 5, "min_accuracy_arm": 90}, baseline=base)
    path = tmp_path / "gates.xml"
    write_junit(results, path, percentile=90)
    root = ET.parse(path).getroot()
    suite = root.find("testsuite")
    cases = suite.findall("testcase")
    assert [c.get("name") for c in cases] == [r.gate for r in results]
    failed = [c.get("name") for c in cases if c.find("failure") is not None]
    assert failed == ["max_size_mb", "min_accuracy", "min_accuracy_arm"]
    assert suite.get("tests") == "5" and suite.get("failures") == "3" and suite.get("skipped") == "1"
    assert [c.get("name") for c in cases if c.find("skipped") is not None] == ["max_regression"]
    assert "not measured" in cases[4].find("failure").get("message")


def test_gate_table_prints_each_verdict(report):
    from rich.console import Console

    results = evaluate(report, {"max_size_mb": 0.01, "min_accuracy": 97})
    console = Console(record=True, width=200)
    print_gate_table(results, 90, console)
    text = console.export_text()
    assert "max_size_mb" in text and "FAIL" in text and "PASS" in text and "≥ 97%" in text


def test_apply_gates_takes_the_config_model(report):
    from edgekd.config import GatesConfig

    results, passed = apply_gates(report, GatesConfig(max_size_mb=2.0, min_accuracy=97.0), None)
    assert passed is True
    assert [r.gate for r in results] == ["max_size_mb", "min_accuracy"]


def test_memory_and_energy_gates():
    from edgekd.report.gate import evaluate

    report = {"final": {"peak_memory_mb": 95.5, "energy_mj": None, "measured_on": "root@pi",
                        "not_measured": {"energy_mj": "root@pi: no power sensor readable here"}}}
    mem, energy = evaluate(report, {"max_memory_mb": 100, "max_energy_mj": 5})
    assert (mem.gate, mem.passed, mem.measured) == ("max_memory_mb", True, 95.5) and "root@pi" in mem.detail
    assert energy.passed is False and "no power sensor" in energy.detail  # not measured fails its gate
    assert evaluate(report, {"max_memory_mb": 90})[0].passed is False


@pytest.mark.parametrize("change, words", [({"target": {"name": "intel-cpu", "backend": "openvino"}}, "for intel-cpu"),
                                           ({"task": "causal-lm"}, "a causal-lm run")])
def test_a_baseline_of_another_target_or_task_fails_with_the_reason_not_a_ratio(report, change, words):
    base = {**copy.deepcopy(report), **change}
    result = evaluate(report, {"max_regression": 5}, baseline=base)[0]
    assert result.passed is False and result.measured is None and words in result.detail, result.detail
    assert "same task and target" in result.detail
