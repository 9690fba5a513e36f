"""A raw TCP HTTP/1.1 server for the client tests: every reply is written byte for byte, so
tests can send what real servers rarely do (stale closes, unsolicited bytes, broken framing).

Counts are taken on the server side: connections opened and still open, requests read,
clients that went away while their request was held.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from typing import Any

import attrs
import trio

HOLD = None  # a reply that never comes: the request is held until the client goes away
CLOSE = b""  # the connection is closed without a reply


@attrs.frozen
class Request:
    body: bytes
    connection: int  # 1-based number of the connection it came on
    index: int  # 0-based number of the request on its connection


Reply = Callable[[Request], bytes | None]


def with_length(payload: Any, status: str = "200 OK", extra: str = "") -> bytes:
    body = json.dumps(payload).encode()
    return f"HTTP/1.1 {status}\r\nContent-Length: {len(body)}\r\n{extra}\r\n".encode() + body


class RawServer:
    """Answers each request with ``reply(request)``, then closes the connection if
    ``close_after_reply`` (or it returns true for the request). ``after_reply`` bytes (if any)
    follow every reply unasked; ``stream`` pieces are sent one by one, each after ``gate``
    opens (``gate`` is renewed after each piece); without ``stream``, ``gate`` holds replies."""

    def __init__(self, reply: Reply, *, close_after_reply: bool | Callable[[Request], bool] = False,
                 gate: trio.Event | None = None, after_reply: bytes = b"",
                 stream: list[bytes] | None = None) -> None:
        self.reply = reply
        self.gate = gate
        self.close_after_reply = close_after_reply
        self.after_reply = after_reply
        self.stream = stream
        self.connections = 0
        self.open_connections = 0
        self.max_open = 0
        self.requests = 0
        self.eof_while_waiting = 0
        self.changed = trio.Event()

    def _bump(self) -> None:
        self.changed.set()
        self.changed = trio.Event()

    async def wait_for(self, predicate: Callable[[], bool]) -> None:
        with trio.fail_after(10):
            while not predicate():
                await self.changed.wait()

    async def handle(self, stream: trio.SocketStream) -> None:
        self.connections += 1
        number = self.connections
        self.open_connections += 1
        self.max_open = max(self.max_open, self.open_connections)
        self._bump()
        try:
            await self._serve(stream, number)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass  # the client went away abruptly (reset, or a TLS connection aborted)
        finally:
            self.open_connections -= 1
            self._bump()
            with trio.CancelScope(shield=True):
                try:
                    await stream.aclose()
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    pass

    async def _serve(self, stream: Any, number: int) -> None:
        buf = b""
        for index in range(1_000):
            while b"\r\n\r\n" not in buf:
                data = await stream.receive_some(65536)
                if not data:
                    return
                buf += data
            head, _, buf = buf.partition(b"\r\n\r\n")
            length = next((int(line.split(b":")[1]) for line in head.split(b"\r\n")
                           if line.lower().startswith(b"content-length")), 0)
            while len(buf) < length:
                buf += await stream.receive_some(65536)
            body, buf = buf[:length], buf[length:]
            self.requests += 1
            self._bump()
            request = Request(body, number, index)
            reply = self.reply(request)
            if reply is HOLD:
                if not await stream.receive_some(1):  # held until the client goes away
                    self.eof_while_waiting += 1
                return
            if self.gate is not None and self.stream is None:
                await self.gate.wait()
            if reply == CLOSE:
                return
            await stream.send_all(reply)
            if self.stream is not None:
                await self._send_pieces(stream, self.stream)
            if self.after_reply:
                await stream.send_all(self.after_reply)
            close = self.close_after_reply
            if close is True or (callable(close) and close(request)):
                return

    async def _send_pieces(self, stream: trio.SocketStream, pieces: list[bytes]) -> None:
        """Send each piece once the gate opens; stop when the client goes away meanwhile."""
        for piece in pieces:
            gate = self.gate
            if gate is not None:
                async with trio.open_nursery() as waiting:
                    async def client_gone() -> None:
                        await stream.receive_some(1)  # nothing is expected: this is the close
                        self.eof_while_waiting += 1
                        waiting.cancel_scope.cancel()

                    waiting.start_soon(client_gone)
                    await gate.wait()
                    waiting.cancel_scope.cancel()
                if not gate.is_set():
                    raise trio.ClosedResourceError
                self.gate = trio.Event()
                self._bump()
            await stream.send_all(piece)


async def serve(nursery: trio.Nursery, server: RawServer,
                handler: Callable[[trio.SocketStream], Awaitable[None]] | None = None) -> str:
    listeners = await nursery.start(trio.serve_tcp, handler or server.handle, 0)
    port = listeners[0].socket.getsockname()[1]
    return f"http://127.0.0.1:{port}"
