"""What a generation returns: typed, the same for every strategy and runtime."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from engine.runtime.params import DecodingParams


class FinishReason(enum.Enum):
    """Why a row ended. OpenAI's API says "stop" for EOS and STOP, "length" for LENGTH."""

    EOS = "eos"  # the model emitted its end-of-sequence token
    LENGTH = "length"  # max_new_tokens reached
    CANCELLED = "cancelled"  # the caller stopped it
    STOP = "stop"  # a stop sequence matched (engine/runtime/stop.py)


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    def to_dict(self) -> dict[str, int]:
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.total_tokens,
        }


@dataclass(frozen=True)
class TokenLogprob:
    """One generated token's log-probability under the model (``params.logprobs``): the
    log-softmax of the raw logits of its step, before any processor or warper (vLLM's default),
    and the ``params.logprobs`` most likely ids of that step with theirs, most likely first."""

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


@dataclass(frozen=True)
class Result:
    """One prompt's output. ``token_ids`` excludes the decoder-start token and the EOS.

    ``text`` is ``token_ids`` decoded, except after a stop sequence (finish reason STOP): then
    ``token_ids`` end with the token that completed the match and ``text`` ends before it."""

    text: str
    token_ids: tuple[int, ...]
    usage: Usage
    finish_reason: FinishReason = FinishReason.LENGTH
    # With params.logprobs: one per id of token_ids, in order; None when not asked.
    logprobs: tuple[TokenLogprob, ...] | None = None


@dataclass(frozen=True)
class GenerationRequest:
    """One prompt, already tokenized (sentencepiece ids + EOS), with its decoding parameters."""

    input_ids: tuple[int, ...]
    params: DecodingParams = field(default_factory=DecodingParams)
    # Which prompt of its request this is: prompt i of a seeded sampling request draws from the
    # generator seeded with (seed, i), so that equal prompts in one request get different draws.
    draw: int = 0


@dataclass(frozen=True)
class TokenEvent:
    """One step of continuous batching: ``request_id`` got ``token_id`` (-1 when it produced none,
    e.g. on EOS or cancel). ``result`` is set when that request has finished."""

    request_id: str
    token_id: int
    result: Result | None = None
    logprob: TokenLogprob | None = None  # token_id's, when its request asked for logprobs
