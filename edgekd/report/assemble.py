"""Assembles report.json from what the stages, the boards and the ARM check measured (the only writer of
report.json), then writes report.md/html and applies the gates."""
from __future__ import annotations

import copy
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
from torch import nn

from .._version import __version__
from ..bench.measure import accuracy_of, agreement_of, bench_interleaved, predict
from ..bench.runner import EMULATED_REASON, bootstrap_ci
from ..context import RunContext
from ..data import Splits
from ..errors import EdgeKDError
from ..export import export_onnx, host_session
from ..models import count_macs, count_params
from ..runs import sha256_file, write_json

STAGE_BENCH_ITERATIONS = 150
LAT_KEYS = ("p50", "p90", "p99", "mean")


def _lat_ci(latency: dict | None) -> dict | None:
    """95% bootstrap intervals of p50/p90/p99 over the interleaved rounds (drift between rounds widens
    them), as [low, high] ms: what `edgekd gate --baseline` weighs a regression against."""
    if not latency or not latency.get("samples_ms") or not latency.get("rounds"):
        return None
    samples, rounds = latency["samples_ms"], int(latency["rounds"])
    if len(samples) % rounds:
        return None
    trials = list(np.asarray(samples, dtype=np.float64).reshape(rounds, -1))
    return {f"p{q}": [round(v, 4) for v in bootstrap_ci(trials, q, resamples=1000)] for q in (50, 90, 99)}


def _lat(summary: dict | None) -> dict | None:
    return None if not summary else {k: round(summary[k], 4) for k in LAT_KEYS if k in summary}


def model_entry(ctx: RunContext, name: str, model: nn.Module, onnx_path: Path, x: np.ndarray, y: np.ndarray,
                extra: dict | None = None, teacher_logits: np.ndarray | None = None) -> dict:
    """A stage's report entry for a torch model: exported, then measured with ONNX Runtime on this host."""
    shape = tuple(x.shape[1:])
    if not onnx_path.exists() or not (extra or {}).get("resumed"):  # a stage that ran again exports again
        export_onnx(copy.deepcopy(model).eval(), shape, onnx_path, ctx.profile.opset)
    runner = host_session(onnx_path, ctx.threads)
    logits = predict(runner, x)
    lat = bench_interleaved({name: runner}, x[:1], 10, STAGE_BENCH_ITERATIONS, rounds=1)[name]
    entry = {"name": name, "duration_s": (extra or {}).pop("duration_s", 0.0), "accuracy": accuracy_of(logits, y),
             "accuracy_runtime": "onnxruntime fp32 (this host)", "params": count_params(model),
             "macs": count_macs(model, shape), "size_bytes": onnx_path.stat().st_size,
             "latency_ms": _lat(lat), "measured_on": "host",
             "latency_runtime": f"onnxruntime fp32, {ctx.threads} threads"}
    if teacher_logits is not None:
        entry["agreement"] = agreement_of(teacher_logits, logits)
    entry.update(extra or {})
    return entry


def onnx_counts(path: Path, input_shape: tuple) -> dict:
    """Parameter and MAC counts of an ONNX model (initializer sizes; MACs of Conv/Gemm/MatMul by shape)."""
    import onnx
    from onnx import numpy_helper, shape_inference

    m = shape_inference.infer_shapes(onnx.load(str(path)))
    inits = {i.name: numpy_helper.to_array(i) for i in m.graph.initializer}
    params = int(sum(a.size for a in inits.values() if a.dtype.kind == "f"))
    shapes = {}
    for vi in list(m.graph.value_info) + list(m.graph.output):
        shapes[vi.name] = [d.dim_value or 1 for d in vi.type.tensor_type.shape.dim]
    macs = 0
    for n in m.graph.node:
        if n.op_type in ("Conv", "Gemm", "MatMul") and len(n.input) > 1 and n.input[1] in inits:
            w = inits[n.input[1]]
            out = shapes.get(n.output[0])
            if out is None:
                continue
            if n.op_type == "Conv":
                macs += int(np.prod(out)) * int(np.prod(w.shape[1:]))
            else:
                macs += int(np.prod(out)) * int(w.shape[0] if n.op_type == "MatMul" else w.shape[1])
    return {"params": params, "macs": macs}


def skeleton(ctx: RunContext, data_desc: str, splits: Splits | None, teacher: dict | None = None,
             data_extra: dict | None = None, blocks: dict | None = None) -> dict:
    """The report's opening blocks: version, config, target, environment, data, the teacher and any
    entry-specific block (the ONNX entry's onnx_input)."""
    prof = ctx.profile
    data = {"description": data_desc}
    if splits is not None:
        data.update({"train": len(splits.train), "val": len(splits.val), "test": len(splits.test),
                     "num_classes": splits.num_classes, "skipped_files": len(splits.skipped_files),
                     "labeled_train": int((splits.train.y >= 0).sum())})
    data.update(data_extra or {})
    report = {
        "schema_version": 1, "edgekd_version": __version__, "name": ctx.config.name,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "config": ctx.config_dict(),
        "target": {"name": prof.name, "backend": prof.backend, "device": prof.device, "arch": prof.arch,
                   "threads": ctx.threads, "measures_here": prof.measures_here, "source": prof.source},
        "environment": ctx.environment(), "data": data,
    }
    if teacher is not None:
        report["teacher"] = teacher
    report.update(blocks or {})
    return report


NO_TEACHER = {"model": "none (ONNX entry)", "not_measured": "ONNX entry: no PyTorch teacher", "accuracy": None,
              "params": None, "macs": None, "size_bytes": None, "latency_ms": None}


def teacher_block(entry: dict, info: dict) -> dict:
    return {"model": info.get("model"), "source": info.get("source"), "accuracy": entry["accuracy"],
            "params": entry["params"], "macs": entry["macs"], "size_bytes": entry["size_bytes"],
            "latency_ms": entry["latency_ms"], "measured_on": "host", "latency_runtime": entry.get("latency_runtime")}


def calibration_info(ctx: RunContext, calib: Path) -> dict:
    with np.load(calib) as z:
        n = int(len(z["x"]))
    from ..quantize.calibration import stratified_sample

    info = {"samples": n, "method": ctx.config.quantize.method, "sha256": sha256_file(calib),
            "source": "training split, class-stratified" if ctx.splits is not None else "user calibration file"}
    if ctx.splits is not None:
        ids = stratified_sample(ctx.splits.train.y.numpy(), ctx.config.quantize.calibration_samples, ctx.config.seed)
        info["ids"] = [int(i) for i in ids]
    return info


def footprint_of(c) -> dict:
    """peak_memory_mb, energy_mj and avg_power_w of a candidate (nulls when not measured), with their scope."""
    fp = getattr(c, "footprint", None) or {}
    out = {"peak_memory_mb": fp.get("peak_memory_mb"), "energy_mj": fp.get("energy_mj"),
           "avg_power_w": fp.get("avg_power_w")}
    out.update({k: fp[k] for k in ("memory_scope", "energy_sensor", "energy_scope") if k in fp})
    return out


def candidate_entry(ctx: RunContext, name: str, c, chosen: bool) -> dict:
    e = {"precision": c.precision, "artifact": str(c.artifact.path.relative_to(ctx.run_dir)) if c.artifact else None,
         "size_bytes": c.artifact.size_bytes() if c.artifact else None,
         "accuracy": c.accuracy, "fidelity": c.fidelity or None, "latency_ms": _lat(c.latency),
         "latency_ci_ms": _lat_ci(c.latency),
         "measured_on": getattr(c, "measured_on", "host") if c.latency else None, "chosen": chosen,
         **footprint_of(c)}
    missing = {k: v for k, v in (c.not_measured or {}).items()}
    for k in ("accuracy", "latency_ms", "fidelity", "measured_on", "artifact", "size_bytes", "peak_memory_mb",
              "energy_mj"):
        if e[k] is None and k not in missing:
            missing[k] = "no eval labels given" if k == "accuracy" else "not measured here"
    if c.selection:
        e["selection"] = c.selection
    if missing:
        e["not_measured"] = missing
    return e


def record_choice(ctx: RunContext, stages: list[dict], cands: dict, name: str, why: str, measured: bool,
                  reasons: dict[str, str], validation=None, where: str | None = None) -> None:
    """The quantize stage's entry gets every candidate's figures and the choice with its reason."""
    for st in stages:
        if st["name"] == "quantize":
            st["candidates"] = [{"name": n, "label": c.label, **candidate_entry(ctx, n, c, n == name),
                                 "why": reasons.get(n, "")} for n, c in cands.items()]
            st["choice"] = {"candidate": name, "precision": cands[name].precision, "label": cands[name].label,
                            "why": why, "measured": measured,
                            "measured_where": (f"{where}, the board, with the target's runtime" if measured and where
                                               else "this host, with the target's runtime" if measured
                                               else "not measured on the board"),
                            "chosen_on": validation.source if validation is not None else
                            "no selection data: the accuracy budget was not checked"}


def set_stages(report: dict, stages: list[dict]) -> None:
    """The stages' entries, in the order they ran."""
    report["stages"] = stages


def fill_final(ctx: RunContext, report: dict, name: str, c, teacher_c, counts: dict, why: str, measured: bool,
               fp32_c) -> None:
    """The final block: the chosen candidate's figures, ratios to the teacher on the same runtime."""
    run = ctx.run_dir
    prof = ctx.profile
    final: dict = {"artifact": str(c.artifact.path.relative_to(run)), "precision": c.precision,
                   "backend": prof.backend, "files": [str(f.relative_to(run)) for f in c.artifact.files]}
    nm: dict = {}
    if c.accuracy is not None:
        final["accuracy"] = c.accuracy
        final["accuracy_source"] = "eval"
    elif c.fidelity:
        final["accuracy"] = None
        final["accuracy_source"] = "fidelity"
        final["fidelity"] = c.fidelity
        nm["accuracy"] = "no labelled eval data: fidelity to the FP32 model on held-out calibration inputs stands in"
    else:
        final["accuracy"] = None
        nm["accuracy"] = c.not_measured.get("accuracy", "not measured")
    if fp32_c is not None and c.fidelity:
        final["agreement_with_fp32"] = c.fidelity["top1_agreement"]
    final["size_bytes"] = c.artifact.size_bytes()
    final.update(counts)
    final.update(footprint_of(c))
    for k in ("peak_memory_mb", "energy_mj"):
        if final[k] is None:
            nm[k] = c.not_measured.get(k, "not measured here")
    final["latency_ms"] = _lat(c.latency)
    if c.latency is None:
        nm["latency_ms"] = c.not_measured.get("latency_ms", "not measured")
    final["latency_ci_ms"] = _lat_ci(c.latency)
    final["latency_samples_ms"] = c.latency.get("samples_ms") if c.latency else None
    final["measured_on"] = "host" if c.latency else None
    version = ctx.versions.get(prof.backend)
    final["runtime"] = {"name": prof.backend, **({"version": version} if version else {"where": "on the board"})}
    if not prof.measures_here and c.latency:
        final["measured_on_note"] = (f"measured on this host ({ctx.environment()['cpu']}), not on a {prof.name}: "
                                     "not the board's latency")
    teacher = report.get("teacher") or {}
    if teacher_c is not None:
        teacher["accuracy"] = teacher_c.accuracy
        teacher["latency_ms"] = _lat(teacher_c.latency)
        teacher["latency_ci_ms"] = _lat_ci(teacher_c.latency)
        teacher["latency_samples_ms"] = teacher_c.latency.get("samples_ms") if teacher_c.latency else None
        teacher["size_bytes"] = teacher_c.artifact.size_bytes() if teacher_c.artifact else teacher.get("size_bytes")
        teacher["accuracy_runtime"] = f"{prof.backend} fp32"
        teacher["latency_runtime"] = f"{prof.backend} fp32, {ctx.threads} threads"
        teacher.update(footprint_of(teacher_c))
        teacher["measured_on"] = "host" if teacher_c.latency else None
        if teacher_c.not_measured:
            teacher["not_measured"] = teacher_c.not_measured
    same_runtime = teacher_c is not None or (teacher.get("latency_runtime") or "").split(" ")[0] == prof.backend
    if teacher.get("latency_ms") and final["latency_ms"] and same_runtime:
        final["speedup_vs_teacher"] = round(teacher["latency_ms"]["p50"] / final["latency_ms"]["p50"], 3)
    else:
        final["speedup_vs_teacher"] = None
        nm["speedup_vs_teacher"] = "needs both latencies measured on the same runtime"
    if teacher.get("size_bytes"):
        final["compression_vs_teacher"] = round(teacher["size_bytes"] / final["size_bytes"], 3)
    else:
        final["compression_vs_teacher"] = None
        nm["compression_vs_teacher"] = "no teacher (ONNX entry)"
    if teacher.get("accuracy") is not None and final.get("accuracy") is not None:
        final["accuracy_drop_vs_teacher"] = round(teacher["accuracy"] - final["accuracy"], 3)
    final["choice"] = {"why": why, "measured": measured}
    if nm:
        final["not_measured"] = nm
    final["candidate"] = name
    final["label"] = c.label
    report["final"] = final


def finish(ctx: RunContext, report: dict, hosts: list[str]) -> dict:
    """Remote figures, ARM verification, gates; then report.md/html and, last, report.json."""
    t0 = time.perf_counter()
    run = ctx.run_dir
    _strip_unexplained(report)
    if ctx.notes:  # what the run decided or resumed along the way, in its own words
        report["notes"] = list(dict.fromkeys(ctx.notes))
    from . import apply_gates, load_report

    gates_cfg = ctx.config.gates.model_dump(mode="json")
    baseline = load_report(gates_cfg["baseline"]) if gates_cfg.get("baseline") else None
    gates_passed = True
    if any(v is not None for k, v in gates_cfg.items() if k not in ("percentile", "baseline")):
        results, gates_passed = apply_gates(report, gates_cfg, baseline)
        report["gates"] = [r.to_dict() for r in results]
    from . import write_html, write_markdown

    write_markdown(report, run / "report.md")
    write_html(report, run / "report.html")
    report["report_seconds"] = round(time.perf_counter() - t0, 2)
    report["run_dir"] = str(run)
    report["gates_passed"] = gates_passed
    write_json(run / "report.json", report)
    return report


def _strip_unexplained(node) -> None:
    """Drop null keys that carry no meaning (optional extras), so every remaining null has a reason."""
    if isinstance(node, dict):
        explained = "not_measured" in node
        for k in [k for k, v in node.items() if v is None and not explained]:
            del node[k]
        for v in node.values():
            _strip_unexplained(v)
    elif isinstance(node, list):
        for v in node:
            _strip_unexplained(v)


_DETAILS = ("artifact", "samples", "accuracy_x86", "disagreements", "runtime", "runtime_version_arm",
            "runtime_version_x86", "execution_providers_arm", "emulated", "emulated_cpu", "emulator", "sysroot")


def apply_arm(report: dict, result: dict) -> None:
    """Write a verify_arm result into report["final"]: accuracy_arm, arm_agreement and the details
    under "arm". No latency figure is added; a missing accuracy gets its not_measured reason."""
    final = report.setdefault("final", {})
    final["accuracy_arm"] = result.get("accuracy_arm")
    final["arm_agreement"] = result.get("arm_agreement")
    final["arm"] = {k: result[k] for k in _DETAILS if result.get(k) is not None}
    final["arm"]["latency_not_measured"] = EMULATED_REASON
    if final["accuracy_arm"] is None and not isinstance(final.get("not_measured"), str):
        reasons = final.get("not_measured") or {}
        reasons["accuracy_arm"] = result.get("accuracy_not_measured", "not measured")
        final["not_measured"] = reasons


def apply_boards(report: dict, results: dict, teacher_results: dict) -> None:
    """The boards' figures (`--host`) as report["remote"]; the first host's become final.latency_ms with
    measured_on naming it, and the teacher's latency and the speedup when both were measured there."""
    final = report["final"]
    report["remote"] = []
    for h, r in results.items():
        t = teacher_results.get(h)
        entry = {"host": h, "latency_ms": r.get("latency_ms"), "accuracy": r.get("accuracy"),
                 "throughput": r.get("throughput"), "cold_start_ms": r.get("cold_start_ms"),
                 "environment": r.get("environment"), "versions": r.get("versions"),
                 "teacher_latency_ms": t.get("latency_ms") if isinstance(t, dict) else None,
                 "latency_ci_ms": r.get("latency_ci95"),
                 "teacher_latency_ci_ms": t.get("latency_ci95") if isinstance(t, dict) else None,
                 "peak_memory_mb": r.get("peak_rss_mb"), "energy_mj": r.get("energy_mj"),
                 "avg_power_w": r.get("avg_power_w")}
        if r.get("energy_mj") is None:
            entry.setdefault("not_measured", {})["energy_mj"] = r.get("energy_not_measured") or "not measured"
        if r.get("energy_sensor"):
            entry.update(energy_sensor=r["energy_sensor"], energy_scope=r.get("energy_scope"))
        if r.get("board_mismatch"):
            entry["board_mismatch"] = r["board_mismatch"]
        if isinstance(t, EdgeKDError):
            entry.setdefault("not_measured", {})["teacher_latency_ms"] = str(t)
        elif entry["teacher_latency_ms"] is None:
            entry.setdefault("not_measured", {})["teacher_latency_ms"] = "no teacher artifact (ONNX entry)"
        report["remote"].append(entry)
    first = report["remote"][0]
    lat = first["latency_ms"] or {}
    final["latency_ms"] = {k: lat[k] for k in LAT_KEYS if k in lat}
    final["measured_on"] = first["host"]
    backend = final.get("backend") or (report.get("target") or {}).get("backend")
    final["runtime"] = {"name": backend, "version": (first.get("versions") or {}).get(backend), "where": first["host"]}
    final.pop("measured_on_note", None)
    if first.get("board_mismatch"):  # a board unlike its profile: its figures say so wherever they appear
        final["measured_on_note"] = f"{first['host']}: {first['board_mismatch']}"
    final.pop("latency_samples_ms", None)
    final["latency_ci_ms"] = first.get("latency_ci_ms")  # the board's own interval, never the host's
    # The board's own memory and energy replace the host's: the same runner, on the board.
    final["peak_memory_mb"] = first.get("peak_memory_mb")
    final["energy_mj"], final["avg_power_w"] = first.get("energy_mj"), first.get("avg_power_w")
    for k in ("energy_sensor", "energy_scope"):
        final.pop(k, None)
        if first.get(k):
            final[k] = first[k]
    if first.get("accuracy") is not None:
        final["accuracy"] = first["accuracy"]
        final["accuracy_source"] = f"eval on {first['host']}"
    nm = final.get("not_measured") or {}
    if final["energy_mj"] is None:
        nm["energy_mj"] = f"{first['host']}: " + (first.get("not_measured") or {}).get("energy_mj", "not measured")
    else:
        nm.pop("energy_mj", None)
    if final["peak_memory_mb"] is not None:
        nm.pop("peak_memory_mb", None)
    t_lat = first.get("teacher_latency_ms")
    if t_lat and lat:
        final["speedup_vs_teacher"] = round(t_lat["p50"] / lat["p50"], 3)
        nm.pop("speedup_vs_teacher", None)
        nm.pop("latency_ms", None)
        teacher = report.get("teacher") or {}
        teacher["latency_ms"] = {k: t_lat[k] for k in LAT_KEYS if k in t_lat}
        teacher["measured_on"] = first["host"]
        teacher.pop("latency_samples_ms", None)
        teacher["latency_ci_ms"] = first.get("teacher_latency_ci_ms")
    if nm:
        final["not_measured"] = nm
    else:
        final.pop("not_measured", None)
