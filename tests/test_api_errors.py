"""engine/api/errors.py: one mapping of errors to HTTP and gRPC statuses, both ways."""

from __future__ import annotations

import grpc
import pytest

from engine.api.errors import (
    ApiFailure,
    reply_for_code,
    reply_for_exception,
    reply_for_job_error,
    reply_for_rpc_error,
)
from engine.errors import (
    EngineError,
    InvalidRequest,
    JobFailed,
    ModelError,
    NotFound,
    NotReady,
    Overloaded,
    PromptTooLong,
    Unauthenticated,
)
from engine.serving.jobs import JobError


@pytest.mark.parametrize(
    ("exc", "http", "code", "grpc_code"),
    [
        (InvalidRequest("x"), 422, "invalid_request", grpc.StatusCode.INVALID_ARGUMENT),
        (PromptTooLong("x"), 413, "prompt_too_long", grpc.StatusCode.INVALID_ARGUMENT),
        (Unauthenticated("x"), 401, "unauthenticated", grpc.StatusCode.UNAUTHENTICATED),
        (NotFound("x"), 404, "not_found", grpc.StatusCode.NOT_FOUND),
        (Overloaded("x", retry_after_s=2.2), 429, "overloaded", grpc.StatusCode.RESOURCE_EXHAUSTED),
        (NotReady("x"), 503, "not_ready", grpc.StatusCode.UNAVAILABLE),
        (JobFailed("x"), 500, "job_failed", grpc.StatusCode.INTERNAL),
        (ModelError("x"), 500, "model_error", grpc.StatusCode.INTERNAL),
        (EngineError("x"), 500, "internal", grpc.StatusCode.INTERNAL),
    ],
)
def test_every_engine_error_has_one_status_per_transport(
    exc: EngineError, http: int, code: str, grpc_code: grpc.StatusCode
) -> None:
    reply = reply_for_exception(exc)
    assert (reply.status.http, reply.code, reply.status.grpc, reply.message) == (http, code, grpc_code, "x")
    # What a REST shim in front of a remote gRPC server rebuilds from the status and trailers.
    back = reply_for_rpc_error(reply.status.grpc, reply.message, dict(reply.grpc_trailers()))
    assert back == reply or (back.code, back.status, back.message) == (
        reply.code,
        reply.status,
        reply.message,
    )


def test_retry_after_is_whole_seconds_and_travels_in_trailers() -> None:
    reply = reply_for_exception(Overloaded("full", retry_after_s=2.2))
    assert reply.retry_after_header == "3"
    assert dict(reply.grpc_trailers()) == {"error-code": "overloaded", "retry-after": "3"}
    assert reply_for_exception(Overloaded("full", retry_after_s=0.01)).retry_after_header == "1"
    back = reply_for_rpc_error(grpc.StatusCode.RESOURCE_EXHAUSTED, "full", dict(reply.grpc_trailers()))
    assert back.retry_after_header == "3"


def test_unexpected_exceptions_are_internal_and_hide_their_details() -> None:
    reply = reply_for_exception(KeyError("secret"))
    assert reply.status.http == 500 and "secret" not in reply.message
    assert reply_for_exception(ApiFailure(reply_for_code("not_found", "gone"))).status.http == 404


def test_failed_jobs_answer_the_status_that_applies_or_500() -> None:
    assert reply_for_job_error(JobError("timeout", "too slow")).status.http == 504
    assert reply_for_job_error(JobError("prompt_too_long", "long")).status.http == 413
    assert reply_for_job_error(JobError("invalid_request", "bad")).status.http == 422
    full = reply_for_job_error(JobError("overloaded", "the contrastive batch is full"))
    assert (full.status.http, full.code) == (500, "job_failed")  # final: not a "retry later" 429
    assert "overloaded" in full.message and "batch is full" in full.message
    assert reply_for_job_error(JobError("engine_error", "boom")).status.http == 500
    assert reply_for_job_error(None).status.http == 500


def test_a_remote_server_without_trailers_still_maps() -> None:
    reply = reply_for_rpc_error(grpc.StatusCode.UNAVAILABLE, "connection refused", {})
    assert (reply.status.http, reply.code) == (503, "not_ready")
    assert "unreachable" in reply.message
    assert reply_for_rpc_error(grpc.StatusCode.DATA_LOSS, None, {}).status.http == 500
