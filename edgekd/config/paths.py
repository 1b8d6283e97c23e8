"""Relative paths in a config file are relative to that file: which keys hold paths, and the joining."""
from __future__ import annotations

from pathlib import Path
from typing import Any


def _relative_to(base: Path, val: Any, is_model: bool) -> Any:
    """`val` joined to `base` when it is a relative file path (model specs: only .pt/.pth/.py files)."""
    if not isinstance(val, str) or not val or val.startswith(("torchvision:", "edgekd:", "/")) or ":" in val:
        return val
    if is_model and not val.endswith((".pt", ".pth", ".py")):
        return val
    return str(base / val)


def resolve_paths(raw: dict[str, Any], base: Path) -> None:
    """Relative paths in a config are relative to the config file: data roots, checkpoints, model files,
    the gate baseline, and the extra teachers and peer of the distillation strategies."""
    def fix(section: Any, key: str, is_model: bool = False) -> None:
        if isinstance(section, dict) and key in section:
            section[key] = _relative_to(base, section[key], is_model)

    for sect, key in (("data", "root"), ("data", "unlabeled_root"), ("teacher", "checkpoint"), ("gates", "baseline")):
        if isinstance(raw.get(sect), dict):
            raw[sect] = dict(raw[sect])
            fix(raw[sect], key)
    for sect in ("teacher", "student"):
        if isinstance(raw.get(sect), dict):
            raw[sect] = dict(raw[sect])
            fix(raw[sect], "model", is_model=True)
    distill = raw.get("distill")
    options = distill.get("strategy_options") if isinstance(distill, dict) else None
    if isinstance(options, dict):
        multi = options.get("multi_teacher")
        for t in (multi.get("teachers") or []) if isinstance(multi, dict) else []:
            fix(t, "checkpoint")
            fix(t, "model", is_model=True)
        fix(options.get("mutual"), "peer", is_model=True)
