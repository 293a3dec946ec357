"""The optional HTTP access log (``--access-log``): one line per request on the ``engine.access``
logger, after the response: method, path (no query string), status, duration and client address,
with the job id and key name where the request made them known. Never a header, a body or a key.

Outermost ASGI layer, so that it sees every route, the REST shim's direct hot routes included.
"""

from __future__ import annotations

import logging
import time

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from engine import logs

log = logging.getLogger("engine.access")


class AccessLog:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500  # what the client gets if the app fails before it starts a response

        async def send_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            duration_ms = round((time.perf_counter() - start) * 1000, 2)
            client = scope.get("client")
            fields = {
                "method": scope["method"],
                "path": scope["path"],
                "status": status,
                "duration_ms": duration_ms,
                "client": client[0] if client else None,
                **logs.bound(),
            }
            log.info("%s %s %d %.1f ms", scope["method"], scope["path"], status, duration_ms, extra=fields)
