"""A client that goes away must cost nothing: no upstream request or connection survives it.

Counts are taken on the engine's side (requests still in its handler, TCP connections still
established to its port), at every phase a client can leave in.
"""

from __future__ import annotations

import json

import httpx
import pytest
import trio
from gateway_support import EngineFactory, FakeEngine, client, gateway_config, wait_until

from pixiu_kv.app import open_gateway
from pixiu_kv.context import RequestContext


async def _open(url: str) -> trio.SocketStream:
    host, port = url.removeprefix("http://").rsplit(":", 1)
    return await trio.open_tcp_stream(host, int(port))


def _request(body: bytes, mode: str, *, declared_length: int | None = None) -> bytes:
    length = len(body) if declared_length is None else declared_length
    return (b"POST /v1/completions HTTP/1.1\r\nhost: gw\r\ncontent-type: application/json\r\n"
            + f"x-test-mode: {mode}\r\ncontent-length: {length}\r\n\r\n".encode() + body)


async def _read_until(stream: trio.SocketStream, marker: bytes) -> bytes:
    data = b""
    with trio.fail_after(10):
        while marker not in data:
            chunk = await stream.receive_some(65536)
            assert chunk, "connection closed early"
            data += chunk
    return data


class BackgroundProbe:
    """A decode filter that starts background work and records how it ended."""

    def __init__(self) -> None:
        self.cancelled = 0
        self.completed = 0

    async def decode(self, ctx: RequestContext) -> None:
        await ctx.background.start_soon(self._work)

    async def _work(self) -> None:
        try:
            await trio.sleep(0.05)
            self.completed += 1
        except trio.Cancelled:
            self.cancelled += 1
            raise


async def _all_closed(engine: FakeEngine) -> None:
    await wait_until(lambda: engine.open_requests == 0 and engine.established_connections() == 0)


@pytest.mark.parametrize("phase", ["before-headers", "after-headers", "mid-stream"])
async def test_disconnect_closes_the_upstream_at_every_phase(start_engine: EngineFactory, phase: str) -> None:
    engine = await start_engine("e1")
    probe = BackgroundProbe()
    mode = {"before-headers": "hang-headers", "after-headers": "hang-body", "mid-stream": "endless"}[phase]
    body = json.dumps({"prompt": "p", "stream": True}).encode()
    async with open_gateway(gateway_config([engine]), decode_filters=[probe]) as gw:
        for _ in range(3):  # repeated, so a slowly leaking pool would show
            stream = await _open(gw.url)
            await stream.send_all(_request(body, mode))
            if phase == "before-headers":
                await wait_until(lambda: engine.open_requests == 1)
            elif phase == "after-headers":
                await _read_until(stream, b"\r\n\r\n")
            else:
                await _read_until(stream, b'"t3"')
            await stream.aclose()
            await _all_closed(engine)
        # Background work of requests whose client left is cancelled, not left running.
        await wait_until(lambda: probe.cancelled == 3)
        assert probe.completed == 0
        # And the gateway still serves.
        async with client(gw.url) as http:
            r = await http.post("/v1/completions", json={"prompt": "p"})
            assert r.status_code == 200
        await wait_until(lambda: probe.completed == 1)


async def test_disconnect_during_the_body_never_reaches_the_engine(start_engine: EngineFactory) -> None:
    engine = await start_engine("e1")
    async with open_gateway(gateway_config([engine])) as gw:
        stream = await _open(gw.url)
        await stream.send_all(_request(b'{"prompt": "p', "", declared_length=100))
        await trio.testing.wait_all_tasks_blocked()
        await stream.aclose()
        async with client(gw.url) as http:
            assert (await http.post("/v1/completions", json={"prompt": "p"})).status_code == 200
    assert engine.completions == 1


async def test_completed_responses_let_background_work_finish(start_engine: EngineFactory) -> None:
    engine = await start_engine("e1")
    probe = BackgroundProbe()
    async with open_gateway(gateway_config([engine]), decode_filters=[probe]) as gw, client(gw.url) as http:
        for i in range(3):
            r = await http.post("/v1/completions", json={"prompt": str(i), "stream": i == 1})
            assert r.status_code == 200
        # The disconnect the server reports after a completed response cancels nothing.
        await wait_until(lambda: probe.completed == 3)
        assert probe.cancelled == 0


async def test_completed_requests_leave_only_reusable_connections(start_engine: EngineFactory) -> None:
    engine = await start_engine("e1")
    async with open_gateway(gateway_config([engine])) as gw, client(gw.url) as http:
        for i in range(20):
            r = await http.post("/v1/completions", json={"prompt": str(i), "stream": i % 2 == 0})
            assert r.status_code == 200
        # Sequential requests reuse one kept-alive upstream connection.
        assert engine.established_connections() == 1
    await _all_closed(engine)


class SlowBackground:
    """Background work longer than the grace the filter declares for it."""

    def __init__(self) -> None:
        self.cancelled = trio.Event()

    async def decode(self, ctx: RequestContext) -> None:
        ctx.values["background_grace"] = 0.05
        await ctx.background.start_soon(self._work)

    async def _work(self) -> None:
        try:
            await trio.sleep_forever()
        finally:
            self.cancelled.set()


async def test_background_work_is_cancelled_after_its_grace(start_engine: EngineFactory) -> None:
    engine = await start_engine("e1")
    probe = SlowBackground()
    async with open_gateway(gateway_config([engine]), decode_filters=[probe]) as gw, client(gw.url) as http:
        assert (await http.post("/v1/completions", json={"prompt": "p"})).status_code == 200
        with trio.fail_after(10):
            await probe.cancelled.wait()


async def test_many_concurrent_streams_with_some_clients_leaving(start_engine: EngineFactory) -> None:
    """200 streams at once over two engines, every tenth client leaving after its first event:
    the others complete, and nothing stays open on either engine."""
    engines = [await start_engine("e0"), await start_engine("e1")]
    for engine in engines:
        engine.stream_chunks = 5
    streams, completed, left = 200, [], []
    async with open_gateway(gateway_config(engines)) as gw, \
            client(gw.url, limits=httpx.Limits(max_connections=streams)) as http:

        body = json.dumps({"prompt": "p", "stream": True}).encode()

        async def one(i: int) -> None:
            if i % 10 == 0:
                stream = await _open(gw.url)
                await stream.send_all(_request(body, "slow-0.02"))
                await _read_until(stream, b"data: {")
                await stream.aclose()  # gone after the first event
                left.append(i)
                return
            async with http.stream("POST", "/v1/completions", json={"prompt": str(i), "stream": True},
                                   headers={"x-test-mode": "slow-0.02"}) as r:
                assert r.status_code == 200
                lines = [line async for line in r.aiter_lines()]
            if "data: [DONE]" in lines:
                completed.append(i)

        with trio.fail_after(60):
            async with trio.open_nursery() as nursery:
                for i in range(streams):
                    nursery.start_soon(one, i)
        assert len(completed) == streams - streams // 10 and len(left) == streams // 10
        runtime = gw.app.runtime
        assert runtime is not None
        endpoints = runtime.clusters["main"].endpoints
        await wait_until(lambda: all(e.open_requests == 0 for e in engines)
                         and all(e.in_flight == 0 for e in endpoints))
    for engine in engines:
        await _all_closed(engine)
