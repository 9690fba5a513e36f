"""Endpoint choice through real requests: preferred endpoint, routes, fallback, no hint leaks."""

from __future__ import annotations

import httpx
from gateway_support import EngineFactory, PreferFromBody, client, gateway_config, wait_until

from pixiu_kv.app import open_gateway
from pixiu_kv.config import loads_config


async def _served_by(http: httpx.AsyncClient, **body: object) -> str:
    r = await http.post("/v1/completions", json={"prompt": "p", **body})
    assert r.status_code == 200, r.text
    return r.headers["x-pixiu-kv-endpoint"]


async def test_preferred_endpoint_wins_over_load_balancing(start_engine: EngineFactory) -> None:
    engines = [await start_engine(f"e{i}") for i in range(3)]
    prefer = PreferFromBody()
    async with open_gateway(gateway_config(engines), decode_filters=[prefer]) as gw, client(gw.url) as http:
        assert [await _served_by(http, prefer="e2") for _ in range(5)] == ["e2"] * 5
        r = await http.post("/v1/completions", json={"prompt": "p", "prefer": "e1"})
        assert r.headers["x-pixiu-kv-route"] == ("reason=test; hinted=e1; used=yes; matched=5; prompt=9; "
                                                 "endpoint=e1")


async def test_hint_never_leaks_across_keep_alive_requests(start_engine: EngineFactory) -> None:
    engines = [await start_engine("e0"), await start_engine("e1")]
    prefer = PreferFromBody()
    async with open_gateway(gateway_config(engines), decode_filters=[prefer]) as gw, client(gw.url) as http:
        first = [await _served_by(http, prefer="e1") for _ in range(3)]
        rest = [await _served_by(http) for _ in range(4)]
    assert first == ["e1"] * 3
    # A fresh context per request: no filter ever sees a previous request's hint, and
    # unhinted requests are spread by round robin again.
    assert prefer.seen_on_entry == [None] * 7
    assert sorted(rest) == ["e0", "e0", "e1", "e1"]


async def test_unknown_or_unhealthy_preference_falls_back(start_engine: EngineFactory) -> None:
    engines = [await start_engine("e0"), await start_engine("e1")]
    health = 'interval = "20ms"\nunhealthy_threshold = 1\nhealthy_threshold = 1'
    config = gateway_config(engines, health=health)
    async with open_gateway(config, decode_filters=[PreferFromBody()]) as gw, client(gw.url) as http:
        assert {await _served_by(http, prefer="no-such-endpoint") for _ in range(4)} == {"e0", "e1"}
        runtime = gw.app.runtime
        assert runtime is not None
        e1 = runtime.clusters["main"].endpoint("e1")
        assert e1 is not None
        engines[1].healthy = False
        await wait_until(lambda: not e1.healthy)
        assert [await _served_by(http, prefer="e1") for _ in range(3)] == ["e0"] * 3
        r = await http.post("/v1/completions", json={"prompt": "p", "prefer": "e1"})
        assert "hinted=e1; used=no" in r.headers["x-pixiu-kv-route"]


async def test_routes_by_prefix_and_model(start_engine: EngineFactory) -> None:
    a, b, c = await start_engine("a"), await start_engine("b"), await start_engine("c")
    config = loads_config(f"""
[listener]
graceful_timeout = "1s"
[[routes]]
prefix = "/v1/chat"
cluster = "chat"
[[routes]]
prefix = "/v1"
model = "big"
cluster = "big"
[[routes]]
prefix = "/v1"
cluster = "default"
[[clusters]]
name = "default"
health_check.enabled = false
endpoints = [{{ id = "a", address = "{a.url}" }}]
[[clusters]]
name = "chat"
health_check.enabled = false
endpoints = [{{ id = "b", address = "{b.url}" }}]
[[clusters]]
name = "big"
health_check.enabled = false
endpoints = [{{ id = "c", address = "{c.url}" }}]
""")
    async with open_gateway(config) as gw, client(gw.url) as http:
        assert await _served_by(http, model="small") == "a"
        assert await _served_by(http, model="big") == "c"
        r = await http.post("/v1/chat/completions", json={"model": "big", "messages": []})
        assert r.headers["x-pixiu-kv-endpoint"] == "b"
        r = await http.post("/tokenize", json={"prompt": "x"})
        assert r.status_code == 404
        assert "no route for /tokenize" in r.json()["error"]["message"]


async def test_models_are_merged_and_deduplicated(start_engine: EngineFactory) -> None:
    engines = [await start_engine("e0", models=("a", "b")), await start_engine("e1", models=("b", "c"))]
    async with open_gateway(gateway_config(engines)) as gw, client(gw.url) as http:
        r = await http.get("/v1/models")
        assert r.status_code == 200
        assert r.json()["object"] == "list"
        assert sorted(m["id"] for m in r.json()["data"]) == ["a", "b", "c"]
        assert (await http.get("/health")).json() == {"status": "ok"}
        ready = await http.get("/ready")
        assert ready.status_code == 200
        assert ready.json()["endpoints"] == {"e0": True, "e1": True}
