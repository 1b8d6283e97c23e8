"""`edgekd gate` and `edgekd report`: exit codes, thresholds from config and command line, outputs."""
from __future__ import annotations

import argparse
import json
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from edgekd.errors import BadInputError
from edgekd.report.cli import add_parsers, run_gate, run_report

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "report_example.json"


def _parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="edgekd")
    add_parsers(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args([str(a) for a in argv])


def _report(tmp_path: Path, name: str = "report.json", **final) -> Path:
    report = json.loads(FIXTURE.read_text())
    report["final"].update(final)
    path = tmp_path / name
    path.write_text(json.dumps(report))
    return path


def test_gate_passes_with_config_gates(capsys):
    args = _parse("gate", FIXTURE)
    assert args.func is run_gate
    assert run_gate(args) == 0
    out = capsys.readouterr().out
    assert "max_size_mb" in out and "all 4 gates passed" in out


def test_failing_gate_exits_1_and_names_the_gate(capsys, tmp_path):
    junit = tmp_path / "out" / "gates.xml"
    code = run_gate(_parse("gate", FIXTURE, "--max-latency-ms", "0.3", "--percentile", "50", "--junit", junit))
    assert code == 1
    out = capsys.readouterr().out
    assert "gate failed: max_latency_ms" in out
    cases = ET.parse(junit).getroot().find("testsuite").findall("testcase")
    assert [c.get("name") for c in cases] == ["max_size_mb", "max_latency_ms", "min_accuracy", "max_accuracy_drop"]
    assert [c.get("name") for c in cases if c.find("failure") is not None] == ["max_latency_ms"]


def test_command_line_overrides_config(capsys):
    assert run_gate(_parse("gate", FIXTURE, "--min-accuracy", "99")) == 1
    assert "gate failed: min_accuracy" in capsys.readouterr().out


def test_no_gates_is_bad_input(tmp_path):
    report = json.loads(FIXTURE.read_text())
    report["config"]["gates"] = {}
    path = tmp_path / "report.json"
    path.write_text(json.dumps(report))
    with pytest.raises(BadInputError, match="no gates to check"):
        run_gate(_parse("gate", path))


def test_baseline_flags_need_each_other():
    with pytest.raises(BadInputError, match="--max-regression needs --baseline"):
        run_gate(_parse("gate", FIXTURE, "--max-regression", "5"))
    with pytest.raises(BadInputError, match="--baseline needs --max-regression"):
        run_gate(_parse("gate", FIXTURE, "--baseline", FIXTURE))


def test_baseline_with_itself_passes(capsys):
    assert run_gate(_parse("gate", FIXTURE, "--baseline", FIXTURE, "--max-regression", "5")) == 0
    assert "max_regression" in capsys.readouterr().out


def test_inconclusive_regression_exits_0_and_says_so(capsys, tmp_path):
    lat = {"p50": 1.0, "p90": 1.1, "p99": 1.3, "mean": 1.02}
    base = _report(tmp_path, "base.json", latency_ms=lat, latency_ci_ms={"p90": [1.0, 1.2]})
    cur = _report(tmp_path, "cur.json", latency_ms={**lat, "p90": 1.16}, latency_ci_ms={"p90": [1.05, 1.3]})
    assert run_gate(_parse("gate", cur, "--baseline", base, "--max-regression", "5")) == 0
    assert "inconclusive (does not fail): max_regression" in capsys.readouterr().out


def test_unmeasured_latency_fails_the_gate(capsys, tmp_path):
    path = _report(tmp_path, latency_ms=None, speedup_vs_teacher=None, not_measured="board unreachable")
    assert run_gate(_parse("gate", path)) == 1
    assert "not measured: board unreachable" in capsys.readouterr().out


def test_bad_threshold_is_an_argparse_error():
    with pytest.raises(SystemExit) as e:
        _parse("gate", FIXTURE, "--max-size-mb", "-1")
    assert e.value.code == 2


def test_render_md_and_html(tmp_path, capsys):
    md, html = tmp_path / "r.md", tmp_path / "r.html"
    assert run_report(_parse("report", "render", FIXTURE, "--format", "md", "--out", md)) == 0
    assert run_report(_parse("report", "render", FIXTURE, "--out", html)) == 0
    assert md.read_text().startswith("## edgekd report")
    assert "<svg" in html.read_text()
    with pytest.raises(BadInputError, match="cannot tell the format"):
        run_report(_parse("report", "render", FIXTURE, "--out", tmp_path / "r.txt"))


def test_validate(tmp_path, capsys):
    assert run_report(_parse("report", "validate", FIXTURE)) == 0
    assert "is valid (schema_version 1)" in capsys.readouterr().out
    report = json.loads(FIXTURE.read_text())
    del report["final"]["precision"]
    del report["target"]
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(report))
    with pytest.raises(BadInputError, match=r"\(2 problems\)") as e:
        run_report(_parse("report", "validate", bad))
    assert "'precision' is a required property" in str(e.value) and e.value.exit_code == 2


def test_compare_side_by_side_with_deltas(tmp_path, capsys):
    report = json.loads(FIXTURE.read_text())
    a_dir, b_dir = tmp_path / "main", tmp_path / "branch"
    a_dir.mkdir()
    b_dir.mkdir()
    (a_dir / "report.json").write_text(json.dumps(report))
    report["final"]["accuracy"] = 97.28
    report["final"]["latency_ms"]["p50"] *= 1.1
    report["final"]["accuracy_arm"] = None
    (b_dir / "report.json").write_text(json.dumps(report))
    from rich.console import Console

    import edgekd.report.compare as compare

    console = Console(record=True, width=160)
    compare.print_comparison(json.loads((a_dir / "report.json").read_text()), report, ("main", "branch"), console)
    text = console.export_text()
    assert "-0.50 pt" in text and "+10.0%" in text
    assert "main" in text and "branch" in text
    assert run_report(_parse("report", "compare", a_dir / "report.json", b_dir / "report.json")) == 0
    out = capsys.readouterr().out
    assert "latency p50" in out and "note:" not in out  # the same target: no caveat
    assert text.count("teacher accuracy") == 1  # the teacher stage's accuracy is the teacher's own row
    report["target"] = {**report["target"], "name": "intel-cpu", "backend": "openvino"}
    (b_dir / "report.json").write_text(json.dumps(report))
    assert run_report(_parse("report", "compare", a_dir / "report.json", b_dir / "report.json")) == 0
    assert "and branch for intel-cpu (openvino)" in capsys.readouterr().out  # said before the deltas


def test_compare_shows_the_language_model_figures_only_for_lm_reports():
    from edgekd.report.compare import comparison_table

    def lm(ppl, tps, speedup, accept, base):
        return {"task": "causal-lm", "target": {"name": "cpu"},
                "final": {"precision": "int4", "perplexity": ppl, "decode_tokens_per_s": tps, "ttft_ms": 15.0,
                          "peak_memory_mb": 200.0, "next_token_agreement": 88.0},
                "teacher": {"perplexity": 15.0, "decode_tokens_per_s": 70.0},
                "speculative": {"speedup": speedup, "acceptance_rate": accept, "tokens_per_s": 100.0},
                "stages": [{"name": "distill", "perplexity": ppl, "baseline": {"perplexity": base}}]}

    sampled = lm(31.5, 330.0, 1.45, 0.4413, 35.75)
    sampled["speculative"]["sampled"] = {"speedup": 1.06, "acceptance_rate": 0.361, "temperature": 0.7}
    rows = {r[0].text: [c.text for c in r[1:]] for r in comparison_table(lm(30.0, 300.0, 1.29, 0.431, 35.75), sampled).rows}
    assert rows["test perplexity"] == ["30.00", "31.50", "+5.0%"]
    assert rows["decode"] == ["300.0 tok/s", "330.0 tok/s", "+10.0%"]
    assert rows["speculative speedup"] == ["1.29×", "1.45×", "+0.16×"]
    assert rows["speculative acceptance"] == ["43.10%", "44.13%", "+1.03 pt"]
    assert rows["speculative sampling speedup"] == ["—", "1.06×", "—"]  # timed in the second run only
    assert rows["distill perplexity"][2] == "+5.0%" and rows["distill baseline perplexity"][2] == "+0.0%"
    none = lm(30.0, 300.0, 1.29, 0.431, 35.75)  # nothing drafted when sampled: the reason beside that figure
    none["speculative"]["sampled"] = {"speedup": 1.0, "acceptance_rate": None,
                                      "not_measured": {"acceptance_rate": "nothing was drafted"}}
    rows = {r[0].text: r[1:] for r in comparison_table(none, sampled).rows}
    assert rows["speculative sampling acceptance"][0].note == "nothing was drafted"
    image = {r[0].text for r in comparison_table(json.loads(FIXTURE.read_text()), json.loads(FIXTURE.read_text())).rows}
    assert not image & {"test perplexity", "decode", "speculative speedup", "distill perplexity"}


def test_example_workflow_compresses_gates_and_posts_the_report():
    import yaml

    workflow = yaml.safe_load((Path(__file__).resolve().parents[2] / "examples" / "github-actions.yml").read_text())
    steps = workflow["jobs"]["compress"]["steps"]
    scripts = "\n".join(step.get("run", "") for step in steps)
    assert "edgekd compress" in scripts and "--target rpi --config edgekd.yaml" in scripts
    assert "edgekd gate runs/ci/report.json" in scripts and "--junit runs/ci/gates.xml" in scripts
    assert "--body-file runs/ci/report.md" in scripts
    post = next(step for step in steps if "report.md" in step.get("name", ""))
    assert post["if"].startswith("always()")  # the report is posted even when a gate fails
    # The board's host key comes pinned from a secret; scanning it at run time would trust any answer.
    assert "ssh-keyscan" not in scripts and "$PI_KNOWN_HOSTS" in scripts and "StrictHostKeyChecking" not in scripts


def test_a_gate_prints_the_measured_figure_on_the_side_of_the_threshold_it_is(capsys):
    p50 = json.loads(FIXTURE.read_text())["final"]["latency_ms"]["p50"]
    threshold = round(p50 - 0.0004, 4)  # under the figure, yet equal to it at 3 decimals
    assert run_gate(_parse("gate", FIXTURE, "--max-latency-ms", threshold, "--percentile", "50")) == 1
    detail = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("max_latency_ms:"))
    shown = float(detail.split("p50 ")[1].split(" ms")[0])
    assert shown > threshold and f"> {threshold:g} ms" in detail, detail


def test_reports_with_nan_or_that_break_the_schema_are_refused_in_one_line(tmp_path):
    text = FIXTURE.read_text().replace('"accuracy": 98.61', '"accuracy": NaN', 1)
    assert "NaN" in text
    (tmp_path / "nan.json").write_text(text)
    with pytest.raises(BadInputError, match="holds NaN, which is not a number") as e:
        run_report(_parse("report", "render", tmp_path / "nan.json", "--out", tmp_path / "r.md"))
    report = json.loads(FIXTURE.read_text())
    report["final"]["accuracy"] = "high"
    report["final"]["size_bytes"] = -1
    (tmp_path / "bad.json").write_text(json.dumps(report))
    with pytest.raises(BadInputError) as e:
        run_gate(_parse("gate", tmp_path / "bad.json", "--min-accuracy", "1"))
    assert "\n" not in str(e.value) and "(and 1 more: edgekd report validate lists them)" in str(e.value)


def test_outputs_never_replace_a_link_a_device_or_a_copied_runs_report(tmp_path):
    import os

    (tmp_path / "real.md").write_text("mine")
    (tmp_path / "link.md").symlink_to(tmp_path / "real.md")
    os.mkfifo(tmp_path / "pipe.md")
    copied = tmp_path / "copied-run"  # a run directory copied without its hidden marker
    copied.mkdir()
    (copied / "report.json").write_text(FIXTURE.read_text())
    for out, said in ((tmp_path / "link.md", "is a symbolic link"), (tmp_path / "pipe.md", "is not a regular file"),
                      (copied / "report.md", "would overwrite a run directory's report.md"), ("", "an empty path")):
        with pytest.raises(BadInputError, match=said):
            run_report(_parse("report", "render", FIXTURE, "--out", out, "--format", "md"))
    assert (tmp_path / "real.md").read_text() == "mine" and (tmp_path / "link.md").is_symlink()
    assert not (copied / "report.md").exists()
