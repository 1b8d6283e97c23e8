"""Two reports side by side, with the change from the first to the second."""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

from .tables import (
    ABSENT,
    NOT_MEASURED,
    Cell,
    Table,
    figure,
    fmt_bytes,
    fmt_count,
    fmt_mb,
    fmt_ms,
    fmt_num,
    fmt_pct,
    fmt_ratio,
    fmt_share,
    fmt_tps,
)

# (row label, section, key, sub-key, format, how the delta is shown: "points", "share" (points of a share kept
# as 0..1), "percent" or "ratio")
_ROWS: list[tuple[str, str, str, str | None, Callable[[Any], str], str]] = [
    ("accuracy", "final", "accuracy", None, fmt_pct, "points"),
    ("accuracy on aarch64", "final", "accuracy_arm", None, fmt_pct, "points"),
    ("size", "final", "size_bytes", None, fmt_bytes, "percent"),
    ("params", "final", "params", None, fmt_count, "percent"),
    ("MACs", "final", "macs", None, fmt_count, "percent"),
    ("latency p50", "final", "latency_ms", "p50", fmt_ms, "percent"),
    ("latency p90", "final", "latency_ms", "p90", fmt_ms, "percent"),
    ("latency p99", "final", "latency_ms", "p99", fmt_ms, "percent"),
    ("latency mean", "final", "latency_ms", "mean", fmt_ms, "percent"),
    ("speedup vs teacher", "final", "speedup_vs_teacher", None, fmt_ratio, "ratio"),
    ("compression vs teacher", "final", "compression_vs_teacher", None, fmt_ratio, "ratio"),
    ("teacher accuracy", "teacher", "accuracy", None, fmt_pct, "points"),
    ("teacher latency p50", "teacher", "latency_ms", "p50", fmt_ms, "percent"),
    # causal-lm reports (absent from image reports, so those rows are left out there)
    ("test perplexity", "final", "perplexity", None, fmt_num, "percent"),
    ("agreement with FP32", "final", "next_token_agreement", None, fmt_pct, "points"),
    ("decode", "final", "decode_tokens_per_s", None, fmt_tps, "percent"),
    ("prefill", "final", "prefill_tokens_per_s", None, fmt_tps, "percent"),
    ("TTFT", "final", "ttft_ms", None, fmt_ms, "percent"),
    ("peak memory", "final", "peak_memory_mb", None, fmt_mb, "percent"),
    ("teacher perplexity", "teacher", "perplexity", None, fmt_num, "percent"),
    ("teacher decode", "teacher", "decode_tokens_per_s", None, fmt_tps, "percent"),
    ("speculative speedup", "speculative", "speedup", None, fmt_ratio, "ratio"),
    ("speculative tokens/s", "speculative", "tokens_per_s", None, fmt_tps, "percent"),
    ("speculative acceptance", "speculative", "acceptance_rate", None, fmt_share, "share"),
    ("speculative sampling speedup", "speculative", "sampled", "speedup", fmt_ratio, "ratio"),
    ("speculative sampling acceptance", "speculative", "sampled", "acceptance_rate", fmt_share, "share"),
]


def _value(holder: Any, key: str, sub: str | None) -> float | None:
    if not isinstance(holder, dict):
        return None
    v = holder.get(key)
    if sub is not None:
        v = v.get(sub) if isinstance(v, dict) else None
    return v if isinstance(v, (int, float)) and not isinstance(v, bool) else None


def _delta(a: float | None, b: float | None, kind: str) -> Cell:
    if a is None or b is None:
        return Cell(ABSENT)
    if kind in ("points", "share"):
        return Cell(f"{(b - a) * (100 if kind == 'share' else 1):+.2f} pt")
    if kind == "ratio":
        return Cell(f"{b - a:+.2f}×")
    if a == 0:
        return Cell(ABSENT)
    return Cell(f"{(b / a - 1) * 100:+.1f}%")


def _text(report: dict, section: str, key: str) -> Cell:
    holder = report.get(section)
    value = holder.get(key) if isinstance(holder, dict) else None
    return Cell(str(value) if value not in (None, "") else ABSENT)


def comparison_table(a: dict, b: dict, names: tuple[str, str] = ("A", "B")) -> Table:
    """Rows of figures from reports `a` and `b` and the change from a to b; unmeasured figures say so."""
    table = Table(["", names[0], names[1], "change"])
    for label, section, key in (("target", "target", "name"), ("precision", "final", "precision"),
                                ("measured on", "final", "measured_on")):
        table.rows.append([Cell(label), _text(a, section, key), _text(b, section, key), Cell("")])
    for label, section, key, sub, fmt, kind in _ROWS:
        ha, hb = a.get(section), b.get(section)
        ca, cb = figure(ha, key, fmt, sub), figure(hb, key, fmt, sub)
        if ca.text == ABSENT and cb.text == ABSENT:
            continue
        table.rows.append([Cell(label), ca, cb, _delta(_value(ha, key, sub), _value(hb, key, sub), kind)])
    stages_a = {s.get("name"): s for s in a.get("stages") or []}
    for stage in b.get("stages") or []:
        name = stage.get("name")
        if name not in stages_a:
            continue
        mine = stages_a[name]
        for label, ha, hb, key, fmt, kind in (
                (f"{name} accuracy", mine, stage, "accuracy", fmt_pct, "points"),
                (f"{name} perplexity", mine, stage, "perplexity", fmt_num, "percent"),
                (f"{name} baseline perplexity", mine.get("baseline"), stage.get("baseline"), "perplexity", fmt_num,
                 "percent")):
            if label in {row[0].text for row in table.rows}:  # the teacher stage's accuracy is the teacher's own
                continue
            if isinstance(ha, dict) and key in ha or isinstance(hb, dict) and key in hb:
                table.rows.append([Cell(label), figure(ha, key, fmt), figure(hb, key, fmt),
                                   _delta(_value(ha, key, None), _value(hb, key, None), kind)])
    ga, gb = _gate_summary(a), _gate_summary(b)
    if ga or gb:
        table.rows.append([Cell("gates"), Cell(ga or ABSENT), Cell(gb or ABSENT), Cell("")])
    return table


def _gate_summary(report: dict) -> str:
    gates = report.get("gates") or []
    if not gates:
        return ""
    failed = [g.get("gate") for g in gates if g.get("passed") is False]
    return f"{len(gates) - len(failed)}/{len(gates)} passed" + (f" (failed: {', '.join(failed)})" if failed else "")


def print_comparison(a: dict, b: dict, names: tuple[str, str] = ("A", "B"), console: Any = None) -> None:
    """Print the side-by-side table, with the reason under any figure that was not measured."""
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table as RichTable

    console = console or Console()
    table = comparison_table(a, b, names)
    out = RichTable(title="edgekd report compare")
    for i, h in enumerate(table.headers):
        out.add_column(escape(h), justify="left" if i == 0 else "right", overflow="fold")
    notes: list[str] = []
    for row in table.rows:
        cells = []
        for c in row:
            text = c.text
            if c.note:
                note = f"not measured: {c.note}" if c.text == NOT_MEASURED else c.note
                if note not in notes:
                    notes.append(note)
                text += f" [{notes.index(note) + 1}]"
            cells.append(escape(text))
        out.add_row(*cells)
    console.print(out)
    for i, note in enumerate(notes, 1):
        console.print(escape(f"[{i}] {note}"), highlight=False)
