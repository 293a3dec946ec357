"""How the REST shim reaches the gRPC service: in process (the default) or over a channel.

Both clients speak the service's protobuf messages and raise ``ApiFailure`` with the same
``ErrorReply``, so the shim cannot tell them apart; that is what makes the remote mode
(``engine serve --grpc-target HOST:PORT``) a deployment choice instead of a second code path.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, Protocol, TypeVar

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from engine.api.auth import MISSING_KEY_MESSAGE
from engine.api.errors import ApiFailure, reply_for_exception, reply_for_rpc_error
from engine.api.grpc_service import API_KEY_METADATA, IDEMPOTENCY_METADATA, SERVICE_NAME, EngineServicer
from engine.api.pb import engine_pb2, engine_pb2_grpc
from engine.errors import Unauthenticated
from engine.limits import MAX_WAIT_S

T = TypeVar("T")


class EngineClient(Protocol):
    async def authenticate(self, api_key: str | None) -> None:
        """Raises (401) for a key that cannot be right, before the shim reads a request's body."""
        ...

    async def submit(self, api_key: str | None, request: Any, idempotency_key: str | None = None) -> Any: ...

    async def get_result(self, api_key: str | None, request: Any) -> Any: ...

    async def cancel(self, api_key: str | None, request: Any) -> Any: ...

    async def generate(self, api_key: str | None, request: Any, idempotency_key: str | None = None) -> Any:
        """Submit and wait for the terminal job; cancelling the call cancels the job, unless it
        has an ``idempotency_key`` (then a retry with the same key attaches to the job)."""
        ...

    def generate_stream(
        self, api_key: str | None, request: Any, idempotency_key: str | None = None
    ) -> AsyncIterator[Any]:
        """Submit and stream (GenerateStreamResponse messages); closing the stream early cancels
        the job, unless it has an ``idempotency_key`` (as ``generate``)."""
        ...

    def stream_result(self, api_key: str | None, request: Any) -> AsyncIterator[Any]:
        """Stream a job submitted earlier; closing the stream leaves the job running."""
        ...

    async def info(self) -> Any: ...

    async def ready(self) -> bool: ...

    async def close(self) -> None: ...


class InProcessClient:
    """Calls the servicer's transport-independent face directly (no socket, no serialization)."""

    def __init__(self, servicer: EngineServicer) -> None:
        self._servicer = servicer

    async def _call(self, fn: Callable[[str | None, Any], Awaitable[T]], key: str | None, request: Any) -> T:
        try:
            return await fn(key, request)
        except Exception as exc:
            raise ApiFailure(reply_for_exception(exc)) from exc

    async def authenticate(self, api_key: str | None) -> None:
        try:
            self._servicer.auth.authenticate(api_key)
        except Exception as exc:
            raise ApiFailure(reply_for_exception(exc)) from exc

    async def submit(self, api_key: str | None, request: Any, idempotency_key: str | None = None) -> Any:
        try:
            return await self._servicer.submit(api_key, request, idempotency_key)
        except Exception as exc:
            raise ApiFailure(reply_for_exception(exc)) from exc

    async def get_result(self, api_key: str | None, request: Any) -> Any:
        return await self._call(self._servicer.get_result, api_key, request)

    async def cancel(self, api_key: str | None, request: Any) -> Any:
        return await self._call(self._servicer.cancel, api_key, request)

    async def generate(self, api_key: str | None, request: Any, idempotency_key: str | None = None) -> Any:
        try:
            return await self._servicer.generate(api_key, request, idempotency_key)
        except Exception as exc:
            raise ApiFailure(reply_for_exception(exc)) from exc

    async def generate_stream(
        self, api_key: str | None, request: Any, idempotency_key: str | None = None
    ) -> AsyncIterator[Any]:
        async for message in self._stream(self._servicer.generate_stream(api_key, request, idempotency_key)):
            yield message

    async def stream_result(self, api_key: str | None, request: Any) -> AsyncIterator[Any]:
        async for message in self._stream(self._servicer.stream_result(api_key, request)):
            yield message

    async def _stream(self, messages: AsyncIterator[Any]) -> AsyncIterator[Any]:
        try:
            async for message in messages:
                yield message
        except Exception as exc:
            raise ApiFailure(reply_for_exception(exc)) from exc
        finally:
            await messages.aclose()  # type: ignore[attr-defined]

    async def info(self) -> Any:
        return await self._call(self._servicer.server_info, None, engine_pb2.InfoRequest())

    async def ready(self) -> bool:
        return bool(self._servicer.service.ready)

    async def close(self) -> None:
        return None


class RemoteClient:
    """A grpc.aio channel to ``target`` (HOST:PORT). Create it inside the running event loop."""

    def __init__(self, target: str, *, timeout_s: float = 60.0) -> None:
        self.target = target
        self._timeout_s = timeout_s
        self._channel = grpc.aio.insecure_channel(target)
        self._stub = engine_pb2_grpc.EngineStub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)

    async def _call(
        self, method: Any, api_key: str | None, request: Any, timeout_s: float | None, *extra: tuple[str, str]
    ) -> Any:
        metadata = (((API_KEY_METADATA, api_key),) if api_key else ()) + extra
        try:
            return await method(request, metadata=metadata, timeout=timeout_s)
        except grpc.aio.AioRpcError as exc:
            pairs: Any = exc.trailing_metadata() or ()
            trailers = {str(k): v for k, v in pairs if isinstance(v, str)}
            raise ApiFailure(reply_for_rpc_error(exc.code(), exc.details(), trailers)) from exc

    async def authenticate(self, api_key: str | None) -> None:
        """Only that a key is there (the remote server is the one that knows the keys): a request
        without one is refused before its body is read; a wrong one, by the server."""
        if not api_key:
            raise ApiFailure(reply_for_exception(Unauthenticated(MISSING_KEY_MESSAGE)))

    async def submit(self, api_key: str | None, request: Any, idempotency_key: str | None = None) -> Any:
        return await self._call(
            self._stub.Submit, api_key, request, self._timeout_s, *_idempotency(idempotency_key)
        )

    async def get_result(self, api_key: str | None, request: Any) -> Any:
        # A long poll holds the call open for up to wait_s; the server checks wait_s's range (a
        # NaN or an infinity must not become the deadline on the way there).
        wait_s = request.wait_s if 0 < request.wait_s <= MAX_WAIT_S else 0.0
        return await self._call(self._stub.GetResult, api_key, request, self._timeout_s + wait_s)

    async def cancel(self, api_key: str | None, request: Any) -> Any:
        return await self._call(self._stub.Cancel, api_key, request, self._timeout_s)

    async def generate(self, api_key: str | None, request: Any, idempotency_key: str | None = None) -> Any:
        # It waits for the whole job: no deadline beyond the server's own job timeout.
        return await self._call(self._stub.Generate, api_key, request, None, *_idempotency(idempotency_key))

    async def generate_stream(
        self, api_key: str | None, request: Any, idempotency_key: str | None = None
    ) -> AsyncIterator[Any]:
        async for message in self._stream(
            self._stub.GenerateStream, api_key, request, *_idempotency(idempotency_key)
        ):
            yield message

    async def stream_result(self, api_key: str | None, request: Any) -> AsyncIterator[Any]:
        async for message in self._stream(self._stub.StreamResult, api_key, request):
            yield message

    async def _stream(
        self, method: Any, api_key: str | None, request: Any, *extra: tuple[str, str]
    ) -> AsyncIterator[Any]:
        metadata = (((API_KEY_METADATA, api_key),) if api_key else ()) + extra
        call = method(request, metadata=metadata)
        try:
            async for message in call:
                yield message
        except grpc.aio.AioRpcError as exc:
            pairs: Any = exc.trailing_metadata() or ()
            trailers = {str(k): v for k, v in pairs if isinstance(v, str)}
            raise ApiFailure(reply_for_rpc_error(exc.code(), exc.details(), trailers)) from exc
        finally:
            call.cancel()  # a no-op once the call has ended; else the server sees it go away

    async def info(self) -> Any:
        return await self._call(self._stub.Info, None, engine_pb2.InfoRequest(), self._timeout_s)

    async def ready(self) -> bool:
        try:
            reply = await self._health.Check(health_pb2.HealthCheckRequest(service=SERVICE_NAME), timeout=2.0)
        except grpc.aio.AioRpcError:
            return False
        return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)

    async def close(self) -> None:
        await self._channel.close(None)


def _idempotency(key: str | None) -> tuple[tuple[str, str], ...]:
    """The metadata that carries a client's Idempotency-Key to the server (none without one)."""
    return () if key is None else ((IDEMPOTENCY_METADATA, key),)
