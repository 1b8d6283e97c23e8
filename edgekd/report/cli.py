"""The `edgekd gate` and `edgekd report` commands: argument parsing and the work they start."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from ..errors import EXIT_GATE_FAILED, EXIT_OK, BadInputError
from ..runs import check_output_file
from .gate import GATES, SETTINGS, all_passed, evaluate, print_gate_table, write_junit
from .schema import SCHEMA_VERSION, load_report, read_report_json, validate_report

# CLI flag (as argparse stores it) -> gate name; all gates use the same name in config.gates.
_GATE_FLAGS = ("max_size_mb", "max_latency_ms", "min_accuracy", "max_accuracy_drop", "max_regression",
               "min_accuracy_arm", "min_arm_agreement", "max_memory_mb", "max_energy_mj", "min_decode_tokens_per_s",
               "max_perplexity", "max_perplexity_increase", "min_speculative_speedup")


def _number(lo: float, hi: float | None = None, lo_open: bool = False) -> Any:
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if value != value or (value <= lo if lo_open else value < lo) or (hi is not None and value > hi):
            bound = f"{'above' if lo_open else 'at least'} {lo:g}" + (f" and at most {hi:g}" if hi is not None else "")
            raise argparse.ArgumentTypeError(f"{text} must be {bound}")
        return value
    return parse


def add_parsers(subparsers: Any) -> None:
    """Register `gate` and `report` (render, validate, compare) on an argparse subparsers object;
    each sets `func` to the function that runs it and returns the exit code."""
    g = subparsers.add_parser(
        "gate", help="check a report against thresholds; exit 1 when a gate fails",
        description="Check report.json against thresholds from the command line and the config's gates: "
                    "section (the command line wins). A figure that was not measured fails its gate.")
    g.add_argument("report", metavar="REPORT", help="a run's report.json")
    g.add_argument("--max-size-mb", type=_number(0, lo_open=True), metavar="X", help="final artifact size, MB (10^6 B)")
    g.add_argument("--max-latency-ms", type=_number(0, lo_open=True), metavar="X", help="final latency at --percentile")
    g.add_argument("--percentile", type=int, choices=(50, 90, 99), help="latency percentile to gate (default 90)")
    g.add_argument("--min-accuracy", type=_number(0, 100), metavar="X", help="final accuracy, percent")
    g.add_argument("--max-accuracy-drop", type=_number(0, 100), metavar="PT", help="points below the teacher")
    g.add_argument("--baseline", metavar="REPORT", help="a baseline report.json for --max-regression")
    g.add_argument("--max-regression", type=_number(0), metavar="PCT",
                   help="latency slower than the baseline by more than PCT percent fails (beyond noise)")
    g.add_argument("--min-accuracy-arm", type=_number(0, 100), metavar="X", help="accuracy on aarch64, percent")
    g.add_argument("--min-arm-agreement", type=_number(0, 100), metavar="X", help="aarch64 vs host agreement, %%")
    g.add_argument("--max-memory-mb", type=_number(0, lo_open=True), metavar="X",
                   help="peak resident memory of the inference process, MB")
    g.add_argument("--max-energy-mj", type=_number(0, lo_open=True), metavar="X",
                   help="energy per inference, mJ (boards with a power sensor)")
    g.add_argument("--min-decode-tokens-per-s", type=_number(0, lo_open=True), metavar="X",
                   help="causal-lm: the final model's decode speed, tokens/s")
    g.add_argument("--max-perplexity", type=_number(0, lo_open=True), metavar="X",
                   help="causal-lm: the final model's test perplexity")
    g.add_argument("--max-perplexity-increase", type=_number(0), metavar="PCT",
                   help="causal-lm: test perplexity added by quantization, percent of the FP32 student's")
    g.add_argument("--min-speculative-speedup", type=_number(0, lo_open=True), metavar="X",
                   help="causal-lm: speculative decoding's speedup over the teacher alone")
    g.add_argument("--junit", metavar="FILE", help="also write JUnit XML, one testcase per gate")
    g.set_defaults(func=run_gate)

    r = subparsers.add_parser("report", help="render, validate or compare report.json files",
                              description="Work with report.json files of finished runs.")
    rs = r.add_subparsers(dest="report_command", metavar="{render,validate,compare}")
    rs.required = True
    render = rs.add_parser("render", help="render report.md or report.html from a report.json")
    render.add_argument("report", metavar="REPORT")
    render.add_argument("--format", choices=("md", "html"), help="default: from --out's suffix")
    render.add_argument("--out", required=True, metavar="FILE")
    validate = rs.add_parser("validate", help="check a report.json against the schema (exit 2 when invalid)")
    validate.add_argument("report", metavar="REPORT")
    compare = rs.add_parser("compare", help="two reports side by side, with deltas")
    compare.add_argument("a", metavar="A.json")
    compare.add_argument("b", metavar="B.json")
    r.set_defaults(func=run_report)


def gate_thresholds(report: dict, args: argparse.Namespace) -> dict:
    """The report's config.gates section, overridden and extended by the command line's thresholds."""
    config_gates = (report.get("config") or {}).get("gates") or {}
    thresholds = {}
    for key, value in config_gates.items():
        if key in GATES or key in SETTINGS:
            thresholds[key] = value
        elif value is not None:
            print(f"edgekd gate: ignoring config.gates.{key}: this edgekd does not know that gate", file=sys.stderr)
    for key in _GATE_FLAGS:
        if getattr(args, key, None) is not None:
            thresholds[key] = getattr(args, key)
    if getattr(args, "percentile", None) is not None:
        thresholds["percentile"] = args.percentile
    if getattr(args, "baseline", None):
        thresholds["baseline"] = args.baseline
    return {k: v for k, v in thresholds.items() if v is not None}


def _resolve_baseline(path: str, report_path: Path, from_config: bool) -> Path:
    p = Path(path).expanduser()
    if not p.is_absolute() and not p.exists() and from_config:
        beside = report_path.parent / p
        if beside.exists():
            return beside
    return p


def run_gate(args: argparse.Namespace) -> int:
    """`edgekd gate`: print the verdicts, write JUnit if asked; 0 when all gates hold, 1 when any fails."""
    report_path = Path(args.report)
    if getattr(args, "junit", None):
        check_output_file(args.junit, "gate: --junit", (args.report, getattr(args, "baseline", None)))
    report = load_report(report_path)
    thresholds = gate_thresholds(report, args)
    if not any(k in GATES for k in thresholds):
        raise BadInputError(f"edgekd gate {report_path}: no gates to check; pass thresholds such as "
                            "--max-size-mb, --max-latency-ms, --min-accuracy, or set gates: in the config")
    if getattr(args, "baseline", None) and thresholds.get("max_regression") is None:
        raise BadInputError("--baseline needs --max-regression PCT (the slowdown that fails the gate)")
    baseline = None
    if thresholds.get("max_regression") is not None:
        if not thresholds.get("baseline"):
            raise BadInputError("--max-regression needs --baseline REPORT (or gates.baseline in the config)")
        from_config = not getattr(args, "baseline", None)
        baseline = load_report(_resolve_baseline(thresholds["baseline"], report_path, from_config))
    percentile = thresholds.get("percentile") or 90
    results = evaluate(report, thresholds, baseline)
    from rich.console import Console

    console = Console()
    print_gate_table(results, percentile, console)
    if getattr(args, "junit", None):
        write_junit(results, args.junit, percentile)
    failed = [r for r in results if r.passed is False]
    unsure = [r.gate for r in results if r.passed is None]
    if unsure:
        console.print(f"inconclusive (does not fail): {', '.join(unsure)}", highlight=False, soft_wrap=True)
    if not all_passed(results):
        console.print(f"[bold red]gate failed:[/] {', '.join(r.gate for r in failed)}", highlight=False, soft_wrap=True)
        return EXIT_GATE_FAILED
    console.print(f"[bold green]all {len(results)} gates passed[/]", highlight=False, soft_wrap=True)
    return EXIT_OK


def run_report(args: argparse.Namespace) -> int:
    """`edgekd report render|validate|compare`; returns the exit code (bad input raises BadInputError)."""
    command = getattr(args, "report_command", None)
    if command == "render":
        return _render(args)
    if command == "validate":
        return _validate(args)
    if command == "compare":
        return _compare(args)
    raise BadInputError(f"edgekd report: unknown command {command!r}; use render, validate or compare")


def _render(args: argparse.Namespace) -> int:
    from .to_html import write_html
    from .to_markdown import write_markdown

    check_output_file(args.out, "report render: --out", (args.report,))
    out = Path(args.out)
    fmt = args.format or {".md": "md", ".html": "html", ".htm": "html"}.get(out.suffix.lower())
    if fmt is None:
        raise BadInputError(f"--out {out}: cannot tell the format from its suffix; pass --format md or html")
    check_output_file(out, "report render: --out", (args.report,))
    report = load_report(args.report)
    (write_markdown if fmt == "md" else write_html)(report, out)
    print(f"wrote {out}")
    return EXIT_OK


def _validate(args: argparse.Namespace) -> int:
    report = read_report_json(args.report)
    problems = validate_report(report)
    if problems:
        raise BadInputError(f"report {args.report} is not a valid edgekd report "
                            f"({len(problems)} problems):\n  " + "\n  ".join(problems))
    print(f"report {args.report} is valid (schema_version {SCHEMA_VERSION})")
    return EXIT_OK


def _compare(args: argparse.Namespace) -> int:
    from .compare import print_comparison

    a, b = Path(args.a), Path(args.b)
    names = (str(a), str(b))
    if a.name == b.name and a.parent.name and b.parent.name and a.parent.name != b.parent.name:
        names = (a.parent.name, b.parent.name)
    ra, rb = load_report(a), load_report(b)
    ta, tb = (r.get("task", "image-classification") for r in (ra, rb))
    if ta != tb:
        raise BadInputError(f"report compare: {a} is a {ta} run and {b} a {tb} run; their figures do not compare")
    where = [_runtime(r) for r in (ra, rb)]
    if where[0] != where[1]:
        print(f"note: {names[0]} was measured for {where[0]} and {names[1]} for {where[1]}: their latencies are "
              "different runtimes' on different targets")
    print_comparison(ra, rb, names)
    return EXIT_OK


def _runtime(report: dict) -> str:
    """`cpu (onnxruntime)`: a report's target and its backend."""
    target = report.get("target") or {}
    return f"{target.get('name')} ({target.get('backend')})"
