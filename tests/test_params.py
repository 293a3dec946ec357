import pytest

from engine.errors import InvalidRequest
from engine.runtime.params import DecodingParams, Strategy


def test_missing_or_empty_params_are_the_defaults() -> None:
    raw: dict[str, object] | None
    for raw in (None, {}):
        p = DecodingParams.from_dict(raw)
        assert p.max_new_tokens == 64
        assert p.strategy is Strategy.GREEDY


def test_seed_params_are_contrastive() -> None:
    p = DecodingParams.from_dict({"max_new_tokens": 64, "top_k": 4, "penalty_alpha": 0.6})
    assert p.strategy is Strategy.CONTRASTIVE
    assert (p.top_k, p.penalty_alpha) == (4, 0.6)


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ({"penalty_alpha": 0.6}, Strategy.CONTRASTIVE),  # top_k defaults to 50, as in Transformers
        ({"penalty_alpha": 0.6, "top_k": 1}, Strategy.GREEDY),
        ({"penalty_alpha": 0.0, "top_k": 4}, Strategy.GREEDY),
        ({"num_beams": 4}, Strategy.BEAM),
        ({"do_sample": True, "top_k": 4}, Strategy.SAMPLE),
        ({"do_sample": True, "penalty_alpha": 0.6, "top_k": 4}, Strategy.SAMPLE),
    ],
)
def test_strategy(raw: dict[str, object], expected: Strategy) -> None:
    assert DecodingParams.from_dict(raw).strategy is expected


@pytest.mark.parametrize(
    ("raw", "fragment"),
    [
        ({"max_tokens": 5}, "unknown parameter(s) max_tokens"),
        ({"max_new_tokens": 0}, "max_new_tokens must be between 1 and 512"),
        ({"max_new_tokens": 513}, "max_new_tokens must be between 1 and 512"),
        ({"max_new_tokens": "64"}, "max_new_tokens must be an integer"),
        ({"max_new_tokens": 6.5}, "max_new_tokens must be an integer"),
        ({"max_new_tokens": True}, "max_new_tokens must be an integer"),
        ({"penalty_alpha": 1.5}, "penalty_alpha must be at least 0.0 and at most 1.0"),
        ({"temperature": 0}, "temperature must be greater than 0.0"),
        ({"top_p": float("nan")}, "top_p must be"),
        ({"do_sample": "yes"}, "do_sample must be true or false"),
        ({"min_new_tokens": 10, "max_new_tokens": 5}, "min_new_tokens (10) must not exceed"),
        ({"do_sample": True, "num_beams": 2}, "beam sampling"),
    ],
)
def test_bad_params_name_the_problem(raw: dict[str, object], fragment: str) -> None:
    with pytest.raises(InvalidRequest) as err:
        DecodingParams.from_dict(raw)
    assert fragment in err.value.message


def test_params_must_be_an_object() -> None:
    with pytest.raises(InvalidRequest, match="params must be a JSON object, got an array"):
        DecodingParams.from_dict([1, 2])  # type: ignore[arg-type]


def test_integral_float_is_accepted() -> None:
    assert DecodingParams.from_dict({"max_new_tokens": 32.0}).max_new_tokens == 32


def test_batch_key_ignores_length_and_unused_params() -> None:
    a = DecodingParams.from_dict({"max_new_tokens": 8, "top_k": 3})
    b = DecodingParams.from_dict({"max_new_tokens": 64})
    assert a.batch_key() == b.batch_key()
    c = DecodingParams.from_dict({"num_beams": 2})
    assert c.batch_key() != b.batch_key()
