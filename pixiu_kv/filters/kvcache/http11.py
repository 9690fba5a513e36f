"""A small HTTP/1.1 JSON-POST client for the routing lookup, the one call on the hot path.

httpx costs about 2 ms of CPU per call on this stack (URL parsing, header models, h11
events, two sends); the routing lookup's budget is 50 ms and its CPU goal 0.3 ms per
request. This client does one thing: POST a JSON body to a plain ``http://`` server and
read one reply (Content-Length, chunked, or until close) over keep-alive connections.

It also keeps scheduling to the minimum: the request is written straight to the
non-blocking socket and the task sleeps once, until the reply is readable (trio's stream
layer would add several scheduler round trips per call, each costing more CPU than the
rest of the routing decision).

Ownership is simple, which is what makes it safe under cancellation: a connection is
either idle in the pool or held by exactly one call. Any exception, cancellation included,
closes the held connection instead of returning it, so nothing half-read is ever reused
and no pool slot can leak. At most ``max_connections`` connections exist at once.
"""

from __future__ import annotations

import json
import socket
from typing import Any
from urllib.parse import urlsplit

import trio

from ...upstream.resilience import MalformedReply, UpstreamUnavailable, check_status

__all__ = ["Http11Pool"]

_MAX_HEADER_BYTES = 64 * 1024
_READ_SIZE = 65536


class _StaleConnection(Exception):
    """A reused keep-alive connection was closed by the server before any reply byte."""


class _Conn:
    """One connection: a non-blocking socket and the bytes read but not consumed yet."""

    __slots__ = ("buffer", "idle_since", "sock")

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buffer = bytearray()
        self.idle_since = 0.0

    async def send_all(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            try:
                sent = self.sock.send(view)
            except BlockingIOError:
                await trio.lowlevel.wait_writable(self.sock)
                continue
            view = view[sent:]

    async def fill(self) -> bool:
        """Read what is available (waiting for it if need be); False at end of stream."""
        while True:
            try:
                data = self.sock.recv(_READ_SIZE)
            except BlockingIOError:
                await trio.lowlevel.wait_readable(self.sock)
                continue
            if not data:
                return False
            self.buffer += data
            return True

    def close(self) -> None:
        self.sock.close()


class Http11Pool:
    """Keep-alive connections to one ``http://host:port`` base URL."""

    __slots__ = ("_closed", "_head", "_host", "_idle", "_idle_timeout", "_limiter", "_max_reply", "_port")

    def __init__(self, base_url: str, *, max_connections: int, max_reply_bytes: int,
                 idle_timeout: float = 30.0) -> None:
        parts = urlsplit(base_url)
        if parts.scheme != "http" or not parts.hostname:
            raise ValueError(f"Http11Pool serves plain http:// URLs only, not {base_url!r}")
        self._host = parts.hostname
        self._port = parts.port or 80
        prefix = parts.path.rstrip("/")
        host_header = parts.netloc
        # Everything of the request head except the path and the length, built once.
        self._head = (prefix, f"HTTP/1.1\r\nHost: {host_header}\r\nContent-Type: application/json\r\n"
                              "Accept: application/json\r\nContent-Length: ")
        self._limiter = trio.CapacityLimiter(max_connections)
        self._idle: list[_Conn] = []
        self._idle_timeout = idle_timeout
        self._max_reply = max_reply_bytes
        self._closed = False

    @property
    def idle_connections(self) -> int:
        return len(self._idle)

    @property
    def connections_in_use(self) -> int:
        return int(self._limiter.borrowed_tokens)

    async def post_json(self, path: str, body: bytes) -> Any:
        """POST ``body`` (JSON) to ``path``; the decoded JSON reply, or an upstream error."""
        prefix, head = self._head
        request = f"POST {prefix}{path} {head}{len(body)}\r\n\r\n".encode() + body
        await trio.lowlevel.checkpoint_if_cancelled()
        try:
            self._limiter.acquire_nowait()
        except trio.WouldBlock:
            await self._limiter.acquire()
        try:
            for _ in range(2):
                conn, reused = await self._checkout()
                try:
                    status, reply, keep = await self._exchange(conn, request, reused)
                except _StaleConnection:
                    conn.close()
                    continue  # once, on a fresh connection
                except BaseException:
                    # Cancelled or failed mid-exchange: the connection's state is unknown.
                    conn.close()
                    raise
                if keep and not self._closed:
                    conn.idle_since = trio.current_time()
                    self._idle.append(conn)
                else:
                    conn.close()
                break
            else:
                raise UpstreamUnavailable(f"POST {path}: connection closed by the server")
        finally:
            self._limiter.release()
        check_status(status, path)
        try:
            return json.loads(reply)
        except ValueError:
            raise MalformedReply(f"POST {path}: reply is not JSON") from None

    async def _checkout(self) -> tuple[_Conn, bool]:
        horizon = trio.current_time() - self._idle_timeout
        while self._idle:
            conn = self._idle.pop()
            if conn.idle_since > horizon:
                return conn, True
            conn.close()
        try:
            stream = await trio.open_tcp_stream(self._host, self._port)
        except OSError as exc:
            raise UpstreamUnavailable(f"connect to {self._host}:{self._port} failed: {exc}") from None
        # trio connected it (happy eyeballs, TCP_NODELAY); from here plain non-blocking I/O.
        sock = socket.socket(fileno=stream.socket.detach())
        sock.setblocking(False)
        return _Conn(sock), False

    async def _exchange(self, conn: _Conn, request: bytes, reused: bool) -> tuple[int, bytes, bool]:
        try:
            await conn.send_all(request)
            return await self._read_reply(conn, reused)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            if reused and not conn.buffer:
                raise _StaleConnection from None
            raise UpstreamUnavailable(f"connection failed: {type(exc).__name__}") from None

    async def _read_reply(self, conn: _Conn, reused: bool) -> tuple[int, bytes, bool]:
        buf = conn.buffer
        while (end := buf.find(b"\r\n\r\n")) < 0:
            if len(buf) > _MAX_HEADER_BYTES:
                raise MalformedReply("reply head too large")
            if not await conn.fill():
                if reused and not buf:
                    raise _StaleConnection
                raise UpstreamUnavailable("connection closed before the reply head")
        head = bytes(buf[:end]).decode("latin-1")
        del buf[: end + 4]
        lines = head.split("\r\n")
        status_line = lines[0].split(" ", 2)
        if len(status_line) < 2 or not status_line[0].startswith("HTTP/1.") or not status_line[1].isdigit():
            raise MalformedReply("reply is not HTTP/1.x")
        status = int(status_line[1])
        length: int | None = None
        chunked = False
        keep = status_line[0] == "HTTP/1.1"
        for line in lines[1:]:
            name, _, value = line.partition(":")
            name = name.strip().lower()
            value = value.strip()
            if name == "content-length":
                if not value.isdigit():
                    raise MalformedReply("bad Content-Length")
                length = int(value)
            elif name == "transfer-encoding":
                chunked = "chunked" in value.lower()
            elif name == "connection":
                keep = value.lower() == "keep-alive" or (keep and value.lower() != "close")
        if status < 200 or status in (204, 304):
            return status, b"", keep  # no body by definition (we never ask for 100-continue)
        if chunked:
            return status, await self._read_chunked(conn), keep
        if length is not None:
            if length > self._max_reply:
                raise MalformedReply(f"reply larger than {self._max_reply} bytes")
            while len(buf) < length:
                if not await conn.fill():
                    raise UpstreamUnavailable("connection closed inside the reply body")
            body = bytes(buf[:length])
            del buf[:length]
            return status, body, keep
        # No length: the body runs until the server closes the connection.
        while await conn.fill():
            if len(buf) > self._max_reply:
                raise MalformedReply(f"reply larger than {self._max_reply} bytes")
        body = bytes(buf)
        buf.clear()
        return status, body, False

    async def _read_chunked(self, conn: _Conn) -> bytes:
        buf = conn.buffer
        out = bytearray()
        while True:
            while (eol := buf.find(b"\r\n")) < 0:
                if len(buf) > _MAX_HEADER_BYTES:
                    raise MalformedReply("bad chunk header")
                if not await conn.fill():
                    raise UpstreamUnavailable("connection closed inside a chunked reply")
            size_text = bytes(buf[:eol]).split(b";", 1)[0].strip()
            try:
                size = int(size_text, 16)
            except ValueError:
                raise MalformedReply("bad chunk size") from None
            del buf[: eol + 2]
            if size == 0:
                # Trailers (normally none) end with an empty line.
                while (eol := buf.find(b"\r\n")) != 0:
                    if eol > 0:
                        del buf[: eol + 2]
                        continue
                    if not await conn.fill():
                        raise UpstreamUnavailable("connection closed inside a chunked reply")
                del buf[:2]
                return bytes(out)
            if len(out) + size > self._max_reply:
                raise MalformedReply(f"reply larger than {self._max_reply} bytes")
            while len(buf) < size + 2:
                if not await conn.fill():
                    raise UpstreamUnavailable("connection closed inside a chunked reply")
            out += buf[:size]
            del buf[: size + 2]

    def close(self) -> None:
        """Close idle connections; connections in use close when their call ends."""
        self._closed = True
        while self._idle:
            self._idle.pop().close()
