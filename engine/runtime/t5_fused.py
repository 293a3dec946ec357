"""The T5 forward pass on the compiled kernel's fused functions (t5ops.py): CPU, float32 activations.

The same functions as t5_math.py, which stays the reference and the path everywhere else (CUDA,
no kernel, ``T5Runtime.use_fused(False)``); tests/test_t5ops.py holds the two equal within float32
rounding and to the same ids. What differs is the number of calls: a decoder layer here is a norm,
a product and one attention call per attention block, and a norm, two products and one activation
call for the feed-forward, with the residual adds in place, about fifteen calls where numpy took
about sixty (attention alone was scores, bias, max, exp, sums, values and transposes per block).
The attention writes its output straight in the [rows, H*D] layout the output projection reads.
A decoder step runs those calls for every layer in one kernel call (``DecoderPlan``,
t5ops.decoder_layers: the same functions in the same order, the same bits): from Python they
cost about 300 us of a 1.1 ms batch-1 step (benchmarks/bench_layers_call.py).
"""

from __future__ import annotations

import numpy as np

from engine.runtime import t5ops
from engine.runtime.kv_cache import DecoderCache, StepOutput
from engine.runtime.t5_math import ArrayMatmul, Compute
from engine.runtime.t5_weights import DecoderLayer, EncoderLayer, FeedForward, T5Weights


def _threads(c: Compute) -> int:
    return c.mm.threads if isinstance(c.mm, ArrayMatmul) else 1


def rms_norm(c: Compute, x: np.ndarray, gamma: np.ndarray) -> np.ndarray:
    return t5ops.rms_norm(x, gamma, c.shape.layer_norm_epsilon)


def feed_forward(c: Compute, x: np.ndarray, ffn: FeedForward) -> np.ndarray:
    """As t5_math.feed_forward: gated-GELU (FLAN-T5) or ReLU (T5)."""
    h = c.mm.linear(rms_norm(c, x, ffn.norm.gamma), ffn.wi)
    act = t5ops.ACT_GELU_TANH if c.shape.gated else t5ops.ACT_RELU
    return c.mm.linear(t5ops.activation(h, c.shape.d_ff, gated=c.shape.gated, act=act), ffn.wo)


def encoder_layer(
    c: Compute, x: np.ndarray, layer: EncoderLayer, position_bias: np.ndarray, lengths: np.ndarray
) -> np.ndarray:
    """x [B*S, d] in place; ``position_bias`` [H, S, S], prompt b's keys limited to ``lengths[b]``."""
    qkv = c.mm.linear(rms_norm(c, x, layer.attn_norm.gamma), layer.qkv)
    attn = t5ops.encoder_attention(qkv, position_bias, lengths, batch=len(lengths), threads=_threads(c))
    x += c.mm.linear(attn, layer.out)
    x += feed_forward(c, x, layer.ffn)
    return x


def encoder(
    c: Compute, w: T5Weights, ids: np.ndarray, position_bias: np.ndarray, lengths: np.ndarray
) -> np.ndarray:
    """Token ids [B*S] (right-padded) -> the encoder's final-norm output [B*S, d]."""
    x = w.embeddings[ids]  # a copy: updated in place below
    for layer in w.encoder:
        x = encoder_layer(c, x, layer, position_bias, lengths)
    return rms_norm(c, x, w.encoder_norm.gamma)


def decoder_layer(
    c: Compute,
    x: np.ndarray,
    layer: DecoderLayer,
    i: int,
    cache: DecoderCache,
    new_kv: tuple[np.ndarray, np.ndarray],
    bias_by_distance: np.ndarray,
    rows: tuple[int, int],
) -> np.ndarray:
    """x [B*m, d] in place: self-attention over the cached past plus each row's own new key (its
    K/V written into ``new_kv``, layer i's [B, m, H, D]), cross-attention, feed-forward."""
    threads = _threads(c)
    qkv = c.mm.linear(rms_norm(c, x, layer.self_norm.gamma), layer.qkv)
    attn = t5ops.decoder_self_attention(
        qkv,
        cache.self_k[i],
        cache.self_v[i],
        cache.lengths,
        bias_by_distance,
        *new_kv,
        rows=rows,
        threads=threads,
    )
    x += c.mm.linear(attn, layer.self_out)
    q = c.mm.linear(rms_norm(c, x, layer.cross_norm.gamma), layer.cross_q)
    cross_bias = cache.cross_bias.reshape(len(cache), -1)  # [B, S]
    attn = t5ops.cross_attention(
        q, cache.cross_k[i], cache.cross_v[i], cross_bias, m=rows[1], threads=threads
    )
    x += c.mm.linear(attn, layer.cross_out)
    x += feed_forward(c, x, layer.ffn)
    return x


class DecoderPlan:
    """The decoder's weights taken once by the kernel (t5ops.decoder_plan), so that a step runs
    every layer in one call (t5ops.decoder_layers) instead of about fifteen calls a layer from
    Python; for steps of at most ``max_rows`` rows."""

    def __init__(self, w: T5Weights) -> None:
        self.handle = t5ops.decoder_plan(w.decoder, w.shape)
        self.max_rows = t5ops.plan_rows(w.decoder)


def decoder_step(
    c: Compute,
    w: T5Weights,
    cache: DecoderCache,
    token_ids: np.ndarray,
    rows: tuple[int, int],
    bias_by_distance: np.ndarray,
    plan: DecoderPlan | None = None,
) -> StepOutput:
    """As t5_math.decoder_step; the self-attention bias comes from ``bias_by_distance`` [n, H]
    (n above every cached length) inside the kernel instead of a [B, H, 1, T] array. With a
    ``plan`` (and rows within its limit) the layers run in one kernel call: the same functions
    in the same order, so the same bits as layer by layer (tests/test_t5ops.py)."""
    s = c.shape
    batch, m = rows
    x = w.embeddings[token_ids]  # [B*m, d], a copy
    new_k = np.empty((len(w.decoder), batch, m, s.num_heads, s.d_kv), dtype=np.float32)
    new_v = np.empty_like(new_k)
    table = np.ascontiguousarray(bias_by_distance, dtype=np.float32)
    if plan is not None and batch * m <= plan.max_rows:
        x = np.ascontiguousarray(x, dtype=np.float32)
        t5ops.decoder_layers(plan.handle, x, cache, table, new_k, new_v, rows=rows, threads=_threads(c))
    else:
        for i, layer in enumerate(w.decoder):
            x = decoder_layer(c, x, layer, i, cache, (new_k[i], new_v[i]), table, rows)
    hidden = rms_norm(c, x, w.decoder_norm.gamma).reshape(batch, m, s.d_model)
    unit = hidden / np.sqrt(np.square(hidden).sum(axis=-1, keepdims=True))
    return StepOutput(hidden, unit, new_k, new_v)
