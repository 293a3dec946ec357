"""``engine.json``: what a model folder holds, written by ``engine convert`` / ``engine demo-model``.

It is the one place the server reads a model's shape and special ids from; the CTranslate2 model
file holds the weights, ``spiece.model`` the tokenizer.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from engine.errors import ModelError

MANIFEST_NAME = "engine.json"
TOKENIZER_NAME = "spiece.model"
FORMAT_VERSION = 1
QUANTIZATIONS = ("int8", "int8_float32", "int8_float16", "int8_bfloat16", "float16", "bfloat16", "float32")


@dataclass(frozen=True)
class Manifest:
    source: str  # Hub id or local path it was converted from ("demo:small:seed=0" for demo models)
    quantization: str
    family: str  # "t5" (original), "t5-v1.1" (FLAN-T5), "mt5"
    d_model: int
    d_ff: int
    d_kv: int
    num_heads: int
    num_encoder_layers: int
    num_decoder_layers: int
    vocab_size: int
    feed_forward: str  # "relu" or "gated-gelu"
    tied_embeddings: bool  # original T5: lm_head = embeddings, decoder output scaled by d_model**-0.5
    relative_attention_num_buckets: int
    relative_attention_max_distance: int
    layer_norm_epsilon: float
    pad_token_id: int = 0
    eos_token_id: int = 1
    decoder_start_token_id: int = 0
    max_input_length: int = 512
    random_weights: bool = False  # demo models: outputs are not meaningful text
    format_version: int = FORMAT_VERSION

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True) + "\n"

    def save(self, model_dir: str | Path) -> Path:
        path = Path(model_dir) / MANIFEST_NAME
        path.write_text(self.to_json())
        return path

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Manifest:
        names = {f.name for f in fields(cls)}
        missing = [f.name for f in fields(cls) if f.name not in data and f.default is f.default_factory]
        if missing:
            raise ModelError(f"{MANIFEST_NAME} lacks {', '.join(missing)}; re-run `engine convert`")
        return cls(**{k: v for k, v in data.items() if k in names})

    @classmethod
    def load(cls, model_dir: str | Path) -> Manifest:
        path = Path(model_dir) / MANIFEST_NAME
        if not path.is_file():
            raise ModelError(
                f"{path} not found: {model_dir} is not a model folder. Make one with "
                "`engine convert SOURCE --output DIR` or `engine demo-model --output DIR`"
            )
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise ModelError(f"{path} is not valid JSON ({exc}); re-run `engine convert`") from exc
        if not isinstance(data, dict):
            raise ModelError(f"{path} must hold a JSON object; re-run `engine convert`")
        return cls.from_dict(data)
