"""Hostile request bodies get an OpenAI-shaped 4xx; nothing reaches an engine; the gateway
keeps serving everyone else."""

from __future__ import annotations

from collections.abc import AsyncIterator
from urllib.parse import urlsplit

import pytest
import trio
from faults_support import Stack, chat, open_stack, stream_chat

LIMIT = 64 * 1024


@pytest.fixture
async def small_stack() -> AsyncIterator[Stack]:
    async with open_stack(listener=f"max_request_body = {LIMIT}") as running:
        yield running


def engine_requests(stack: Stack) -> int:
    return sum(e.engine.metrics.requests_finished + e.engine.metrics.requests_aborted
               for e in stack.fleet.engines)


JSON = {"content-type": "application/json"}
BAD_BODIES = [
    pytest.param(b"", JSON, 400, "invalid_json", id="empty"),
    pytest.param(b'{"model": "sim-llama-8b", "messages": [', JSON, 400, "invalid_json", id="truncated"),
    pytest.param(b"\x00\x01\x02garbage", JSON, 400, "invalid_json", id="binary"),
    pytest.param(b'{"model": "\xff\xfe\xfd", "prompt": "x"}', JSON, 400, "invalid_json", id="non-utf8"),
    pytest.param(b"[" * 20_000 + b"]" * 20_000, JSON, 400, "invalid_json", id="deeply-nested"),
    pytest.param(b'{"a":' * 5_000 + b"1" + b"}" * 5_000, JSON, 400, "invalid_json", id="nested-objects"),
    pytest.param(b'["not", "an", "object"]', JSON, 400, "invalid_json", id="not-an-object"),
    pytest.param(b'{"model": "m"}', {"content-type": "text/plain"}, 400, "invalid_content_type",
                 id="wrong-content-type"),
    pytest.param(b'{"p": "' + b"x" * (LIMIT + 1) + b'"}', JSON, 413, "request_too_large", id="oversized"),
]


@pytest.mark.parametrize("body, headers, status, code", BAD_BODIES)
async def test_bad_bodies_are_refused_in_openai_shape(small_stack: Stack, body: bytes,
                                                      headers: dict[str, str], status: int,
                                                      code: str) -> None:
    before = engine_requests(small_stack)
    response = await small_stack.client.post("/v1/chat/completions", content=body, headers=headers)
    assert response.status_code == status
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["code"] == code
    assert engine_requests(small_stack) == before
    ok = await stream_chat(small_stack.client, chat("still serving"))
    assert ok.status == 200 and ok.done


async def test_a_huge_content_length_is_refused_before_the_body_is_read(small_stack: Stack) -> None:
    url = urlsplit(small_stack.url)
    conn = await trio.open_tcp_stream(url.hostname or "127.0.0.1", url.port or 80)
    try:
        # Announce 6.4 MB and send none of it: the answer must come from the headers alone.
        await conn.send_all(b"POST /v1/chat/completions HTTP/1.1\r\nhost: gw\r\n"
                            b"content-type: application/json\r\ncontent-length: "
                            + str(LIMIT * 100).encode() + b"\r\n\r\n")
        received = b""
        with trio.fail_after(20):
            while b"\r\n\r\n" not in received:
                chunk = await conn.receive_some(65536)
                assert chunk, "closed without an answer"
                received += chunk
    finally:
        await conn.aclose()
    assert received.startswith(b"HTTP/1.1 413")
