"""The one mapping of the project's errors to what each transport answers.

Every error a client sees is an ``ErrorReply``: a stable code (the envelope's ``error.code``), a
message that says what to fix, the HTTP status and the gRPC status. The REST shim and the gRPC
servicer both build it here, so the two transports can never disagree; the REST shim talking to a
remote gRPC server rebuilds it from the status and the ``error-code`` trailing metadata.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import grpc

from engine.errors import EngineError
from engine.limits import MAX_ERROR_MESSAGE_CHARS
from engine.serving.jobs import JobError

log = logging.getLogger(__name__)

# Trailing metadata keys of a failed gRPC call.
ERROR_CODE_KEY = "error-code"
RETRY_AFTER_KEY = "retry-after"


@dataclass(frozen=True)
class Status:
    http: int
    grpc: grpc.StatusCode


# Keyed by the stable error code (engine.errors' ``code`` attributes, JobError codes and the REST
# shim's own codes).
STATUS_BY_CODE: dict[str, Status] = {
    "invalid_request": Status(422, grpc.StatusCode.INVALID_ARGUMENT),
    "prompt_too_long": Status(413, grpc.StatusCode.INVALID_ARGUMENT),
    "payload_too_large": Status(413, grpc.StatusCode.INVALID_ARGUMENT),
    "unauthenticated": Status(401, grpc.StatusCode.UNAUTHENTICATED),
    "not_found": Status(404, grpc.StatusCode.NOT_FOUND),
    "method_not_allowed": Status(405, grpc.StatusCode.UNIMPLEMENTED),
    "overloaded": Status(429, grpc.StatusCode.RESOURCE_EXHAUSTED),
    "not_ready": Status(503, grpc.StatusCode.UNAVAILABLE),
    "timeout": Status(504, grpc.StatusCode.DEADLINE_EXCEEDED),
    "job_failed": Status(500, grpc.StatusCode.INTERNAL),
    "model_error": Status(500, grpc.StatusCode.INTERNAL),
    "internal": Status(500, grpc.StatusCode.INTERNAL),
}
INTERNAL = STATUS_BY_CODE["internal"]
# Reasons a finished job keeps as its poll's status; any other reason answers 500 job_failed.
JOB_ERROR_CODES = frozenset({"invalid_request", "prompt_too_long", "timeout", "job_failed"})

# For a remote gRPC server that sent no error-code (e.g. a proxy in between): the usual code.
_CODE_BY_GRPC: dict[grpc.StatusCode, str] = {
    grpc.StatusCode.INVALID_ARGUMENT: "invalid_request",
    grpc.StatusCode.UNAUTHENTICATED: "unauthenticated",
    grpc.StatusCode.NOT_FOUND: "not_found",
    grpc.StatusCode.RESOURCE_EXHAUSTED: "overloaded",
    grpc.StatusCode.UNAVAILABLE: "not_ready",
    grpc.StatusCode.DEADLINE_EXCEEDED: "timeout",
    grpc.StatusCode.UNIMPLEMENTED: "method_not_allowed",
}


@dataclass(frozen=True)
class ErrorReply:
    code: str
    message: str
    status: Status
    retry_after_s: float | None = None

    @property
    def retry_after_header(self) -> str | None:
        """Whole seconds, at least 1 (Retry-After has no fractions)."""
        if self.retry_after_s is None:
            return None
        return str(max(1, math.ceil(self.retry_after_s)))

    def envelope(self) -> dict[str, object]:
        return {"success": False, "error": {"code": self.code, "message": self.message}}

    def grpc_trailers(self) -> tuple[tuple[str, str], ...]:
        trailers: tuple[tuple[str, str], ...] = ((ERROR_CODE_KEY, self.code),)
        if self.retry_after_header is not None:
            trailers += ((RETRY_AFTER_KEY, self.retry_after_header),)
        return trailers


class ApiFailure(Exception):
    """Carries an ``ErrorReply`` from a transport-independent layer up to the edge."""

    def __init__(self, reply: ErrorReply) -> None:
        super().__init__(reply.message)
        self.reply = reply


def reply_for_code(code: str, message: str, retry_after_s: float | None = None) -> ErrorReply:
    """Messages are cut to MAX_ERROR_MESSAGE_CHARS: one that quotes a client's huge value must
    not grow the reply (gRPC sends it in a header, where 8 KiB is all there is)."""
    if len(message) > MAX_ERROR_MESSAGE_CHARS:
        message = message[: MAX_ERROR_MESSAGE_CHARS - 15] + "... (truncated)"
    return ErrorReply(code, message, STATUS_BY_CODE.get(code, INTERNAL), retry_after_s)


def reply_for_exception(exc: BaseException) -> ErrorReply:
    """Our errors keep their message; anything else is an internal error whose details are logged,
    never sent to the client."""
    if isinstance(exc, ApiFailure):
        return exc.reply
    if isinstance(exc, EngineError):
        return reply_for_code(exc.code, exc.message, exc.retry_after_s)
    log.error("internal error", exc_info=exc)
    return reply_for_code("internal", "internal server error; the server log has the details")


def reply_for_job_error(error: JobError | None) -> ErrorReply:
    """What polling a failed job answers: the 4xx that applies or a 5xx with the reason."""
    if error is None:
        return reply_for_code("job_failed", "the job failed without a recorded reason")
    if error.code in JOB_ERROR_CODES:
        return reply_for_code(error.code, f"the job failed: {error.message}")
    # Any other reason (engine error, a full batch, ...) is final for this job: a 500 with the
    # reason, never a 429/503 that would tell a client to poll again.
    return reply_for_code("job_failed", f"the job failed ({error.code}): {error.message}")


def reply_for_rpc_error(code: grpc.StatusCode, details: str | None, trailers: dict[str, str]) -> ErrorReply:
    """Rebuild the reply of a remote gRPC server from its status and trailing metadata."""
    error_code = trailers.get(ERROR_CODE_KEY) or _CODE_BY_GRPC.get(code, "internal")
    retry: float | None = None
    if RETRY_AFTER_KEY in trailers:
        try:
            retry = float(trailers[RETRY_AFTER_KEY])
        except ValueError:
            retry = 1.0
    message = details or f"gRPC status {code.name}"
    if error_code == "not_ready" and code == grpc.StatusCode.UNAVAILABLE and ERROR_CODE_KEY not in trailers:
        message = f"the gRPC server is unreachable or not ready ({message})"
    return reply_for_code(error_code, message, retry)
