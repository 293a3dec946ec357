"""Which backend runs a request: CTranslate2's batched ``translate_batch``, or our decoder.

The one place that decides it (``backend_for``); the rest of the code asks. What each backend can
run follows from the strategy table (engine/runtime/strategies.py: a row with a chooser runs on our
decoder, one with CTranslate2 options on CTranslate2; ``RUNS_ON`` is that view): beam search only on
CTranslate2; contrastive search only on our decoder; sampling with a seed only on our decoder
(the row's ``decoder_only``); and any request for logprobs only on our decoder (it has every step's
logits; CTranslate2 gives no per-step log-probabilities over the vocabulary). Where both can run a
strategy, the choice is measured (``GREEDY_ON_DECODER``, benchmarks/bench_greedy_backends.py)
or exactness decides: in float32, greedy with repetition penalty or no-repeat-ngram runs on our
decoder, since CTranslate2 leaves the decoder-start token out of those processors' history and
Transformers keeps it (ct2.py).
"""

from __future__ import annotations

import enum

from engine.runtime.params import DecodingParams, Strategy
from engine.runtime.strategies import STRATEGIES


class Backend(enum.Enum):
    CTRANSLATE2 = "ctranslate2"
    DECODER = "decoder"  # ours: engine/runtime/decoder_batch.py


RUNS_ON: dict[Strategy, frozenset[Backend]] = {
    s.strategy: frozenset(
        {b for b, runs in ((Backend.CTRANSLATE2, s.ct2_options), (Backend.DECODER, s.chooser)) if runs}
    )
    for s in STRATEGIES
}

# Greedy (with or without processors): up to how many prompts in one call our decoder is faster
# than CTranslate2, per (device, compute type); absent: CTranslate2 always. Measured side by side
# by benchmarks/bench_greedy_backends.py (RESULTS.md, "Greedy: which backend", rerun in issue 15's
# seventh session): on the 2-core AMD EPYC (AVX-512 VNNI, no AMX), FLAN-T5-small int8, 64 tokens,
# our decoder took 0.06 / 0.20 / 0.35 s at batch 1 / 8 / 16 against CTranslate2's 0.26 / 0.36 /
# 0.48 s, tied at 32 (0.75 s against 0.76 s) and lost at 64 (1.83 s against 1.52 s). Other compute
# types were not measured: they stay on CTranslate2.
GREEDY_ON_DECODER: dict[tuple[str, str], int] = {("cpu", "int8"): 16}

# Where the server runs greedy requests on our decoder's continuous batch (rows join and leave
# between steps) instead of one-shot batched calls, by (device, compute type): measured through the
# server at 1, 4 and 16 clients by benchmarks/bench_greedy_lane.py (RESULTS.md, "Greedy on the
# continuous lane, through real servers": 1.34x the batch lane's tokens/s at 16 clients, within
# noise at 1 and 4). Elsewhere (CUDA, float32) nothing was measured: greedy stays on the batch lane.
GREEDY_CONTINUOUS: frozenset[tuple[str, str]] = frozenset({("cpu", "int8")})


def greedy_continuous(device: str, compute_type: str) -> bool:
    """Whether greedy is served on our decoder's continuous batch by default here."""
    return (device, compute_type) in GREEDY_CONTINUOUS


def needs_decoder(params: DecodingParams) -> bool:
    """Only our decoder can run it: contrastive search, sampling with a seed, and any request for
    logprobs (CTranslate2 gives no per-step log-probabilities over the vocabulary). Such requests
    take the scheduler's continuous lane whatever the device."""
    if params.logprobs is not None:
        return True
    spec = params.spec
    if spec.decoder_only is not None and spec.decoder_only(params):
        return True
    return RUNS_ON[spec.strategy] == {Backend.DECODER}


def backend_for(params: DecodingParams, *, device: str, compute_type: str, batch_size: int = 1) -> Backend:
    """The backend for a call of ``batch_size`` requests with these (batch-compatible) params."""
    if needs_decoder(params):
        return Backend.DECODER
    runs_on = RUNS_ON[params.strategy]
    if runs_on == {Backend.CTRANSLATE2}:
        return Backend.CTRANSLATE2
    if params.strategy is Strategy.GREEDY:
        processors = params.repetition_penalty != 1.0 or params.no_repeat_ngram_size > 0
        if processors and compute_type == "float32":
            return Backend.DECODER  # token-exact with Transformers where CTranslate2 is not
        if batch_size <= GREEDY_ON_DECODER.get((device, compute_type), 0):
            return Backend.DECODER
    return Backend.CTRANSLATE2
