"""Figures taken on the user's boards over SSH (`--host`), written into the report as the board's own."""
from __future__ import annotations

from pathlib import Path

from .context import RunContext
from .errors import BoardError, EdgeKDError

LAT_KEYS = ("p50", "p90", "p99", "mean")


def _files(run: Path, block: dict) -> tuple[list[Path], str]:
    files = [run / f for f in block.get("files") or [block["artifact"]]]
    return files, Path(block["artifact"]).name


def bench_on_boards(ctx: RunContext, report: dict, hosts: list[str], ssh_config: str | None,
                    remote_python: str | None) -> None:
    """Benchmark the final artifact and the teacher on every host (in parallel); the first host's
    figures become final.latency_ms with measured_on naming it. A board that fails stops the run (exit 3)."""
    from .bench.remote import bench_hosts

    run, prof = ctx.run_dir, ctx.profile
    final = report["final"]
    options = {"eval_data": run / "eval.npz", "threads": ctx.threads, "ssh_config": ssh_config,
               "remote_python": remote_python, "warmup": prof.bench.warmup, "iterations": prof.bench.iterations}
    files, name = _files(run, final)
    with ctx.progress.task(f"benchmarking on {len(hosts)} board(s)", None):
        results = bench_hosts(hosts, files, name, prof, **options)
        teacher_art = run / "target" / "teacher"
        teacher_files = sorted(p for p in teacher_art.glob("*") if p.is_file()) if teacher_art.is_dir() else []
        teacher_results: dict = {}
        if teacher_files:
            main = next((p for p in teacher_files if p.suffix in (".onnx", ".xml")), teacher_files[0])
            teacher_results = bench_hosts(hosts, teacher_files, main.name, prof, **options)
    failed = {h: r for h, r in results.items() if isinstance(r, EdgeKDError)}
    if failed:
        h, err = next(iter(failed.items()))
        raise BoardError(str(err) if h in str(err) else f"board {h}: {err}")
    report["remote"] = []
    for h, r in results.items():
        t = teacher_results.get(h)
        entry = {"host": h, "latency_ms": r.get("latency_ms"), "accuracy": r.get("accuracy"),
                 "throughput": r.get("throughput"), "cold_start_ms": r.get("cold_start_ms"),
                 "environment": r.get("environment"), "versions": r.get("versions"),
                 "teacher_latency_ms": t.get("latency_ms") if isinstance(t, dict) else None}
        if isinstance(t, EdgeKDError):
            entry["not_measured"] = {"teacher_latency_ms": str(t)}
        elif entry["teacher_latency_ms"] is None:
            entry["not_measured"] = {"teacher_latency_ms": "no teacher artifact (ONNX entry)"}
        report["remote"].append(entry)
    first = report["remote"][0]
    lat = first["latency_ms"] or {}
    final["latency_ms"] = {k: lat[k] for k in LAT_KEYS if k in lat}
    final["measured_on"] = first["host"]
    final.pop("measured_on_note", None)
    final.pop("latency_samples_ms", None)
    if first.get("accuracy") is not None:
        final["accuracy"] = first["accuracy"]
        final["accuracy_source"] = f"eval on {first['host']}"
    nm = final.get("not_measured") or {}
    t_lat = first.get("teacher_latency_ms")
    if t_lat and lat:
        final["speedup_vs_teacher"] = round(t_lat["p50"] / lat["p50"], 3)
        nm.pop("speedup_vs_teacher", None)
        nm.pop("latency_ms", None)
        teacher = report.get("teacher") or {}
        teacher["latency_ms"] = {k: t_lat[k] for k in LAT_KEYS if k in t_lat}
        teacher["measured_on"] = first["host"]
        teacher.pop("latency_samples_ms", None)
    if nm:
        final["not_measured"] = nm
    else:
        final.pop("not_measured", None)
