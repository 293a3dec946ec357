"""Stop sequences (params ``stop``) in every strategy, on CTranslate2 and on our decoder.

The reference is the same request without ``stop``: the stopped row must be its prefix up to the
first token whose text shows a match, with the text cut exactly before the earliest match."""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest

from engine.errors import InvalidRequest
from engine.runtime.engine import Engine
from engine.runtime.params import DecodingParams
from engine.runtime.result import FinishReason, GenerationRequest
from tests.test_contrastive import drain

WORDS = ["ka", "bo", "zu", "pe", "mi", "lo", "tifudo", "kebupi", "ro", "vu", "se", "da", "ga", "no"]


@pytest.fixture(scope="module")
def engine(flan_model_dir: Path) -> Engine:
    return Engine(flan_model_dir, compute_type="float32", intra_threads=1)


def prompts(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 12))) for _ in range(n)]


def expected_cut(
    decode: Callable[[Sequence[int]], str], ids: Sequence[int], stops: Sequence[str]
) -> tuple[tuple[int, ...], str] | None:
    """The reference: the shortest prefix whose text shows a stop string, and that text cut
    before the earliest match."""
    for n in range(1, len(ids) + 1):
        text = decode(ids[:n])
        hits = [i for i in (text.find(s) for s in stops) if i >= 0]
        if hits:
            return tuple(ids[:n]), text[: min(hits)]
    return None


def stop_inside(engine: Engine, ids: Sequence[int]) -> str:
    """Three characters of the text that the first half of ``ids`` ends with (so a match comes
    well before the end)."""
    text = engine.tokenizer.decode(ids[: len(ids) // 2]).rstrip()
    assert len(text) >= 4, text
    return text[-4:-1]


STRATEGIES: dict[str, dict[str, Any]] = {
    "greedy (CTranslate2)": {},
    "greedy with processors (CTranslate2)": {"repetition_penalty": 1.3, "no_repeat_ngram_size": 3},
    "beam (CTranslate2)": {"num_beams": 3},
    # top_k 1 makes CTranslate2's sampling repeatable, so the unstopped run is its reference.
    "sampling (CTranslate2)": {"do_sample": True, "top_k": 1},
    "contrastive (our decoder)": {"penalty_alpha": 0.6, "top_k": 4},
    "seeded sampling (our decoder)": {"do_sample": True, "seed": 7, "temperature": 0.8},
}


@pytest.mark.parametrize("strategy", list(STRATEGIES))
def test_stopped_rows_are_the_prefix_up_to_the_match(engine: Engine, strategy: str) -> None:
    params = {**STRATEGIES[strategy], "max_new_tokens": 24, "min_new_tokens": 24}
    texts = prompts(3, seed=11)
    full = engine.generate(texts, **params)
    # Each prompt gets a stop string from its own output, plus one that never matches.
    stops = [[stop_inside(engine, r.token_ids), "\u2603never\u2603"] for r in full]
    requests = [
        GenerationRequest(ids, DecodingParams.from_dict({**params, "stop": stop}), i)
        for i, (ids, stop) in enumerate(zip(engine.tokenize(texts), stops, strict=True))
    ]
    streamed: dict[int, list[int]] = {i: [] for i in range(len(texts))}

    def on_token(index: int, token_id: int) -> bool:
        streamed[index].append(token_id)
        return False

    got = engine.generate_requests(requests, on_token=on_token)
    for i, (r, reference) in enumerate(zip(got, full, strict=True)):
        want = expected_cut(engine.tokenizer.decode, reference.token_ids, stops[i])
        assert want is not None
        ids, text = want
        assert len(ids) < len(reference.token_ids)  # it did stop early
        assert r.token_ids == ids
        assert r.text == text
        assert r.finish_reason is FinishReason.STOP
        assert r.usage.completion_tokens == len(ids)
        # No token was produced past the match (beam search reports its tokens once it is over).
        assert streamed[i] == list(ids)


def test_our_decoder_frees_the_row_on_the_matching_step(engine: Engine) -> None:
    for raw in ({}, {"penalty_alpha": 0.6, "top_k": 4}, {"do_sample": True, "seed": 3}):
        params = {**raw, "max_new_tokens": 20, "min_new_tokens": 20}
        (ids,) = engine.tokenize(prompts(1, seed=5))
        batch = engine.decoder_batch()
        batch.add("full", GenerationRequest(ids, DecodingParams.from_dict(params)))
        full = drain(batch)["full"]
        stop = stop_inside(engine, full.token_ids)
        want = expected_cut(engine.tokenizer.decode, full.token_ids, [stop])
        assert want is not None
        batch.add("cut", GenerationRequest(ids, DecodingParams.from_dict({**params, "stop": stop})))
        tokens: list[int] = []
        while True:
            (event,) = batch.step()
            if event.token_id >= 0:
                tokens.append(event.token_id)
            if event.result is not None:
                break
        assert len(batch) == 0  # gone from the batch on the step that matched
        assert tuple(tokens) == want[0] == event.result.token_ids
        assert event.result.text == want[1] and event.result.finish_reason is FinishReason.STOP


def test_a_stop_string_at_the_very_start_gives_empty_text(engine: Engine) -> None:
    (full,) = engine.generate(prompts(1, seed=2), max_new_tokens=8, min_new_tokens=8)
    first = engine.tokenizer.decode(full.token_ids[:1]).strip()
    assert first
    (r,) = engine.generate(prompts(1, seed=2), max_new_tokens=8, min_new_tokens=8, stop=first[0])
    assert r.finish_reason is FinishReason.STOP and r.token_ids == full.token_ids[:1]
    assert first[0] not in r.text


def test_rows_without_a_match_finish_as_before(engine: Engine) -> None:
    texts = prompts(2, seed=4)
    for raw in ({}, {"penalty_alpha": 0.6, "top_k": 4}):
        plain = engine.generate(texts, max_new_tokens=10, **raw)
        stopped = engine.generate(texts, max_new_tokens=10, stop=["\u2603", "\u2604"], **raw)
        assert stopped == plain
        assert all(r.finish_reason in (FinishReason.EOS, FinishReason.LENGTH) for r in plain)


@pytest.mark.parametrize(
    ("stop", "fragment"),
    [
        (5, "stop must be a string or a list of strings, got int"),
        (["a", 3], r"stop\[1\] must be a string"),
        (["a", ""], r"stop\[1\] is empty"),
        ("", r"stop\[0\] is empty"),
        (["a", "b", "c", "d", "e"], "stop takes at most 4 strings, got 5"),
        ("x" * 257, r"stop\[0\] is 257 characters long; at most 256"),
        ({"a": 1}, "got an object"),
    ],
)
def test_bad_stop_values_say_what_to_fix(stop: object, fragment: str) -> None:
    with pytest.raises(InvalidRequest, match=fragment):
        DecodingParams.from_dict({"stop": stop})


def test_stop_is_a_tuple_and_survives_json() -> None:
    assert DecodingParams.from_dict({"stop": "##"}).stop == ("##",)
    assert DecodingParams.from_dict({"stop": None}).stop == ()
    assert DecodingParams.from_dict({"stop": []}).stop == ()
    params = DecodingParams.from_dict({"stop": ["a", "b", "a"]})
    assert params.stop == ("a", "b")
    raw = json.loads(json.dumps(params.to_dict()))
    assert DecodingParams.from_dict(raw) == params
    assert DecodingParams(**raw) == params  # how the stores read params back
    # Stop sequences are applied per row: they do not split a batch.
    assert params.batch_key() == DecodingParams().batch_key()
