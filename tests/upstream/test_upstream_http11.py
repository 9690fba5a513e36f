"""The upstream HTTP/1.1 client against a raw TCP server: framing, keep-alive, idle checks,
stale connections, error classes, the bound per origin, deadlines, streaming, cancellation
and TLS."""

from __future__ import annotations

import json
import shutil
import ssl
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trio
from http11_raw_server import CLOSE, HOLD, RawServer, Request, serve, with_length

from pixiu_kv.upstream import Http11Pool, UpstreamConnectError, UpstreamResponse
from pixiu_kv.upstream.resilience import MalformedReply, UpstreamRejected, UpstreamUnavailable

_POOLS: list[Http11Pool] = []


def pool(url: str, max_connections: int = 4, max_reply_bytes: int = 1 << 20, **kwargs: Any) -> Http11Pool:
    settings: dict[str, Any] = {"connect_timeout": 10.0, "write_timeout": 10.0, **kwargs}
    made = Http11Pool(url, max_connections=max_connections, max_reply_bytes=max_reply_bytes, **settings)
    _POOLS.append(made)
    return made


@pytest.fixture(autouse=True)
def close_pools() -> Iterator[None]:
    yield
    while _POOLS:
        _POOLS.pop().close()


def ok(_: Request) -> bytes:
    return with_length({"ok": 1})


# -- framing and keep-alive ------------------------------------------------------------------

async def test_content_length_replies_reuse_one_connection(nursery: trio.Nursery) -> None:
    server = RawServer(lambda r: with_length({"echo": json.loads(r.body)}))
    client = pool(await serve(nursery, server))
    for i in range(5):
        assert await client.post_json("/lookup", json.dumps({"i": i}).encode()) == {"echo": {"i": i}}
    assert (server.connections, server.requests) == (1, 5)
    assert client.idle_connections == 1 and client.connections_in_use == 0


async def test_chunked_reply_with_extensions_and_trailers(nursery: trio.Nursery) -> None:
    raw = (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
           b"4;ext=1\r\n{\"a\"\r\n6\r\n: [1, \r\n3\r\n2]}\r\n0\r\nX-Trailer: t\r\n\r\n")
    server = RawServer(lambda _: raw)
    client = pool(await serve(nursery, server))
    assert await client.post_json("/x", b"{}") == {"a": [1, 2]}
    assert await client.post_json("/x", b"{}") == {"a": [1, 2]}
    assert server.connections == 1


async def test_close_delimited_and_connection_close_replies_are_not_kept(nursery: trio.Nursery) -> None:
    server = RawServer(lambda _: b'HTTP/1.0 200 OK\r\n\r\n{"ok": true}', close_after_reply=True)
    client = pool(await serve(nursery, server))
    assert await client.post_json("/x", b"{}") == {"ok": True}
    assert await client.post_json("/x", b"{}") == {"ok": True}
    assert server.connections == 2 and client.idle_connections == 0
    closing = RawServer(lambda _: with_length({"ok": 1}, extra="Connection: close\r\n"))
    client = pool(await serve(nursery, closing))
    await client.post_json("/x", b"{}")
    assert client.idle_connections == 0
    await closing.wait_for(lambda: closing.open_connections == 0)


async def test_base_path_and_host_header(nursery: trio.Nursery) -> None:
    heads: list[bytes] = []

    async def handler(stream: trio.SocketStream) -> None:
        data = b""
        while b"\r\n\r\n{}" not in data:
            data += await stream.receive_some(65536)
        heads.append(data)
        await stream.send_all(with_length({"ok": 1}))

    url = await serve(nursery, RawServer(ok), handler)
    assert await pool(url + "/prefix/").post_json("/lookup", b"{}") == {"ok": 1}
    head = heads[0].lower()
    assert head.startswith(b"post /prefix/lookup http/1.1\r\n")
    assert b"host: " + url.removeprefix("http://").encode() + b"\r\n" in head
    assert b"content-type: application/json\r\n" in head and b"content-length: 2\r\n" in head


async def test_keepalive_expiry(nursery: trio.Nursery) -> None:
    server = RawServer(ok)
    url = await serve(nursery, server)
    expiring = pool(url, keepalive_expiry=0.0)
    for _ in range(3):
        assert await expiring.post_json("/x", b"{}") == {"ok": 1}
    # Every idle connection had expired by the next call: closed, and a new one opened.
    assert server.connections == 3
    await server.wait_for(lambda: server.open_connections == 1)


# -- stale connections -----------------------------------------------------------------------

async def test_idle_connection_the_server_closed_is_not_used(nursery: trio.Nursery) -> None:
    # The server closes every connection after its reply without saying so.
    server = RawServer(ok, close_after_reply=True)
    client = pool(await serve(nursery, server))
    for _ in range(3):
        assert await client.post_json("/x", b"{}") == {"ok": 1}
        await server.wait_for(lambda: server.open_connections == 0)
    assert server.requests == 3 and server.connections == 3


async def test_idle_connection_with_unsolicited_bytes_is_not_used(nursery: trio.Nursery) -> None:
    """A server may write on an idle connection (a 408 before closing it): had the next
    request been sent there, it would have read that as its reply."""
    unsolicited = trio.Event()
    server = RawServer(ok)

    async def handler(stream: trio.SocketStream) -> None:
        if server.connections == 0:
            server.connections += 1
            await stream.receive_some(65536)
            await stream.send_all(with_length({"ok": 1}))
            await unsolicited.wait()
            await stream.send_all(_TIMEOUT_408)
            await trio.sleep_forever()
        await server.handle(stream)

    client = pool(await serve(nursery, server, handler))
    assert await client.post_json("/x", b"{}") == {"ok": 1}
    unsolicited.set()
    with trio.fail_after(10):  # until the 408 is readable on the idle connection
        while client._idle[0].stream.usable_when_idle():  # noqa: ASYNC110 - no event announces it
            await trio.sleep(0.001)
    assert await client.post_json("/x", b"{}") == {"ok": 1}
    assert server.connections == 2


async def test_bytes_after_a_reply_in_the_same_read_end_the_connection(nursery: trio.Nursery) -> None:
    server = RawServer(lambda _: with_length({"ok": 1}) + _TIMEOUT_408)  # one write
    client = pool(await serve(nursery, server))
    assert await client.post_json("/x", b"{}") == {"ok": 1}
    assert client.idle_connections == 0
    assert await client.post_json("/x", b"{}") == {"ok": 1}
    assert server.connections == 2


_TIMEOUT_408 = b"HTTP/1.1 408 Request Timeout\r\nContent-Length: 0\r\n\r\n"


async def test_reused_connection_closed_before_any_reply_byte_is_retried_once(nursery: trio.Nursery) -> None:
    # The second request on a connection is read and dropped: the connection looked idle
    # and open when it was taken, so only the missing reply tells.
    server = RawServer(lambda r: CLOSE if r.index == 1 else with_length({"ok": r.connection}))
    client = pool(await serve(nursery, server))
    assert await client.post_json("/x", b"{}") == {"ok": 1}
    assert await client.post_json("/x", b"{}") == {"ok": 2}
    assert (server.connections, server.requests) == (2, 3)


async def test_no_retry_once_a_reply_byte_arrived(nursery: trio.Nursery) -> None:
    # The request may have been acted upon: it is never sent twice.
    server = RawServer(lambda r: with_length({"ok": 1}) if r.index == 0 else b"HTTP/1.1 200 OK\r\nContent-Le",
                       close_after_reply=lambda r: r.index == 1)
    client = pool(await serve(nursery, server))
    assert await client.post_json("/x", b"{}") == {"ok": 1}
    with pytest.raises(UpstreamUnavailable):
        await client.post_json("/x", b"{}")
    assert (server.connections, server.requests) == (1, 2)
    assert client.connections_in_use == 0 and client.idle_connections == 0


async def test_a_fresh_connection_closed_before_the_reply_is_an_error(nursery: trio.Nursery) -> None:
    server = RawServer(lambda _: CLOSE)
    client = pool(await serve(nursery, server))
    with pytest.raises(UpstreamUnavailable):
        await client.post_json("/x", b"{}")
    assert server.requests == 1 and client.connections_in_use == 0


# -- failures --------------------------------------------------------------------------------

@pytest.mark.parametrize(("reply", "error"), [
    (with_length({"detail": "x"}, "503 Service Unavailable"), UpstreamUnavailable),
    (with_length({"detail": "x"}, "429 Too Many Requests"), UpstreamUnavailable),
    (with_length({"detail": "x"}, "404 Not Found"), UpstreamRejected),
    (b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello", MalformedReply),
    (b"SMTP ready\r\n\r\n", MalformedReply),
    (b"HTTP/1.1 200 OK\r\nContent-Length: nope\r\n\r\n", MalformedReply),
    (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", MalformedReply),
    (with_length("x" * 2000), MalformedReply),  # larger than the limit, by its length
    (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"  # larger, chunked
     + b"200\r\n" + b"x" * 512 + b"\r\n" + b"200\r\n" + b"x" * 512 + b"\r\n0\r\n\r\n", MalformedReply),
    (b"HTTP/1.1 204 No Content\r\n\r\n", MalformedReply),  # keep-alive, no body: not an answer
], ids=["503", "429", "404", "not-json", "not-http", "bad-length", "bad-chunk", "too-large",
        "too-large-chunked", "204"])
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
    with pytest.raises(UpstreamUnavailable, match="inside the reply body"):
        await client.post_json("/x", b"{}")
    with trio.socket.socket() as s:
        await s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    refused = pool(f"http://127.0.0.1:{port}")
    with pytest.raises(UpstreamConnectError):
        await refused.post_json("/x", b"{}")
    assert refused.connections_in_use == 0


def test_only_http_and_https_urls() -> None:
    for url in ("ftp://example.com", "example.com:80", "http://"):
        with pytest.raises(ValueError):
            Http11Pool(url, max_connections=1, connect_timeout=1.0, write_timeout=1.0)


# -- bounds and cancellation ---------------------------------------------------------------------

async def test_connections_are_bounded_per_origin(nursery: trio.Nursery) -> None:
    release = trio.Event()
    server = RawServer(ok, gate=release)
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


async def test_cancellation_closes_the_connection_and_frees_the_slot(nursery: trio.Nursery) -> None:
    answer = False
    server = RawServer(lambda _: with_length({"ok": 1}) if answer else HOLD)
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


# -- deadlines -------------------------------------------------------------------------------------

async def test_read_timeout(nursery: trio.Nursery) -> None:
    server = RawServer(lambda _: HOLD)
    client = pool(await serve(nursery, server), read_timeout=0.05)
    with pytest.raises(UpstreamUnavailable):
        await client.post_json("/x", b"{}")
    await server.wait_for(lambda: server.eof_while_waiting == 1)
    assert client.connections_in_use == 0


async def test_write_timeout(nursery: trio.Nursery) -> None:
    accepted = trio.Event()

    async def never_reads(stream: trio.SocketStream) -> None:
        accepted.set()
        await trio.sleep_forever()

    url = await serve(nursery, RawServer(ok), never_reads)
    client = pool(url, write_timeout=0.05)
    with pytest.raises(UpstreamUnavailable, match="TooSlowError"):
        await client.post_json("/x", b"x" * (64 << 20))  # more than the socket buffers hold
    assert accepted.is_set() and client.connections_in_use == 0


async def test_connect_timeout_covers_the_tls_handshake(nursery: trio.Nursery) -> None:
    url = await serve(nursery, RawServer(lambda _: HOLD))  # accepts, never answers a handshake
    client = pool(url.replace("http:", "https:"), connect_timeout=0.05,
                  tls=ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT))
    with pytest.raises(UpstreamConnectError):
        await client.post_json("/x", b"{}")
    assert client.connections_in_use == 0


# -- streamed replies ------------------------------------------------------------------------------

_CHUNKED_HEAD = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"


def _chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


async def _stream(nursery: trio.Nursery,
                  pieces: list[bytes]) -> tuple[RawServer, Http11Pool, UpstreamResponse]:
    server = RawServer(lambda _: _CHUNKED_HEAD, gate=trio.Event(), stream=pieces)
    client = pool(await serve(nursery, server))
    response = await client.send(b"POST", b"/v1/completions", [(b"content-type", b"application/json")], b"{}")
    return server, client, response


async def test_streamed_reply_gives_each_piece_as_it_arrives(nursery: trio.Nursery) -> None:
    server, client, response = await _stream(nursery, [_chunk(b"data: 1\n\n"), _chunk(b"data: 2\n\n"),
                                                       b"0\r\n\r\n"])
    assert response.status == 200 and (b"content-type", b"text/event-stream") in response.headers
    try:
        for expected in (b"data: 1\n\n", b"data: 2\n\n"):
            assert server.gate is not None
            server.gate.set()
            assert await response.next_chunk() == expected
        server.gate.set()
        assert await response.next_chunk() is None
    finally:
        response.close()
    assert client.idle_connections == 1 and client.connections_in_use == 0


async def test_closing_a_stream_midway_leaves_no_connection_behind(nursery: trio.Nursery) -> None:
    server, client, response = await _stream(nursery, [_chunk(b"data: 1\n\n"), _chunk(b"data: 2\n\n")])
    assert server.gate is not None
    server.gate.set()
    assert await response.next_chunk() == b"data: 1\n\n"
    response.close()
    response.close()  # idempotent
    assert client.idle_connections == 0 and client.connections_in_use == 0
    await server.wait_for(lambda: server.open_connections == 0)


async def test_cancelled_stream_read_leaves_no_connection_behind(nursery: trio.Nursery) -> None:
    server, client, response = await _stream(nursery, [_chunk(b"data: 1\n\n")])
    with trio.move_on_after(0.05):  # the piece is never released: the read waits
        await response.next_chunk()
    assert client.connections_in_use == 0
    await server.wait_for(lambda: server.open_connections == 0)
    assert await response.next_chunk() is None  # closed: nothing more


async def test_a_break_midway_delivers_what_arrived_then_raises(nursery: trio.Nursery) -> None:
    server = RawServer(lambda _: _CHUNKED_HEAD + _chunk(b"data: 1\n\n"), close_after_reply=True)
    client = pool(await serve(nursery, server))
    response = await client.send(b"POST", b"/v1/completions", [], b"{}")
    pieces = [await response.next_chunk()]
    with pytest.raises(UpstreamUnavailable):
        while True:
            pieces.append(await response.next_chunk())
    assert pieces == [b"data: 1\n\n"]
    assert client.connections_in_use == 0 and client.idle_connections == 0


# -- TLS -------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("openssl is needed to make a test certificate")
    folder = tmp_path_factory.mktemp("tls")
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run([openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
                    "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True)
    return cert, key


async def test_tls_origin_verifies_and_reuses_connections(nursery: trio.Nursery,
                                                           certificate: tuple[Path, Path]) -> None:
    cert, key = certificate
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_context.load_cert_chain(cert, key)
    server = RawServer(lambda r: with_length({"n": r.index}))
    listeners = await nursery.start(trio.serve_ssl_over_tcp, server.handle, 0, server_context)
    port = listeners[0].transport_listener.socket.getsockname()[1]
    trusting = ssl.create_default_context(cafile=str(cert))
    client = pool(f"https://127.0.0.1:{port}", tls=trusting)
    assert [await client.post_json("/x", b"{}") for _ in range(3)] == [{"n": 0}, {"n": 1}, {"n": 2}]
    assert server.connections == 1 and client.idle_connections == 1
    untrusting = pool(f"https://127.0.0.1:{port}", tls=ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT))
    with pytest.raises(UpstreamConnectError):  # the certificate is not trusted
        await untrusting.post_json("/x", b"{}")
    client.close()  # here: closing a TLS connection needs the trio run
