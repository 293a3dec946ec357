"""The array module our T5 runtime is written over: numpy on CPU, CuPy on CUDA.

The runtime code uses only operations that both modules share (``matmul`` with ``out=``,
``exp``, ``tanh``, ``argmax`` ...), so one implementation runs on either device.
"""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import Any

import numpy as np

from engine.errors import InvalidRequest, ModelError

DEVICES = ("cpu", "cuda")


def array_module(device: str) -> ModuleType:
    """numpy for ``cpu``; CuPy for ``cuda`` (the optional ``cuda`` extra) with a clear error without it."""
    if device == "cpu":
        return np
    if device == "cuda":
        try:
            cupy = importlib.import_module("cupy")
        except ImportError as exc:
            raise ModelError(
                "contrastive search on CUDA needs CuPy, which is not installed: "
                "`pip install flan-t5-engine[cuda]` (cupy-cuda12x) or use --device cpu"
            ) from exc
        try:
            if cupy.cuda.runtime.getDeviceCount() < 1:
                raise ModelError("CuPy is installed but sees no CUDA device; use --device cpu")
        except cupy.cuda.runtime.CUDARuntimeError as exc:
            raise ModelError(f"CuPy cannot reach a CUDA device ({exc}); use --device cpu") from exc
        return cupy
    raise InvalidRequest(f"device must be one of {', '.join(DEVICES)}, got {device!r}")


def to_numpy(array: Any) -> np.ndarray:
    """A host copy (no copy for numpy arrays)."""
    if isinstance(array, np.ndarray):
        return array
    return np.asarray(array.get())
