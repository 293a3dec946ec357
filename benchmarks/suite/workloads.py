"""The models and prompts every contender shares.

Models: FLAN-T5-shaped random weights (``build_demo_model``, seed 0), one Hugging Face checkpoint
per shape (what Transformers loads) and its conversions (what CTranslate2 and the server load), so
every contender reads the same weights. Built once under benchmarks/out/models/ and reused: the
small shape's folders are the ones bench_greedy.py builds.

Prompts: distinct lines of the demo corpus, each cut at the first word that makes it reach
``prompt_tokens`` tokens (EOS included), tokenized once with the model's own tokenizer so that the
server (text) and the baselines (ids) see the same input.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from benchmarks.common import OUT_DIR
from benchmarks.suite.matrix import SMOKE_SHAPE

MODELS = OUT_DIR / "models"


@dataclass(frozen=True)
class ModelSet:
    shape: str
    hf_dir: Path
    folders: dict[str, Path]  # quantization -> converted model folder

    def folder(self, quantization: str) -> Path:
        return self.folders[quantization]


def model_root(shape: str, seed: int = 0, models: Path = MODELS) -> Path:
    return models / f"demo-{shape}-seed{seed}"


def ensure_models(shape: str, quantizations: set[str], *, models: Path = MODELS, seed: int = 0) -> ModelSet:
    """The checkpoint of ``shape`` and its conversions under ``models`` (built when missing; about
    a minute for small on 2 cores)."""
    from engine.model.convert import convert_checkpoint
    from engine.model.demo import build_demo_model, write_hf_checkpoint

    base = model_root(shape, seed, models)
    hf = base / "hf"
    folders = {q: base / q for q in sorted(quantizations)}
    if not (hf / "config.json").is_file() or not (hf / "model.safetensors").is_file():
        if shape == SMOKE_SHAPE:
            from engine.model.shapes import TINY_FLAN

            write_hf_checkpoint(hf, TINY_FLAN, seed)
        else:
            first = next(iter(folders.values()))
            build_demo_model(first, size=shape, seed=seed, quantization=first.name, hf_output=hf, force=True)
    for quantization, folder in folders.items():
        if not (folder / "engine.json").is_file():
            convert_checkpoint(
                hf,
                folder,
                quantization=quantization,
                source=f"demo:{shape}:seed={seed}",
                random_weights=True,
                force=True,
            )
    return ModelSet(shape, hf, folders)


@dataclass(frozen=True)
class Prompt:
    text: str
    ids: tuple[int, ...]


def corpus_lines() -> list[str]:
    from benchmarks.bench_greedy import corpus_lines as lines

    return lines()


def make_prompts(model_dir: Path, count: int, tokens: int) -> list[Prompt]:
    """``count`` distinct prompts of ``tokens`` tokens or a few more (a word is not split)."""
    from engine.model.manifest import TOKENIZER_NAME, Manifest
    from engine.model.tokenizer import Tokenizer

    manifest = Manifest.load(model_dir)
    tokenizer = Tokenizer(
        model_dir / TOKENIZER_NAME, eos_id=manifest.eos_token_id, pad_id=manifest.pad_token_id
    )
    words = [w for line in corpus_lines() for w in line.split()]
    prompts: list[Prompt] = []
    start = 0
    while len(prompts) < count:
        # Grow by a guess, then trim word by word: tokenizing the prefix each word is quadratic.
        end = start + tokens
        while end <= len(words) and len(tokenizer.encode(" ".join(words[start:end]))) < tokens:
            end += max(1, tokens // 8)
        if end > len(words):
            raise RuntimeError(f"the demo corpus is too short for {count} prompts of {tokens} tokens")
        while end - start > 1 and len(tokenizer.encode(" ".join(words[start : end - 1]))) >= tokens:
            end -= 1
        text = " ".join(words[start:end])
        prompts.append(Prompt(text, tuple(tokenizer.encode(text))))
        start = end
    return prompts
