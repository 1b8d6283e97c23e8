"""student.model: search — which student for this board? Every architecture of the search space (the
built-in five-conv families scaled in width, depth and kernel size, torchvision's mobile families in
width) is exported and timed on the target's runtime (on the board with --host) before any training,
interleaved with the others and with the teacher. Those within the latency budget (latency_budget_ms,
or the teacher's p50 / target_speedup) are ranked by MACs, the largest `trials` of them (taking the
families in turn) are distilled briefly from the teacher's cached logits (proxy_epochs) and scored on
the validation split, and the most accurate is the student the distill stage then trains in full."""
from __future__ import annotations

import itertools
import time

import numpy as np
import torch
from torch import nn

from ..context import RunContext
from ..errors import ConfigError, StageError
from ..export import export_onnx
from ..models import (
    CNN_FAMILIES,
    TORCHVISION_WIDTH,
    build_model,
    cnn_layout,
    count_macs,
    count_params,
    parse_scaling,
)

__all__ = ["run_search", "search_key", "space"]

TEACHER = "teacher-fp32"  # the teacher's name among the timed models (not "teacher", which a board session skips)


def _fmt(x: float) -> str:
    return f"{x:g}"


def space(cfg) -> list[str]:
    """The architecture specs of student.search's space (build_model accepts each)."""
    s = cfg.student.search
    specs: list[str] = []
    seen: set[tuple] = set()  # two depths can give one network (edge_cnn keeps its three strided convs)
    for family in s.space:
        base = family.removeprefix("edgekd:")
        if base in CNN_FAMILIES:
            for w, d, k in itertools.product(s.widths, s.depths, s.kernels):
                layout = (base, cnn_layout(base, w, d), k)
                if layout not in seen:
                    seen.add(layout)
                    specs.append(f"{base}@w{_fmt(w)}" + (f",d{_fmt(d)}" if d != 1 else "") + (f",k{k}" if k != 3 else ""))
        elif family.startswith("torchvision:") and family.removeprefix("torchvision:") in TORCHVISION_WIDTH:
            specs += [f"{family}@w{_fmt(w)}" for w in s.widths]
        else:
            raise ConfigError(f"student.search.space: {family!r} is not one of {', '.join(CNN_FAMILIES)}, "
                              f"{', '.join('torchvision:' + n for n in TORCHVISION_WIDTH)}")
    return list(dict.fromkeys(specs))


def search_key(ctx: RunContext, teacher_key: str) -> str:
    cfg = ctx.config
    return ctx.key("search-v1", teacher_key, cfg.student.search.model_dump(mode="json"),  # type: ignore[union-attr]
                   cfg.data.key_dump(), cfg.distill.temperature, cfg.distill.alpha, cfg.distill.lr,
                   ctx.profile.name, ctx.board[0] if ctx.board else None, ctx.threads)


def _time(ctx: RunContext, onnx: dict[str, object], sample: np.ndarray) -> dict[str, dict]:
    """{name: Candidate} with latency measured on the target's runtime, interleaved; on the board with --host."""
    from ..backends.base import Source
    from ..deploy import close_runners, compile_all, measure_on_board, open_runners, time_all

    cands = compile_all(ctx, {name: Source("fp32", path, name) for name, path in onnx.items()},  # type: ignore[arg-type]
                        root=ctx.stage_dir("search") / "target")
    if ctx.board is not None:
        host, ssh_config, remote_python = ctx.board
        measure_on_board(ctx, cands, host, None, ssh_config, remote_python)
        for c in cands.values():
            c.measured_on = host if c.latency else c.measured_on
        return cands  # type: ignore[return-value]
    runners = open_runners(ctx, cands)
    try:
        time_all(ctx, cands, runners, sample)
    finally:
        close_runners(runners)
    return cands  # type: ignore[return-value]


def _pick(within: list[dict], trials: int) -> list[dict]:
    """The largest `trials` candidates by MACs, taking the families in turn so that each is tried."""
    by_family: dict[str, list[dict]] = {}
    for c in sorted(within, key=lambda c: -c["macs"]):
        by_family.setdefault(c["family"], []).append(c)
    picked: list[dict] = []
    while len(picked) < trials and any(by_family.values()):
        for fam in list(by_family):
            if by_family[fam] and len(picked) < trials:
                picked.append(by_family[fam].pop(0))
    return picked


def run_search(ctx: RunContext, teacher: nn.Module, teacher_onnx, num_classes: int,
               input_shape: tuple[int, ...]) -> tuple[str, dict]:
    """Search the student; returns (its spec, the report's search stage entry)."""
    from .trainer import augmented_views, kd_draws, resolve_device, train

    started = time.perf_counter()
    cfg, s = ctx.config, ctx.config.student.search
    splits = ctx.splits
    if splits is None or s is None:
        raise RuntimeError("the student search needs data splits and student.search")
    out = ctx.stage_dir("search")
    specs = space(cfg)
    rows: dict[str, dict] = {}
    onnx: dict[str, object] = {TEACHER: teacher_onnx}
    with ctx.progress.task("search: exporting the candidate students", len(specs)) as bar:
        for spec in specs:
            torch.manual_seed(cfg.seed)
            model = build_model(spec, num_classes)
            path = out / f"{spec.replace('@', '_').replace(':', '_').replace(',', '_')}.onnx"
            export_onnx(model.eval(), input_shape, path, ctx.profile.opset)
            rows[spec] = {"architecture": spec, "family": parse_scaling(spec)[0], "params": count_params(model),
                          "macs": count_macs(model, input_shape)}
            onnx[spec] = path
            bar.advance()
    sample = splits.val.x[:1].numpy() if hasattr(splits.val.x, "numpy") else np.asarray(splits.val.x[:1])
    with ctx.progress.task(f"search: timing {len(specs)} students and the teacher on {ctx.profile.backend}", None):
        cands = _time(ctx, onnx, sample)
    teacher_lat = (cands[TEACHER].latency or {}).get("p50")
    for spec, row in rows.items():
        c = cands[spec]
        row["latency_ms"] = round(c.latency["p50"], 4) if c.latency else None
        row["measured_on"] = c.measured_on if c.latency else None
        if not c.latency:
            row["not_measured"] = {"latency_ms": c.not_measured.get("latency_ms", "not measured")}
    if all(r["latency_ms"] is None for r in rows.values()):
        raise StageError(f"search: no candidate could be timed on {ctx.profile.name} "
                         f"({next(iter(rows.values()))['not_measured']['latency_ms']}); run it with --host on the board")
    if s.latency_budget_ms is not None:
        budget, source = s.latency_budget_ms, "student.search.latency_budget_ms"
    else:
        if not teacher_lat:
            raise StageError("search: target_speedup needs the teacher's latency, which was not measured here; "
                             "give student.search.latency_budget_ms")
        budget = teacher_lat / s.target_speedup  # type: ignore[operator]
        source = f"teacher p50 {teacher_lat:.4f} ms / target_speedup {s.target_speedup:g}"
    within = [r for r in rows.values() if r["latency_ms"] is not None and r["latency_ms"] <= budget]
    if not within:
        fastest = min((r for r in rows.values() if r["latency_ms"] is not None), key=lambda r: r["latency_ms"])
        raise ConfigError(f"student.search: no candidate meets the {budget:.4f} ms budget on {ctx.profile.name}; "
                          f"the fastest, {fastest['architecture']}, takes {fastest['latency_ms']:.4f} ms: "
                          "raise the budget or add smaller widths")
    trials = _pick(within, s.trials)
    from ..data import transfer_set
    from . import parallel

    # The distill stage's own views and teacher-logit cache: computed once here, read again there.
    d = cfg.distill
    kd_set = transfer_set(splits)
    views = augmented_views(kd_set.x, cfg.seed, d.draws or kd_draws(kd_set.x), cfg.data.augment)
    cache = parallel.shared_cache(teacher, views, topk=d.cache_topk, device=resolve_device(d.device))
    proxy_start = time.perf_counter()
    for row in trials:
        torch.manual_seed(cfg.seed)
        model = build_model(row["architecture"], num_classes)
        t0 = time.perf_counter()
        res = train(model, kd_set, splits.val, epochs=s.proxy_epochs, lr=cfg.distill.lr, seed=cfg.seed,
                    batch_size=cfg.data.batch_size, teacher=teacher, temperature=cfg.distill.temperature,
                    alpha=cfg.distill.alpha, augment=cfg.data.augment, cache=cache, views=views,
                    progress=ctx.progress, label=f"search: proxy KD of {row['architecture']}",
                    device=cfg.distill.device, precision=cfg.distill.precision)
        row["proxy_accuracy"] = round(res.val_accuracy, 3)
        row["proxy_seconds"] = round(time.perf_counter() - t0, 2)
    best = max(trials, key=lambda r: (r["proxy_accuracy"], -r["latency_ms"]))
    for row in rows.values():
        row["within_budget"] = row["latency_ms"] is not None and row["latency_ms"] <= budget
        if "proxy_accuracy" not in row:
            row["proxy_accuracy"] = None
            row.setdefault("not_measured", {})["proxy_accuracy"] = (
                f"not proxy-trained: among the {len(within)} within the budget, not one of the {len(trials)} largest "
                "by MACs" if row["within_budget"] else "not proxy-trained: over the latency budget")
        row["chosen"] = row is best
    entry = {"name": "search", "budget_ms": round(budget, 4), "budget_source": source,
             "teacher_latency_ms": round(teacher_lat, 4) if teacher_lat else None,
             "runtime": f"{ctx.profile.backend} fp32, {ctx.threads} threads",
             "measured_on": ctx.board[0] if ctx.board else "host", "proxy_epochs": s.proxy_epochs,
             "proxy_data": f"training split, scored on the validation split ({len(splits.val)} images)",
             "proxy_seconds": round(time.perf_counter() - proxy_start, 2),
             "teacher_cache_seconds": round(cache.seconds, 3), "chosen": best["architecture"],
             "candidates": sorted(rows.values(), key=lambda r: (r["latency_ms"] is None, r["latency_ms"] or 0.0)),
             "duration_s": round(time.perf_counter() - started, 2)}
    return best["architecture"], entry
