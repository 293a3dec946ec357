"""Log-probabilities of generated tokens (``DecodingParams.logprobs``), as vLLM reports them by
default: the log-softmax of the step's raw logits, before any logits processor or warper, so that
the figure is the model's own distribution whatever the strategy chose with.

Our decoder (decoder_batch.py) calls ``log_softmax`` on a row's logits before its chooser
processes them, and ``token_logprob`` once the step's token is known; rows that did not ask pay
nothing.
"""

from __future__ import annotations

import numpy as np

from engine.runtime.choosers import top_k
from engine.runtime.result import TokenLogprob


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """log softmax of one row of logits [V], in float32 as torch computes it (max-shifted)."""
    shifted = logits.astype(np.float32) - np.float32(logits.max())
    return shifted - np.float32(np.log(np.exp(shifted, dtype=np.float32).sum(dtype=np.float32)))


def token_logprob(logprobs: np.ndarray, token_id: int, alternatives: int) -> TokenLogprob:
    """``token_id``'s entry of a step's log-softmax, and the ``alternatives`` most likely ids of that
    step, most likely first (equal values by lower id)."""
    top = top_k(logprobs, alternatives) if alternatives > 0 else np.empty(0, dtype=np.int64)
    return TokenLogprob(
        token_id=token_id,
        logprob=float(logprobs[token_id]),
        top=tuple((int(i), float(logprobs[i])) for i in top),
    )
