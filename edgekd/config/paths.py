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
    data = raw.get("data")
    if isinstance(data, dict) and not data.get("root"):  # text files and globs, relative to the config file
        def joined(files: Any) -> Any:
            if isinstance(files, str):
                return joined([files])[0]
            if not isinstance(files, list):
                return files
            return [str(base / f) if isinstance(f, str) and f and not f.startswith(("/", "~")) else f for f in files]

        files = data.get("files")
        if isinstance(files, list):
            data["files"] = joined(files)
        elif isinstance(files, dict) and {"train", "validation", "test"} & set(files):  # text splits named
            data["files"] = {k: joined(v) for k, v in files.items()}
    teacher = raw.get("teacher")
    spec = teacher.get("model") if isinstance(teacher, dict) else None
    if isinstance(spec, str) and spec.startswith("gguf:") and not spec[5:].startswith(("/", "~")):
        teacher["model"] = f"gguf:{base / spec[5:]}"
    elif isinstance(spec, str) and spec and ":" not in spec and (base / spec / "config.json").is_file():
        teacher["model"] = str(base / spec)  # a Hugging Face model directory beside the config
    distill = raw.get("distill")
    options = distill.get("strategy_options") if isinstance(distill, dict) else None
    if isinstance(options, dict):
        multi = options.get("multi_teacher")
        for t in (multi.get("teachers") or []) if isinstance(multi, dict) else []:
            fix(t, "checkpoint")
            fix(t, "model", is_model=True)
        fix(options.get("mutual"), "peer", is_model=True)
