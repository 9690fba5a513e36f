"""Fault knobs, flipped at runtime over HTTP, and what a client sees."""

from __future__ import annotations

import json

import attrs
import httpx
import pytest
import trio
from sim_helpers import open_raw_stream, sse_events, wait_until

from pixiu_kv.sim import EngineConfig, FaultConfig, SimEngine, serve_engine


async def test_error_rate_one_fails_every_request(client: httpx.AsyncClient) -> None:
    assert (await client.post("/sim/faults", json={"error_rate": 1.0})).json()["error_rate"] == 1.0
    for _ in range(3):
        reply = await client.post("/v1/completions", json={"prompt": "x", "max_tokens": 1})
        assert reply.status_code == 500
        assert reply.json()["error"]["type"] == "InternalServerError"
        assert reply.json()["error"]["code"] == 500
    await client.post("/sim/faults", json={"error_rate": 0})
    assert (await client.post("/v1/completions", json={"prompt": "x", "max_tokens": 1})).status_code == 200


async def test_stream_dropped_mid_way(client: httpx.AsyncClient, engine: SimEngine) -> None:
    await client.post("/sim/faults", json={"drop_after_chunks": 2})
    received: list[bytes] = []
    with pytest.raises(httpx.RemoteProtocolError):
        async with client.stream("POST", "/v1/completions",
                                 json={"prompt": "drop me", "max_tokens": 10, "stream": True}) as reply:
            assert reply.status_code == 200
            async for chunk in reply.aiter_raw():
                received.append(chunk)
    raw = b"".join(received).decode()
    assert raw.count("data: ") == 2 and "[DONE]" not in raw
    assert engine.scheduler.running == 0
    assert engine.metrics.requests_aborted == 1


async def test_unary_reply_cut_mid_body(client: httpx.AsyncClient) -> None:
    await client.post("/sim/faults", json={"drop_after_chunks": 0})
    with pytest.raises(httpx.RemoteProtocolError):
        await client.post("/v1/completions", json={"prompt": "x", "max_tokens": 2})


async def test_dead_engine_answers_503_until_revived(client: httpx.AsyncClient, engine: SimEngine) -> None:
    await client.post("/sim/faults", json={"dead": True})
    assert (await client.get("/health")).status_code == 503
    reply = await client.post("/v1/completions", json={"prompt": "x"})
    assert reply.status_code == 503 and reply.json()["error"]["code"] == 503
    assert engine.worker_control.health() != 0
    await client.post("/sim/faults", json={"dead": False})
    assert (await client.get("/health")).status_code == 200
    assert engine.worker_control.health() == 0


async def test_hang_is_released_by_client_disconnect(client: httpx.AsyncClient, engine: SimEngine) -> None:
    await client.post("/sim/faults", json={"hang": True})
    with pytest.raises(httpx.ReadTimeout):
        await client.post("/v1/completions", json={"prompt": "x"}, timeout=0.3)
    # The hung handler is cancelled by the disconnect: nothing stays in flight.
    await wait_until(lambda: engine.in_flight == 0)
    await client.post("/sim/faults", json={"hang": False})
    assert (await client.post("/v1/completions", json={"prompt": "x", "max_tokens": 1})).status_code == 200


async def test_bad_fault_patch_is_rejected(client: httpx.AsyncClient) -> None:
    for patch in ({"error_rate": 2}, {"bogus": 1}, {"hang": "yes"}, {"drop_after_chunks": True}):
        reply = await client.post("/sim/faults", json=patch)
        assert reply.status_code == 400, patch
    assert (await client.get("/sim/faults")).json() == attrs.asdict(FaultConfig())


async def test_faults_from_construction_and_slow_stream() -> None:
    config = EngineConfig(speed=1000.0, faults=FaultConfig(slow_stream_s=0.001, error_rate=0.0))
    engine = SimEngine(config)
    async with serve_engine(engine) as url, httpx.AsyncClient(base_url=url, timeout=10) as http:
        reply = await http.post("/v1/completions", json={"prompt": "slow", "max_tokens": 3, "stream": True})
        assert sse_events(reply.text)[-1] == "[DONE]"
        assert (await http.get("/sim/faults")).json()["slow_stream_s"] == 0.001


async def test_full_queue_answers_503_and_disconnect_frees_the_slot() -> None:
    engine = SimEngine(EngineConfig(speed=1.0, max_num_seqs=1, max_waiting=0, gpu_kv_tokens=8192,
                                    max_model_len=4096))
    async with serve_engine(engine) as url, httpx.AsyncClient(base_url=url, timeout=10) as http:
        async with trio.open_nursery() as nursery:
            async def long_stream() -> None:
                async with http.stream("POST", "/v1/completions",
                                       json={"prompt": "long", "max_tokens": 2000, "stream": True}) as r:
                    async for _ in r.aiter_raw():
                        pass

            nursery.start_soon(long_stream)
            await wait_until(lambda: engine.scheduler.running == 1)
            busy = await http.post("/v1/completions", json={"prompt": "more", "max_tokens": 1})
            assert busy.status_code == 503
            assert json.loads(busy.text)["error"]["type"] == "ServiceUnavailableError"
            nursery.cancel_scope.cancel()
        await wait_until(lambda: engine.scheduler.running == 0)
        assert engine.prefix_cache.used_blocks == 0


async def test_client_leaving_mid_stream_frees_the_request(engine: SimEngine) -> None:
    engine.set_faults(slow_stream_s=0.05)
    async with serve_engine(engine) as url, httpx.AsyncClient(base_url=url, timeout=10) as http:
        stream = await open_raw_stream(url, "/v1/completions",
                                       {"prompt": "leave early", "max_tokens": 500, "stream": True})
        received = b""
        with trio.fail_after(5):
            while b"data: " not in received:
                received += await stream.receive_some(65536)
        assert engine.scheduler.running == 1
        assert engine.prefix_cache.used_blocks > 0
        await stream.aclose()
        await wait_until(lambda: engine.scheduler.running == 0)
        assert engine.prefix_cache.used_blocks == 0
        assert engine.metrics.requests_aborted == 1
        assert (await http.get("/load")).json() == {"server_load": 0}


async def test_request_limit_answers_503() -> None:
    engine = SimEngine(EngineConfig(speed=1000.0, max_concurrent_requests=1))
    async with serve_engine(engine) as url, httpx.AsyncClient(base_url=url, timeout=10) as http:
        await http.post("/sim/faults", json={"hang": True})
        await wait_until(lambda: engine.in_flight == 0)  # the fault call has fully finished
        async with trio.open_nursery() as nursery:
            async def hung() -> None:
                await http.post("/v1/completions", json={"prompt": "x"})

            nursery.start_soon(hung)
            await wait_until(lambda: engine.in_flight == 1)
            refused = await http.get("/v1/models")
            assert refused.status_code == 503
            assert refused.json()["error"]["type"] == "ServiceUnavailableError"
            nursery.cancel_scope.cancel()
        await wait_until(lambda: engine.in_flight == 0)
        assert (await http.get("/v1/models")).status_code == 200
