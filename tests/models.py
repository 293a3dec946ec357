"""Tiny T5 models for tests, built once per test session (random weights, real 32128 vocabulary).

``hf_checkpoint(kind, seed)`` is a Hugging Face checkpoint folder that Transformers (and the
reference in .venv-ref) loads; ``converted_model(kind, quantization, seed)`` is the same weights
converted by the project's converter into a model folder that ``engine.Engine`` loads.
kind "flan": T5 v1.1 / FLAN-T5 layout (gated GELU, untied lm_head);
kind "t5": original T5 layout (ReLU, lm_head tied to the embeddings, output scaled by d_model**-0.5).

Folders live under one temporary directory per process, removed at exit; treat them as read-only.
"""

from __future__ import annotations

import atexit
import shutil
import tempfile
import threading
from pathlib import Path

from engine.model.convert import convert_checkpoint
from engine.model.demo import write_hf_checkpoint
from engine.model.shapes import TINY_FLAN, TINY_T5, T5Shape

SHAPES: dict[str, T5Shape] = {"flan": TINY_FLAN, "t5": TINY_T5}

_lock = threading.Lock()
_root: Path | None = None


def _cache_dir() -> Path:
    global _root
    if _root is None:
        _root = Path(tempfile.mkdtemp(prefix="engine-test-models-"))
        atexit.register(shutil.rmtree, _root, True)
    return _root


def _shape(kind: str) -> T5Shape:
    if kind not in SHAPES:
        raise ValueError(f"unknown test model kind {kind!r}; choose one of {', '.join(SHAPES)}")
    return SHAPES[kind]


def hf_checkpoint(kind: str = "flan", seed: int = 0) -> Path:
    """A Hugging Face T5 checkpoint folder (config.json, model.safetensors, spiece.model, tokenizer files)."""
    shape = _shape(kind)
    with _lock:
        path = _cache_dir() / f"hf-{kind}-seed{seed}"
        if not (path / "model.safetensors").is_file():
            staging = path.with_name(path.name + ".partial")
            shutil.rmtree(staging, ignore_errors=True)
            write_hf_checkpoint(staging, shape, seed)
            staging.rename(path)
        return path


def converted_model(kind: str = "flan", quantization: str = "float32", seed: int = 0) -> Path:
    """The same weights as ``hf_checkpoint(kind, seed)``, converted to a model folder."""
    source = hf_checkpoint(kind, seed)
    with _lock:
        path = _cache_dir() / f"ct2-{kind}-{quantization}-seed{seed}"
        if not (path / "engine.json").is_file():
            convert_checkpoint(
                source,
                path,
                quantization=quantization,
                source=f"test:{kind}:seed={seed}",
                random_weights=True,
                force=True,
            )
        return path
