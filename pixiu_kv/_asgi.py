"""Small raw-ASGI helpers for the hot path: bounded body reading and direct responses."""

from __future__ import annotations

import json
from typing import Any

import attrs

from .chain import ASGIReceive, ASGISend
from .errors import GatewayError

__all__ = ["ResponseTracker", "read_body", "send_error", "send_json"]


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


async def read_body(receive: ASGIReceive, limit: int, content_length: int | None) -> bytes | None:
    """The whole request body, refusing more than ``limit`` bytes (413) as early as possible.

    Returns None when the client disconnected before sending it all.
    """
    if content_length is not None and content_length > limit:
        raise _too_large(limit)
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
                raise _too_large(limit)
            chunks.append(chunk)
        if not message.get("more_body", False):
            break
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)


def _too_large(limit: int) -> GatewayError:
    return GatewayError(413, f"request body is larger than the limit of {limit} bytes "
                        "(listener.max_request_body)", "invalid_request_error",
                        code="request_too_large")
