"""The servicer keeps validated params per distinct message: a hit must be exactly what a fresh
validation gives, and invalid params must fail every time with their message."""

from __future__ import annotations

import pytest

from engine.api.grpc_service import _params_from_struct, params_from_struct, params_to_struct
from engine.errors import InvalidRequest


def test_kept_params_equal_a_fresh_validation_and_follow_the_servers_limit() -> None:
    raw = {"max_new_tokens": 100, "top_k": 4, "penalty_alpha": 0.6}
    first = params_from_struct(params_to_struct(raw), max_new_tokens_limit=512)
    again = params_from_struct(params_to_struct(dict(reversed(list(raw.items())))), max_new_tokens_limit=512)
    assert again is first  # the same message, whatever the order its fields came in
    assert first == _params_from_struct(params_to_struct(raw), max_new_tokens_limit=512)
    other = params_from_struct(params_to_struct({**raw, "top_k": 5}), max_new_tokens_limit=512)
    assert other.top_k == 5 and first.top_k == 4
    with pytest.raises(InvalidRequest, match="max_new_tokens"):  # same params, a smaller limit
        params_from_struct(params_to_struct(raw), max_new_tokens_limit=64)


def test_invalid_params_fail_every_time() -> None:
    bad = params_to_struct({"max_new_tokens": 10, "no_such_param": 1})
    for _ in range(3):
        with pytest.raises(InvalidRequest, match="no_such_param"):
            params_from_struct(bad, max_new_tokens_limit=512)
    nan = params_to_struct({"temperature": float("nan"), "do_sample": True})
    for _ in range(2):
        with pytest.raises(InvalidRequest, match="temperature"):
            params_from_struct(nan, max_new_tokens_limit=512)
