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
import dataclasses
import json
import shutil
import tempfile
import threading
from pathlib import Path

import ctranslate2
import numpy as np

from engine.model.convert import convert_checkpoint
from engine.model.demo import write_hf_checkpoint
from engine.model.shapes import TINY_FLAN, TINY_T5, T5Shape

SHAPES: dict[str, T5Shape] = {
    "flan": TINY_FLAN,
    "t5": TINY_T5,
    # the attention's width (4 x 64) above d_model and d_ff below it: the decoder's buffers must fit
    # the widest of the three, whichever it is
    "narrow-ff": dataclasses.replace(TINY_FLAN, d_ff=32, d_kv=64),
}

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


def prompts(seed: int, lengths: tuple[int, ...]) -> list[tuple[int, ...]]:
    """Random sentencepiece ids (below the tiny models' real pieces, so CTranslate2's token
    strings are unique) followed by EOS."""
    rng = np.random.default_rng(seed)
    return [(*(int(i) for i in rng.integers(3, 900, size=n)), 1) for n in lengths]


def ct2_greedy(
    model_dir: Path, inputs: list[tuple[int, ...]], max_new: int, device: str = "cpu"
) -> list[list[int]]:
    """CTranslate2's own float32 greedy ids on ``device`` (read from its step callback: exact ids)."""
    vocab = json.loads((model_dir / "shared_vocabulary.json").read_text())
    translator = ctranslate2.Translator(
        str(model_dir), device=device, compute_type="float32", intra_threads=2
    )
    rows: list[list[int]] = [[] for _ in inputs]

    def on_step(step: ctranslate2.GenerationStepResult) -> bool:
        rows[step.batch_id].append(step.token_id)
        return False

    translator.translate_batch(
        [[vocab[i] for i in ids] for ids in inputs],
        beam_size=1,
        max_decoding_length=max_new,
        callback=on_step,
    )
    return [r[: r.index(1)] if 1 in r else r for r in rows]
