"""The rest of a T5 layer in the compiled kernel: attention, RMS norm, the feed-forward's activation.

The C side is engine/runtime/_t5ops.c (built into the same extension as the linear kernel, so it is
there exactly when ``qlinear.kernel_available()``, and ``qlinear.use_kernel(False)`` turns both
off). These wrappers check dtypes, shapes and contiguity and allocate the outputs; the numpy code
in engine/runtime/t5_math.py is the reference they are tested against (tests/test_t5ops.py) and the
path taken without the kernel.

Shapes: B sequences, m rows per sequence, H heads, D = d_kv, inner = H * D.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from engine.runtime import qlinear

if TYPE_CHECKING:
    from engine.model.shapes import T5Shape
    from engine.runtime.kv_cache import DecoderCache
    from engine.runtime.t5_weights import DecoderLayer

ACT_RELU, ACT_GELU_TANH = 0, 1
KIND_DECODER_SELF, KIND_CROSS, KIND_ENCODER = 0, 1, 2


def available() -> bool:
    """Whether the fused functions can run: the compiled kernel loaded, is switched on, and was
    built with _t5ops.c (an extension built before it has only the products)."""
    return qlinear._KERNEL is not None and hasattr(qlinear._KERNEL, "attention")


def layers_call_available() -> bool:
    """Whether the kernel runs a decoder step's layers in one call (decoder_plan/decoder_layers: an
    extension built before them has only the functions one by one)."""
    return available() and hasattr(qlinear._KERNEL, "decoder_layers")


def _kernel() -> object:
    if not available():
        status = qlinear.kernel_status() if qlinear._KERNEL is None else "built without _t5ops.c: rebuild it"
        raise RuntimeError(f"the compiled kernel is not in use: {status}")
    return qlinear._KERNEL


def _f32(name: str, a: np.ndarray, ndim: int) -> np.ndarray:
    if a.dtype != np.float32 or a.ndim != ndim:
        raise ValueError(f"{name} must be a {ndim}-D float32 array, got {a.ndim}-D {a.dtype}")
    return np.ascontiguousarray(a)


def rms_norm(x: np.ndarray, gamma: np.ndarray, eps: float) -> np.ndarray:
    """T5LayerNorm: x [R, d] / sqrt(mean(x^2) + eps) * gamma [d]."""
    x, gamma = _f32("x", x, 2), _f32("gamma", gamma, 1)
    out = np.empty_like(x)
    _kernel().rms_norm(x, gamma, out, x.shape[0], x.shape[1], float(eps))  # type: ignore[attr-defined]
    return out


def activation(h: np.ndarray, d_ff: int, *, gated: bool, act: int) -> np.ndarray:
    """h [R, 2 d_ff] (gated: act(h[:, :d_ff]) * h[:, d_ff:]) or [R, d_ff] -> [R, d_ff]."""
    h = _f32("h", h, 2)
    if h.shape[1] != (2 if gated else 1) * d_ff:
        raise ValueError(f"h has {h.shape[1]} columns, expected {(2 if gated else 1) * d_ff}")
    out = np.empty((h.shape[0], d_ff), dtype=np.float32)
    _kernel().activation(h, out, h.shape[0], d_ff, gated, act)  # type: ignore[attr-defined]
    return out


def _attention(
    kind: int,
    q: np.ndarray,
    kv: tuple[np.ndarray, np.ndarray],
    bias: np.ndarray,
    lengths: np.ndarray | None,
    new_kv: tuple[np.ndarray, np.ndarray] | None,
    *,
    rows: tuple[int, int],
    heads: int,
    width: int,
    threads: int,
) -> np.ndarray:
    """The kernel's attention of ``kind`` (see attention_args in _t5ops.c); returns [B*m, inner]."""
    batch, m = rows
    d_kv = q.shape[1] // (heads if kind == KIND_CROSS else 3 * heads)
    out = np.empty((batch * m, heads * d_kv), dtype=np.float32)
    _kernel().attention(  # type: ignore[attr-defined]
        kind,
        _f32("q", q, 2),
        *kv,
        bias,
        None if lengths is None else np.ascontiguousarray(lengths, dtype=np.int64),
        out,
        *(new_kv or (None, None)),
        batch,
        m,
        heads,
        d_kv,
        width,
        bias.shape[0] if kind == KIND_DECODER_SELF else 1,
        threads,
    )
    return out


def decoder_self_attention(
    qkv: np.ndarray,
    cache_k: np.ndarray,
    cache_v: np.ndarray,
    lengths: np.ndarray,
    bias_by_distance: np.ndarray,
    new_k: np.ndarray,
    new_v: np.ndarray,
    *,
    rows: tuple[int, int],
    threads: int,
) -> np.ndarray:
    """One decoder layer's self-attention: qkv [B*m, 3*inner] (the fused projection), this layer's
    cache K/V [B, H, cap, D] with ``lengths[b]`` positions filled, the bias by distance [n, H]
    (n > every length). Writes the new K/V rows into ``new_k``/``new_v`` ([B, m, H, D], contiguous)
    and returns the attention output [B*m, inner] (the output projection's input)."""
    for name, a in (("new_k", new_k), ("new_v", new_v)):  # written in place
        if a.dtype != np.float32 or not a.flags.c_contiguous:
            raise ValueError(f"{name} must be a C-contiguous float32 array")
    kv = (_f32("cache_k", cache_k, 4), _f32("cache_v", cache_v, 4))
    table = _f32("bias_by_distance", bias_by_distance, 2)
    _, heads, cap, _ = cache_k.shape
    return _attention(
        KIND_DECODER_SELF,
        qkv,
        kv,
        table,
        lengths,
        (new_k, new_v),
        rows=rows,
        heads=heads,
        width=cap,
        threads=threads,
    )


def cross_attention(
    q: np.ndarray, cross_k: np.ndarray, cross_v: np.ndarray, bias: np.ndarray, *, m: int, threads: int
) -> np.ndarray:
    """q [B*m, inner] against each sequence's encoder K/V [B, H, S, D]; ``bias`` [B, S] is 0 inside
    the prompt and the mask value beyond. Returns [B*m, inner]."""
    batch, heads, width, _ = cross_k.shape
    kv = (_f32("cross_k", cross_k, 4), _f32("cross_v", cross_v, 4))
    return _attention(
        KIND_CROSS,
        q,
        kv,
        _f32("bias", bias, 2),
        None,
        None,
        rows=(batch, m),
        heads=heads,
        width=width,
        threads=threads,
    )


def encoder_attention(
    qkv: np.ndarray, position_bias: np.ndarray, lengths: np.ndarray, *, batch: int, threads: int
) -> np.ndarray:
    """The encoder's self-attention: qkv [B*S, 3*inner] (prompts right-padded to S),
    ``position_bias`` [H, S, S], keys of prompt b limited to its ``lengths[b]``. Returns [B*S, inner]."""
    heads, width, _ = position_bias.shape
    qkv = _f32("qkv", qkv, 2)
    bias = _f32("position_bias", position_bias, 3)
    return _attention(
        KIND_ENCODER,
        qkv,
        (qkv, qkv),
        bias,
        lengths,
        None,
        rows=(batch, width),
        heads=heads,
        width=width,
        threads=threads,
    )


def decoder_plan(layers: Sequence[DecoderLayer], shape: T5Shape) -> object:
    """A decoder's weights taken once by the kernel for ``decoder_layers`` (every product must run
    on the kernel: ``plan_rows`` says up to how many rows)."""

    def product(w: object) -> tuple[np.ndarray, np.ndarray | None, int, int, int]:
        if not isinstance(w, qlinear.Linear):
            raise TypeError(
                f"decoder_plan needs the kernel's products (qlinear.Linear), got {type(w).__name__}"
            )
        n, k = w.shape
        return (*w.kernel_args(), n, k)

    act = ACT_GELU_TANH if shape.gated else ACT_RELU
    return _kernel().decoder_plan(  # type: ignore[attr-defined]
        [
            (
                product(layer.qkv),
                product(layer.self_out),
                product(layer.cross_q),
                product(layer.cross_out),
                product(layer.ffn.wi),
                product(layer.ffn.wo),
                _f32("gamma", layer.self_norm.gamma, 1),
                _f32("gamma", layer.cross_norm.gamma, 1),
                _f32("gamma", layer.ffn.norm.gamma, 1),
            )
            for layer in layers
        ],
        shape.d_model,
        shape.num_heads,
        shape.d_kv,
        shape.d_ff,
        shape.gated,
        act,
        float(shape.layer_norm_epsilon),
    )


def plan_rows(layers: Sequence[DecoderLayer]) -> int:
    """The most rows ``decoder_layers`` takes: every product's kernel limit (float32 products take
    OpenBLAS beyond qlinear.KERNEL_MAX_ROWS[0], which the plan cannot)."""
    return min(
        qlinear.KERNEL_MAX_ROWS[w.mode]
        for layer in layers
        for w in (layer.qkv, layer.self_out, layer.cross_q, layer.cross_out, layer.ffn.wi, layer.ffn.wo)
        if isinstance(w, qlinear.Linear)
    )


def decoder_layers(
    plan: object,
    x: np.ndarray,
    cache: DecoderCache,
    bias_by_distance: np.ndarray,
    new_k: np.ndarray,
    new_v: np.ndarray,
    *,
    rows: tuple[int, int],
    threads: int,
) -> None:
    """Every decoder layer of a step on x [B*m, d] (float32, C-contiguous, in place), as
    t5_fused.decoder_layer does layer by layer: the cache's self K/V [L, B, H, cap, D] and cross
    K/V [L, B, H, S, D], ``bias_by_distance`` [n, H]; writes each row's new K/V into ``new_k`` /
    ``new_v`` [L, B, m, H, D]."""
    for name, a in (("x", x), ("new_k", new_k), ("new_v", new_v)):  # written in place
        if a.dtype != np.float32 or not a.flags.c_contiguous:
            raise ValueError(f"{name} must be a C-contiguous float32 array")
    batch, m = rows
    _kernel().decoder_layers(  # type: ignore[attr-defined]
        plan,
        x,
        _f32("self_k", cache.self_k, 5),
        _f32("self_v", cache.self_v, 5),
        np.ascontiguousarray(cache.lengths, dtype=np.int64),
        _f32("bias_by_distance", bias_by_distance, 2),
        _f32("cross_k", cache.cross_k, 5),
        _f32("cross_v", cache.cross_v, 5),
        _f32("cross_bias", cache.cross_bias.reshape(batch, -1), 2),
        new_k,
        new_v,
        batch,
        m,
        cache.capacity,
        int(cache.cross_k.shape[3]),
        threads,
    )


def layers_timing(on: bool) -> None:
    """Turn ``decoder_layers``' timers of its parts on or off, and zero their totals: a diagnostic
    for benchmarks/profile_step.py (off, each part costs one untaken branch). The totals are
    process-wide: meant for one decoding thread at a time."""
    _kernel().layers_timing(bool(on))  # type: ignore[attr-defined]


def layers_timing_read() -> dict[str, float]:
    """Seconds spent in each part of ``decoder_layers`` (norms, residual adds, each product,
    self- and cross-attention, the activation) since ``layers_timing`` was last called."""
    parts: dict[str, float] = _kernel().layers_timing_read()  # type: ignore[attr-defined]
    return parts
