"""edgekd: turn a trained PyTorch classifier into a small, fast, accurate model for an edge board."""
from ._version import __version__
from .config import load_config


def __getattr__(name: str):
    if name == "Pipeline":
        from .pipeline import Pipeline

        return Pipeline
    raise AttributeError(name)


__all__ = ["Pipeline", "load_config", "__version__"]
