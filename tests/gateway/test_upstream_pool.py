"""Each engine gets its own keep-alive pool of the upstream client, set from the proxy's
configuration (the client itself is tested in tests/upstream)."""

from __future__ import annotations

from gateway_support import EngineFactory, client, gateway_config

from pixiu_kv.app import open_gateway


async def test_each_engine_has_a_keep_alive_pool_bounded_by_its_in_flight_cap(
        start_engine: EngineFactory) -> None:
    engines = [await start_engine("e1"), await start_engine("e2")]
    config = gateway_config(engines, endpoint="max_in_flight = 3",
                            proxy='keepalive_expiry = "7s"\nconnect_timeout = "3s"\nidle_timeout = "9s"')
    async with open_gateway(config) as gw, client(gw.url) as http:
        for i in range(6):
            assert (await http.post("/v1/completions", json={"prompt": str(i)})).status_code == 200
        runtime = gw.app.runtime
        assert runtime is not None
        for engine in engines:
            assert engine.requests and len({r["client_port"] for r in engine.requests}) == 1
            assert engine.established_connections() == 1
            pool = runtime.clients.pool(engine.name)
            assert pool.idle_connections == 1 and pool.connections_in_use == 0
            assert pool.max_connections == 3
            assert (pool.keepalive_expiry, pool.connect_timeout) == (7.0, 3.0)
            assert pool.origin.port == int(engine.url.rsplit(":", 1)[1])
