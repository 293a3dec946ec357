"""The HTTP body limit, on the bytes as they arrive: ASGI middleware in front of every route.

A request body is only ever read through ``receive``; ``BodyLimit`` hands the app a ``receive``
that counts the bytes and raises ``BodyTooLarge`` (a 413 that every route's error handler answers in
its own format) as soon as the count passes the limit, or at the first read
when ``Content-Length`` already says it will. Chunked bodies and lying clients meet the same
count. Whenever the app answers before the body was read to its end (413, a 401 given before the
body is looked at, a route that takes no body), the reply says ``Connection: close`` and the server
closes the connection after it instead of reading the rest and throwing it away.

Closing a socket that still has unread bytes makes the kernel send a reset, and the reset can
destroy the reply before the client reads it. So the server closes as a careful HTTP server does
(``lingering_http_protocol``): it half-closes (the reply, then end of file), throws away at most
LINGER_MAX_BYTES for at most LINGER_S while the client notices, and closes then, or as soon as the
client closes its side.

The limit itself is engine/limits.py's ``RequestLimits.http_body_bytes``.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from starlette.exceptions import HTTPException

from engine.api.errors import ApiFailure, reply_for_code

# The ASGI callable's types (as starlette.types spells them).
Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


def body_limit_message(limit: int) -> str:
    return (
        f"the request body exceeds this server's limit of {limit} bytes ({limit / 2**20:.1f} MiB); "
        "send fewer or shorter prompts"
    )


class BodyTooLarge(ApiFailure, HTTPException):
    """Both what our routes' handlers answer (ApiFailure: the seed envelope, or OpenAI's error
    body) and an HTTPException 413, which FastAPI's own body parsing lets through unchanged."""

    def __init__(self, limit: int) -> None:
        reply = reply_for_code("payload_too_large", body_limit_message(limit))
        Exception.__init__(self, reply.message)
        self.reply = reply
        self.status_code = 413
        self.detail = reply.message
        self.headers = None


def _declared_length(scope: Scope) -> tuple[int | None, bool]:
    """(Content-Length, whether a body follows at all)."""
    length: int | None = None
    chunked = False
    for name, value in scope.get("headers") or ():
        if name == b"content-length" and value.isdigit():
            length = int(value)
        elif name == b"transfer-encoding":
            chunked = True
    return length, chunked or bool(length)


class BodyLimit:
    def __init__(self, app: ASGIApp, limit_bytes: int) -> None:
        self.app = app
        self.limit = limit_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.limit
        declared, has_body = _declared_length(scope)
        received = 0
        read_to_end = not has_body
        exceeded = declared is not None and declared > limit
        started = False

        async def limited_receive() -> Message:
            nonlocal received, read_to_end, exceeded
            if exceeded:
                raise BodyTooLarge(limit)
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    exceeded = True
                    raise BodyTooLarge(limit)
                if not message.get("more_body", False):
                    read_to_end = True
            elif message["type"] == "http.disconnect":
                read_to_end = True
            return message

        async def closing_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                if not read_to_end:
                    headers = [(k, v) for k, v in message.get("headers", ()) if k.lower() != b"connection"]
                    message = {**message, "headers": [*headers, (b"connection", b"close")]}
            await send(message)

        try:
            await self.app(scope, limited_receive, closing_send)
        except BodyTooLarge as exc:
            if started:
                raise
            # No route answered it (none of ours lets it through): the envelope, from here.
            await _send_json(closing_send, exc.reply.status.http, exc.reply.envelope())


async def _send_json(send: Send, status: int, body: Any) -> None:
    data = json.dumps(body).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())],
        }
    )
    await send({"type": "http.response.body", "body": data})


# ---- closing a connection without losing the reply ----------------------------------------------

LINGER_S = 2.0
LINGER_MAX_BYTES = 1024 * 1024


class _LingeringTransport:
    """The connection's transport as uvicorn sees it, except that ``close()`` half-closes and
    lingers (see the module's docstring) while a request's body is still arriving (``unread()``);
    any other close (an idle keep-alive connection, a reply after the whole body) is immediate."""

    def __init__(self, transport: asyncio.Transport, unread: Callable[[], bool]) -> None:
        self._transport = transport
        self._unread = unread
        self.lingering = False
        self._discarded = 0
        self._timer: asyncio.TimerHandle | None = None

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)

    def is_closing(self) -> bool:
        return self.lingering or self._transport.is_closing()

    def close(self) -> None:
        t = self._transport
        if self.lingering or t.is_closing():
            return
        if not self._unread() or not t.can_write_eof():
            t.close()
            return
        self.lingering = True
        t.write_eof()  # after what is still buffered: the reply, then end of file
        t.resume_reading()  # to see the client's end of file (the discarded bytes are counted)
        self._timer = asyncio.get_running_loop().call_later(LINGER_S, self.close_now)

    def discard(self, size: int) -> None:
        self._discarded += size
        if self._discarded > LINGER_MAX_BYTES:
            self.close_now()

    def close_now(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._transport.close()


def lingering_http_protocol() -> type[asyncio.Protocol]:
    """uvicorn's HTTP protocol (httptools where installed, else h11) with lingering closes."""
    try:
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol as Base
    except ImportError:  # pragma: no cover - uvicorn[standard] brings httptools
        from uvicorn.protocols.http.h11_impl import H11Protocol as Base

    class LingeringProtocol(Base):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            self._lingering = _LingeringTransport(transport, self._body_unread)  # type: ignore[arg-type]
            super().connection_made(self._lingering)

        def _body_unread(self) -> bool:
            cycle = getattr(self, "cycle", None)
            return cycle is not None and bool(cycle.more_body)

        def data_received(self, data: bytes) -> None:
            if self._lingering.lingering:
                self._lingering.discard(len(data))
                return
            super().data_received(data)

        def eof_received(self) -> Any:
            if self._lingering.lingering:
                self._lingering.close_now()
                return None
            return super().eof_received()

    return LingeringProtocol
