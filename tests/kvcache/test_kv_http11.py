"""The routing lookup's HTTP/1.1 client against a raw TCP server: framing, keep-alive,
stale connections, error classes, the connection bound and cancellation."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import trio

from pixiu_kv.filters.kvcache.http11 import Http11Pool
from pixiu_kv.upstream.resilience import MalformedReply, UpstreamRejected, UpstreamUnavailable

Reply = Callable[[bytes], bytes | None]  # request body -> raw reply (None: never answer)


def with_length(payload: Any, status: str = "200 OK", extra: str = "") -> bytes:
    body = json.dumps(payload).encode()
    return f"HTTP/1.1 {status}\r\nContent-Length: {len(body)}\r\n{extra}\r\n".encode() + body


class RawServer:
    def __init__(self, reply: Reply, close_after_reply: bool = False, gate: trio.Event | None = None) -> None:
        self.reply = reply
        self.gate = gate
        self.close_after_reply = close_after_reply
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
        self.open_connections += 1
        self.max_open = max(self.max_open, self.open_connections)
        self._bump()
        buf = b""
        try:
            while True:
                while b"\r\n\r\n" not in buf:
                    data = await stream.receive_some(65536)
                    if not data:
                        return
                    buf += data
                head, _, buf = buf.partition(b"\r\n\r\n")
                length = int(next(line.split(b":")[1] for line in head.split(b"\r\n")
                                  if line.lower().startswith(b"content-length")))
                while len(buf) < length:
                    buf += await stream.receive_some(65536)
                body, buf = buf[:length], buf[length:]
                self.requests += 1
                self._bump()
                if self.gate is not None:
                    await self.gate.wait()
                reply = self.reply(body)
                if reply is None:
                    if not await stream.receive_some(1):  # held until the client goes away
                        self.eof_while_waiting += 1
                    return
                await stream.send_all(reply)
                if self.close_after_reply:
                    return
        finally:
            self.open_connections -= 1
            self._bump()
            await stream.aclose()


async def serve(nursery: trio.Nursery, server: RawServer) -> str:
    listeners = await nursery.start(trio.serve_tcp, server.handle, 0)
    port = listeners[0].socket.getsockname()[1]
    return f"http://127.0.0.1:{port}"


_POOLS: list[Http11Pool] = []


def pool(url: str, max_connections: int = 4, max_reply_bytes: int = 1 << 20) -> Http11Pool:
    made = Http11Pool(url, max_connections=max_connections, max_reply_bytes=max_reply_bytes)
    _POOLS.append(made)
    return made


@pytest.fixture(autouse=True)
def close_pools() -> Iterator[None]:
    yield
    while _POOLS:
        _POOLS.pop().close()


async def test_content_length_replies_reuse_one_connection(nursery: trio.Nursery) -> None:
    server = RawServer(lambda body: with_length({"echo": json.loads(body)}))
    client = pool(await serve(nursery, server))
    for i in range(5):
        assert await client.post_json("/lookup", json.dumps({"i": i}).encode()) == {"echo": {"i": i}}
    assert (server.connections, server.requests) == (1, 5)
    assert client.idle_connections == 1 and client.connections_in_use == 0
    client.close()


async def test_chunked_reply_with_extensions_and_trailers(nursery: trio.Nursery) -> None:
    raw = (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
           b"4;ext=1\r\n{\"a\"\r\n6\r\n: [1, \r\n3\r\n2]}\r\n0\r\nX-Trailer: t\r\n\r\n")
    server = RawServer(lambda _: raw)
    client = pool(await serve(nursery, server))
    assert await client.post_json("/x", b"{}") == {"a": [1, 2]}
    assert await client.post_json("/x", b"{}") == {"a": [1, 2]}
    assert server.connections == 1


async def test_close_delimited_and_connection_close_replies(nursery: trio.Nursery) -> None:
    server = RawServer(lambda _: b'HTTP/1.0 200 OK\r\n\r\n{"ok": true}', close_after_reply=True)
    client = pool(await serve(nursery, server))
    assert await client.post_json("/x", b"{}") == {"ok": True}
    assert await client.post_json("/x", b"{}") == {"ok": True}
    assert server.connections == 2 and client.idle_connections == 0
    closing = RawServer(lambda _: with_length({"ok": 1}, extra="Connection: close\r\n"))
    client = pool(await serve(nursery, closing))
    await client.post_json("/x", b"{}")
    assert client.idle_connections == 0


async def test_stale_keep_alive_connection_is_retried_on_a_fresh_one(nursery: trio.Nursery) -> None:
    # The server closes every connection after its reply without saying so.
    server = RawServer(lambda _: with_length({"ok": 1}), close_after_reply=True)
    client = pool(await serve(nursery, server))
    for _ in range(3):
        await server.wait_for(lambda: server.open_connections == 0)
        assert await client.post_json("/x", b"{}") == {"ok": 1}
    assert server.requests == 3 and server.connections == 3


@pytest.mark.parametrize(("reply", "error"), [
    (with_length({"detail": "x"}, "503 Service Unavailable"), UpstreamUnavailable),
    (with_length({"detail": "x"}, "429 Too Many Requests"), UpstreamUnavailable),
    (with_length({"detail": "x"}, "404 Not Found"), UpstreamRejected),
    (b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello", MalformedReply),
    (b"SMTP ready\r\n\r\n", MalformedReply),
    (b"HTTP/1.1 200 OK\r\nContent-Length: nope\r\n\r\n", MalformedReply),
    (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", MalformedReply),
    (with_length("x" * 2000), MalformedReply),
    (b"HTTP/1.1 204 No Content\r\n\r\n", MalformedReply),  # keep-alive, no body: not an answer
])
async def test_failures_are_classified(nursery: trio.Nursery, reply: bytes, error: type[Exception]) -> None:
    server = RawServer(lambda _: reply)
    client = pool(await serve(nursery, server), max_reply_bytes=1000)
    with pytest.raises(error):
        await client.post_json("/x", b"{}")
    assert client.connections_in_use == 0


async def test_truncated_reply_and_refused_connection_are_unavailable(nursery: trio.Nursery) -> None:
    truncated = b'HTTP/1.1 200 OK\r\nContent-Length: 50\r\n\r\n{"a"'
    server = RawServer(lambda _: truncated, close_after_reply=True)
    client = pool(await serve(nursery, server))
    with pytest.raises(UpstreamUnavailable):
        await client.post_json("/x", b"{}")
    with trio.socket.socket() as s:
        await s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(UpstreamUnavailable):
        await pool(f"http://127.0.0.1:{port}").post_json("/x", b"{}")


async def test_cancellation_closes_the_connection_and_frees_the_slot(nursery: trio.Nursery) -> None:
    answer = False
    server = RawServer(lambda _: with_length({"ok": 1}) if answer else None)
    client = pool(await serve(nursery, server), max_connections=1)
    for _ in range(3):
        with trio.CancelScope() as scope:
            async def cancel_when_received(scope: trio.CancelScope = scope) -> None:
                await server.wait_for(lambda: server.open_connections == 1 and
                                      server.requests > server.eof_while_waiting)
                scope.cancel()

            nursery.start_soon(cancel_when_received)
            await client.post_json("/x", b"{}")
        await server.wait_for(lambda: server.open_connections == 0)
        assert client.connections_in_use == 0 and client.idle_connections == 0
    assert server.eof_while_waiting == 3
    answer = True
    assert await client.post_json("/x", b"{}") == {"ok": 1}


async def test_connections_are_bounded(nursery: trio.Nursery) -> None:
    release = trio.Event()
    server = RawServer(lambda _: with_length({"ok": 1}), gate=release)
    client = pool(await serve(nursery, server), max_connections=2)
    results: list[Any] = []

    async def call() -> None:
        results.append(await client.post_json("/x", b"{}"))

    async with trio.open_nursery() as calls:
        for _ in range(6):
            calls.start_soon(call)
        await server.wait_for(lambda: server.requests == 2)
        assert client.connections_in_use == 2
        release.set()
    assert results == [{"ok": 1}] * 6
    assert server.max_open == 2 and server.connections == 2


def test_only_plain_http_urls() -> None:
    with pytest.raises(ValueError):
        Http11Pool("https://example.com", max_connections=1, max_reply_bytes=10)
