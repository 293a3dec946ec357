"""Server-sent events and client disconnects over ASGI, for the streaming routes (the seed's
``/v1/response/{id}/stream`` and the OpenAI routes' ``stream: true``).

Both helpers watch the connection while they wait: a client that goes away ends the wait at
once, not at the next token (a queued job may wait a long time for its first one). For a job that
only its request knows about, ending the wait is what cancels the job.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Mapping
from contextlib import suppress
from typing import Any, TypeVar

from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

T = TypeVar("T")

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def sse_frame(
    data: Mapping[str, Any] | str, *, event: str | None = None, event_id: int | None = None
) -> bytes:
    """One event: optional ``event:`` and ``id:`` lines, then ``data:`` (JSON unless a string)."""
    text = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False, separators=(",", ":"))
    lines = []
    if event is not None:
        lines.append(f"event: {event}")
    if event_id is not None:
        lines.append(f"id: {event_id}")
    lines.append(f"data: {text}")
    return ("\n".join(lines) + "\n\n").encode()


async def aclose(messages: AsyncIterator[Any]) -> None:
    """Close an async generator now, not whenever the garbage collector gets to it: closing a
    stream's source is what cancels its job (GenerateStream) or ends its subscription."""
    close = getattr(messages, "aclose", None)
    if close is not None:
        await close()


async def _until_disconnect(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


class EventStream(Response):
    """``text/event-stream`` of the frames an async iterator yields. The iterator is closed when it
    ends, when sending fails, or as soon as the client disconnects (cancelling its wait)."""

    media_type = "text/event-stream"

    def __init__(self, frames: AsyncIterator[bytes], headers: Mapping[str, str] | None = None) -> None:
        self.frames = frames
        self.status_code = 200
        self.background = None
        self.init_headers({**SSE_HEADERS, **(headers or {})})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def pump() -> None:
            await send(
                {"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers}
            )
            async for frame in self.frames:
                await send({"type": "http.response.body", "body": frame, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})

        pumping = asyncio.ensure_future(pump())
        watching = asyncio.ensure_future(_until_disconnect(receive))
        try:
            await asyncio.wait({pumping, watching}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (pumping, watching):
                task.cancel()
            await asyncio.gather(pumping, watching, return_exceptions=True)
            with suppress(Exception):
                await self.frames.aclose()  # type: ignore[attr-defined]
        if pumping.done() and not pumping.cancelled():
            exc = pumping.exception()
            if exc is not None and not isinstance(exc, OSError | ClientDisconnect):
                raise exc


async def unless_disconnected(request: Request, work: Awaitable[T]) -> T:
    """``await work``, cancelling it if the client disconnects first (then ClientDisconnect)."""
    task = asyncio.ensure_future(work)
    watching = asyncio.ensure_future(_until_disconnect(request.receive))
    try:
        await asyncio.wait({task, watching}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watching.cancel()
        if not task.done():
            task.cancel()
        await asyncio.gather(task, watching, return_exceptions=True)
    if task.cancelled():
        raise ClientDisconnect()
    return task.result()
