"""The base of every config section: unknown keys are errors and a parsed config does not change."""
from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def first_set(cfg: BaseModel, keys: dict[str, tuple[str, ...]]) -> str | None:
    """The first `section.key` of `keys` whose value differs from its default, or None. A key at its default
    is not counted: a saved config, every key written out, loads again."""
    for section, names in keys.items():
        block = getattr(cfg, section)
        default = type(block)()  # defaults as parsed (a sweep's dict becomes its section)
        for name in names:
            if getattr(block, name) != getattr(default, name):
                return f"{section}.{name}"
    return None
