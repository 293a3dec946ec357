"""The compiled top-k softmax (engine/runtime/choose_ops.py, _choose.c) against choosers.py's numpy
path (softmax_rows, top_k: the reference and the fallback) and against its own exact path; the
compiled degeneration penalty against choosers.degeneration_penalty's numpy path."""

from __future__ import annotations

import numpy as np
import pytest

from engine.runtime import choose_ops, qlinear
from engine.runtime.choose_ops import Path
from engine.runtime.choosers import Contrastive, degeneration_penalty, softmax_rows, top_k
from engine.runtime.decoder_batch import run_on_decoder
from engine.runtime.params import DecodingParams
from engine.runtime.result import GenerationRequest
from engine.runtime.t5 import T5Runtime
from tests import models

pytestmark = pytest.mark.skipif(
    not choose_ops.available(),
    reason=f"no top_k_softmax here (kernel: {qlinear.kernel_status()}; an extension built before "
    "_choose.c existed needs `python setup.py build_ext --inplace`)",
)
# numpy's and the kernel's probabilities: another exp (each within about 1 ulp) and another
# summation order over up to 32,128 terms.
PROB_RTOL = 2e-6
SIZES = (1, 7, 16, 17, 100, 1000, 4097, 32128)


def numpy_path(x: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    probs = softmax_rows(x[None])[0]
    ids = top_k(probs, k)
    return ids, probs[ids]


def check(x: np.ndarray, k: int) -> Path:
    """The kernel gives numpy's ids and (within rounding) probabilities, and its fast path gives
    its exact path's answer bit for bit."""
    ids, probs, path = choose_ops.top_k_softmax_path(x, k)
    want_ids, want_probs = numpy_path(x, k)
    np.testing.assert_array_equal(ids, want_ids, err_msg=f"V={x.shape[0]} k={k}")
    np.testing.assert_allclose(probs, want_probs, rtol=PROB_RTOL, atol=0)
    exact_ids, exact_probs, exact_path = choose_ops.top_k_softmax_path(x, k, exact=True)
    assert exact_path is Path.EXACT
    np.testing.assert_array_equal(ids, exact_ids)
    np.testing.assert_array_equal(probs, exact_probs)
    return path


def ks(size: int) -> list[int]:
    return sorted({k for k in (*range(1, 9), 50, size) if k <= size})


@pytest.mark.parametrize("size", SIZES)
def test_random_rows_give_numpys_ids_and_probabilities(size: int) -> None:
    rng = np.random.default_rng(size)
    for scale in (0.5, 3.0, 12.0):
        x = (rng.standard_normal(size) * scale + rng.uniform(-20, 20)).astype(np.float32)
        for k in ks(size):
            path = check(x, k)
            assert path is (Path.FAST if k <= 256 else Path.EXACT)


@pytest.mark.parametrize("size", SIZES[2:])
def test_masked_tokens(size: int) -> None:
    """Rows where the processors set tokens to -inf (a banned n-gram, EOS before min_new_tokens):
    never among the candidates while enough others are left."""
    rng = np.random.default_rng(size + 1)
    x = (rng.standard_normal(size) * 4).astype(np.float32)
    masked = rng.random(size) < 0.3
    x[masked] = -np.inf
    top = int(np.argmax(x))
    x[top], masked[top] = -np.inf, True  # the largest logit masked too
    for k in ks(int((~masked).sum())):
        check(x, k)
        ids, _ = choose_ops.top_k_softmax(x, k)
        assert not masked[ids].any()


def test_exact_ties_go_to_the_lower_index() -> None:
    rng = np.random.default_rng(3)
    for size in SIZES[1:]:
        x = rng.integers(0, 6, size).astype(np.float32) / 5  # few distinct values: ties everywhere
        for k in ks(size):
            check(x, k)
            ids, _ = choose_ops.top_k_softmax(x, k)
            assert ids.tolist() == np.lexsort((np.arange(size), -x))[:k].tolist()
    # Ties exactly at the k-th place: which of the tied entries comes in is the lower index.
    x = np.zeros(40, dtype=np.float32)
    x[[3, 9, 30]] = 2.0
    x[[5, 11, 20, 35]] = 1.0
    assert choose_ops.top_k_softmax(x, 5)[0].tolist() == [3, 9, 30, 5, 11]
    check(x, 5)


@pytest.mark.parametrize("size", SIZES)
def test_all_equal_rows(size: int) -> None:
    x = np.full(size, -1.5, dtype=np.float32)
    for k in ks(size):
        check(x, k)
        ids, probs = choose_ops.top_k_softmax(x, k)
        assert ids.tolist() == list(range(k))
        np.testing.assert_allclose(probs, 1.0 / size, rtol=PROB_RTOL)


def test_one_token_left() -> None:
    """Everything but one token masked: it, then the lowest indices at probability 0 (numpy's order)."""
    x = np.full(1000, -np.inf, dtype=np.float32)
    x[417] = 3.0
    for k in (1, 2, 4, 8, 50):
        path = check(x, k)
        ids, probs = choose_ops.top_k_softmax(x, k)
        assert ids.tolist() == [417, *range(k - 1)]
        assert probs.tolist() == [1.0] + [0.0] * (k - 1)
        assert path is (Path.FAST if k == 1 else Path.EXACT)  # probability 0 at the k-th place


def test_logits_apart_whose_probabilities_round_equal() -> None:
    """Different logits, equal probabilities after rounding (in numpy and here): the lower index
    first, not the larger logit."""
    # exp(-1e-9) rounds to 1.0: entries 2 and 5 have the same probability.
    x = np.full(64, -4.0, dtype=np.float32)
    x[5], x[2] = 0.0, -1e-9
    assert choose_ops.top_k_softmax(x, 1)[0].tolist() == [2]
    assert choose_ops.top_k_softmax(x, 2)[0].tolist() == [2, 5]
    check(x, 1)
    check(x, 2)
    # 1e-9 - 5 rounds to -5 in float32: entries 3 and 7 have the same probability.
    x = np.full(64, -9.0, dtype=np.float32)
    x[0], x[7], x[3] = 5.0, 1e-9, 0.0
    assert choose_ops.top_k_softmax(x, 2)[0].tolist() == [0, 3]
    check(x, 2)


@pytest.mark.parametrize("base", [0.0, -3.0, 7.5, 1000.0, -20000.0])
def test_near_ties_give_the_exact_paths_answer(base: float) -> None:
    """Clusters of logits a few ulps apart around the k-th place: the selection on logits keeps
    whatever could round to a tie, so its answer is the exact path's, bit for bit."""
    rng = np.random.default_rng(int(abs(base)) + 5)
    for trial in range(40):
        size = int(rng.choice([33, 500, 32128]))
        x = (rng.standard_normal(size) * 2 + base - 4).astype(np.float32)
        top = np.float32(base + rng.uniform(0, 1e-3))
        near = rng.choice(size, 12, replace=False)
        steps = rng.integers(-6, 7, size=12)
        x[near] = top + steps.astype(np.float32) * np.spacing(top)  # within 6 ulps of one another
        x[rng.choice(size)] = np.float32(base + rng.uniform(0, 2))  # the maximum a little above
        for k in (1, 2, 4, 8, 11):
            ids, probs, path = choose_ops.top_k_softmax_path(x, k)
            exact_ids, exact_probs, _ = choose_ops.top_k_softmax_path(x, k, exact=True)
            np.testing.assert_array_equal(ids, exact_ids, err_msg=f"trial {trial} k={k}")
            np.testing.assert_array_equal(probs, exact_probs)
            assert path is Path.FAST


def test_a_band_too_wide_takes_the_exact_path() -> None:
    """More near-ties below the k-th place than the selection keeps: the exact path answers."""
    x = np.full(2000, -30.0, dtype=np.float32)
    x[100:400] = np.float32(1.0) - np.arange(300, dtype=np.float32) * np.spacing(np.float32(1.0))
    ids, probs, path = choose_ops.top_k_softmax_path(x, 4)
    assert path is Path.EXACT
    exact_ids, exact_probs, _ = choose_ops.top_k_softmax_path(x, 4, exact=True)
    np.testing.assert_array_equal(ids, exact_ids)
    np.testing.assert_array_equal(probs, exact_probs)
    np.testing.assert_allclose(probs, numpy_path(x, 4)[1], rtol=PROB_RTOL)


def test_probabilities_are_float64s_within_a_few_ulps() -> None:
    """Each probability against float64's exp and sum of the same float32 differences x - max."""
    rng = np.random.default_rng(11)
    for _ in range(200):
        x = (rng.standard_normal(16) * rng.choice([1.0, 10.0, 30.0])).astype(np.float32)
        _, probs, _ = choose_ops.top_k_softmax_path(x, 16, exact=True)
        e = np.exp((x - x.max()).astype(np.float64))
        want = np.sort(e / e.sum())[::-1]
        keep = want >= np.finfo(np.float32).tiny
        np.testing.assert_allclose(probs[keep], want[keep], rtol=2**-20, atol=0)


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_rows_with_nan_or_inf_are_numpys(bad: float) -> None:
    x = np.linspace(-3, 3, 100).astype(np.float32)
    x[40] = bad
    for k in (1, 4, 8):
        ids, probs, path = choose_ops.top_k_softmax_path(x, k)
        with np.errstate(invalid="ignore"):  # inf - inf
            want_ids, want_probs = numpy_path(x, k)
        assert path is Path.NOT_FINITE
        np.testing.assert_array_equal(ids, want_ids)
        assert np.isnan(probs).all() and np.isnan(want_probs).all()


def test_bad_arguments_say_what_to_fix() -> None:
    x = np.zeros(10, dtype=np.float32)
    with pytest.raises(ValueError, match="1-D float32"):
        choose_ops.top_k_softmax(x.astype(np.float64), 2)
    with pytest.raises(ValueError, match="1-D float32"):
        choose_ops.top_k_softmax(x[None], 2)
    for k in (0, 11):
        with pytest.raises(ValueError, match="between 1 and the row's size 10"):
            choose_ops.top_k_softmax(x, k)
    # A strided view is copied, not misread.
    wide = np.arange(20, dtype=np.float32)
    assert choose_ops.top_k_softmax(wide[::2], 2)[0].tolist() == [9, 8]


def test_contrastive_choose_takes_the_kernel_and_falls_back_to_numpy() -> None:
    chooser = Contrastive.for_request(DecodingParams.from_dict({"penalty_alpha": 0.6, "top_k": 4}), 1, 0)
    x = (np.random.default_rng(2).standard_normal(32128) * 3).astype(np.float32)
    ids, probs = chooser.choose(x.copy())
    try:
        qlinear.use_kernel(False)
        assert not choose_ops.available()
        with pytest.raises(RuntimeError, match="not in use"):
            choose_ops.top_k_softmax(x, 4)
        numpy_ids, numpy_probs = chooser.choose(x.copy())
    finally:
        qlinear.use_kernel(True)
    assert choose_ops.available()
    np.testing.assert_array_equal(ids, numpy_ids)
    np.testing.assert_allclose(probs, numpy_probs, rtol=PROB_RTOL)
    assert ids.dtype == numpy_ids.dtype and probs.dtype == numpy_probs.dtype


@pytest.mark.parametrize("kind", ["flan", "t5"])
def test_contrastive_search_gives_the_same_ids_with_and_without_it(
    kind: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    runtime = T5Runtime.load(models.converted_model(kind, "float32"), threads=2)
    params = DecodingParams.from_dict({"penalty_alpha": 0.6, "top_k": 4, "max_new_tokens": 16})
    requests = [GenerationRequest(p, params) for p in models.prompts(5, (9, 17, 4, 30))]
    calls = []
    kernel_top_k, kernel_rows = choose_ops.top_k_softmax, choose_ops.top_k_softmax_rows

    def counted(scores: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        calls.append(k)
        return kernel_top_k(scores, k)

    batched: list[int] = []  # rows per one-call step: the batch's path, not a row at a time

    def counted_rows(rows: list[np.ndarray], k: int, threads: int) -> tuple[np.ndarray, np.ndarray]:
        calls.extend([k] * len(rows))
        batched.append(len(rows))
        return kernel_rows(rows, k, threads)

    kernel_penalty = choose_ops.degeneration_penalty
    penalties: list[tuple[int, ...]] = []

    def counted_penalty(
        unit: np.ndarray, context: np.ndarray, lengths: np.ndarray, threads: int = 1
    ) -> np.ndarray:
        penalties.append(unit.shape)
        assert threads == runtime.threads  # the decoder's sequences split over its threads
        return kernel_penalty(unit, context, lengths, threads)

    monkeypatch.setattr(choose_ops, "top_k_softmax", counted)
    monkeypatch.setattr(choose_ops, "top_k_softmax_rows", counted_rows)
    monkeypatch.setattr(choose_ops, "degeneration_penalty", counted_penalty)
    with_kernel = [r.token_ids for r in run_on_decoder(runtime, requests)]
    assert calls and set(calls) == {4}
    assert batched and max(batched) == len(requests)  # every sequence's rows in one call
    assert penalties and {shape[1] for shape in penalties} == {4}
    calls.clear()
    penalties.clear()
    try:
        choose_ops.use(False)
        assert not choose_ops.available()
        without = [r.token_ids for r in run_on_decoder(runtime, requests)]
    finally:
        choose_ops.use(True)
    assert not calls and not penalties
    assert with_kernel == without
    assert all(len(row) > 0 for row in with_kernel)


def _unit(rng: np.random.Generator, *shape: int) -> np.ndarray:
    x = rng.standard_normal(shape).astype(np.float32)
    return (x / np.sqrt(np.square(x).sum(axis=-1, keepdims=True))).astype(np.float32)


def _numpy_penalty(unit: np.ndarray, context: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    try:
        choose_ops.use(False)
        return degeneration_penalty(unit, context, lengths)
    finally:
        choose_ops.use(True)


@pytest.mark.parametrize("m", [1, 4, 6])
@pytest.mark.parametrize("d", [512, 37])
def test_degeneration_penalty_is_numpys_within_rounding(m: int, d: int) -> None:
    """Five sequences of different context lengths (one empty: -inf, as numpy's masked max), more
    and fewer candidates than the kernel's four at a time, d with and without a 16-lane tail."""
    rng = np.random.default_rng(m * 100 + d)
    unit, context = _unit(rng, 5, m, d), _unit(rng, 5, 20, d)
    lengths = np.array([0, 1, 7, 20, 13], dtype=np.int64)
    context[2, 7:] = 1.0  # past the length: not context (a dot of up to sqrt(d) if it were read)
    got = choose_ops.degeneration_penalty(unit, context, lengths)
    want = _numpy_penalty(unit, context, lengths)
    assert got.shape == want.shape == (5, m) and got.dtype == want.dtype == np.float32
    assert np.all(got[0] == -np.inf)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)
    for threads in (2, 3, 8):  # sequences split over threads: each one's answer the same bits
        np.testing.assert_array_equal(choose_ops.degeneration_penalty(unit, context, lengths, threads), got)


def test_degeneration_penalty_nan_is_numpys() -> None:
    rng = np.random.default_rng(4)
    unit, context = _unit(rng, 3, 4, 64), _unit(rng, 3, 8, 64)
    lengths = np.array([8, 5, 3], dtype=np.int64)
    context[0, 2, 5] = np.nan  # inside sequence 0's context: its every candidate is NaN
    context[1, 6, 0] = np.nan  # past sequence 1's length: not read
    got = choose_ops.degeneration_penalty(unit, context, lengths)
    want = _numpy_penalty(unit, context, lengths)
    assert np.isnan(got[0]).all() and np.isnan(want[0]).all()
    assert not np.isnan(got[1:]).any()
    np.testing.assert_allclose(got[1:], want[1:], rtol=0, atol=1e-6)


def test_degeneration_penalty_bad_arguments_say_what_to_fix() -> None:
    unit, context = np.zeros((2, 4, 8), np.float32), np.zeros((2, 5, 8), np.float32)
    lengths = np.array([1, 2], dtype=np.int64)
    with pytest.raises(ValueError, match=r"\[B, m, d\]"):
        choose_ops.degeneration_penalty(unit, context[:, :, :4], lengths)
    with pytest.raises(ValueError, match="float32"):
        choose_ops.degeneration_penalty(unit.astype(np.float64), context, lengths)
    with pytest.raises(ValueError, match="sequences"):
        choose_ops.degeneration_penalty(unit, context[:1], lengths)
    with pytest.raises(ValueError, match="outside the context"):
        choose_ops.degeneration_penalty(unit, context, np.array([1, 6], dtype=np.int64))


@pytest.mark.parametrize("threads", [1, 2])
def test_top_k_softmax_rows_is_each_rows_answer(threads: int) -> None:
    """Rows of different lengths (one with a NaN, one with ties, one masked down to k entries) give
    top_k_softmax's answer row for row, bit for bit, whichever thread takes them."""
    rng = np.random.default_rng(threads)
    rows = [(rng.standard_normal(n) * 4).astype(np.float32) for n in (32128, 7, 1000, 32128, 4097, 16)]
    rows[1][2] = np.nan
    rows[2][:] = 1.5
    rows[3][4:] = -np.inf
    ids, probs = choose_ops.top_k_softmax_rows(rows, 4, threads)
    assert ids.shape == probs.shape == (len(rows), 4) and ids.dtype == np.int64 and probs.dtype == np.float32
    for i, row in enumerate(rows):
        want_ids, want_probs = choose_ops.top_k_softmax(row, 4)
        np.testing.assert_array_equal(ids[i], want_ids, err_msg=f"row {i}")
        np.testing.assert_array_equal(probs[i], want_probs, err_msg=f"row {i}")


def test_top_k_softmax_rows_bad_arguments_say_what_to_fix() -> None:
    good = np.zeros(10, np.float32)
    with pytest.raises(ValueError, match="row 1 must be a 1-D float32"):
        choose_ops.top_k_softmax_rows([good, good.astype(np.float64)], 2, 2)
    with pytest.raises(ValueError, match="row 1's size 3"):
        choose_ops.top_k_softmax_rows([good, good[:3]], 4, 2)
    ids, probs = choose_ops.top_k_softmax_rows([], 3, 2)
    assert ids.shape == probs.shape == (0, 3)


def test_contrastive_rows_are_chosen_in_one_call_and_as_one_at_a_time() -> None:
    params = DecodingParams.from_dict({"penalty_alpha": 0.6, "top_k": 4})
    choosers = [Contrastive.for_request(params, 1, i) for i in range(3)]
    rows = [(np.random.default_rng(i).standard_normal(32128) * 3).astype(np.float32) for i in range(3)]
    together = Contrastive.choose_rows(choosers, rows, 2)
    for (ids, probs), chooser, row in zip(together, choosers, rows, strict=True):
        want_ids, want_probs = chooser.choose(row.copy())
        np.testing.assert_array_equal(ids, want_ids)
        np.testing.assert_array_equal(probs, want_probs)
