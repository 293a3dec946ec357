"""The gRPC service (``engine.v1.Engine``) over the job service: the primary API.

``EngineServicer`` has two faces: transport-independent coroutines (``submit``, ``get_result``,
``cancel``, ``generate``, ``generate_stream``) that take the API key and a request message and
raise the project's errors, and the gRPC handlers (``Submit``, ...) that read the key from the
``apikey`` metadata and map errors to status codes via engine/api/errors.py. The REST shim calls
the first face in process, or the gRPC handlers of a remote server over a channel; both give the
same messages.

Only job-creating calls (Submit, Generate, GenerateStream) count against a key's rate limit: the
seed's own client polls in a tight loop, and a poll is a cheap read.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import AbstractAsyncContextManager, nullcontext, suppress
from dataclasses import dataclass, field
from typing import Any, Protocol

import grpc
from google.protobuf import struct_pb2
from google.protobuf.message import DecodeError
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer as AioHealthServicer
from grpc_reflection.v1alpha import reflection

from engine import logs
from engine._version import __version__
from engine.api.auth import Authenticator
from engine.api.deltas import Decode, TextDeltas
from engine.api.errors import ApiFailure, reply_for_exception, reply_for_job_error
from engine.api.logprobs import Piece, row_logprobs_to_pb, token_logprob_to_pb
from engine.api.pb import engine_pb2, engine_pb2_grpc
from engine.errors import InvalidRequest, NotReady, PromptTooLong, Unauthenticated
from engine.limits import (
    MAX_API_KEY_CHARS,
    MAX_JOB_ID_CHARS,
    MAX_MODEL_NAME_CHARS,
    MAX_PARAMS_DEPTH,
    MAX_WAIT_S,
    RequestLimits,
    shorten,
)
from engine.metrics import Metrics
from engine.runtime.params import DecodingParams
from engine.runtime.result import FinishReason
from engine.serving.events import RowEvent
from engine.serving.jobs import Job, JobStatus, JobView

log = logging.getLogger(__name__)

SERVICE_NAME = "engine.v1.Engine"
API_KEY_METADATA = "apikey"
# Submit, Generate and GenerateStream with this metadata (REST and the OpenAI routes: the
# Idempotency-Key header) are safe to retry: the same API key and idempotency key answer the job
# the first call made (JobService.submit), and a Generate that loses its client leaves the job
# running for the retry instead of cancelling it.
IDEMPOTENCY_METADATA = "idempotency-key"

STATUS_TO_PB = {
    JobStatus.QUEUED: engine_pb2.JOB_STATUS_QUEUED,
    JobStatus.RUNNING: engine_pb2.JOB_STATUS_RUNNING,
    JobStatus.COMPLETED: engine_pb2.JOB_STATUS_COMPLETED,
    JobStatus.FAILED: engine_pb2.JOB_STATUS_FAILED,
    JobStatus.CANCELLED: engine_pb2.JOB_STATUS_CANCELLED,
}
PB_TO_STATUS = {v: k for k, v in STATUS_TO_PB.items()}
FINISH_TO_PB = {
    FinishReason.EOS: engine_pb2.FINISH_REASON_EOS,
    FinishReason.LENGTH: engine_pb2.FINISH_REASON_LENGTH,
    FinishReason.CANCELLED: engine_pb2.FINISH_REASON_CANCELLED,
    FinishReason.STOP: engine_pb2.FINISH_REASON_STOP,
}


@dataclass(frozen=True)
class ServerInfo:
    """What the server serves and accepts; the Info call and the playground's banner."""

    model: str
    random_weights: bool
    device: str
    compute_type: str
    auth_required: bool
    limits: RequestLimits = field(default_factory=RequestLimits)
    # The checkpoint it came from (engine.json's source): also accepted as ``model``.
    model_source: str = ""

    @property
    def max_new_tokens_limit(self) -> int:
        return self.limits.max_new_tokens

    @property
    def max_prompts_per_request(self) -> int:
        return self.limits.max_prompts


class ServiceLike(Protocol):
    """What the servicer needs of engine.serving.service.JobService (see its docstring)."""

    @property
    def ready(self) -> bool: ...

    async def submit(
        self,
        owner: str,
        prompts: Sequence[str],
        params: DecodingParams,
        model: str | None = None,
        idempotency_key: str | None = None,
    ) -> JobView: ...

    async def get(self, owner: str, job_id: str) -> JobView: ...

    async def cancel(self, owner: str, job_id: str) -> JobView: ...

    async def wait(self, owner: str, job_id: str, timeout_s: float | None = None) -> JobView: ...

    def stream(self, owner: str, job_id: str) -> AsyncIterator[RowEvent]: ...


_PARAMS_SEEN: dict[tuple[bytes, int], DecodingParams] = {}
_PARAMS_SEEN_MAX = 1024


def params_from_struct(params: struct_pb2.Struct, *, max_new_tokens_limit: int) -> DecodingParams:
    """Validate the client's params exactly as sent (unknown names and bad values by name).

    Clients send the same few params over and over; the validated result of each distinct
    message (its deterministic serialization) is kept, since reading a Struct back to Python and
    validating it was a quarter of a submit's CPU on the event loop. Invalid params are never
    kept: they raise every time, with their message."""
    key = (params.SerializeToString(deterministic=True), max_new_tokens_limit)
    seen = _PARAMS_SEEN.get(key)
    if seen is not None:
        return seen
    validated = _params_from_struct(params, max_new_tokens_limit=max_new_tokens_limit)
    if len(_PARAMS_SEEN) >= _PARAMS_SEEN_MAX:
        _PARAMS_SEEN.clear()
    _PARAMS_SEEN[key] = validated
    return validated


def _params_from_struct(params: struct_pb2.Struct, *, max_new_tokens_limit: int) -> DecodingParams:
    raw: dict[str, Any] = {name: _plain(value) for name, value in params.items()}
    # Struct carries every number as a double; integral ones go back to int so that messages
    # quote what the client wrote ("got 1", not "got 1.0").
    for name, value in raw.items():
        if isinstance(value, float) and value.is_integer() and abs(value) < 2**63:
            raw[name] = int(value)
    return DecodingParams.from_dict(raw, max_new_tokens_limit=max_new_tokens_limit)


def _plain(value: Any) -> Any:
    """A Struct value as plain Python. Not json_format.MessageToDict: it raises on NaN and
    infinity, which JSON parsers accept and DecodingParams rejects by name."""
    if isinstance(value, struct_pb2.Struct):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, struct_pb2.ListValue):
        return [_plain(v) for v in value]
    return value


def params_to_struct(params: dict[str, Any] | None) -> struct_pb2.Struct:
    """JSON params as a Struct. Struct numbers are doubles: an integer too large for one (400
    digits) becomes an infinity, which the validation then rejects by name."""
    s = struct_pb2.Struct()
    if params:
        s.update({k: _struct_safe(v, k, 1) for k, v in params.items()})
    return s


def _struct_safe(value: Any, name: str, depth: int) -> Any:
    if isinstance(value, bool):
        return value
    if isinstance(value, int):
        try:
            float(value)
        except OverflowError:
            return math.inf if value > 0 else -math.inf
        return value
    if isinstance(value, dict | list):
        # A Struct is a protobuf message: nested past protobuf's own depth limit it cannot be built.
        if depth > MAX_PARAMS_DEPTH:
            raise InvalidRequest(
                f"params.{name[:40]} nests arrays or objects more than {MAX_PARAMS_DEPTH} deep; "
                "parameters are numbers, booleans, strings or arrays of strings"
            )
        if isinstance(value, dict):
            return {k: _struct_safe(v, name, depth + 1) for k, v in value.items()}
        return [_struct_safe(v, name, depth + 1) for v in value]
    return value


def job_to_pb(
    view: JobView, served_model: str = "", piece: Piece | None = None, decode: Decode | None = None
) -> Any:
    """``piece`` and ``decode`` (the tokenizer's) name the tokens of logprobs and place them in
    the text; without them the tokens are "" and the offsets 0."""
    job: Job = view.job
    msg = engine_pb2.Job(
        id=job.id,
        status=STATUS_TO_PB[job.status],
        queue_position=max(0, view.queue_position),
        num_prompts=len(job.prompts),
        model=job.model or served_model,
        created_at=job.created_at,
        started_at=job.started_at or 0.0,
        finished_at=job.finished_at or 0.0,
    )
    if job.result is not None:
        r = job.result
        msg.result.completion.extend(r.completion)
        for ids in r.token_ids:
            msg.result.token_ids.add(ids=ids)
        msg.result.usage.prompt_tokens = r.usage.prompt_tokens
        msg.result.usage.completion_tokens = r.usage.completion_tokens
        msg.result.usage.total_tokens = r.usage.total_tokens
        for u in r.usages:
            msg.result.usages.add(
                prompt_tokens=u.prompt_tokens,
                completion_tokens=u.completion_tokens,
                total_tokens=u.total_tokens,
            )
        for row, text in zip(r.logprobs, r.completion, strict=False):
            msg.result.logprobs.append(row_logprobs_to_pb(row, text, piece, decode))
        for reason in r.finish_reasons:
            known = _finish_reason(reason)
            msg.result.finish_reasons.append(
                FINISH_TO_PB[known] if known is not None else engine_pb2.FINISH_REASON_UNSPECIFIED
            )
    if job.error is not None:
        msg.error.code = job.error.code
        msg.error.message = job.error.message
    return msg


def _finish_reason(value: str) -> FinishReason | None:
    try:
        return FinishReason(value)
    except ValueError:
        return None


class EngineServicer(engine_pb2_grpc.EngineServicer):
    def __init__(
        self,
        service: ServiceLike,
        auth: Authenticator,
        info: ServerInfo,
        *,
        metrics: Metrics | None = None,
        decode: Decode | None = None,
        piece: Piece | None = None,
    ) -> None:
        self.service = service
        self.auth = auth
        self.info = info
        self.metrics = metrics
        self.model_name = info.model
        self.limits = info.limits
        self._served_models = frozenset(n for n in (info.model, info.model_source) if n)
        self._decode = decode
        self._piece = piece

    def _job_pb(self, view: JobView) -> Any:
        return job_to_pb(view, self.model_name, self._piece, self._decode)

    # ---- transport-independent face: raises engine errors -------------------------------

    async def submit(self, api_key: str | None, request: Any, idempotency_key: str | None = None) -> Any:
        owner, prompts, params, model = self._admit(api_key, request)
        view = await self.service.submit(owner, prompts, params, model, idempotency_key)
        return self._job_pb(view)

    async def get_result(self, api_key: str | None, request: Any) -> Any:
        owner = self.auth.authenticate(api_key)
        job_id = _job_id(request.id)
        wait_s = request.wait_s
        if not math.isfinite(wait_s) or wait_s < 0 or wait_s > MAX_WAIT_S:
            raise InvalidRequest(f"wait must be between 0 and {MAX_WAIT_S:g} seconds, got {wait_s:g}")
        if wait_s > 0:
            view = await self.service.wait(owner, job_id, timeout_s=wait_s)
        else:
            view = await self.service.get(owner, job_id)
        return self._job_pb(view)

    async def cancel(self, api_key: str | None, request: Any) -> Any:
        owner = self.auth.authenticate(api_key)
        view = await self.service.cancel(owner, _job_id(request.id))
        return self._job_pb(view)

    async def generate(self, api_key: str | None, request: Any, idempotency_key: str | None = None) -> Any:
        owner, prompts, params, model = self._admit(api_key, request)
        view = await self.service.submit(owner, prompts, params, model, idempotency_key)
        async with self._cancel_on_disconnect(owner, view.job.id, idempotency_key):
            view = await self.service.wait(owner, view.job.id)
        if view.job.status is JobStatus.FAILED:
            raise ApiFailure(reply_for_job_error(view.job.error))
        if not view.job.status.terminal:
            # wait() ends early only when the server stops (it raises NotReady then); never answer
            # OK for a job that has not finished.
            raise NotReady(
                f"job {view.job.id} did not finish before the server stopped; retry", retry_after_s=1.0
            )
        return self._job_pb(view)

    async def generate_stream(
        self, api_key: str | None, request: Any, idempotency_key: str | None = None
    ) -> AsyncIterator[Any]:
        owner, prompts, params, model = self._admit(api_key, request)
        view = await self.service.submit(owner, prompts, params, model, idempotency_key)
        job_id = view.job.id
        yield engine_pb2.GenerateStreamResponse(job=self._job_pb(view))
        async with self._cancel_on_disconnect(owner, job_id, idempotency_key):
            async for message in self._tokens_then_job(owner, view.job):
                yield message

    async def stream_result(self, api_key: str | None, request: Any) -> AsyncIterator[Any]:
        owner = self.auth.authenticate(api_key)
        view = await self.service.get(owner, _job_id(request.id))
        yield engine_pb2.GenerateStreamResponse(job=self._job_pb(view))
        if view.job.status.terminal:
            return
        async for message in self._tokens_then_job(owner, view.job):
            yield message

    async def _tokens_then_job(self, owner: str, job: Job) -> AsyncIterator[Any]:
        """The job's token events with the text each adds, then the terminal job (a failed job
        raises its error instead)."""
        decode = self._decode
        texts = [TextDeltas(decode, job.params.stop) if decode is not None else None for _ in job.prompts]
        generated: list[list[int]] = [[] for _ in job.prompts]  # ids so far, for text offsets
        async for event in self.service.stream(owner, job.id):
            index = event.row.prompt_index
            deltas = texts[index]
            token = engine_pb2.TokenEvent(job_id=job.id, prompt_index=index, token_id=event.token_id)
            if event.logprob is not None:
                # Where its text starts, as in the job's result (logprobs.text_offsets).
                ids = generated[index]
                offset = 0 if decode is None else len(decode(ids))
                if event.result is not None:
                    offset = min(offset, len(event.result.text))
                token.logprob.CopyFrom(token_logprob_to_pb(event.logprob, self._piece, offset))
                ids.append(event.token_id)
            if event.token_id >= 0 and deltas is not None:
                token.text = deltas.push(event.token_id)
            if event.result is not None:
                if deltas is not None:
                    token.text += deltas.finish(event.result.text)
                token.finished = True
                token.finish_reason = FINISH_TO_PB[event.result.finish_reason]
            yield engine_pb2.GenerateStreamResponse(token=token)
        view = await self.service.wait(owner, job.id)
        if view.job.status is JobStatus.FAILED:
            raise ApiFailure(reply_for_job_error(view.job.error))
        yield engine_pb2.GenerateStreamResponse(job=self._job_pb(view))

    async def server_info(self, api_key: str | None, request: Any) -> Any:
        i = self.info
        return engine_pb2.ServerInfo(
            model=i.model,
            random_weights=i.random_weights,
            device=i.device,
            compute_type=i.compute_type,
            max_new_tokens_limit=i.max_new_tokens_limit,
            max_prompts_per_request=i.max_prompts_per_request,
            auth_required=i.auth_required,
            ready=self.service.ready,
            version=__version__,
            model_source=i.model_source,
        )

    def _admit(self, api_key: str | None, request: Any) -> tuple[str, list[str], DecodingParams, str | None]:
        """The one place where a job-creating request's limits and model are checked."""
        owner = self.auth.authenticate(api_key)
        prompts = self._checked_prompts(request.prompts)
        params = params_from_struct(request.params, max_new_tokens_limit=self.limits.max_new_tokens)
        model = self._checked_model(request.model)
        self.auth.admit(owner)
        return owner, prompts, params, model

    def _checked_prompts(self, raw: Sequence[str]) -> list[str]:
        prompts = list(raw)
        limit = self.limits.max_prompts
        if len(prompts) > limit:
            raise InvalidRequest(
                f"too many prompts: {len(prompts)}; at most {limit} prompts per request on this server; "
                "split the request"
            )
        max_bytes = self.limits.max_prompt_bytes
        for i, prompt in enumerate(prompts):
            # A character is 1 to 4 bytes: only a prompt that might be over the limit is encoded.
            if (
                len(prompt) * 4 > max_bytes
                and (size := len(prompt.encode("utf-8", "surrogatepass"))) > max_bytes
            ):
                raise PromptTooLong(
                    f"prompt {i} is {size} bytes of UTF-8, over this server's limit of {max_bytes} "
                    "bytes per prompt; shorten it"
                )
        return prompts

    def _checked_model(self, model: str) -> str | None:
        """One rule for REST and gRPC: absent or empty means the served model; otherwise the
        model folder's name (what /v1/info and Info report) or the checkpoint it came from."""
        if not model:
            return None
        if model in self._served_models:
            return model
        if len(model) > MAX_MODEL_NAME_CHARS:
            raise InvalidRequest(
                f"model must be at most {MAX_MODEL_NAME_CHARS} characters, got {len(model)}; "
                f"this server serves {self.model_name!r} (or leave model out)"
            )
        raise InvalidRequest(
            f"model {shorten(model)} is not served here; this server serves {self.model_name!r} "
            "(or leave model out)"
        )

    def _cancel_on_disconnect(
        self, owner: str, job_id: str, idempotency_key: str | None
    ) -> AbstractAsyncContextManager[None]:
        """Cancels the job when the client goes away, unless it sent an Idempotency-Key: it
        means to retry, and the retry attaches to the job (JobService.submit)."""
        if idempotency_key is not None:
            return nullcontext()
        return _CancelOnDisconnect(self.service, owner, job_id)

    # ---- gRPC face ------------------------------------------------------------------------

    async def Submit(self, request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        idempotency_key = _metadata(context, IDEMPOTENCY_METADATA)

        async def submit(api_key: str | None, request: Any) -> Any:
            return await self.submit(api_key, request, idempotency_key)

        return await self._unary("Submit", submit, request, context)

    async def GetResult(self, request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        return await self._unary("GetResult", self.get_result, request, context)

    async def Cancel(self, request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        return await self._unary("Cancel", self.cancel, request, context)

    async def Generate(self, request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        idempotency_key = _metadata(context, IDEMPOTENCY_METADATA)

        async def generate(api_key: str | None, request: Any) -> Any:
            return await self.generate(api_key, request, idempotency_key)

        return await self._unary("Generate", generate, request, context)

    async def Info(self, request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        return await self._unary("Info", self.server_info, request, context, keyed=False)

    # grpc.aio takes a streaming handler only if it is an async generator function itself.
    async def GenerateStream(
        self, request: Any, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[Any]:
        idempotency_key = _metadata(context, IDEMPOTENCY_METADATA)

        def generate_stream(api_key: str | None, request: Any) -> AsyncIterator[Any]:
            return self.generate_stream(api_key, request, idempotency_key)

        async for message in self._streaming("GenerateStream", generate_stream, request, context):
            yield message

    async def StreamResult(
        self, request: Any, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[Any]:
        async for message in self._streaming("StreamResult", self.stream_result, request, context):
            yield message

    async def _streaming(
        self,
        method: str,
        fn: Callable[[str | None, Any], AsyncIterator[Any]],
        request: Any,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> AsyncIterator[Any]:
        try:
            # The request and the key are read inside: what is wrong with them is a status too.
            async for message in fn(_api_key(context), _decoded(request)):
                yield message
        except Exception as exc:
            await self._abort(method, exc, context)
        else:
            self._observe(method, grpc.StatusCode.OK)

    async def _unary(
        self,
        method: str,
        fn: Callable[[str | None, Any], Awaitable[Any]],
        request: Any,
        context: grpc.aio.ServicerContext[Any, Any],
        *,
        keyed: bool = True,
    ) -> Any:
        try:
            # Info needs no key: one that a client sends anyway is not looked at.
            reply = await fn(_api_key(context) if keyed else None, _decoded(request))
        except Exception as exc:
            await self._abort(method, exc, context)
            raise  # unreachable: abort raises
        self._observe(method, grpc.StatusCode.OK)
        return reply

    async def _abort(self, method: str, exc: Exception, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        reply = reply_for_exception(exc)
        self._observe(method, reply.status.grpc)
        context.set_trailing_metadata(reply.grpc_trailers())
        await context.abort(reply.status.grpc, reply.message)

    def _observe(self, method: str, code: grpc.StatusCode) -> None:
        if self.metrics is not None:
            self.metrics.requests.labels(route=f"/{SERVICE_NAME}/{method}", code=code.name).inc()


class _CancelOnDisconnect:
    """A job that only its call knows about (Generate, GenerateStream) is cancelled when the
    client goes away (deadline, disconnect) instead of running for nobody."""

    def __init__(self, service: ServiceLike, owner: str, job_id: str) -> None:
        self._service, self._owner, self._job_id = service, owner, job_id

    async def __aenter__(self) -> None:
        return None

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: Any
    ) -> None:
        if exc_type is not None and issubclass(exc_type, asyncio.CancelledError | GeneratorExit):
            with suppress(Exception):
                await asyncio.shield(self._service.cancel(self._owner, self._job_id))


def _api_key(context: grpc.aio.ServicerContext[Any, Any]) -> str | None:
    key = _metadata(context, API_KEY_METADATA)
    return None if key is None else checked_api_key(key)


def _metadata(context: grpc.aio.ServicerContext[Any, Any], name: str) -> str | None:
    for key, value in context.invocation_metadata() or ():
        if key == name:
            return value if isinstance(value, str) else value.decode("latin-1")
    return None


def checked_api_key(key: str) -> str:
    """What any transport accepts as a key before looking it up: visible ASCII, bounded."""
    if len(key) > MAX_API_KEY_CHARS or not (key.isascii() and key.isprintable()) or " " in key:
        raise Unauthenticated(
            f"malformed API key ({len(key)} characters): keys are at most {MAX_API_KEY_CHARS} "
            "visible ASCII characters (no spaces), as `engine keys create` prints them"
        )
    return key


_JOB_ID_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_")


def _job_id(raw: str) -> str:
    if not raw:
        raise InvalidRequest("id is required: the job id that Submit returned")
    if len(raw) > MAX_JOB_ID_CHARS or not _JOB_ID_CHARS.issuperset(raw):
        raise InvalidRequest(
            f"{shorten(raw, 40)} is not a job id: ids are at most {MAX_JOB_ID_CHARS} letters, digits, "
            "- or _, as Submit returned them"
        )
    logs.bind(job_id=raw)
    return raw


@dataclass(frozen=True)
class _Undecodable:
    """A request message that protobuf could not parse (corrupt, or nested past its depth
    limit); the handler answers INVALID_ARGUMENT instead of grpc's UNKNOWN with the exception."""

    reason: str


def _decoded(request: Any) -> Any:
    if isinstance(request, _Undecodable):
        raise InvalidRequest(f"the request message cannot be decoded: {request.reason}")
    return request


def _lenient(deserializer: Callable[[bytes], Any]) -> Callable[[bytes], Any]:
    def parse(data: bytes) -> Any:
        try:
            return deserializer(data)
        except DecodeError as exc:
            return _Undecodable(str(exc))

    return parse


class _HandlerCapture:
    """Takes the method handlers that the generated code registers, so that they can be
    registered again with lenient deserializers (the generated code names every method)."""

    def __init__(self) -> None:
        self.handlers: dict[str, Any] = {}

    def add_generic_rpc_handlers(self, handlers: Any) -> None:
        return None

    def add_registered_method_handlers(self, service: str, handlers: dict[str, Any]) -> None:
        self.handlers = dict(handlers)


def add_servicer(servicer: EngineServicer, server: grpc.aio.Server) -> None:
    capture = _HandlerCapture()
    engine_pb2_grpc.add_EngineServicer_to_server(servicer, capture)
    handlers = {
        name: h._replace(request_deserializer=_lenient(h.request_deserializer))
        for name, h in capture.handlers.items()
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),))
    server.add_registered_method_handlers(SERVICE_NAME, handlers)  # type: ignore[attr-defined]


class GrpcServer:
    """The grpc.aio server: the Engine service, grpc.health.v1 (SERVING while the job service is
    ready, on "" and on engine.v1.Engine) and server reflection."""

    def __init__(self, servicer: EngineServicer, address: str) -> None:
        self.servicer = servicer
        # The largest valid request and no more: a larger message is refused (RESOURCE_EXHAUSTED)
        # before the servicer sees it.
        self.server = grpc.aio.server(
            options=[
                ("grpc.max_receive_message_length", servicer.limits.grpc_message_bytes),
                ("grpc.so_reuseport", 0),
            ]
        )
        add_servicer(servicer, self.server)
        self.health = AioHealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        names = (
            SERVICE_NAME,
            health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
            reflection.SERVICE_NAME,
        )
        reflection.enable_server_reflection(names, self.server)
        try:
            self.port = self.server.add_insecure_port(address)
        except RuntimeError as exc:
            raise NotReady(
                f"cannot listen for gRPC on {address} ({exc}); choose another with --grpc-port"
            ) from exc
        if self.port == 0:
            raise NotReady(f"cannot listen for gRPC on {address} (in use?); choose another with --grpc-port")
        self._sync: asyncio.Task[None] | None = None

    async def start(self) -> None:
        await self._set_health()
        await self.server.start()
        self._sync = asyncio.get_running_loop().create_task(self._sync_health())

    async def _set_health(self) -> None:
        ready = self.servicer.service.ready
        status = (
            health_pb2.HealthCheckResponse.SERVING if ready else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        for name in ("", SERVICE_NAME):
            await self.health.set(name, status)

    async def _sync_health(self) -> None:
        while True:
            await asyncio.sleep(0.25)
            await self._set_health()

    async def stop(self, grace_s: float) -> None:
        if self._sync is not None:
            self._sync.cancel()
            with suppress(asyncio.CancelledError):
                await self._sync
        await self.health.enter_graceful_shutdown()
        await self.server.stop(grace_s)
