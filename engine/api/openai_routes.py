"""The OpenAI-compatible routes (docs/api.md, the OpenAI-compatible routes): ``GET /v1/models``,
``POST /v1/completions`` and ``POST /v1/chat/completions``, mounted beside the seed's shim on the
same app and the same ``EngineClient``.

Each request is one job of the engine, submitted like any other (same queue, batcher, fairness,
limits, metrics and store): a non-streaming request waits for its job (``Generate``), a streaming
one reads its token events (``GenerateStream``) as server-sent events ending in
``data: [DONE]``. A client that disconnects cancels its job. Errors are OpenAI's body
``{"error": {"message", "type", "param", "code"}}`` with its statuses, mapped here once
(openai_protocol.openai_error), never the seed's envelope.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from enum import Enum
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from starlette.requests import ClientDisconnect

from engine.api.client import EngineClient
from engine.api.errors import ApiFailure, reply_for_code, reply_for_exception
from engine.api.grpc_service import PB_TO_STATUS, params_to_struct
from engine.api.logprobs import chat_logprobs, completion_logprobs
from engine.api.openai_protocol import (
    BadField,
    Kind,
    OpenAIError,
    OpenAIRequest,
    bad_field_error,
    chat_request,
    choice,
    chunk_choice,
    completion_request,
    envelope,
    finish_reason,
    openai_error,
    parse_body,
    usage,
)
from engine.api.pb import engine_pb2
from engine.api.rest import FINISH_NAMES, request_key
from engine.api.sse import EventStream, aclose, sse_frame, unless_disconnected
from engine.serving.jobs import JobStatus

log = logging.getLogger(__name__)

DONE = b"data: [DONE]\n\n"


def error_response(error: OpenAIError) -> JSONResponse:
    headers = {"Retry-After": error.retry_after} if error.retry_after is not None else None
    return JSONResponse(error.body(), status_code=error.status, headers=headers)


def error_for(exc: BaseException) -> OpenAIError:
    if isinstance(exc, BadField):
        return bad_field_error(exc)
    return openai_error(exc.reply if isinstance(exc, ApiFailure) else reply_for_exception(exc))


def _reason_name(value: Any) -> str:
    return FINISH_NAMES.get(value, "stop")


class OpenAIRoutes:
    """The routes' handlers over one ``EngineClient``."""

    def __init__(self, client: EngineClient) -> None:
        self.client = client
        self._model: tuple[str, str] | None = None

    async def served_model(self) -> str:
        """The served model's name (its folder's name): what /v1/models lists and replies carry."""
        return (await self._served())[0]

    async def _served(self) -> tuple[str, str]:
        """(name, source): the model folder's name and where it came from (engine.json)."""
        if self._model is None:
            info = await self.client.info()
            self._model = (str(info.model), str(info.model_source or info.model))
        return self._model

    # ---- routes ------------------------------------------------------------------------------
    async def models(self, request: Request) -> Response:
        model_id, source = await self._served()
        model = {"id": model_id, "object": "model", "created": 0, "owned_by": "engine", "root": source}
        return JSONResponse({"object": "list", "data": [model]})

    async def completions(self, request: Request) -> Response:
        return await self._generate(request, completion_request)

    async def chat_completions(self, request: Request) -> Response:
        return await self._generate(request, chat_request)

    # ---- the job -----------------------------------------------------------------------------
    async def _generate(self, request: Request, parse: Callable[[dict[str, Any]], OpenAIRequest]) -> Response:
        key = request_key(request)
        await self.client.authenticate(key)  # 401 before the body is read
        oa = parse(parse_body(await request.body()))
        model_id = await self.served_model()
        submit = engine_pb2.SubmitRequest(
            prompts=list(oa.prompts), params=params_to_struct(oa.params), model=oa.model or ""
        )
        # A retry with the same Idempotency-Key attaches to the job the first request made.
        idempotency_key = request.headers.get("idempotency-key")
        if oa.stream:
            stream = self.client.generate_stream(key, submit, idempotency_key)
            first = await anext(stream)  # the accepted job, or the error before any byte is sent
            return EventStream(self._chunks(oa, model_id, first.job, stream))
        job = await unless_disconnected(request, self.client.generate(key, submit, idempotency_key))
        if PB_TO_STATUS[job.status] is not JobStatus.COMPLETED:
            raise ApiFailure(reply_for_code("job_failed", f"the job ended {PB_TO_STATUS[job.status].value}"))
        return JSONResponse(self._reply(oa, model_id, job))

    def _reply(self, oa: OpenAIRequest, model_id: str, job: Any) -> dict[str, Any]:
        result = job.result
        choices = [
            choice(
                oa.kind,
                i,
                text,
                finish_reason(_reason_name(result.finish_reasons[i])),
                _logprobs(oa, result.logprobs[i].tokens if i < len(result.logprobs) else ()),
            )
            for i, text in enumerate(result.completion)
        ]
        return {
            **envelope(oa.kind, job.id, int(job.created_at), model_id, chunk=False),
            "choices": choices,
            "usage": _usage(oa, result),
        }

    async def _chunks(
        self, oa: OpenAIRequest, model_id: str, job: Any, stream: AsyncIterator[Any]
    ) -> AsyncIterator[bytes]:
        head = envelope(oa.kind, job.id, int(job.created_at), model_id, chunk=True)
        extra = {"usage": None} if oa.include_usage else {}
        try:
            if oa.kind is Kind.CHAT:
                roles = [chunk_choice(oa.kind, i, "", None, role=True) for i in range(len(oa.prompts))]
                yield sse_frame({**head, "choices": roles, **extra})
            # Per prompt, the logprobs of tokens whose text is not sent yet: a chunk carries those
            # of the tokens its delta covers.
            held: list[list[Any]] = [[] for _ in oa.prompts]
            async for message in stream:
                if message.HasField("token"):
                    t = message.token
                    if t.HasField("logprob"):
                        held[t.prompt_index].append(t.logprob)
                    reason = finish_reason(_reason_name(t.finish_reason)) if t.finished else None
                    if t.text or reason is not None:
                        tokens, held[t.prompt_index] = held[t.prompt_index], []
                        lp = _logprobs(oa, tokens)
                        c = chunk_choice(oa.kind, t.prompt_index, t.text or None, reason, logprobs=lp)
                        yield sse_frame({**head, "choices": [c], **extra})
                elif PB_TO_STATUS[message.job.status] is JobStatus.COMPLETED and oa.include_usage:
                    yield sse_frame({**head, "choices": [], "usage": _usage(oa, message.job.result)})
        except Exception as exc:
            error = error_for(exc)
            yield sse_frame(error.body())
        finally:
            await aclose(stream)  # a client gone before the end: its job is cancelled now
        yield DONE


def _logprobs(oa: OpenAIRequest, tokens: Sequence[Any]) -> dict[str, Any] | None:
    """A choice's logprobs in the request kind's shape, None when the request did not ask."""
    if oa.logprobs is None:
        return None
    if oa.kind is Kind.CHAT:
        return chat_logprobs(tokens, oa.logprobs)
    return completion_logprobs(tokens)


def _usage(oa: OpenAIRequest, result: Any) -> dict[str, int]:
    """Prompt tokens count each distinct prompt once (not once per choice), as OpenAI does."""
    if len(result.usages) == len(oa.prompts):
        prompt = sum(u.prompt_tokens for u in result.usages[:: oa.n])
        completion = sum(u.completion_tokens for u in result.usages)
        return usage(prompt, completion)
    u = result.usage
    return usage(u.prompt_tokens // oa.n, u.completion_tokens)


def mount(app: FastAPI, client: EngineClient) -> OpenAIRoutes:
    """Add the OpenAI routes to ``app`` (the seed shim's app), with their own error mapping."""
    routes = OpenAIRoutes(client)

    def guarded(
        handler: Callable[[Request], Awaitable[Response]],
    ) -> Callable[[Request], Awaitable[Response]]:
        async def endpoint(request: Request) -> Response:
            try:
                return await handler(request)
            except ClientDisconnect:
                return Response(status_code=499)  # nobody reads it; the job was cancelled
            except Exception as exc:
                error = error_for(exc)
                if error.status >= 500 and not isinstance(exc, ApiFailure):
                    log.error("internal error on %s %s", request.method, request.url.path, exc_info=exc)
                return error_response(error)

        return endpoint

    tags: list[str | Enum] = ["OpenAI-compatible"]
    for path, handler, method, summary in (
        ("/v1/models", routes.models, "GET", "The served model"),
        ("/v1/completions", routes.completions, "POST", "OpenAI completions (docs/openai.md)"),
        ("/v1/chat/completions", routes.chat_completions, "POST", "OpenAI chat completions (docs/openai.md)"),
    ):
        app.add_api_route(path, guarded(handler), methods=[method], tags=tags, summary=summary)
    return routes
