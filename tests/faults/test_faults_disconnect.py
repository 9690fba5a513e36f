"""A client that goes away, in every phase of a request, leaves nothing behind: no request
in flight at the gateway or the engines, no background job, no upstream connection busy."""

from __future__ import annotations

import json
from urllib.parse import urlsplit

import httpx
import trio
from faults_support import (
    Stack,
    access_log,
    chat,
    open_stack,
    prompt,
    stream_chat,
    wait_until,
)

from pixiu_kv.sim.controller import Faults


async def read_first_event_and_leave(stack: Stack, body: dict[str, object]) -> bytes:
    """A raw HTTP/1.1 client: send a streamed request, read until the first SSE event, then
    close the connection (what a browser tab or a cancelled SDK call does)."""
    url = urlsplit(stack.url)
    payload = json.dumps(body).encode()
    conn = await trio.open_tcp_stream(url.hostname or "127.0.0.1", url.port or 80)
    try:
        await conn.send_all(b"POST /v1/chat/completions HTTP/1.1\r\nhost: gw\r\n"
                            b"content-type: application/json\r\n"
                            b"content-length: " + str(len(payload)).encode() + b"\r\n\r\n" + payload)
        received = b""
        with trio.fail_after(20):
            while b"\ndata: " not in received and not received.endswith(b"\n\ndata: "):
                chunk = await conn.receive_some(65536)
                if not chunk:
                    raise AssertionError("the connection closed before the first event")
                received += chunk
        return received
    finally:
        await conn.aclose()


def engine_requests(stack: Stack) -> int:
    return sum(e.engine.metrics.requests_finished + e.engine.metrics.requests_aborted
               for e in stack.fleet.engines)


async def test_disconnect_while_sending_the_body(stack: Stack) -> None:
    url = urlsplit(stack.url)
    before = engine_requests(stack)
    async with access_log() as log:
        conn = await trio.open_tcp_stream(url.hostname or "127.0.0.1", url.port or 80)
        await conn.send_all(b"POST /v1/chat/completions HTTP/1.1\r\nhost: gw\r\n"
                            b"content-type: application/json\r\ncontent-length: 100000\r\n\r\n"
                            b'{"model": "sim-llama-8b", "messages": [')
        await conn.aclose()
        await wait_until(lambda: len(log.records) == 1)
    assert log.records[0]["status"] == 499
    assert log.records[0]["completed"] is False
    assert engine_requests(stack) == before
    await wait_until(stack.idle)


async def cancel_when(condition: object, stack: Stack, body: dict[str, object]) -> None:
    """Start a streamed request and drop the connection once ``condition()`` holds."""
    async with trio.open_nursery() as nursery:
        async def request() -> None:
            await stream_chat(stack.client, body)

        nursery.start_soon(request)
        await wait_until(condition)  # type: ignore[arg-type]
        nursery.cancel_scope.cancel()


async def test_disconnect_during_the_routing_lookup() -> None:
    async with open_stack(kv={"lookup_routing_timeout": '"20s"'}) as stack:
        text = prompt("disconnect-lookup")
        await stack.warm(text)
        stack.controller.faults = Faults(hang=True, hang_limit=30.0)
        async with access_log() as log:
            await cancel_when(lambda: stack.controller.held_requests >= 1, stack, chat(text))
            await wait_until(lambda: len(log.records) == 1)
        assert log.records[0]["status"] == 499
        # The lookup was abandoned with the request: the controller no longer holds it.
        await wait_until(lambda: stack.controller.held_requests == 0)
        await wait_until(stack.idle)
        stack.controller.faults = Faults()


async def test_disconnect_before_the_first_byte(stack: Stack) -> None:
    for index in (0, 1):
        stack.engine(index).set_faults(hang=True)
    async with access_log() as log:
        await cancel_when(lambda: sum(e.in_flight for e in stack.cluster.endpoints) == 1
                          and any(e.engine._inflight for e in stack.fleet.engines[:2]),
                          stack, chat(prompt("disconnect-ttfb")))
        await wait_until(lambda: len(log.records) == 1)
    assert log.records[0]["status"] == 499
    # The hanging engine saw the gateway hang up: its request is gone too.
    await wait_until(stack.idle)


async def test_disconnect_mid_stream(stack: Stack) -> None:
    for index in (0, 1):
        stack.engine(index).set_faults(slow_stream_s=0.05)
    async with access_log() as log:
        received = await read_first_event_and_leave(stack, chat(prompt("disconnect-stream"), max_tokens=500))
        assert received.startswith(b"HTTP/1.1 200")
        await wait_until(lambda: len(log.records) == 1)
    record = log.records[0]
    assert record["status"] == 200 and record["completed"] is False
    await wait_until(stack.idle)
    assert sum(e.engine.metrics.requests_aborted for e in stack.fleet.engines) == 1


async def test_many_disconnects_do_not_exhaust_the_upstream_pool() -> None:
    # A pool of 4 connections per endpoint: a leak per disconnect would exhaust it at once.
    async with open_stack(1, proxy={"max_connections_per_endpoint": "4"}) as stack:
        stack.engine(0).set_faults(slow_stream_s=0.05)
        for i in range(12):
            await read_first_event_and_leave(stack, chat(prompt(f"leak-{i}"), max_tokens=100))
            await wait_until(stack.idle)
        stack.engine(0).set_faults(slow_stream_s=0.0)
        result = await stream_chat(stack.client, chat("still serving"))
        assert result.status == 200 and result.done


async def test_disconnect_after_completion_lets_background_work_finish(stack: Stack) -> None:
    text = prompt("after-completion")
    async with httpx.AsyncClient(base_url=stack.url, timeout=10.0) as client:
        result = await stream_chat(client, chat(text))
        assert result.status == 200 and result.done
    # The client connection is gone; the background tokenize/lookup still completes and
    # teaches the gateway this prompt's tokens.
    await wait_until(stack.idle)
    assert stack.kv.stats.token_cache_size == 1
    assert stack.kv.stats.background_cancelled == 0
