"""The project's small exception hierarchy.

Every edge (CLI, gRPC, REST) maps these to its own status codes in one place; anything else that
escapes is an internal error and is logged, never shown to a client as a stack trace.
"""

from __future__ import annotations


class EngineError(Exception):
    """Base class. ``code`` is the stable machine-readable error code of the API envelope."""

    code = "internal"

    def __init__(self, message: str, retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.message = message
        # When a retry may succeed (REST Retry-After, gRPC retry-after trailer); None: do not say.
        self.retry_after_s = retry_after_s


class InvalidRequest(EngineError):
    """The request is malformed or a parameter is out of range (REST 422, gRPC INVALID_ARGUMENT)."""

    code = "invalid_request"


class PromptTooLong(InvalidRequest):
    """A prompt exceeds the model's input limit (REST 413, gRPC INVALID_ARGUMENT)."""

    code = "prompt_too_long"


class Unauthenticated(EngineError):
    """Missing or unknown API key (REST 401, gRPC UNAUTHENTICATED)."""

    code = "unauthenticated"


class NotFound(EngineError):
    """Unknown job id, or a job that belongs to another key (REST 404, gRPC NOT_FOUND)."""

    code = "not_found"


class Overloaded(EngineError):
    """Queue full or rate limit hit (REST 429 + Retry-After, gRPC RESOURCE_EXHAUSTED)."""

    code = "overloaded"
    retry_after_s: float  # always said

    def __init__(self, message: str, retry_after_s: float = 1.0) -> None:
        super().__init__(message, retry_after_s)


class NotReady(EngineError):
    """Model not loaded yet, store unreachable, or shutting down (REST 503, gRPC UNAVAILABLE);
    ``retry_after_s``, when set, becomes the reply's Retry-After."""

    code = "not_ready"


class ModelError(EngineError):
    """A model folder or checkpoint cannot be converted or loaded (CLI exit code 2)."""

    code = "model_error"


class JobFailed(EngineError):
    """A job ran and failed (timeout, engine error); polling it answers with an error status."""

    code = "job_failed"
