"""The simulator's lean trio HTTP server, on real loopback sockets."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from contextlib import asynccontextmanager
from functools import partial
from typing import Any

import h11
import httpx
import pytest
import trio
from sim_helpers import open_raw_stream, wait_until

from pixiu_kv.sim import EngineConfig, SimEngine, open_fleet, serve_engine
from pixiu_kv.sim._http_server import _CAN_WATCH, CANCEL_ON_DISCONNECT, AsgiApp, HttpServerConfig, serve_asgi
from pixiu_kv.sim.controller import ControllerEmulator

Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]


@asynccontextmanager
async def served(app: AsgiApp, **options: Any) -> AsyncIterator[str]:
    stop = trio.Event()
    async with trio.open_nursery() as nursery:
        config = HttpServerConfig(**options)
        urls: list[str] = await nursery.start(partial(serve_asgi, app, config, shutdown_trigger=stop.wait))
        try:
            yield urls[0]
        finally:
            stop.set()


async def connect(url: str) -> trio.SocketStream:
    host, port = url.removeprefix("http://").rsplit(":", 1)
    return await trio.open_tcp_stream(host, int(port))


class RawClient:
    """A socket plus an h11 client parser: exact control over what goes on the wire."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.h11 = self._parser()

    @staticmethod
    def _parser() -> h11.Connection:
        # Requests are written raw; the parser is told of one so that it expects a response.
        parser = h11.Connection(h11.CLIENT)
        parser.send(h11.Request(method="GET", target="/", headers=[("host", "x")]))
        parser.send(h11.EndOfMessage())
        return parser

    async def response(self) -> tuple[h11.Response, bytes]:
        """The next complete response; raises on a cut body or a closed socket."""
        head: h11.Response | None = None
        body = b""
        while True:
            event = self.h11.next_event()
            if event is h11.NEED_DATA:
                self.h11.receive_data(await self.stream.receive_some(65536))
            elif type(event) is h11.Response:
                head = event
            elif type(event) is h11.Data:
                body += bytes(event.data)
            elif type(event) is h11.EndOfMessage:
                assert head is not None
                leftover = self.h11.trailing_data[0]
                self.h11 = self._parser()
                if leftover:  # an empty receive_data would mean EOF
                    self.h11.receive_data(leftover)
                return head, body
            else:
                raise AssertionError(f"unexpected {event!r}")

    async def closed_by_server(self) -> bool:
        """Read until the server closes: True on EOF (or reset) with no more bytes."""
        try:
            return await self.stream.receive_some(65536) == b""
        except trio.BrokenResourceError:
            return True


def header(response: h11.Response, name: bytes) -> bytes | None:
    return dict(response.headers).get(name)


async def reply(send: Send, body: bytes, status: int = 200) -> None:
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"text/plain"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


async def test_unary_replies_reuse_one_connection() -> None:
    clients: list[Any] = []

    async def app(scope: Message, receive: Receive, send: Send) -> None:
        clients.append(scope["client"])
        message = await receive()
        await reply(send, scope["method"].encode() + b" " + scope["path"].encode() + b"?"
                    + scope["query_string"] + b" " + message["body"])

    limits = httpx.Limits(max_connections=1, max_keepalive_connections=1)
    async with served(app) as url, httpx.AsyncClient(base_url=url, timeout=10, limits=limits) as http:
        for index in range(5):
            got = await http.post(f"/a%20b?x={index}", content=b"payload")
            assert got.status_code == 200
            assert got.text == f"POST /a b?x={index} payload"
            assert got.headers["content-length"] == str(len(got.content))
    assert len(clients) == 5 and len(set(clients)) == 1


async def test_request_body_arrives_in_parts_with_more_body() -> None:
    messages: list[Message] = []
    first_part_seen = trio.Event()

    async def app(scope: Message, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            messages.append(message)
            first_part_seen.set()
            if not message["more_body"]:
                break
        await reply(send, b"".join(m["body"] for m in messages))

    async with served(app) as url:
        client = RawClient(await connect(url))
        async with client.stream:
            head = b"POST /upload HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\n"
            await client.stream.send_all(head + b"5\r\nhello\r\n")
            await first_part_seen.wait()
            await client.stream.send_all(b"6\r\n world\r\n0\r\n\r\n")
            response, body = await client.response()
    assert response.status_code == 200 and body == b"hello world"
    assert messages[0] == {"type": "http.request", "body": b"hello", "more_body": True}
    assert messages[-1]["more_body"] is False
    assert b"".join(m["body"] for m in messages) == b"hello world"


async def test_streamed_response_sends_headers_at_once_and_chunks_in_order() -> None:
    release = trio.Event()

    async def app(scope: Message, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"text/event-stream")]})
        await release.wait()  # headers must already be on the wire
        for index in range(3):
            await send({"type": "http.response.body", "body": b"data: %d\n\n" % index, "more_body": True})
        await send({"type": "http.response.body", "body": b"data: [DONE]\n\n", "more_body": False})

    async with served(app) as url, httpx.AsyncClient(timeout=10) as http:
        async with http.stream("GET", url + "/events") as response:
            assert response.status_code == 200
            assert response.headers["transfer-encoding"] == "chunked"
            release.set()
            body = b"".join([part async for part in response.aiter_raw()])
    assert body == b"data: 0\n\ndata: 1\n\ndata: 2\n\ndata: [DONE]\n\n"


async def test_disconnect_is_delivered_after_a_completed_response() -> None:
    after: list[Message] = []

    async def app(scope: Message, receive: Receive, send: Send) -> None:
        await receive()
        await reply(send, b"ok")
        after.append(await receive())

    async with served(app) as url, httpx.AsyncClient(timeout=10) as http:
        assert (await http.get(url + "/")).text == "ok"
        assert (await http.get(url + "/")).text == "ok"
    assert after == [{"type": "http.disconnect"}] * 2


async def test_disconnect_is_delivered_when_the_peer_closes_mid_stream() -> None:
    disconnected = trio.Event()
    writes_after_disconnect: list[int] = []

    async def app(scope: Message, receive: Receive, send: Send) -> None:
        assert (await receive())["more_body"] is False
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"first", "more_body": True})
        assert await receive() == {"type": "http.disconnect"}
        disconnected.set()
        # Writing to a closed peer is swallowed, as in hypercorn.
        await send({"type": "http.response.body", "body": b"late", "more_body": True})
        writes_after_disconnect.append(1)

    async with served(app) as url:
        client = RawClient(await connect(url))
        await client.stream.send_all(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n")
        received = b""
        while b"first" not in received:
            received += await client.stream.receive_some(65536)
        await client.stream.aclose()
        await disconnected.wait()
    assert writes_after_disconnect == [1]


async def test_an_app_that_returns_mid_body_cuts_the_connection() -> None:
    async def app(scope: Message, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"10")]})
        await send({"type": "http.response.body", "body": b"12345", "more_body": True})

    async with served(app) as url, httpx.AsyncClient(timeout=10) as http:
        with pytest.raises(httpx.RemoteProtocolError):
            await http.get(url + "/")


@pytest.mark.parametrize(("raw", "status"), [
    (b"HELLO\r\n\r\n", 400),
    (b"GET / HTTP/2.0\r\nhost: x\r\n\r\n", 400),
    (b"GET / HTTP/1.1\r\n\r\n", 400),  # no Host
    (b"GET / HTTP/1.1\r\nhost : x\r\n\r\n", 400),
    (b"POST / HTTP/1.1\r\nhost: x\r\ncontent-length: nope\r\n\r\n", 400),
    (b"POST / HTTP/1.1\r\nhost: x\r\ntransfer-encoding: gzip\r\n\r\nxx", 501),
    (b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", 400),  # an HTTP/2 preface, as some routers probe
])
async def test_a_malformed_request_gets_its_status_and_the_server_keeps_serving(
        raw: bytes, status: int) -> None:
    calls: list[str] = []

    async def app(scope: Message, receive: Receive, send: Send) -> None:
        calls.append(scope["path"])
        await reply(send, b"fine")

    async with served(app) as url:
        client = RawClient(await connect(url))
        async with client.stream:
            await client.stream.send_all(raw)
            response, body = await client.response()
            assert response.status_code == status
            assert header(response, b"connection") == b"close" and body.startswith(b'{"detail":')
            assert await client.closed_by_server()
        async with httpx.AsyncClient(timeout=10) as http:
            assert (await http.get(url + "/ok")).text == "fine"
    assert calls == ["/ok"]


async def test_oversized_headers_get_431_and_the_server_keeps_serving() -> None:
    async def app(scope: Message, receive: Receive, send: Send) -> None:
        await reply(send, b"fine")

    async with served(app, max_header_bytes=1024) as url:
        client = RawClient(await connect(url))
        async with client.stream:
            await client.stream.send_all(b"GET / HTTP/1.1\r\nhost: x\r\nx-big: " + b"a" * 4096 + b"\r\n\r\n")
            response, _ = await client.response()
            assert response.status_code == 431
            assert await client.closed_by_server()
        async with httpx.AsyncClient(timeout=10) as http:
            assert (await http.get(url + "/")).text == "fine"


async def test_declared_body_over_the_limit_gets_413() -> None:
    calls: list[str] = []

    async def app(scope: Message, receive: Receive, send: Send) -> None:
        calls.append(scope["path"])
        await reply(send, b"fine")

    async with served(app, max_body_bytes=100) as url, httpx.AsyncClient(timeout=10) as http:
        too_big = await http.post(url + "/big", content=b"x" * 101)
        assert too_big.status_code == 413
        assert too_big.json() == {"detail": "Request Entity Too Large"}
        assert (await http.post(url + "/small", content=b"x" * 100)).text == "fine"
    assert calls == ["/small"]


async def test_app_failure_before_a_response_is_a_500() -> None:
    async def app(scope: Message, receive: Receive, send: Send) -> None:
        if scope["path"] == "/boom":
            raise RuntimeError("simulated bug")
        await reply(send, b"fine")

    async with served(app) as url, httpx.AsyncClient(timeout=10) as http:
        assert (await http.get(url + "/boom")).status_code == 500
        assert (await http.get(url + "/")).text == "fine"


async def test_unread_request_body_is_drained_and_the_connection_kept() -> None:
    async def app(scope: Message, receive: Receive, send: Send) -> None:
        await reply(send, b"ignored your body")

    async with served(app) as url:
        client = RawClient(await connect(url))
        async with client.stream:
            for _ in range(2):
                await client.stream.send_all(b"POST / HTTP/1.1\r\nhost: x\r\ncontent-length: 3\r\n\r\nabc")
                response, body = await client.response()
                assert response.status_code == 200 and body == b"ignored your body"
                assert header(response, b"connection") is None


async def test_pipelined_requests_are_answered_in_order() -> None:
    async def app(scope: Message, receive: Receive, send: Send) -> None:
        await reply(send, scope["path"].encode())

    async with served(app) as url:
        client = RawClient(await connect(url))
        async with client.stream:
            await client.stream.send_all(b"".join(
                b"GET /%d HTTP/1.1\r\nhost: x\r\n\r\n" % index for index in range(3)))
            bodies = [(await client.response())[1] for _ in range(3)]
    assert bodies == [b"/0", b"/1", b"/2"]


async def test_head_response_has_no_body() -> None:
    async def app(scope: Message, receive: Receive, send: Send) -> None:
        await reply(send, b"a body")

    async with served(app) as url, httpx.AsyncClient(timeout=10) as http:
        response = await http.head(url + "/")
        assert response.status_code == 200 and response.content == b""
        assert (await http.get(url + "/")).text == "a body"


async def test_request_limit_per_connection_closes_after_the_last() -> None:
    async def app(scope: Message, receive: Receive, send: Send) -> None:
        await reply(send, b"ok")

    async with served(app, max_requests_per_connection=2) as url:
        client = RawClient(await connect(url))
        async with client.stream:
            await client.stream.send_all(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n")
            first, _ = await client.response()
            assert header(first, b"connection") is None
            await client.stream.send_all(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n")
            second, _ = await client.response()
            assert header(second, b"connection") == b"close"
            assert await client.closed_by_server()


async def test_idle_connection_is_closed_after_the_keep_alive_timeout() -> None:
    async def app(scope: Message, receive: Receive, send: Send) -> None:
        await reply(send, b"ok")

    async with served(app, keep_alive_timeout=0.2) as url:
        client = RawClient(await connect(url))
        async with client.stream:
            await client.stream.send_all(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n")
            assert (await client.response())[1] == b"ok"
            with trio.fail_after(10):
                assert await client.closed_by_server()


async def test_connections_beyond_the_limit_wait_for_a_free_slot() -> None:
    async def app(scope: Message, receive: Receive, send: Send) -> None:
        await reply(send, scope["path"].encode())

    async with served(app, max_connections=1) as url:
        first = RawClient(await connect(url))
        await first.stream.send_all(b"GET /first HTTP/1.1\r\nhost: x\r\n\r\n")
        assert (await first.response())[1] == b"/first"
        second = RawClient(await connect(url))  # the kernel's backlog completes the handshake
        async with second.stream:
            await second.stream.send_all(b"GET /second HTTP/1.1\r\nhost: x\r\n\r\n")
            # While the first (idle, keep-alive) connection holds the only slot, nothing is answered.
            with trio.move_on_after(0.3) as wait:
                await second.response()
            assert wait.cancelled_caught
            await first.stream.aclose()
            with trio.fail_after(10):
                assert (await second.response())[1] == b"/second"


async def test_shutdown_lets_a_running_stream_finish_then_refuses_connections() -> None:
    streaming = trio.Event()
    finish = trio.Event()

    async def app(scope: Message, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"start ", "more_body": True})
        streaming.set()
        await finish.wait()
        await send({"type": "http.response.body", "body": b"end", "more_body": False})

    stop = trio.Event()
    async with trio.open_nursery() as nursery:
        config = HttpServerConfig(graceful_timeout=30.0)
        urls: list[str] = await nursery.start(partial(serve_asgi, app, config, shutdown_trigger=stop.wait))
        client = RawClient(await connect(urls[0]))
        async with client.stream:
            await client.stream.send_all(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n")
            await streaming.wait()
            stop.set()
            finish.set()
            response, body = await client.response()
            assert response.status_code == 200 and body == b"start end"
            assert await client.closed_by_server()
    with pytest.raises(OSError):
        await connect(urls[0])


async def test_cancelling_the_server_closes_open_streams() -> None:
    streaming = trio.Event()

    async def app(scope: Message, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"start", "more_body": True})
        streaming.set()
        await trio.sleep_forever()

    async with trio.open_nursery() as nursery:
        urls: list[str] = await nursery.start(serve_asgi, app)
        client = RawClient(await connect(urls[0]))
        async with client.stream:
            await client.stream.send_all(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n")
            await streaming.wait()
            nursery.cancel_scope.cancel()
            with trio.fail_after(10), pytest.raises(h11.RemoteProtocolError):
                await client.response()


async def test_serves_the_controller_emulator_app() -> None:
    emulator = ControllerEmulator()
    async with served(emulator.app) as url, httpx.AsyncClient(timeout=10) as http:
        lookup = await http.post(url + "/lookup", json={"tokens": list(range(600))})
        assert lookup.status_code == 200
        assert lookup.json()["layout_info"] == {}


CONFIG = EngineConfig(speed=1000.0, gpu_kv_tokens=16384, cpu_tier_tokens=8192, max_model_len=8192)


@pytest.mark.parametrize("server", ["lean", "hypercorn"])
async def test_engine_answers_the_same_on_both_servers(server: str) -> None:
    engine = SimEngine(CONFIG)
    async with serve_engine(engine, server=server) as url, httpx.AsyncClient(timeout=10) as http:  # type: ignore[arg-type]
        unary = await http.post(url + "/v1/completions", json={"prompt": "hello there", "max_tokens": 4})
        assert unary.status_code == 200
        assert unary.json()["usage"]["completion_tokens"] == 4
        events = []
        async with http.stream("POST", url + "/v1/completions",
                               json={"prompt": "hello there", "max_tokens": 4, "stream": True}) as stream:
            async for line in stream.aiter_lines():
                if line.startswith("data: "):
                    events.append(line)
        assert len(events) == 5 and events[-1] == "data: [DONE]"
        assert (await http.get(url + "/nope")).status_code == 404
        wrong = await http.get(url + "/v1/completions")
        assert wrong.status_code == 405 and wrong.headers["allow"] == "POST"
    assert engine.in_flight == 0


async def test_engine_request_is_cancelled_when_its_client_goes_away() -> None:
    engine = SimEngine(EngineConfig(speed=1.0, gpu_kv_tokens=16384, max_model_len=8192))
    async with serve_engine(engine, server="lean") as url:
        stream = await open_raw_stream(url, "/v1/completions",
                                       {"prompt": "hello there", "max_tokens": 1000, "stream": True})
        received = b""
        while b"data: " not in received:
            received += await stream.receive_some(65536)
        assert engine.scheduler.running == 1
        await stream.aclose()
        await wait_until(lambda: engine.in_flight == 0)
    assert engine.scheduler.running == 0


@pytest.mark.skipif(not _CAN_WATCH, reason="the server offers the extension only with epoll (Linux)")
async def test_an_app_that_asks_is_cancelled_when_its_client_goes_away() -> None:
    cancelled: list[str] = []
    waiting = trio.Event()

    async def app(scope: Message, receive: Receive, send: Send) -> None:
        await receive()
        if scope["path"] == "/watched":
            scope["extensions"][CANCEL_ON_DISCONNECT]()
        try:
            waiting.set()
            await trio.sleep_forever()
        except trio.Cancelled:
            cancelled.append(scope["path"])
            raise

    async with served(app) as url:
        client = RawClient(await connect(url))
        await client.stream.send_all(b"GET /watched HTTP/1.1\r\nhost: x\r\n\r\n")
        await waiting.wait()
        await client.stream.aclose()
        await wait_until(lambda: cancelled == ["/watched"])


async def test_an_unwatched_app_keeps_running_after_its_client_goes() -> None:
    finished: list[Message] = []

    async def app(scope: Message, receive: Receive, send: Send) -> None:
        await receive()
        # No extension call: the app hears of the client only through receive().
        finished.append(await receive())

    async with served(app) as url:
        client = RawClient(await connect(url))
        await client.stream.send_all(b"GET /plain HTTP/1.1\r\nhost: x\r\n\r\n")
        await client.stream.aclose()
        await wait_until(lambda: finished == [{"type": "http.disconnect"}])


async def test_a_unary_engine_request_is_aborted_when_its_client_goes_away() -> None:
    engine = SimEngine(EngineConfig(speed=1.0, gpu_kv_tokens=16384, max_model_len=8192))
    async with serve_engine(engine, server="lean") as url:
        stream = await open_raw_stream(url, "/v1/completions", {"prompt": "hello there", "max_tokens": 2000})
        await wait_until(lambda: engine.scheduler.running == 1)
        await stream.aclose()
        await wait_until(lambda: engine.in_flight == 0)
    assert engine.scheduler.running == 0
    assert engine.metrics.requests_aborted == 1


async def test_unknown_server_kind_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown server"):
        async with open_fleet(1, CONFIG, controller=False, server="nginx"):  # type: ignore[arg-type]
            pass
