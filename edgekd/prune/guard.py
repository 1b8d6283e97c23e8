"""The prune stage's accuracy guard: pruning may cost at most `prune.max_accuracy_drop` validation points
against the unpruned model; over it, prune half as far, and failing that keep the unpruned model."""
from __future__ import annotations

from torch import nn

from ..config import PruneConfig
from ..data import ArrayDataset
from ..distill.trainer import accuracy


class AccuracyGuard:
    """Judges each pruned candidate on the validation split (never the test split) against the unpruned
    model's validation accuracy, and keeps the tries for the report."""

    def __init__(self, cfg: PruneConfig, unpruned: nn.Module, val: ArrayDataset):
        self.cfg, self.val = cfg, val
        self.limit = cfg.max_accuracy_drop
        self.unpruned_accuracy = accuracy(unpruned, val) if self.limit is not None else None
        self.tries: list[dict] = []

    def amounts(self) -> list[PruneConfig]:
        """The configured amount, then (guard on, where it can be halved) the gentler one."""
        gentler = self.cfg.gentler() if self.limit is not None else None
        return [self.cfg] + ([gentler] if gentler is not None else [])

    def accept(self, amount: PruneConfig, pruned: nn.Module) -> bool:
        if self.limit is None:
            return True
        acc = accuracy(pruned, self.val)
        drop = self.unpruned_accuracy - acc  # type: ignore[operator]
        kind, value = amount.amount()
        self.tries.append({kind: round(value, 4), "val_accuracy": round(acc, 2), "drop": round(drop, 2),
                           "accepted": drop <= self.limit})
        return drop <= self.limit

    def refusal(self) -> str:
        worst = ", ".join(f"{next(iter(t))} {t[next(iter(t))]}: -{t['drop']:.2f}" for t in self.tries)
        return (f"kept the unpruned model: pruning cost more than prune.max_accuracy_drop {self.limit} points "
                f"of validation accuracy ({worst}; unpruned {self.unpruned_accuracy:.2f}%)")

    def summary(self) -> dict:
        return {"max_accuracy_drop": self.limit, "unpruned_val_accuracy": round(self.unpruned_accuracy or 0.0, 2),
                "chosen_on": "validation split", "tries": self.tries,
                "kept": "pruned" if self.tries and self.tries[-1]["accepted"] else "unpruned"}
