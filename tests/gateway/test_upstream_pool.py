"""The engine connection pool through the gateway: reuse, closes, stale idle connections."""

from __future__ import annotations

import trio
from gateway_support import EngineFactory, client, gateway_config, wait_until

from pixiu_kv.app import open_gateway


async def test_connections_are_reused_and_closed_when_the_engine_asks(start_engine: EngineFactory) -> None:
    engine = await start_engine("e1")
    async with open_gateway(gateway_config([engine])) as gw, client(gw.url) as http:
        for i in range(5):
            assert (await http.post("/v1/completions", json={"prompt": str(i)})).status_code == 200
        assert engine.established_connections() == 1
        assert len({r["client_port"] for r in engine.requests}) == 1
        runtime = gw.app.runtime
        assert runtime is not None
        pool = runtime.clients.pool("e1")
        assert pool.idle_connections == 1
        r = await http.post("/v1/completions", json={"prompt": "p"}, headers={"x-test-mode": "close"})
        assert r.status_code == 200
        # "Connection: close" from the engine: the connection is not kept.
        assert pool.idle_connections == 0
        await wait_until(lambda: engine.established_connections() == 0)
        assert (await http.post("/v1/completions", json={"prompt": "p"})).status_code == 200
        assert pool.idle_connections == 1


async def test_idle_connection_closed_by_the_engine_is_replaced(start_engine: EngineFactory) -> None:
    engine = await start_engine("e1", keep_alive_timeout=0.05)
    config = gateway_config([engine], cluster='retry = { policy = "none" }')
    async with open_gateway(config) as gw, client(gw.url) as http:
        for i in range(3):
            r = await http.post("/v1/completions", json={"prompt": str(i)})
            assert r.status_code == 200
            # The engine drops the idle keep-alive connection; the next request must not fail.
            await wait_until(lambda: engine.established_connections() == 0)
        assert engine.completions == 3


async def test_keepalive_expiry_closes_idle_connections(start_engine: EngineFactory) -> None:
    engine = await start_engine("e1")
    config = gateway_config([engine], proxy='keepalive_expiry = "20ms"')
    async with open_gateway(config) as gw, client(gw.url) as http:
        for i in range(3):
            assert (await http.post("/v1/completions", json={"prompt": str(i)})).status_code == 200
        # Back to back: one connection.
        assert len({r["client_port"] for r in engine.requests}) == 1
        # Idle past the expiry: the next request gets a new connection, the old one is closed.
        await trio.sleep(0.1)
        assert (await http.post("/v1/completions", json={"prompt": "late"})).status_code == 200
        assert engine.requests[-1]["client_port"] != engine.requests[0]["client_port"]
        await wait_until(lambda: engine.established_connections() == 1)
