"""The compiled linear kernel (engine/runtime/_qlinear.c) against float64 numpy, and its int8 x int8
products (AMX, VNNI) against an exact integer reference."""

from __future__ import annotations

import types
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from engine.errors import InvalidRequest
from engine.runtime import qlinear
from engine.runtime.decoder_batch import run_on_decoder
from engine.runtime.params import DecodingParams
from engine.runtime.qlinear import KERNEL_MAX_ROWS, Linear, blas_linear
from engine.runtime.result import GenerationRequest
from engine.runtime.t5 import T5Runtime
from tests import models

kernel = qlinear._KERNEL
needs_kernel = pytest.mark.skipif(kernel is None, reason=f"kernel: {qlinear.kernel_status()}")
MODES = (
    [qlinear.MODE_FLOAT32, qlinear.MODE_INT8_FLOAT]
    + ([qlinear.MODE_INT8_INT16, qlinear.MODE_INT8_VNNI] if qlinear._VNNI else [])
    + ([qlinear.MODE_INT8_AMX] if qlinear._AMX else [])
)
INT8_ACTIVATIONS = [m for m in MODES if m in (qlinear.MODE_INT8_AMX, qlinear.MODE_INT8_VNNI)]
# Relative to the largest output: float32 sums in another order (~1e-7 * sqrt(K)), int16
# activations (1 / 32767 of each row's largest value), or int8 activations (1 / 254 of it, as in
# CTranslate2's int8 products).
TOLERANCE = {
    qlinear.MODE_FLOAT32: 2e-6,
    qlinear.MODE_INT8_FLOAT: 2e-6,
    qlinear.MODE_INT8_INT16: 2e-4,
    qlinear.MODE_INT8_AMX: 2e-2,
    qlinear.MODE_INT8_VNNI: 2e-2,
}


def _weights(w: np.ndarray, mode: int) -> np.ndarray | bytes:
    """The weight buffer a mode takes: AMX and VNNI's two modes take them packed into AMX's tile
    layout (for VNNI followed by each row's sum)."""
    assert kernel is not None
    if mode == qlinear.MODE_INT8_AMX:
        return bytes(kernel.pack_amx(w, *w.shape))
    if mode in (qlinear.MODE_INT8_VNNI, qlinear.MODE_INT8_INT16):
        return bytes(kernel.pack_vnni(w, *w.shape))
    return w


def _integer_reference(x: np.ndarray, wq: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """The int8 x int8 product done by hand: each row quantized as the kernel does (max |x| -> 127,
    the scale's reciprocal in float32, round half to even), the sums in exact int64, then
    float32(sum) * row scale / weight scale."""
    amax = np.abs(x).max(axis=1)
    sx = np.where(amax > 0, amax / np.float32(127), np.float32(1)).astype(np.float32)
    inv = np.float32(1) / sx
    xq = np.clip(np.rint(x * inv[:, None]), -128, 127).astype(np.int64)
    sums = xq @ wq.astype(np.int64).T
    return sums.astype(np.float32) * sx[:, None] / scale[None, :]


def _case(
    rng: np.random.Generator, m: int, n: int, k: int, mode: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, np.ndarray]:
    x = rng.standard_normal((m, k)).astype(np.float32)
    if mode == qlinear.MODE_FLOAT32:
        w = rng.standard_normal((n, k)).astype(np.float32)
        return x, w, None, w.astype(np.float64)
    wq = rng.integers(-127, 128, (n, k), dtype=np.int8)
    scale = rng.uniform(20, 200, n).astype(np.float32)
    return x, wq, scale, wq.astype(np.float64) / scale.astype(np.float64)[:, None]


@needs_kernel
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize(
    "m,n,k",
    # tails everywhere: rows not a multiple of the 4-row tile, outputs not a multiple of 4, inputs
    # not a multiple of 16/32/64; a K beyond the int16 VNNI flush chunk (4096); sizes that take the
    # threads; outputs not a multiple of the 64-output groups of the packed layout
    [
        (1, 1, 1),
        (2, 3, 5),
        (3, 5, 17),
        (5, 7, 33),
        (4, 8, 16),
        (9, 13, 100),
        (1, 6, 4500),
        (33, 70, 64),
        (4, 1030, 512),
        (517, 13, 40),  # more rows than a VNNI block (256): blocks and a short last block
    ],
)
def test_kernel_matches_float64(mode: int, threads: int, m: int, n: int, k: int) -> None:
    assert kernel is not None
    x, w, scale, exact = _case(np.random.default_rng(m * 1000 + n + k), m, n, k, mode)
    out = np.full((m, n), np.nan, dtype=np.float32)
    kernel.linear(x, _weights(w, mode), scale, out, m, k, n, mode, threads)
    ref = x.astype(np.float64) @ exact.T
    assert np.abs(out - ref).max() <= TOLERANCE[mode] * np.abs(ref).max()


def _int16_reference(x: np.ndarray, wq: np.ndarray, scale: np.ndarray, chunk: int = 512) -> np.ndarray:
    """The int16 x int8 product (mode 2) done by hand: each row quantized to int16 (max |x| -> 32767,
    the scale's reciprocal in float32, round half to even), exact integer sums over each run of
    ``chunk`` inputs (the kernel's int32 flush), the runs' sums added in float32 in order, then
    times the row scale over the weight scale."""
    amax = np.abs(x).max(axis=1)
    sx = np.where(amax > 0, amax / np.float32(32767), np.float32(1)).astype(np.float32)
    inv = np.float32(1) / sx
    xq = np.clip(np.rint(x * inv[:, None]), -32768, 32767).astype(np.int64)
    total = np.zeros((x.shape[0], wq.shape[0]), dtype=np.float32)
    for k0 in range(0, x.shape[1], chunk):
        total += (xq[:, k0 : k0 + chunk] @ wq[:, k0 : k0 + chunk].astype(np.int64).T).astype(np.float32)
    return total * sx[:, None] / scale[None, :]


@needs_kernel
@pytest.mark.skipif(not qlinear._VNNI, reason="needs AVX-512 VNNI")
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("m,n,k", [(1, 1, 1), (3, 70, 100), (5, 64, 64), (9, 130, 1100), (37, 200, 512)])
def test_int16_activations_equal_an_integer_reference(threads: int, m: int, n: int, k: int) -> None:
    """Mode 2 exactly as the reference: the kernel pairs each weight's inputs (0, 2) and (1, 3) and
    reorders the activations to match, which must leave every integer sum as it was. Weights span
    -128..127; 1100 inputs cross two int32 flushes; 37 rows leave a short last tile."""
    assert kernel is not None
    rng = np.random.default_rng(7 * m + n + k)
    x = (rng.standard_normal((m, k)) * rng.uniform(0.01, 100, (m, 1))).astype(np.float32)
    wq = rng.integers(-128, 128, (n, k), dtype=np.int8)
    scale = rng.uniform(20, 200, n).astype(np.float32)
    out = np.full((m, n), np.nan, dtype=np.float32)
    kernel.linear(
        x, _weights(wq, qlinear.MODE_INT8_INT16), scale, out, m, k, n, qlinear.MODE_INT8_INT16, threads
    )
    np.testing.assert_allclose(out, _int16_reference(x, wq, scale), rtol=1e-6, atol=0)


@needs_kernel
@pytest.mark.parametrize("mode", INT8_ACTIVATIONS)
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("m,n,k", [(1, 1, 1), (3, 70, 100), (4, 64, 64), (9, 130, 513), (300, 200, 512)])
def test_int8_activations_equal_an_integer_reference(mode: int, threads: int, m: int, n: int, k: int) -> None:
    """Quantization and integer sums exactly as the reference does them: equal within float32
    rounding of the last two operations (scale multiply and divide). Weights span -128..127, the
    activations' extremes hit 127 and -127 exactly; 300 rows cross VNNI's 256-row blocks."""
    assert kernel is not None
    rng = np.random.default_rng(m + n + k)
    x = (rng.standard_normal((m, k)) * rng.uniform(0.01, 100, (m, 1))).astype(np.float32)
    wq = rng.integers(-128, 128, (n, k), dtype=np.int8)
    scale = rng.uniform(20, 200, n).astype(np.float32)
    out = np.full((m, n), np.nan, dtype=np.float32)
    kernel.linear(x, _weights(wq, mode), scale, out, m, k, n, mode, threads)
    np.testing.assert_allclose(out, _integer_reference(x, wq, scale), rtol=1e-6, atol=0)


@needs_kernel
@pytest.mark.skipif(not qlinear._VNNI, reason="no AVX512-VNNI here")
def test_vnni_int8_sums_are_exact_up_to_their_limit() -> None:
    """VPDPBUSD multiplies activations + 128 (unsigned) by the weights, the kernel subtracts 128 x
    each weight row's sum: at K = 65536 the largest sums (255 x 127 or 255 x -128 per product, just
    under 2^31) stay exact. Longer rows are refused (the Python side gives them the int16 path)."""
    assert kernel is not None
    k = qlinear.VNNI8_MAX_K
    x = np.full((2, k), 3.0, dtype=np.float32)
    x[1] = -3.0
    w = np.full((2, k), 127, dtype=np.int8)
    w[1] = -128
    out = np.empty((2, 2), dtype=np.float32)
    kernel.linear(x, _weights(w, qlinear.MODE_INT8_VNNI), np.ones(2, dtype=np.float32), out, 2, k, 2, 4, 1)
    want = np.array([[127 * 127 * k, -127 * 128 * k], [-127 * 127 * k, 127 * 128 * k]], dtype=np.float64)
    np.testing.assert_allclose(out * (127 / 3.0), want, rtol=1e-6)
    long = np.zeros((1, k + 64), dtype=np.float32)
    w_long = np.zeros((1, k + 64), dtype=np.int8)
    with pytest.raises(ValueError, match="65536"):
        kernel.linear(
            long,
            kernel.pack_vnni(w_long, 1, k + 64),
            np.ones(1, dtype=np.float32),
            np.empty((1, 1), np.float32),
            1,
            k + 64,
            1,
            4,
            1,
        )
    assert Linear.from_stored(w_long, np.ones(1, dtype=np.float32)).mode == qlinear.MODE_INT8_INT16


@needs_kernel
@pytest.mark.parametrize(
    "mode",
    [m for m in MODES if m in (qlinear.MODE_INT8_INT16, qlinear.MODE_INT8_AMX, qlinear.MODE_INT8_VNNI)],
)
def test_integer_sums_cannot_overflow(mode: int) -> None:
    """The largest activations times the largest weights over a long row (127 and -128): int16
    VNNI's int32 lanes are flushed to float before they can wrap; int8 products (AMX, VNNI) stay
    exact in int32."""
    assert kernel is not None
    k = 9000
    x = np.full((1, k), -3.0, dtype=np.float32)
    w = np.full((2, k), 127, dtype=np.int8)
    w[1] = -128
    out = np.empty((1, 2), dtype=np.float32)
    kernel.linear(x, _weights(w, mode), np.ones(2, dtype=np.float32), out, 1, k, 2, mode, 1)
    np.testing.assert_allclose(out, [[-3.0 * 127 * k, 3.0 * 128 * k]], rtol=1e-6)


@needs_kernel
def test_kernel_rejects_mismatched_buffers() -> None:
    assert kernel is not None
    x = np.zeros((2, 8), dtype=np.float32)
    w = np.zeros((3, 8), dtype=np.int8)
    out = np.zeros((2, 3), dtype=np.float32)
    with pytest.raises(ValueError, match="sizes"):
        kernel.linear(x, w, np.ones(3, dtype=np.float32), out, 2, 8, 4, 1, 1)
    with pytest.raises(ValueError, match="mode"):
        kernel.linear(x, w, None, out, 2, 8, 3, 1, 1)  # int8 without a scale


def test_linear_picks_the_kernel_for_few_rows_and_blas_for_many() -> None:
    rng = np.random.default_rng(0)
    wq = rng.integers(-127, 128, (40, 24), dtype=np.int8)
    scale = rng.uniform(20, 200, 40).astype(np.float32)
    layer = Linear.from_stored(wq, scale)
    np.testing.assert_array_equal(layer.dense, wq.astype(np.float32) / scale[:, None])
    if KERNEL_MAX_ROWS[layer.mode] < 10_000:  # VNNI and AMX take every row count
        many = rng.standard_normal((KERNEL_MAX_ROWS[layer.mode] + 1, 24)).astype(np.float32)
        np.testing.assert_array_equal(layer(many), blas_linear(many, layer.dense))
    few = rng.standard_normal((3, 24)).astype(np.float32)
    ref = few @ layer.dense.T
    assert np.abs(layer(few) - ref).max() <= TOLERANCE.get(layer.mode, 2e-4) * np.abs(ref).max()
    np.testing.assert_array_equal(layer(few, kernel=False), blas_linear(few, layer.dense))


def test_linear_validates_its_weights() -> None:
    with pytest.raises(InvalidRequest, match="scale"):
        Linear.from_stored(np.zeros((4, 3), dtype=np.int8), None)
    with pytest.raises(InvalidRequest, match="2-D"):
        Linear.from_stored(np.zeros(4, dtype=np.float32), None)


@needs_kernel
@pytest.mark.parametrize("kind", ["flan", "t5"])
def test_int8_runtime_with_kernel_tracks_the_numpy_path(kind: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Same int8 folder, kernel vs dequantized BLAS: the decoder's hidden states agree closely, so
    contrastive search (which compares them) sees the same model."""
    folder = models.converted_model(kind, "int8")
    prompt = tuple(range(5, 17))
    params = DecodingParams.from_dict({"penalty_alpha": 0.6, "top_k": 4, "max_new_tokens": 8})

    def hidden_and_ids(runtime: T5Runtime) -> tuple[np.ndarray, tuple[int, ...]]:
        cache = runtime.new_cache([runtime.encode(prompt)], capacity=4)
        step = runtime.decoder_step(cache, np.array([[0, 5, 9, 11]]))
        (result,) = run_on_decoder(runtime, [GenerationRequest(prompt, params)])
        return step.hidden, result.token_ids

    with_kernel = hidden_and_ids(T5Runtime.load(folder))
    monkeypatch.setattr(qlinear, "_KERNEL", None)
    without = hidden_and_ids(T5Runtime.load(folder))
    scale = np.abs(without[0]).max()
    # int16 activations keep 1e-3; int8 ones (AMX, VNNI; as CTranslate2's int8) about 1e-2.
    tolerance = 3e-2 if qlinear._AMX or qlinear._VNNI else 1e-3
    error = np.abs(with_kernel[0] - without[0]).max() / scale
    assert error <= tolerance, error
    assert len(with_kernel[1]) == len(without[1]) == 8


@needs_kernel
@pytest.mark.parametrize("mode", MODES)
def test_a_row_of_zeros_gives_zeros(mode: int) -> None:
    """A zero row has no scale to quantize by (max |x| = 0): its outputs are exactly 0."""
    assert kernel is not None
    x, w, scale, exact = _case(np.random.default_rng(7), 3, 9, 40, mode)
    x[1] = 0.0
    out = np.full((3, 9), np.nan, dtype=np.float32)
    kernel.linear(x, _weights(w, mode), scale, out, 3, 40, 9, mode, 1)
    assert np.all(out[1] == 0.0)
    ref = x.astype(np.float64) @ exact.T
    assert np.abs(out - ref).max() <= TOLERANCE[mode] * np.abs(ref).max()


def test_many_rows_split_over_threads_equal_one_product(monkeypatch: pytest.MonkeyPatch) -> None:
    """With OpenBLAS on one thread, many rows are shared out over threads: the same numbers."""
    rng = np.random.default_rng(3)
    layer = Linear.from_stored(rng.standard_normal((50, 24)).astype(np.float32), None)
    x = rng.standard_normal((qlinear.SPLIT_MIN_ROWS + 37, 24)).astype(np.float32)
    monkeypatch.setattr(qlinear, "_blas_single_threaded", True)
    for threads in (2, 3):
        split = layer(x, threads=threads)
        np.testing.assert_allclose(split, x @ layer.dense.T, rtol=1e-5, atol=1e-5)


def test_config_turns_the_kernel_off_for_the_process(flan_model_dir: Path) -> None:
    """ENGINE_QLINEAR=0 reaches the runtime through Config, not through an environment read."""
    from engine.config import Config
    from engine.runtime.engine import Engine

    cfg = Config.build({"model_dir": str(flan_model_dir)}, environ={"ENGINE_QLINEAR": "0"})
    assert cfg.qlinear is False
    try:
        Engine.from_config(cfg)
        assert not qlinear.kernel_available()
        assert qlinear.kernel_status().startswith("off (Config.qlinear")
    finally:
        qlinear.use_kernel(True)
    assert qlinear.kernel_available() == (kernel is not None)


@needs_kernel
@pytest.mark.skipif(not qlinear._VNNI, reason="no AVX512-VNNI here (nor AMX)")
def test_int8_rows_do_not_depend_on_their_batch() -> None:
    """Each row is quantized alone and summed exactly in int32: a row's output is bitwise the same
    whatever rows it is multiplied with (AMX's 16-row tiles, VNNI's 4-row tiles and 256-row blocks,
    padding, threads)."""
    rng = np.random.default_rng(11)
    layer = Linear.from_stored(
        rng.integers(-127, 128, (300, 200), dtype=np.int8), rng.uniform(20, 90, 300).astype(np.float32)
    )
    assert layer.mode == (qlinear.MODE_INT8_AMX if qlinear._AMX else qlinear.MODE_INT8_VNNI)
    assert layer.packed is not None and layer.packed.ctypes.data % 64 == 0
    x = rng.standard_normal((37 if qlinear._AMX else 301, 200)).astype(np.float32)
    together = layer(x, threads=2)
    for i in (0, 15, 16, 36, len(x) - 1):
        np.testing.assert_array_equal(layer(x[i : i + 1], threads=1)[0], together[i])


@needs_kernel
@pytest.mark.skipif(not qlinear._VNNI or qlinear._AMX, reason="VNNI's packed products (no AMX)")
@pytest.mark.parametrize("int16", [False, True])
def test_the_look_ahead_changes_no_result(int16: bool) -> None:
    """The later tiles of a group prefetch the next group (packed_ahead): a hint, never arithmetic.
    Many groups a thread and several tiles a group, in both packed modes, give the same bits."""
    assert kernel is not None
    rng = np.random.default_rng(12)
    layer = Linear.from_stored(
        rng.integers(-127, 128, (1000, 520), dtype=np.int8),
        rng.uniform(20, 90, 1000).astype(np.float32),
        int16_activations=int16,
    )
    x = rng.standard_normal((30, 520)).astype(np.float32)
    try:
        kernel.packed_ahead(False)
        without = layer(x, threads=2)
    finally:
        kernel.packed_ahead(True)
    np.testing.assert_array_equal(layer(x, threads=2), without)
    np.testing.assert_allclose(
        layer(x, threads=2), x @ layer.dense.T, rtol=0.05, atol=0.05 * np.abs(without).max()
    )


@pytest.mark.skipif(not qlinear._VNNI or qlinear._AMX, reason="VNNI without AMX picks per product")
def test_vnni_keeps_int16_activations_where_int8_cost_agreement() -> None:
    """On VNNI the decoder's feed-forward output projection and the lm_head quantize activations
    to int16, every other int8 product to int8 (Linear.from_stored says why)."""
    weights = T5Runtime.load(models.converted_model("flan", "int8")).weights
    assert weights.lm_head.mode == qlinear.MODE_INT8_INT16
    for layer in weights.decoder:
        assert layer.ffn.wo.mode == qlinear.MODE_INT8_INT16
        others = (layer.qkv, layer.self_out, layer.cross_q, layer.cross_kv, layer.cross_out, layer.ffn.wi)
        assert {w.mode for w in others} == {qlinear.MODE_INT8_VNNI}
    for enc in weights.encoder:
        assert {w.mode for w in (enc.qkv, enc.out, enc.ffn.wi, enc.ffn.wo)} == {qlinear.MODE_INT8_VNNI}


@needs_kernel
@pytest.mark.skipif(not qlinear._VNNI or qlinear._AMX, reason="VNNI without AMX")
def test_an_extension_built_before_int8_activations_keeps_int16(monkeypatch: pytest.MonkeyPatch) -> None:
    """A worktree whose _qlinear was compiled before both VNNI modes took packed weights (no
    LAYOUT 2) runs its int16 mode on the weights as stored instead of failing until it is rebuilt."""
    assert kernel is not None
    older = types.SimpleNamespace(**{name: getattr(kernel, name) for name in dir(kernel) if name != "LAYOUT"})
    calls = []

    def linear(*args: object) -> None:  # an older build's mode 2 took the weights as stored
        assert isinstance(args[1], np.ndarray) and args[1].shape == (20, 32)
        calls.append(args[7])  # the mode
        kernel.linear(args[0], kernel.pack_vnni(args[1], 20, 32), *args[2:])

    older.linear = linear
    monkeypatch.setattr(qlinear, "_KERNEL", older)
    rng = np.random.default_rng(2)
    layer = Linear.from_stored(
        rng.integers(-127, 128, (20, 32), dtype=np.int8), np.full(20, 50.0, np.float32)
    )
    assert layer.mode == qlinear.MODE_INT8_INT16 and layer.packed is None
    x = rng.standard_normal((3, 32)).astype(np.float32)
    ref = x @ layer.dense.T
    assert np.abs(layer(x) - ref).max() <= TOLERANCE[qlinear.MODE_INT8_INT16] * np.abs(ref).max()
    assert calls == [qlinear.MODE_INT8_INT16]


@needs_kernel
@pytest.mark.skipif(not qlinear._VNNI or qlinear._AMX, reason="VNNI without AMX")
def test_a_layer_made_while_the_kernel_was_off_runs_without_packing(monkeypatch: pytest.MonkeyPatch) -> None:
    """Nothing is packed while the kernel is off; turned on later, such a layer converts its int8
    weights to float in registers (mode 1) instead of handing unpacked weights to mode 2."""
    rng = np.random.default_rng(4)
    monkeypatch.setattr(qlinear, "_KERNEL", None)
    layer = Linear.from_stored(
        rng.integers(-127, 128, (20, 32), dtype=np.int8), np.full(20, 50.0, np.float32)
    )
    monkeypatch.undo()
    assert layer.packed is None and layer.mode == qlinear.MODE_INT8_FLOAT
    x = rng.standard_normal((3, 32)).astype(np.float32)
    np.testing.assert_allclose(layer(x), x @ layer.dense.T, rtol=1e-5, atol=1e-5)


@needs_kernel
def test_products_on_many_threads_and_from_many_callers_equal_one_thread() -> None:
    """The kernel's pool (engine/runtime/_pool.c): more threads than cores, and several Python
    threads calling at once (each call is one job; callers take turns), give one thread's numbers."""
    assert kernel is not None
    rng = np.random.default_rng(11)
    m, n, k = 8, 1000, 512
    x = rng.standard_normal((m, k)).astype(np.float32)
    w = rng.integers(-127, 128, (n, k), dtype=np.int8)
    scale = rng.uniform(50, 150, n).astype(np.float32)
    mode = qlinear.MODE_INT8_VNNI if qlinear._VNNI else qlinear.MODE_INT8_FLOAT

    def product(threads: int) -> np.ndarray:
        out = np.empty((m, n), dtype=np.float32)
        kernel.linear(x, _weights(w, mode), scale, out, m, k, n, mode, threads)
        return out

    one = product(1)
    for threads in (2, 3, 8):
        np.testing.assert_array_equal(product(threads), one)
    with ThreadPoolExecutor(max_workers=4) as pool:
        for out in pool.map(lambda _: product(2), range(40)):
            np.testing.assert_array_equal(out, one)
