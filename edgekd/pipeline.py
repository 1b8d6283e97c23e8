"""The pipeline: runs the chosen stages in order and owns the run directory, caching and resume."""
from __future__ import annotations

import shutil
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .backends.base import Artifact, Source
from .collapse import chance_of, check_collapse, check_fp32_scores, check_teacher, reference_accuracy
from .config import Config, onnx_entry_unread
from .config.profiles import load_profile
from .context import RunContext, usable_cores
from .data import build_splits, load_npz, shared_rows
from .deploy import (
    Candidate,
    choose,
    close_runners,
    compile_all,
    footprint_all,
    measure_all,
    measure_on_board,
    open_runners,
    select,
    time_all,
)
from .errors import BadInputError, StageError
from .export import check_class_scores, check_onnx_file, export_onnx, host_predict, parity, torch_logits
from .models import count_macs, count_params, student_from
from .progress import NullProgress, Progress
from .quantize.calibration import stratified_sample
from .quantize.sensitivity import Validation
from .report import assemble
from .runs import (
    RUN_MARKER,
    clear_previous_run,
    config_key,
    default_run_dir,
    ensure_writable_dir,
    hash_arrays,
    write_json,
    write_npz,
)


class Pipeline:
    """distill -> prune -> export -> quantize -> compile -> bench -> report, for one config and target."""

    def __init__(self, config: Config, target: str | None = None, out: str | Path | None = None, *,
                 model_onnx: str | Path | None = None, calib_data: str | Path | None = None,
                 eval_data: str | Path | None = None, hosts: list[str] | None = None,
                 ssh_config: str | None = None, remote_python: str | None = None, verify_arm: bool = False,
                 trust_checkpoint: bool = False, progress: Progress | None = None):
        self.config = config
        self.profile = load_profile(target or config.target)
        self.out = Path(out) if out else None
        self.model_onnx = Path(model_onnx) if model_onnx else None
        self.calib_data = Path(calib_data) if calib_data else None
        self.eval_data = Path(eval_data) if eval_data else None
        self.hosts = list(hosts or [])
        self.ssh_config, self.remote_python = ssh_config, remote_python
        self.verify_arm = verify_arm or config.verify_arm or self.profile.verify_arm
        self.verify_arm_asked = verify_arm or config.verify_arm
        self.trust_checkpoint = trust_checkpoint
        self.progress = progress or NullProgress()
        self.teacher_artifact: Artifact | None = None
        self.chance: float | None = None  # what always answering one class scores on the test split (percent)
        if (self.model_onnx is None) != (self.calib_data is None):
            raise BadInputError("--model and --calib-data go together (the ONNX entry needs both)")
        unread = onnx_entry_unread(config) if self.model_onnx is not None else None
        if unread:
            raise BadInputError(f"--model (the ONNX entry) quantizes the given model and trains nothing: {unread} in "
                                "the config is not read; remove it")
        if self.eval_data is not None and self.model_onnx is None:
            raise BadInputError("--eval-data goes with --model and --calib-data (the ONNX entry); a config run takes its "
                                "test split from data:")

    # ---------------------------------------------------------------- run
    def run(self) -> dict:
        """Run every stage and return the report (also written as run_dir/report.json, last)."""
        if self.config.task == "causal-lm" and (self.model_onnx is not None or self.verify_arm):
            if self.model_onnx is not None or self.verify_arm_asked:
                raise BadInputError("task causal-lm takes no --model/--calib-data (ONNX entry) and no --verify-arm yet")
            self.verify_arm = False  # the profile's default ARM check is for image classifiers
        if self.verify_arm:
            # Fail (or build the cached aarch64 sysroot, once) before minutes of training.
            from .bench.emulate import check_profile
            from .bench.sysroot import build_sysroot

            check_profile(self.profile)
            build_sysroot(log=self.progress.note)
        run_dir = self.out or default_run_dir(self.config, self.profile)
        for flag, given in (("--model", self.model_onnx), ("--calib-data", self.calib_data),
                            ("--eval-data", self.eval_data)):
            if given is not None and run_dir.resolve() in given.resolve().parents:
                raise BadInputError(f"{flag} {given} lies inside the run directory {run_dir}, which this run clears and "
                                    "writes; keep its inputs outside it")
        created = not run_dir.exists()
        ensure_writable_dir(run_dir)
        if clear_previous_run(run_dir):  # a new run in the same folder: the old verdict and models no longer hold
            self.progress.note(f"{run_dir}: the previous run's report and models removed (stages/ kept for resuming)")
        elif (run_dir / "report.json").exists():
            (run_dir / "report.json").unlink()
        threads = self.config.bench.threads or self.profile.threads or usable_cores()
        ctx = RunContext(self.config, self.profile, run_dir, self.progress, threads=threads)
        if self.hosts:  # the first board measures what the run decides (precision, pruning allocation)
            ctx.board = (self.hosts[0], self.ssh_config, self.remote_python)
        write_json(run_dir / RUN_MARKER, {"config_key": config_key(self.config, self.profile)})
        torch.set_num_threads(usable_cores())
        try:
            if self.config.task == "causal-lm":
                return self._lm(ctx, created)
            report, chosen = self._onnx_entry(ctx) if self.model_onnx else self._torch_entry(ctx)
        except BadInputError:
            if created:
                shutil.rmtree(run_dir, ignore_errors=True)
            raise
        if self.hosts:
            from .bench.boards import bench_on_boards

            results, teacher_results = bench_on_boards(ctx, chosen.artifact, self.teacher_artifact, self.hosts,
                                                       self.ssh_config, self.remote_python)
            assemble.apply_boards(report, results, teacher_results)
        if self.verify_arm:
            assemble.apply_arm(report, self._verify_arm(ctx, chosen.artifact))
        if self.chance is not None:
            ref, ref_name = reference_accuracy(report)
            check_collapse(ctx, "final", report["final"].get("accuracy"), ref, self.chance, ref_name)
        return assemble.finish(ctx, report, self.hosts)

    def _lm(self, ctx: RunContext, created: bool) -> dict:
        """task causal-lm: its own entry (lm/entry.py), then the same gates and report files."""
        from .lm.entry import run_lm_entry

        return assemble.finish(ctx, run_lm_entry(ctx, self.hosts), self.hosts)

    def _verify_arm(self, ctx: RunContext, artifact: Artifact) -> dict:
        """Evaluate the final artifact on the aarch64 runtime under emulation (accuracy only, never latency)."""
        from .bench.emulate import verify_arm

        with ctx.progress.task("verifying on ARM kernels (emulated)", None):
            return verify_arm(ctx.run_dir, artifact.path, ctx.run_dir / "eval.npz", profile=ctx.profile,
                              threads=ctx.threads)

    # ---------------------------------------------------------------- entries
    def _torch_entry(self, ctx: RunContext) -> tuple[dict, Candidate]:
        cfg = self.config
        splits = build_splits(cfg.data, cfg.seed)
        ctx.splits = splits
        from .distill.teacher import get_teacher

        t0 = time.perf_counter()
        teacher, tinfo = get_teacher(ctx, self.trust_checkpoint)
        teacher_seconds = round(time.perf_counter() - t0, 2)  # training, or loading it from the cache
        run = ctx.run_dir
        eval_x, eval_y = splits.test.x.numpy(), splits.test.y.numpy()
        write_npz(run / "eval.npz", x=eval_x, y=eval_y)
        labels = splits.train.y.numpy()
        calib_ids = stratified_sample(labels, cfg.quantize.calibration_samples, cfg.seed)
        calib_x = splits.train.x[torch.as_tensor(calib_ids)].numpy()
        write_npz(run / "calib.npz", x=calib_x)
        shape = splits.input_shape
        stages: list[dict] = []
        teacher_key = hash_arrays(*[p.detach().numpy() for p in teacher.state_dict().values()
                                    if p.dtype.is_floating_point])
        export_onnx(teacher, shape, run / "teacher.fp32.onnx", self.profile.opset)
        teacher_logits_torch = torch_logits(teacher, eval_x)
        stages.append(assemble.model_entry(ctx, "teacher", teacher, run / "teacher.fp32.onnx", eval_x, eval_y,
                                            extra={"source": tinfo["source"], "duration_s": teacher_seconds}))
        self.chance = chance_of(eval_y, splits.num_classes)

        student_spec = cfg.student.model
        if student_spec == "search":  # which student for this board: timed there, proxy-trained, chosen
            check_teacher(ctx, stages[0]["accuracy"], self.chance)
            student_spec, entry = self._search(ctx, teacher, teacher_key, run / "teacher.fp32.onnx")
            stages.append(entry)
        torch.manual_seed(cfg.seed)
        model = student_from(student_spec, teacher, splits.num_classes)
        if cfg.student.model != "search":  # after the student's name is known to be good
            check_teacher(ctx, stages[0]["accuracy"], self.chance)
        cross_modal = cfg.distill.strategy == "cross_modal"
        if cross_modal:  # the student takes a cheaper sensor's input: its first convolution is built for it
            from .distill.strategies.cross_modal import prepare_student

            transform = prepare_student(ctx, model, shape)
        upstream = ctx.key(teacher_key, student_spec)
        if "distill" in cfg.stages:
            model, entry = self._distill(ctx, teacher, model, teacher_key, student_spec)
            upstream = entry.pop("_key")
            if cross_modal:  # from here on every stage sees the student's input
                eval_x, calib_x, shape = self._student_inputs(ctx, transform, calib_ids)
            stages.append(assemble.model_entry(ctx, "distill", model, ctx.stage_dir("distill") / "model.onnx",
                                                eval_x, eval_y, extra=entry, teacher_logits=teacher_logits_torch))
            check_collapse(ctx, "distill", stages[-1]["accuracy"], stages[0]["accuracy"], self.chance)
        if "prune" in cfg.stages:
            model, entry = self._prune(ctx, teacher, model, upstream)
            stages.append(assemble.model_entry(ctx, "prune", model, ctx.stage_dir("prune") / "model.onnx",
                                                eval_x, eval_y, extra=entry))
            check_collapse(ctx, "prune", stages[-1]["accuracy"], stages[0]["accuracy"], self.chance)
        fp32 = run / "model.fp32.onnx"
        t0 = time.perf_counter()
        export_onnx(model, shape, fp32, self.profile.opset)
        stages.append(self._parity(ctx, model, fp32, eval_x, time.perf_counter() - t0))
        report = assemble.skeleton(ctx, ctx.splits.description, ctx.splits, teacher=assemble.teacher_block(stages[0], tinfo),
                                   data_extra={"chosen_on": f"validation split ({len(splits.val)} images)",
                                               "reported_on": f"test split ({len(splits.test)} images, eval.npz)"})
        final_model_counts = {"params": count_params(model), "macs": count_macs(model, shape)}
        return self._deploy(ctx, report, stages, fp32, eval_x, eval_y, final_model_counts)

    @staticmethod
    def _student_inputs(ctx: RunContext, transform, calib_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray, tuple]:
        """Cross-modal: the splits, eval.npz and calib.npz become the student's view of the same samples."""
        from .data.modality import TransformedImages, transform_splits

        splits = ctx.splits
        ctx.splits = transform_splits(splits, transform)
        eval_x = ctx.splits.test.x.numpy()  # type: ignore[union-attr]
        calib_x = TransformedImages(splits.train.x, transform)[torch.as_tensor(calib_ids)].numpy()  # type: ignore[union-attr]
        write_npz(ctx.run_dir / "eval.npz", x=eval_x, y=ctx.splits.test.y.numpy())
        write_npz(ctx.run_dir / "calib.npz", x=calib_x)
        ctx.notes.append(f"cross_modal: the student takes {transform.describe(splits.input_shape)}; the teacher is "  # type: ignore[union-attr]
                         "measured on its own input in its stage entry, not beside the candidates")
        return eval_x, calib_x, tuple(ctx.splits.input_shape)

    def _onnx_entry(self, ctx: RunContext) -> tuple[dict, Candidate]:
        run = ctx.run_dir
        _, dims = check_onnx_file(self.model_onnx)  # type: ignore[arg-type]
        calib_x, calib_y = load_npz(self.calib_data, "calibration data")  # type: ignore[arg-type]
        if calib_y is not None:
            ctx.notes.append(f"calibration data {self.calib_data}: its labels (y) are not read; calibration needs inputs")
        if calib_x.ndim != len(dims):
            raise BadInputError(f"calibration data {self.calib_data}: array 'x' has rank {calib_x.ndim}; the model's "
                                f"input has rank {len(dims)}")
        for i, d in enumerate(dims[1:], 1):
            if isinstance(d, int) and d > 0 and calib_x.shape[i] != d:
                raise BadInputError(f"calibration data {self.calib_data}: array 'x' has shape {calib_x.shape}; the "
                                    f"model expects {tuple(dims)}")
        eval_x = eval_y = None
        if self.eval_data:
            eval_x, eval_y = load_npz(self.eval_data, "eval data", need_labels=False)
            if eval_x.shape[1:] != calib_x.shape[1:]:
                raise BadInputError(f"eval data {self.eval_data}: 'x' has shape {eval_x.shape}, calibration has "
                                    f"{calib_x.shape}")
            shared = shared_rows(calib_x, eval_x)
            if shared > len(eval_x) // 10:  # accuracy is measured on held-out inputs
                raise BadInputError(f"eval data {self.eval_data}: {shared} of its {len(eval_x)} inputs are also in the "
                                    f"calibration data {self.calib_data}; give inputs held out from calibration")
        from .quantize.onnx_input import MIN_SELECTION, normalise_onnx, split_inputs

        with ctx.progress.task("reading the ONNX model", None):
            onnx_input = normalise_onnx(self.model_onnx, run / "model.fp32.onnx", calib_x[:8],  # type: ignore[arg-type]
                                        ctx.profile.opset)
        check_class_scores(run / "model.fp32.onnx", calib_x[:1], eval_y, f"--model {self.model_onnx}",
                           f"eval data {self.eval_data}")
        # Validation chooses, test reports: a seeded share of the calibration inputs decides the fallback
        # and the precision choice; without eval data another share, never used to choose, is reported.
        cal_ids, sel_ids, rep_ids = split_inputs(len(calib_x), self.config.seed, hold_report=eval_x is None)
        selection_source = (f"{len(sel_ids)} calibration inputs held out from calibration for selection, "
                            "never reported" if len(sel_ids) else
                            f"none: too few calibration inputs to hold {MIN_SELECTION} out for selection (no "
                            "accuracy-aware fallback; give a few hundred)")
        validation = Validation(calib_x[sel_ids], None, selection_source) if len(sel_ids) else None
        if eval_x is None:
            eval_x = calib_x[rep_ids] if len(rep_ids) else calib_x[cal_ids]
            write_npz(run / "eval.npz", x=eval_x)
            eval_source = (f"fidelity to FP32 on {len(rep_ids)} calibration inputs held out from calibration and "
                           "selection" if len(rep_ids) else
                           "fidelity to FP32 on the calibration inputs (too few to hold any out)")
        else:
            write_npz(run / "eval.npz", **({"x": eval_x, "y": eval_y} if eval_y is not None else {"x": eval_x}))
            eval_source = f"eval data {self.eval_data}" + ("" if eval_y is not None else " (no labels: fidelity)")
        q = self.config.quantize
        if "calibration_samples" in q.model_fields_set:  # set in the config: at most that many calibrate
            cal_ids = np.sort(np.random.default_rng(self.config.seed).permutation(cal_ids)[:q.calibration_samples])
        calib_x = calib_x[cal_ids]
        write_npz(run / "calib.npz", x=calib_x)
        report = assemble.skeleton(ctx, f"ONNX entry: {self.model_onnx}", None, teacher=dict(assemble.NO_TEACHER),
                                   data_extra={"calibration_inputs": int(len(calib_x)),
                                               "held_out_for_fidelity": int(len(rep_ids)), "eval": eval_source,
                                               "selection": selection_source, "selection_inputs": int(len(sel_ids)),
                                               "eval_inputs": int(len(eval_x)), "chosen_on": selection_source,
                                               "reported_on": eval_source},
                                   blocks={"onnx_input": onnx_input})
        report, chosen = self._deploy(ctx, report, [], run / "model.fp32.onnx", eval_x, eval_y, assemble.onnx_counts(
            run / "model.fp32.onnx", tuple(eval_x.shape[1:])), validation)
        if eval_y is not None:
            self.chance = chance_of(eval_y, int(eval_y.max()) + 1)
            check_fp32_scores(report, self.chance, f"--model {self.model_onnx}", f"--eval-data {self.eval_data}")
        return report, chosen

    # ---------------------------------------------------------------- stages
    def _search(self, ctx: RunContext, teacher: nn.Module, teacher_key: str, teacher_onnx: Path) -> tuple[str, dict]:
        from .distill.search import run_search, search_key

        key = search_key(ctx, teacher_key)
        hit = ctx.cached("search", key)
        if hit is not None:
            ctx.notes.append("search: resumed from the stored result")
            return hit["chosen"], {**hit, "resumed": True}
        splits = ctx.splits
        spec, entry = run_search(ctx, teacher, teacher_onnx, splits.num_classes, splits.input_shape)  # type: ignore[union-attr]
        ctx.mark_done("search", key, entry)
        return spec, entry

    def _distill(self, ctx: RunContext, teacher: nn.Module, student: nn.Module, teacher_key: str, student_spec: str):
        from .distill.stage import distill_key, run_distill

        key = distill_key(ctx, teacher_key, student_spec)
        hit = ctx.cached("distill", key)
        if hit is not None:
            from .distill.strategies import student_for

            student = student_for(ctx, student)  # a strategy may train another architecture (deit: a ViT)
            student.load_state_dict(torch.load(ctx.stage_dir("distill") / "model.pt", weights_only=True))
            ctx.notes.append("distill: resumed from the stored result")
            return student, {**hit, "_key": key, "resumed": True}
        student, metrics = run_distill(ctx, teacher, student, key)
        ctx.mark_done("distill", key, metrics)
        return student, {**metrics, "_key": key}

    def _prune(self, ctx: RunContext, teacher: nn.Module, model: nn.Module, upstream: str):
        from .prune.stage import run_prune

        return run_prune(ctx, teacher, model, upstream)

    def _parity(self, ctx: RunContext, model: nn.Module, fp32: Path, eval_x: np.ndarray, seconds: float) -> dict:
        ref = torch_logits(model, eval_x)
        got = host_predict(fp32, eval_x, ctx.threads)
        p = parity(ref, got)
        scale = max(1.0, float(np.abs(ref).max()))
        tol = ctx.profile.tolerances
        entry = {"name": "export", "duration_s": round(seconds, 2), "opset": ctx.profile.opset,
                 "parity": {**p, "relative_max_abs_diff": p["max_abs_diff"] / scale,
                            "tolerance": tol.parity_max_abs, "min_agreement": tol.parity_min_agreement}}
        if p["max_abs_diff"] / scale > tol.parity_max_abs or p["top1_agreement"] < tol.parity_min_agreement:
            raise StageError(f"export: ONNX differs from PyTorch beyond the {ctx.profile.name} tolerance "
                             f"(max abs diff {p['max_abs_diff']:.2e}, top-1 agreement {p['top1_agreement']:.2f}%)")
        return entry

    def _deploy(self, ctx: RunContext, report: dict, stages: list[dict], fp32: Path, eval_x: np.ndarray,
                eval_y: np.ndarray | None, counts: dict, validation: Validation | None = None
                ) -> tuple[dict, Candidate]:
        run = ctx.run_dir
        sources: dict[str, Source] = {}
        # A cross-modal teacher takes another input than the candidates: it is not timed beside them.
        has_teacher = (run / "teacher.fp32.onnx").exists() and not self.model_onnx and \
            self.config.distill.strategy != "cross_modal"
        measured_here = ctx.profile.measures_here and not self.hosts
        if validation is None and ctx.splits is not None:
            validation = Validation(ctx.splits.val.x.numpy(), ctx.splits.val.y.numpy(), "validation split")
        if "quantize" in self.config.stages or self.model_onnx:
            from .quantize.stage import run_quantize

            q = run_quantize(ctx, fp32, run / "calib.npz", run / "model.int8.onnx", validation,
                             measured_here or bool(self.hosts))
            q.entry["calibration"] = {**assemble.calibration_info(ctx, run / "calib.npz"),
                                      **q.entry.pop("calibration_plan", {})}
            stages.append(q.entry)
            if "int8" in ctx.profile.precisions:
                sources.update(q.sources)
        sources["fp32"] = Source("fp32", fp32, "FP32")
        if "fp16" in ctx.profile.precisions and ctx.profile.backend != "onnxruntime":
            sources["fp16"] = Source("fp16", fp32, "FP16")
        if has_teacher:
            sources["teacher"] = Source("fp32", run / "teacher.fp32.onnx", "teacher FP32")
        t0 = time.perf_counter()
        cands = compile_all(ctx, sources)
        stages.append({"name": "compile", "duration_s": round(time.perf_counter() - t0, 2),
                       "backend": ctx.profile.backend,
                       "artifacts": {k: str(c.artifact.path.relative_to(run)) for k, c in cands.items() if c.artifact}})
        t0 = time.perf_counter()
        sample = validation.x[:1] if validation is not None else load_npz(run / "calib.npz", "calibration data")[0][:1]
        runners = open_runners(ctx, cands)
        board = self.hosts[0] if self.hosts else None
        try:
            # Validation chooses: the choice reads only figures on the selection data, taken on the board
            # when there is one (--host), else here ...
            if board is not None:
                measure_on_board(ctx, cands, board, validation, self.ssh_config, self.remote_python)
            else:
                select(cands, runners, validation)
                time_all(ctx, cands, runners, sample)
            teacher_c = cands.pop("teacher", None)
            name, why, measured, reasons = choose(ctx, cands, self.config.quantize.max_accuracy_drop,
                                                  measured_here or board is not None, where=board or "this host")
            # ... and test reports: the eval data is read only now, after the choice.
            if teacher_c is not None:
                cands["teacher"] = teacher_c
            measure_all(ctx, cands, runners, eval_x, eval_y)
            if board is None:
                footprint_all(ctx, cands, runners)
            cands.pop("teacher", None)
        finally:
            close_runners(runners)
        stages.append({"name": "bench", "duration_s": round(time.perf_counter() - t0, 2),
                       "threads": ctx.threads, "measured_on": board or "host"})
        assemble.record_choice(ctx, stages, cands, name, why, measured, reasons, validation, where=board)
        assemble.set_stages(report, stages)
        assemble.fill_final(ctx, report, name, cands[name], teacher_c, counts, why, measured, cands.get("fp32"))
        self.teacher_artifact = teacher_c.artifact if teacher_c is not None else None
        return report, cands[name]

