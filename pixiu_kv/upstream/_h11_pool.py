"""A lean HTTP/1.1 keep-alive client for one engine, on h11 and trio sockets.

The request path spends its CPU in the two HTTP hops; against a trivial engine this client
costs about 0.6 ms of CPU per request where httpcore's pool costs about 1.2-1.5 ms (measured
with ``benchmarks.overhead``'s engine), because it sends a request in one write and carries
no tracing, locking or generator layers. It does only what a proxy needs:

* a connection is owned by exactly one response at a time; on any ending other than a
  complete response (cancellation, error, early close) its socket is closed synchronously,
  so no cleanup awaits and nothing can leak;
* a complete response returns its connection to a LIFO idle list (bounded), unless either
  side asked to close; idle connections expire after ``keepalive_expiry`` and are checked
  for a close by the engine before reuse;
* the caller bounds concurrency (the endpoint's in-flight cap), so there is no waiting for
  a connection: one is opened when none is idle.
"""

from __future__ import annotations

import select
import ssl
from collections.abc import Sequence
from typing import cast

import attrs
import h11
import trio

__all__ = ["EngineConnectionPool", "UpstreamConnectError", "UpstreamError", "UpstreamResponse"]

_READ_SIZE = 65536


class UpstreamError(Exception):
    """The engine could not be reached or the connection broke."""


class UpstreamConnectError(UpstreamError):
    """No connection could be opened (refused, unreachable, connect timeout)."""


@attrs.define(slots=True, eq=False)
class _Connection:
    stream: trio.SocketStream | trio.SSLStream[trio.SocketStream]
    socket: trio.socket.SocketType
    protocol: h11.Connection
    idle_since: float = 0.0

    def close_now(self) -> None:
        """Close the socket without awaiting: safe in any cleanup, even when cancelled.

        (For TLS this skips close_notify, which is what aborting a connection means.)
        """
        self.socket.close()

    def closed_by_peer(self) -> bool:
        """An idle connection with something to read was closed (or broken) by the engine.

        Not decidable this way under TLS (a server may send session tickets at any time):
        there a dropped connection is caught by the one transparent retry instead.
        """
        if isinstance(self.stream, trio.SSLStream):
            return False
        poller = select.poll()
        poller.register(self.socket.fileno(), select.POLLIN)
        return bool(poller.poll(0))


class UpstreamResponse:
    """Status and headers of an engine's response; the body is read with :meth:`next_chunk`.

    :meth:`close` must be called when done (it is idempotent and never awaits).
    """

    __slots__ = ("_connection", "_pool", "headers", "status")

    def __init__(self, pool: EngineConnectionPool, connection: _Connection, status: int,
                 headers: list[tuple[bytes, bytes]]) -> None:
        self._pool = pool
        self._connection: _Connection | None = connection
        self.status = status
        self.headers = headers

    async def next_chunk(self) -> bytes | None:
        """The body received so far and not yet returned, as soon as there is any; None once
        the body is complete.

        Pieces that arrived together are returned together (one send to the client instead
        of one per piece), but nothing is ever held back waiting for more.
        """
        connection = self._connection
        if connection is None:
            return None
        protocol = connection.protocol
        parts: list[bytes] = []
        try:
            while True:
                event = protocol.next_event()
                if event is h11.NEED_DATA:
                    if parts:
                        return b"".join(parts)
                    protocol.receive_data(cast(bytes, await connection.stream.receive_some(_READ_SIZE)))
                elif type(event) is h11.Data:
                    parts.append(event.data)
                elif type(event) is h11.EndOfMessage:
                    self._connection = None
                    self._pool.release(connection)
                    return b"".join(parts) if parts else None
                else:
                    raise UpstreamError(f"unexpected HTTP event from the engine: {type(event).__name__}")
        except (h11.ProtocolError, trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            if parts:
                return b"".join(parts)  # deliver what arrived; the next call reports the break
            raise UpstreamError(f"connection to the engine broke: {exc}") from None

    def close(self) -> None:
        """Release the connection: an unfinished response means the socket is closed."""
        connection = self._connection
        if connection is not None:
            self._connection = None
            connection.close_now()


class EngineConnectionPool:
    """Keep-alive connections to one engine (``host:port``)."""

    __slots__ = ("_closed", "_host", "_host_header", "_idle", "_port", "_tls", "connect_timeout",
                 "keepalive_expiry", "max_idle", "write_timeout")

    def __init__(self, host: str, port: int, *, host_header: bytes, connect_timeout: float,
                 write_timeout: float, keepalive_expiry: float, max_idle: int,
                 tls: ssl.SSLContext | None = None) -> None:
        self._host = host
        self._port = port
        self._tls = tls
        self._host_header = host_header
        self.connect_timeout = connect_timeout
        self.write_timeout = write_timeout
        self.keepalive_expiry = keepalive_expiry
        self.max_idle = max_idle
        self._idle: list[_Connection] = []
        self._closed = False

    @property
    def idle_connections(self) -> int:
        return len(self._idle)

    async def send(self, method: bytes, target: bytes, headers: Sequence[tuple[bytes, bytes]],
                   body: bytes) -> UpstreamResponse:
        """Send a request and wait for the response head.

        Raises :class:`UpstreamConnectError` when no connection could be opened and
        :class:`UpstreamError` when the connection broke before the response head. A kept-alive
        connection the engine closed in the meantime is replaced once, transparently.
        """
        head = [(b"host", self._host_header), *headers]
        if body or method not in (b"GET", b"HEAD"):
            head.append((b"content-length", str(len(body)).encode()))
        connection = self._take_idle()
        if connection is not None:
            try:
                return await self._exchange(connection, method, target, head, body)
            except UpstreamError:
                pass  # the engine dropped the idle connection; nothing was answered: once more
        return await self._exchange(await self._connect(), method, target, head, body)

    async def _exchange(self, connection: _Connection, method: bytes, target: bytes,
                        headers: list[tuple[bytes, bytes]], body: bytes) -> UpstreamResponse:
        protocol = connection.protocol
        try:
            data = protocol.send(h11.Request(method=method, target=target, headers=headers))
            if body:
                data += protocol.send(h11.Data(data=body))
            data += protocol.send(h11.EndOfMessage())
            with trio.fail_after(self.write_timeout):
                await connection.stream.send_all(data)
            while True:
                event = protocol.next_event()
                if event is h11.NEED_DATA:
                    protocol.receive_data(cast(bytes, await connection.stream.receive_some(_READ_SIZE)))
                elif type(event) is h11.Response:
                    return UpstreamResponse(self, connection, event.status_code, list(event.headers))
                elif type(event) is not h11.InformationalResponse:
                    raise UpstreamError(f"unexpected HTTP event from the engine: {type(event).__name__}")
        except (h11.ProtocolError, trio.BrokenResourceError, trio.ClosedResourceError, OSError,
                trio.TooSlowError) as exc:
            connection.close_now()
            raise UpstreamError(f"connection to the engine broke: {exc or type(exc).__name__}") from None
        except BaseException:
            connection.close_now()
            raise

    async def _connect(self) -> _Connection:
        protocol = h11.Connection(h11.CLIENT, max_incomplete_event_size=64 * 1024)
        try:
            with trio.fail_after(self.connect_timeout):
                tcp = await trio.open_tcp_stream(self._host, self._port)
                if self._tls is None:
                    return _Connection(tcp, tcp.socket, protocol)
                stream = trio.SSLStream(tcp, self._tls, server_hostname=self._host,
                                        https_compatible=True)
                try:
                    await stream.do_handshake()
                except BaseException:
                    tcp.socket.close()
                    raise
                return _Connection(stream, tcp.socket, protocol)
        except (OSError, trio.TooSlowError, trio.BrokenResourceError) as exc:
            raise UpstreamConnectError(f"cannot connect to {self._host}:{self._port}: "
                                       f"{exc or type(exc).__name__}") from None

    def _take_idle(self) -> _Connection | None:
        deadline = trio.current_time() - self.keepalive_expiry
        while self._idle:
            connection = self._idle.pop()
            if connection.idle_since >= deadline and not connection.closed_by_peer():
                return connection
            connection.close_now()
        return None

    def release(self, connection: _Connection) -> None:
        """A response completed: keep its connection for the next request if both sides can."""
        protocol = connection.protocol
        if (self._closed or len(self._idle) >= self.max_idle
                or protocol.our_state is not h11.DONE or protocol.their_state is not h11.DONE):
            connection.close_now()
            return
        protocol.start_next_cycle()
        connection.idle_since = trio.current_time()
        self._idle.append(connection)

    def close(self) -> None:
        """Close the idle connections; responses in progress close their own."""
        self._closed = True
        while self._idle:
            self._idle.pop().close_now()
