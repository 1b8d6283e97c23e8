"""Compile candidates for the target, measure them with its runtime, and choose the final artifact.

Validation chooses, test reports: `select` measures every candidate on the selection data (the
validation split, or inputs held out from calibration) and `choose` reads only those figures; `measure_all`
then takes the reported figures on the held-out eval data, after the choice is made."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .backends import Artifact, get_backend
from .backends.base import Runner, Source
from .bench.measure import (
    accuracy_of,
    agreement_of,
    bench_interleaved,
    margin_flip_estimate,
    predict,
    sqnr_db,
)
from .context import RunContext
from .quantize.sensitivity import Validation


@dataclass
class Candidate:
    """One model compiled for the target and what was measured of it."""

    precision: str
    onnx: Path
    artifact: Artifact | None = None
    accuracy: float | None = None
    fidelity: dict = field(default_factory=dict)
    latency: dict | None = None
    logits: np.ndarray | None = None
    not_measured: dict = field(default_factory=dict)
    label: str = ""
    selection: dict = field(default_factory=dict)  # accuracy / top1_agreement on the selection data: what chose
    footprint: dict = field(default_factory=dict)  # peak memory and energy of a fresh runner process
    measured_on: str = "host"  # where latency (and the selection figures) were taken: "host" or a board


def compile_all(ctx: RunContext, sources: dict[str, Source | Path], root: Path | None = None) -> dict[str, Candidate]:
    """Compile each model with the target's backend into <root>/<name>/ (root: the run's target/; a bare
    Path: precision = name)."""
    backend = get_backend(ctx.profile.backend)
    out: dict[str, Candidate] = {}
    for name, src in sources.items():
        if not isinstance(src, Source):
            src = Source("fp32" if name == "teacher" else name, Path(src))
        art = backend.compile(src.path, ctx.profile, (root or ctx.run_dir / "target") / name, src.precision)
        out[name] = Candidate(precision=src.precision, onnx=src.path, artifact=art, label=src.label or src.precision)
    return out


def open_runners(ctx: RunContext, cands: dict[str, Candidate]) -> dict[str, Runner]:
    """A session for every candidate that runs here; the others get their not_measured reason."""
    backend = get_backend(ctx.profile.backend)
    runners: dict[str, Runner] = {}
    for name, c in cands.items():
        if c.artifact is None or not c.artifact.runnable_here:
            reason = c.artifact.not_runnable_reason if c.artifact else "not compiled"
            c.not_measured = {"accuracy": reason, "latency_ms": reason}
            continue
        runners[name] = backend.load(c.artifact, ctx.profile, ctx.threads)
    return runners


def select(cands: dict[str, Candidate], runners: dict[str, Runner], validation: Validation | None,
           reference: str = "fp32") -> None:
    """Each candidate's figures on the selection data (accuracy with labels, top-1 agreement with the
    reference always): the only figures `choose` reads."""
    if validation is None:
        return
    logits = {name: predict(r, validation.x) for name, r in runners.items() if name != "teacher"}
    ref = logits.get(reference)
    for name, lg in logits.items():
        sel: dict = {"data": validation.source, "samples": int(len(validation.x))}
        if validation.y is not None:
            sel["accuracy"] = accuracy_of(lg, validation.y)
        if ref is not None:
            sel["top1_agreement"] = agreement_of(ref, lg)
            if validation.y is None and lg is not ref:  # unlabeled: the flips a small set cannot show
                sel["disagreement_estimate"] = round(margin_flip_estimate(ref, lg), 3)
        cands[name].selection = sel


BOARD_ROUNDS = 3  # candidates are timed on the board in interleaved rounds: A B C A B C A B C


def measure_on_board(ctx: RunContext, cands: dict[str, Candidate], host: str, validation: Validation | None,
                     ssh_config: str | None, remote_python: str | None) -> None:
    """The board decides: every candidate is run on `host` with the target's runtime, in interleaved
    rounds, for latency and for its predictions on the selection data (never the test set). Selection
    accuracy and agreement with FP32 come from the board's predictions; latency from all rounds."""
    import tempfile

    from .bench.remote import bench_remote
    from .bench.runner import summarize

    names = [n for n, c in cands.items() if n != "teacher" and c.artifact is not None]
    b = ctx.config.bench
    iters = b.iterations if "iterations" in b.model_fields_set else ctx.profile.bench.iterations
    warmup = b.warmup if "warmup" in b.model_fields_set else ctx.profile.bench.warmup
    # A Jetson builds an engine per call (minutes each): one round there, timed by trt_runner's CUDA events.
    rounds = 1 if ctx.profile.backend == "tensorrt" else BOARD_ROUNDS
    per_round = max(10, iters // rounds)
    times: dict[str, list[np.ndarray]] = {n: [] for n in names}
    first: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="edgekd-select-") as tmp:
        sel = None
        if validation is not None:
            sel = Path(tmp) / "selection.npz"
            arrays = {"x": validation.x} if validation.y is None else {"x": validation.x, "y": validation.y}
            np.savez(sel, **arrays)
        with ctx.progress.task(f"measuring {len(names)} candidates on {host}", rounds * len(names)) as bar:
            for r in range(rounds):
                for n in names:
                    a = cands[n].artifact
                    res = bench_remote(host, a.files or [a.path], a.path.name, ctx.profile,  # type: ignore[union-attr]
                                       eval_data=sel if r == 0 else None, threads=ctx.threads, warmup=warmup,
                                       iterations=per_round, ssh_config=Path(ssh_config) if ssh_config else None,
                                       remote_python=remote_python, keep_times=True)
                    if r == 0:
                        first[n] = res
                    if res.get("times_ms"):
                        times[n].append(np.asarray(res["times_ms"][:per_round], dtype=np.float64))
                    bar.advance()
    preds = {n: np.asarray(first[n].get("predictions") or [], dtype=np.int64) for n in names}
    ref = preds.get("fp32")
    for n in names:
        c, res = cands[n], first[n]
        c.measured_on = host
        if len(times[n]) == rounds and rounds > 1 and all(len(t) == per_round for t in times[n]):
            samples = np.concatenate(times[n])
            c.latency = {**summarize(samples), "samples_ms": samples.tolist(), "rounds": rounds}
        elif res.get("latency_ms"):
            c.latency = dict(res["latency_ms"])  # a runner without per-call times (TensorRT): its summary
        c.footprint = {"peak_memory_mb": res.get("peak_rss_mb"), "energy_mj": res.get("energy_mj"),
                       "avg_power_w": res.get("avg_power_w"), "memory_scope": MEMORY_SCOPE + f", on {host}"}
        if res.get("energy_mj") is None:
            c.not_measured["energy_mj"] = f"{host}: " + (res.get("energy_not_measured") or "not measured")
        if validation is not None and len(preds[n]) == len(validation.x):
            selection: dict = {"data": f"{validation.source}, on {host}", "samples": int(len(validation.x))}
            if validation.y is not None:
                selection["accuracy"] = float((preds[n] == validation.y).mean() * 100)
            if ref is not None and len(ref) == len(preds[n]):
                selection["top1_agreement"] = float((ref == preds[n]).mean() * 100)
            c.selection = selection


def time_all(ctx: RunContext, cands: dict[str, Candidate], runners: dict[str, Runner], sample: np.ndarray) -> None:
    """Interleaved latency of every runnable candidate on one input (latency does not depend on which)."""
    if not runners:
        return
    b = ctx.config.bench
    warmup = b.warmup if "warmup" in b.model_fields_set else ctx.profile.bench.warmup
    iters = b.iterations if "iterations" in b.model_fields_set else ctx.profile.bench.iterations
    res = bench_interleaved(runners, sample[:1], warmup, iters, progress=ctx.progress)
    for name, r in res.items():
        cands[name].latency = r


FOOTPRINT_SECONDS = 0.5  # the timed loop under the power sensor (a Pi's PMIC is read every 0.1 s)
MEMORY_SCOPE = "peak resident memory of a fresh runner process: Python, the runtime, the model, inference at batch 1"


def footprint_all(ctx: RunContext, cands: dict[str, Candidate], runners: dict[str, Runner]) -> None:
    """Peak resident memory (and energy per inference where a power sensor is readable) of every candidate
    that runs here, each in its own runner process as a board would run it."""
    from .bench.harness import bench_local
    from .errors import EdgeKDError

    for name in runners:
        c = cands[name]
        try:
            r = bench_local(c.artifact.path, ctx.profile, threads=ctx.threads, warmup=2,  # type: ignore[union-attr]
                            duration_s=FOOTPRINT_SECONDS)
        except EdgeKDError as e:
            c.not_measured.update(peak_memory_mb=str(e), energy_mj=str(e))
            continue
        c.footprint = {"peak_memory_mb": r.get("peak_rss_mb"), "energy_mj": r.get("energy_mj"),
                       "avg_power_w": r.get("avg_power_w"), "memory_scope": MEMORY_SCOPE}
        if r.get("energy_sensor"):
            c.footprint.update(energy_sensor=r["energy_sensor"], energy_scope=r.get("energy_scope"))
        if r.get("energy_mj") is None:
            c.not_measured["energy_mj"] = r.get("energy_not_measured") or "no power sensor reading"


def measure_all(ctx: RunContext, cands: dict[str, Candidate], runners: dict[str, Runner], x: np.ndarray,
                y: np.ndarray | None, reference: str = "fp32") -> None:
    """The reported figures: accuracy (or fidelity to `reference`) on the eval data for every runnable
    candidate."""
    for name, runner in runners.items():
        c = cands[name]
        c.logits = predict(runner, x)
        if y is not None:
            c.accuracy = accuracy_of(c.logits, y)
    ref = cands.get(reference)
    if ref is not None and ref.logits is not None:
        ref.fidelity = {"top1_agreement": 100.0, "is_reference": True}  # what the others are compared with
    for c in cands.values():
        if c.logits is not None and ref is not None and ref.logits is not None and c is not ref:
            db = sqnr_db(ref.logits, c.logits)
            # Identical logits have no noise to measure: null and `identical`, never Infinity in JSON.
            c.fidelity = {"top1_agreement": agreement_of(ref.logits, c.logits),
                          "logit_sqnr_db": round(db, 2) if math.isfinite(db) else None}
            if not math.isfinite(db):
                c.fidelity["identical"] = True


def close_runners(runners: dict[str, Runner]) -> None:
    """Release every session."""
    for r in runners.values():
        r.close()


# Relative p50 band within which two candidates count as equally fast (run-to-run noise on a shared host).
LATENCY_TIE = 0.10
BOOTSTRAP_PER_ROUND = 250


def _rounds(latency: dict) -> np.ndarray | None:
    """The interleaved samples as (rounds, iterations), or None when only the summary is known."""
    samples, rounds = latency.get("samples_ms"), latency.get("rounds")
    if not samples or not rounds or len(samples) % rounds:
        return None
    return np.asarray(samples, dtype=np.float64).reshape(rounds, -1)


def _faster(a: Candidate, b: Candidate, band: float = LATENCY_TIE) -> dict:
    """Whether `a` is faster than `b` beyond noise: p50(a)/p50(b) with its interval, and the verdict
    (the interval's upper end below 1/(1 + band))."""
    from .bench.harness import ratio_ci

    ra, rb = _rounds(a.latency or {}), _rounds(b.latency or {})
    if ra is not None and rb is not None:
        # At most BOOTSTRAP_PER_ROUND evenly spaced samples per round keep the bootstrap under a second.
        ra, rb = (r[:, ::max(1, r.shape[1] // BOOTSTRAP_PER_ROUND)] for r in (ra, rb))
        out = ratio_ci(ra, rb)
        out["faster"] = out["ci95"][1] < 1 / (1 + band)
        return out
    ratio = a.latency["p50"] / b.latency["p50"]  # type: ignore[index]
    return {"ratio": ratio, "faster": ratio < 1 / (1 + band)}


def _size(c: Candidate) -> int:
    """Bytes of the candidate's artifact files (0 when unknown)."""
    files = (c.artifact.files or [c.artifact.path]) if c.artifact is not None else []
    return sum(Path(f).stat().st_size for f in files if Path(f).is_file())


def _ci_text(cmp: dict) -> str:
    ci = cmp.get("ci95")
    return f"{cmp['ratio']:.3f}" + (f" [95% {ci[0]:.3f}-{ci[1]:.3f}]" if ci else "")


def preference(ctx: RunContext, cands: dict[str, Candidate]) -> list[str]:
    """Candidate names in the profile's precision order (within a precision, in the order produced)."""
    order = list(ctx.profile.precisions)
    names = [n for n in cands if n != "teacher"]
    return sorted(names, key=lambda n: order.index(cands[n].precision) if cands[n].precision in order
                  else len(order))


def _budget(c: Candidate, ref: Candidate | None, max_drop: float) -> tuple[bool, str]:
    """Whether `c` is within the accuracy budget of the FP32 reference on the selection data, and the
    figure that says so."""
    if c is ref or ref is None:
        return True, "the reference"
    data = c.selection.get("data", "selection data")
    if c.selection.get("accuracy") is not None and ref.selection.get("accuracy") is not None:
        drop = ref.selection["accuracy"] - c.selection["accuracy"]
        return drop <= max_drop, f"accuracy drop {drop:.2f} pt vs fp32 on the {data} (budget {max_drop})"
    if c.selection.get("top1_agreement") is not None:
        dis = 100 - c.selection["top1_agreement"]
        est = c.selection.get("disagreement_estimate")
        if est is not None and est > dis:
            return est <= max_drop, (f"disagrees with fp32 on {dis:.2f}% of the {data}; from its margins, on "
                                     f"{est:.2f}% of such inputs (budget {max_drop})")
        return dis <= max_drop, f"disagrees with fp32 on {dis:.2f}% of the {data} (budget {max_drop})"
    return True, "accuracy not measured on selection data"


def choose(ctx: RunContext, cands: dict[str, Candidate], max_drop: float,
           measured_here: bool, where: str = "this host") -> tuple[str, str, bool, dict[str, str]]:
    """The final candidate: fastest measured within the accuracy budget of FP32, or, where latency on the
    board could not be measured, the profile's preference order. Returns (name, why, measured, why
    per candidate)."""
    names = preference(ctx, cands)
    ref = cands.get("fp32")
    verdict = {n: _budget(cands[n], ref, max_drop) for n in names}
    ok = [n for n in names if verdict[n][0]]
    if not ok:
        ok = ["fp32"] if "fp32" in cands else names[:1]
    reasons = {n: f"over the accuracy budget: {verdict[n][1]}" for n in names if n not in ok}
    if measured_here and all(cands[n].latency for n in ok):
        p50 = {n: cands[n].latency["p50"] for n in ok}  # type: ignore[index]
        # The preference order holds unless a later candidate is faster beyond measurement noise: its p50
        # over the current choice's, with a 95% bootstrap interval over the interleaved rounds, must lie
        # below 1/(1 + LATENCY_TIE). Equal-speed candidates thus do not swap run after run (same seed, same
        # artifact), while a clear speedup wins.
        compared: dict[tuple[str, str], dict] = {}

        def versus(n: str, other: str) -> dict:
            if (n, other) not in compared:  # a bootstrap over every sample: computed once per pair
                compared[(n, other)] = _faster(cands[n], cands[other])
            return compared[(n, other)]

        best = ok[0]
        for n in ok[1:]:
            if versus(n, best)["faster"]:
                best = n
        # Never slower than FP32: against FP32 there is no tie band. FP32 faster beyond noise (the whole
        # 95% interval of its p50 ratio below 1) wins; within noise the smaller artifact wins, as a tie.
        tie, tied = "", set()
        if best != "fp32" and "fp32" in ok:
            strict = _faster(cands["fp32"], cands[best], band=0.0)
            behind = _faster(cands[best], cands["fp32"], band=0.0)
            compared[("fp32", best)] = strict
            if strict["faster"]:
                best = "fp32"
            elif not behind["faster"]:
                small, big = sorted((best, "fp32"), key=lambda n: _size(cands[n]))
                tie = (f"; {best} and fp32 tie within noise (p50 ratio {_ci_text(behind)}): the smaller "
                       f"artifact, {small} ({_size(cands[small]) / 1e6:.2f} MB against "
                       f"{_size(cands[big]) / 1e6:.2f} MB), is kept")
                tied, best = {best, "fp32"}, small
        for n in ok:
            if n == best:
                reasons[n] = (f"{'tie on speed with fp32, the smaller artifact' if tie else 'fastest'} within the "
                              f"accuracy budget ({verdict[n][1]}): p50 {p50[n]:.3f} ms")
                continue
            cmp = versus(n, best)
            ratio = f"p50 {p50[n]:.3f} ms vs {p50[best]:.3f} ms ({best}), ratio {_ci_text(cmp)}"
            if n in tied:
                reasons[n] = f"tie with {best} within noise, the larger artifact: {ratio}"
            elif ok.index(n) < ok.index(best):
                reasons[n] = f"slower beyond noise: {ratio}"
            elif cmp["ratio"] >= 1:
                reasons[n] = f"slower: {ratio}"
            else:
                reasons[n] = f"not faster beyond noise: {ratio}; the preference order keeps {best}"
        why = (f"fastest within the accuracy budget, measured with {ctx.profile.backend} on {where} for "
               f"{ctx.profile.name}: " + ", ".join(f"{n} p50 {p50[n]:.3f} ms" for n in ok)
               + f"; a candidate displaces an earlier one in the preference order only when faster beyond "
               f"noise (95% interval of the p50 ratio below {1 / (1 + LATENCY_TIE):.3f})")
        why += tie
        over = [n for n in names if n not in ok]
        if over:
            why += "; over budget: " + ", ".join(f"{n} ({verdict[n][1]})" for n in over)
        return best, why, True, reasons
    best = ok[0]
    why = (f"not measured on the board: chosen by {ctx.profile.name}'s preference order "
           f"({', '.join(ctx.profile.precisions)}); latencies taken on this host do not decide for this board")
    for n in ok:
        reasons[n] = ("first in the preference order within the accuracy budget" if n == best
                      else "later in the preference order")
    over = [n for n in names if n not in ok]
    if over:
        why += f"; {', '.join(over)} left out: " + "; ".join(verdict[n][1] for n in over)
    return best, why, False, reasons
