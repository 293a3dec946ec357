"""Contrastive search's candidates in the compiled kernel: a row's top k by softmax in one call.

Why: ``Contrastive.choose`` (engine/runtime/choosers.py) took, for every sequence and step, a
float32 softmax over the whole vocabulary and then k argmax passes: about 53 us a row at 32,128
entries and k = 4, some 27 ms of a 305 ms contrastive call at batch 8 with 64 new tokens (2-core
AMD EPYC). The kernel (engine/runtime/_choose.c) takes the row's maximum, then sums exp(x - max)
while it picks the top k by logit, and divides out only the candidates' probabilities:
benchmarks/bench_choose.py times both (about 6.5 us against 38 us a row at k = 4 there).

What it returns is choosers.top_k(softmax_rows(...)) 's answer: the ids in torch.topk's order
(largest probability first, equal probabilities by lower index), the probabilities within float32
rounding of numpy's (another exp, another summation order); where rounding makes different logits
give equal probabilities, the lower index still comes first (_choose.c says how).
tests/test_choose_ops.py holds it to the numpy path and to its own exact path.

The C side is built into the same extension as the linear kernel, so it is there exactly when
``qlinear.kernel_available()``, and ``qlinear.use_kernel(False)`` turns it off with the rest;
``available()`` says whether to call it, the numpy functions stay the reference and the fallback.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence

import numpy as np

from engine.runtime import qlinear


class Path(enum.IntEnum):
    """Which way the kernel answered (for tests and benchmarks)."""

    FAST = 0  # selection on logits, the candidates' probabilities only
    EXACT = 1  # every probability computed, sorted by (probability, index)
    NOT_FINITE = 2  # a NaN or an infinite maximum: ids 0..k-1, NaN probabilities (as numpy)


_ON = True


def use(on: bool) -> None:
    """Let choosers take the kernel where it runs (True, the default) or keep them on numpy's path
    (False): for benchmarks/bench_choose.py's side-by-side timing. ``qlinear.use_kernel(False)``
    turns it off as well, with the rest of the kernel."""
    global _ON
    _ON = on


def available() -> bool:
    """Whether to call the kernel: switched on here and in qlinear, loaded, and built with
    _choose.c (an extension built before it lacks the function: `python setup.py build_ext
    --inplace` rebuilds it)."""
    return _ON and qlinear._KERNEL is not None and hasattr(qlinear._KERNEL, "top_k_softmax")


def available_for(function: str) -> bool:
    """``available()``, and the loaded kernel has ``function`` (an extension built before a
    function was added lacks it)."""
    return available() and hasattr(qlinear._KERNEL, function)


def top_k_softmax(scores: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The ids [k] (int64) of the k most probable entries of softmax(scores) and their probabilities
    [k] (float32): ``scores`` one row of float32 logits [V], 1 <= k <= V. The hot path of a
    contrastive step: call only where ``available()``."""
    ids, probs, _ = _run(scores, k, exact=False)
    return ids, probs


def top_k_softmax_rows(rows: Sequence[np.ndarray], k: int, threads: int) -> tuple[np.ndarray, np.ndarray]:
    """``top_k_softmax`` of every row in one call, the rows split over ``threads``: ids [n, k]
    (int64) and probabilities [n, k] (float32), row i's the same as ``top_k_softmax(rows[i], k)``.
    Each row a 1-D float32 array of at least k entries (rows need not be the same length)."""
    kernel = qlinear._KERNEL
    if kernel is None or not hasattr(kernel, "top_k_softmax_rows"):
        status = qlinear.kernel_status() if kernel is None else "built without top_k_softmax_rows: rebuild it"
        raise RuntimeError(f"the compiled kernel is not in use: {status}")
    for i, row in enumerate(rows):
        if row.dtype != np.float32 or row.ndim != 1:
            raise ValueError(f"row {i} must be a 1-D float32 array, got {row.ndim}-D {row.dtype}")
        if not 1 <= k <= row.shape[0]:
            raise ValueError(f"k must be between 1 and row {i}'s size {row.shape[0]}, got {k}")
    ids = np.empty((len(rows), k), dtype=np.int64)
    probs = np.empty((len(rows), k), dtype=np.float32)
    kernel.top_k_softmax_rows([np.ascontiguousarray(r) for r in rows], k, ids, probs, max(1, threads))
    return ids, probs


def top_k_softmax_path(
    scores: np.ndarray, k: int, *, exact: bool = False
) -> tuple[np.ndarray, np.ndarray, Path]:
    """``top_k_softmax`` and which path answered; ``exact`` forces the path that computes every
    probability (the reference the fast path is tested against)."""
    ids, probs, path = _run(scores, k, exact=exact)
    return ids, probs, Path(path)


def _run(scores: np.ndarray, k: int, *, exact: bool) -> tuple[np.ndarray, np.ndarray, int]:
    kernel = qlinear._KERNEL
    if kernel is None or not hasattr(kernel, "top_k_softmax"):
        status = qlinear.kernel_status() if kernel is None else "built without _choose.c: rebuild it"
        raise RuntimeError(f"the compiled kernel is not in use: {status}")
    if scores.dtype != np.float32 or scores.ndim != 1:
        raise ValueError(f"scores must be a 1-D float32 array, got {scores.ndim}-D {scores.dtype}")
    if not 1 <= k <= scores.shape[0]:
        raise ValueError(f"k must be between 1 and the row's size {scores.shape[0]}, got {k}")
    ids = np.empty(k, dtype=np.int64)
    probs = np.empty(k, dtype=np.float32)
    path = kernel.top_k_softmax(np.ascontiguousarray(scores), k, ids, probs, exact)
    return ids, probs, int(path)


def degeneration_penalty(
    unit_hidden: np.ndarray, context: np.ndarray, lengths: np.ndarray, threads: int = 1
) -> np.ndarray:
    """Contrastive search's degeneration penalty in the kernel: max over t < lengths[b] of
    unit_hidden[b, i] . context[b, t], as float32 [B, m] (-inf for an empty context).
    ``unit_hidden`` [B, m, d] and ``context`` [B, cap, d] float32 (unit-normalized hidden states),
    ``lengths`` int64 [B]; the sequences split over ``threads`` (each one's answer the same). Within
    float32 rounding of choosers.degeneration_penalty (another summation order than BLAS's); call
    only where ``available()``."""
    kernel = qlinear._KERNEL
    if kernel is None or not hasattr(kernel, "degeneration_penalty"):
        status = qlinear.kernel_status() if kernel is None else "built without _choose.c: rebuild it"
        raise RuntimeError(f"the compiled kernel is not in use: {status}")
    if unit_hidden.ndim != 3 or context.ndim != 3 or unit_hidden.shape[2] != context.shape[2]:
        raise ValueError(
            f"unit_hidden must be [B, m, d] and context [B, cap, d], got {unit_hidden.shape} and {context.shape}"
        )
    if unit_hidden.dtype != np.float32 or context.dtype != np.float32:
        raise ValueError(
            f"unit_hidden and context must be float32, got {unit_hidden.dtype} and {context.dtype}"
        )
    batch, m, d = unit_hidden.shape
    if context.shape[0] != batch or lengths.shape != (batch,):
        raise ValueError(
            f"context and lengths must have {batch} sequences, got {context.shape[0]} and {lengths.shape}"
        )
    out = np.empty((batch, m), dtype=np.float32)
    kernel.degeneration_penalty(
        np.ascontiguousarray(unit_hidden),
        np.ascontiguousarray(context),
        np.ascontiguousarray(lengths, dtype=np.int64),
        out,
        batch,
        m,
        context.shape[1],
        d,
        max(1, threads),
    )
    return out
