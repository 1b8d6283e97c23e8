"""report.json's schema, its renderings (report.md, report.html) and the CI gates checked against it."""
from __future__ import annotations

from .gate import GateResult, apply_gates, evaluate, print_gate_table, write_junit
from .schema import SCHEMA_VERSION, load_report, validate_report
from .to_html import render_html, write_html
from .to_markdown import render_markdown, write_markdown

__all__ = [
    "SCHEMA_VERSION",
    "GateResult",
    "apply_gates",
    "evaluate",
    "load_report",
    "print_gate_table",
    "render_html",
    "render_markdown",
    "validate_report",
    "write_html",
    "write_junit",
    "write_markdown",
]
