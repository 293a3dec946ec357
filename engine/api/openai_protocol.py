"""OpenAI's request and response shapes (as vLLM and TGI serve them), mapped to and from the
engine's jobs. Pure functions and typed values: the routes (openai_routes.py) do the I/O.

A request body becomes an ``OpenAIRequest``: the prompts of one job (each prompt ``n`` times in a
row, so choice ``i * n + j`` is prompt ``i``'s ``j``-th completion), the decoding parameters in
the seed API's names (Hugging Face ``generate`` semantics, validated by the engine like any
job's), and what the reply needs (streaming, usage in the stream, chat or not).

The mapping of parameters (docs/openai.md has the table):
- ``max_tokens`` (chat: also ``max_completion_tokens``) -> ``max_new_tokens``; absent: 16 for
  completions (OpenAI's default), 64 for chat (the seed API's default).
- ``temperature`` absent or 0: greedy (or contrastive, beam by the extras); > 0: sampling at that
  temperature, over all tokens unless ``top_k`` is given (``top_k`` -1 or 0 means all).
- ``top_p`` < 1 applies to sampling and needs ``temperature`` > 0.
- ``seed``, ``top_k``, ``penalty_alpha``, ``num_beams``, ``length_penalty``, ``repetition_penalty``,
  ``no_repeat_ngram_size`` keep their names; ``min_tokens`` -> ``min_new_tokens``.
- ``stop`` (a string or up to 4) -> ``stop``: the text ends before the first match.
- ``logprobs`` (completions: 0 to 5 alternatives; chat: ``logprobs: true`` with ``top_logprobs``
  0 to 5) -> ``logprobs``: per token its log-probability under the model (the log-softmax of the
  raw logits of its step) and the most likely alternatives; computed by our decoder, so not with
  ``num_beams`` > 1 (400).
- ``echo``, ``best_of`` > 1, ``suffix``, ``logit_bias``, non-zero presence or
  frequency penalties, tools and non-text content answer 400 naming the field: the engine has no
  such output or control, and a made-up value would be wrong.
- ``user`` is accepted and not used.
"""

from __future__ import annotations

import enum
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from engine.api.errors import ErrorReply
from engine.limits import MAX_LOGPROBS

DEFAULT_COMPLETION_TOKENS = 16
DEFAULT_CHAT_TOKENS = 64
MAX_N = 16

# The fixed chat prompt format (docs/openai.md): the system text, then one line per turn, then
# the assistant's prefix for the turn the model writes.
CHAT_ROLES = {"system": "", "developer": "", "user": "user: ", "assistant": "assistant: "}
CHAT_REPLY_PREFIX = "assistant:"

_COMMON = {
    "model",
    "max_tokens",
    "temperature",
    "top_p",
    "n",
    "stop",
    "seed",
    "stream",
    "stream_options",
    "logprobs",
    "user",
    "presence_penalty",
    "frequency_penalty",
    "logit_bias",
    # vLLM's extra sampling fields that the engine has
    "top_k",
    "penalty_alpha",
    "num_beams",
    "length_penalty",
    "repetition_penalty",
    "no_repeat_ngram_size",
    "min_tokens",
}
COMPLETION_FIELDS = frozenset(_COMMON | {"prompt", "echo", "best_of", "suffix"})
CHAT_FIELDS = frozenset(
    _COMMON
    | {
        "messages",
        "max_completion_tokens",
        "top_logprobs",
        "tools",
        "tool_choice",
        "parallel_tool_calls",
        "response_format",
    }
)
# Fields passed to the engine under the same name.
_PASSED = (
    "seed",
    "penalty_alpha",
    "num_beams",
    "length_penalty",
    "repetition_penalty",
    "no_repeat_ngram_size",
)
# Seed (Hugging Face) parameter names as an OpenAI client knows them, for error messages.
OPENAI_NAMES = {"max_new_tokens": "max_tokens", "min_new_tokens": "min_tokens"}


class Kind(enum.Enum):
    COMPLETION = "text_completion"
    CHAT = "chat.completion"


class BadField(Exception):
    """A request field that cannot be served as sent: a 400 naming it."""

    def __init__(self, param: str | None, message: str) -> None:
        super().__init__(message)
        self.param = param
        self.message = message


@dataclass(frozen=True)
class OpenAIRequest:
    kind: Kind
    prompts: tuple[str, ...]  # one per choice (each distinct prompt n times in a row)
    n: int
    params: dict[str, Any]  # the job's decoding params (seed API names)
    model: str | None
    stream: bool
    include_usage: bool
    logprobs: int | None = None  # alternatives per token in the reply's logprobs; None: no logprobs


# ---- requests ------------------------------------------------------------------------------


def parse_body(raw: bytes) -> dict[str, Any]:
    if not raw.strip():
        raise BadField(None, "the request body is required: a JSON object")
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise BadField(None, f"the request body is not valid JSON ({exc})") from None
    if not isinstance(body, dict):
        raise BadField(None, "the request body must be a JSON object")
    return body


def completion_request(body: Mapping[str, Any]) -> OpenAIRequest:
    _check_fields(body, COMPLETION_FIELDS)
    prompt = body.get("prompt")
    if isinstance(prompt, str):
        prompts = [prompt]
    elif isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
        prompts = list(prompt)
    elif isinstance(prompt, list) and prompt and all(isinstance(p, int | list) for p in prompt):
        raise BadField("prompt", "prompt as token ids is not supported here; send the text")
    else:
        raise BadField("prompt", "prompt is required: a string or a non-empty array of strings")
    if body.get("echo"):
        raise BadField("echo", "echo is not supported: the reply holds the completion only")
    if body.get("suffix") is not None:
        raise BadField("suffix", "suffix (insertion) is not supported by this model")
    best_of = body.get("best_of")
    if best_of is not None and best_of != body.get("n", 1) and best_of != 1:
        raise BadField("best_of", "best_of is not supported; use n for several completions")
    logprobs = body.get("logprobs")
    if logprobs is not None:
        logprobs = _int_field(body, "logprobs", 0, MAX_LOGPROBS, default=0)
    return _request(
        Kind.COMPLETION, body, prompts, body.get("max_tokens"), DEFAULT_COMPLETION_TOKENS, logprobs
    )


def chat_request(body: Mapping[str, Any]) -> OpenAIRequest:
    _check_fields(body, CHAT_FIELDS)
    logprobs = _chat_logprobs(body)
    if body.get("tools"):
        raise BadField("tools", "tools (function calling) are not supported by this model")
    if body.get("tool_choice") not in (None, "none"):
        raise BadField("tool_choice", 'tool_choice must be absent or "none": this model has no tools')
    fmt = body.get("response_format")
    if fmt is not None and (not isinstance(fmt, dict) or fmt.get("type") != "text"):
        raise BadField("response_format", 'only response_format {"type": "text"} is supported')
    max_tokens = body.get("max_completion_tokens")
    if max_tokens is None:
        max_tokens = body.get("max_tokens")
    prompt = chat_prompt(body.get("messages"))
    return _request(Kind.CHAT, body, [prompt], max_tokens, DEFAULT_CHAT_TOKENS, logprobs)


def _chat_logprobs(body: Mapping[str, Any]) -> int | None:
    """Chat's ``logprobs`` (true/false) and ``top_logprobs`` (0 to 5, only with logprobs true)."""
    wanted = body.get("logprobs")
    if wanted is not None and not isinstance(wanted, bool):
        raise BadField("logprobs", f"logprobs must be true or false, got {wanted!r}")
    if body.get("top_logprobs") is not None and not wanted:
        raise BadField("top_logprobs", "top_logprobs needs logprobs: true")
    if not wanted:
        return None
    return _int_field(body, "top_logprobs", 0, MAX_LOGPROBS, default=0)


def chat_prompt(messages: Any) -> str:
    """Messages as one T5 prompt: system/developer texts first, one ``user: ``/``assistant: `` line
    per turn, then ``assistant:`` for the reply (docs/openai.md, "Chat format")."""
    if not isinstance(messages, list) or not messages:
        raise BadField("messages", "messages is required: a non-empty array of {role, content}")
    system: list[str] = []
    turns: list[str] = []
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise BadField(where, f"{where} must be an object with role and content")
        role = m.get("role")
        if role not in CHAT_ROLES:
            raise BadField(
                f"{where}.role",
                f"{where}.role must be one of {', '.join(CHAT_ROLES)}; got {role!r}",
            )
        text = _content_text(m.get("content"), f"{where}.content")
        if CHAT_ROLES[role]:
            turns.append(CHAT_ROLES[role] + text)
        else:
            system.append(text)
    if not turns:
        raise BadField("messages", "messages needs at least one user or assistant turn")
    head = "\n".join(system)
    return "\n".join([*([head] if head else []), *turns, CHAT_REPLY_PREFIX])


def _content_text(content: Any, where: str) -> str:
    if isinstance(content, str):
        return content.strip()
    if isinstance(content, list):
        parts = []
        for j, part in enumerate(content):
            if (
                not isinstance(part, dict)
                or part.get("type") != "text"
                or not isinstance(part.get("text"), str)
            ):
                raise BadField(
                    f"{where}[{j}]", f"{where}[{j}] must be a text part; this model reads text only"
                )
            parts.append(part["text"])
        return " ".join(p.strip() for p in parts)
    raise BadField(where, f"{where} must be a string or an array of text parts")


def _check_fields(body: Mapping[str, Any], known: frozenset[str]) -> None:
    unknown = sorted(set(body) - known)
    if unknown:
        raise BadField(
            unknown[0], f"unknown field(s) {', '.join(unknown)}; supported: {', '.join(sorted(known))}"
        )


def _request(
    kind: Kind,
    body: Mapping[str, Any],
    prompts: Sequence[str],
    max_tokens: Any,
    default_max: int,
    logprobs: int | None = None,
) -> OpenAIRequest:
    n = _int_field(body, "n", 1, MAX_N, default=1)
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise BadField("model", "model must be a string")
    stream = body.get("stream", False)
    if stream is None:
        stream = False
    if not isinstance(stream, bool):
        raise BadField("stream", "stream must be true or false")
    options = body.get("stream_options")
    include_usage = False
    if options is not None:
        if not isinstance(options, dict) or set(options) - {"include_usage", "continuous_usage_stats"}:
            raise BadField("stream_options", "stream_options must be an object with include_usage")
        if not stream:
            raise BadField("stream_options", "stream_options is only allowed with stream: true")
        include_usage = bool(options.get("include_usage"))
    user = body.get("user")
    if user is not None and not isinstance(user, str):
        raise BadField("user", "user must be a string")
    params = decoding_params(body, max_tokens, default_max)
    if logprobs is not None:
        params["logprobs"] = logprobs
    return OpenAIRequest(
        kind=kind,
        prompts=tuple(p for p in prompts for _ in range(n)),
        n=n,
        params=params,
        model=model or None,
        stream=stream,
        include_usage=include_usage,
        logprobs=logprobs,
    )


def decoding_params(body: Mapping[str, Any], max_tokens: Any, default_max: int) -> dict[str, Any]:
    """The job's params (seed API names). Ranges are the engine's to check: it names the field."""
    params: dict[str, Any] = {"max_new_tokens": default_max if max_tokens is None else max_tokens}
    for name in ("presence_penalty", "frequency_penalty"):
        value = body.get(name)
        if value not in (None, 0, 0.0):
            raise BadField(name, f"{name} is not supported; use repetition_penalty (1.0 = none)")
    if body.get("logit_bias"):
        raise BadField("logit_bias", "logit_bias is not supported by this engine")
    temperature = body.get("temperature")
    sampling = False
    if temperature is not None:
        if (
            isinstance(temperature, bool)
            or not isinstance(temperature, int | float)
            or not math.isfinite(temperature)
        ):
            raise BadField("temperature", f"temperature must be a number, got {temperature!r}")
        if temperature < 0:
            raise BadField("temperature", f"temperature must be at least 0, got {temperature}")
        if temperature > 0:
            sampling = True
            params["do_sample"] = True
            params["temperature"] = temperature
    top_p = body.get("top_p")
    if top_p is not None and top_p != 1:
        if not sampling:
            raise BadField("top_p", "top_p applies to sampling: set temperature > 0 (absent or 0 is greedy)")
        params["top_p"] = top_p
    top_k = body.get("top_k")
    if top_k is not None:
        params["top_k"] = 0 if top_k == -1 else top_k
    elif sampling:
        params["top_k"] = 0  # OpenAI's sampling draws from all tokens (Transformers' default is 50)
    for name in _PASSED:
        if body.get(name) is not None:
            params[name] = body[name]
    if body.get("min_tokens") is not None:
        params["min_new_tokens"] = body["min_tokens"]
    if body.get("stop") is not None:
        params["stop"] = body["stop"]  # the engine checks it (a string or up to 4)
    return params


def _int_field(body: Mapping[str, Any], name: str, low: int, high: int, *, default: int) -> int:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        raise BadField(name, f"{name} must be an integer, got {value!r}")
    if not low <= value <= high:
        raise BadField(name, f"{name} must be between {low} and {high}, got {value}")
    return value


# ---- replies --------------------------------------------------------------------------------


def finish_reason(engine_reason: str) -> str:
    """OpenAI's finish_reason for the engine's: "length" at max_tokens, else "stop" (EOS or a
    stop sequence)."""
    return "length" if engine_reason == "length" else "stop"


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def response_id(kind: Kind, job_id: str) -> str:
    return f"{'chatcmpl' if kind is Kind.CHAT else 'cmpl'}-{job_id}"


def choice(
    kind: Kind, index: int, text: str, reason: str | None, logprobs: dict[str, Any] | None = None
) -> dict[str, Any]:
    if kind is Kind.CHAT:
        return {
            "index": index,
            "message": {"role": "assistant", "content": text},
            "logprobs": logprobs,
            "finish_reason": reason,
        }
    return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": reason}


def chunk_choice(
    kind: Kind,
    index: int,
    text: str | None,
    reason: str | None,
    *,
    role: bool = False,
    logprobs: dict[str, Any] | None = None,
) -> dict[str, Any]:
    if kind is Kind.CHAT:
        delta: dict[str, Any] = {}
        if role:
            delta["role"] = "assistant"
        if text is not None:
            delta["content"] = text
        return {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": reason}
    return {"index": index, "text": text or "", "logprobs": logprobs, "finish_reason": reason}


def envelope(kind: Kind, job_id: str, created: int, model: str, *, chunk: bool) -> dict[str, Any]:
    obj = kind.value if not chunk else ("chat.completion.chunk" if kind is Kind.CHAT else "text_completion")
    return {"id": response_id(kind, job_id), "object": obj, "created": created, "model": model}


# ---- errors ---------------------------------------------------------------------------------

# Our stable error codes -> (HTTP status, OpenAI error type, OpenAI code).
_OPENAI_ERRORS: dict[str, tuple[int, str, str | None]] = {
    "invalid_request": (400, "invalid_request_error", None),
    "prompt_too_long": (400, "invalid_request_error", "context_length_exceeded"),
    "payload_too_large": (413, "invalid_request_error", "payload_too_large"),
    "unauthenticated": (401, "authentication_error", "invalid_api_key"),
    "not_found": (404, "not_found_error", None),
    "method_not_allowed": (405, "invalid_request_error", None),
    "overloaded": (429, "rate_limit_error", "rate_limit_exceeded"),
    "not_ready": (503, "service_unavailable", "service_unavailable"),
    "timeout": (504, "timeout_error", "timeout"),
}


@dataclass(frozen=True)
class OpenAIError:
    status: int
    message: str
    type: str
    param: str | None = None
    code: str | None = None
    retry_after: str | None = None

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad_field_error(exc: BadField) -> OpenAIError:
    return OpenAIError(400, exc.message, "invalid_request_error", exc.param)


def openai_error(reply: ErrorReply) -> OpenAIError:
    """The project's error reply in OpenAI's shape: the same message, the field it names."""
    status, kind, code = _OPENAI_ERRORS.get(reply.code, (500, "server_error", reply.code))
    message, param = reply.message, None
    if reply.code == "invalid_request":
        message, param = _openai_names(message)
        if param == "model":  # OpenAI answers a model it does not serve with 404
            status, code = 404, "model_not_found"
    return OpenAIError(status, message, kind, param, code, reply.retry_after_header)


def _openai_names(message: str) -> tuple[str, str | None]:
    """The engine names parameters as the seed API does; say them as the client sent them."""
    first = message.split(" ", 1)[0].split("[", 1)[0]
    for seed_name, openai_name in OPENAI_NAMES.items():
        message = message.replace(seed_name, openai_name)
    param = OPENAI_NAMES.get(
        first, first if (first.isidentifier() and "_" in first) or first in _PARAM_WORDS else None
    )
    return message, param


_PARAM_WORDS = frozenset({"seed", "stop", "temperature", "model", "prompt", "n", "logprobs"})
