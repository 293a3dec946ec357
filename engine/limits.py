"""Every limit on what a client may send, defined here once; the edge checks each one once.

The operator tunes three of them (``Config``: ``max_new_tokens_limit``, ``max_prompts_per_request``,
``max_prompt_bytes``; their defaults are below); the others are fixed. The transports' own limits
are not chosen separately but derived from these (``RequestLimits``): the gRPC server's largest
message is what the largest valid ``SubmitRequest`` takes, and the HTTP body limit is the same
request written as JSON. So a request that every check would accept always gets through the
transport, and a larger one is refused by the transport before it is read whole.

Who checks what, once: the transports' byte limits in engine/api/body.py (HTTP, on the bytes as
they arrive) and grpc_service.GrpcServer (gRPC); the rest in engine/api/grpc_service.py, the one
edge that both transports pass (``EngineServicer._admit`` and the request readers there), and
``DecodingParams.from_dict`` for the decoding parameters.
"""

from __future__ import annotations

from dataclasses import dataclass

# Operator-tunable (Config fields of the same names): their defaults.
DEFAULT_MAX_NEW_TOKENS_LIMIT = 512
DEFAULT_MAX_PROMPTS_PER_REQUEST = 64
# A prompt's UTF-8 bytes. The model's input limit is in tokens (its manifest's max_input_length,
# 512 for FLAN-T5); this bounds the text the tokenizer is given: 32 bytes per token on average.
DEFAULT_MAX_PROMPT_BYTES = 16 * 1024

# Fixed.
MAX_WAIT_S = 30.0  # a long poll's longest wait (REST ?wait=, gRPC GetResult.wait_s)
# Decoding parameters (DecodingParams.from_dict checks them, and the ranges of the others).
MAX_BEAMS = 16
MAX_TOP_K = 200
MAX_LOGPROBS = 5  # alternatives per token with params.logprobs (OpenAI's limit for completions)
MAX_STOP_SEQUENCES = 4  # as OpenAI's API
MAX_STOP_LENGTH = 256  # characters per stop sequence
# The params object as sent, UTF-8: the stop sequences at their longest (4 bytes a character, a few
# bytes of framing each), and 1 KiB for every other parameter's name and value.
MAX_PARAMS_BYTES = 1024 + MAX_STOP_SEQUENCES * (4 * MAX_STOP_LENGTH + 16)
MAX_PARAMS_DEPTH = 8  # arrays or objects in params (stop is one): protobuf stops at 100 levels
MAX_MODEL_NAME_CHARS = 256
MAX_JOB_ID_CHARS = 64  # ours are 32 hex digits
MAX_API_KEY_CHARS = 256  # ours are about 60 ASCII characters
# An Idempotency-Key: what Stripe and the IETF draft allow (the store keeps it per job); checked by
# JobService.submit, the one place that reads it.
MAX_IDEMPOTENCY_KEY_CHARS = 255
MAX_ERROR_MESSAGE_CHARS = 1024  # a gRPC status message travels in a header (8 KiB for all of them)

# JSON's worst case for text: a character of 2 or 4 UTF-8 bytes written as \uXXXX escapes (6 or 12
# bytes: what Python's json.dumps does by default) takes 3 times its UTF-8 size.
JSON_TEXT_EXPANSION = 3
# Per prompt: quotes, a comma, spaces (JSON); a field tag and a length (protobuf).
PER_PROMPT_OVERHEAD_BYTES = 8
ENVELOPE_BYTES = 1024  # the rest: field names, braces, the model field's framing


def shorten(text: str, limit: int = 80) -> str:
    """``text`` for a message: as is when short, else its start and its length."""
    if len(text) <= limit:
        return repr(text)
    return f"{text[:limit]!r}... ({len(text)} characters)"


@dataclass(frozen=True)
class RequestLimits:
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS_LIMIT
    max_prompts: int = DEFAULT_MAX_PROMPTS_PER_REQUEST
    max_prompt_bytes: int = DEFAULT_MAX_PROMPT_BYTES

    @property
    def grpc_message_bytes(self) -> int:
        """The largest valid SubmitRequest, protobuf-encoded (strings as UTF-8)."""
        prompts = self.max_prompts * (self.max_prompt_bytes + PER_PROMPT_OVERHEAD_BYTES)
        return prompts + MAX_PARAMS_BYTES + 4 * MAX_MODEL_NAME_CHARS + ENVELOPE_BYTES

    @property
    def http_body_bytes(self) -> int:
        """The largest valid request body, JSON-encoded with every character escaped."""
        prompts = self.max_prompts * (JSON_TEXT_EXPANSION * self.max_prompt_bytes + PER_PROMPT_OVERHEAD_BYTES)
        model = JSON_TEXT_EXPANSION * 4 * MAX_MODEL_NAME_CHARS
        return prompts + JSON_TEXT_EXPANSION * MAX_PARAMS_BYTES + model + ENVELOPE_BYTES
