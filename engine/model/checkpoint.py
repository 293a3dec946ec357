"""A Hugging Face T5-family checkpoint folder, read without torch or Transformers.

It checks what the converter relies on and says what is wrong in terms of the folder's files:
the config (family and shape), the tokenizer (spiece.model, sentinels, length limit) and where
the weights are (safetensors, sharded or not, or a pytorch_model.bin only).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from engine.errors import ModelError
from engine.model.manifest import TOKENIZER_NAME
from engine.model.safetensors_io import SafetensorsFile
from engine.model.shapes import T5Shape

ARCHITECTURES = {"t5": "T5ForConditionalGeneration", "mt5": "MT5ForConditionalGeneration"}
# Early T5 checkpoints on the Hub name the same model by its old class name.
_LEGACY_ARCHITECTURES = {"T5WithLMHeadModel"}
DEFAULT_MAX_INPUT_LENGTH = 512
# Transformers writes a huge integer as model_max_length when a tokenizer has no limit.
_SANE_MAX_LENGTH = 1_000_000


@dataclass(frozen=True)
class TokenizerInfo:
    spiece: Path
    extra_ids: int  # sentinels <extra_id_N> that T5Tokenizer appends after the pieces
    max_input_length: int


class Weights:
    """Tensors by name across one or several safetensors files."""

    def __init__(self, files: dict[str, SafetensorsFile]) -> None:
        self._by_name = files

    @classmethod
    def open(cls, folder: Path) -> Weights:
        index = folder / "model.safetensors.index.json"
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (OSError, json.JSONDecodeError, KeyError, TypeError) as exc:
                raise ModelError(f"{index} is not a valid safetensors index: {exc}") from exc
            opened: dict[str, SafetensorsFile] = {}
            files: dict[str, SafetensorsFile] = {}
            for name, filename in weight_map.items():
                shard = folder / str(filename)
                if filename not in opened:
                    if not shard.is_file():
                        raise ModelError(f"{index} names {filename}, which is missing from {folder}")
                    opened[filename] = SafetensorsFile(shard)
                files[name] = opened[filename]
            return cls(files)
        single = SafetensorsFile(folder / "model.safetensors")
        return cls({name: single for name in single.names()})

    def __contains__(self, name: object) -> bool:
        return name in self._by_name

    def get(self, name: str, shape: tuple[int, ...]) -> np.ndarray:
        if name not in self._by_name:
            raise ModelError(f"the checkpoint lacks tensor {name!r}; is it a complete T5 checkpoint?")
        found = self._by_name[name].shape(name)
        if found != shape:
            raise ModelError(
                f"tensor {name!r} has shape {list(found)}, but config.json implies {list(shape)}"
            )
        return self._by_name[name].get(name)


@dataclass(frozen=True)
class Checkpoint:
    path: Path
    config: dict[str, Any]
    shape: T5Shape
    family: str  # "t5" (original), "t5-v1.1" (FLAN-T5), "mt5"
    tokenizer: TokenizerInfo
    has_safetensors: bool  # False: only pytorch_model.bin (needs torch to read)
    pad_token_id: int
    eos_token_id: int
    decoder_start_token_id: int

    def weights(self) -> Weights:
        return Weights.open(self.path)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelError(f"{path} is not valid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise ModelError(f"{path} must hold a JSON object")
    return data


def _family(config: dict[str, Any], path: Path) -> str:
    model_type = config.get("model_type")
    archs = config.get("architectures") or []
    if model_type not in ARCHITECTURES:
        raise ModelError(
            f"{path / 'config.json'} describes model_type={model_type!r} (architectures {archs}); "
            "engine converts T5-family encoder-decoders only: original T5, T5 v1.1 / FLAN-T5 "
            "(model_type 't5') and mT5 ('mt5')"
        )
    if archs and not ({ARCHITECTURES[model_type]} | _LEGACY_ARCHITECTURES) & set(archs):
        raise ModelError(
            f"{path / 'config.json'} lists architectures {archs}; engine needs "
            f"{ARCHITECTURES[model_type]} (encoder, decoder and language-model head)"
        )
    if model_type == "mt5":
        return "mt5"
    return "t5-v1.1" if str(config.get("feed_forward_proj", "relu")).startswith("gated-") else "t5"


def _tokenizer_info(path: Path) -> TokenizerInfo:
    spiece = path / TOKENIZER_NAME
    if not spiece.is_file():
        raise ModelError(
            f"{path} has no {TOKENIZER_NAME}: engine needs T5's sentencepiece model file "
            "(the Hub's T5, FLAN-T5 and mT5 repositories all ship one)"
        )
    tok_config_path = path / "tokenizer_config.json"
    tok_config = _read_json(tok_config_path) if tok_config_path.is_file() else {}
    extra_ids = tok_config.get("extra_ids")
    if extra_ids is None:
        # Transformers' T5Tokenizer default; mT5 repositories set 0 in their tokenizer_config.
        extra_ids = 100
    if not isinstance(extra_ids, int) or extra_ids < 0:
        raise ModelError(f"{tok_config_path}: extra_ids must be a non-negative integer, got {extra_ids!r}")
    limit = tok_config.get("model_max_length")
    sane = isinstance(limit, int | float) and 1 <= limit <= _SANE_MAX_LENGTH
    return TokenizerInfo(spiece, extra_ids, int(limit) if sane else DEFAULT_MAX_INPUT_LENGTH)  # type: ignore[arg-type]


def load_checkpoint(folder: str | Path) -> Checkpoint:
    """Check a local checkpoint folder; ``ModelError`` saying what is missing or unsupported."""
    path = Path(folder)
    if not path.exists():
        raise ModelError(f"checkpoint folder {path} does not exist")
    if not path.is_dir():
        raise ModelError(f"{path} is a file; give the checkpoint's folder (with config.json and the weights)")
    config_path = path / "config.json"
    if not config_path.is_file():
        raise ModelError(f"{path} has no config.json: not a Hugging Face checkpoint folder")
    config = _read_json(config_path)
    family = _family(config, path)
    shape = T5Shape.from_hf_config(config)
    has_safetensors = (path / "model.safetensors").is_file() or (
        path / "model.safetensors.index.json"
    ).is_file()
    if not has_safetensors and not (path / "pytorch_model.bin").is_file():
        raise ModelError(
            f"{path} has no weights: expected model.safetensors (or a sharded model.safetensors.index.json) "
            "or pytorch_model.bin"
        )
    ids = {}
    for name, default in (("pad_token_id", 0), ("eos_token_id", 1), ("decoder_start_token_id", 0)):
        value = config.get(name, default)
        if isinstance(value, list):  # generation configs may list several EOS ids; T5 has one
            value = value[0]
        if not isinstance(value, int) or not 0 <= value < shape.vocab_size:
            raise ModelError(
                f"{config_path}: {name}={value!r} is not a token id below vocab_size {shape.vocab_size}"
            )
        ids[name] = value
    return Checkpoint(
        path=path,
        config=config,
        shape=shape,
        family=family,
        tokenizer=_tokenizer_info(path),
        has_safetensors=has_safetensors,
        **ids,
    )
