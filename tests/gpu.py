"""Whether this machine has a CUDA GPU that CuPy and CTranslate2 can use, for the CUDA tests.

CI has no GPU, so those tests are skipped there; on a GPU machine `make test-cuda` runs them
(benchmarks/RESULTS.md quotes such a run).
"""

from __future__ import annotations

import functools
import importlib.util

import pytest

SKIP_REASON = "no CUDA GPU here (CI has none): run `make test-cuda` on a GPU machine"


@functools.cache
def cupy_gpu() -> bool:
    if importlib.util.find_spec("cupy") is None:
        return False
    import cupy

    try:
        return int(cupy.cuda.runtime.getDeviceCount()) > 0
    except cupy.cuda.runtime.CUDARuntimeError:
        return False


@functools.cache
def ct2_gpu() -> bool:
    import ctranslate2

    return int(ctranslate2.get_cuda_device_count()) > 0


needs_cupy = pytest.mark.skipif(not cupy_gpu(), reason=SKIP_REASON)
needs_gpu = pytest.mark.skipif(not (cupy_gpu() and ct2_gpu()), reason=SKIP_REASON)
