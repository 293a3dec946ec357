"""The REST shim: the seed's submit/poll API (docs/api.md), transcoded to the
gRPC service through an ``EngineClient`` (in process, or a remote gRPC server).

Every answer that is not a success is the envelope ``{"success": false, "error": {"code",
"message"}}``, including FastAPI's own validation errors, malformed JSON, unknown routes and
internal errors (logged, never shown).
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import BaseModel, ConfigDict, Field, StrictStr, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from engine._version import __version__
from engine.api.body import ASGIApp, BodyLimit, Message, Receive, Scope, Send
from engine.api.client import EngineClient
from engine.api.errors import ApiFailure, ErrorReply, reply_for_code, reply_for_exception, reply_for_job_error
from engine.api.grpc_service import FINISH_TO_PB, PB_TO_STATUS, checked_api_key, params_to_struct
from engine.api.logprobs import seed_logprobs
from engine.api.pb import engine_pb2
from engine.api.sse import EventStream, aclose, sse_frame
from engine.errors import EngineError, InvalidRequest
from engine.limits import MAX_WAIT_S, RequestLimits, shorten
from engine.metrics import Metrics
from engine.serving.jobs import JobError, JobStatus

log = logging.getLogger(__name__)

PLAYGROUND_DIR = Path(__file__).resolve().parent / "playground"
FINISH_NAMES = {pb: reason.value for reason, pb in FINISH_TO_PB.items()}
BODY_FIELDS = ("prompt", "params", "model")


# ---- schemas (they are what /openapi.json publishes) -----------------------------------------


class SubmitBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    prompt: StrictStr | list[StrictStr] = Field(
        description="The prompt, or an array of prompts (one completion each)."
    )
    params: dict[str, Any] | None = Field(
        default=None,
        description="Decoding parameters with Hugging Face generate semantics (max_new_tokens, top_k, "
        "penalty_alpha, num_beams, length_penalty, do_sample, temperature, top_p, seed, "
        "repetition_penalty, no_repeat_ngram_size, min_new_tokens). Missing or {}: 64 new tokens, greedy.",
        examples=[{"max_new_tokens": 64, "top_k": 4, "penalty_alpha": 0.6}],
    )
    model: StrictStr | None = Field(default=None, description="Optional: the model you expect to be served.")


class SubmitData(BaseModel):
    id: str
    responseUrl: str
    queuePosition: str = Field(description="Jobs ahead of this one, as a string (as in the seed API).")


class SubmitResponse(BaseModel):
    success: Literal[True] = True
    data: SubmitData


class UsageModel(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class TopLogprobModel(BaseModel):
    tokenId: int
    token: str = Field(description="The id's sentencepiece piece.")
    logprob: float


class TokenLogprobModel(TopLogprobModel):
    textOffset: int = Field(description="Where the token's text starts in the completion.")
    top: list[TopLogprobModel] = Field(description="The step's most likely ids, most likely first.")


class ResponseData(BaseModel):
    id: str
    status: Literal["queued", "running", "completed", "failed", "cancelled"]
    queuePosition: str
    completion: list[str] | None = Field(description="One text per prompt once completed, else null.")
    usage: UsageModel | None = Field(description="Token counts once completed, else null.")
    finishReason: list[str] | None = Field(
        default=None,
        description='Per prompt once completed: "eos" (the model ended), "stop" (a stop sequence) or '
        '"length" (max_new_tokens).',
    )
    tokenIds: list[list[int]] | None = Field(
        default=None, description="Per prompt once completed: the generated token ids (no EOS)."
    )
    logprobs: list[list[TokenLogprobModel]] | None = Field(
        default=None,
        description="Only when params.logprobs asked, once completed: per prompt, per generated id, "
        "its log-probability and the top alternatives (docs/api.md).",
    )


class ResponseResponse(BaseModel):
    success: Literal[True] = True
    data: ResponseData


class ErrorDetail(BaseModel):
    code: str
    message: str


class ErrorResponse(BaseModel):
    success: Literal[False] = False
    error: ErrorDetail


class InfoResponse(BaseModel):
    model: str
    randomWeights: bool
    device: str
    computeType: str
    maxNewTokensLimit: int
    maxPromptsPerRequest: int
    authRequired: bool
    ready: bool
    version: str = Field(description="The server's package version (`engine --version`).")


ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorResponse, "description": text}
    for status, text in (
        (401, "Missing or unknown API key"),
        (404, "Unknown job id, or a job of another key"),
        (413, "Prompt too long for the model"),
        (422, "Invalid body or parameters"),
        (429, "Queue full or rate limit reached (see Retry-After)"),
        (500, "The job failed (polling a failed job) or an internal error"),
        (503, "Not ready or shutting down"),
    )
}


# ---- helpers ----------------------------------------------------------------------------------


def error_response(reply: ErrorReply) -> JSONResponse:
    headers = {}
    if reply.retry_after_header is not None:
        headers["Retry-After"] = reply.retry_after_header
    return JSONResponse(reply.envelope(), status_code=reply.status.http, headers=headers)


KEY_PARAMETERS: list[dict[str, Any]] = [
    {
        "name": "apiKey",
        "in": "header",
        "required": False,
        "schema": {"type": "string"},
        "description": "Your API key",
    },
    {
        "name": "Authorization",
        "in": "header",
        "required": False,
        "schema": {"type": "string"},
        "description": "Alternative to apiKey: Bearer <key>",
    },
]
WAIT_PARAMETER: dict[str, Any] = {
    "name": "wait",
    "in": "query",
    "required": False,
    "schema": {"type": "number", "minimum": 0, "maximum": MAX_WAIT_S, "default": 0},
    "description": "Long poll: hold the answer up to this many seconds until the job is done.",
}


LAST_EVENT_ID_PARAMETER: dict[str, Any] = {
    "name": "Last-Event-ID",
    "in": "header",
    "required": False,
    "schema": {"type": "integer", "minimum": 0},
    "description": "Resume a stream after this event id (what EventSource sends on reconnect).",
}


def parse_last_event_id(raw: str | None) -> int:
    if raw is None or not raw.strip():
        return 0
    if not raw.strip().isdigit():
        raise InvalidRequest(
            f"Last-Event-ID must be the id of an event of this stream (an integer), got {raw!r}"
        )
    return int(raw.strip())


async def seed_events(job: Any, messages: AsyncIterator[Any], after: int) -> AsyncIterator[bytes]:
    """``_seed_events``, closing ``messages`` (the subscription) as soon as the reader stops."""
    try:
        async for frame in _seed_events(job, messages, after):
            yield frame
    finally:
        await aclose(messages)


async def _seed_events(job: Any, messages: AsyncIterator[Any], after: int) -> AsyncIterator[bytes]:
    """The seed stream's events (docs/api.md, "Streaming"): one per token with the text it adds
    and an increasing id (those up to ``after`` are skipped: a resumed stream), then ``done`` with
    the job as GET /v1/response/{id} answers it. A finished job gets ``done`` at once."""
    if PB_TO_STATUS[job.status].terminal:
        yield done_event(job)
        return
    event_id = 0
    try:
        async for message in messages:
            if not message.HasField("token"):
                yield done_event(message.job)
                return
            t = message.token
            if t.token_id < 0 and not t.text:
                continue  # the end of a prompt that adds nothing: done says it
            event_id += 1
            if event_id <= after:
                continue
            data: dict[str, Any] = {"prompt": t.prompt_index, "token_id": t.token_id, "text": t.text}
            if t.finished:
                data["finish_reason"] = FINISH_NAMES.get(t.finish_reason, "length")
            yield sse_frame(data, event_id=event_id)
    except ApiFailure as exc:
        if exc.reply.code == "not_ready":
            # The server stops before the job ends (it stays queued): no done, which would say the
            # job is over; the stream just ends, and an EventSource reconnects (to another server,
            # or this one restarted) with Last-Event-ID after the retry time given here.
            yield b"retry: 1000\n\n"
            return
        # The job failed: done carries its status and the reason.
        yield sse_frame(
            {
                "id": job.id,
                "status": JobStatus.FAILED.value,
                "queuePosition": "0",
                "completion": None,
                "usage": None,
                "error": {"code": exc.reply.code, "message": exc.reply.message},
            },
            event="done",
        )


def done_event(job: Any) -> bytes:
    data = response_data(job)
    if PB_TO_STATUS[job.status] is JobStatus.FAILED:
        reply = failed_job_reply(job)
        data["error"] = {"code": reply.code, "message": reply.message}
    return sse_frame(data, event="done")


def request_key(request: Request) -> str | None:
    key = api_key_from(request.headers.get("apikey"), request.headers.get("authorization"))
    return None if key is None else checked_api_key(key)


def parse_wait(raw: str | None) -> float:
    """The number; its range (finite, 0 to MAX_WAIT_S) is the service's one check (GetResult)."""
    if raw is None or raw == "":
        return 0.0
    try:
        return float(raw)
    except ValueError:
        raise InvalidRequest(
            f"wait must be a number of seconds between 0 and {MAX_WAIT_S:g}, got {shorten(raw, 40)}"
        ) from None


def parse_submit_body(raw: bytes) -> SubmitBody:
    """Validate the body as FastAPI would, raising its RequestValidationError (same messages)."""
    if not raw.strip():
        raise RequestValidationError([{"type": "missing", "loc": ("body",), "msg": "Field required"}])
    try:
        return SubmitBody.model_validate_json(raw)
    except ValidationError as exc:
        errors = [{**e, "loc": ("body", *e["loc"])} for e in exc.errors(include_url=False)]
        raise RequestValidationError(errors) from None


def api_key_from(api_key: str | None, authorization: str | None) -> str | None:
    if api_key:
        return api_key.strip()
    if authorization:
        scheme, _, token = authorization.strip().partition(" ")
        if scheme.lower() == "bearer" and token.strip():
            return token.strip()
    return None


def response_data(job: Any) -> dict[str, Any]:
    """The ``data`` of ResponseResponse. Built as a dict and sent as is: the hot path of polling
    skips pydantic's response validation (the schema tests keep the shapes honest)."""
    status = PB_TO_STATUS[job.status]
    completion = None
    usage = None
    reasons = None
    token_ids = None
    if status is JobStatus.COMPLETED and job.HasField("result"):
        completion = list(job.result.completion)
        u = job.result.usage
        usage = {
            "prompt_tokens": u.prompt_tokens,
            "completion_tokens": u.completion_tokens,
            "total_tokens": u.total_tokens,
        }
        reasons = [FINISH_NAMES.get(r, "length") for r in job.result.finish_reasons]
        token_ids = [list(t.ids) for t in job.result.token_ids]
    data = {
        "id": job.id,
        "status": status.value,
        "queuePosition": str(job.queue_position),
        "completion": completion,
        "usage": usage,
        "finishReason": reasons,
        "tokenIds": token_ids,
    }
    if completion is not None and job.result.logprobs:
        data["logprobs"] = seed_logprobs(job.result.logprobs)
    return data


_BASE_URLS: dict[tuple[Any, ...], str] = {}


def base_url(request: Request) -> str:
    """``str(request.base_url)`` without its trailing slash, remembered per scheme, Host header,
    server address and root path: Starlette parses and rebuilds the URL on every call, a few
    percent of the event loop's time per submit at 50 clients."""
    scope = request.scope
    host = next((v for k, v in scope["headers"] if k == b"host"), None)
    key = (scope.get("scheme"), host, scope.get("server"), scope.get("root_path", ""))
    url = _BASE_URLS.get(key)
    if url is None:
        if len(_BASE_URLS) >= 1024:  # Host is the client's to choose: keep the memory bounded
            _BASE_URLS.clear()
        url = _BASE_URLS[key] = str(request.base_url).rstrip("/")
    return url


def success(data: dict[str, Any]) -> JSONResponse:
    return JSONResponse({"success": True, "data": data})


def failed_job_reply(job: Any) -> ErrorReply:
    error = JobError(job.error.code, job.error.message) if job.HasField("error") else None
    return reply_for_job_error(error)


def validation_message(exc: RequestValidationError) -> str:
    """One sentence per problem, naming the field and what it must be."""
    messages = []
    for err in exc.errors():
        loc = [str(p) for p in err.get("loc", ()) if p != "body"]
        kind = err.get("type", "")
        if kind == "json_invalid":
            detail = err.get("ctx", {}).get("error", "")
            messages.append(f"the request body is not valid JSON ({detail})")
        elif kind == "missing" and not loc:
            messages.append("the request body is required: a JSON object with prompt and params")
        elif kind == "missing":
            messages.append(f"{'.'.join(loc)} is required")
        elif kind == "extra_forbidden":
            messages.append(
                f"unknown field {'.'.join(loc)!r} in the body; supported: {', '.join(BODY_FIELDS)}"
            )
        elif kind in ("model_attributes_type", "model_type") or (kind == "dict_type" and not loc):
            messages.append("the request body must be a JSON object with prompt and params")
        elif loc and loc[0] == "prompt":
            messages.append("prompt must be a string or an array of strings")
        elif loc and loc[0] == "params":
            messages.append("params must be a JSON object (or omitted for the defaults)")
        elif loc and loc[0] == "model":
            messages.append("model must be a string")
        else:
            where = ".".join(loc) or "the request"
            messages.append(f"{where}: {err.get('msg', 'invalid value')}")
    return "; ".join(dict.fromkeys(messages)) or "invalid request"


class RequestMetrics:
    """ASGI middleware: engine_requests_total{route,code} by route template (bounded labels)."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500

        async def send_wrapper(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            self._observe(scope, status)

    def _observe(self, scope: Scope, status: int) -> None:
        route = scope.get("route")
        path = getattr(route, "path", None) or "unmatched"
        self.metrics.requests.labels(route=path, code=str(status)).inc()


# ---- the app ----------------------------------------------------------------------------------

RESPONSE_PREFIX = "/v1/response/"
Handler = Callable[[Request], Awaitable[Response]]


class EngineApp(FastAPI):
    """FastAPI, except that the two requests every job makes (POST /v1/submit, GET
    /v1/response/{id}) go straight to their handlers, past Starlette's and FastAPI's layers
    (error middlewares, router, dependency solving): at 50 clients those layers were a quarter
    of the event loop's time per job, and every job's submit and poll queue on that one loop.
    The handlers, the error envelope, the metrics and /openapi.json are the same either way."""

    hot: ASGIApp | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self.hot is not None and scope["type"] == "http" and not scope.get("root_path"):
            method, path = scope["method"], scope["path"]
            if (method == "POST" and path == "/v1/submit") or (
                method in ("GET", "DELETE")
                and path.startswith(RESPONSE_PREFIX)
                and "/" not in path[len(RESPONSE_PREFIX) :]
                and len(path) > len(RESPONSE_PREFIX)
            ):
                scope["app"] = self
                await self.hot(scope, receive, send)
                return
        await super().__call__(scope, receive, send)


class HotRoutes:
    """The ASGI app for EngineApp's direct routes: the route's own handler, then the same
    exception-to-envelope mapping as the app's exception handlers."""

    def __init__(
        self,
        routes: dict[tuple[str, str], tuple[Any, Callable[..., Awaitable[Response]]]],
        on_error: Callable[[Request, Exception], Awaitable[Response]],
    ) -> None:
        self._routes = routes  # (method, "submit" | "response") -> (APIRoute, handler)
        self._on_error = on_error

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope["path"]
        if path == "/v1/submit":
            route, handler = self._routes[("POST", "submit")]
            args: tuple[Any, ...] = ()
        else:
            job_id = path[len(RESPONSE_PREFIX) :]
            route, handler = self._routes[(scope["method"], "response")]
            scope["path_params"] = {"job_id": job_id}
            args = (job_id,)
        scope["route"] = route  # what RequestMetrics labels the request with, as the router does
        request = Request(scope, receive)
        try:
            response = await handler(*args, request)
        except Exception as exc:
            response = await self._on_error(request, exc)
        await response(scope, receive, send)


def create_app(
    client: EngineClient,
    metrics: Metrics,
    *,
    public_url: str | None = None,
    limits: RequestLimits | None = None,
) -> EngineApp:
    """The REST app. ``limits`` (engine/limits.py; the defaults when None) sets the body limit
    that every route gets, on the bytes as they arrive (engine/api/body.py)."""
    body_limit = (limits or RequestLimits()).http_body_bytes
    app = EngineApp(
        title="FLAN-T5 inference engine",
        version=__version__,
        description="The seed's submit/poll API over the engine's gRPC service. Send your key in the "
        "`apiKey` header (or `Authorization: Bearer <key>`).",
        docs_url="/docs",
        redoc_url=None,
    )

    public_base = public_url.rstrip("/") if public_url else None

    @app.exception_handler(ApiFailure)
    async def _api_failure(request: Request, exc: ApiFailure) -> JSONResponse:
        return error_response(exc.reply)

    @app.exception_handler(EngineError)
    async def _engine_error(request: Request, exc: EngineError) -> JSONResponse:
        return error_response(reply_for_exception(exc))

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        return error_response(reply_for_code("invalid_request", validation_message(exc)))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == 404:
            reply = reply_for_code(
                "not_found",
                f"no route {request.method} {request.url.path}; the API has POST /v1/submit and "
                "GET or DELETE /v1/response/{id}",
            )
        elif exc.status_code == 405:
            reply = reply_for_code(
                "method_not_allowed", f"{request.method} is not allowed on {request.url.path}"
            )
        else:
            code = {401: "unauthenticated", 413: "payload_too_large", 503: "not_ready"}.get(
                exc.status_code, "invalid_request" if exc.status_code < 500 else "internal"
            )
            reply = ErrorReply(code, str(exc.detail), reply_for_code(code, "").status)
        return error_response(reply)

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception) -> JSONResponse:
        return error_response(reply_for_exception(exc))

    async def on_error(request: Request, exc: Exception) -> Response:
        """What the app's exception handlers answer, for the direct routes."""
        if isinstance(exc, ApiFailure):
            return await _api_failure(request, exc)
        if isinstance(exc, EngineError):
            return await _engine_error(request, exc)
        if isinstance(exc, RequestValidationError):
            return await _validation(request, exc)
        if isinstance(exc, StarletteHTTPException):
            return await _http(request, exc)
        log.error("internal error on %s %s", request.method, request.url.path, exc_info=exc)
        return await _internal(request, exc)

    # The three job routes take the raw Request and parse headers, query and body themselves: with
    # FastAPI's Header/Query/body injection a poll cost 0.37 ms of CPU against 0.15 ms now, and a
    # burst of polls and submits after each batch queues on the one event loop. openapi_extra keeps
    # /openapi.json describing exactly what they accept.
    @app.post(
        "/v1/submit",
        response_model=SubmitResponse,
        responses=ERROR_RESPONSES,
        summary="Queue a generation job",
        openapi_extra={
            "parameters": KEY_PARAMETERS,
            "requestBody": {
                "required": True,
                "content": {"application/json": {"schema": {"$ref": "#/components/schemas/SubmitBody"}}},
            },
        },
    )
    async def submit(request: Request) -> JSONResponse:
        key = request_key(request)
        await client.authenticate(key)  # 401 before the body is read
        # The body is read as JSON whatever Content-Type says: `curl -d '{...}'` labels it a form.
        body = parse_submit_body(await request.body())
        prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
        message = engine_pb2.SubmitRequest(
            prompts=prompts, params=params_to_struct(body.params), model=body.model or ""
        )
        job = await client.submit(key, message, request.headers.get("idempotency-key"))
        base = public_base or base_url(request)
        return success(
            {
                "id": job.id,
                "responseUrl": f"{base}/v1/response/{job.id}",
                "queuePosition": str(job.queue_position),
            }
        )

    @app.get(
        "/v1/response/{job_id}",
        response_model=ResponseResponse,
        responses=ERROR_RESPONSES,
        summary="Poll a job; a failed job answers with an error status",
        openapi_extra={"parameters": [*KEY_PARAMETERS, WAIT_PARAMETER]},
    )
    async def response(job_id: str, request: Request) -> JSONResponse:
        key = request_key(request)
        await client.authenticate(key)  # 401 before anything else is looked at
        wait = parse_wait(request.query_params.get("wait"))
        job = await client.get_result(key, engine_pb2.GetResultRequest(id=job_id, wait_s=wait))
        if PB_TO_STATUS[job.status] is JobStatus.FAILED:
            return error_response(failed_job_reply(job))
        return success(response_data(job))

    @app.delete(
        "/v1/response/{job_id}",
        response_model=ResponseResponse,
        responses=ERROR_RESPONSES,
        summary="Cancel a queued or running job",
        openapi_extra={"parameters": KEY_PARAMETERS},
    )
    async def cancel(job_id: str, request: Request) -> JSONResponse:
        job = await client.cancel(request_key(request), engine_pb2.CancelRequest(id=job_id))
        return success(response_data(job))

    @app.get(
        "/v1/response/{job_id}/stream",
        responses={
            200: {"content": {"text/event-stream": {}}, "description": "Server-sent events"},
            **ERROR_RESPONSES,
        },
        summary="Stream a job's tokens as server-sent events, then the job",
        openapi_extra={"parameters": [*KEY_PARAMETERS, LAST_EVENT_ID_PARAMETER]},
    )
    async def stream(job_id: str, request: Request) -> Response:
        after = parse_last_event_id(request.headers.get("last-event-id"))
        messages = client.stream_result(request_key(request), engine_pb2.StreamResultRequest(id=job_id))
        first = await anext(messages)  # an unknown id or key answers here, before the stream starts
        return EventStream(seed_events(first.job, messages, after))

    @app.get("/v1/info", response_model=InfoResponse, summary="What this server serves")
    async def info() -> InfoResponse:
        i = await client.info()
        return InfoResponse(
            model=i.model,
            randomWeights=i.random_weights,
            device=i.device,
            computeType=i.compute_type,
            maxNewTokensLimit=i.max_new_tokens_limit,
            maxPromptsPerRequest=i.max_prompts_per_request,
            authRequired=i.auth_required,
            ready=i.ready,
            version=i.version,
        )

    @app.get("/healthz", summary="The process is alive")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz", summary="Model loaded and store reachable", responses={503: ERROR_RESPONSES[503]})
    async def readyz() -> Any:
        if await client.ready():
            return {"status": "ready"}
        return error_response(
            reply_for_code("not_ready", "the service is starting, stopping or cannot reach its store")
        )

    @app.get("/metrics", summary="Prometheus metrics", response_class=Response)
    async def metrics_endpoint() -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/", include_in_schema=False)
    async def playground() -> FileResponse:
        return FileResponse(PLAYGROUND_DIR / "index.html", headers={"Cache-Control": "no-cache"})

    @app.get("/playground/{name}", include_in_schema=False)
    async def playground_file(name: str) -> FileResponse:
        allowed = {"app.js": "text/javascript", "style.css": "text/css"}
        if name not in allowed:
            raise StarletteHTTPException(404)
        return FileResponse(
            PLAYGROUND_DIR / name, media_type=allowed[name], headers={"Cache-Control": "no-cache"}
        )

    base_openapi = app.openapi

    def openapi() -> dict[str, Any]:
        schema = base_openapi()
        schemas = schema.setdefault("components", {}).setdefault("schemas", {})
        schemas.setdefault(
            "SubmitBody", SubmitBody.model_json_schema(ref_template="#/components/schemas/{model}")
        )
        return schema

    app.openapi = openapi  # type: ignore[method-assign]
    app.add_middleware(BodyLimit, limit_bytes=body_limit)
    app.add_middleware(RequestMetrics, metrics=metrics)  # outermost: it counts the 413s too
    api_routes = {
        (m, getattr(r, "path", "")): r for r in app.routes for m in getattr(r, "methods", None) or ()
    }
    app.hot = RequestMetrics(
        BodyLimit(
            HotRoutes(
                {
                    ("POST", "submit"): (api_routes[("POST", "/v1/submit")], submit),
                    ("GET", "response"): (api_routes[("GET", "/v1/response/{job_id}")], response),
                    ("DELETE", "response"): (api_routes[("DELETE", "/v1/response/{job_id}")], cancel),
                },
                on_error,
            ),
            body_limit,
        ),
        metrics,
    )
    return app
