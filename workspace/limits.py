"""Request-body limits as pure ASGI middleware: enforced before routing, authentication or
any body parsing, so an anonymous client can never make the server hold a large body.

- A ``Content-Length`` above the path's limit is answered ``413`` at once; the body is never
  read (the connection is closed after the answer).
- A body without a length (chunked) is counted as the application reads it; the read that
  crosses the limit ends the request with ``413`` (or, when the answer has already begun, the
  connection is dropped). Memory use is bounded by the limit and the server's read buffers.

Paths with a larger allowance (STOW-RS, which streams to disk) are listed by exact path.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, Mapping, MutableMapping
from typing import Any

from starlette.exceptions import HTTPException

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


class BodyTooLarge(HTTPException):
    """The request body crossed its limit while being read. An HTTP 413 exception, so that the
    framework answers it even where it wraps body-reading errors (FastAPI turns other
    exceptions raised while parsing a body into 400)."""

    def __init__(self, limit: int) -> None:
        super().__init__(413, f"request body above {limit} bytes")


async def _refuse(send: Send, limit: int) -> None:
    body = json.dumps({"detail": f"request body above {limit} bytes"}).encode()
    await send(
        {
            "type": "http.response.start",
            "status": 413,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                (b"connection", b"close"),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


class BodyLimit:
    """Refuse request bodies above `default_bytes` (or `per_path[path]`) with 413."""

    def __init__(
        self, app: ASGIApp, *, default_bytes: int, per_path: Mapping[str, int] | None = None
    ) -> None:
        self.app = app
        self.default_bytes = default_bytes
        self.per_path = dict(per_path or {})

    def limit_for(self, path: str) -> int:
        return self.per_path.get(path.rstrip("/") or "/", self.default_bytes)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.limit_for(str(scope.get("path", "")))
        declared = None
        for name, value in scope.get("headers", ()):
            if name == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    declared = -1
        if declared is not None and (declared < 0 or declared > limit):
            await _refuse(send, limit)
            return
        received = 0
        started = False

        async def counting_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise BodyTooLarge(limit)
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, counting_receive, tracking_send)
        except BodyTooLarge:
            if not started:
                await _refuse(send, limit)
