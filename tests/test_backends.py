"""Which backend runs a request (engine/runtime/backends.py): the one choice, from its tables."""

from __future__ import annotations

from pathlib import Path

import pytest

from engine.runtime import backends
from engine.runtime.backends import Backend, backend_for, needs_decoder
from engine.runtime.engine import Engine
from engine.runtime.params import DecodingParams, Strategy
from engine.runtime.result import GenerationRequest
from engine.runtime.strategies import CHOOSERS


@pytest.mark.parametrize(
    ("raw", "compute_type", "expected"),
    [
        ({"num_beams": 4}, "float32", Backend.CTRANSLATE2),
        ({"penalty_alpha": 0.6, "top_k": 4}, "int8", Backend.DECODER),
        ({"do_sample": True, "seed": 3}, "int8", Backend.DECODER),
        ({"do_sample": True}, "int8", Backend.CTRANSLATE2),
        # Logprobs need every step's logits: only our decoder has them.
        ({"logprobs": 0}, "float32", Backend.DECODER),
        ({"do_sample": True, "logprobs": 2}, "int8", Backend.DECODER),
        # Token-exact with Transformers only on our decoder (the decoder-start token's history).
        ({"repetition_penalty": 1.2}, "float32", Backend.DECODER),
        ({"no_repeat_ngram_size": 3}, "float32", Backend.DECODER),
        ({"repetition_penalty": 1.2}, "int8_float32", Backend.CTRANSLATE2),  # not in the greedy table
    ],
)
def test_backend_per_strategy(raw: dict[str, object], compute_type: str, expected: Backend) -> None:
    params = DecodingParams.from_dict(raw)
    assert backend_for(params, device="cpu", compute_type=compute_type) is expected


def test_plain_greedy_follows_the_measured_table(monkeypatch: pytest.MonkeyPatch) -> None:
    greedy = DecodingParams()
    monkeypatch.setattr(backends, "GREEDY_ON_DECODER", {("cpu", "int8"): 4})
    for batch_size, expected in ((1, Backend.DECODER), (4, Backend.DECODER), (5, Backend.CTRANSLATE2)):
        assert backend_for(greedy, device="cpu", compute_type="int8", batch_size=batch_size) is expected
    assert backend_for(greedy, device="cuda", compute_type="int8", batch_size=1) is Backend.CTRANSLATE2
    # Beam search never moves, whatever the table says.
    assert backend_for(DecodingParams(num_beams=2), device="cpu", compute_type="int8") is Backend.CTRANSLATE2


def test_needs_decoder_is_what_only_our_decoder_runs() -> None:
    assert needs_decoder(DecodingParams(penalty_alpha=0.6, top_k=4))
    assert needs_decoder(DecodingParams(do_sample=True, seed=1))
    assert not needs_decoder(DecodingParams(do_sample=True))
    assert not needs_decoder(DecodingParams())
    assert not needs_decoder(DecodingParams(num_beams=3))


# One request of each strategy, as a client would send it.
EXAMPLES: dict[Strategy, dict[str, object]] = {
    Strategy.GREEDY: {},
    Strategy.BEAM: {"num_beams": 3},
    Strategy.SAMPLE: {"do_sample": True, "seed": 7},
    Strategy.CONTRASTIVE: {"penalty_alpha": 0.6, "top_k": 4},
}


@pytest.mark.parametrize("strategy", list(Strategy), ids=lambda s: s.value)
def test_every_strategy_is_recognised_and_runs_where_the_choice_sends_it(strategy: Strategy) -> None:
    params = DecodingParams.from_dict(EXAMPLES[strategy])
    assert params.strategy is strategy
    backend = backend_for(params, device="cpu", compute_type="int8")
    assert backend in backends.RUNS_ON[strategy]
    if backend is Backend.DECODER:  # our decoder can build the row's chooser and read its width
        chooser = CHOOSERS[strategy]
        assert chooser is not None
        built = chooser.for_request(params, eos_token_id=1, draw_index=0)
        assert built.width == (params.top_k if strategy is Strategy.CONTRASTIVE else 1)


def test_greedy_gives_the_same_ids_on_either_backend(
    flan_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The table may send greedy either way: both backends give the same ids (float32)."""
    engine = Engine(flan_model_dir, compute_type="float32", intra_threads=1)
    requests = [
        GenerationRequest(ids, DecodingParams(max_new_tokens=n), i)
        for i, (ids, n) in enumerate(
            zip(engine.tokenize(["ka bo zu", "mi lo tifudo pe se"]), (12, 20), strict=True)
        )
    ]
    on_ct2 = engine.generate_requests(requests)
    monkeypatch.setattr(backends, "GREEDY_ON_DECODER", {("cpu", "float32"): 8})
    streamed: list[tuple[int, int]] = []

    def on_token(index: int, token_id: int) -> bool:
        streamed.append((index, token_id))
        return False

    on_decoder = engine.generate_requests(requests, on_token=on_token)
    assert on_decoder == on_ct2
    assert [t for i, t in streamed if i == 1] == list(on_ct2[1].token_ids)
