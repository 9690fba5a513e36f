"""A small HTTP/1.1 server (trio + h11) for the simulator's raw ASGI apps.

hypercorn costs about 2 ms of CPU per request on a loaded 2-core machine, which is more
than the gateway it is meant to exercise; this server does only what the simulated
engine and the controller emulator need, for a fraction of that. ASGI 3, ``http`` scope
only (``lifespan`` is not run):

- the request body is streamed (``more_body``), bounded by ``max_body_bytes``;
- ``http.disconnect`` is delivered when the peer closes, and also once the response is
  complete (as hypercorn does), so a disconnect watcher never hangs;
- keep-alive with an idle timeout and an optional request limit per connection;
- a unary response (``content-length`` given) goes out in one write with its headers;
  a streamed one sends its headers at once and each body message as one chunk;
- an app that returns mid-body gets its connection closed (the client sees a cut body);
- bounded header size, body size and connection count; send errors are swallowed (the
  app learns of the peer from ``http.disconnect``);
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
import math
import socket
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any
from urllib.parse import unquote

import attrs
import h11
import trio

__all__ = ["SEND_NOWAIT", "AsgiApp", "HttpServerConfig", "SendNowait", "serve_asgi"]

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


class _Server:
    def __init__(self, app: AsgiApp, config: HttpServerConfig) -> None:
        self.app = app
        self.config = config
        self.closing = False
        self.connections: set[_Connection] = set()
        self.all_closed = trio.Event()
        self.slots = trio.Semaphore(config.max_connections)

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
        config = server.config
        self.h11 = h11.Connection(h11.SERVER, max_incomplete_event_size=config.max_header_bytes)
        self.idle_scope: trio.CancelScope | None = None
        self.peer_gone = False
        self.served = 0
        try:
            self.client = _address(sock.getpeername())
            self.local = _address(sock.getsockname())
        except OSError:
            self.client = self.local = None
        self._reset_cycle()

    def _reset_cycle(self) -> None:
        self.head_request = False
        self.close_after = False
        self.body_done = False
        self.body_size = 0
        self.started = False
        self.complete = False
        self.held_head: tuple[int, list[tuple[bytes, bytes]]] | None = None
        self.chunked = False
        self.waiter: trio.CancelScope | None = None
        self.unsent = b""

    def stop_if_idle(self) -> None:
        if self.idle_scope is not None:
            self.idle_scope.cancel()

    async def run(self) -> None:
        config = self.server.config
        while not self.server.closing:
            request = await self._read_head()
            if request is None:
                return
            self.served += 1
            self.head_request = request.method == b"HEAD"
            limit = config.max_requests_per_connection
            self.close_after = limit is not None and self.served >= limit
            declared = _content_length(request.headers)
            if declared is not None and declared > config.max_body_bytes:
                await self._error_reply(413)
                return
            await self._run_app(request)
            if not await self._finish_cycle():
                return

    async def _read_head(self) -> h11.Request | None:
        """The next request head, or None: peer closed, idle timeout, shutdown, bad request."""
        with trio.CancelScope() as scope:
            self.idle_scope = scope
            if self.server.closing:
                scope.cancel()
            scope.deadline = trio.current_time() + self.server.config.keep_alive_timeout
            try:
                while True:
                    event = self.h11.next_event()
                    if type(event) is h11.Request:
                        # h11 bounds only a head still arriving; one read can hold a whole big head.
                        size = len(event.target) + sum(len(n) + len(v) + 4 for n, v in event.headers)
                        if size > self.server.config.max_header_bytes:
                            raise h11.RemoteProtocolError("request head too large", 431)
                        return event
                    if event is not h11.NEED_DATA:
                        return None  # ConnectionClosed or PAUSED on a connection that must close
                    if not await self._read_more():
                        return None
            except h11.RemoteProtocolError as error:
                scope.deadline = math.inf
                self.idle_scope = None
                await self._error_reply(error.error_status_hint)
                return None
            finally:
                self.idle_scope = None
        return None

    async def _read_more(self) -> bool:
        """Feed the next bytes from the socket to h11; False when the peer is gone."""
        sock = self.sock
        while True:
            try:
                data = sock.recv(self.server.config.read_size)
                break
            except BlockingIOError:
                await trio.lowlevel.wait_readable(sock)
            except OSError:  # reset by the peer
                data = b""
                break
        self.h11.receive_data(data)
        if not data:
            self.peer_gone = True
        return bool(data)

    def _scope(self, request: h11.Request) -> dict[str, Any]:
        target = request.target
        path, _, query = target.partition(b"?")
        return {
            "type": "http",
            "asgi": _ASGI,
            "http_version": request.http_version.decode("ascii"),
            "method": request.method.decode("ascii"),
            "scheme": "http",
            "path": unquote(path.decode("ascii", "replace")),
            "raw_path": path,
            "query_string": query,
            "root_path": "",
            "headers": list(request.headers),
            "client": self.client,
            "server": self.local,
            "extensions": {SEND_NOWAIT: self.send_nowait},
        }

    async def _run_app(self, request: h11.Request) -> None:
        try:
            await self.server.app(self._scope(request), self.receive, self.send)
        except Exception:
            _log.exception("ASGI app failed")
            if not self.started:
                await self._error_reply(500)
            self.close_after = True
            return
        if not self.started:
            await self._error_reply(500)
            self.close_after = True

    async def _finish_cycle(self) -> bool:
        """After the app returned: True when the connection can take another request."""
        if not self.complete or self.close_after or self.peer_gone or self.server.closing:
            return False
        if self.h11.their_state is h11.SEND_BODY and not await self._drain_body():
            return False
        if self.h11.our_state is not h11.DONE or self.h11.their_state is not h11.DONE:
            return False
        self.h11.start_next_cycle()
        self._reset_cycle()
        return True

    async def _drain_body(self) -> bool:
        """Discard a request body the app did not read (bounded), to keep the connection."""
        budget = self.server.config.max_header_bytes
        with trio.move_on_after(1.0):
            while True:
                event = self.h11.next_event()
                if type(event) is h11.EndOfMessage:
                    return True
                if type(event) is h11.Data:
                    budget -= len(event.data)
                    if budget < 0:
                        return False
                elif event is not h11.NEED_DATA or not await self._read_more():
                    return False
        return False

    # -- ASGI receive / send --------------------------------------------------------------

    async def receive(self) -> Message:
        if self.body_done or self.peer_gone:
            return await self._wait_disconnect()
        parts: list[bytes] = []
        try:
            while True:
                event = self.h11.next_event()
                if type(event) is h11.Data:
                    self.body_size += len(event.data)
                    if self.body_size > self.server.config.max_body_bytes:
                        self.close_after = True
                        self.peer_gone = True  # stop serving this connection after the app
                        return {"type": "http.disconnect"}
                    parts.append(bytes(event.data))
                elif type(event) is h11.EndOfMessage:
                    self.body_done = True
                    return {"type": "http.request", "body": b"".join(parts), "more_body": False}
                elif event is h11.NEED_DATA:
                    if parts:
                        return {"type": "http.request", "body": b"".join(parts), "more_body": True}
                    if self.h11.client_is_waiting_for_100_continue:
                        await self._write(self.h11.send(h11.InformationalResponse(status_code=100,
                                                                                  headers=[])))
                    with trio.move_on_after(self.server.config.keep_alive_timeout) as timer:
                        more = await self._read_more()
                    if timer.cancelled_caught:
                        self.peer_gone = True
                        more = False
                    if not more:
                        self.close_after = True
                        return {"type": "http.disconnect"}
                else:  # the peer closed mid-body
                    self.peer_gone = True
                    return {"type": "http.disconnect"}
        except h11.RemoteProtocolError:
            self.peer_gone = True
            self.close_after = True
            return {"type": "http.disconnect"}

    async def _wait_disconnect(self) -> Message:
        """Block until the peer closes or the response is complete."""
        if self.complete or self.peer_gone:
            return {"type": "http.disconnect"}
        # Only send() cancels this scope: when the response is complete or the peer is gone.
        with trio.CancelScope() as self.waiter:
            try:
                # Bytes of a pipelined next request are kept (bounded) for the next cycle.
                while len(self.h11.trailing_data[0]) <= self.server.config.max_header_bytes:
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
            headers = list(message.get("headers", ()))
            if self.close_after or self.server.closing:
                headers.append(_CLOSE)
            self.held_head = (int(message["status"]), headers)
            # A declared length means the body follows at once: send both in one write.
            if _content_length(headers) is None:
                await self._write(self._head_bytes())
        elif kind == "http.response.body":
            if not self.started or self.complete:
                raise RuntimeError("http.response.body outside a response")
            body: bytes = message.get("body", b"")
            more_body: bool = message.get("more_body", False)
            out: list[bytes] = []
            if self.held_head is not None:
                if not more_body and _content_length(self.held_head[1]) is None:
                    self.held_head[1].append((b"content-length", str(len(body)).encode()))
                out.append(self._head_bytes())
            if body and not self.head_request:
                if self.chunked:
                    # h11's chunked writer keeps no state: framing here saves its per-event cost.
                    out += (b"%x\r\n" % len(body), body, b"\r\n")
                else:
                    out.append(self._h11_bytes(h11.Data(data=body)))
            if not more_body:
                self.complete = True
                out.append(self._h11_bytes(h11.EndOfMessage()))
            if self.unsent:
                out.insert(0, self.unsent)
                self.unsent = b""
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
        if self.peer_gone or not body or self.head_request:
            return True
        data = b"%x\r\n%b\r\n" % (len(body), body)
        try:
            sent = self.sock.send(data)
        except BlockingIOError:
            sent = 0
        except OSError:
            self.peer_gone = True
            self._wake_waiter()
            return True
        if sent == len(data):
            return True
        self.unsent = data[sent:]
        return False

    def _head_bytes(self) -> bytes:
        assert self.held_head is not None
        status, headers = self.held_head
        self.held_head = None
        head = self._h11_bytes(h11.Response(status_code=status, headers=headers))
        self.chunked = b"transfer-encoding: chunked\r\n" in head.lower()
        return head

    def _h11_bytes(self, event: h11.Response | h11.Data | h11.EndOfMessage) -> bytes:
        return self.h11.send(event) or b""

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
            self.peer_gone = True
            self._wake_waiter()

    async def _error_reply(self, status: int) -> None:
        """A plain error answer outside the app (bad head, body too large, app failure)."""
        if self.h11.our_state not in (h11.IDLE, h11.SEND_RESPONSE):
            return
        body = b'{"detail":"%s"}' % _REASONS.get(status, b"Error")
        headers = [(b"content-type", b"application/json"),
                   (b"content-length", str(len(body)).encode()), _CLOSE]
        try:
            data = self.h11.send(h11.Response(status_code=status, headers=headers)) or b""
            data += self.h11.send(h11.Data(data=body)) or b""
            data += self.h11.send(h11.EndOfMessage()) or b""
        except h11.LocalProtocolError:
            return
        self.started = self.complete = True
        self.close_after = True
        with trio.move_on_after(1.0):
            await self._write(data)


_REASONS = {400: b"Bad Request", 413: b"Request Entity Too Large",
            431: b"Request Header Fields Too Large", 500: b"Internal Server Error"}


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
    server = _Server(app, config)
    listeners = _listen(config)
    try:
        async with trio.open_nursery() as connections:
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
