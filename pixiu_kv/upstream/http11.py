"""The HTTP/1.1 keep-alive client for every upstream: engines (streamed replies) and the
JSON calls of the kvcache filter (LMCache, ``/tokenize``).

General-purpose clients cost several times more CPU per call than the rest of a request's
work here (httpx about 1.5-2 ms, httpcore's pool 1.2-1.5 ms; numbers in
``docs/architecture.md``). This one does only what the gateway needs:

* one pool per origin (``http://`` or ``https://`` base URL, its path prefixed to every
  target), at most ``max_connections`` connections at once (a :class:`trio.CapacityLimiter`;
  a call waits for a slot under its caller's deadline);
* the request is sent in one write (:mod:`._http11_io`: plain sockets without trio's
  stream layer, TLS through :class:`trio.SSLStream`); replies are parsed by
  :mod:`._http11_wire` (strict, a few microseconds per reply: h11 would nearly double the
  CPU of a routing lookup);
* idle connections are checked before reuse (a plain socket is polled: readable means
  closed by the peer, or bytes nobody asked for) and bytes after a reply end the
  connection;
* ownership is simple, which is what makes it safe under cancellation: a connection is idle
  in the pool or owned by exactly one call or response. Any other ending than a complete
  reply (cancellation, error, early close) closes its socket synchronously, so nothing
  half-read is reused and no slot can leak;
* idle connections are kept LIFO and expire after ``keepalive_expiry``; a reused
  connection that turns out closed before *any*
  reply byte arrived is replaced once by a fresh one (after a reply byte, the request may
  have been acted upon: that is an error, never a silent resend);
* deadlines for connecting and writing; reads are bounded by ``read_timeout`` if given,
  else by the caller (the proxy's first-byte and idle scopes, the kvcache call deadlines);
* :meth:`Http11Pool.send` gives a streamed :class:`UpstreamResponse`;
  :meth:`Http11Pool.post_json` a decoded JSON reply of at most ``max_reply_bytes``.

Failures are :mod:`.resilience` classes: :class:`UpstreamConnectError` (nothing could be
opened) and :class:`~.resilience.UpstreamUnavailable` (the connection broke, a timeout) are
transient; :class:`~.resilience.MalformedReply` (not HTTP, too large, not JSON) is not.
"""

from __future__ import annotations

import functools
import json
import ssl
from collections.abc import Sequence
from typing import Any
from urllib.parse import urlsplit

import attrs
import trio

from .._http11_wire import ReplyParser, header_block, request_bytes, request_with_headers
from ._http11_io import ByteStream, StreamLimits, open_byte_stream
from .resilience import MalformedReply, UpstreamUnavailable, check_status

__all__ = ["Http11Pool", "Origin", "UpstreamConnectError", "UpstreamResponse", "system_tls_context"]

_JSON_HEADERS = ((b"content-type", b"application/json"), (b"accept", b"application/json"))
_NO_BODY_METHODS = (b"GET", b"HEAD")
# Exceptions of a connection that broke (the peer reset or closed it, or a deadline passed).
_BROKEN = (OSError, trio.BrokenResourceError, trio.ClosedResourceError, trio.TooSlowError)


class UpstreamConnectError(UpstreamUnavailable):
    """No connection could be opened (refused, unreachable, connect or handshake timeout)."""


class _Stale(Exception):
    """A reused keep-alive connection was closed by the peer before any reply byte."""


@attrs.frozen(slots=True)
class Origin:
    """Where a base URL points: ``scheme://host:port`` and the path prefixed to targets."""

    host: str
    port: int
    tls: bool
    host_header: bytes
    base_path: bytes

    @classmethod
    def of(cls, base_url: str) -> Origin:
        parts = urlsplit(base_url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"an upstream needs an http:// or https:// URL, not {base_url!r}")
        tls = parts.scheme == "https"
        return cls(parts.hostname, parts.port or (443 if tls else 80), tls,
                   parts.netloc.rsplit("@", 1)[-1].encode("idna"), parts.path.rstrip("/").encode())


@functools.cache
def system_tls_context() -> ssl.SSLContext:
    """The system trust store, loaded once per process (loading it costs tens of ms)."""
    return ssl.create_default_context()


@attrs.define(slots=True, eq=False)
class _Connection:
    stream: ByteStream
    parser: ReplyParser = attrs.Factory(ReplyParser)
    idle_since: float = 0.0


class UpstreamResponse:
    """Status and headers of a reply; the body is read with :meth:`next_chunk`.

    :meth:`close` must be called when done (it is idempotent and never awaits): an
    unfinished reply's connection is closed there, a finished one was already released.
    """

    __slots__ = ("_borrower", "_connection", "_error", "_pool", "headers", "status")

    def __init__(self, pool: Http11Pool, connection: _Connection, borrower: object, status: int,
                 headers: list[tuple[bytes, bytes]]) -> None:
        self._pool = pool
        self._connection: _Connection | None = connection
        self._borrower = borrower
        self._error: Exception | None = None
        self.status = status
        self.headers = headers

    async def next_chunk(self) -> bytes | None:
        """The body received so far and not yet returned, as soon as there is any; None once
        the body is complete.

        Pieces that arrived together are returned together (one send to the client instead
        of one per piece), but nothing is ever held back waiting for more. A break after
        some pieces arrived returns them first; the next call raises.
        """
        connection = self._connection
        if connection is None:
            if self._error is not None:
                raise self._error
            return None
        parser = connection.parser
        try:
            while True:
                data, done = parser.read_body()
                if done:
                    self._connection = None
                    self._pool._release(connection, self._borrower)
                    return data or None
                if data:
                    return data
                parser.feed(await connection.stream.receive_some())
        except (MalformedReply, UpstreamUnavailable) as exc:
            error: Exception = exc
        except _BROKEN as exc:
            error = UpstreamUnavailable(f"connection broke inside the reply body: "
                                        f"{str(exc) or type(exc).__name__}")
        except BaseException:
            self.close()
            raise
        self.close()
        self._error = error
        raise error

    def close(self) -> None:
        """Release the connection: an unfinished reply means the socket is closed."""
        connection = self._connection
        if connection is not None:
            self._connection = None
            connection.stream.close()
            self._pool._limiter.release_on_behalf_of(self._borrower)


class Http11Pool:
    """Keep-alive connections to one origin, at most ``max_connections`` at once."""

    __slots__ = ("_closed", "_idle", "_json_headers", "_limiter", "_limits", "_origin", "_tls",
                 "connect_timeout", "keepalive_expiry", "max_reply_bytes")

    def __init__(self, base_url: str, *, max_connections: int, connect_timeout: float, write_timeout: float,
                 read_timeout: float | None = None, keepalive_expiry: float = 30.0,
                 max_reply_bytes: int = 1024 * 1024, tls: ssl.SSLContext | None = None) -> None:
        """``tls``: the context for an ``https://`` origin (default: the system trust store)."""
        self._origin = Origin.of(base_url)
        self._tls = (tls or system_tls_context()) if self._origin.tls else None
        self._limiter = trio.CapacityLimiter(max_connections)
        self.connect_timeout = connect_timeout
        self._limits = StreamLimits(write_timeout, read_timeout)
        self.keepalive_expiry = keepalive_expiry
        self.max_reply_bytes = max_reply_bytes
        self._idle: list[_Connection] = []
        self._closed = False
        # Every JSON call sends these; made and checked once.
        self._json_headers = header_block([(b"host", self._origin.host_header), *_JSON_HEADERS])

    @property
    def origin(self) -> Origin:
        return self._origin

    @property
    def max_connections(self) -> int:
        return int(self._limiter.total_tokens)

    @property
    def idle_connections(self) -> int:
        return len(self._idle)

    @property
    def connections_in_use(self) -> int:
        return int(self._limiter.borrowed_tokens)

    async def send(self, method: bytes, target: bytes, headers: Sequence[tuple[bytes, bytes]],
                   body: bytes) -> UpstreamResponse:
        """Send a request (the origin's path prefixed to ``target``) and wait for the reply head.

        Raises :class:`UpstreamConnectError` when no connection could be opened,
        :class:`~.resilience.UpstreamUnavailable` when it broke before the reply head and
        :class:`~.resilience.MalformedReply` when the reply is not HTTP/1.x.
        """
        origin = self._origin
        head = [(b"host", origin.host_header), *headers]
        if body or method not in _NO_BODY_METHODS:
            head.append((b"content-length", b"%d" % len(body)))
        try:
            request = request_bytes(method, origin.base_path + target, head, body)
        except ValueError as exc:
            raise MalformedReply(f"request not sendable: {exc}") from None
        return await self._send(request, no_body=method == b"HEAD")

    async def _send(self, request: bytes, *, no_body: bool) -> UpstreamResponse:
        await trio.lowlevel.checkpoint_if_cancelled()
        borrower = object()
        limiter = self._limiter
        try:
            limiter.acquire_on_behalf_of_nowait(borrower)
        except trio.WouldBlock:
            await limiter.acquire_on_behalf_of(borrower)
        try:
            connection = self._take_idle()
            if connection is not None:
                try:
                    return await self._exchange(connection, borrower, request, no_body, reused=True)
                except _Stale:
                    pass  # the peer closed it while idle; nothing of a reply arrived: once more
            connection = await self._connect()
            return await self._exchange(connection, borrower, request, no_body, reused=False)
        except BaseException:
            limiter.release_on_behalf_of(borrower)
            raise

    async def post_json(self, path: str, body: bytes) -> Any:
        """POST ``body`` (JSON) to ``path``; the decoded JSON reply, or an upstream error."""
        headers = self._json_headers + b"content-length: %d\r\n" % len(body)
        target = self._origin.base_path + path.encode("ascii")
        try:
            request = request_with_headers(b"POST", target, headers, body)
        except ValueError as exc:
            raise MalformedReply(f"request not sendable: {exc}") from None
        response = await self._send(request, no_body=False)
        limit = self.max_reply_bytes
        parts: list[bytes] = []
        try:
            for name, value in response.headers:
                if name == b"content-length" and int(value) > limit:
                    raise MalformedReply(f"POST {path}: reply larger than {limit} bytes")
            size = 0
            while (chunk := await response.next_chunk()) is not None:
                size += len(chunk)
                if size > limit:
                    raise MalformedReply(f"POST {path}: reply larger than {limit} bytes")
                parts.append(chunk)
        finally:
            response.close()
        check_status(response.status, path)
        try:
            return json.loads(b"".join(parts))
        except ValueError:
            raise MalformedReply(f"POST {path}: reply is not JSON") from None

    async def _exchange(self, connection: _Connection, borrower: object, request: bytes, no_body: bool,
                        *, reused: bool) -> UpstreamResponse:
        parser = connection.parser
        stream = connection.stream
        received = False
        try:
            parser.expect_reply(no_body=no_body)
            await stream.send_all(request)
            while (head := parser.read_head()) is None:
                data = await stream.receive_some()
                if not data and reused and not received:
                    raise _Stale
                received = True
                parser.feed(data)
            return UpstreamResponse(self, connection, borrower, head.status, head.headers)
        except _BROKEN as exc:
            stream.close()
            if reused and not received and not isinstance(exc, trio.TooSlowError):
                raise _Stale from None
            raise UpstreamUnavailable(f"connection to {self._origin.host}:{self._origin.port} broke: "
                                      f"{str(exc) or type(exc).__name__}") from None
        except BaseException:
            stream.close()
            raise

    async def _connect(self) -> _Connection:
        origin = self._origin
        try:
            with trio.fail_after(self.connect_timeout):
                stream = await open_byte_stream(origin.host, origin.port, self._tls, self._limits)
        except (OSError, trio.TooSlowError, trio.BrokenResourceError) as exc:
            raise UpstreamConnectError(f"cannot connect to {origin.host}:{origin.port}: "
                                       f"{str(exc) or type(exc).__name__}") from None
        return _Connection(stream)

    def _take_idle(self) -> _Connection | None:
        horizon = trio.current_time() - self.keepalive_expiry
        idle = self._idle
        while idle:
            connection = idle.pop()
            if connection.idle_since > horizon and connection.stream.usable_when_idle():
                return connection
            connection.stream.close()
        return None

    def _release(self, connection: _Connection, borrower: object) -> None:
        """A reply completed: keep its connection for the next request if both sides can."""
        if self._closed or not connection.parser.reusable:
            # Not reusable also when bytes followed the reply unasked (a server's 408 before
            # closing, or garbage): the next request would read them as its reply.
            connection.stream.close()
        else:
            connection.idle_since = trio.current_time()
            self._idle.append(connection)
        self._limiter.release_on_behalf_of(borrower)

    def close(self) -> None:
        """Close the idle connections; connections in use close when their call ends."""
        self._closed = True
        while self._idle:
            self._idle.pop().stream.close()
