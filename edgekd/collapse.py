"""No silent collapse: a model that ends near chance, or far below always answering the largest class,
stops the run (StageError, exit 3) unless `allow_collapse: true`, which keeps it with a note. The reference
is the teacher on the torch entry and the given FP32 model on the ONNX entry."""
from __future__ import annotations

import numpy as np

from .context import RunContext
from .errors import BadInputError, StageError

HINTS = {"teacher": "check teacher.model and teacher.checkpoint, or train it (teacher.train_epochs)",
         "distill": "train longer (distill.epochs), try another student.model or a lower distill.temperature",
         "prune": "prune less (prune.ratio or its target) or fine-tune longer (prune.finetune_epochs)",
         "final": "check the distill and prune entries, or try another quantize.method"}


def chance_of(y: np.ndarray, classes: int) -> float:
    """What always answering one class scores (percent): 1/C, or the largest class's share where the labels
    are skewed."""
    y = y[y >= 0]
    return max(100.0 / classes, 100.0 * np.bincount(y).max() / len(y) if len(y) else 0.0)


def check_collapse(ctx: RunContext, stage: str, accuracy: float | None, reference: float | None, chance: float,
                   reference_name: str = "teacher") -> None:
    """Stop the run when `stage`'s model ends near chance on the test split while the reference is well above it,
    or 30 points or more below chance itself (a skewed test split, where chance is the largest class's share).

    Near chance means keeping less than a fifth of the reference's margin over chance, judged only when that
    margin is 30 points or more (a weak reference says little). A share of the margin rather than a fixed
    max(2 x chance, chance + 10 points), which with two classes flags every model below 100% and with three
    every one below 67%. Ten classes and a 99% teacher: below 27.8%; two classes and a 95% teacher: below 59%;
    1000 classes and a 70% teacher: below 14%."""
    if accuracy is None:
        return
    margin = (reference - chance) if reference is not None else 0.0
    near = margin >= 30 and accuracy < chance + margin / 5
    below = accuracy <= chance - 30
    if not (near or below):
        return
    against = f" against the {reference_name}'s {reference:.2f}%" if reference is not None else ""
    what = "ends near chance" if near else "ends far below always answering the largest class"
    _stop(ctx, f"{stage}: the model {what}, {accuracy:.2f}% test accuracy{against} (chance {chance:.2f}%); "
               f"{HINTS[stage]}; allow_collapse: true keeps it")


def check_teacher(ctx: RunContext, accuracy: float | None, chance: float) -> None:
    """A teacher at chance teaches nothing: a wrong checkpoint, or one that never learnt the task."""
    if accuracy is not None and accuracy < chance + 5:
        _stop(ctx, f"teacher: the teacher scores {accuracy:.2f}% on the test split, at chance ({chance:.2f}%), so "
                   f"distilling from it teaches nothing; {HINTS['teacher']}; allow_collapse: true keeps it")


def _stop(ctx: RunContext, msg: str) -> None:
    if not ctx.config.allow_collapse:
        raise StageError(msg)
    ctx.notes.append(msg)
    ctx.progress.note(msg)


def reference_accuracy(report: dict) -> tuple[float | None, str]:
    """What the final model is judged against: the teacher, or on the ONNX entry the given FP32 model."""
    teacher = (report.get("teacher") or {}).get("accuracy")
    if teacher is not None:
        return teacher, "teacher"
    for stage in report.get("stages") or []:
        for cand in stage.get("candidates") or []:
            if cand.get("precision") == "fp32" and cand.get("accuracy") is not None:
                return cand["accuracy"], "FP32 model"
    return None, "teacher"


def check_fp32_scores(report: dict, chance: float, model: str, eval_data: str) -> None:
    """The ONNX entry judges the model's first output: where the given FP32 model scores under half of chance on
    the labelled eval data, that output is not these labels' class scores (a feature output first, another
    label order) or the model is untrained; bad input, exit 2."""
    accuracy, name = reference_accuracy(report)
    if name == "FP32 model" and accuracy is not None and accuracy < chance / 2:
        raise BadInputError(f"{model}: its first output scores {accuracy:.2f}% on {eval_data}, under half of chance "
                            f"({chance:.2f}%): it is not the class scores of these labels (the ONNX entry judges "
                            "the first output: export the logits first) or the model is untrained")
