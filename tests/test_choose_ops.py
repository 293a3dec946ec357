"""The compiled top-k softmax (engine/runtime/choose_ops.py, _choose.c) against choosers.py's numpy
path (softmax_rows, top_k: the reference and the fallback) and against its own exact path."""

from __future__ import annotations

import numpy as np
import pytest

from engine.runtime import choose_ops, qlinear
from engine.runtime.choose_ops import Path
from engine.runtime.choosers import Contrastive, softmax_rows, top_k
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
    kernel_top_k = choose_ops.top_k_softmax

    def counted(scores: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        calls.append(k)
        return kernel_top_k(scores, k)

    monkeypatch.setattr(choose_ops, "top_k_softmax", counted)
    with_kernel = [r.token_ids for r in run_on_decoder(runtime, requests)]
    assert calls and set(calls) == {4}
    calls.clear()
    try:
        choose_ops.use(False)
        assert not choose_ops.available()
        without = [r.token_ids for r in run_on_decoder(runtime, requests)]
    finally:
        choose_ops.use(True)
    assert not calls
    assert with_kernel == without
    assert all(len(row) > 0 for row in with_kernel)
