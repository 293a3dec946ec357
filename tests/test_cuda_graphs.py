"""The CUDA-graph decoder step's parts that a CPU can check (engine/runtime/cuda_graphs.py).

- ``CublasGemm``'s column-major argument mapping, against a numpy emulation of
  ``cublasGemmStridedBatchedEx`` that reads and writes the arrays' memory the way cuBLAS does.
- The fixed-shape step (attending over the cache's whole capacity, products through the gemm)
  equals the eager step.
Capture and replay themselves need a GPU: test_cuda.py runs the contrastive ids through them.
"""

from __future__ import annotations

import ctypes
from types import ModuleType, SimpleNamespace
from typing import Any

import numpy as np
import pytest

from engine.runtime import cuda_graphs
from engine.runtime import t5 as t5_module
from engine.runtime.cuda_graphs import CUDA_R_16F, CUDA_R_32F, OP_N, CublasGemm
from engine.runtime.t5 import T5Runtime
from tests import models

_NP_TYPES = {CUDA_R_32F: np.float32, CUDA_R_16F: np.float16}


def _column_major(address: int, dtype: Any, rows: int, cols: int, ld: int) -> np.ndarray:
    """A writable view of the column-major rows x cols matrix at ``address`` (leading dimension ld)."""
    itemsize = np.dtype(dtype).itemsize
    buffer = memoryview((ctypes.c_char * (cols * ld * itemsize)).from_address(address)).cast("B")
    return np.frombuffer(buffer, dtype=dtype).reshape(cols, ld)[:, :rows].T


class FakeCublas:
    """cublasGemmStridedBatchedEx's documented semantics, on host memory (numpy arrays' addresses)."""

    def __init__(self) -> None:
        self.calls = 0

    def create(self) -> int:
        return 1

    def setWorkspace(self, handle: int, workspace: int, size: int) -> None:
        pass

    def gemmStridedBatchedEx(
        self, handle: int, transa: int, transb: int, m: int, n: int, k: int, alpha: int,
        a: int, a_type: int, lda: int, stride_a: int,
        b: int, b_type: int, ldb: int, stride_b: int,
        beta: int, c: int, c_type: int, ldc: int, stride_c: int,
        batch: int, compute: int, algo: int,
    ) -> None:  # fmt: skip
        self.calls += 1
        alpha_v = ctypes.c_float.from_address(alpha).value
        beta_v = ctypes.c_float.from_address(beta).value
        ta, tb, tc = _NP_TYPES[a_type], _NP_TYPES[b_type], _NP_TYPES[c_type]
        size_a, size_b, size_c = (np.dtype(t).itemsize for t in (ta, tb, tc))
        for i in range(batch):
            # op(A) is m x k: A itself is m x k (N) or k x m (T), column-major with leading dim lda.
            mat_a = _column_major(a + i * stride_a * size_a, ta, *((m, k) if transa == OP_N else (k, m)), lda)
            mat_b = _column_major(b + i * stride_b * size_b, tb, *((k, n) if transb == OP_N else (n, k)), ldb)
            op_a = mat_a if transa == OP_N else mat_a.T
            op_b = mat_b if transb == OP_N else mat_b.T
            mat_c = _column_major(c + i * stride_c * size_c, tc, m, n, ldc)
            product = op_a.astype(np.float64) @ op_b.astype(np.float64)
            if beta_v != 0:  # as cuBLAS: with beta 0, C is written, never read (it may hold NaNs)
                product = alpha_v * product + beta_v * mat_c.astype(np.float64)
            else:
                product = alpha_v * product
            mat_c[...] = product.astype(tc)


def numpy_as_cupy() -> ModuleType:
    fake = ModuleType("cupy")
    fake.__dict__.update({k: v for k, v in np.__dict__.items() if not k.startswith("__")})
    return fake


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
@pytest.mark.parametrize(
    ("a_shape", "b_shape", "transpose_b"),
    [
        ((5, 7), (3, 7), True),  # a linear layer: x [R, in] by weight [out, in]
        ((1, 64), (96, 64), True),
        ((2, 3, 4, 16), (2, 3, 9, 16), True),  # attention scores: q by K^T
        ((2, 3, 4, 9), (2, 3, 9, 16), False),  # attention output: p by V
        ((3, 1, 5), (3, 5, 2), False),
    ],
)
def test_cublas_gemm_arguments_compute_the_row_major_product(
    dtype: Any, a_shape: tuple[int, ...], b_shape: tuple[int, ...], transpose_b: bool
) -> None:
    rng = np.random.default_rng(0)
    a = rng.standard_normal(a_shape).astype(dtype)
    b = rng.standard_normal(b_shape).astype(dtype)
    cublas = FakeCublas()
    gemm = CublasGemm(numpy_as_cupy(), cublas, dtype)
    got = gemm.matmul(a, b, transpose_b=transpose_b)
    expected = np.matmul(
        a.astype(np.float64), (np.swapaxes(b, -1, -2) if transpose_b else b).astype(np.float64)
    )
    assert got.dtype == dtype and got.shape == expected.shape and cublas.calls == 1
    np.testing.assert_allclose(
        got, expected, rtol=2e-3 if dtype == np.float16 else 1e-5, atol=1e-2 if dtype == np.float16 else 1e-5
    )
    # Views that are not contiguous (a transposed q, as the decoder passes) are copied first.
    if len(a_shape) == 4:
        q = np.ascontiguousarray(a.transpose(0, 2, 1, 3)).transpose(0, 2, 1, 3)
        assert not q.flags.c_contiguous
        np.testing.assert_allclose(gemm.matmul(q, b, transpose_b=transpose_b), got, rtol=1e-6)
    with pytest.raises(ValueError, match="cannot multiply"):
        gemm.matmul(a, b[..., :1, :1], transpose_b=not transpose_b)


@pytest.fixture
def standin_runtime(monkeypatch: pytest.MonkeyPatch) -> T5Runtime:
    """The CUDA code path on a numpy stand-in for CuPy (plain device arrays, no compiled kernel)."""
    fake = numpy_as_cupy()
    monkeypatch.setattr(t5_module, "array_module", lambda device: np if device == "cpu" else fake)
    runtime = T5Runtime.load(models.converted_model("flan", "float32"), device="cuda")
    assert runtime.xp is fake
    assert runtime.graph_status() == "off"  # experimental: off unless ENGINE_CUDA_GRAPHS=1
    runtime.use_cuda_graphs(True)
    # No CuPy here: graphs say why they are off, and steps run eagerly.
    assert runtime.graph_status().startswith("off: unavailable")
    return runtime


def test_fixed_shape_step_through_the_gemm_equals_the_eager_step(standin_runtime: T5Runtime) -> None:
    rt = standin_runtime
    prompts = models.prompts(3, (4, 12, 7))
    cache = rt.new_cache([rt.encode(p) for p in prompts], capacity=9)
    for step in range(5):  # lengths 0..4: the first step has no past at all
        tokens = np.array([[0 if step == 0 else 5 + step + r, 40 + r] for r in range(len(prompts))])
        eager = rt.eager_step(cache, tokens)
        bias = rt.xp.asarray(rt.past_bias_host(cache.lengths, cache.capacity))
        ids = rt.xp.asarray(tokens.reshape(-1))
        cublas = FakeCublas()
        gemm = CublasGemm(rt.xp, cublas, rt.dtype)
        fixed = rt.step_on_device(cache, ids, tokens.shape, bias, rt.own_bias(), cache.capacity, gemm)
        # Every product of every layer through the gemm: 6 linear layers and 4 attention products.
        assert cublas.calls == len(rt.decoder) * 10
        for name in ("hidden", "unit_hidden", "new_k", "new_v"):
            np.testing.assert_allclose(getattr(fixed, name), getattr(eager, name), rtol=1e-4, atol=1e-5)
        cache.commit(eager, np.zeros(len(prompts), dtype=np.int64))


def test_graph_status_when_off(standin_runtime: T5Runtime) -> None:
    standin_runtime.use_cuda_graphs(False)
    assert standin_runtime.graph_status() == "off"
    cpu = T5Runtime.load(models.converted_model("flan", "float32"))
    assert cpu.graph_status() == "off (CPU)"
    with pytest.raises(Exception, match="device cuda"):
        cpu.use_cuda_graphs(True)


def test_graphs_turn_themselves_off_on_any_error(
    standin_runtime: T5Runtime, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A capture that fails leaves the runtime on eager steps, with the reason in its status."""
    graphs = cuda_graphs.DecoderGraphs.__new__(cuda_graphs.DecoderGraphs)
    graphs.__dict__.update(
        rt=standin_runtime, disabled=None, captures=0, replays=0, _checked=False, _pending=None,
        _pending_steps=0, _current=None, cp=SimpleNamespace(), stream=SimpleNamespace(),
    )  # fmt: skip

    def broken_capture(*args: object) -> None:
        raise RuntimeError("cudaErrorStreamCaptureUnsupported")

    monkeypatch.setattr(graphs, "_capture", broken_capture)
    standin_runtime._graphs = graphs
    cache = standin_runtime.new_cache([standin_runtime.encode(models.prompts(4, (5,))[0])], capacity=6)
    tokens = np.array([[0]])
    eager = standin_runtime.eager_step(cache, tokens)
    for _ in range(cuda_graphs.STABLE_STEPS + 1):  # eager until stable, then the capture fails
        out = standin_runtime.decoder_step(cache, tokens)
        np.testing.assert_array_equal(out.hidden, eager.hidden)
    assert standin_runtime.graph_status() == "off: RuntimeError: cudaErrorStreamCaptureUnsupported"


def test_ctypes_cublas_says_when_no_library_loads() -> None:
    try:
        cuda_graphs.CtypesCublas()
    except OSError as exc:
        assert "no cuBLAS library could be loaded" in str(exc)
    else:
        pytest.skip("a cuBLAS library is installed here")
