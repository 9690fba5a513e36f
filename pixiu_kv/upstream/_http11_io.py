"""The byte stream under one HTTP/1.1 client connection: a plain socket, or TLS.

A plain connection is driven as a non-blocking socket directly: a request is written with
one ``send`` and the task sleeps once, until the reply is readable. trio's stream layer
would add scheduler round trips per call (a checkpoint around every ``send`` and
``recv``), each costing more CPU than parsing the reply. TLS goes through
:class:`trio.SSLStream`.

Deadlines (:class:`StreamLimits`): writing one request is bounded by ``write_timeout``, a
wait for reply data by ``read_timeout`` when one is given, else by the caller's cancel
scope. On a plain socket a deadline scope is only opened when the call has to wait, so the
common case (the kernel takes the whole request at once) costs none.

``close`` never awaits: it is safe in any cleanup, cancelled or not. (Under TLS it skips
close_notify, which is what aborting a connection means.)
"""

from __future__ import annotations

import select
import socket
import ssl

import attrs
import trio

__all__ = ["ByteStream", "PlainStream", "StreamLimits", "TlsStream", "open_byte_stream"]

READ_SIZE = 65536


@attrs.frozen(slots=True)
class StreamLimits:
    """``write_timeout``: for writing one request; ``read_timeout``: for each wait for reply
    data (None: the caller's cancel scope bounds reads)."""

    write_timeout: float = attrs.field(validator=attrs.validators.gt(0))
    read_timeout: float | None = attrs.field(
        default=None, validator=attrs.validators.optional(attrs.validators.gt(0)))


class PlainStream:
    """A connected non-blocking socket."""

    __slots__ = ("_idle_check", "_limits", "_sock")

    def __init__(self, sock: socket.socket, limits: StreamLimits) -> None:
        self._sock = sock
        self._limits = limits
        self._idle_check = select.poll()
        self._idle_check.register(sock, select.POLLIN)

    async def send_all(self, data: bytes) -> None:
        view = memoryview(data)
        deadline = 0.0
        while view:
            try:
                sent = self._sock.send(view)
            except BlockingIOError:
                if not deadline:
                    deadline = trio.current_time() + self._limits.write_timeout
                with trio.fail_at(deadline):
                    await trio.lowlevel.wait_writable(self._sock)
                continue
            view = view[sent:]

    async def receive_some(self) -> bytes:
        """What is available, waiting for it if need be; ``b""`` at end of stream."""
        while True:
            try:
                return self._sock.recv(READ_SIZE)
            except BlockingIOError:
                read_timeout = self._limits.read_timeout
                if read_timeout is None:
                    await trio.lowlevel.wait_readable(self._sock)
                else:
                    with trio.fail_after(read_timeout):
                        await trio.lowlevel.wait_readable(self._sock)

    def usable_when_idle(self) -> bool:
        """An idle connection with something to read was closed (or broken) by the peer."""
        return not self._idle_check.poll(0)

    def close(self) -> None:
        self._sock.close()


class TlsStream:
    """A TLS connection; ``tcp`` is its socket, closed directly to abort."""

    __slots__ = ("_limits", "_stream", "_tcp")

    def __init__(self, stream: trio.SSLStream[trio.SocketStream], tcp: trio.socket.SocketType,
                 limits: StreamLimits) -> None:
        self._stream = stream
        self._tcp = tcp
        self._limits = limits

    async def send_all(self, data: bytes) -> None:
        with trio.fail_after(self._limits.write_timeout):
            await self._stream.send_all(data)

    async def receive_some(self) -> bytes:
        read_timeout = self._limits.read_timeout
        if read_timeout is None:
            return bytes(await self._stream.receive_some(READ_SIZE))
        with trio.fail_after(read_timeout):
            return bytes(await self._stream.receive_some(READ_SIZE))

    def usable_when_idle(self) -> bool:
        """Not decidable under TLS (a server may send session tickets at any time): a
        dropped connection is caught by the stale-connection retry instead."""
        return True

    def close(self) -> None:
        self._tcp.close()


ByteStream = PlainStream | TlsStream


async def open_byte_stream(host: str, port: int, tls: ssl.SSLContext | None,
                           limits: StreamLimits) -> ByteStream:
    """Connect (and shake hands); raises OSError or trio.BrokenResourceError. The caller
    bounds the time."""
    tcp = await trio.open_tcp_stream(host, port)
    if tls is None:
        # trio connected it (happy eyeballs, TCP_NODELAY); from here plain non-blocking I/O.
        sock = socket.socket(fileno=tcp.socket.detach())
        sock.setblocking(False)
        return PlainStream(sock, limits)
    stream = trio.SSLStream(tcp, tls, server_hostname=host, https_compatible=True)
    try:
        await stream.do_handshake()
    except BaseException:
        tcp.socket.close()
        raise
    return TlsStream(stream, tcp.socket, limits)
