"""A small HTTP/1.1 server on trio for the simulator's raw ASGI apps.

hypercorn costs about 2 ms of CPU per request on a loaded 2-core machine, which is more
than the gateway it is meant to exercise; this server does only what the simulated
engine and the controller emulator need, for a fraction of that. ASGI 3, ``http`` scope
only (``lifespan`` is not run):

- requests are parsed by :mod:`pixiu_kv._http11_wire` (strict, checked against h11 by the
  tests, a few microseconds where h11 took a quarter of a request's CPU); replies are
  written here directly;
- the request body is streamed (``more_body``), bounded by ``max_body_bytes``;
- ``http.disconnect`` is delivered when the peer closes, and also once the response is
  complete (as hypercorn does), so a disconnect watcher never hangs; an app may instead
  ask to be cancelled when its client goes away (:data:`CANCEL_ON_DISCONNECT`);
- keep-alive with an idle timeout and an optional request limit per connection;
- a unary response (``content-length`` given) goes out in one write with its headers;
  a streamed one sends its headers at once and each body message as one chunk;
- an app that returns mid-body gets its connection closed (the client sees a cut body);
- bounded header size, body size and connection count; send errors are swallowed (the
  app learns of the peer from ``http.disconnect``, or by being cancelled);
- ``shutdown_trigger``: stop accepting, close idle connections, give running requests
  ``graceful_timeout`` seconds, then cancel them. Cancelling ``serve_asgi`` closes
  every socket.

The app runs in the connection's own task; no task is spawned per request. A request
waiting for ``http.disconnect`` reads the socket itself, so a peer that goes away is
noticed at once. Sockets are plain non-blocking sockets driven with
``trio.lowlevel.wait_readable``/``wait_writable``: a write that fits in the socket buffer
(nearly all of them) is one ``send`` call with no trip through the scheduler, which is
where a streaming engine's per-token cost went with trio's ``SocketStream``.
"""

from __future__ import annotations

import errno
import logging
import select
import socket
from collections.abc import Awaitable, Callable, MutableMapping
from http import HTTPStatus
from typing import Any
from urllib.parse import unquote

import attrs
import trio

from .._http11_wire import BadRequest, ClientGone, RequestHead, RequestParser, header_block

__all__ = ["CANCEL_ON_DISCONNECT", "SEND_NOWAIT", "AsgiApp", "HttpServerConfig", "SendNowait",
           "serve_asgi"]

Message = MutableMapping[str, Any]
AsgiApp = Callable[[MutableMapping[str, Any], Callable[[], Awaitable[Message]],
                    Callable[[Message], Awaitable[None]]], Awaitable[None]]
"""A raw ASGI 3 application."""

_log = logging.getLogger(__name__)
_ACCEPT_RETRY_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS})
_ACCEPT_SKIP_ERRNOS = frozenset({errno.ECONNABORTED, errno.EPROTO, errno.EPERM})
_ASGI = {"version": "3.0", "spec_version": "2.3"}
_CLOSE = (b"connection", b"close")

SEND_NOWAIT = "pixiu_kv.send_nowait"
"""ASGI scope extension of this server: ``scope["extensions"][SEND_NOWAIT]`` is a
:data:`SendNowait` for a streamed response body (headers already sent)."""
CANCEL_ON_DISCONNECT = "pixiu_kv.cancel_on_disconnect"
"""ASGI scope extension of this server: calling ``scope["extensions"][CANCEL_ON_DISCONNECT]()``
asks the server to cancel the app's call if the client goes away before the response is
complete (the app then needs no task waiting on ``receive`` for ``http.disconnect``).
Offered only where the server can watch cheaply (Linux)."""
_CAN_WATCH = hasattr(select, "epoll") and hasattr(select, "EPOLLRDHUP")

SendNowait = Callable[[bytes], bool]
"""Write one body chunk of a streamed response without blocking. False: the socket took
only part of it; the rest is kept (at most one chunk) and goes out first with the next
``send``, which the caller must make (an empty ``more_body`` body is enough). A chunk
for a peer that is gone is dropped (True): the app learns of it from ``http.disconnect``."""


def _positive(instance: object, attribute: attrs.Attribute[Any], value: float | None) -> None:
    if value is not None and not value > 0:
        raise ValueError(f"{attribute.name} must be positive")


@attrs.frozen
class HttpServerConfig:
    host: str = "127.0.0.1"
    port: int = attrs.field(default=0, validator=attrs.validators.and_(
        attrs.validators.ge(0), attrs.validators.le(65535)))
    backlog: int = attrs.field(default=4096, validator=_positive)
    max_connections: int = attrs.field(default=8192, validator=_positive)
    max_requests_per_connection: int | None = attrs.field(default=None, validator=_positive)
    """None: unlimited (benchmark connections are long-lived)."""
    keep_alive_timeout: float = attrs.field(default=75.0, validator=_positive)
    """Idle time allowed before a request head, and between reads of a request body."""
    max_header_bytes: int = attrs.field(default=16 * 1024, validator=_positive)
    max_body_bytes: int = attrs.field(default=64 * 1024 * 1024, validator=_positive)
    """A larger request is answered 413 (declared length) or cut (streamed body)."""
    graceful_timeout: float = attrs.field(default=1.0, validator=attrs.validators.ge(0))
    read_size: int = attrs.field(default=64 * 1024, validator=_positive)


class _HangupWatch:
    """One task notices every watched client that goes away, and cancels its request.

    The sockets of requests whose app asked for it (:data:`CANCEL_ON_DISCONNECT`) sit in a
    private epoll set, registered for ``EPOLLRDHUP`` only (the peer closed; hang-ups and
    errors are always reported, bytes of a pipelined request are not), and trio waits on
    the set's own descriptor. Watching a request costs two system calls, where a watcher
    task per request cost a nursery, a task and a cancel scope (about 0.1 ms of CPU).
    Linux only; elsewhere the extension is not offered and apps wait on ``receive``.
    """

    def __init__(self) -> None:
        self._epoll = select.epoll()
        self._watched: dict[int, _Connection] = {}

    def add(self, connection: _Connection) -> None:
        self._epoll.register(connection.fd, select.EPOLLRDHUP)
        self._watched[connection.fd] = connection

    def discard(self, connection: _Connection) -> None:
        if self._watched.pop(connection.fd, None) is not None:
            self._epoll.unregister(connection.fd)

    async def run(self) -> None:
        try:
            while True:
                await trio.lowlevel.wait_readable(self._epoll.fileno())
                for fd, _ in self._epoll.poll(0):
                    connection = self._watched.pop(fd, None)
                    if connection is not None:
                        self._epoll.unregister(fd)
                        connection.hang_up()
        finally:
            self._epoll.close()


class _Server:
    def __init__(self, app: AsgiApp, config: HttpServerConfig) -> None:
        self.app = app
        self.config = config
        self.closing = False
        self.connections: set[_Connection] = set()
        self.all_closed = trio.Event()
        self.slots = trio.Semaphore(config.max_connections)
        self.watch = _HangupWatch() if _CAN_WATCH else None

    async def close_idle_connections(self) -> None:
        """Close connections idle (waiting for a request head) longer than the keep-alive
        timeout. One sweep a fraction of the timeout apart costs far less than a deadline
        set and cleared around every request's read: a connection is closed after between
        1 and 1.25 timeouts of idleness."""
        timeout = self.config.keep_alive_timeout
        while True:
            await trio.sleep(min(timeout / 4, 1.0))
            limit = trio.current_time() - timeout
            for connection in list(self.connections):
                if connection.idle_since is not None and connection.idle_since <= limit:
                    connection.connection_scope.cancel()

    async def accept_loop(self, listener: socket.socket, nursery: trio.Nursery) -> None:
        while True:
            await self.slots.acquire()
            try:
                sock = await _accept(listener)
            except BaseException:
                self.slots.release()
                raise
            nursery.start_soon(self.handle, sock)

    async def handle(self, sock: socket.socket) -> None:
        connection = _Connection(self, sock)
        self.connections.add(connection)
        try:
            await connection.run()
        except Exception:
            _log.exception("HTTP connection failed")
        finally:
            if self.watch is not None:
                self.watch.discard(connection)
            self.connections.discard(connection)
            self.slots.release()
            _close(sock)
            if self.closing and not self.connections:
                self.all_closed.set()

    def begin_shutdown(self) -> None:
        self.closing = True
        for connection in list(self.connections):
            connection.stop_if_idle()
        if not self.connections:
            self.all_closed.set()


class _Connection:
    """One client connection: a loop of request cycles, run in the connection's task."""

    def __init__(self, server: _Server, sock: socket.socket) -> None:
        self.server = server
        self.sock = sock
        self.fd = sock.fileno()
        self.parser = RequestParser(server.config.max_header_bytes)
        self.connection_scope = trio.CancelScope()
        """Cancelled when the connection must end at once: idle too long or at a shutdown
        (only while between requests), or the client went away from an app that asked to
        be cancelled then."""
        self.idle_since: float | None = None
        """When the connection began waiting for a request head (None: it is not)."""
        self.peer_gone = False
        self.served = 0
        try:
            self.client = _address(sock.getpeername())
            self.local = _address(sock.getsockname())
        except OSError:
            self.client = self.local = None
        self._reset_cycle(None)

    def _reset_cycle(self, head: RequestHead | None) -> None:
        self.head = head
        self.close_after = False
        self.body_delivered = False
        self.body_size = 0
        self.continue_sent = False
        self.started = False
        self.complete = False
        self.held_head: tuple[int, list[tuple[bytes, bytes]]] | None = None
        self.no_body = False
        self.chunked = False
        self.left: int | None = None
        """Body bytes still owed under a declared Content-Length."""
        self.watched = False
        self.waiter: trio.CancelScope | None = None
        self.unsent = b""

    def stop_if_idle(self) -> None:
        if self.idle_since is not None:
            self.connection_scope.cancel()

    def hang_up(self) -> None:
        """The watch saw the peer go: cancel the request (its app asked for that) and, with
        it, the connection, which has no one left to serve."""
        self.peer_gone = True
        self.watched = False
        self.connection_scope.cancel()

    async def run(self) -> None:
        config = self.server.config
        with self.connection_scope:
            while not self.server.closing:
                head = await self._read_head()
                if head is None:
                    return
                self.served += 1
                self._reset_cycle(head)
                limit = config.max_requests_per_connection
                self.close_after = not head.keep_alive or (limit is not None and self.served >= limit)
                if head.content_length is not None and head.content_length > config.max_body_bytes:
                    await self._error_reply(413)
                    return
                await self._run_app(head)
                if not await self._finish_cycle():
                    return

    async def _read_head(self) -> RequestHead | None:
        """The next request head, or None: peer closed, idle timeout, shutdown, bad request."""
        parser = self.parser
        try:
            head = parser.read_head()
            if head is not None or parser.at_eof or self.server.closing:
                return head
            try:
                while head is None:
                    if not await self._read_more(idle=True):
                        return parser.read_head()  # a cut head raises ClientGone
                    head = parser.read_head()
            finally:
                self.idle_since = None
            return head
        except BadRequest as error:
            await self._error_reply(error.status)
        except ClientGone:
            pass
        return None

    async def _read_more(self, *, idle: bool = False) -> bool:
        """Feed the next bytes from the socket to the parser; False when the peer is gone.
        ``idle``: waiting for a request head (the idle sweep may close the connection)."""
        sock = self.sock
        while True:
            try:
                data = sock.recv(self.server.config.read_size)
                break
            except BlockingIOError:
                if idle and self.idle_since is None:
                    self.idle_since = trio.current_time()
                await trio.lowlevel.wait_readable(sock)
            except OSError:  # reset by the peer
                data = b""
                break
        self.parser.feed(data)
        if not data:
            self.peer_gone = True
        return bool(data)

    def _scope(self, head: RequestHead) -> dict[str, Any]:
        path, _, query = head.target.partition(b"?")
        extensions: dict[str, Any] = {SEND_NOWAIT: self.send_nowait}
        if self.server.watch is not None:
            extensions[CANCEL_ON_DISCONNECT] = self.cancel_on_disconnect
        return {
            "type": "http",
            "asgi": _ASGI,
            "http_version": "1.1" if head.http11 else "1.0",
            "method": head.method.decode("ascii"),
            "scheme": "http",
            "path": unquote(path.decode("ascii", "replace")),
            "raw_path": path,
            "query_string": query,
            "root_path": "",
            "headers": head.headers,
            "client": self.client,
            "server": self.local,
            "extensions": extensions,
        }

    def cancel_on_disconnect(self) -> None:
        watch = self.server.watch
        if watch is None or self.watched or self.complete:
            return
        if self.peer_gone:
            self.hang_up()
            return
        watch.add(self)
        self.watched = True

    async def _run_app(self, head: RequestHead) -> None:
        try:
            await self.server.app(self._scope(head), self.receive, self.send)
        except Exception:
            _log.exception("ASGI app failed")
            self.close_after = True
        finally:
            self._unwatch()
        if not self.started:
            await self._error_reply(500)
            self.close_after = True

    def _unwatch(self) -> None:
        if self.watched:
            self.watched = False
            assert self.server.watch is not None
            self.server.watch.discard(self)

    async def _finish_cycle(self) -> bool:
        """After the app returned: True when the connection can take another request."""
        if not self.complete or self.close_after or self.peer_gone or self.server.closing:
            return False
        return self.parser.body_done or await self._drain_body()

    async def _drain_body(self) -> bool:
        """Discard a request body the app did not read (bounded), to keep the connection."""
        budget = self.server.config.max_header_bytes
        with trio.move_on_after(1.0):
            try:
                while True:
                    data, done = self.parser.read_body()
                    budget -= len(data)
                    if budget < 0:
                        return False
                    if done:
                        return True
                    if not data and not await self._read_more():
                        return False
            except (BadRequest, ClientGone):
                return False
        return False

    # -- ASGI receive / send --------------------------------------------------------------

    async def receive(self) -> Message:
        if self.body_delivered or self.peer_gone:
            return await self._wait_disconnect()
        parser = self.parser
        config = self.server.config
        while True:
            try:
                data, done = parser.read_body()
            except (BadRequest, ClientGone):
                return self._lost()
            if data or done:
                self.body_size += len(data)
                if self.body_size > config.max_body_bytes:
                    return self._lost()
                self.body_delivered = done
                return {"type": "http.request", "body": data, "more_body": not done}
            assert self.head is not None
            if self.head.expects_continue and not self.continue_sent and not self.started:
                self.continue_sent = True
                await self._write(b"HTTP/1.1 100 Continue\r\n\r\n")
            with trio.move_on_after(config.keep_alive_timeout):
                if await self._read_more():
                    continue
            return self._lost()

    def _lost(self) -> Message:
        """The request body cannot be read to its end: stop serving this connection."""
        self.peer_gone = True
        self.close_after = True
        return {"type": "http.disconnect"}

    async def _wait_disconnect(self) -> Message:
        """Block until the peer closes or the response is complete."""
        if self.complete or self.peer_gone:
            return {"type": "http.disconnect"}
        # Only send() and a failed write cancel this scope: the response is complete or the
        # peer is gone (a client that leaves a watched app cancels the whole connection).
        with trio.CancelScope() as self.waiter:
            try:
                # Bytes of a pipelined next request are kept (bounded) for the next cycle.
                while len(self.parser.buffer) <= self.server.config.max_header_bytes:
                    if not await self._read_more():
                        break
                else:
                    await trio.sleep_forever()
            finally:
                self.waiter = None
        return {"type": "http.disconnect"}

    def _wake_waiter(self) -> None:
        if self.waiter is not None:
            self.waiter.cancel()

    async def send(self, message: Message) -> None:
        kind = message["type"]
        if kind == "http.response.start":
            if self.started:
                raise RuntimeError("http.response.start sent twice")
            self.started = True
            status = int(message["status"])
            headers = list(message.get("headers", ()))
            self.held_head = (status, headers)
            assert self.head is not None
            self.no_body = self.head.method == b"HEAD" or status in (204, 304) or status < 200
            self.left = _content_length(headers)
            # A declared length means the body follows at once: send both in one write.
            if self.left is None:
                await self._write(self._head_bytes(streamed=True))
        elif kind == "http.response.body":
            if not self.started or self.complete:
                raise RuntimeError("http.response.body outside a response")
            body: bytes = message.get("body", b"")
            more_body: bool = message.get("more_body", False)
            out: list[bytes] = []
            if self.unsent:
                out.append(self.unsent)
                self.unsent = b""
            if self.held_head is not None:  # held only when a length was declared
                out.append(self._head_bytes(streamed=False))
            if body and not self.no_body:
                if self.chunked:
                    out += (b"%x\r\n" % len(body), body, b"\r\n")
                else:
                    if self.left is not None:
                        self.left -= len(body)
                        if self.left < 0:
                            raise RuntimeError("response body longer than its Content-Length")
                    out.append(body)
            if not more_body:
                if self.left and not self.no_body:
                    raise RuntimeError("response body shorter than its Content-Length")
                self.complete = True
                self._unwatch()
                if self.chunked:
                    out.append(b"0\r\n\r\n")
            await self._write(b"".join(out) if len(out) != 1 else out[0])
            if self.complete:
                self._wake_waiter()
        else:
            raise RuntimeError(f"unsupported ASGI message {kind!r}")

    def send_nowait(self, body: bytes) -> bool:
        if not self.started or self.complete or self.held_head is not None or not self.chunked:
            raise RuntimeError("send_nowait outside a streamed (chunked) response body")
        if self.unsent:
            raise RuntimeError("send_nowait before the unsent rest of a chunk was sent")
        if self.peer_gone or not body:
            return True
        data = b"%x\r\n%b\r\n" % (len(body), body)
        try:
            sent = self.sock.send(data)
        except BlockingIOError:
            sent = 0
        except OSError:
            self._write_failed()
            return True
        if sent == len(data):
            return True
        self.unsent = data[sent:]
        return False

    def _head_bytes(self, *, streamed: bool) -> bytes:
        """The status line and headers; a streamed body is chunked (HTTP/1.0: ends with the
        connection)."""
        assert self.held_head is not None and self.head is not None
        status, headers = self.held_head
        self.held_head = None
        framing = b""
        if streamed and not self.no_body:
            if self.head.http11:
                self.chunked = True
                framing = b"transfer-encoding: chunked\r\n"
            else:
                self.close_after = True
        if self.close_after or self.server.closing:
            framing += b"connection: close\r\n"
        line = _STATUS_LINES.get(status) or b"HTTP/1.1 %d \r\n" % status
        return b"".join((line, header_block(headers), framing, b"\r\n"))

    async def _write(self, data: bytes) -> None:
        if self.peer_gone or not data:
            return
        sock = self.sock
        sent = 0
        try:
            while True:
                try:
                    sent += sock.send(memoryview(data)[sent:] if sent else data)
                except BlockingIOError:
                    pass
                if sent >= len(data):
                    return
                await trio.lowlevel.wait_writable(sock)  # the peer reads slowly: wait for room
        except OSError:
            self._write_failed()

    def _write_failed(self) -> None:
        """The peer is gone (reset, broken pipe): the app learns it as it asked to."""
        if self.watched:
            self._unwatch()
            self.hang_up()
        else:
            self.peer_gone = True
            self._wake_waiter()

    async def _error_reply(self, status: int) -> None:
        """A plain error answer outside the app (bad head, body too large, app failure)."""
        if self.started or self.peer_gone:
            return
        body = b'{"detail":"%s"}' % _REASONS.get(status, b"Error")
        self.started = self.complete = True
        self.close_after = True
        data = b"".join((_STATUS_LINES.get(status) or b"HTTP/1.1 %d \r\n" % status,
                         b"content-type: application/json\r\ncontent-length: %d\r\n" % len(body),
                         b"connection: close\r\n\r\n", body))
        with trio.move_on_after(1.0):
            await self._write(data)


_REASONS = {400: b"Bad Request", 413: b"Request Entity Too Large",
            431: b"Request Header Fields Too Large", 500: b"Internal Server Error",
            501: b"Not Implemented"}
_STATUS_LINES = {int(status): b"HTTP/1.1 %d %s\r\n" % (status, status.phrase.encode())
                 for status in HTTPStatus}


def _content_length(headers: Any) -> int | None:
    for name, value in headers:
        if name.lower() == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


def _address(sockaddr: Any) -> tuple[str, int] | None:
    if isinstance(sockaddr, tuple) and len(sockaddr) >= 2:
        return str(sockaddr[0]), int(sockaddr[1])
    return None


async def _accept(listener: socket.socket) -> socket.socket:
    while True:
        try:
            sock, _ = listener.accept()
        except BlockingIOError:
            await trio.lowlevel.wait_readable(listener)
            continue
        except OSError as error:
            if error.errno in _ACCEPT_SKIP_ERRNOS:
                continue  # that client is already gone
            if error.errno not in _ACCEPT_RETRY_ERRNOS:
                raise
            _log.warning("accept failed (%s); retrying", errno.errorcode.get(error.errno or 0, "?"))
            await trio.sleep(0.1)  # back off until descriptors free up
            continue
        sock.setblocking(False)
        if sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return sock


def _close(sock: socket.socket) -> None:
    trio.lowlevel.notify_closing(sock)  # wakes any task still waiting on it
    sock.close()


def _listen(config: HttpServerConfig) -> list[socket.socket]:
    listeners: list[socket.socket] = []
    try:
        for family, kind, proto, _, address in socket.getaddrinfo(
                config.host, config.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE):
            listener = socket.socket(family, kind, proto)
            listeners.append(listener)
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                listener.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            listener.bind(address)
            listener.listen(config.backlog)
            listener.setblocking(False)
            if config.port == 0:
                break  # one free port; several families could not share it
    except BaseException:
        for listener in listeners:
            listener.close()
        raise
    return listeners


def _url(listener: socket.socket) -> str:
    host, port = listener.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    return f"http://{shown}:{port}"


async def serve_asgi(
    app: AsgiApp,
    config: HttpServerConfig | None = None,
    *,
    shutdown_trigger: Callable[[], Awaitable[object]] | None = None,
    task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``app`` until ``shutdown_trigger`` returns (then shut down gracefully) or
    until cancelled. ``task_status.started`` gets the bound base URLs (port 0 picks one),
    as ``hypercorn.trio.serve`` does."""
    config = config or HttpServerConfig()
    listeners = _listen(config)
    server = _Server(app, config)
    try:
        async with trio.open_nursery() as connections:
            connections.start_soon(server.close_idle_connections)
            if server.watch is not None:
                connections.start_soon(server.watch.run)
            async with trio.open_nursery() as acceptors:
                for listener in listeners:
                    acceptors.start_soon(server.accept_loop, listener, connections)
                task_status.started([_url(listener) for listener in listeners])
                if shutdown_trigger is None:
                    await trio.sleep_forever()
                await shutdown_trigger()
                acceptors.cancel_scope.cancel()
            server.begin_shutdown()
            with trio.move_on_after(config.graceful_timeout):
                await server.all_closed.wait()
            connections.cancel_scope.cancel()
    finally:
        for listener in listeners:
            _close(listener)
