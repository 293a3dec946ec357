"""The strategy table (engine/runtime/strategies.py): one row per strategy, and what reads it."""

from __future__ import annotations

import pytest

from engine.errors import InvalidRequest
from engine.runtime.ct2 import DecodeOptions
from engine.runtime.engine import _groups
from engine.runtime.params import DecodingParams, Strategy
from engine.runtime.result import GenerationRequest
from engine.runtime.strategies import SPECS, STRATEGIES, chooser_for


def test_one_row_per_strategy_and_a_catch_all_last() -> None:
    assert [s.strategy for s in STRATEGIES].count(Strategy.GREEDY) == 1
    assert set(SPECS) == set(Strategy) and len(STRATEGIES) == len(Strategy)
    # The last row recognises anything: every DecodingParams has a strategy.
    assert STRATEGIES[-1].recognise(DecodingParams(num_beams=4, do_sample=False))


def test_each_row_names_only_fields_of_decoding_params() -> None:
    fields = set(DecodingParams.__dataclass_fields__)
    for spec in STRATEGIES:
        assert set(spec.batch_fields) <= fields, spec.strategy


def test_only_contrastive_needs_hidden_states() -> None:
    assert {s.strategy for s in STRATEGIES if s.needs_hidden} == {Strategy.CONTRASTIVE}
    assert chooser_for(DecodingParams(penalty_alpha=0.6, top_k=4), eos_token_id=1).needs_hidden
    assert not chooser_for(DecodingParams(do_sample=True), eos_token_id=1).needs_hidden


def test_a_row_without_a_backend_refuses_clearly() -> None:
    with pytest.raises(InvalidRequest, match="our decoder runs greedy, sample, contrastive, not beam"):
        chooser_for(DecodingParams(num_beams=2), eos_token_id=1)
    with pytest.raises(InvalidRequest, match="contrastive decoding does not run on CTranslate2"):
        DecodeOptions.from_params(DecodingParams(penalty_alpha=0.6, top_k=4))


def test_ct2_options_come_from_the_row() -> None:
    beam = DecodeOptions.from_params(DecodingParams(num_beams=3, length_penalty=0.5, max_new_tokens=9))
    assert (beam.beam_size, beam.length_penalty, beam.max_decoding_length) == (3, 0.5, 9)
    sample = DecodeOptions.from_params(DecodingParams(do_sample=True, top_k=7, top_p=0.9, temperature=0.5))
    assert (sample.sampling_topk, sample.sampling_topp, sample.sampling_temperature) == (7, 0.9, 0.5)
    assert DecodeOptions.from_params(DecodingParams(top_k=7)).sampling_topk == 1  # greedy ignores it


def test_split_by_length_keeps_beam_calls_apart() -> None:
    def request(params: DecodingParams) -> GenerationRequest:
        return GenerationRequest((5, 1), params)

    beams = [request(DecodingParams(num_beams=2, max_new_tokens=n)) for n in (4, 8, 4)]
    assert _groups(beams) == [[0, 2], [1]]
    greedy = [request(DecodingParams(max_new_tokens=n)) for n in (4, 8, 4)]
    assert _groups(greedy) == [[0, 1, 2]]
