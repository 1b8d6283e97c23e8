"""What report.md and report.html show, built once from report.json: tables of cells whose figures
are either measured numbers or 'not measured' with the report's reason, never a made-up number."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .gate import GATES, describe_threshold
from .schema import not_measured_reason

NOT_MEASURED = "not measured"
ABSENT = "—"


@dataclass(frozen=True)
class Cell:
    """A table cell: its text, and a note (why it was not measured, or where it was measured)."""

    text: str
    note: str | None = None


@dataclass
class Table:
    """Headers and rows of cells, rendered alike in Markdown and HTML."""

    headers: list[str]
    rows: list[list[Cell]] = field(default_factory=list)


# ---- number formats -------------------------------------------------------------------------

def fmt_count(n: float) -> str:
    """A parameter or MAC count: 11.69 M, 2.38 k, 512."""
    for div, suffix in ((1e9, " G"), (1e6, " M"), (1e3, " k")):
        if abs(n) >= div:
            return f"{n / div:.2f}{suffix}"
    return f"{n:g}"


def fmt_bytes(n: float) -> str:
    """A size in decimal units: 1.23 MB, 456.0 kB."""
    for div, suffix in ((1e9, " GB"), (1e6, " MB"), (1e3, " kB")):
        if abs(n) >= div:
            return f"{n / div:.2f}{suffix}"
    return f"{n:g} B"


def fmt_pct(x: float) -> str:
    """A percentage: 98.06%."""
    return f"{x:.2f}%"


def fmt_ms(x: float) -> str:
    """A latency: 3.104 ms (three significant decimals under 10 ms)."""
    return f"{x:.3f} ms" if x < 10 else f"{x:.2f} ms" if x < 1000 else f"{x:,.0f} ms"


def fmt_ratio(x: float) -> str:
    """A speedup or compression factor: 4.21×."""
    return f"{x:.2f}×"


def fmt_num(x: float) -> str:
    """A plain figure such as a perplexity: 30.54."""
    return f"{x:.2f}"


def fmt_share(x: float) -> str:
    """A share kept as 0..1, in percent: 0.431 -> 43.10%."""
    return fmt_pct(100 * x)


def fmt_tps(x: float) -> str:
    """A rate in tokens per second: 341.8 tok/s."""
    return f"{x:.1f} tok/s"


def fmt_mb(x: float) -> str:
    """Memory already in megabytes: 211.6 MB."""
    return f"{x:.1f} MB"


def fmt_seconds(x: float) -> str:
    """A duration: 12.3 s, 4 min 05 s."""
    return f"{x:.1f} s" if x < 120 else f"{int(x // 60)} min {int(x % 60):02d} s"


# ---- cells ----------------------------------------------------------------------------------

def figure(holder: dict | None, key: str, fmt: Callable[[Any], str], sub: str | None = None) -> Cell:
    """The cell for holder[key] (or holder[key][sub]): absent is '—', null is 'not measured' + reason."""
    if not isinstance(holder, dict) or key not in holder:
        return Cell(ABSENT)
    value, inner = holder[key], None
    if sub is not None and isinstance(value, dict):
        if sub not in value:
            return Cell(ABSENT)
        value, inner = value[sub], value
    if value is None:  # the reason beside the figure (holder[key]'s not_measured[sub]), else holder's for key
        if inner is not None and isinstance(inner.get("not_measured"), dict) and inner["not_measured"].get(sub):
            return Cell(NOT_MEASURED, not_measured_reason(inner, sub))
        return Cell(NOT_MEASURED, not_measured_reason(holder, key))
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return Cell(str(value))
    return Cell(fmt(value))


def where_note(report: dict, holder: dict | None) -> str | None:
    """A note when a latency was taken on this host for a board profile, so it is never read as the board's."""
    target = report.get("target") or {}
    if not isinstance(holder, dict) or target.get("measures_here") is not False:
        return None
    if holder.get("measured_on") == "host":
        arch = (report.get("environment") or {}).get("platform") or "this host"
        return f"measured on this host ({arch}), not on {target.get('name', 'the board')}"
    return None


def latency_cell(report: dict, holder: dict | None, pct: str) -> Cell:
    """A latency percentile cell, labelled when it was measured on this host for a board."""
    cell = figure(holder, "latency_ms", fmt_ms, pct)
    if cell.text not in (NOT_MEASURED, ABSENT):
        note = where_note(report, holder)
        if note:
            return Cell(cell.text, note)
    return cell


def latency(holder: dict | None, pct: str = "p50") -> float | None:
    """A measured latency percentile, or None."""
    lat = holder.get("latency_ms") if isinstance(holder, dict) else None
    value = lat.get(pct) if isinstance(lat, dict) else None
    return value if isinstance(value, (int, float)) else None


def speedup_cell(teacher: dict | None, holder: dict) -> Cell:
    """Teacher p50 over this row's p50, when both were measured on the same machine with the same runtime
    and threads (`latency_runtime`)."""
    t, s = latency(teacher, "p50"), latency(holder, "p50")
    if t is None or s is None or s <= 0:
        return Cell(ABSENT)
    if (teacher or {}).get("measured_on") != holder.get("measured_on"):
        return Cell(ABSENT, "the teacher and this row were measured on different machines")
    ours, theirs = holder.get("latency_runtime"), (teacher or {}).get("latency_runtime")
    if ours and theirs and ours != theirs:  # a ratio of two runtimes (or thread counts) is not a speedup
        return Cell(ABSENT, f"the teacher ({theirs}) and this row ({ours}) were timed with different runtimes")
    return Cell(fmt_ratio(t / s))


# ---- tables ---------------------------------------------------------------------------------

STAGE_HEADERS = ["Stage", "Params", "MACs", "Size", "Accuracy", "p50", "p90", "Speedup", "Time"]


def _row(report: dict, label: str, holder: dict, speedup: Cell) -> list[Cell]:
    duration = holder.get("duration_s")
    return [
        Cell(label), figure(holder, "params", fmt_count), figure(holder, "macs", fmt_count),
        figure(holder, "size_bytes", fmt_bytes), figure(holder, "accuracy", fmt_pct),
        latency_cell(report, holder, "p50"), latency_cell(report, holder, "p90"), speedup,
        Cell(fmt_seconds(duration) if isinstance(duration, (int, float)) else ABSENT),
    ]


def stage_table(report: dict) -> Table:
    """Teacher, each stage in order, and the final artifact: params, MACs, size, accuracy, p50/p90, speedup."""
    table = Table(list(STAGE_HEADERS))
    teacher = report.get("teacher") if isinstance(report.get("teacher"), dict) else None
    stages = [s for s in report.get("stages") or [] if s.get("name") != "search"]  # untrained candidates: own table
    if teacher:
        # A 'teacher' stage (training the teacher) shares the teacher's row: its figures are the teacher's.
        trained = next((s for s in stages if s.get("name") == "teacher"), None)
        stages = [s for s in stages if s is not trained]
        holder = {**teacher, "duration_s": (trained or {}).get("duration_s")}
        base = Cell("1.00×") if latency(teacher) is not None else Cell(ABSENT)
        table.rows.append(_row(report, f"teacher ({teacher.get('model', '?')})", holder, base))
    for stage in stages:
        table.rows.append(_row(report, str(stage.get("name")), stage, speedup_cell(teacher, stage)))
    final = report.get("final") or {}
    label = f"final ({final.get('precision', '?')})"
    table.rows.append(_row(report, label, final, figure(final, "speedup_vs_teacher", fmt_ratio)))
    return table


def quantize_stage(report: dict) -> dict | None:
    """The quantize stage's entry, if the run quantized."""
    for stage in report.get("stages") or []:
        if stage.get("name") == "quantize":
            return stage
    return None


def stage(report: dict, name: str) -> dict | None:
    """The first stage entry called `name`, if any."""
    for entry in report.get("stages") or []:
        if entry.get("name") == name:
            return entry
    return None


def candidate_table(report: dict, quant: dict) -> Table:
    """The precisions the quantize stage considered, each with what was measured and where."""
    table = Table(["Precision", "Artifact", "Accuracy", "Size", "p50", "p90", "Peak memory", "Energy / inference",
                   "Measured on", "Chosen"])
    for cand in quant.get("candidates") or []:
        where = cand.get("measured_on")
        where_cell = Cell(str(where)) if where else Cell(ABSENT if latency(cand) is None else "host")
        table.rows.append([
            Cell(str(cand.get("precision"))), Cell(f"`{cand['artifact']}`" if cand.get("artifact") else ABSENT),
            figure(cand, "accuracy", fmt_pct), figure(cand, "size_bytes", fmt_bytes),
            latency_cell(report, cand, "p50"), latency_cell(report, cand, "p90"),
            figure(cand, "peak_memory_mb", lambda v: f"{v:.1f} MB"), figure(cand, "energy_mj", lambda v: f"{v:.3f} mJ"),
            where_cell,
            Cell("✔ chosen" if cand.get("chosen") else ""),
        ])
    return table


def sensitivity_rows(quant: dict, limit: int = 12) -> tuple[str, list[dict]]:
    """The most quantization-sensitive layers first, and which measure ranks them."""
    entries = [e for e in quant.get("sensitivity") or [] if isinstance(e, dict)]
    if any(isinstance(e.get("accuracy_drop"), (int, float)) for e in entries):
        ranked = [e for e in entries if isinstance(e.get("accuracy_drop"), (int, float))]
        return "accuracy_drop", sorted(ranked, key=lambda e: -e["accuracy_drop"])[:limit]
    ranked = [e for e in entries if isinstance(e.get("sqnr_db"), (int, float))]
    return "sqnr_db", sorted(ranked, key=lambda e: e["sqnr_db"])[:limit]


VERDICTS = {True: "pass", False: "fail", None: "inconclusive"}


def gate_table(report: dict, marks: dict | None = None) -> Table:
    """The gate verdicts stored in the report; `marks` maps passed (True/False/None) to the verdict text."""
    table = Table(["Gate", "Threshold", "Measured", "Verdict", "Detail"])
    pct = ((report.get("config") or {}).get("gates") or {}).get("percentile")
    marks = marks or VERDICTS
    for g in report.get("gates") or []:
        measured = g.get("measured")
        table.rows.append([
            Cell(str(g.get("gate"))), Cell(describe_threshold(str(g.get("gate")), g.get("threshold"), pct)),
            Cell(NOT_MEASURED if measured is None else f"{measured:g}{_unit(str(g.get('gate')))}"),
            Cell(marks.get(g.get("passed"), "?")), Cell(str(g.get("detail", ""))),
        ])
    return table


def _unit(gate: str) -> str:
    unit = GATES.get(gate, ("", ""))[1]
    return unit if unit in ("%", "") else f" {unit}"


def headline(report: dict) -> str:
    """One sentence: what was produced, how accurate, how small and how fast, and where it was measured."""
    final = report.get("final") or {}
    teacher = report.get("teacher") or {}
    parts = [f"{final.get('precision', '?')} model `{final.get('artifact', '?')}`"]
    acc = figure(final, "accuracy", fmt_pct)
    acc_text = f"accuracy {acc.text}" if acc.text != NOT_MEASURED else f"accuracy not measured ({acc.note})"
    if final.get("accuracy_source") == "fidelity" and acc.text != NOT_MEASURED:
        acc_text += " (fidelity to the FP32 model)"
    if isinstance(teacher.get("accuracy"), (int, float)):
        acc_text += f" (teacher {fmt_pct(teacher['accuracy'])})"
    parts.append(acc_text)
    size = figure(final, "size_bytes", fmt_bytes)
    comp = final.get("compression_vs_teacher")
    parts.append(f"size {size.text}" + (f" ({fmt_ratio(comp)} smaller)" if isinstance(comp, (int, float)) else ""))
    p90 = latency(final, "p90")
    if p90 is None:
        parts.append(f"latency not measured ({not_measured_reason(final, 'latency_ms')})")
    else:
        sp, p50 = final.get("speedup_vs_teacher"), latency(final, "p50")
        text = (f"p50 {fmt_ms(p50)}, " if p50 is not None else "") + f"p90 {fmt_ms(p90)}" + (
            f" ({fmt_ratio(sp)} faster than the teacher at p50)" if isinstance(sp, (int, float)) else "")
        note = where_note(report, final)
        parts.append(text + (f", {note}" if note else f", measured on {final.get('measured_on') or 'host'}"))
    return "; ".join(parts)
