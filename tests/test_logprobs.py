"""Logprobs (params.logprobs): per generated token, the log-softmax of the model's raw logits at
its step and the top alternatives, computed by our decoder. Checked against Hugging Face
Transformers (scripts/reference_logprobs.py in .venv-ref: the checkpoint run teacher-forced on the
ids the engine generated), for every strategy our decoder runs, processors included (the figure is
taken before them)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from engine.errors import InvalidRequest
from engine.runtime.backends import Backend, backend_for
from engine.runtime.engine import Engine
from engine.runtime.logprobs import log_softmax
from engine.runtime.params import DecodingParams
from engine.runtime.result import GenerationRequest, Result
from tests.models import prompts
from tests.reference import run_reference, run_script

STRATEGIES: dict[str, dict[str, Any]] = {
    "greedy": {},
    "greedy with processors": {"repetition_penalty": 1.8, "no_repeat_ngram_size": 2, "min_new_tokens": 4},
    "contrastive": {"penalty_alpha": 0.6, "top_k": 4},
    "seeded sampling": {"do_sample": True, "temperature": 0.7, "top_k": 20, "seed": 3},
}


def reference_logprobs(hf_dir: Path, cases: list[dict[str, Any]]) -> list[dict[str, Any]]:
    outputs: list[dict[str, Any]] = run_script("reference_logprobs.py", hf_dir, cases, 600)
    return outputs


@pytest.fixture(scope="module")
def engine(flan_model_dir: Path) -> Engine:
    return Engine(flan_model_dir)


def run(engine: Engine, params: dict[str, Any], seed: int = 1) -> tuple[list[tuple[int, ...]], list[Result]]:
    ids = prompts(seed, (7, 12, 3))
    decoding = DecodingParams.from_dict({"max_new_tokens": 9, **params})
    return ids, engine.generate_requests([GenerationRequest(p, decoding, i) for i, p in enumerate(ids)])


@pytest.mark.parametrize("extra", list(STRATEGIES.values()), ids=list(STRATEGIES))
def test_logprobs_equal_the_reference_log_softmax(
    engine: Engine, flan_hf_dir: Path, extra: dict[str, Any]
) -> None:
    ids, results = run(engine, {**extra, "logprobs": 3})
    want = reference_logprobs(
        flan_hf_dir,
        [
            {"input_ids": list(p), "ids": list(r.token_ids), "top": 3}
            for p, r in zip(ids, results, strict=True)
        ],
    )
    for r, ref in zip(results, want, strict=True):
        assert r.logprobs is not None and len(r.logprobs) == len(r.token_ids) > 0
        for t, token_id, lp, top in zip(r.logprobs, r.token_ids, ref["logprobs"], ref["top"], strict=True):
            assert t.token_id == token_id
            assert t.logprob <= 0.0
            assert t.logprob == pytest.approx(lp, abs=2e-5)
            assert [i for i, _ in t.top] == [i for i, _ in top]
            assert [v for _, v in t.top] == pytest.approx([v for _, v in top], abs=2e-5)
            values = [v for _, v in t.top]
            assert values == sorted(values, reverse=True)
            if token_id in dict(t.top):
                assert dict(t.top)[token_id] == t.logprob


def test_greedy_with_logprobs_is_transformers_greedy_and_heads_its_top_list(
    engine: Engine, flan_hf_dir: Path
) -> None:
    ids, with_lp = run(engine, {"logprobs": 5})
    golden = run_reference(
        flan_hf_dir, [{"input_ids": [list(p)], "params": {"max_new_tokens": 9}} for p in ids]
    )
    assert [list(r.token_ids) for r in with_lp] == [case[0] for case in golden]
    _, plain = run(engine, {})
    assert all(r.logprobs is None for r in plain)
    for r in with_lp:
        assert r.logprobs is not None
        for t in r.logprobs:
            assert len(t.top) == 5 and t.top[0] == (t.token_id, t.logprob)
    _, none = run(engine, {"logprobs": 0})
    assert all(r.logprobs is not None and all(t.top == () for t in r.logprobs) for r in none)


def test_a_stop_sequence_cuts_the_logprobs_with_the_ids(engine: Engine) -> None:
    _, full = run(engine, {"logprobs": 1, "max_new_tokens": 20})
    text = next(r.text for r in full if len(r.text) > 6)
    stop = text[3:6]
    _, cut = run(engine, {"logprobs": 1, "max_new_tokens": 20, "stop": stop})
    for before, after in zip(full, cut, strict=True):
        assert after.logprobs is not None and before.logprobs is not None
        assert len(after.logprobs) == len(after.token_ids)
        assert after.logprobs == before.logprobs[: len(after.token_ids)]
    assert any(r.finish_reason.value == "stop" for r in cut)


def test_log_softmax_matches_a_float64_computation() -> None:
    rng = np.random.default_rng(0)
    logits = (rng.standard_normal(1000) * 8).astype(np.float32)
    got = log_softmax(logits)
    x = logits.astype(np.float64)
    want = x - (x.max() + math.log(np.exp(x - x.max()).sum()))
    np.testing.assert_allclose(got, want, atol=1e-5)
    assert math.isclose(float(np.exp(got.astype(np.float64)).sum()), 1.0, rel_tol=1e-5)


def test_logprobs_params_are_validated_and_run_on_our_decoder() -> None:
    assert DecodingParams.from_dict({"logprobs": 0}).logprobs == 0
    assert DecodingParams.from_dict({"logprobs": None}).logprobs is None
    for bad in (-1, 6, 1.5, "2", True):
        with pytest.raises(InvalidRequest, match="logprobs must be"):
            DecodingParams.from_dict({"logprobs": bad})
    with pytest.raises(InvalidRequest, match=r"logprobs with num_beams > 1 is not supported"):
        DecodingParams.from_dict({"logprobs": 1, "num_beams": 2})
    params = DecodingParams.from_dict({"logprobs": 2})
    assert backend_for(params, device="cpu", compute_type="int8") is Backend.DECODER
    assert DecodingParams.from_dict(params.to_dict()) == params
