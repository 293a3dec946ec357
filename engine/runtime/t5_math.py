"""The T5 forward pass as small plain functions over an array module (numpy on CPU, CuPy on CUDA).

Follows Hugging Face's T5 exactly: pre-norm RMSNorm without mean or bias, attention without the
1/sqrt(d) scaling, relative position buckets computed in layer 0 and shared by every layer, no
position bias in cross-attention, gated-GELU (tanh) or ReLU feed-forward, and for tied embeddings
the decoder output scaled by d_model**-0.5 before the lm_head.

Every product goes through the ``Matmul`` passed in (``c.mm``): ``ArrayMatmul`` (the compiled
kernel or BLAS for weights on CPU, the array module's matmul otherwise), or cuBLAS called directly
while a CUDA graph is captured (engine/runtime/cuda_graphs.py).

Shapes: B sequences, m rows per sequence (contrastive candidates), H heads, D = d_kv, T cached
decoder positions, S encoder positions, d = d_model, F = d_ff, V = vocabulary.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from types import ModuleType
from typing import Any, Protocol

import numpy as np

from engine.model.shapes import T5Shape
from engine.runtime.kv_cache import Array, DecoderCache, StepOutput
from engine.runtime.qlinear import Linear
from engine.runtime.t5_weights import DecoderLayer, EncoderLayer, FeedForward, T5Weights, Weight


class Matmul(Protocol):
    def linear(self, x: Array, weight: Weight) -> Array:
        """x [R, in] times weight [out, in] (CTranslate2's layout) -> [R, out]."""
        ...

    def matmul(self, a: Array, b: Array, transpose_b: bool = False) -> Array:
        """a @ b (or a @ b^T) over the leading batch dimensions."""
        ...


@dataclass
class ArrayMatmul:
    """Products on the array module: a CPU ``Linear`` runs the compiled small-batch kernel or
    OpenBLAS (qlinear.py) with ``threads``; device arrays multiply with ``xp.matmul``."""

    xp: ModuleType
    threads: int = 1

    def linear(self, x: Array, weight: Weight) -> Array:
        if isinstance(weight, Linear):
            return weight(x, self.threads)
        return x @ weight.T

    def matmul(self, a: Array, b: Array, transpose_b: bool = False) -> Array:
        return self.xp.matmul(a, b.swapaxes(-1, -2) if transpose_b else b)


@dataclass(frozen=True)
class Compute:
    """What every function below computes with: the array module, its dtype, the products."""

    xp: ModuleType
    dtype: np.dtype[Any]
    mm: Matmul
    shape: T5Shape


def relative_position_bucket(
    relative_position: np.ndarray, *, bidirectional: bool, num_buckets: int, max_distance: int
) -> np.ndarray:
    """Hugging Face's ``T5Attention._relative_position_bucket``, float32 arithmetic included (the
    log is taken in float32 there, and a different precision moves some bucket boundaries)."""
    rel = relative_position.astype(np.int64)
    buckets = np.zeros_like(rel)
    if bidirectional:
        num_buckets //= 2
        buckets += (rel > 0).astype(np.int64) * num_buckets
        rel = np.abs(rel)
    else:
        rel = -np.minimum(rel, 0)
    max_exact = num_buckets // 2
    is_small = rel < max_exact
    with np.errstate(divide="ignore"):
        scaled = (
            np.log(rel.astype(np.float32) / np.float32(max_exact))
            / np.float32(math.log(max_distance / max_exact))
            * np.float32(num_buckets - max_exact)
        )
    # torch's .to(long) truncates toward zero; log(0) = -inf only occurs where is_small anyway.
    large = max_exact + np.where(is_small, 0, np.trunc(scaled)).astype(np.int64)
    large = np.minimum(large, num_buckets - 1)
    return buckets + np.where(is_small, rel, large)


def rms_norm(c: Compute, x: Array, gamma: Array) -> Array:
    """x [R, d] / sqrt(mean(x^2) + eps) * gamma [d], without mean subtraction or bias."""
    xp = c.xp
    if xp is np:
        # np.mean's own arithmetic (the same pairwise sum, then a division by the count)
        # without its Python wrapper: 24 calls a step, about 4% of a batch-1 run.
        var = np.square(x).sum(axis=-1, keepdims=True)
        var /= x.shape[-1]
    else:
        var = xp.mean(xp.square(x), axis=-1, keepdims=True)
    return (x / xp.sqrt(var + c.shape.layer_norm_epsilon)) * gamma


def activation(c: Compute, x: Array) -> Array:
    """ReLU (T5) or gelu_new (FLAN-T5's gated feed-forward), into a new array (``x`` may be a view)."""
    xp = c.xp
    if not c.shape.gated:
        return xp.maximum(x, 0)
    # gelu_new, Hugging Face's NewGELUActivation: 0.5 x (1 + tanh(c (x + 0.044715 x^3))), in
    # place on one temporary (torch's pow(x, 3.0) is x * x * x; the 0.5 is an exact scaling).
    t = x * x
    t *= x
    t *= c.dtype.type(0.044715)
    t += x
    t *= c.dtype.type(math.sqrt(2.0 / math.pi))
    xp.tanh(t, out=t)
    t += 1.0
    t *= x
    t *= 0.5
    return t


def feed_forward(c: Compute, x: Array, ffn: FeedForward) -> Array:
    """x [R, d] -> [R, d]: norm, wi, activation (times the linear half when gated), wo."""
    h = c.mm.linear(rms_norm(c, x, ffn.norm.gamma), ffn.wi)  # [R, 2F] or [R, F]
    if c.shape.gated:
        f = c.shape.d_ff
        h = activation(c, h[..., :f]) * h[..., f:]
    else:
        h = activation(c, h)
    return c.mm.linear(h, ffn.wo)


def softmax_(c: Compute, scores: Array) -> Array:
    """Softmax over the last axis, in place."""
    scores -= scores.max(axis=-1, keepdims=True)
    c.xp.exp(scores, out=scores)
    scores /= scores.sum(axis=-1, keepdims=True)
    return scores


# ---------------------------------------------------------------------- encoder
def encoder_layer(c: Compute, x: Array, layer: EncoderLayer, bias: Array, batch: int, n: int) -> Array:
    """x [B*S, d] -> [B*S, d]; ``bias`` [B, H, S, S] is the position bias plus the padding mask."""
    h, d = c.shape.num_heads, c.shape.d_kv
    qkv = (
        c.mm.linear(rms_norm(c, x, layer.attn_norm.gamma), layer.qkv)
        .reshape(batch, n, 3, h, d)
        .transpose(2, 0, 3, 1, 4)
    )  # [3, B, H, S, D]
    scores = c.mm.matmul(qkv[0], qkv[1], transpose_b=True)  # [B, H, S, S]
    scores += bias
    attn = c.mm.matmul(softmax_(c, scores), qkv[2])  # [B, H, S, D]
    x = x + c.mm.linear(attn.transpose(0, 2, 1, 3).reshape(batch * n, h * d), layer.out)
    return x + feed_forward(c, x, layer.ffn)


def encoder(c: Compute, w: T5Weights, ids: Array, bias: Array, batch: int, n: int) -> Array:
    """Token ids [B*S] -> the encoder's final-norm output [B*S, d]."""
    x = w.embeddings[ids]  # [B*S, d]
    for layer in w.encoder:
        x = encoder_layer(c, x, layer, bias, batch, n)
    return rms_norm(c, x, w.encoder_norm.gamma)


def cross_kv(c: Compute, w: T5Weights, enc: Array, batch: int, n: int) -> Array:
    """Every decoder layer's cross-attention K/V of the encoder output [B*S, d]: [2, B, L, H, S, D]."""
    h, d = c.shape.num_heads, c.shape.d_kv
    kv = c.xp.stack([c.mm.linear(enc, layer.cross_kv) for layer in w.decoder])  # [L, B*S, 2*inner]
    return kv.reshape(len(w.decoder), batch, n, 2, h, d).transpose(3, 1, 0, 4, 2, 5)


# ---------------------------------------------------------------------- decoder
def self_attention(
    c: Compute,
    x: Array,
    layer: DecoderLayer,
    past_k: Array,
    past_v: Array,
    new_k: Array,
    new_v: Array,
    past_bias: Array,
    own_bias: Array,
    width: int,
) -> Array:
    """x [B*m, d] -> [B*m, d]. Each row attends to its sequence's cached past ``past_k/v``
    [B, H, Tcap, D] (positions 0..width-1, the bias masking unfilled ones) plus its own new key;
    writes its new K/V into ``new_k/v`` [B, m, H, D]."""
    xp = c.xp
    batch, m, h, d = new_k.shape
    qkv = c.mm.linear(rms_norm(c, x, layer.self_norm.gamma), layer.qkv).reshape(batch, m, 3, h, d)
    new_k[...] = qkv[:, :, 1]
    new_v[...] = qkv[:, :, 2]
    q = qkv[:, :, 0].transpose(0, 2, 1, 3)  # [B, H, m, D]
    k_own = new_k.transpose(0, 2, 1, 3)
    v_own = new_v.transpose(0, 2, 1, 3)
    own = (q * k_own).sum(axis=-1, keepdims=True) + own_bias  # [B, H, m, 1]
    if width:
        # Softmax over [past keys, own key] without concatenating them.
        past = c.mm.matmul(q, past_k[:, :, :width], transpose_b=True)  # [B, H, m, T]
        past += past_bias
        top = xp.maximum(past.max(axis=-1, keepdims=True), own)
        past -= top
        xp.exp(past, out=past)
        own = xp.exp(own - top)
        denom = past.sum(axis=-1, keepdims=True) + own
        attn = c.mm.matmul(past, past_v[:, :, :width]) + own * v_own  # [B, H, m, D]
        attn /= denom
    else:
        attn = v_own  # a lone key: softmax weight 1
    return c.mm.linear(attn.transpose(0, 2, 1, 3).reshape(batch * m, h * d), layer.self_out)


def cross_attention(
    c: Compute, x: Array, layer: DecoderLayer, cross_k: Array, cross_v: Array, cross_bias: Array, m: int
) -> Array:
    """x [B*m, d] -> [B*m, d] over the prompt's K/V [B, H, S, D], ``cross_bias`` [B, 1, 1, S]
    masking each prompt's padding."""
    batch, h, _, d = cross_k.shape
    q = (
        c.mm.linear(rms_norm(c, x, layer.cross_norm.gamma), layer.cross_q)
        .reshape(batch, m, h, d)
        .transpose(0, 2, 1, 3)
    )  # [B, H, m, D]
    scores = c.mm.matmul(q, cross_k, transpose_b=True)  # [B, H, m, S]
    scores += cross_bias
    attn = c.mm.matmul(softmax_(c, scores), cross_v)  # [B, H, m, D]
    return c.mm.linear(attn.transpose(0, 2, 1, 3).reshape(batch * m, h * d), layer.cross_out)


def decoder_step(
    c: Compute,
    w: T5Weights,
    cache: DecoderCache,
    token_ids: Array,
    rows: tuple[int, int],
    past_bias: Array,
    own_bias: Array,
    width: int,
) -> StepOutput:
    """One step for token ids [B*m] at each sequence's next position: past bias [B, H, 1, width],
    own bias [H, 1, 1]. The cache is read, not written (``DecoderCache.commit`` keeps the chosen rows)."""
    xp, s = c.xp, c.shape
    batch, m = rows
    x = w.embeddings[token_ids]  # [B*m, d]
    new_k = xp.empty((len(w.decoder), batch, m, s.num_heads, s.d_kv), dtype=c.dtype)  # [L, B, m, H, D]
    new_v = xp.empty_like(new_k)
    for i, layer in enumerate(w.decoder):
        x = x + self_attention(
            c, x, layer, cache.self_k[i], cache.self_v[i], new_k[i], new_v[i], past_bias, own_bias, width
        )
        x = x + cross_attention(c, x, layer, cache.cross_k[i], cache.cross_v[i], cache.cross_bias, m)
        x = x + feed_forward(c, x, layer.ffn)
    hidden = rms_norm(c, x, w.decoder_norm.gamma).reshape(batch, m, s.d_model)  # [B, m, d]
    unit = hidden / xp.sqrt(xp.square(hidden).sum(axis=-1, keepdims=True))
    return StepOutput(hidden, unit, new_k, new_v)


def logits(c: Compute, w: T5Weights, hidden: Array) -> Array:
    """lm_head on final-norm hidden states [R, d] -> [R, V]."""
    scale = c.shape.output_scale
    if scale is not None:
        hidden = hidden * c.dtype.type(scale)
    return c.mm.linear(hidden, w.lm_head)
