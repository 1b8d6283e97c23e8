"""The summary table printed at the end of `edgekd compress`."""
from __future__ import annotations


def _fmt(v, unit: str = "", nd: int = 2) -> str:
    if v is None:
        return "not measured"
    if isinstance(v, float):
        return f"{v:.{nd}f}{unit}"
    return f"{v}{unit}"


def print_summary(report: dict, run_dir: str) -> None:
    """A rich table: teacher vs final (accuracy, size, p50/p90, speedup) and where it was measured."""
    from rich.console import Console
    from rich.table import Table

    t, f = report.get("teacher") or {}, report["final"]
    table = Table(title=f"edgekd {report['name']} -> {report['target']['name']} ({report['target']['backend']})")
    for col in ("", "accuracy %", "size", "p50 ms", "p90 ms", "measured on"):
        table.add_column(col)

    def row(label: str, b: dict) -> None:
        lat = b.get("latency_ms") or {}
        size = b.get("size_bytes")
        table.add_row(label, _fmt(b.get("accuracy")), "not measured" if size is None else f"{size / 1e6:.3f} MB",
                      _fmt(lat.get("p50"), nd=3), _fmt(lat.get("p90"), nd=3), _fmt(b.get("measured_on")))

    if t:
        row("teacher", t)
    row(f"final ({f['precision']})", f)
    console = Console()
    console.print(table)
    console.print(f"speedup vs teacher: {_fmt(f.get('speedup_vs_teacher'), 'x')}   "
                  f"compression vs teacher: {_fmt(f.get('compression_vs_teacher'), 'x')}")
    if f.get("choice"):
        console.print(f"precision: {f['precision']} — {f['choice']['why']}")
    for g in report.get("gates") or []:
        console.print(f"gate {g.get('gate')}: {'pass' if g.get('passed') else 'FAIL'} ({g.get('detail', '')})")
    console.print(f"run directory: {run_dir}")
