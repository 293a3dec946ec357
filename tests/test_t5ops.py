"""The fused layer functions (engine/runtime/_t5ops.c via t5ops.py) against numpy.

Each function against a float64 numpy formula; then whole runtimes, the fused path (t5_fused.py)
against the numpy path (t5_math.py, the reference) on the tiny test models: encoder outputs and
decoder steps within float32 rounding, and the same contrastive and greedy ids.

Tolerances: float32 sums in another order and a polynomial exp within ~2 ulp give errors of a few
1e-7 of the largest value per operation.
"""

from __future__ import annotations

import dataclasses
import math
import time

import numpy as np
import pytest

from engine.runtime import qlinear, t5ops
from engine.runtime.decoder_batch import run_on_decoder
from engine.runtime.kv_cache import StepOutput
from engine.runtime.kv_cache import mask_value as _mask_value
from engine.runtime.params import DecodingParams
from engine.runtime.result import GenerationRequest
from engine.runtime.t5 import T5Runtime
from tests import models

pytestmark = pytest.mark.skipif(
    not t5ops.available(),
    reason=f"no fused functions here (kernel: {qlinear.kernel_status()}; an extension built before "
    "_t5ops.c existed needs `python setup.py build_ext --inplace`)",
)
OP_TOLERANCE = 2e-6  # relative to the largest output value, one operation
RUNTIME_TOLERANCE = 1e-5  # relative to the largest value, a whole float32 encoder or decoder step
# int8 folders: the products quantize each activation row (int8 with VNNI or AMX: steps of 1/254 of
# the row's largest value), so a last-bit difference upstream can move a rounding by one step.
INT8_TOLERANCE = 3e-2 if qlinear._AMX or qlinear._VNNI else 5e-4
MASK = _mask_value(np.float32)


def _close(out: np.ndarray, ref: np.ndarray, tolerance: float = OP_TOLERANCE) -> None:
    scale = max(float(np.abs(ref).max()), 1e-30)
    error = float(np.abs(out.astype(np.float64) - ref).max()) / scale
    assert error <= tolerance, error


def _softmax(s: np.ndarray) -> np.ndarray:
    e = np.exp(s - s.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


@pytest.mark.parametrize("d", [1, 16, 37, 512])
def test_rms_norm(d: int) -> None:
    rng = np.random.default_rng(d)
    x = (rng.standard_normal((5, d)) * 3).astype(np.float32)
    gamma = rng.uniform(0.5, 2, d).astype(np.float32)
    x64 = x.astype(np.float64)
    ref = x64 / np.sqrt((x64**2).mean(axis=-1, keepdims=True) + 1e-6) * gamma
    _close(t5ops.rms_norm(x, gamma, 1e-6), ref)


@pytest.mark.parametrize("gated", [True, False])
@pytest.mark.parametrize("act", [t5ops.ACT_RELU, t5ops.ACT_GELU_TANH])
@pytest.mark.parametrize("f", [1, 16, 45])
def test_activation(gated: bool, act: int, f: int) -> None:
    rng = np.random.default_rng(f)
    h = (rng.standard_normal((3, (2 if gated else 1) * f)) * 4).astype(np.float32)
    h[0, 0] = -60.0  # far in the tails: gelu gives -0, not NaN
    h[1, 0] = 60.0
    x = h[:, :f].astype(np.float64)
    c = math.sqrt(2.0 / math.pi)
    y = np.maximum(x, 0) if act == t5ops.ACT_RELU else 0.5 * x * (1 + np.tanh(c * (x + 0.044715 * x**3)))
    if gated:
        y = y * h[:, f:]
    out = t5ops.activation(h, f, gated=gated, act=act)
    assert np.isfinite(out).all()
    _close(out, y)


def _heads(rows: np.ndarray, heads: int) -> np.ndarray:
    """[R, H*D] -> [H, R, D] (float64)."""
    return rows.astype(np.float64).reshape(rows.shape[0], heads, -1).transpose(1, 0, 2)


# The kernel splits (sequence, head) pairs over threads only from 64 K multiply-adds (counted over
# the capacity): the cases with 6 heads of 64 take that path, the others stay on one thread.
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("heads,d_kv,cap", [(4, 16, 40), (6, 64, 40), (2, 24, 40), (6, 64, 1200)])
def test_decoder_self_attention(threads: int, heads: int, d_kv: int, cap: int) -> None:
    rng = np.random.default_rng(heads * d_kv)
    batch, m = 3, 4
    lengths = np.array([0, 7, cap - 7], dtype=np.int64)  # an empty past, a short one, a long one
    inner = heads * d_kv
    qkv = rng.standard_normal((batch * m, 3 * inner)).astype(np.float32)
    cache_k = rng.standard_normal((batch, heads, cap, d_kv)).astype(np.float32)
    cache_v = rng.standard_normal((batch, heads, cap, d_kv)).astype(np.float32)
    table = rng.standard_normal((cap + 1, heads)).astype(np.float32)
    new_k = np.empty((batch, m, heads, d_kv), np.float32)
    new_v = np.empty_like(new_k)
    out = t5ops.decoder_self_attention(
        qkv, cache_k, cache_v, lengths, table, new_k, new_v, rows=(batch, m), threads=threads
    )
    parts = qkv.reshape(batch, m, 3, inner)
    np.testing.assert_array_equal(new_k.reshape(batch, m, inner), parts[:, :, 1])
    np.testing.assert_array_equal(new_v.reshape(batch, m, inner), parts[:, :, 2])
    for b, length in enumerate(lengths):
        q, k_own, v_own = (_heads(parts[b, :, j], heads) for j in range(3))  # [H, m, D]
        keys = np.concatenate([np.broadcast_to(cache_k[b, :, None, :length], (heads, m, length, d_kv)),
                               k_own[:, :, None]], axis=2)  # fmt: skip
        values = np.concatenate([np.broadcast_to(cache_v[b, :, None, :length], (heads, m, length, d_kv)),
                                 v_own[:, :, None]], axis=2)  # fmt: skip
        bias = np.concatenate([table[length - np.arange(length)].T, table[:1].T], axis=1)  # [H, length + 1]
        scores = np.einsum("hmd,hmtd->hmt", q, keys) + bias[:, None, :]
        ref = np.einsum("hmt,hmtd->hmd", _softmax(scores), values).transpose(1, 0, 2).reshape(m, inner)
        _close(out[b * m : (b + 1) * m], ref)


@pytest.mark.parametrize("threads", [1, 2])
def test_cross_attention(threads: int) -> None:
    rng = np.random.default_rng(5)
    batch, m, heads, d_kv, width = 3, 2, 4, 16, 21
    q = rng.standard_normal((batch * m, heads * d_kv)).astype(np.float32)
    k = rng.standard_normal((batch, heads, width, d_kv)).astype(np.float32)
    v = rng.standard_normal((batch, heads, width, d_kv)).astype(np.float32)
    bias = np.zeros((batch, width), np.float32)
    bias[0, 5:] = MASK  # a short prompt
    bias[2, 20:] = MASK
    out = t5ops.cross_attention(q, k, v, bias, m=m, threads=threads)
    for b in range(batch):
        qh = _heads(q[b * m : (b + 1) * m], heads)  # [H, m, D]
        probs = _softmax(np.einsum("hmd,htd->hmt", qh, k[b]) + bias[b])
        ref = np.einsum("hmt,htd->hmd", probs, v[b]).transpose(1, 0, 2).reshape(m, -1)
        _close(out[b * m : (b + 1) * m], ref)


@pytest.mark.parametrize("d_kv", [16, 64, 80])  # 64: the registers-only path; others: the general one
def test_rows_taken_together_equal_each_row_alone(d_kv: int) -> None:
    """Attention reads each key once for up to four query rows of a sequence; a row's arithmetic is
    the same as alone: 7 rows (groups of 4 and 3) equal, bitwise, 7 calls of one row."""
    rng = np.random.default_rng(d_kv)
    batch, m, heads, width = 2, 7, 3, 30
    q = rng.standard_normal((batch * m, heads * d_kv)).astype(np.float32)
    k = rng.standard_normal((batch, heads, width, d_kv)).astype(np.float32)
    v = rng.standard_normal((batch, heads, width, d_kv)).astype(np.float32)
    bias = np.zeros((batch, width), np.float32)
    bias[1, 17:] = MASK
    together = t5ops.cross_attention(q, k, v, bias, m=m, threads=1)
    for b in range(batch):
        for r in range(m):
            row = q[b * m + r : b * m + r + 1]
            alone = t5ops.cross_attention(row, k[b : b + 1], v[b : b + 1], bias[b : b + 1], m=1, threads=1)
            np.testing.assert_array_equal(alone[0], together[b * m + r])


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("width,heads,d_kv", [(13, 3, 16), (140, 4, 64)])  # the second: threaded
def test_encoder_attention(threads: int, width: int, heads: int, d_kv: int) -> None:
    rng = np.random.default_rng(9)
    batch = 2
    inner = heads * d_kv
    lengths = np.array([width, 6], dtype=np.int64)
    qkv = rng.standard_normal((batch * width, 3 * inner)).astype(np.float32)
    position_bias = rng.standard_normal((heads, width, width)).astype(np.float32)
    out = t5ops.encoder_attention(qkv, position_bias, lengths, batch=batch, threads=threads)
    parts = qkv.reshape(batch, width, 3, inner)
    for b, length in enumerate(lengths):
        q, k, v = (_heads(parts[b, :, j], heads) for j in range(3))
        scores = np.einsum("hid,hjd->hij", q, k) + position_bias
        scores[..., length:] = -np.inf  # padded keys
        ref = np.einsum("hij,hjd->hid", _softmax(scores), v).transpose(1, 0, 2).reshape(width, inner)
        _close(out[b * width : (b + 1) * width], ref)


def test_wrong_shapes_are_refused_with_a_message() -> None:
    with pytest.raises(ValueError, match="float32"):
        t5ops.rms_norm(np.zeros((2, 4)), np.ones(4, np.float32), 1e-6)
    with pytest.raises(ValueError, match="columns"):
        t5ops.activation(np.zeros((2, 5), np.float32), 4, gated=True, act=t5ops.ACT_GELU_TANH)
    q = np.zeros((2, 32), np.float32)
    k = np.zeros((2, 2, 5, 16), np.float32)
    with pytest.raises(ValueError, match="cross bias"):
        t5ops.cross_attention(q, k, k, np.zeros((2, 4), np.float32), m=1, threads=1)
    new = np.zeros((2, 1, 2, 16), np.float32)
    qkv = np.zeros((2, 96), np.float32)
    with pytest.raises(ValueError, match="past the cache"):  # a length the bias table cannot cover
        t5ops.decoder_self_attention(
            qkv, k, k, np.array([5, 9]), np.zeros((6, 2), np.float32), new, new, rows=(2, 1), threads=1
        )
    with pytest.raises(ValueError, match="C-contiguous"):
        t5ops.decoder_self_attention(
            qkv,
            k,
            k,
            np.array([1, 2]),
            np.zeros((6, 2), np.float32),
            new[:, :, ::2],
            new,
            rows=(2, 1),
            threads=1,
        )


def test_the_kernel_switch_turns_the_fused_functions_off() -> None:
    try:
        qlinear.use_kernel(False)
        assert not t5ops.available()
        with pytest.raises(RuntimeError, match="not in use"):
            t5ops.rms_norm(np.zeros((1, 4), np.float32), np.ones(4, np.float32), 1e-6)
    finally:
        qlinear.use_kernel(True)
    assert t5ops.available()


# ------------------------------------------------------------------------- whole runtimes
def _runtime(kind: str, quantization: str) -> T5Runtime:
    return T5Runtime.load(models.converted_model(kind, quantization), threads=2)


@pytest.mark.parametrize("kind", ["flan", "t5"])
@pytest.mark.parametrize("quantization", ["float32", "int8"])
def test_fused_runtime_equals_the_numpy_path(kind: str, quantization: str) -> None:
    """Encoder outputs and five decoder steps (4 rows a sequence, a batch of 3 prompts of different
    lengths, caches of different lengths): the fused path within float32 rounding of numpy's."""
    runtime = _runtime(kind, quantization)
    prompts = [list(p) for p in models.prompts(1, (7, 12, 3))]
    runs = {}
    for fused in (False, True):
        runtime.use_fused(fused)
        assert runtime.fused is fused
        encoded = runtime.encode_batch(prompts)
        cache = runtime.new_cache(encoded, capacity=8)
        rng = np.random.default_rng(1)
        choices = rng.integers(0, 4, size=(5, 3))
        steps = []
        for choice in choices:
            step = runtime.decoder_step(cache, rng.integers(0, 900, size=(3, 4)))
            steps.append(step)
            cache.commit(step, choice)
            if len(steps) == 2:
                cache.filter([2, 0, 1])  # rows reordered between steps: the caches follow
                choices[2:] = choices[2:, [2, 0, 1]]
        runs[fused] = (encoded, steps)
    (enc_np, steps_np), (enc_fused, steps_fused) = runs[False], runs[True]
    tolerance = RUNTIME_TOLERANCE if quantization == "float32" else INT8_TOLERANCE
    for enc_a, enc_b in zip(enc_np, enc_fused, strict=True):
        _close(enc_b.keys, enc_a.keys.astype(np.float64), tolerance)
        _close(enc_b.values, enc_a.values.astype(np.float64), tolerance)
    for step_a, step_b in zip(steps_np, steps_fused, strict=True):
        for name in ("hidden", "unit_hidden", "new_k", "new_v"):
            _close(getattr(step_b, name), getattr(step_a, name).astype(np.float64), tolerance)


def _steps(runtime: T5Runtime, m: int = 4) -> list[StepOutput]:
    """Five decoder steps of a batch of 3 prompts (m rows a sequence), rows reordered after two."""
    prompts = [list(p) for p in models.prompts(1, (7, 12, 3))]
    cache = runtime.new_cache(runtime.encode_batch(prompts), capacity=8)
    rng = np.random.default_rng(1)
    choices = rng.integers(0, m, size=(5, 3))
    steps = []
    for choice in choices:
        step = runtime.decoder_step(cache, rng.integers(0, 900, size=(3, m)))
        steps.append(step)
        cache.commit(step, choice)
        if len(steps) == 2:
            cache.filter([2, 0, 1])
            choices[2:] = choices[2:, [2, 0, 1]]
    return steps


@pytest.mark.skipif(not t5ops.layers_call_available(), reason="an extension built before decoder_layers")
@pytest.mark.parametrize("kind", ["flan", "t5"])
@pytest.mark.parametrize("quantization", ["float32", "int8"])
@pytest.mark.parametrize("m", [1, 4, 6])
def test_layers_in_one_call_equal_the_calls_one_by_one(kind: str, quantization: str, m: int) -> None:
    """decoder_layers runs the same functions in the same order as t5_fused.decoder_layer: the
    same bits, steps after steps (caches filled, rows reordered), with the element-wise work and
    the quantizations split over the threads by rows (3 x 4 rows: with a norm or the activation
    before them; 3 x 6: the attention outputs' too) and not (3 x 1)."""
    runtime = _runtime(kind, quantization)
    runs = {}
    for on in (True, False):
        runtime.use_layers_call(on)
        assert (runtime._plan() is not None) is on
        runs[on] = _steps(runtime, m)
    for a, b in zip(runs[True], runs[False], strict=True):
        for name in ("hidden", "unit_hidden", "new_k", "new_v"):
            np.testing.assert_array_equal(getattr(a, name), getattr(b, name))


@pytest.mark.skipif(not t5ops.layers_call_available(), reason="an extension built before decoder_layers")
def test_layers_in_one_call_with_the_attention_wider_than_the_rest() -> None:
    """A model whose attention (4 heads x 64) is wider than d_model (64), and d_ff (32) narrower:
    the rows the one call quantizes for its products, split over the threads, are as wide as the
    attention's output there; the same bits as the calls one by one."""
    runtime = T5Runtime.load(models.converted_model("narrow-ff", "int8"), threads=2)
    runs = {}
    for on in (True, False):
        runtime.use_layers_call(on)
        runs[on] = _steps(runtime, 6)
    for a, b in zip(runs[True], runs[False], strict=True):
        for name in ("hidden", "unit_hidden", "new_k", "new_v"):
            np.testing.assert_array_equal(getattr(a, name), getattr(b, name))


@pytest.mark.skipif(not t5ops.layers_call_available(), reason="an extension built before decoder_layers")
def test_the_layers_timers_split_the_calls_time_and_change_nothing() -> None:
    """layers_timing (profile_step.py's breakdown): every part of decoder_layers gets time, the
    parts add up to at most the calls' wall time, the results are the same bits as without the
    timers, and turning them off stops and zeroes them."""
    runtime = _runtime("flan", "int8")
    plain = _steps(runtime)
    t5ops.layers_timing(True)
    try:
        start = time.perf_counter()
        timed = _steps(runtime)
        wall = time.perf_counter() - start
        parts = t5ops.layers_timing_read()
    finally:
        t5ops.layers_timing(False)
    expected = {"norms", "residual_adds", "qkv", "self_attention", "self_out", "cross_q", "cross_attention"}
    assert expected | {"cross_out", "wi", "activation", "wo"} == set(parts)
    assert all(v > 0 for v in parts.values()), parts
    assert sum(parts.values()) <= wall
    for a, b in zip(plain, timed, strict=True):
        np.testing.assert_array_equal(a.hidden, b.hidden)
    _steps(runtime)
    assert all(v == 0 for v in t5ops.layers_timing_read().values())


@pytest.mark.skipif(not t5ops.layers_call_available(), reason="an extension built before decoder_layers")
def test_steps_past_the_plans_rows_take_the_calls_one_by_one() -> None:
    """Float32 products take OpenBLAS beyond qlinear.KERNEL_MAX_ROWS[0] rows, which the one call
    cannot: such a step goes layer by layer, with the same results."""
    runtime = _runtime("flan", "float32")
    plan = runtime._plan()
    assert plan is not None and plan.max_rows == qlinear.KERNEL_MAX_ROWS[qlinear.MODE_FLOAT32]
    m = plan.max_rows // 3 + 1  # 3 sequences: past the limit
    with_plan = _steps(runtime, m)
    runtime.use_layers_call(False)
    for a, b in zip(with_plan, _steps(runtime, m), strict=True):
        np.testing.assert_array_equal(a.hidden, b.hidden)


@pytest.mark.skipif(not t5ops.layers_call_available(), reason="an extension built before decoder_layers")
def test_the_layers_call_refuses_what_does_not_fit() -> None:
    runtime = _runtime("flan", "int8")
    layers = runtime.weights.decoder
    shape = runtime.weights.shape
    swapped = [dataclasses.replace(layers[0], qkv=layers[0].self_out), *layers[1:]]
    with pytest.raises(ValueError, match="decoder_plan: a product is"):
        t5ops.decoder_plan(swapped, shape)
    plan = runtime._plan()
    assert plan is not None
    cache = runtime.new_cache(runtime.encode_batch([[5, 6, 7]]), capacity=4)
    x = np.zeros((1, shape.d_model), dtype=np.float32)
    new = np.zeros((len(layers) + 1, 1, 1, shape.num_heads, shape.d_kv), dtype=np.float32)  # a layer too many
    table = np.zeros((8, shape.num_heads), dtype=np.float32)
    with pytest.raises(ValueError, match="new K/V are not"):
        t5ops.decoder_layers(plan.handle, x, cache, table, new, new.copy(), rows=(1, 1), threads=1)
    cache.lengths[0] = 8  # past the bias table's 8 distances
    with pytest.raises(ValueError, match="past the cache or the bias table"):
        t5ops.decoder_layers(plan.handle, x, cache, table, new[1:], new[1:].copy(), rows=(1, 1), threads=1)


@pytest.mark.parametrize("kind", ["flan", "t5"])
@pytest.mark.parametrize(
    "params",
    [
        {"penalty_alpha": 0.6, "top_k": 4, "max_new_tokens": 12},
        {"max_new_tokens": 12},
    ],
)
def test_fused_runtime_gives_the_numpy_paths_ids(kind: str, params: dict[str, object]) -> None:
    runtime = _runtime(kind, "float32")
    decoding = DecodingParams.from_dict(params)
    requests = [GenerationRequest(p, decoding) for p in models.prompts(3, (9, 17, 4, 30))]
    ids = {}
    for fused in (False, True):
        runtime.use_fused(fused)
        ids[fused] = [r.token_ids for r in run_on_decoder(runtime, requests)]
    assert ids[True] == ids[False]
    assert all(len(row) > 0 for row in ids[True])


def test_the_kernel_switch_turns_the_fused_path_off() -> None:
    runtime = _runtime("flan", "float32")
    assert runtime.fused
    try:
        qlinear.use_kernel(False)
        assert not runtime.fused
    finally:
        qlinear.use_kernel(True)
    assert runtime.fused
