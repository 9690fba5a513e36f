"""What the gateway refuses, and how: status, OpenAI error shape, and no upstream call."""

from __future__ import annotations

from collections.abc import AsyncIterator

import httpx
import pytest
import trio
from gateway_support import EngineFactory, client, gateway_config, wait_until

from pixiu_kv.app import open_gateway
from pixiu_kv.config import loads_config


def _assert_openai_error(r: httpx.Response, status: int, fragment: str) -> None:
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert fragment in error["message"], error["message"]


@pytest.mark.parametrize(("method", "path", "kwargs", "status", "fragment"), [
    ("POST", "/v1/nope", {"json": {}}, 404, "no such endpoint: POST /v1/nope"),
    ("GET", "/admin/endpoints", {}, 404, "no such endpoint"),
    ("GET", "/v1/completions", {}, 405, "use POST"),
    ("PUT", "/v1/chat/completions", {"json": {}}, 405, "use POST"),
    ("POST", "/health", {}, 405, "use GET"),
    ("POST", "/v1/completions", {"content": b"prompt=hi",
                                 "headers": {"content-type": "application/x-www-form-urlencoded"}},
     400, "Content-Type must be application/json"),
    ("POST", "/v1/completions", {"content": b"{not json", "headers": {"content-type": "application/json"}},
     400, "not valid JSON"),
    ("POST", "/v1/completions", {"json": [1, 2]}, 400, "must be a JSON object"),
    ("POST", "/v1/completions", {"content": b"x" * 2048, "headers": {"content-type": "application/json"}},
     413, "larger than the limit of 1024 bytes"),
])
async def test_bad_requests_are_refused_in_openai_shape(
        start_engine: EngineFactory, method: str, path: str, kwargs: dict[str, object],
        status: int, fragment: str) -> None:
    engine = await start_engine("e1")
    config = loads_config(_with_body_limit(engine.url))
    async with open_gateway(config) as gw, client(gw.url) as http:
        r = await http.request(method, path, **kwargs)  # type: ignore[arg-type]
        _assert_openai_error(r, status, fragment)
        assert r.headers["x-request-id"]
        if status == 405:
            assert r.headers["allow"] in ("GET", "POST")
        # The gateway keeps serving after refusing.
        ok = await http.post("/v1/completions", json={"prompt": "hi"})
        assert ok.status_code == 200
    assert engine.completions == 1


def _with_body_limit(url: str) -> str:
    return f"""
[listener]
max_request_body = "1KiB"
graceful_timeout = "1s"
[[clusters]]
name = "main"
[clusters.health_check]
enabled = false
[[clusters.endpoints]]
id = "e1"
address = "{url}"
"""


async def test_oversized_streamed_body_is_refused_while_reading(start_engine: EngineFactory) -> None:
    engine = await start_engine("e1")
    async with open_gateway(loads_config(_with_body_limit(engine.url))) as gw, client(gw.url) as http:
        async def chunks() -> AsyncIterator[bytes]:
            for _ in range(8):
                yield b"x" * 512

        # No Content-Length: the limit must hold while the body streams in.
        r = await http.post("/v1/completions", content=chunks(),
                            headers={"content-type": "application/json"})
        _assert_openai_error(r, 413, "larger than the limit")
    assert engine.completions == 0


async def test_endpoint_in_flight_limit_answers_429(start_engine: EngineFactory) -> None:
    engine = await start_engine("e1")
    config = gateway_config([engine], endpoint="max_in_flight = 1")
    async with open_gateway(config) as gw, client(gw.url) as http:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(lambda: http.post("/v1/completions", json={"prompt": "a"},
                                                 headers={"x-test-mode": "hang-headers"}))
            await wait_until(lambda: engine.open_requests == 1)
            r = await http.post("/v1/completions", json={"prompt": "b"})
            _assert_openai_error(r, 429, "in-flight limit")
            assert r.headers["retry-after"] == "1"
            nursery.cancel_scope.cancel()
        await wait_until(lambda: engine.open_requests == 0)
        assert (await http.post("/v1/completions", json={"prompt": "c"})).status_code == 200


async def test_gateway_concurrency_limit_answers_503(start_engine: EngineFactory) -> None:
    engine = await start_engine("e1")
    config = loads_config(_with_body_limit(engine.url).replace(
        'max_request_body = "1KiB"', "max_concurrent_requests = 1"))
    async with open_gateway(config) as gw, client(gw.url) as http:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(lambda: http.post("/v1/completions", json={"prompt": "a"},
                                                 headers={"x-test-mode": "hang-headers"}))
            await wait_until(lambda: engine.open_requests == 1)
            r = await http.post("/v1/completions", json={"prompt": "b"})
            _assert_openai_error(r, 503, "concurrent request limit (1)")
            nursery.cancel_scope.cancel()
        await wait_until(lambda: engine.open_requests == 0)
        assert (await http.post("/v1/completions", json={"prompt": "c"})).status_code == 200
