"""Contrastive search's pieces (engine/runtime/choosers.py) and continuous batching
(engine/runtime/decoder_batch.py)."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
from transformers.generation.logits_process import (
    MinNewTokensLengthLogitsProcessor,
    NoRepeatNGramLogitsProcessor,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from engine.errors import InvalidRequest, Overloaded
from engine.runtime.choosers import History, draw, process_logits, softmax_rows, top_k, warp_logits
from engine.runtime.decoder_batch import DecoderBatch, run_on_decoder
from engine.runtime.params import DecodingParams
from engine.runtime.result import FinishReason, GenerationRequest, Result, TokenEvent
from engine.runtime.t5 import T5Runtime
from tests import models
from tests.gpu import needs_cupy


@pytest.fixture(
    scope="module",
    params=[
        "cpu",
        pytest.param("cuda", marks=[pytest.mark.cuda, needs_cupy]),
        pytest.param("cuda-graphs", marks=[pytest.mark.cuda, needs_cupy]),
    ],
)
def runtime(request: pytest.FixtureRequest) -> T5Runtime:
    """The continuous-batching tests run on numpy, and on CuPy where a GPU is seen (eager, and
    replaying CUDA graphs)."""
    device, _, graphs = str(request.param).partition("-")
    runtime = T5Runtime.load(models.converted_model("flan", "float32"), device=device)
    if graphs:
        runtime.use_cuda_graphs(True)
    return runtime


def prompt(seed: int, n: int) -> tuple[int, ...]:
    rng = np.random.default_rng(seed)
    return (*(int(i) for i in rng.integers(3, 900, size=n)), 1)


def req(seed: int, n: int, **params: object) -> GenerationRequest:
    raw = {"penalty_alpha": 0.6, "top_k": 4, "max_new_tokens": 12, **params}
    return GenerationRequest(prompt(seed, n), DecodingParams.from_dict(raw))


def alone(runtime: T5Runtime, request: GenerationRequest) -> Result:
    return run_on_decoder(runtime, [request])[0]


# ------------------------------------------------------------------ logits processors
@pytest.mark.parametrize(
    "raw",
    [
        {"repetition_penalty": 1.7},
        {"repetition_penalty": 0.6},
        {"no_repeat_ngram_size": 1},
        {"no_repeat_ngram_size": 2},
        {"no_repeat_ngram_size": 3},
        {"min_new_tokens": 6},
        {"repetition_penalty": 1.3, "no_repeat_ngram_size": 2, "min_new_tokens": 9},
    ],
)
def test_processors_equal_transformers(raw: dict[str, object]) -> None:
    params = DecodingParams.from_dict({"max_new_tokens": 20, **raw})
    rng = np.random.default_rng(0)
    history = History([0], params.no_repeat_ngram_size)
    tokens = [0]
    hf = []
    if params.repetition_penalty != 1.0:
        hf.append(RepetitionPenaltyLogitsProcessor(params.repetition_penalty))
    if params.no_repeat_ngram_size:
        hf.append(NoRepeatNGramLogitsProcessor(params.no_repeat_ngram_size))
    if params.min_new_tokens:
        hf.append(MinNewTokensLengthLogitsProcessor(1, params.min_new_tokens, 1))
    for _ in range(12):
        scores = rng.standard_normal(30).astype(np.float32)
        expected = torch.tensor(scores[None])
        for p in hf:
            expected = p(torch.tensor([tokens]), expected)
        process_logits(scores, history, params, eos_token_id=1)
        np.testing.assert_array_equal(scores, expected[0].numpy())
        nxt = int(rng.integers(0, 6))  # few distinct ids: repeats and n-grams do occur
        tokens.append(nxt)
        history.append(nxt)


def test_top_k_orders_by_value_then_index() -> None:
    p = np.array([0.1, 0.3, 0.05, 0.3, 0.0, 0.25], dtype=np.float32)
    assert top_k(p, 3).tolist() == [1, 3, 5]
    assert top_k(p, 2).tolist() == [1, 3]
    q = np.array([0.0, 0.5, 0.0, 0.5, 0.0], dtype=np.float32)
    assert top_k(q, 4).tolist() == [1, 3, 0, 2]
    assert top_k(q, 5).tolist() == [1, 3, 0, 2, 4]
    # Both ways top_k takes (argmax passes for small k, argpartition above) give that order, on
    # vectors with many equal values.
    rng = np.random.default_rng(7)
    for size, k in [(50, 1), (50, 4), (50, 8), (50, 9), (50, 20), (3000, 8), (3000, 12)]:
        v = rng.integers(0, 6, size).astype(np.float32) / 5  # few distinct values: ties everywhere
        want = np.lexsort((np.arange(size), -v))[:k].tolist()
        assert top_k(v, k).tolist() == want, (size, k)
    s = softmax_rows(np.array([[0.0, np.log(3.0)]], dtype=np.float32))
    np.testing.assert_allclose(s, [[0.25, 0.75]], rtol=1e-6)


# ------------------------------------------------------------------ continuous batching
def drain(batch: DecoderBatch) -> dict[str, Result]:
    results: dict[str, Result] = {}
    while len(batch):
        for event in batch.step():
            if event.result is not None:
                results[event.request_id] = event.result
    return results


def test_batch_of_mixed_requests_equals_each_alone(runtime: T5Runtime) -> None:
    requests = [
        req(1, 5),
        req(2, 23, top_k=8, penalty_alpha=0.3),
        req(3, 9, top_k=2, max_new_tokens=5),
        req(4, 14, penalty_alpha=0.0),  # greedy joins the same batch (1 row)
        req(5, 3, repetition_penalty=1.4, no_repeat_ngram_size=2),
    ]
    together = run_on_decoder(runtime, requests)
    for request, result in zip(requests, together, strict=True):
        assert result == alone(runtime, request)
    assert together[2].finish_reason is FinishReason.LENGTH and len(together[2].token_ids) == 5
    assert together[0].usage.prompt_tokens == 6 and together[0].usage.completion_tokens == 12


def test_request_joining_mid_flight_gets_the_same_ids(runtime: T5Runtime) -> None:
    first, second = req(10, 8, max_new_tokens=16), req(11, 19, top_k=8)
    batch = DecoderBatch(runtime)
    batch.add("a", first)
    events: list[TokenEvent] = []
    for _ in range(5):
        events += batch.step()
    batch.add("b", second)
    assert len(batch) == 2
    results = drain(batch)
    assert results["a"] == alone(runtime, first)
    assert results["b"] == alone(runtime, second)
    # Streaming: the events of "a" carry its tokens in order.
    assert [e.token_id for e in events] == list(results["a"].token_ids[:5])


def test_cancelled_request_leaves_at_the_next_step(runtime: T5Runtime) -> None:
    batch = DecoderBatch(runtime)
    batch.add("keep", req(20, 7))
    batch.add("drop", req(21, 12))
    for _ in range(3):
        batch.step()
    batch.cancel("drop")
    events = batch.step()
    cancelled = [e for e in events if e.request_id == "drop"]
    assert len(cancelled) == 1 and cancelled[0].token_id == -1
    result = cancelled[0].result
    assert result is not None and result.finish_reason is FinishReason.CANCELLED
    assert len(result.token_ids) == 3  # the tokens it had before the cancel
    assert len(batch) == 1 and batch.rows == 4
    assert drain(batch)["keep"] == alone(runtime, req(20, 7))
    # Cancelling a request that has not started yet also reports it, without running it.
    batch.add("late", req(22, 4))
    batch.cancel("late")
    (event,) = batch.step()
    assert event.result is not None and event.result.token_ids == ()
    assert len(batch) == 0


def test_finished_rows_are_freed_at_once(runtime: T5Runtime) -> None:
    batch = DecoderBatch(runtime)
    batch.add("short", req(30, 6, max_new_tokens=2))
    batch.add("long", req(31, 6, max_new_tokens=8))
    batch.step()
    done = [e for e in batch.step() if e.result is not None]
    assert [e.request_id for e in done] == ["short"]
    assert len(batch) == 1
    cache = batch._groups[1].cache  # the contrastive group's
    assert cache is not None and len(cache) == 1 and cache.self_k.shape[1] == 1


def test_greedy_and_contrastive_rows_step_in_calls_of_their_own_width(
    runtime: T5Runtime, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A greedy row beside a top_k=8 row is not padded to 8 candidates: each group has its own
    decoder call (1 row for greedy, 8 for the contrastive one), and every result is what the
    request gives alone."""
    widths: list[tuple[int, int]] = []
    step = runtime.decoder_step

    def watched(cache: Any, tokens: np.ndarray) -> Any:
        widths.append(tokens.shape)
        return step(cache, tokens)

    monkeypatch.setattr(runtime, "decoder_step", watched)
    greedy = [
        GenerationRequest(prompt(60 + i, 5 + i), DecodingParams(max_new_tokens=6, repetition_penalty=1.2))
        for i in range(3)
    ]
    contrastive = req(70, 7, top_k=8, max_new_tokens=6)
    mixed = run_on_decoder(runtime, [greedy[0], contrastive, *greedy[1:]])
    steps = set(widths)
    assert steps <= {(3, 1), (1, 8), (4, 1), (1, 1)}, steps  # never (4, 8): no greedy row padded
    assert (3, 1) in steps and (1, 8) in steps
    monkeypatch.undo()
    assert mixed == [alone(runtime, r) for r in [greedy[0], contrastive, *greedy[1:]]]


def test_batch_rejects_what_it_cannot_run(runtime: T5Runtime) -> None:
    batch = DecoderBatch(runtime, max_rows=8)
    batch.add("a", req(40, 5))
    with pytest.raises(InvalidRequest, match="already in the batch"):
        batch.add("a", req(41, 5))
    with pytest.raises(Overloaded, match="full"):
        batch.add("b", req(41, 5, top_k=8))
    with pytest.raises(InvalidRequest, match="exceeds"):
        batch.add("c", req(41, 5, top_k=9))
    with pytest.raises(InvalidRequest, match="beam"):
        batch.add("d", GenerationRequest(prompt(1, 3), DecodingParams.from_dict({"num_beams": 2})))
    with pytest.raises(InvalidRequest, match="input ids"):
        batch.add("e", GenerationRequest((5, 10**6), DecodingParams()))
    with pytest.raises(InvalidRequest, match="at least one token"):
        batch.add("f", GenerationRequest((), DecodingParams()))
    # run_on_decoder queues what does not fit yet and still returns every result in order.
    requests = [req(50 + i, 4 + i, max_new_tokens=4) for i in range(5)]
    assert run_on_decoder(runtime, requests, max_rows=8) == run_on_decoder(runtime, requests)


def test_on_token_stops_a_request(runtime: T5Runtime) -> None:
    seen: list[tuple[int, int]] = []

    def on_token(index: int, token: int) -> bool:
        seen.append((index, token))
        return index == 1 and len([s for s in seen if s[0] == 1]) == 3

    results = run_on_decoder(runtime, [req(60, 5), req(61, 6)], on_token=on_token)
    assert results[1].finish_reason is FinishReason.CANCELLED and len(results[1].token_ids) == 3
    assert [t for i, t in seen if i == 0] == list(results[0].token_ids)


# ------------------------------------------------------------------ seeded sampling
@pytest.mark.parametrize(
    "raw",
    [
        {"temperature": 0.7},
        {"top_k": 5},
        {"top_k": 0, "top_p": 0.9},
        {"temperature": 1.5, "top_k": 20, "top_p": 0.8},
        {"top_k": 1},
        {"top_k": 0, "top_p": 1e-6},
    ],
)
def test_sampling_warpers_equal_transformers(raw: dict[str, object]) -> None:
    params = DecodingParams.from_dict({"do_sample": True, **raw})
    hf = []  # Transformers' order (_get_logits_processor): temperature, top-k, top-p
    if params.temperature != 1.0:
        hf.append(TemperatureLogitsWarper(params.temperature))
    if params.top_k:
        hf.append(TopKLogitsWarper(params.top_k))
    if params.top_p < 1.0:
        hf.append(TopPLogitsWarper(params.top_p))
    rng = np.random.default_rng(1)
    for _ in range(5):
        scores = (rng.standard_normal(300) * 3).astype(np.float32)
        expected = torch.tensor(scores[None])
        for p in hf:
            expected = p(torch.tensor([[0]]), expected)
        np.testing.assert_array_equal(warp_logits(scores, params), expected[0].numpy())


def test_draws_follow_the_softmax() -> None:
    logits = np.array([*np.log([0.5, 0.25, 0.15, 0.1]), -np.inf], dtype=np.float32)  # a removed token
    rng = np.random.default_rng(7)
    counts = np.bincount([draw(logits, rng) for _ in range(40_000)], minlength=5)
    np.testing.assert_allclose(counts / 40_000, [0.5, 0.25, 0.15, 0.1, 0.0], atol=0.01)
    # The same generator state gives the same tokens.
    first, second = np.random.default_rng(3), np.random.default_rng(3)
    assert [draw(logits, first) for _ in range(50)] == [draw(logits, second) for _ in range(50)]


def sampled(seed: int, n: int, **params: object) -> GenerationRequest:
    raw = {"do_sample": True, "temperature": 1.5, "top_k": 0, "seed": seed, "max_new_tokens": 12, **params}
    return GenerationRequest(prompt(seed, n), DecodingParams.from_dict(raw))


def test_seeded_sampling_is_reproducible_and_independent_of_its_batch(runtime: T5Runtime) -> None:
    a, b = sampled(70, 6), sampled(71, 15, top_p=0.9)
    alone_a = alone(runtime, a)
    assert alone(runtime, a) == alone_a  # the same seed, the same tokens
    other_seed = GenerationRequest(a.input_ids, DecodingParams.from_dict({**a.params.to_dict(), "seed": 99}))
    assert alone(runtime, other_seed).token_ids != alone_a.token_ids
    # In one continuous batch with contrastive and greedy rows, and joining mid-flight: the same.
    together = run_on_decoder(runtime, [req(72, 9), a, req(73, 4, penalty_alpha=0.0), b])
    assert together[1] == alone_a and together[3] == alone(runtime, b)
    batch = DecoderBatch(runtime)
    batch.add("c", req(74, 11))
    for _ in range(3):
        batch.step()
    batch.add("a", a)
    assert drain(batch)["a"] == alone_a


def test_sampling_from_the_top_token_only_is_greedy(runtime: T5Runtime) -> None:
    greedy = alone(runtime, req(75, 8, penalty_alpha=0.0))
    assert alone(runtime, sampled(75, 8, top_k=1)).token_ids == greedy.token_ids
    assert alone(runtime, sampled(75, 8, top_p=1e-6)).token_ids == greedy.token_ids
