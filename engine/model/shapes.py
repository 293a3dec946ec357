"""T5 architecture shapes: FLAN-T5's real sizes for demo models, and tiny ones for tests.

A ``T5Shape`` is everything that decides a checkpoint's tensor shapes and its Hugging Face
``config.json``; the converter reads one back from a checkpoint's config (``from_hf_config``), our
decoder from a converted model.bin (``engine.runtime.t5_weights.read_shape``). It is the package's
one T5 configuration type.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from engine.errors import InvalidRequest, ModelError

FeedForward = Literal["gated-gelu", "relu"]
FEED_FORWARDS: tuple[str, ...] = ("gated-gelu", "relu")
T5_VOCAB_SIZE = 32128  # 32000 sentencepiece pieces + 100 sentinels, padded to a multiple of 128


@dataclass(frozen=True)
class T5Shape:
    d_model: int
    d_ff: int
    d_kv: int
    num_heads: int
    num_layers: int  # encoder layers (Hugging Face's name)
    num_decoder_layers: int
    vocab_size: int = T5_VOCAB_SIZE
    feed_forward: FeedForward = "gated-gelu"
    # Original T5 ties lm_head to the embeddings and scales the decoder output by d_model**-0.5;
    # T5 v1.1 / FLAN-T5 / mT5 have their own lm_head.
    tied_embeddings: bool = False
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    layer_norm_epsilon: float = 1e-6

    def __post_init__(self) -> None:
        if self.feed_forward not in FEED_FORWARDS:
            raise InvalidRequest(
                f"feed_forward must be one of {', '.join(FEED_FORWARDS)}, got {self.feed_forward!r}"
            )
        sizes = ("d_model", "d_ff", "d_kv", "num_heads", "num_layers", "num_decoder_layers", "vocab_size")
        for name in sizes:
            if getattr(self, name) < 1:
                raise InvalidRequest(f"{name} must be at least 1, got {getattr(self, name)}")

    @property
    def gated(self) -> bool:
        return self.feed_forward.startswith("gated-")

    @property
    def inner_dim(self) -> int:
        """Width of the attention projections (num_heads * d_kv; not always d_model)."""
        return self.num_heads * self.d_kv

    @property
    def output_scale(self) -> float | None:
        """What the decoder output is multiplied by before a tied lm_head (None: untied)."""
        return self.d_model**-0.5 if self.tied_embeddings else None

    @property
    def family(self) -> str:
        """Manifest family: "t5" for the original layout, "t5-v1.1" for FLAN-T5's."""
        return "t5-v1.1" if self.gated else "t5"

    def to_hf_config(self) -> dict[str, Any]:
        """A Hugging Face ``config.json`` for ``T5ForConditionalGeneration`` with this shape."""
        dense_act_fn = "gelu_new" if self.feed_forward == "gated-gelu" else "relu"
        return {
            "architectures": ["T5ForConditionalGeneration"],
            "model_type": "t5",
            "d_model": self.d_model,
            "d_ff": self.d_ff,
            "d_kv": self.d_kv,
            "num_heads": self.num_heads,
            "num_layers": self.num_layers,
            "num_decoder_layers": self.num_decoder_layers,
            "vocab_size": self.vocab_size,
            "feed_forward_proj": self.feed_forward,
            "dense_act_fn": dense_act_fn,
            "is_gated_act": self.gated,
            "tie_word_embeddings": self.tied_embeddings,
            "relative_attention_num_buckets": self.relative_attention_num_buckets,
            "relative_attention_max_distance": self.relative_attention_max_distance,
            "layer_norm_epsilon": self.layer_norm_epsilon,
            "dropout_rate": 0.1,
            "initializer_factor": 1.0,
            "is_encoder_decoder": True,
            "n_positions": 512,
            "output_past": True,
            "use_cache": True,
            "pad_token_id": 0,
            "eos_token_id": 1,
            "decoder_start_token_id": 0,
            "torch_dtype": "float32",
        }

    @classmethod
    def from_hf_config(cls, config: dict[str, Any]) -> T5Shape:
        """Read a T5 / T5 v1.1 / FLAN-T5 / mT5 ``config.json``; ``ModelError`` naming what is wrong."""
        missing = [
            k for k in ("d_model", "d_ff", "d_kv", "num_heads", "num_layers", "vocab_size") if k not in config
        ]
        if missing:
            raise ModelError(f"config.json lacks {', '.join(missing)}: not a T5 checkpoint config")
        proj = str(config.get("feed_forward_proj", "relu"))
        if proj not in FEED_FORWARDS:
            raise ModelError(
                f"config.json has feed_forward_proj={proj!r}; supported: {', '.join(FEED_FORWARDS)} "
                "(original T5: relu; T5 v1.1, FLAN-T5 and mT5: gated-gelu)"
            )
        try:
            return cls(
                d_model=int(config["d_model"]),
                d_ff=int(config["d_ff"]),
                d_kv=int(config["d_kv"]),
                num_heads=int(config["num_heads"]),
                num_layers=int(config["num_layers"]),
                num_decoder_layers=int(config.get("num_decoder_layers") or config["num_layers"]),
                vocab_size=int(config["vocab_size"]),
                feed_forward=proj,  # type: ignore[arg-type]  # checked against FEED_FORWARDS above
                # Transformers' T5Config defaults tie_word_embeddings to True.
                tied_embeddings=bool(config.get("tie_word_embeddings", True)),
                relative_attention_num_buckets=int(config.get("relative_attention_num_buckets", 32)),
                relative_attention_max_distance=int(config.get("relative_attention_max_distance", 128)),
                layer_norm_epsilon=float(config.get("layer_norm_epsilon", 1e-6)),
            )
        except (TypeError, ValueError, InvalidRequest) as exc:
            raise ModelError(f"config.json has an invalid T5 shape: {exc}") from exc


# FLAN-T5's real shapes (docs/api.md, `engine demo-model`).
PRESETS: dict[str, T5Shape] = {
    "small": T5Shape(d_model=512, d_ff=1024, d_kv=64, num_heads=6, num_layers=8, num_decoder_layers=8),
    "base": T5Shape(d_model=768, d_ff=2048, d_kv=64, num_heads=12, num_layers=12, num_decoder_layers=12),
    "large": T5Shape(d_model=1024, d_ff=2816, d_kv=64, num_heads=16, num_layers=24, num_decoder_layers=24),
}

# Tiny shapes for tests: real 32128 vocabulary, everything else as small as still meaningful.
TINY_FLAN = T5Shape(d_model=64, d_ff=128, d_kv=16, num_heads=4, num_layers=2, num_decoder_layers=2)
TINY_T5 = T5Shape(
    d_model=64,
    d_ff=128,
    d_kv=16,
    num_heads=4,
    num_layers=2,
    num_decoder_layers=2,
    feed_forward="relu",
    tied_embeddings=True,
)


def preset(size: str) -> T5Shape:
    try:
        return PRESETS[size]
    except KeyError:
        raise InvalidRequest(f"unknown model size {size!r}; choose one of {', '.join(PRESETS)}") from None
