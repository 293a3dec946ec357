"""Our contrastive search gives Transformers 4.55.4's token ids (docs/contrastive.md, "What is checked").

All reference generations of a model kind run in one subprocess (module-scoped fixture). Where ids
differ, the reference's own scores at the first differing step must be a near-tie
(|s1 - s2| < 1e-5, computed by scripts/reference_contrastive_scores.py in .venv-ref); anything
else fails.
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from engine.runtime.decoder_batch import run_on_decoder
from engine.runtime.params import DecodingParams
from engine.runtime.result import GenerationRequest
from engine.runtime.t5 import T5Runtime
from tests import models
from tests.reference import REF_PYTHON, ROOT, reference_available, run_reference

pytestmark = pytest.mark.reference

NEAR_TIE = 1e-5
MAX_NEW = 12


def _prompts(seed: int, lengths: tuple[int, ...]) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [[*(int(i) for i in rng.integers(3, 900, size=n)), 1] for n in lengths]


def _cases() -> list[dict[str, Any]]:
    cases: list[dict[str, Any]] = []
    seed = 0
    for alpha in (0.3, 0.5, 0.6, 1.0):
        for k in (2, 4, 8):
            seed += 1
            cases.append(
                {
                    "input_ids": _prompts(seed, (3 + seed % 5, 19, 8 + seed % 7)),  # mixed lengths, one batch
                    "params": {"penalty_alpha": alpha, "top_k": k, "max_new_tokens": MAX_NEW},
                }
            )
    single = {"penalty_alpha": 0.6, "top_k": 4, "max_new_tokens": 24}
    cases.append({"input_ids": _prompts(100, (11,)), "params": single})
    cases.append({"input_ids": _prompts(101, (30,)), "params": {**single, "top_k": 8, "penalty_alpha": 0.3}})
    processors: list[dict[str, Any]] = [
        {"repetition_penalty": 1.3},
        {"repetition_penalty": 0.8},
        {"no_repeat_ngram_size": 2},
        {"no_repeat_ngram_size": 1, "top_k": 8},
        {"min_new_tokens": MAX_NEW},
        {"repetition_penalty": 1.5, "no_repeat_ngram_size": 3, "min_new_tokens": 10},
    ]
    for i, extra in enumerate(processors):
        params = {"penalty_alpha": 0.6, "top_k": 4, "max_new_tokens": MAX_NEW, **extra}
        cases.append({"input_ids": _prompts(200 + i, (5, 14)), "params": params})
    return cases


CASES = _cases()


@dataclass(frozen=True)
class Compared:
    kind: str
    hf_dir: Path
    expected: list[list[list[int]]]
    got: list[list[list[int]]]


def _run_ours(runtime: T5Runtime, case: dict[str, Any]) -> list[list[int]]:
    params = DecodingParams.from_dict(case["params"])
    results = run_on_decoder(runtime, [GenerationRequest(tuple(ids), params) for ids in case["input_ids"]])
    return [list(r.token_ids) for r in results]


@pytest.fixture(scope="module", params=["flan", "t5"])
def compared(request: pytest.FixtureRequest) -> Compared:
    kind: str = request.param
    hf_dir = models.hf_checkpoint(kind)
    expected = run_reference(hf_dir, CASES)
    runtime = T5Runtime.load(models.converted_model(kind, "float32"))
    return Compared(kind, hf_dir, expected, [_run_ours(runtime, case) for case in CASES])


def _reference_scores(hf_dir: Path, cases: list[dict[str, Any]]) -> list[dict[str, Any]]:
    if not reference_available():
        pytest.skip(f"{REF_PYTHON} missing: run `make ref`")
    proc = subprocess.run(
        [str(REF_PYTHON), str(ROOT / "scripts" / "reference_contrastive_scores.py")],
        input=json.dumps({"model": str(hf_dir), "cases": cases}),
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr)
        raise RuntimeError(f"reference scores failed with exit code {proc.returncode}")
    outputs: list[dict[str, Any]] = json.loads(proc.stdout)["outputs"]
    return outputs


def _first_difference(a: list[int], b: list[int]) -> int:
    for i, (x, y) in enumerate(zip(a, b, strict=False)):
        if x != y:
            return i
    return min(len(a), len(b))


def test_ids_equal_transformers_or_differ_only_at_a_near_tie(compared: Compared) -> None:
    differing: list[tuple[int, int, dict[str, Any]]] = []
    for c, case in enumerate(CASES):
        for p, (exp, got) in enumerate(zip(compared.expected[c], compared.got[c], strict=True)):
            if exp != got:
                step = _first_difference(exp, got)
                differing.append(
                    (
                        c,
                        p,
                        {"input_ids": case["input_ids"][p], "prefix": exp[:step], "params": case["params"]},
                    )
                )
    total = sum(len(case["input_ids"]) for case in CASES)
    # Mostly identical: a near-tie is rare with these weights, a systematic bug is not.
    assert len(differing) <= total // 10, [(c, p) for c, p, _ in differing]
    if not differing:
        return
    scores = _reference_scores(compared.hf_dir, [d[2] for d in differing])
    for (c, p, _), out in zip(differing, scores, strict=True):
        top = sorted(out["scores"], reverse=True)
        assert top[0] - top[1] < NEAR_TIE, (
            f"{compared.kind} case {c} prompt {p} ({CASES[c]['params']}): ours {compared.got[c][p]} vs "
            f"reference {compared.expected[c][p]}; reference scores {out} are not a near-tie"
        )


def test_sequences_are_not_trivial(compared: Compared) -> None:
    """The comparison means something only if outputs run long and vary between settings."""
    lengths = [len(ids) for case in compared.expected for ids in case]
    assert np.mean(lengths) > MAX_NEW * 0.8
    distinct = {tuple(ids) for case in compared.expected for ids in case}
    assert len(distinct) > len(lengths) * 0.8


def test_near_tie_scores_match_the_reference_run(compared: Compared) -> None:
    """The scorer itself is right: at the step after a prefix, the reference's choice is its argmax."""
    case = CASES[0]
    prompt, ref = case["input_ids"][0], compared.expected[0][0]
    steps = [0, 3, len(ref) - 1]
    outs = _reference_scores(
        compared.hf_dir, [{"input_ids": prompt, "prefix": ref[:s], "params": case["params"]} for s in steps]
    )
    for s, out in zip(steps, outs, strict=True):
        best = int(np.argmax(out["scores"]))
        assert out["candidates"][best] == ref[s]
