"""Server lifecycle and observability: graceful stop, broken engines mid-stream, access logs."""

from __future__ import annotations

import json
import logging
from functools import partial

import pytest
import trio
from gateway_support import EngineFactory, client, gateway_config, wait_until

from pixiu_kv.app import RunningGateway, hypercorn_config, open_gateway, serve
from pixiu_kv.config import loads_config


async def test_graceful_stop_lets_an_in_flight_stream_finish(start_engine: EngineFactory) -> None:
    engine = await start_engine("e1")
    engine.stream_chunks = 6
    stop = trio.Event()
    async with trio.open_nursery() as nursery:
        gw: RunningGateway = await nursery.start(partial(serve, gateway_config([engine]), host="127.0.0.1",
                                                         port=0, shutdown_trigger=stop.wait))
        async with client(gw.url) as http, http.stream(
                "POST", "/v1/completions", json={"prompt": "p", "stream": True},
                headers={"x-test-mode": "slow-0.02"}) as r:
            lines = []
            async for line in r.aiter_lines():
                if line and not stop.is_set():
                    stop.set()  # the gateway is told to stop after the first event
                lines.append(line)
        assert [line for line in lines if line][-1] == "data: [DONE]"
        assert len([line for line in lines if line.startswith("data: {")]) == 6


async def test_engine_dying_mid_stream_ends_with_an_error_event(start_engine: EngineFactory) -> None:
    engine = await start_engine("e1")
    async with open_gateway(gateway_config([engine])) as gw, client(gw.url) as http:
        async with http.stream("POST", "/v1/chat/completions", json={"messages": [], "stream": True},
                               headers={"x-test-mode": "die-mid-stream"}) as r:
            assert r.status_code == 200
            lines = [line async for line in r.aiter_lines() if line]
        assert len(lines) == 4
        error = json.loads(lines[2].removeprefix("data: "))["error"]
        assert "failed mid-stream" in error["message"]
        assert lines[3] == "data: [DONE]"
        # Nothing was retried after the stream started.
        assert engine.completions == 1
        await wait_until(lambda: engine.open_requests == 0)
        assert (await http.post("/v1/completions", json={"prompt": "p"})).status_code == 200


async def test_access_log_has_the_fields_and_never_the_prompt(
        start_engine: EngineFactory, caplog: pytest.LogCaptureFixture) -> None:
    engine = await start_engine("e1")
    secret_prompt = "my-very-private-prompt-text"
    caplog.set_level(logging.INFO, logger="pixiu_kv.access")
    async with open_gateway(gateway_config([engine])) as gw, client(gw.url) as http:
        r = await http.post("/v1/completions", json={"prompt": secret_prompt},
                            headers={"x-request-id": "abc-1"})
        assert r.status_code == 200
        bad = await http.post("/v1/completions", content=b"{", headers={"content-type": "application/json"})
        assert bad.status_code == 400
    records = [rec for rec in caplog.records if rec.name == "pixiu_kv.access"]
    assert len(records) == 2
    fields = records[0].pixiu_fields  # type: ignore[attr-defined]
    assert fields["request_id"] == "abc-1" and fields["status"] == 200 and fields["endpoint"] == "e1"
    assert fields["cluster"] == "main" and fields["attempts"] == 1 and fields["tried"] == ["e1"]
    assert fields["bytes_in"] > 0 and fields["bytes_out"] > 0 and fields["ttfb_ms"] is not None
    assert records[1].pixiu_fields["status"] == 400  # type: ignore[attr-defined]
    assert secret_prompt not in caplog.text
    assert all(secret_prompt not in repr(rec.__dict__) for rec in caplog.records)


def test_hypercorn_settings_never_cut_streams() -> None:
    config = loads_config("""
[listener]
host = "::1"
port = 9999
graceful_timeout = "45s"
keep_alive_timeout = "20s"
[[clusters]]
name = "c"
endpoints = [{ id = "e", address = "http://127.0.0.1:1" }]
""")
    hc = hypercorn_config(config)
    assert hc.bind == ["[::1]:9999"]
    assert hc.graceful_timeout == 45.0
    assert hc.keep_alive_timeout == 20.0
    assert hc.keep_alive_max_requests > 10**12
    assert hc.read_timeout is None
    assert hypercorn_config(config, host="127.0.0.1", port=0).bind == ["127.0.0.1:0"]
