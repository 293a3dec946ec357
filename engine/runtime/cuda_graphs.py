"""CUDA graphs for the decoder step: one launch instead of ~500 small ones.

Measured on an H100 (benchmarks/RESULTS.md, "CUDA"): a FLAN-T5-small decoder step launched one
CuPy operation at a time takes 15-18 ms at any batch size, all of it launch and Python overhead.
A graph captures the step once and replays it for each token:

- **Fixed shapes.** The captured step attends over the cache's whole capacity (the past bias masks
  the positions not filled yet), so one graph serves every step of a batch whose membership does
  not change. A join or a leave replaces the cache's arrays; the graph is captured again once the
  new membership has held for ``STABLE_STEPS`` steps (until then steps run eagerly).
- **Fixed addresses.** Token ids and the past bias are copied into the graph's own input buffers
  before each replay. Everything the step allocates comes from a private memory pool that lives as
  long as the graph, so no other array ever reuses memory a replay writes.
- **Products through cuBLAS directly** (``CublasGemm``). CuPy refuses every cuBLAS call during
  stream capture, its low-level ``cupy_backends`` bindings too ("calling cuBLAS API during stream
  capture is currently unsupported", CuPy 14.2 on an H100), although cuBLAS itself supports
  capture. So ``CtypesCublas`` calls the cuBLAS library that CuPy loaded through ctypes, and
  ``CublasGemm`` computes the step's products with ``cublasGemmStridedBatchedEx`` in column-major
  terms; tests check that argument mapping on the CPU against an emulation of its semantics.
- **Checked before use.** The first graph's output is compared with the eager step's; a mismatch,
  or any error while capturing, turns graphs off for the runtime with a logged reason, and steps
  run eagerly as before.

**Status: experimental, off by default** (``Config.cuda_graphs``: ``ENGINE_CUDA_GRAPHS=1`` turns it
on for the server). The capture through CuPy's own bindings was refused on the GPU as described;
the ctypes route has not run on a GPU yet. ``make test-cuda`` on a GPU machine is the check (the
CUDA tests run eager and with graphs), and benchmarks/bench_cuda.py measures it against the eager
step.
"""

from __future__ import annotations

import contextlib
import logging
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

if TYPE_CHECKING:
    from engine.runtime.kv_cache import Array, DecoderCache, StepOutput
    from engine.runtime.t5 import T5Runtime

log = logging.getLogger(__name__)

STABLE_STEPS = 2  # eager steps with one batch membership before it is captured
WORKSPACE_BYTES = 32 << 20  # cuBLAS workspace, so that capture never makes it allocate
# cuBLAS / CUDA constants (cublas_api.h, library_types.h).
OP_N, OP_T = 0, 1
CUDA_R_32F, CUDA_R_16F = 0, 2
CUBLAS_COMPUTE_32F = 68
CUBLAS_GEMM_DEFAULT = -1
_DATA_TYPES = {np.dtype(np.float32): CUDA_R_32F, np.dtype(np.float16): CUDA_R_16F}
# The first graph's output against the eager step's, relative to the largest magnitude.
_CHECK_TOLERANCE = {np.dtype(np.float32): 1e-3, np.dtype(np.float16): 3e-2}


class Gemm(Protocol):
    def matmul(self, a: Array, b: Array, transpose_b: bool = False) -> Array: ...


class CublasGemm:
    """a @ b (or a @ b^T) over matching leading batch dimensions, by one
    ``cublasGemmStridedBatchedEx`` call on the current stream (float32 accumulation).

    Row-major C = A B is column-major C^T = B^T A^T, so the call passes B first: with
    M x K = A's last two dimensions and N the output's columns,
    ``gemm(op_b, N, N, M, K, B, ldb, A, lda=K, C, ldc=N)``, op_b = T (B stored N x K) or N (K x N).
    """

    def __init__(self, cupy: Any, cublas: Any, dtype: Any) -> None:
        self.cp = cupy
        self.cublas = cublas
        self.dtype = np.dtype(dtype)
        if self.dtype not in _DATA_TYPES:
            raise ValueError(f"no cuBLAS data type for {self.dtype}")
        self.data_type = _DATA_TYPES[self.dtype]
        self.handle = cublas.create()
        self.workspace = cupy.empty(WORKSPACE_BYTES, dtype=cupy.uint8)
        set_workspace = getattr(cublas, "setWorkspace", None)
        if set_workspace is not None:
            set_workspace(self.handle, _ptr(self.workspace), WORKSPACE_BYTES)
        # Host scalars (pointer mode host): their values are read when a call is made or captured.
        self._one = np.ones(1, dtype=np.float32)
        self._zero = np.zeros(1, dtype=np.float32)

    def linear(self, x: Array, weight: Array) -> Array:
        """x [R, in] times weight [out, in] -> [R, out] (``t5_math.Matmul``)."""
        return self.matmul(x, weight, transpose_b=True)

    def matmul(self, a: Array, b: Array, transpose_b: bool = False) -> Array:
        cp = self.cp
        a = cp.ascontiguousarray(a)
        b = cp.ascontiguousarray(b)
        *batch_a, m, k = a.shape
        *batch_b, rows_b, cols_b = b.shape
        n = rows_b if transpose_b else cols_b
        if tuple(batch_a) != tuple(batch_b) or (cols_b if transpose_b else rows_b) != k:
            raise ValueError(f"cannot multiply {a.shape} by {b.shape} (transpose_b={transpose_b})")
        count = int(np.prod(batch_a, dtype=np.int64)) if batch_a else 1
        out = cp.empty((*batch_a, m, n), dtype=self.dtype)
        self.cublas.gemmStridedBatchedEx(
            self.handle,
            OP_T if transpose_b else OP_N,
            OP_N,
            n,
            m,
            k,
            self._one.ctypes.data,
            _ptr(b),
            self.data_type,
            k if transpose_b else n,
            n * k,
            _ptr(a),
            self.data_type,
            k,
            m * k,
            self._zero.ctypes.data,
            _ptr(out),
            self.data_type,
            n,
            m * n,
            count,
            CUBLAS_COMPUTE_32F,
            CUBLAS_GEMM_DEFAULT,
        )
        return out


class CtypesCublas:
    """The cuBLAS entry points the graph path needs, called through ctypes on the library
    CuPy already loaded (same process, same soname), with the argument order of CuPy's
    ``cupy_backends.cuda.libs.cublas`` functions so that ``CublasGemm`` takes either."""

    SONAMES = ("libcublas.so.13", "libcublas.so.12", "libcublas.so")

    def __init__(self) -> None:
        import ctypes

        # CuPy's own binding loads its cuBLAS into the process: dlopen by soname then finds it.
        with contextlib.suppress(ImportError):
            import cupy_backends.cuda.libs.cublas  # noqa: F401
        self._ct = ctypes
        errors = []
        for name in self.SONAMES:
            try:
                lib = ctypes.CDLL(name)
                break
            except OSError as exc:
                errors.append(str(exc))
        else:
            raise OSError(f"no cuBLAS library could be loaded: {'; '.join(errors)}")
        vp, i32, i64, sz = ctypes.c_void_p, ctypes.c_int, ctypes.c_longlong, ctypes.c_size_t
        self._create = lib.cublasCreate_v2
        self._create.argtypes = [ctypes.POINTER(vp)]
        self._set_stream = lib.cublasSetStream_v2
        self._set_stream.argtypes = [vp, vp]
        self._set_workspace = getattr(lib, "cublasSetWorkspace_v2", None)
        if self._set_workspace is not None:
            self._set_workspace.argtypes = [vp, vp, sz]
        self._gemm = lib.cublasGemmStridedBatchedEx
        self._gemm.argtypes = [
            vp, i32, i32, i32, i32, i32, vp,
            vp, i32, i32, i64,
            vp, i32, i32, i64,
            vp, vp, i32, i32, i64,
            i32, i32, i32,
        ]  # fmt: skip
        for fn in (self._create, self._set_stream, self._gemm, self._set_workspace):
            if fn is not None:
                fn.restype = i32

    @staticmethod
    def _check(status: int, what: str) -> None:
        if status != 0:
            raise RuntimeError(f"{what} failed with cuBLAS status {status}")

    def create(self) -> int:
        handle = self._ct.c_void_p()
        self._check(self._create(self._ct.byref(handle)), "cublasCreate")
        return int(handle.value or 0)

    def setWorkspace(self, handle: int, workspace: int, size: int) -> None:
        if self._set_workspace is not None:
            self._check(self._set_workspace(handle, workspace, size), "cublasSetWorkspace")

    def gemmStridedBatchedEx(self, handle: int, *args: int) -> None:
        """As cublasGemmStridedBatchedEx, on the current CuPy stream (as CuPy's binding does)."""
        import cupy

        self._check(self._set_stream(handle, cupy.cuda.get_current_stream().ptr), "cublasSetStream")
        self._check(self._gemm(handle, *args), "cublasGemmStridedBatchedEx")


def _ptr(array: Any) -> int:
    """The device address of a CuPy array (or the host address of a numpy one, for tests)."""
    data = array.data
    return int(data.ptr) if hasattr(data, "ptr") else int(array.ctypes.data)


class _Captured:
    """One captured step: the graph, its input buffers, its outputs and the memory they live in."""

    def __init__(
        self, graph: Any, pool: Any, tokens: Array, bias: Array, out: StepOutput, bound: tuple[Any, ...]
    ) -> None:
        self.graph = graph
        self.pool = pool
        self.tokens = tokens
        self.bias = bias
        self.out = out
        self.bound = bound  # the cache arrays the graph reads: kept alive, compared by identity


class DecoderGraphs:
    """The CUDA-graph path of ``T5Runtime.decoder_step`` (see the module docstring)."""

    def __init__(self, runtime: T5Runtime) -> None:
        self.rt = runtime
        self.disabled: str | None = None
        self.captures = 0
        self.replays = 0
        self._checked = False
        self._pending: tuple[Any, ...] | None = None
        self._pending_steps = 0
        self._current: _Captured | None = None
        try:
            import cupy

            self.cp: Any = cupy
            self.gemm = CublasGemm(cupy, CtypesCublas(), runtime.dtype)
            self.stream = cupy.cuda.Stream(non_blocking=True)
        except Exception as exc:  # CuPy without cuBLAS bindings, or no device: eager steps
            self._disable(f"unavailable ({type(exc).__name__}: {exc})")

    def status(self) -> str:
        if self.disabled is not None:
            return f"off: {self.disabled}"
        return f"on ({self.captures} captures, {self.replays} replays)"

    def step(self, cache: DecoderCache, tokens: np.ndarray) -> StepOutput | None:
        """The step by graph replay, or None where this step runs eagerly."""
        if self.disabled is not None:
            return None
        bound = (cache.self_k, cache.self_v, cache.cross_k, cache.cross_v, cache.cross_bias, tokens.shape)
        try:
            current = self._current
            if current is None or not _same(current.bound, bound):
                if self._pending is None or not _same(self._pending, bound):
                    self._pending, self._pending_steps = bound, 0
                self._pending_steps += 1
                if self._pending_steps <= STABLE_STEPS:
                    return None
                self._pending = None
                current = self._capture(cache, tokens, bound)
                if not self._checked:
                    self._check(current, cache, tokens)
            return self._replay(current, cache, tokens)
        except Exception as exc:
            self._disable(f"{type(exc).__name__}: {exc}")
            return None

    def release(self) -> None:
        """Drop the captured graph and its memory (after the work queued on it is done)."""
        current, self._current = self._current, None
        if current is not None:
            self.stream.synchronize()
            current.pool.free_all_blocks()

    # ------------------------------------------------------------------ internals
    def _capture(self, cache: DecoderCache, tokens: np.ndarray, bound: tuple[Any, ...]) -> _Captured:
        cp, rt = self.cp, self.rt
        self.release()
        batch, m = tokens.shape
        width = cache.capacity
        pool = cp.cuda.MemoryPool()
        own_bias = rt.own_bias()
        # The cache's last writes (commit, on the caller's stream) come before anything here.
        self.stream.wait_event(cp.cuda.get_current_stream().record())
        with cp.cuda.using_allocator(pool.malloc), self.stream:
            token_buf = cp.asarray(tokens.reshape(-1).astype(np.int64))
            bias_buf = cp.asarray(rt.past_bias_host(cache.lengths, width))
            # One step outside the capture first: every kernel it needs is compiled and loaded
            # (none may load during capture), and the pool holds the memory the capture takes.
            rt.step_on_device(cache, token_buf, (batch, m), bias_buf, own_bias, width, self.gemm)
            self.stream.synchronize()
            self.stream.begin_capture()
            try:
                out = rt.step_on_device(cache, token_buf, (batch, m), bias_buf, own_bias, width, self.gemm)
            finally:
                graph = self.stream.end_capture()
        self.captures += 1
        self._current = _Captured(graph, pool, token_buf, bias_buf, out, bound)
        return self._current

    def _replay(self, current: _Captured, cache: DecoderCache, tokens: np.ndarray) -> StepOutput:
        cp = self.cp
        caller = cp.cuda.get_current_stream()
        # Ordered after the caller's earlier work (the last commit), and before its next.
        self.stream.wait_event(caller.record())
        with self.stream:
            current.tokens.set(tokens.reshape(-1).astype(np.int64))
            current.bias.set(self.rt.past_bias_host(cache.lengths, cache.capacity))
            current.graph.launch(self.stream)
        caller.wait_event(self.stream.record())
        self.replays += 1
        return current.out

    def _check(self, current: _Captured, cache: DecoderCache, tokens: np.ndarray) -> None:
        """The first graph's output against the eager step's on the same inputs."""
        expected = self.rt.eager_step(cache, tokens)
        got = self._replay(current, cache, tokens)
        tolerance = _CHECK_TOLERANCE[np.dtype(self.rt.dtype)]
        for name in ("hidden", "new_k", "new_v"):
            want, have = getattr(expected, name), getattr(got, name)
            scale = float(self.cp.abs(want).max()) or 1.0
            error = float(self.cp.abs(have.astype(np.float32) - want.astype(np.float32)).max()) / scale
            if not error <= tolerance:
                raise RuntimeError(
                    f"the captured step's {name} differs from the eager step's by {error:.2e} "
                    f"of its largest value (tolerance {tolerance:.0e})"
                )
        self._checked = True
        log.info("decoder steps replay a CUDA graph (checked against the eager step)")

    def _disable(self, reason: str) -> None:
        self.disabled = reason
        log.warning("CUDA graphs off for the contrastive decoder, steps run eagerly: %s", reason)
        try:
            self.release()
        except Exception:  # a broken capture may leave the stream unusable; nothing more to free
            self._current = None


def _same(a: tuple[Any, ...], b: tuple[Any, ...]) -> bool:
    """Same arrays (by identity) and the same token shape."""
    return len(a) == len(b) and all(x is y for x, y in zip(a[:-1], b[:-1], strict=True)) and a[-1] == b[-1]
