"""report.md and report.html: the tables people read, and nothing unmeasured shown as a number."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from edgekd.report import render_html, render_markdown, write_html, write_markdown
from edgekd.report.plots import Point, histogram, log_ticks, nice_ticks, pareto_front

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "report_example.json"


@pytest.fixture
def report() -> dict:
    return json.loads(FIXTURE.read_text())


def _unmeasured(report: dict) -> dict:
    """The fixture after the board dropped out: no final latency, no final accuracy."""
    final = report["final"]
    final.update(latency_ms=None, latency_samples_ms=None, latency_ci_ms=None, speedup_vs_teacher=None,
                 accuracy=None, measured_on=None)
    final["not_measured"] = {"latency_ms": "board pi@pi5 unreachable: connection refused",
                             "accuracy": "board pi@pi5 unreachable: connection refused"}
    report.pop("gates")
    return report


def test_markdown_has_the_stage_table(report):
    md = render_markdown(report)
    assert "| Stage | Params | MACs | Size | Accuracy | p50 | p90 | Speedup | Time |" in md
    for stage in ("teacher (torchvision:resnet18)", "| distill |", "| prune |", "| quantize |", "final (int8)"):
        assert stage in md
    final_row = next(line for line in md.splitlines() if line.startswith("| final (int8)"))
    assert "40.13 k" in final_row and "97.78%" in final_row and "0.411 ms" in final_row and "9.50×" in final_row


def test_markdown_has_precision_candidates_and_gates(report):
    md = render_markdown(report)
    assert "### Precision: int8" in md
    assert "**Why:** int8 is" in md
    assert "| Precision | Artifact | Accuracy | Size | p50 | p90 | Peak memory | Energy / inference | Measured on | Chosen |" in md
    assert "✔ chosen" in md
    assert "### Gates" in md and "✅ all 4 gates passed" in md
    assert "| max_latency_ms | ≤ 8 ms (p90) |" in md
    # the rejected candidate was never benchmarked: it says so, with the reason
    assert "not measured: rejected before benchmarking" in md


def test_host_latency_is_labelled_for_a_board(report):
    md = render_markdown(report)
    distill_row = next(line for line in md.splitlines() if line.startswith("| distill |"))
    assert "0.281 ms [1]" in distill_row
    assert "[1] measured on this host" in md and "not on raspberry-pi-5" in md


def test_unmeasured_figures_are_text_with_reasons(report):
    md = render_markdown(_unmeasured(report))
    final_row = next(line for line in md.splitlines() if line.startswith("| final (int8)"))
    cells = [c.strip() for c in final_row.strip("|").split("|")]
    accuracy, p50, p90, speedup = cells[4], cells[5], cells[6], cells[7]
    for cell in (accuracy, p50, p90, speedup):
        assert cell.startswith("not measured"), final_row
        assert not re.search(r"\d+\.\d+", cell.split("[")[0]), cell
    assert "not measured: board pi@pi5 unreachable: connection refused" in md
    assert "no reason recorded" not in md  # the speedup's reason is its latency's
    assert "latency not measured (board pi@pi5 unreachable" in md.splitlines()[2]


def test_failed_gates_are_listed(report):
    report["gates"][1].update(passed=False, detail="p90 9.1 ms > 8 ms, measured on pi@pi5")
    md = render_markdown(report)
    assert "❌ 1 of 4 gates failed:** max_latency_ms" in md
    assert "❌ fail" in md


def test_write_markdown_and_html(tmp_path, report):
    write_markdown(report, tmp_path / "report.md")
    write_html(report, tmp_path / "report.html")
    assert (tmp_path / "report.md").read_text().startswith("## edgekd report: digits-rpi5")
    assert (tmp_path / "report.html").read_text().startswith("<!DOCTYPE html>")


def _assert_self_contained(html: str) -> None:
    lowered = html.lower()
    assert "http://" not in lowered and "https://" not in lowered
    assert "<link" not in lowered and "@import" not in lowered and "<script" not in lowered
    assert not re.search(r"\bsrc\s*=", lowered)
    assert not re.search(r"url\(", lowered)


def test_html_is_self_contained_with_plots(report):
    html = render_html(report)
    _assert_self_contained(html)
    assert html.count("<svg") == 4
    for title in ("Accuracy vs p50 latency", "Latency distribution: teacher vs final", "Model size by stage",
                  "Per-layer quantization sensitivity"):
        assert title in html
    assert "<circle" in html  # points on the Pareto view
    assert "/classifier/Gemm" in html


def test_html_without_samples_or_measurements(report):
    assert "Latency distribution: teacher vs final" in render_html(report)  # samples: a histogram
    report["teacher"].pop("latency_samples_ms")
    html = render_html(_unmeasured(report))
    _assert_self_contained(html)
    assert "Latency percentiles: teacher vs final" in html  # no samples: percentile bars
    assert "final (int8): not measured (board pi@pi5 unreachable" in html
    assert 'class="nm">not measured' in html


def test_html_escapes_report_text(report):
    report["name"] = "<script>alert(1)</script>"
    html = render_html(report)
    assert "<script>" not in html and "&lt;script&gt;" in html


def test_minimal_onnx_entry_report_renders(report):
    minimal = {k: report[k] for k in ("schema_version", "edgekd_version", "target", "environment", "final")}
    minimal["stages"] = []
    assert "final (int8)" in render_markdown(minimal)
    _assert_self_contained(render_html(minimal))


def test_plot_helpers():
    assert nice_ticks(0, 9.3) == [0, 2, 4, 6, 8, 10]
    assert log_ticks(0.3, 4.2) == [0.2, 0.5, 1, 2, 5]
    front = pareto_front([Point(1, 90, "a", "g"), Point(2, 95, "b", "g"), Point(3, 94, "c", "g")])
    assert [p.label for p in front] == ["a", "b"]
    assert "<rect" in histogram({"x": [1.0, 1.1, 1.2], "y": [5.0, 5.5]}, "t", "ms")


def test_prune_allocation_search_is_tabled_with_the_chosen_one_marked(report):
    prune = next(s for s in report["stages"] if s["name"] == "prune")
    prune["allocation_search"] = [
        {"allocation": "uniform", "stage_ratios": None, "steps": 12, "params": 5727858, "macs": 17848890,
         "latency_ms": 0.597, "speedup": 1.498, "chosen": False},
        {"allocation": "favour layer3", "stage_ratios": {"layer3": 0.9}, "steps": 24, "params": 5252762,
         "macs": 18152970, "latency_ms": 0.4386, "speedup": 2.039, "chosen": True, "near_target": True},
        {"allocation": "favour layer1", "stage_ratios": {"layer1": 0.9}, "steps": 26, "params": 5000000,
         "macs": 16543810, "latency_ms": 0.42, "speedup": 2.1, "chosen": False, "near_target": False}]
    md = render_markdown(report)
    assert "Where to prune: allocations timed on the target" in md
    row = next(line for line in md.splitlines() if "favour layer3" in line)
    assert "(chosen)" in row and "0.439 ms" in row and "2.04×" in row and "5.25 M" in row
    assert "(chosen)" not in next(line for line in md.splitlines() if line.startswith("| uniform"))
    assert "pruned past the target: not compared" in next(line for line in md.splitlines() if "favour layer1" in line)


def test_render_functions_survive_importing_their_modules(report):
    # The package's render_html / render_markdown are functions, and stay so after their modules load.
    import importlib

    import edgekd.report as report_pkg

    first = report_pkg.render_html(report)
    importlib.import_module("edgekd.report.to_html")
    importlib.import_module("edgekd.report.to_markdown")
    second = report_pkg.render_html(report)
    assert first == second and second.startswith("<!DOCTYPE html>")
    assert report_pkg.render_markdown(report) == render_markdown(report)


def test_speedup_compares_only_the_same_runtime_and_place():
    from edgekd.report.tables import speedup_cell

    teacher = {"latency_ms": {"p50": 4.0}, "measured_on": "host", "latency_runtime": "openvino fp32, 2 threads"}
    same = {"latency_ms": {"p50": 1.0}, "measured_on": "host", "latency_runtime": "openvino fp32, 2 threads"}
    other = {**same, "latency_runtime": "onnxruntime fp32, 2 threads"}
    elsewhere = {**same, "measured_on": "root@pi"}
    assert speedup_cell(teacher, same).text == "4.00×"
    assert speedup_cell(teacher, other).text == "—" and "different runtimes" in speedup_cell(teacher, other).note
    assert "different machines" in speedup_cell(teacher, elsewhere).note


def test_lm_distill_row_says_how_much_text_the_teacher_wrote():
    from edgekd.report.tables_lm import distill_table

    entry = {"name": "distill", "loss": "forward_kl", "perplexity": 29.4, "steps": 400,
             "baseline": {"perplexity": 35.7, "steps": 400}}
    plain = distill_table({"stages": [entry]})
    assert plain is not None and plain.rows[0][0].text == "distilled (forward_kl)"
    seq = {**entry, "sequence_kd": {"new_tokens": 64, "blocks": 800, "of_blocks": 3200}}
    table = distill_table({"stages": [seq]})
    assert table is not None
    assert table.rows[0][0].text == "distilled (forward_kl; 800 of 3200 blocks end in 64 tokens the teacher wrote)"
    assert table.rows[1][0].text == "cross-entropy only (same steps)"
    last = {**entry, "sequence_kd": {"new_tokens": 64, "blocks": 480, "of_blocks": 3200, "last_steps": 60}}
    table = distill_table({"stages": [last]})
    assert table is not None and table.rows[0][0].text == (
        "distilled (forward_kl; 480 of 3200 blocks end in 64 tokens the teacher wrote, trained on in the last 60 steps)")


def test_speculative_table_says_what_a_round_cost_and_gave():
    from edgekd.report.tables_lm import speculative_table

    chosen = {"draft_tokens": 2, "min_confidence": 0.0, "lookup": False, "acceptance_rate": 0.47, "tokens_per_s": 95.0,
              "teacher_tokens_per_s": 70.0, "speedup": 1.357, "identical": 20, "prompts": 20, "measured_on": "host",
              "teacher_token_ms": 14.1, "round": {"tokens": 1.95, "check_ms": 16.54, "draft_ms": 4.02}}
    older = {k: v for k, v in chosen.items() if k not in ("round", "teacher_token_ms")}  # a report from before
    table = speculative_table({"speculative": {**chosen, "compared": [older]}})
    assert table is not None
    assert "teacher alone (14.1 ms a token)" in table.headers
    col = table.headers.index("a round")
    assert table.rows[0][col].text == "1.95 tokens: check 16.5 + draft 4.0 ms" and table.rows[1][col].text == "—"


def test_the_pareto_view_colours_points_by_the_runtime_that_timed_them(report):
    from edgekd.report.to_html import render_html

    report = json.loads(json.dumps(report))
    report["target"]["backend"] = "openvino"
    report["teacher"]["latency_runtime"] = "openvino fp32, 4 threads"
    for st in report["stages"]:
        if st.get("latency_ms") is not None:
            st["latency_runtime"] = "onnxruntime fp32, 4 threads"
    html = render_html(report)
    assert "onnxruntime on host" in html and "openvino on pi@pi5" in html  # the stages', the teacher's and final's
    assert "which runtime timed each latency" in html
