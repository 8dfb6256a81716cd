"""Refuse oversized request bodies before they are read (an ASGI middleware for the workbench).

The workbench's largest legitimate body is one slice's labels (rows x columns bytes: 256 KiB
for 512 x 512); :data:`MAX_BODY_BYTES` leaves ample room. A request that declares a larger
``Content-Length`` is answered 413 at once, without reading any of its body (the server then
closes the connection). A body streamed without ``Content-Length`` (chunked) is read chunk by
chunk only up to the limit: past it, the answer is 413 and the rest is never read; within
it, the chunks read are handed on to the app unchanged. Requests with a ``Content-Length``
within the limit pass straight through (the HTTP server stops at the declared length).
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

#: The largest request body the workbench accepts (32 MiB).
MAX_BODY_BYTES = 32 << 20


def _header(scope: Scope, name: bytes) -> bytes | None:
    return next((v for k, v in scope.get("headers", []) if k.lower() == name), None)


async def _answer(send: Send, status: int, detail: str) -> None:
    body = json.dumps({"detail": detail}).encode()
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        (b"connection", b"close"),
    ]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})


def _too_large(size: str, limit: int) -> str:
    return (
        f"request body too large: {size}, the limit is {limit} bytes (one slice's labels are "
        "rows x columns bytes); nothing was read or changed"
    )


class BodyLimit:
    """Wrap ``app`` so that no request body over ``max_bytes`` is ever read."""

    def __init__(self, app: ASGIApp, max_bytes: int = MAX_BODY_BYTES) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = _header(scope, b"content-length")
        if declared is not None:
            try:
                length = int(declared)
            except ValueError:
                await _answer(send, 400, f"Content-Length {declared!r} is not a number of bytes")
                return
            if length > self.max_bytes:
                await _answer(send, 413, _too_large(f"{length} bytes declared", self.max_bytes))
                return
            await self.app(scope, receive, send)
            return
        if _header(scope, b"transfer-encoding") is None:  # HTTP/1.1: no body at all
            await self.app(scope, receive, send)
            return
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client went away
                await self.app(scope, _replay([], message, receive), send)
                return
            chunk = bytes(message.get("body", b""))
            size += len(chunk)
            if size > self.max_bytes:
                await _answer(send, 413, _too_large(f"over {self.max_bytes} bytes streamed", self.max_bytes))
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = {"type": "http.request", "body": b"".join(chunks), "more_body": False}
        await self.app(scope, _replay([body], None, receive), send)


def _replay(messages: list[Message], last: Message | None, receive: Receive) -> Receive:
    """A ``receive`` that gives ``messages`` (then ``last``), then whatever ``receive`` gives."""
    queue = [*messages, *([last] if last is not None else [])]

    async def replay() -> Message:
        if queue:
            return queue.pop(0)
        return await receive()

    return replay


__all__ = ["MAX_BODY_BYTES", "BodyLimit"]
