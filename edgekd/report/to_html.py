"""report.html: one self-contained page (inline CSS and SVG, no scripts, fonts or links to fetch)."""
from __future__ import annotations

import re
from html import escape
from pathlib import Path

from ..runs import write_text
from . import plots
from .schema import not_measured_reason
from .tables import (
    ABSENT,
    NOT_MEASURED,
    Cell,
    Table,
    candidate_table,
    fmt_bytes,
    fmt_ms,
    gate_table,
    headline,
    latency,
    quantize_stage,
    sensitivity_rows,
    stage,
    stage_table,
)
from .tables_lm import lm_headline, lm_sections

CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:24px auto;max-width:1360px;
color:#1f2328;background:#f6f8fa;padding:0 16px}
h1{font-size:22px;margin:0 0 8px}h2{font-size:17px;margin:28px 0 10px;border-bottom:1px solid #d0d7de}
section,header{background:#fff;border:1px solid #d0d7de;border-radius:6px;padding:12px 18px;margin:14px 0}
table{border-collapse:collapse;font-size:13px;margin:6px 0}
th,td{border:1px solid #d0d7de;padding:4px 9px;text-align:right;vertical-align:top}
th{background:#eef1f4}td:first-child,th:first-child{text-align:left}
td.detail{text-align:left;max-width:520px}
.nm{color:#9a6700;font-style:italic}.pass{color:#1a7f37;font-weight:600}.fail{color:#cf222e;font-weight:600}
.unsure{color:#9a6700;font-weight:600}.banner{font-size:15px;font-weight:600;padding:8px 12px;border-radius:6px}
.banner.ok{background:#dafbe1}.banner.bad{background:#ffebe9}
.notes{font-size:12px;color:#57606a;margin:2px 0 8px;padding-left:18px}
.meta{color:#57606a;font-size:13px}
.plots{display:grid;grid-template-columns:repeat(auto-fit,minmax(650px,1fr));gap:14px}
figure{margin:0;background:#fff;border:1px solid #d0d7de;border-radius:6px;padding:6px}
figcaption{font-size:12px;color:#57606a;padding:4px 6px}
svg.plot{max-width:100%;height:auto;font-size:11px}
svg .t{font-size:14px;font-weight:600;fill:#1f2328}svg .k{fill:#444;font-size:11px}
svg .l{fill:#333;font-size:12px}svg .g{stroke:#e4e7eb;stroke-width:1}svg .a{stroke:#666;stroke-width:1}
code{background:#eef1f4;padding:1px 4px;border-radius:4px;font-size:12px}
"""


def _inline(text: str) -> str:
    """Escape text, then turn `code` and **bold** marks into tags."""
    out = escape(text, quote=False)
    out = re.sub(r"`([^`]+)`", r"<code>\1</code>", out)
    return re.sub(r"\*\*([^*]+)\*\*", r"<strong>\1</strong>", out)


def _table(table: Table, detail_cols: tuple[int, ...] = ()) -> str:
    notes: list[str] = []
    rows = ["<tr>" + "".join(f"<th>{escape(h)}</th>" for h in table.headers) + "</tr>"]
    for row in table.rows:
        cells = []
        for i, cell in enumerate(row):
            cells.append(_cell(cell, notes, "detail" if i in detail_cols else ""))
        rows.append("<tr>" + "".join(cells) + "</tr>")
    html = "<table>" + "\n".join(rows) + "</table>"
    if notes:
        html += '<ol class="notes">' + "".join(f"<li>{escape(n)}</li>" for n in notes) + "</ol>"
    return html


def _cell(cell: Cell, notes: list[str], cls: str = "") -> str:
    classes = [cls] if cls else []
    text = _inline(cell.text)
    verdict = {"pass": "pass", "fail": "fail", "inconclusive": "unsure"}.get(cell.text)
    if verdict:
        classes.append(verdict)
    if cell.text == NOT_MEASURED:
        classes.append("nm")
    if cell.note:
        note = f"not measured: {cell.note}" if cell.text == NOT_MEASURED else cell.note
        if note not in notes:
            notes.append(note)
        text += f'<sup title="{escape(note)}">[{notes.index(note) + 1}]</sup>'
    attr = f' class="{" ".join(classes)}"' if classes else ""
    return f"<td{attr}>{text}</td>"


def render_html(report: dict) -> str:
    """report.html's text: one self-contained page with inline SVG plots and no external references."""
    target = report.get("target") or {}
    title = f"edgekd report: {report.get('name') or 'run'} → {target.get('name', '?')}"
    meta = (f"target {target.get('name', '?')} ({target.get('backend', '?')}, {target.get('device') or '?'}, "
            f"{target.get('threads') or '?'} threads) · edgekd {report.get('edgekd_version', '?')}"
            + (f" · {report['created']}" if report.get("created") else ""))
    lm = report.get("task") == "causal-lm"
    body = [f"<header><h1>{escape(title)}</h1><p>{_inline(lm_headline(report) if lm else headline(report))}</p>"
            f'<p class="meta">{escape(meta)}</p></header>']
    body += _gates(report)
    if lm:
        body += [f"<section><h2>{escape(t)}</h2>" + _table(table) + "</section>" for t, table in lm_sections(report)]
    else:
        body.append("<section><h2>Stages</h2>" + _table(stage_table(report)) + "</section>")
        body.append('<section><h2>Plots</h2><div class="plots">' + "".join(_plots(report)) + "</div></section>")
        quant = quantize_stage(report)
        if quant:
            body.append(_precision(report, quant))
    if report.get("notes"):
        body.append("<section><h2>Notes</h2><ul>" + "".join(f"<li>{escape(n)}</li>" for n in report["notes"])
                    + "</ul></section>")
    body.append(_environment(report))
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
            f"<title>{escape(title)}</title><style>{CSS}</style></head>\n<body>\n"
            + "\n".join(body) + "\n</body></html>\n")


def _gates(report: dict) -> list[str]:
    gates = report.get("gates")
    if not gates:
        return []
    failed = [g["gate"] for g in gates if g.get("passed") is False]
    banner = (f'<div class="banner bad">{len(failed)} of {len(gates)} gates failed: {escape(", ".join(failed))}'
              if failed else f'<div class="banner ok">All {len(gates)} gates passed') + "</div>"
    return [f"<section><h2>Gates</h2>{banner}{_table(gate_table(report), detail_cols=(4,))}</section>"]


def _figure(svg: str, caption: str) -> str:
    return f"<figure>{svg}<figcaption>{escape(caption)}</figcaption></figure>"


def _plots(report: dict) -> list[str]:
    return [_pareto(report), _latency(report), _sizes(report), _sensitivity(report)] + _search(report)


def _search(report: dict) -> list[str]:
    """The student search: proxy accuracy against latency on the target, with the budget line."""
    s = stage(report, "search")
    if not s:
        return []
    points = [plots.Point(c["latency_ms"], c["proxy_accuracy"], c["architecture"] + (" (chosen)" if c.get("chosen") else ""),
                          "chosen" if c.get("chosen") else "proxy-trained")
              for c in s.get("candidates") or [] if c.get("latency_ms") is not None and c.get("proxy_accuracy") is not None]
    svg = plots.scatter(points, "Student search: proxy accuracy (validation) vs latency", "latency p50 (ms)",
                        "proxy accuracy (%)", vline=(s["budget_ms"], f"budget {s['budget_ms']:.3f} ms"))
    return [_figure(svg, f"Every candidate was timed on {s.get('runtime')} ({s.get('measured_on')}); those left of "
                         f"the budget line were eligible, the largest {len(points)} by MACs distilled for "
                         f"{s.get('proxy_epochs')} epoch(s). Chosen: {s.get('chosen')}.")]


def _rows_with_figures(report: dict) -> list[tuple[str, dict]]:
    rows: list[tuple[str, dict]] = []
    if isinstance(report.get("teacher"), dict):
        rows.append(("teacher", report["teacher"]))
    for entry in report.get("stages") or []:
        if entry.get("name") == "teacher" and rows:
            continue  # training the teacher: its figures are in the teacher row already
        if entry.get("name") == "search":
            continue  # untrained candidate students: plotted on their own, against the budget
        rows.append((str(entry.get("name")), entry))
        for cand in entry.get("candidates") or []:
            if not cand.get("chosen"):
                rows.append((f"{cand.get('precision')} candidate", cand))
    rows.append((f"final ({(report.get('final') or {}).get('precision', '?')})", report.get("final") or {}))
    return rows


def _timed_with(holder: dict, report: dict) -> str:
    """The runtime that timed `holder`'s latency: its own latency_runtime ("onnxruntime fp32, 2 threads"), else
    the target's (the quantize candidates and the final artifact are timed with it)."""
    runtime = holder.get("latency_runtime")
    if isinstance(runtime, str) and runtime:
        return runtime.split(" ")[0].rstrip(",")
    return str((report.get("target") or {}).get("backend") or "the target's runtime")


def _pareto(report: dict) -> str:
    points, skipped = [], []
    for label, holder in _rows_with_figures(report):
        x, y = latency(holder, "p50"), holder.get("accuracy")
        if x is not None and isinstance(y, (int, float)):
            where = holder.get("measured_on") or "host"
            points.append(plots.Point(x, float(y), label, f"{_timed_with(holder, report)} on {where}"))
        else:
            lat = holder.get("latency_ms")
            for key, unmeasured in (("latency_ms", x is None and "latency_ms" in holder and
                                     (lat is None or (isinstance(lat, dict) and lat.get("p50") is None))),
                                    ("accuracy", "accuracy" in holder and y is None)):
                if unmeasured:
                    skipped.append(f"{label}: {key} not measured ({not_measured_reason(holder, key)})")
    svg = plots.scatter(points, "Accuracy vs p50 latency", "p50 latency (ms)", "accuracy (%)")
    caption = ("Up and to the left is better; the dashed line is the Pareto front. Colour says which runtime "
               "timed each latency and where: compare points of one colour.")
    if skipped:
        caption += " Not plotted: " + "; ".join(skipped) + "."
    return _figure(svg, caption)


def _latency(report: dict) -> str:
    teacher, final = report.get("teacher") or {}, report.get("final") or {}
    names = {"teacher": teacher, f"final ({final.get('precision', '?')})": final}
    samples = {n: h.get("latency_samples_ms") for n, h in names.items() if isinstance(h.get("latency_samples_ms"),
                                                                                       list)}
    wheres = ", ".join(f"{n} on {h.get('measured_on') or 'host'}" for n, h in names.items()
                       if latency(h) is not None)
    missing = [f"{n}: not measured ({not_measured_reason(h, 'latency_ms')})" for n, h in names.items()
               if h and latency(h) is None]
    if samples and all(latency(h) is None or n in samples for n, h in names.items()):
        svg = plots.histogram(samples, "Latency distribution: teacher vs final", "latency per inference (ms)")
    else:
        cats = ["p50", "p90", "p99", "mean"]
        series = {n: [latency(h, c) for c in cats] for n, h in names.items() if h}
        svg = plots.grouped_bars(cats, series, "Latency percentiles: teacher vs final", "latency (ms)", fmt_ms)
    caption = f"Measured: {wheres or 'nothing'}."
    if missing:
        caption += " " + "; ".join(missing) + "."
    return _figure(svg, caption)


def _sizes(report: dict) -> str:
    items, missing = [], []
    for label, holder in _rows_with_figures(report):
        if label.endswith(" candidate"):
            continue
        size = holder.get("size_bytes")
        if isinstance(size, (int, float)):
            items.append((label, size / 1e6))
        elif "size_bytes" in holder:
            missing.append(f"{label}: not measured ({not_measured_reason(holder, 'size_bytes')})")
    final_label = items[-1][0] if items and items[-1][0].startswith("final") else None
    svg = plots.bars(items, "Model size by stage", "size (MB)", lambda v: fmt_bytes(v * 1e6), final_label)
    caption = "File size of each stage's model (MB = 10^6 bytes)."
    if missing:
        caption += " " + "; ".join(missing) + "."
    return _figure(svg, caption)


def _sensitivity(report: dict) -> str:
    quant = quantize_stage(report)
    if not quant:
        return _figure(plots.empty("Per-layer quantization sensitivity", "this run did not quantize"), "")
    measure, rows = sensitivity_rows(quant, limit=20)
    kept = set(quant.get("kept_float") or [])
    data = [(str(e["node"]), float(e[measure]), e["node"] in kept) for e in rows]
    label = "accuracy drop when this layer alone is quantized (points)" if measure == "accuracy_drop" else \
        "SQNR of the layer's output in int8 (dB, lower is worse)"
    svg = plots.hbars(data, "Per-layer quantization sensitivity", label, "kept in float")
    return _figure(svg, f"The {len(data)} most sensitive layers first.")


def _precision(report: dict, quant: dict) -> str:
    choice = quant.get("choice") or {}
    parts = [f"<section><h2>Precision: {escape(str(choice.get('precision') or '?'))}</h2>"]
    if choice.get("why"):
        parts.append(f"<p><strong>Why:</strong> {escape(str(choice['why']))}</p>")
    if choice.get("measured") is False:
        parts.append('<p class="nm">The choice was made without a latency measured on the target.</p>')
    recipe = quant.get("recipe") or {}
    if recipe:
        spec = ", ".join(f"{k} {recipe[k]}" for k in ("activation_type", "weight_type", "per_channel",
                                                      "reduce_range") if k in recipe)
        parts.append(f"<p><strong>Recipe:</strong> <code>{escape(str(recipe.get('name', '?')))}</code> "
                     f"({escape(spec)}) {escape(str(recipe.get('why') or ''))}</p>")
    calib = quant.get("calibration") or {}
    if calib:
        parts.append(f"<p><strong>Calibration:</strong> {escape(str(calib.get('samples', '?')))} samples, "
                     f"method {escape(str(calib.get('method', '?')))}</p>")
    if quant.get("candidates"):
        parts.append(_table(candidate_table(report, quant)))
    kept = quant.get("kept_float") or []
    if kept:
        parts.append("<p><strong>Kept in float:</strong> " + ", ".join(f"<code>{escape(n)}</code>" for n in kept)
                     + "</p>")
    return "".join(parts) + "</section>"


def _environment(report: dict) -> str:
    env = report.get("environment") or {}
    table = Table(["Key", "Value"])
    for key in ("host", "platform", "cpu", "cores", "threads", "python", "torch"):
        if env.get(key) is not None:
            table.rows.append([Cell(key), Cell(str(env[key]))])
    for name, version in (env.get("runtimes") or {}).items():
        table.rows.append([Cell(name), Cell(str(version) if version is not None else ABSENT)])
    return "<section><h2>Environment</h2>" + _table(table, detail_cols=(1,)) + "</section>"


def write_html(report: dict, path: str | Path) -> None:
    """Write report.html atomically."""
    write_text(path, render_html(report))
