"""Linear layers of the CPU contrastive runtime: a compiled small-batch kernel, or numpy.

A contrastive step multiplies few rows (B x k: 4 at batch 1) by every decoder weight matrix, then
one row per sequence by the lm_head. OpenBLAS is poor at that shape (it packs the whole weight
matrix per call and reads float32 weights: 4x the bytes of an int8 folder). ``_qlinear`` (C,
AVX-512, built by setup.py; see its header) reads the weights as CTranslate2 stores them (int8
rows with their scales, or float32) and converts them in registers. With AVX512-VNNI or AMX int8
weights, packed once into AMX's tile layout, multiply activations quantized to int8 per row (error
at most 1/254 of a row's largest value, as CTranslate2's int8 GEMMs) at every row count, the
encoder included, summed exactly in int32: a row's result depends on that row alone (on VNNI
two products keep int16 activations for agreement with float32: ``Linear.from_stored``). Float32
weights, and int8 ones without VNNI (converted to float in registers), keep float32 activations;
for many rows BLAS is faster there, so a ``Linear`` picks by row count (``KERNEL_MAX_ROWS``,
measured).

``use_kernel(False)`` turns the kernel off (numpy only; the server does it for ``Config.qlinear``,
ENGINE_QLINEAR=0); ``kernel_status()`` says which is in use and why.
"""

from __future__ import annotations

import functools
import itertools
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from types import ModuleType

import numpy as np
from threadpoolctl import threadpool_limits

from engine.errors import InvalidRequest

# Up to how many rows the kernel runs a product; above, OpenBLAS on the float32 copy. Measured
# in whole contrastive runs on the 2-core Xeon (FLAN-T5-small int8, k = 4): with VNNI the kernel
# beat OpenBLAS at every decoder size tried (batch 16 = 64 rows: 2.8-3.5 s vs 4.8-6.2 s; batch
# 32 = 128 rows: 6.2-6.7 s vs 7.7-8.6 s) since OpenBLAS reads 4x the bytes; converting int8 or
# float32 weights to float it computes at a third of VNNI's rate, and hot-cache OpenBLAS is
# faster from 32 rows. With VNNI the encoder runs on the kernel too: since products take their rows
# in blocks that stay in L2 (VNNI_BLOCK_ROWS in _qlinear.c), 800 rows x 512 by 512 x 1536 took
# 3.4 ms against 9.3 ms for OpenBLAS split over both cores (AMD EPYC, 2 cores, one ad hoc run).
# With AMX (mode 3) the kernel takes every row count, the encoder included: a 32 x 512 by 512 x 2048
# product took 35 us on one core with its weights in cache, against 340 us for VNNI on two, and the
# 8-prompt encoder fell from 302 ms (OpenBLAS, 02:57 run) to 178 ms (03:52 run; RESULTS.md).
# With VNNI and int8 activations (mode 4, VPDPBUSD) the same 800-row product takes about a quarter
# of the int16 path's time (RESULTS.md, issue 15 sixth session).
KERNEL_MAX_ROWS = {
    0: 32,
    1: 32,
    2: 1 << 30,
    3: 1 << 30,
    4: 1 << 30,
}  # float32, int8 as float, int8 x int16, AMX, VNNI8
# OpenBLAS packs a whole weight matrix per call; blocks of this many weight rows keep a block's
# packing in cache (measured: 2.2x faster lm_head for 8 rows; see T5Runtime history).
BLAS_BLOCK_ROWS = 1024
# From this many rows, with OpenBLAS on one thread, products split their rows over the runtime's
# threads (the encoder: a 100-token prompt is 100 rows).
SPLIT_MIN_ROWS = 64


def _packs_for_vnni(kernel: object) -> bool:
    """Whether this build of _qlinear takes packed weights in both VNNI modes (LAYOUT 2). An
    extension compiled from an older _qlinear.c (a worktree that merged without rebuilding) runs
    mode 2 on the weights as stored, and nothing is packed for it."""
    return int(getattr(kernel, "LAYOUT", 0)) >= 2


def _load_kernel() -> tuple[ModuleType | None, str]:
    try:
        from engine.runtime import _qlinear  # type: ignore[attr-defined]
    except ImportError:
        return None, "not built (no C compiler at install?): numpy/OpenBLAS only"
    if not _qlinear.available():
        return None, "this CPU lacks AVX-512 F/BW/DQ/VL: numpy/OpenBLAS only"
    if not _qlinear.vnni_available():
        return _qlinear, "AVX-512 small-batch kernel (no VNNI: int8 weights converted to float)"
    if _qlinear.amx_available():
        return _qlinear, "AVX-512 kernel, int8 weights x int8 activations with AMX (float32 models: AVX-512)"
    if not _packs_for_vnni(_qlinear):
        return _qlinear, (
            "AVX-512 kernel, int8 weights x int16 activations with VNNI (built from an older _qlinear.c: "
            "`python setup.py build_ext --inplace` rebuilds it)"
        )
    return _qlinear, "AVX-512 kernel, int8 weights x int8 activations with VNNI (float32 models: AVX-512)"


_KERNEL, _KERNEL_STATUS = _load_kernel()
_VNNI = _KERNEL is not None and bool(_KERNEL.vnni_available())
_AMX = _KERNEL is not None and bool(_KERNEL.amx_available())
# The kernel's modes (see _qlinear.c): float32 weights; int8 weights converted to float32; int8
# weights times int16-quantized activations (VNNI); int8 weights, packed, times int8-quantized
# activations (AMX; VNNI).
MODE_FLOAT32, MODE_INT8_FLOAT, MODE_INT8_INT16, MODE_INT8_AMX, MODE_INT8_VNNI = 0, 1, 2, 3, 4
# Mode 4 sums exactly in int32 up to this many inputs (255 * 128 * 65536 < 2^31); longer rows take mode 2.
VNNI8_MAX_K = 65536


def kernel_available() -> bool:
    return _KERNEL is not None


def use_kernel(on: bool) -> None:
    """Process-wide: the compiled kernel (when it loaded) or numpy/OpenBLAS alone.
    ``Config.qlinear`` (ENGINE_QLINEAR=0 turns it off) decides it for the server."""
    global _KERNEL, _KERNEL_STATUS, _VNNI, _AMX
    if on:
        _KERNEL, _KERNEL_STATUS = _load_kernel()
    else:
        _KERNEL, _KERNEL_STATUS = None, "off (Config.qlinear: ENGINE_QLINEAR=0): numpy/OpenBLAS only"
    _VNNI = _KERNEL is not None and bool(_KERNEL.vnni_available())
    _AMX = _KERNEL is not None and bool(_KERNEL.amx_available())


def kernel_status() -> str:
    """Which path small products take, in words (logged when a runtime loads)."""
    return _KERNEL_STATUS


def single_threaded_blas() -> str:
    """Set OpenBLAS (numpy's BLAS) to one thread for the whole process, and say what was done.

    OpenBLAS's idle workers busy-wait for a long time after each multi-threaded call (2^28 cycles
    by default), so after the encoder they occupied the second core while the decoder's kernel
    wanted it: measured on a 2-core machine, 4-row products took 151 us instead of 71 us. The
    runtime's parallelism comes from the kernel's own threads; BLAS keeps the large-row products
    (the encoder, big batches), where one thread costs a few percent. A serving process gains too:
    CTranslate2's workers no longer share cores with spinning BLAS threads."""
    global _blas_single_threaded
    threadpool_limits(limits=1, user_api="blas")
    _blas_single_threaded = True
    return "OpenBLAS limited to 1 thread (the kernel has its own)"


_blas_single_threaded = False


def default_threads() -> int:
    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)


@dataclass(frozen=True, eq=False)
class Linear:
    """One weight matrix in CTranslate2's layout [out, in]: ``stored`` is int8 (with ``scale``,
    float32 [out]: W = stored / scale) or float32 (``scale`` None). ``packed`` is the int8 matrix
    in AMX's tile layout where AMX or VNNI runs (for VNNI followed by each row's sum; both of
    VNNI's modes read it), 64-byte aligned; ``dense`` the float32 matrix for BLAS, made on first use (with the kernel nothing
    needs it: no 4x copy of the model in memory)."""

    stored: np.ndarray
    scale: np.ndarray | None
    packed: np.ndarray | None = None
    packed_for: int | None = None  # the mode ``packed`` was made for: MODE_INT8_AMX, _VNNI or _INT16

    @classmethod
    def from_stored(
        cls, stored: np.ndarray, scale: np.ndarray | None, *, int16_activations: bool = False
    ) -> Linear:
        """``int16_activations``: on VNNI without AMX, this int8 product quantizes its activations
        to int16 (mode 2) rather than int8 (mode 4). t5_weights.py asks it for the decoder's
        feed-forward output projection (its input, after the gated GELU, has outliers that set
        each row's int8 step) and the lm_head (its argmax picks the token); every other int8
        product, the encoder's included, takes int8 activations. Measured with
        benchmarks/int8_agreement.py, 192 prompts on each of its 4 checkpoints (RESULTS.md, issue
        15 sixth session): greedy ids equal Transformers fp32's on 34.2% of prompts with int16
        activations everywhere, 24.3% with int8 everywhere (CTranslate2 int8: 24.6%), 27.2% with
        these two products on int16."""
        if stored.ndim != 2:
            raise InvalidRequest(f"a linear weight must be 2-D, got shape {stored.shape}")
        if stored.dtype == np.int8:
            if scale is None or scale.shape != (stored.shape[0],):
                raise InvalidRequest("an int8 weight needs one float scale per output row")
            stored = np.ascontiguousarray(stored)
            scale = np.ascontiguousarray(scale, dtype=np.float32)
            if _AMX and _KERNEL is not None:
                return cls(stored, scale, _aligned(_KERNEL.pack_amx(stored, *stored.shape)), MODE_INT8_AMX)
            if _VNNI and _KERNEL is not None and _packs_for_vnni(_KERNEL):
                packed = _aligned(_KERNEL.pack_vnni(stored, *stored.shape))
                int8 = stored.shape[1] <= VNNI8_MAX_K and not int16_activations
                return cls(stored, scale, packed, MODE_INT8_VNNI if int8 else MODE_INT8_INT16)
            return cls(stored, scale)
        return cls(np.ascontiguousarray(stored, dtype=np.float32), None)

    @functools.cached_property
    def dense(self) -> np.ndarray:
        if self.scale is None:
            return self.stored
        dense = self.stored.astype(np.float32)
        dense /= self.scale.reshape(-1, 1)
        return dense

    @property
    def mode(self) -> int:
        if self.scale is None:
            return MODE_FLOAT32
        if self.packed_for == MODE_INT8_AMX and _AMX:
            return MODE_INT8_AMX
        if self.packed_for == MODE_INT8_VNNI and _VNNI:
            return MODE_INT8_VNNI
        if _VNNI and (self.packed is not None or not _packs_for_vnni(_KERNEL)):
            return MODE_INT8_INT16  # on the packed weights, or as stored for a build before packing
        return MODE_INT8_FLOAT  # made while the kernel was off: nothing packed

    @property
    def shape(self) -> tuple[int, int]:
        rows, cols = self.stored.shape
        return rows, cols

    def kernel_args(self) -> tuple[np.ndarray, np.ndarray | None, int]:
        """What the kernel multiplies by in this product's mode: the weights (packed for the modes
        that take them), the scales (None for float32) and the mode."""
        mode = self.mode
        on_packed = mode in (MODE_INT8_AMX, MODE_INT8_VNNI) or (
            mode == MODE_INT8_INT16 and _packs_for_vnni(_KERNEL)
        )
        weights = self.packed if on_packed and self.packed is not None else self.stored
        return weights, self.scale, mode

    def __call__(self, x: np.ndarray, threads: int = 1, kernel: bool = True) -> np.ndarray:
        """x [R, in] float32 -> [R, out] float32."""
        rows = x.shape[0]
        n, k = self.stored.shape
        mode = self.mode
        if kernel and _KERNEL is not None and 0 < rows <= KERNEL_MAX_ROWS[mode]:
            x = np.ascontiguousarray(x, dtype=np.float32)
            out = np.empty((rows, n), dtype=np.float32)
            weights, scale, mode = self.kernel_args()
            _KERNEL.linear(x, weights, scale, out, rows, k, n, mode, threads)
            return out
        if _blas_single_threaded and threads > 1 and rows >= SPLIT_MIN_ROWS:
            return _split_rows(x, self.dense, threads)
        return blas_linear(x, self.dense)


def _aligned(data: bytes) -> np.ndarray:
    """The kernel's packed weights as int8, on a 64-byte boundary: its 64-byte loads of them then
    never straddle two cache lines (a bytes object's data is not aligned)."""
    raw = np.frombuffer(data, dtype=np.int8)
    base = np.empty(raw.size + 64, dtype=np.int8)
    start = -base.ctypes.data % 64
    packed = base[start : start + raw.size]
    packed[:] = raw
    return packed


def _split_rows(x: np.ndarray, weight: np.ndarray, threads: int) -> np.ndarray:
    """Many rows (the encoder, big batches) on single-threaded OpenBLAS: a share of the rows per
    thread, this one included. The helper threads sleep between calls (no busy-waiting: the
    reason OpenBLAS runs on one thread, see single_threaded_blas)."""
    rows = x.shape[0]
    out = np.empty((rows, weight.shape[0]), dtype=np.float32)
    bounds = [rows * i // threads for i in range(threads + 1)]
    pool = _row_pool(threads - 1)
    futures = [
        pool.submit(np.matmul, x[a:b], weight.T, out=out[a:b]) for a, b in itertools.pairwise(bounds[1:])
    ]
    np.matmul(x[: bounds[1]], weight.T, out=out[: bounds[1]])
    for future in futures:
        future.result()
    return out


def _row_pool(workers: int) -> ThreadPoolExecutor:
    with _pool_lock:
        if workers not in _pools:
            _pools[workers] = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="engine-blas-rows")
        return _pools[workers]


_pools: dict[int, ThreadPoolExecutor] = {}
_pool_lock = threading.Lock()


def blas_linear(x: np.ndarray, weight: np.ndarray) -> np.ndarray:
    """x [R, in] times weight [out, in] with OpenBLAS.

    One row is a plain GEMV (OpenBLAS threads it and streams the weights at memory bandwidth).
    Several rows run as weight @ x.T in blocks of BLAS_BLOCK_ROWS weight rows: as one product
    OpenBLAS packs the whole weight matrix into a buffer per call, reading and writing it again,
    while a block's packing stays in cache."""
    rows = x.shape[0]
    if rows == 1:
        return x @ weight.T
    out_t = np.empty((weight.shape[0], rows), dtype=x.dtype)
    x_t = x.T
    for start in range(0, weight.shape[0], BLAS_BLOCK_ROWS):
        np.matmul(weight[start : start + BLAS_BLOCK_ROWS], x_t, out=out_t[start : start + BLAS_BLOCK_ROWS])
    return np.ascontiguousarray(out_t.T)
