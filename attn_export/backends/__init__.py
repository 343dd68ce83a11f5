"""Backends share one interface: run(feeds) -> {output name: array}. Each is imported only when used: torch and
TensorRT are heavy or absent (an edge device has no torch; `serve` and `engine` must not wait for it)."""
from __future__ import annotations

import importlib

from .base import Runner

_LAZY = {"OnnxRuntimeRunner": ".onnxruntime_runner", "TorchRunner": ".torch_runner"}

__all__ = ["Runner", "OnnxRuntimeRunner", "TorchRunner"]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
