"""Backends by name, imported lazily so a runtime loads only when a target uses it."""
from __future__ import annotations

import importlib

from ..errors import RuntimeMissingError
from .base import Artifact, Backend, Runner

BACKENDS = {
    "onnxruntime": ("edgekd.backends.onnxruntime", "onnxruntime", "the base install (pip install edgekd)"),
    "openvino": ("edgekd.backends.openvino", "openvino", "pip install 'edgekd[openvino]'"),
    "tensorrt": ("edgekd.backends.tensorrt", None, "the board's JetPack (tensorrt Python bindings)"),
}


def get_backend(name: str) -> Backend:
    """The backend called `name`; a missing runtime is a clear error naming what to install."""
    if name not in BACKENDS:
        raise RuntimeMissingError(f"unknown backend {name!r}; known: {', '.join(BACKENDS)}")
    module, runtime, install = BACKENDS[name]
    if runtime is not None:
        try:
            importlib.import_module(runtime)
        except ImportError as e:
            raise RuntimeMissingError(f"backend {name!r} needs the {runtime} package ({e}); install it with "
                                      f"{install}") from None
    return importlib.import_module(module).BACKEND


__all__ = ["Artifact", "Backend", "Runner", "get_backend", "BACKENDS"]
