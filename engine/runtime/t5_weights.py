"""Reading a converted model (``model.bin``) into the arrays our T5 runtime computes with.

CTranslate2's variable names (docs/contrastive.md, "Reading the converted weights"): self-attention
Q/K/V fused in ``linear_0``; cross-attention Q in ``linear_0``, K/V fused in ``linear_1``; int8
weights with a per-row scale. On CPU each weight matrix becomes a ``qlinear.Linear`` (int8 kept
with its scales for the compiled kernel); on CUDA a dequantized device array in the compute dtype.
The model's shape is read back from the arrays into the package's one ``T5Shape``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import numpy as np

from engine.errors import ModelError
from engine.model.shapes import T5Shape
from engine.model.weights import ModelFile
from engine.runtime.qlinear import Linear

Array = Any  # numpy.ndarray or cupy.ndarray
Weight = Any  # a qlinear.Linear on CPU, a device array [out, in] on CUDA

# CTranslate2's activation ids (ctranslate2/specs/common_spec.py: Activation).
RELU = 0
GELU_TANH = 1


@dataclass(frozen=True)
class Norm:
    gamma: Array  # [d]


@dataclass(frozen=True)
class FeedForward:
    norm: Norm
    wi: Weight  # [2F, d] gated (wi_0 over wi_1) or [F, d]
    wo: Weight  # [d, F]


@dataclass(frozen=True)
class EncoderLayer:
    attn_norm: Norm
    qkv: Weight  # [3 * inner, d]
    out: Weight  # [d, inner]
    ffn: FeedForward


@dataclass(frozen=True)
class DecoderLayer:
    self_norm: Norm
    qkv: Weight  # [3 * inner, d]
    self_out: Weight  # [d, inner]
    cross_norm: Norm
    cross_q: Weight  # [inner, d]
    cross_kv: Weight  # [2 * inner, d]
    cross_out: Weight  # [d, inner]
    ffn: FeedForward


@dataclass(frozen=True)
class T5Weights:
    shape: T5Shape
    embeddings: Array  # [V, d], shared by encoder and decoder inputs
    encoder: list[EncoderLayer]
    encoder_norm: Norm
    encoder_bias_table: np.ndarray  # [num_buckets, H] (host): layer 0's, shared by every layer
    decoder: list[DecoderLayer]
    decoder_norm: Norm
    decoder_bias_table: np.ndarray  # [num_buckets, H] (host)
    lm_head: Weight  # [V, d]


def load_weights(mf: ModelFile, xp: ModuleType, dtype: np.dtype[Any], eps: float) -> T5Weights:
    """Every weight of a T5 ``TransformerSpec`` on ``xp``'s device; ``eps`` is the checkpoint's
    layer_norm_epsilon (engine.json), which model.bin does not hold."""
    if mf.spec_name != "TransformerSpec" or "decoder/layer_0/attention/linear_1/weight" not in mf:
        raise ModelError(f"model.bin holds a {mf.spec_name}, not a T5 encoder-decoder")

    def dev(a: np.ndarray) -> Array:
        return xp.asarray(np.ascontiguousarray(a, dtype=dtype))

    def lin(*names: str, int16_activations: bool = False) -> Weight:
        """The [out, in] weights of ``names`` stacked along out (``int16_activations``: see
        qlinear.Linear.from_stored: the products where int8 activations cost agreement)."""
        stored = [mf.raw(f"{n}/weight") for n in names]
        if xp is np and all(w.dtype == np.int8 for w in stored):
            scales = [mf.scale_of(f"{n}/weight") for n in names]
            if any(sc is None for sc in scales):
                raise ModelError(f"an int8 weight among {names} has no scale")
            return Linear.from_stored(
                np.concatenate(stored),
                np.concatenate([sc for sc in scales if sc is not None]),
                int16_activations=int16_activations,
            )
        dense = np.concatenate([mf.float32(f"{n}/weight") for n in names])
        return Linear.from_stored(dense, None) if xp is np else dev(dense)

    def norm(name: str) -> Norm:
        return Norm(dev(mf.float32(f"{name}/gamma")))

    shape = read_shape(mf, eps)

    def ffn(prefix: str) -> FeedForward:
        if shape.gated:
            wi = lin(f"{prefix}/linear_0", f"{prefix}/linear_0_noact")
        else:
            wi = lin(f"{prefix}/linear_0")
        wo = lin(f"{prefix}/linear_1", int16_activations=prefix.startswith("decoder/"))
        return FeedForward(norm(f"{prefix}/layer_norm"), wi, wo)

    encoder = [
        EncoderLayer(
            attn_norm=norm(f"encoder/layer_{i}/self_attention/layer_norm"),
            qkv=lin(f"encoder/layer_{i}/self_attention/linear_0"),
            out=lin(f"encoder/layer_{i}/self_attention/linear_1"),
            ffn=ffn(f"encoder/layer_{i}/ffn"),
        )
        for i in range(shape.num_layers)
    ]
    decoder = [
        DecoderLayer(
            self_norm=norm(f"decoder/layer_{i}/self_attention/layer_norm"),
            qkv=lin(f"decoder/layer_{i}/self_attention/linear_0"),
            self_out=lin(f"decoder/layer_{i}/self_attention/linear_1"),
            cross_norm=norm(f"decoder/layer_{i}/attention/layer_norm"),
            cross_q=lin(f"decoder/layer_{i}/attention/linear_0"),
            cross_kv=lin(f"decoder/layer_{i}/attention/linear_1"),
            cross_out=lin(f"decoder/layer_{i}/attention/linear_2"),
            ffn=ffn(f"decoder/layer_{i}/ffn"),
        )
        for i in range(shape.num_decoder_layers)
    ]
    embeddings = mf.float32("decoder/embeddings/weight")
    if not np.array_equal(mf.float32("encoder/embeddings_0/weight"), embeddings):
        raise ModelError("encoder and decoder embeddings differ; T5 shares them")
    return T5Weights(
        shape=shape,
        embeddings=dev(embeddings),
        encoder=encoder,
        encoder_norm=norm("encoder/layer_norm"),
        encoder_bias_table=mf.float32("encoder/layer_0/self_attention/relative_attention_bias"),
        decoder=decoder,
        decoder_norm=norm("decoder/layer_norm"),
        decoder_bias_table=mf.float32("decoder/layer_0/self_attention/relative_attention_bias"),
        lm_head=lin("decoder/projection", int16_activations=True),
    )


def read_shape(mf: ModelFile, eps: float) -> T5Shape:
    """The checkpoint's ``T5Shape`` from model.bin's arrays and scalars."""
    embeddings = mf.raw("decoder/embeddings/weight")
    num_heads = int(mf.scalar("decoder/num_heads"))
    inner = mf.raw("decoder/layer_0/attention/linear_0/weight").shape[0]
    gated = "decoder/layer_0/ffn/linear_0_noact/weight" in mf
    activation = int(mf.scalar("decoder/activation"))
    if (gated, activation) not in ((True, GELU_TANH), (False, RELU)):
        raise ModelError(
            f"a {'gated' if gated else 'plain'} feed-forward with activation id {activation} is not "
            "supported by our decoder (T5 uses relu, FLAN-T5 gated gelu_new)"
        )
    scale = float(mf.scalar("decoder/scale_outputs")) if "decoder/scale_outputs" in mf else None
    shape = T5Shape(
        d_model=int(embeddings.shape[1]),
        d_ff=int(mf.raw("decoder/layer_0/ffn/linear_1/weight").shape[1]),
        d_kv=inner // num_heads,
        num_heads=num_heads,
        num_layers=_count_layers(mf, "encoder"),
        num_decoder_layers=_count_layers(mf, "decoder"),
        vocab_size=int(embeddings.shape[0]),
        feed_forward="gated-gelu" if gated else "relu",
        tied_embeddings=scale is not None,
        relative_attention_num_buckets=int(
            mf.raw("decoder/layer_0/self_attention/relative_attention_bias").shape[0]
        ),
        relative_attention_max_distance=int(
            mf.scalar("decoder/layer_0/self_attention/relative_attention_max_distance")
        ),
        layer_norm_epsilon=eps,
    )
    if scale is not None and not math.isclose(scale, shape.d_model**-0.5, rel_tol=1e-6):
        raise ModelError(f"model.bin scales the decoder output by {scale}, not d_model**-0.5 as T5 does")
    return shape


def _count_layers(mf: ModelFile, stack: str) -> int:
    n = 0
    while f"{stack}/layer_{n}/ffn/linear_1/weight" in mf:
        n += 1
    if n == 0:
        raise ModelError(f"model.bin has no {stack} layers")
    return n
