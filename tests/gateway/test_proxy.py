"""The proxied path end to end: real sockets, gateway and engines under hypercorn."""

from __future__ import annotations

import json

import openai
import pytest
from gateway_support import EngineFactory, client, gateway_config

from pixiu_kv.app import open_gateway


async def test_completion_json_is_relayed_with_gateway_headers(start_engine: EngineFactory) -> None:
    engine = await start_engine("e1")
    async with open_gateway(gateway_config([engine])) as gw, client(gw.url) as http:
        r = await http.post("/v1/completions?x=1", json={"model": "demo", "prompt": "hi"},
                            headers={"x-request-id": "req-42"})
        assert r.status_code == 200
        assert r.json()["choices"][0]["text"] == "hello from e1"
        assert r.headers["x-pixiu-kv-endpoint"] == "e1"
        assert r.headers["x-request-id"] == "req-42"
        seen = engine.requests[-1]
        assert seen["headers"]["x-request-id"] == "req-42"
        assert seen["query"] == b"x=1"
        assert json.loads(seen["body"]) == {"model": "demo", "prompt": "hi"}


async def test_request_id_is_created_when_missing_or_unsafe(start_engine: EngineFactory) -> None:
    engine = await start_engine("e1")
    async with open_gateway(gateway_config([engine])) as gw, client(gw.url) as http:
        r = await http.post("/v1/completions", json={"prompt": "hi"},
                            headers={"x-request-id": "bad id with spaces"})
        rid = r.headers["x-request-id"]
        assert rid != "bad id with spaces" and len(rid) >= 16
        assert engine.requests[-1]["headers"]["x-request-id"] == rid


async def test_streaming_completion_is_relayed_event_by_event(start_engine: EngineFactory) -> None:
    engine = await start_engine("e1")
    engine.stream_chunks = 4
    async with open_gateway(gateway_config([engine])) as gw, client(gw.url) as http:
        async with http.stream("POST", "/v1/completions",
                               json={"model": "demo", "prompt": "hi", "stream": True}) as r:
            assert r.status_code == 200
            assert r.headers["content-type"].startswith("text/event-stream")
            lines = [line async for line in r.aiter_lines() if line]
        assert lines[-1] == "data: [DONE]"
        texts = [json.loads(line[6:])["choices"][0]["text"] for line in lines[:-1]]
        assert texts == ["t0", "t1", "t2", "t3"]


# The openai package stops iterating its own async generators at [DONE] without closing
# them; trio reports that when they are collected. That is the client library's hygiene, not
# the gateway's (the gateway's own generators are closed, and warnings stay errors).
@pytest.mark.filterwarnings(r"ignore:Async generator '(openai|httpx2|httpcore2)\.:ResourceWarning")
async def test_openai_client_completions_chat_and_streams(start_engine: EngineFactory) -> None:
    engine = await start_engine("e1")
    async with open_gateway(gateway_config([engine])) as gw:
        oa = openai.AsyncOpenAI(base_url=gw.url + "/v1", api_key="client-key", max_retries=0)
        try:
            completion = await oa.completions.create(model="demo", prompt="hi", max_tokens=4)
            assert completion.choices[0].text == "hello from e1"
            chat = await oa.chat.completions.create(
                model="demo", messages=[{"role": "user", "content": "hi"}])
            assert chat.choices[0].message.content == "hello from e1"
            stream = await oa.chat.completions.create(
                model="demo", messages=[{"role": "user", "content": "hi"}], stream=True)
            deltas = [chunk.choices[0].delta.content async for chunk in stream]
            assert deltas == ["", "t1", "t2", "t3", "t4"]
            cstream = await oa.completions.create(model="demo", prompt="hi", stream=True)
            texts = [chunk.choices[0].text async for chunk in cstream]
            assert texts == ["t0", "t1", "t2", "t3", "t4"]
        finally:
            await oa.close()
        # Without an endpoint api_key the client's own Authorization goes through.
        assert engine.requests[-1]["headers"]["authorization"] == "Bearer client-key"


async def test_endpoint_api_key_replaces_client_authorization(start_engine: EngineFactory) -> None:
    engine = await start_engine("e1")
    config = gateway_config([engine], endpoint='api_key = "engine-secret"')
    async with open_gateway(config) as gw, client(gw.url) as http:
        r = await http.post("/v1/chat/completions", json={"messages": []},
                            headers={"authorization": "Bearer client-key"})
        assert r.status_code == 200
    assert engine.requests[-1]["headers"]["authorization"] == "Bearer engine-secret"


async def test_hop_by_hop_and_spoofed_gateway_headers_are_removed(start_engine: EngineFactory) -> None:
    engine = await start_engine("e1")
    async with open_gateway(gateway_config([engine])) as gw, client(gw.url) as http:
        r = await http.post("/v1/completions", json={"prompt": "hi"}, headers={
            "connection": "keep-alive, x-drop-me",
            "x-drop-me": "1",
            "keep-alive": "timeout=5",
            "proxy-authorization": "Basic abc",
            "x-pixiu-kv-endpoint": "spoofed",
            "x-pixiu-kv-route": "spoofed",
            "x-kept": "yes",
        })
        assert r.status_code == 200
        assert r.headers["x-pixiu-kv-endpoint"] == "e1"
    seen = engine.requests[-1]["headers"]
    for name in ("x-drop-me", "keep-alive", "proxy-authorization", "x-pixiu-kv-endpoint",
                 "x-pixiu-kv-route"):
        assert name not in seen, name
    assert seen["x-kept"] == "yes"


async def test_upstream_client_errors_pass_through(start_engine: EngineFactory) -> None:
    engine = await start_engine("e1")
    async with open_gateway(gateway_config([engine])) as gw, client(gw.url) as http:
        r = await http.post("/v1/completions", json={"prompt": "hi"}, headers={"x-test-mode": "status-400"})
        assert r.status_code == 400
        assert r.json()["error"]["message"] == "e1 says 400"
        assert r.headers["x-pixiu-kv-endpoint"] == "e1"
    # A 400 is the engine's answer, never retried.
    assert engine.completions == 1
