"""CI gates: thresholds checked against a report; a figure that was not measured fails its gate."""
from __future__ import annotations

import math
import xml.etree.ElementTree as ET
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ..config.lm import LM_ONLY_GATES as LM_GATES
from ..errors import BadInputError
from ..runs import write_text
from .schema import not_measured_reason

MB = 1_000_000  # sizes are gated in megabytes (10^6 bytes), as the CLI flag --max-size-mb says

# gate name -> (comparison shown to readers, unit); the order is the order gates are checked in.
GATES: dict[str, tuple[str, str]] = {
    "max_size_mb": ("≤", "MB"),
    "max_latency_ms": ("≤", "ms"),
    "min_accuracy": ("≥", "%"),
    "max_accuracy_drop": ("≤", "pt"),
    "max_regression": ("≤", "%"),
    "min_accuracy_arm": ("≥", "%"),
    "min_arm_agreement": ("≥", "%"),
    "max_memory_mb": ("≤", "MB"),
    "max_energy_mj": ("≤", "mJ"),
    "min_decode_tokens_per_s": ("≥", "tokens/s"),
    "max_perplexity": ("≤", ""),
    "max_perplexity_increase": ("≤", "%"),
    "min_speculative_speedup": ("≥", "x"),
}
SETTINGS = ("percentile", "baseline")
PERCENTILES = (50, 90, 99)


@dataclass(frozen=True)
class GateResult:
    """One gate's verdict: passed is True, False, or None when noise leaves it inconclusive."""

    gate: str
    threshold: float
    measured: float | None
    passed: bool | None
    detail: str

    def to_dict(self) -> dict:
        """The entry written to report.json's `gates` list; a figure not measured has its reason beside it."""
        out = asdict(self)
        if self.measured is None:
            out["not_measured"] = self.detail.removeprefix("not measured: ")
        return out

    @property
    def verdict(self) -> str:
        """'pass', 'fail' or 'inconclusive'."""
        return {True: "pass", False: "fail", None: "inconclusive"}[self.passed]


def describe_threshold(gate: str, threshold: float | None, percentile: int | None = None) -> str:
    """A threshold as a reader sees it, e.g. '≤ 8 ms (p90)'."""
    if threshold is None:
        return "—"
    op, unit = GATES.get(gate, ("", ""))
    text = f"{op} {threshold:g}{'' if unit == '%' else ' '}{unit}".strip()
    if gate == "max_latency_ms" and percentile:
        text += f" (p{percentile})"
    return text


def evaluate(report: dict, thresholds: dict, baseline: dict | None = None) -> list[GateResult]:
    """Check every threshold in `thresholds` (GatesConfig's keys; None means unset) against `report`;
    `baseline` is the baseline report that max_regression compares latency with."""
    unknown = sorted(set(thresholds) - set(GATES) - set(SETTINGS))
    if unknown:
        raise BadInputError(f"gates: unknown gate {', '.join(map(repr, unknown))}; known: {', '.join(GATES)}")
    percentile = thresholds.get("percentile") or 90
    if percentile not in PERCENTILES:
        raise BadInputError(f"gates.percentile: {percentile!r} is not one of 50, 90, 99")
    final = report.get("final") or {}
    task = report.get("task") or "image-classification"
    lm_only = [g for g in LM_GATES if thresholds.get(g) is not None]
    if lm_only and task != "causal-lm":
        raise BadInputError(f"gates: {lm_only[0]} is for causal-lm reports; this report is {task}")
    results = []
    for gate in GATES:
        t = thresholds.get(gate)
        if t is None:
            continue
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t):
            raise BadInputError(f"gates.{gate}: {t!r} is not a number")
        t = float(t)
        if gate == "max_size_mb":
            results.append(_size(final, t))
        elif gate == "max_latency_ms":
            results.append(_latency(report, t, percentile))
        elif gate == "min_accuracy":
            results.append(_at_least(gate, final, "accuracy", t, _accuracy_note(final)))
        elif gate == "max_accuracy_drop":
            results.append(_accuracy_drop(report, t))
        elif gate == "max_regression":
            results.append(_regression(report, baseline, t, percentile))
        elif gate == "min_accuracy_arm":
            results.append(_at_least(gate, final, "accuracy_arm", t, " on the aarch64 runtime",
                                     "the report has no ARM accuracy (run compress with --verify-arm)"))
        elif gate == "min_arm_agreement":
            results.append(_at_least(gate, final, "arm_agreement", t, " top-1 agreement, aarch64 vs host",
                                     "the report has no ARM agreement (run compress with --verify-arm)"))
        elif gate in LM_GATES:
            results.append(_lm_gate(report, gate, t))
        else:
            results.append(_at_most(gate, final, t))
    return results


def _lm_gate(report: dict, gate: str, t: float) -> GateResult:
    """The causal-LM gates: decode speed, test perplexity, perplexity added by quantization (against the
    FP32 student) and speculative decoding's speedup over the teacher alone."""
    final = report.get("final") or {}
    holder, figure, what = {
        "min_decode_tokens_per_s": (final, "decode_tokens_per_s", "decode"),
        "max_perplexity": (final, "perplexity", "test perplexity"),
        "max_perplexity_increase": (final, "perplexity_increase_vs_fp32", "test perplexity added to FP32's"),
        "min_speculative_speedup": (report.get("speculative") or {}, "speedup", "speculative decoding"),
    }[gate]
    value = holder.get(figure)
    if not isinstance(value, (int, float)):
        return _not_measured(gate, t, holder, figure, "not in the report (a causal-lm run reports it)")
    op = GATES[gate][0]
    ok = value >= t if op == "≥" else value <= t
    unit = GATES[gate][1]
    shown = f"{_num(value, t)}{'' if unit in ('%', 'x', '') else ' '}{unit}"
    return GateResult(gate, t, round(float(value), 4), ok,
                      f"{what} {shown} {_cmp(ok, gate)} {t:g}{'' if unit in ('%', 'x', '') else ' '}{unit}")


def apply_gates(report: dict, gates_cfg: Any, baseline: dict | None = None) -> tuple[list[GateResult], bool]:
    """Evaluate the config's gates (a dict, or a GatesConfig), store the verdicts in report['gates'],
    and say whether all held (an inconclusive regression does not fail)."""
    if hasattr(gates_cfg, "model_dump"):
        gates_cfg = gates_cfg.model_dump()
    results = evaluate(report, {k: v for k, v in gates_cfg.items() if v is not None}, baseline)
    report["gates"] = [r.to_dict() for r in results]
    return results, all_passed(results)


def all_passed(results: list[GateResult]) -> bool:
    """True when no gate failed (inconclusive ones do not fail)."""
    return all(r.passed is not False for r in results)


def _not_measured(gate: str, t: float, holder: dict | None, figure: str, default: str | None = None) -> GateResult:
    reason = not_measured_reason(holder, figure)
    if default and (reason == "not in the report" or reason.startswith("no reason recorded")):
        reason = default
    return GateResult(gate, t, None, False, f"not measured: {reason}")


def _num(value: float, t: float, decimals: int = 3) -> str:
    """`value` with `decimals` digits, or as many more as it takes for the printed number to stand on the
    same side of the threshold `t` as the value (0.04339 against 0.0434, not 0.043 > 0.04339)."""
    for d in range(decimals, 12):
        text = f"{value:.{d}f}"
        shown = float(text)
        if (shown > t) == (value > t) and (shown < t) == (value < t):
            return text
    return repr(float(value))


def _cmp(ok: bool, gate: str) -> str:
    op = GATES[gate][0]
    return op if ok else {"≤": ">", "≥": "<"}[op]


def _at_most(gate: str, final: dict, t: float) -> GateResult:
    """max_memory_mb (peak resident memory of the inference process) or max_energy_mj (per inference)."""
    key, unit, what = {"max_memory_mb": ("peak_memory_mb", "MB", "peak resident memory"),
                       "max_energy_mj": ("energy_mj", "mJ", "energy per inference")}[gate]
    value = final.get(key)
    if not isinstance(value, (int, float)):
        return _not_measured(gate, t, final, key)
    ok = value <= t
    where = final.get("measured_on") or "host"
    return GateResult(gate, t, round(float(value), 4), ok,
                      f"{what} {_num(value, t)} {unit} {_cmp(ok, gate)} {t:g} {unit}, measured on {where}")


def _size(final: dict, t: float) -> GateResult:
    size = final.get("size_bytes")
    if size is None:
        return _not_measured("max_size_mb", t, final, "size_bytes")
    mb = size / MB
    ok = mb <= t
    return GateResult("max_size_mb", t, round(mb, 4), ok,
                      f"{_num(mb, t)} MB ({size:,} bytes) {_cmp(ok, 'max_size_mb')} {t:g} MB")


def _latency(report: dict, t: float, percentile: int) -> GateResult:
    final = report.get("final") or {}
    key = f"p{percentile}"
    lat = final.get("latency_ms")
    value = lat.get(key) if isinstance(lat, dict) else None
    if value is None:
        return _not_measured("max_latency_ms", t, final, "latency_ms")
    target = report.get("target") or {}
    where = final.get("measured_on")
    if target.get("measures_here") is False and where in ("host", None):
        return GateResult("max_latency_ms", t, value, False,
                          f"not measured on the board: {key} {value:.3f} ms was measured on this host, "
                          f"not on {target.get('name', 'the target')}; benchmark on the board (--host) "
                          "to gate its latency")
    ok = value <= t
    return GateResult("max_latency_ms", t, value, ok,
                      f"{key} {_num(value, t)} ms {_cmp(ok, 'max_latency_ms')} {t:g} ms, measured on {where or 'host'}")


def _accuracy_note(final: dict) -> str:
    if final.get("accuracy_source") == "fidelity":
        return " (fidelity: agreement with the FP32 model, no labelled eval set)"
    return " on the held-out eval set"


def _at_least(gate: str, holder: dict, figure: str, t: float, note: str = "",
              default: str | None = None) -> GateResult:
    value = holder.get(figure)
    if value is None:
        return _not_measured(gate, t, holder, figure, default)
    ok = value >= t
    return GateResult(gate, t, value, ok, f"{_num(value, t, 2)}%{note} {_cmp(ok, gate)} {t:g}%")


def _reference_accuracy(report: dict) -> tuple[float | None, str, dict | None]:
    """The accuracy the drop is measured from: the teacher's, or with an ONNX entry the FP32 model's."""
    teacher = report.get("teacher")
    if isinstance(teacher, dict):
        return teacher.get("accuracy"), "teacher", teacher
    for stage in report.get("stages") or []:
        for cand in stage.get("candidates") or []:
            if cand.get("precision") == "fp32":
                return cand.get("accuracy"), "FP32 model", cand
    return None, "teacher", None


def _accuracy_drop(report: dict, t: float) -> GateResult:
    final = report.get("final") or {}
    ref, ref_name, holder = _reference_accuracy(report)
    if ref is None:
        return _not_measured("max_accuracy_drop", t, holder, "accuracy",
                             "the report has no teacher or FP32 accuracy to compare with")
    acc = final.get("accuracy")
    if acc is None:
        return _not_measured("max_accuracy_drop", t, final, "accuracy")
    drop = ref - acc
    ok = drop <= t
    return GateResult("max_accuracy_drop", t, round(drop, 4), ok,
                      f"{_num(drop, t, 2)} points below the {ref_name} ({ref:.2f}% → {acc:.2f}%) "
                      f"{_cmp(ok, 'max_accuracy_drop')} {t:g} points")


def _interval(value: float, ci: Any) -> tuple[float, float] | None:
    """Log-space offsets below and above `value` of its confidence interval, if usable."""
    if not (isinstance(ci, (list, tuple)) and len(ci) == 2):
        return None
    lo, hi = ci
    if not all(isinstance(x, (int, float)) for x in ci) or lo <= 0 or hi < lo or value <= 0:
        return None
    return max(0.0, math.log(value / lo)), max(0.0, math.log(hi / value))


def _regression(report: dict, baseline: dict | None, t: float, percentile: int) -> GateResult:
    gate, key = "max_regression", f"p{percentile}"
    if baseline is None:
        return GateResult(gate, t, None, False, "not measured: no baseline report given (--baseline REPORT)")
    kinds = [(r.get("task", "image-classification"), (r.get("target") or {}).get("name"),
              (r.get("target") or {}).get("backend")) for r in (report, baseline)]
    if kinds[0] != kinds[1]:
        (task, name, backend), (btask, bname, bbackend) = kinds
        return GateResult(gate, t, None, False, f"not measured: the baseline is a {btask} run for {bname} ({bbackend}), "
                                                f"this report a {task} run for {name} ({backend}); a regression compares "
                                                "runs of the same task and target")
    final, base = report.get("final") or {}, baseline.get("final") or {}
    cur = (final.get("latency_ms") or {}).get(key)
    ref = (base.get("latency_ms") or {}).get(key)
    if cur is None:
        return _not_measured(gate, t, final, "latency_ms")
    if ref is None:
        reason = not_measured_reason(base, "latency_ms")
        return GateResult(gate, t, None, False, f"not measured: the baseline's {key} latency: {reason}")
    if ref <= 0:
        return GateResult(gate, t, None, False, f"not measured: the baseline's {key} latency is {ref}")
    ratio = cur / ref
    change = (ratio - 1) * 100
    limit = 1 + t / 100
    where = ""
    if final.get("measured_on") != base.get("measured_on"):
        where = (f"; note: the baseline was measured on {base.get('measured_on') or 'host'}, this report on "
                 f"{final.get('measured_on') or 'host'}")
    cur_ci = _interval(cur, (final.get("latency_ci_ms") or {}).get(key))
    ref_ci = _interval(ref, (base.get("latency_ci_ms") or {}).get(key))
    head = f"{key} {ref:.3f} → {cur:.3f} ms ({change:+.1f}%)"
    if cur_ci is None or ref_ci is None:
        ok = ratio <= limit
        missing = " and ".join(n for n, ci in (("this report", cur_ci), ("the baseline", ref_ci)) if ci is None)
        return GateResult(gate, t, round(change, 3), ok,
                          f"{head} {_cmp(ok, gate)} {t:g}%: a point estimate without an interval "
                          f"({missing} has no final.latency_ci_ms.{key}){where}")
    # Independent intervals of the two runs combine in quadrature in log space.
    below = math.hypot(cur_ci[0], ref_ci[1])
    above = math.hypot(cur_ci[1], ref_ci[0])
    lo, hi = (math.exp(math.log(ratio) - below) - 1) * 100, (math.exp(math.log(ratio) + above) - 1) * 100
    interval = f"interval {lo:+.1f}% to {hi:+.1f}%"
    if lo > t:
        return GateResult(gate, t, round(change, 3), False,
                          f"{head}, {interval}: slower beyond the {t:g}% threshold{where}")
    if hi <= t:
        return GateResult(gate, t, round(change, 3), True, f"{head}, {interval}: within {t:g}%{where}")
    return GateResult(gate, t, round(change, 3), None,
                      f"inconclusive: {head}, {interval} straddles the {t:g}% threshold; the measurement "
                      f"noise is too large to tell (benchmark with more iterations){where}")


def write_junit(results: list[GateResult], path: str | Path, percentile: int | None = None) -> None:
    """JUnit XML: one testcase per gate, a <failure> for each failed one, <skipped> for inconclusive ones."""
    failures = sum(r.passed is False for r in results)
    skipped = sum(r.passed is None for r in results)
    suites = ET.Element("testsuites", name="edgekd", tests=str(len(results)), failures=str(failures))
    suite = ET.SubElement(suites, "testsuite", name="edgekd.gate", tests=str(len(results)),
                          failures=str(failures), errors="0", skipped=str(skipped))
    for r in results:
        case = ET.SubElement(suite, "testcase", classname="edgekd.gate", name=r.gate, time="0")
        threshold = describe_threshold(r.gate, r.threshold, percentile)
        if r.passed is False:
            failure = ET.SubElement(case, "failure", message=f"{r.gate} {threshold}: {r.detail}", type="GateFailed")
            failure.text = r.detail
        elif r.passed is None:
            ET.SubElement(case, "skipped", message=r.detail)
        ET.SubElement(case, "system-out").text = f"{r.gate} {threshold}: {r.detail}"
    ET.indent(suites)
    write_text(path, '<?xml version="1.0" encoding="UTF-8"?>\n' + ET.tostring(suites, encoding="unicode") + "\n")


def print_gate_table(results: list[GateResult], percentile: int | None = None, console: Any = None) -> None:
    """Print the gates as a table (gate, threshold, measured, verdict), then each verdict's detail."""
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    console = console or Console()
    table = Table(title="edgekd gates")
    for col in ("gate", "threshold", "measured", "verdict"):
        table.add_column(col, overflow="fold")
    styles = {"pass": "bold green", "fail": "bold red", "inconclusive": "bold yellow"}
    for r in results:
        unit = GATES[r.gate][1]
        measured = "not measured" if r.measured is None else f"{r.measured:g}{'' if unit == '%' else ' '}{unit}"
        table.add_row(escape(r.gate), escape(describe_threshold(r.gate, r.threshold, percentile)),
                      escape(measured), f"[{styles[r.verdict]}]{r.verdict.upper()}[/]")
    console.print(table)
    for r in results:
        console.print(f"[{styles[r.verdict]}]{escape(r.gate)}[/]: {escape(r.detail)}", highlight=False,
                      soft_wrap=True)
