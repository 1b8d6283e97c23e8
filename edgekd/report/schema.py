"""report.json: read it, check it against the shipped JSON Schema and the not-measured rule."""
from __future__ import annotations

import json
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any

from ..errors import BadInputError

SCHEMA_VERSION = 1

# Objects whose null figures must carry a not_measured reason beside them.
_FIGURES = ("accuracy", "params", "macs", "size_bytes", "latency_ms", "accuracy_arm", "arm_agreement",
            "agreement_with_fp32", "speedup_vs_teacher", "compression_vs_teacher",
            # task causal-lm
            "perplexity", "next_token_agreement", "decode_tokens_per_s", "prefill_tokens_per_s", "ttft_ms",
            "tpot_ms", "acceptance_rate", "tokens_per_s", "teacher_tokens_per_s", "speedup")


# Figures computed from others: when they are missing, the missing source's reason explains them.
_DERIVED_FROM = {"speedup_vs_teacher": "latency_ms", "compression_vs_teacher": "size_bytes",
                 "latency_ci_ms": "latency_ms", "latency_samples_ms": "latency_ms"}


@lru_cache(maxsize=1)
def schema() -> dict:
    """The JSON Schema (draft 2020-12) of report.json, as shipped in the package."""
    text = resources.files("edgekd.report").joinpath("schema.json").read_text(encoding="utf-8")
    return json.loads(text)


def read_report_json(path: str | Path) -> dict:
    """Parse a report file and check its schema_version, without validating the rest."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise BadInputError(f"report {path}: no such file") from None
    except IsADirectoryError:
        raise BadInputError(f"report {path}: is a directory; expected a report.json file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise BadInputError(f"report {path}: cannot be read: {e}") from None
    def no_constant(name: str) -> Any:
        raise BadInputError(f"report {path}: holds {name}, which is not a number (a figure that was not measured "
                            "is null, with a not_measured reason)")

    try:
        report = json.loads(text, parse_constant=no_constant)
    except json.JSONDecodeError as e:
        raise BadInputError(f"report {path}: not valid JSON (line {e.lineno}, column {e.colno}: {e.msg})") from None
    if not isinstance(report, dict):
        raise BadInputError(f"report {path}: expected a JSON object, found {type(report).__name__}")
    version = report.get("schema_version")
    if isinstance(version, int) and not isinstance(version, bool) and version > SCHEMA_VERSION:
        raise BadInputError(f"report {path} has schema_version {version}; this edgekd reads up to "
                            f"{SCHEMA_VERSION} (upgrade edgekd to read it)")
    return report


def load_report(path: str | Path, *, validate: bool = True) -> dict:
    """Read a report.json; a missing or unreadable file, a newer schema_version or (with `validate`)
    a report that breaks the schema raises BadInputError naming the file and the problems."""
    report = read_report_json(path)
    if validate:
        problems = validate_report(report)
        if problems:
            more = f" (and {len(problems) - 1} more: edgekd report validate lists them)" if len(problems) > 1 else ""
            raise BadInputError(f"report {path} is not a valid edgekd report: {problems[0]}{more}")
    return report


def validate_report(report: Any) -> list[str]:
    """Every problem found in `report` (schema violations, then null figures without a reason);
    empty when it is valid."""
    import jsonschema

    validator = jsonschema.Draft202012Validator(schema())
    problems = []
    for err in sorted(validator.iter_errors(report), key=lambda e: list(map(str, e.absolute_path))):
        where = _json_path(err.absolute_path)
        problems.append(f"{where}: {err.message}")
    if isinstance(report, dict):
        problems.extend(_unexplained_nulls(report))
        if report.get("task") == "causal-lm":
            problems.extend(_lm_ratios(report))
    return problems


def _ratio_problem(where: str, ratio: Any, a: Any, b: Any, of: str) -> str | None:
    """Where `ratio` is not a / b (to the report's 3 decimals, or 1%), the problem; else None."""
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (ratio, a, b)) or not b:
        return None
    if abs(ratio - a / b) > max(0.0011, 0.01 * abs(a / b)):
        return f"{where}: {ratio} is not {of} ({a} / {b} = {a / b:.3f})"
    return None


def _lm_ratios(report: dict) -> list[str]:
    """A causal-LM report's ratios agree with the figures they come from; identical prompts <= prompts."""
    final, teacher = report.get("final") or {}, report.get("teacher") or {}
    spec = report.get("speculative") if isinstance(report.get("speculative"), dict) else {}
    found = [_ratio_problem("report.final.speedup_vs_teacher", final.get("speedup_vs_teacher"),
                            final.get("decode_tokens_per_s"), teacher.get("decode_tokens_per_s"),
                            "the final's decode tokens/s over the teacher's"),
             _ratio_problem("report.speculative.speedup", spec.get("speedup"), spec.get("tokens_per_s"),
                            spec.get("teacher_tokens_per_s"), "tokens/s with the draft over the teacher's alone")]
    prompts, identical = spec.get("prompts"), spec.get("identical")
    if isinstance(prompts, int) and isinstance(identical, int) and identical > prompts:
        found.append(f"report.speculative.identical: {identical} of {prompts} prompts")
    return [f for f in found if f]


def _json_path(parts: Any) -> str:
    out = "report"
    for p in parts:
        out += f"[{p}]" if isinstance(p, int) else f".{p}"
    return out


def _holders(report: dict) -> list[tuple[str, dict]]:
    """The objects that hold measured figures, with their JSON paths."""
    out: list[tuple[str, dict]] = []
    for key in ("teacher", "final"):
        if isinstance(report.get(key), dict):
            out.append((f"report.{key}", report[key]))
    for i, stage in enumerate(report.get("stages") or []):
        if not isinstance(stage, dict):
            continue
        out.append((f"report.stages[{i}]", stage))
        for j, cand in enumerate(stage.get("candidates") or []):
            if isinstance(cand, dict):
                out.append((f"report.stages[{i}].candidates[{j}]", cand))
    for i, entry in enumerate(report.get("remote") or []):
        if isinstance(entry, dict):
            out.append((f"report.remote[{i}]", entry))
    if isinstance(report.get("speculative"), dict):
        out.append(("report.speculative", report["speculative"]))
    return out


def _unexplained_nulls(report: dict) -> list[str]:
    problems = []
    for where, holder in _holders(report):
        if holder.get("not_measured") or holder.get("error"):
            continue
        nulls = [k for k in _FIGURES if k in holder and holder[k] is None]
        if nulls:
            problems.append(f"{where}: {', '.join(nulls)} null without a not_measured reason beside it")
    return problems


def not_measured_reason(holder: dict | None, figure: str) -> str:
    """Why `figure` of `holder` (final, teacher, a stage, a candidate) was not measured, as the report says."""
    if not isinstance(holder, dict):
        return "not in the report"
    reason = holder.get("not_measured")
    if isinstance(reason, dict):
        base = figure.split(".")[0]
        for key in (figure, base, _DERIVED_FROM.get(base, base)):
            if reason.get(key):
                return str(reason[key])
        return "no reason recorded for " + figure
    if isinstance(reason, str) and reason:
        return reason
    if holder.get("error"):
        return str(holder["error"])
    if figure.split(".")[0] not in holder:
        return "not in the report"
    return "no reason recorded"
