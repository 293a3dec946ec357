"""FLAN-T5 inference engine. ``from engine import Engine`` is the Python API (docs/api.md)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from engine.runtime.engine import Engine
    from engine.runtime.result import Result, Usage

__all__ = ["Engine", "Result", "Usage"]


def __getattr__(name: str) -> Any:
    # Lazy, so that `engine --help` and the API process do not pay for ctranslate2's import.
    if name == "Engine":
        from engine.runtime.engine import Engine

        return Engine
    if name in ("Result", "Usage"):
        from engine.runtime import result

        return getattr(result, name)
    raise AttributeError(name)
