"""Temperature/alpha search: each grid point trains a copy of the student for a short budget from the
same initial weights (sharing the teacher-logit cache) and is scored on the validation split; the best
point is used for the full run."""
from __future__ import annotations

import copy
import itertools
from collections.abc import Callable, Mapping, Sequence

from torch import nn

from .trainer import TrainResult

SCORE = "best validation accuracy (PyTorch, percent) within the sweep budget; ties go to the lower validation loss"


def sweep_grid(sweep: Mapping[str, Sequence[float]], temperature: float, alpha: float) -> list[tuple[float, float]]:
    """(temperature, alpha) points: the product of the listed values; a key not listed keeps its config value."""
    temps = [float(t) for t in sweep.get("temperature", [temperature])]
    alphas = [float(a) for a in sweep.get("alpha", [alpha])]
    return list(itertools.product(temps, alphas))


def run_sweep(student: nn.Module, fit: Callable[[nn.Module, float, float], TrainResult],
              grid: Sequence[tuple[float, float]], epochs: int) -> dict:
    """Train a fresh copy of `student` with `fit(model, temperature, alpha)` at each grid point.

    Returns the report's `sweep` block: {grid: [{temperature, alpha, score, val_loss, steps}],
    best: {temperature, alpha, score}, epochs, score}. `student` itself is left untouched."""
    rows = []
    for temperature, alpha in grid:
        model = copy.deepcopy(student)
        res = fit(model, temperature, alpha)
        rows.append({"temperature": temperature, "alpha": alpha, "score": round(res.val_accuracy, 4),
                     "val_loss": round(res.val_loss, 5), "steps": res.steps})
    best = max(rows, key=lambda r: (r["score"], -r["val_loss"]))
    return {"grid": rows, "best": {k: best[k] for k in ("temperature", "alpha", "score")},
            "epochs": epochs, "score": SCORE}
