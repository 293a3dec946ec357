"""Decoding parameters: validated once at the edge, typed and immutable everywhere after.

Semantics follow Hugging Face ``generate`` (the seed API's parameters): ``top_k`` defaults to 50 as
in ``GenerationConfig``, so ``penalty_alpha > 0`` alone means contrastive search over 50
candidates, exactly as Transformers does.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from engine.errors import InvalidRequest
from engine.limits import (
    DEFAULT_MAX_NEW_TOKENS_LIMIT,
    MAX_BEAMS,
    MAX_LOGPROBS,
    MAX_STOP_LENGTH,
    MAX_STOP_SEQUENCES,
    MAX_TOP_K,
)

if TYPE_CHECKING:
    from engine.runtime.strategies import StrategySpec

DEFAULT_MAX_NEW_TOKENS = 64


class Strategy(enum.Enum):
    """A decoding strategy's name (stored with queued jobs). How each is recognised, batched and
    run: its row in engine/runtime/strategies.py."""

    GREEDY = "greedy"
    BEAM = "beam"
    SAMPLE = "sample"
    CONTRASTIVE = "contrastive"


@dataclass(frozen=True)
class DecodingParams:
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
    min_new_tokens: int = 0
    top_k: int = 50
    penalty_alpha: float = 0.0
    num_beams: int = 1
    length_penalty: float = 1.0
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    repetition_penalty: float = 1.0
    no_repeat_ngram_size: int = 0
    # Generation ends at the first match in the text, which is cut before it (engine/runtime/stop.py).
    stop: tuple[str, ...] = ()
    # Per generated token, its log-probability and the top ``logprobs`` alternatives (0 to
    # MAX_LOGPROBS; None: none). Computed by our decoder (backends.py), so not with beam search.
    logprobs: int | None = None

    def __post_init__(self) -> None:
        # A store reads params back from JSON, where the tuple became a list.
        if not isinstance(self.stop, tuple):
            object.__setattr__(self, "stop", tuple(self.stop))

    @property
    def strategy(self) -> Strategy:
        return self.spec.strategy

    @property
    def spec(self) -> StrategySpec:
        """The strategy table's row for these parameters."""
        # Imported here: the table imports this module (and the choosers, which use it).
        from engine.runtime.strategies import spec_of

        return spec_of(self)

    def batch_key(self) -> tuple[Any, ...]:
        """Requests with equal keys can share one engine call (everything but the length limit and
        the stop sequences, which every backend applies per row).

        Parameters that a strategy ignores are left out (its row's ``batch_fields`` name those it
        reads) so that, e.g., greedy requests that differ only in ``top_k`` still batch together.
        """
        spec = self.spec
        common = (spec.strategy, self.min_new_tokens, self.repetition_penalty, self.no_repeat_ngram_size)
        return (*common, *(getattr(self, name) for name in spec.batch_fields))

    def to_dict(self) -> dict[str, Any]:
        """Every field (JSON-serializable; ``from_dict`` and the constructor take it back)."""
        return asdict(self)

    @classmethod
    def from_dict(
        cls, raw: Mapping[str, Any] | None, *, max_new_tokens_limit: int = DEFAULT_MAX_NEW_TOKENS_LIMIT
    ) -> DecodingParams:
        """Validate client parameters. ``None`` or ``{}`` means the defaults (64 tokens, greedy)."""
        if raw is None:
            raw = {}
        if not isinstance(raw, Mapping):
            raise InvalidRequest(f"params must be a JSON object, got {_type_name(raw)}")
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(raw) - known)
        if unknown:
            raise InvalidRequest(
                f"unknown parameter(s) {', '.join(unknown)}; supported: {', '.join(sorted(known))}"
            )
        v: dict[str, Any] = {}
        if "max_new_tokens" in raw:
            v["max_new_tokens"] = _int(raw, "max_new_tokens", 1, max_new_tokens_limit)
        if "min_new_tokens" in raw:
            v["min_new_tokens"] = _int(raw, "min_new_tokens", 0, max_new_tokens_limit)
        if "top_k" in raw:
            v["top_k"] = _int(raw, "top_k", 0, MAX_TOP_K)
        if "penalty_alpha" in raw:
            v["penalty_alpha"] = _float(raw, "penalty_alpha", 0.0, 1.0)
        if "num_beams" in raw:
            v["num_beams"] = _int(raw, "num_beams", 1, MAX_BEAMS)
        if "length_penalty" in raw:
            v["length_penalty"] = _float(raw, "length_penalty", -10.0, 10.0)
        if "do_sample" in raw:
            if not isinstance(raw["do_sample"], bool):
                raise InvalidRequest(f"do_sample must be true or false, got {raw['do_sample']!r}")
            v["do_sample"] = raw["do_sample"]
        if "temperature" in raw:
            v["temperature"] = _float(raw, "temperature", 0.0, 100.0, low_open=True)
        if "top_p" in raw:
            v["top_p"] = _float(raw, "top_p", 0.0, 1.0, low_open=True)
        if "seed" in raw and raw["seed"] is not None:
            v["seed"] = _int(raw, "seed", 0, 2**63 - 1)
        if "repetition_penalty" in raw:
            v["repetition_penalty"] = _float(raw, "repetition_penalty", 0.0, 100.0, low_open=True)
        if "no_repeat_ngram_size" in raw:
            v["no_repeat_ngram_size"] = _int(raw, "no_repeat_ngram_size", 0, 64)
        if "stop" in raw:
            v["stop"] = _stop(raw["stop"])
        if "logprobs" in raw and raw["logprobs"] is not None:
            v["logprobs"] = _int(raw, "logprobs", 0, MAX_LOGPROBS)
        params = cls(**v)
        if params.min_new_tokens > params.max_new_tokens:
            raise InvalidRequest(
                f"min_new_tokens ({params.min_new_tokens}) must not exceed max_new_tokens "
                f"({params.max_new_tokens})"
            )
        if params.do_sample and params.num_beams > 1:
            raise InvalidRequest(
                "do_sample with num_beams > 1 (beam sampling) is not supported; "
                "use either do_sample or num_beams"
            )
        if params.logprobs is not None and params.num_beams > 1:
            raise InvalidRequest(
                "logprobs with num_beams > 1 is not supported: beam search runs on CTranslate2, "
                "which gives no per-step log-probabilities; leave out logprobs or num_beams"
            )
        return params


def _type_name(value: object) -> str:
    return {bool: "a boolean", str: "a string", list: "an array", dict: "an object"}.get(
        type(value), type(value).__name__
    )


def _stop(value: Any) -> tuple[str, ...]:
    """A string, or a list of up to MAX_STOP_SEQUENCES strings (null and [] mean none)."""
    if value is None:
        return ()
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list | tuple):
        raise InvalidRequest(f"stop must be a string or a list of strings, got {_type_name(value)}")
    if len(value) > MAX_STOP_SEQUENCES:
        raise InvalidRequest(f"stop takes at most {MAX_STOP_SEQUENCES} strings, got {len(value)}")
    for i, item in enumerate(value):
        if not isinstance(item, str):
            raise InvalidRequest(f"stop[{i}] must be a string, got {_type_name(item)} {item!r}")
        if not item:
            raise InvalidRequest(f"stop[{i}] is empty; a stop sequence needs at least one character")
        if len(item) > MAX_STOP_LENGTH:
            raise InvalidRequest(
                f"stop[{i}] is {len(item)} characters long; at most {MAX_STOP_LENGTH} are allowed"
            )
    return tuple(dict.fromkeys(value))


def _int(raw: Mapping[str, Any], name: str, low: int, high: int) -> int:
    value = raw[name]
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InvalidRequest(f"{name} must be an integer, got {_type_name(value)} {value!r}")
    if isinstance(value, float):
        if not value.is_integer():
            raise InvalidRequest(f"{name} must be an integer, got {value!r}")
        value = int(value)
    if not low <= value <= high:
        raise InvalidRequest(f"{name} must be between {low} and {high}, got {value}")
    return value


def _float(raw: Mapping[str, Any], name: str, low: float, high: float, *, low_open: bool = False) -> float:
    value = raw[name]
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InvalidRequest(f"{name} must be a number, got {_type_name(value)} {value!r}")
    value = float(value)
    too_low = value <= low if low_open else value < low
    if not math.isfinite(value) or too_low or value > high:
        bound = f"greater than {low}" if low_open else f"at least {low}"
        raise InvalidRequest(f"{name} must be {bound} and at most {high}, got {value}")
    return value
