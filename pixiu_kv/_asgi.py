"""Small raw-ASGI helpers for the hot path: bounded body reading and direct responses."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import attrs

from .chain import ASGIReceive, ASGISend
from .errors import GatewayError

__all__ = ["BodyTooLarge", "ResponseTracker", "read_body", "receive_body", "send_error", "send_json",
           "serve_lifespan"]


@attrs.define(slots=True, eq=False)
class ResponseTracker:
    """Wraps ``send`` to know what the client has been told: started, finished, bytes, status.

    ``finished`` tells a disconnect that merely follows a completed response (the server
    sends ``http.disconnect`` then too) from a real one.
    """

    _send: ASGISend
    started: bool = False
    finished: bool = False
    status: int = 0
    bytes_out: int = 0

    async def send(self, message: Any) -> None:
        kind = message["type"]
        if kind == "http.response.start":
            self.started = True
            self.status = message["status"]
        elif kind == "http.response.body":
            self.bytes_out += len(message.get("body", b""))
            if not message.get("more_body", False):
                self.finished = True
        await self._send(message)


async def send_json(send: ASGISend, status: int, payload: Any,
                    headers: tuple[tuple[bytes, bytes], ...] = ()) -> None:
    await send_bytes(send, status, json.dumps(payload, separators=(",", ":")).encode(),
                     b"application/json", headers)


async def send_bytes(send: ASGISend, status: int, body: bytes, content_type: bytes,
                     headers: tuple[tuple[bytes, bytes], ...] = ()) -> None:
    await send({
        "type": "http.response.start",
        "status": status,
        "headers": [(b"content-type", content_type), (b"content-length", str(len(body)).encode()),
                    *headers],
    })
    await send({"type": "http.response.body", "body": body, "more_body": False})


async def send_error(send: ASGISend, error: GatewayError, request_id: str | None = None) -> None:
    headers = error.headers
    if request_id is not None:
        headers = (*headers, (b"x-request-id", request_id.encode("latin-1")))
    await send_bytes(send, error.status, error.body(), b"application/json", headers)


class BodyTooLarge(Exception):
    """A request body (declared or received) went past its limit."""

    def __init__(self, limit: int) -> None:
        super().__init__(f"request body is larger than the limit of {limit} bytes")
        self.limit = limit


async def serve_lifespan(receive: ASGIReceive, send: ASGISend,
                         on_shutdown: Callable[[], object] | None = None) -> None:
    """The ASGI lifespan of an app with no startup work: acknowledge startup, then
    shutdown (after ``on_shutdown``, when given)."""
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            if on_shutdown is not None:
                on_shutdown()
            await send({"type": "lifespan.shutdown.complete"})
            return


async def receive_body(receive: ASGIReceive, limit: int, content_length: int | None = None) -> bytes | None:
    """The whole request body of at most ``limit`` bytes; None when the client disconnected
    before sending it all.

    Raises :class:`BodyTooLarge` as early as possible: before reading anything when the
    declared ``content_length`` is over the limit, else as soon as the bytes received are.
    """
    if content_length is not None and content_length > limit:
        raise BodyTooLarge(limit)
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return None
        chunk = message.get("body", b"")
        if chunk:
            size += len(chunk)
            if size > limit:
                raise BodyTooLarge(limit)
            chunks.append(chunk)
        if not message.get("more_body", False):
            break
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)


async def read_body(receive: ASGIReceive, limit: int, content_length: int | None) -> bytes | None:
    """:func:`receive_body` for the proxied path: a body too large is a 413 in OpenAI shape."""
    try:
        return await receive_body(receive, limit, content_length)
    except BodyTooLarge:
        raise _too_large(limit) from None


def _too_large(limit: int) -> GatewayError:
    return GatewayError(413, f"request body is larger than the limit of {limit} bytes "
                        "(listener.max_request_body)", "invalid_request_error",
                        code="request_too_large")
