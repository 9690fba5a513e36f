"""Retries, failover, cooldown, health checks (active and passive) and timeouts."""

from __future__ import annotations

import socket

from gateway_support import EngineFactory, PreferFromBody, client, gateway_config, wait_until

from pixiu_kv.app import open_gateway
from pixiu_kv.config import loads_config

NO_BACKOFF = '[clusters.retry]\npolicy = "count"\nmax_attempts = 2\nbase_backoff = "0s"'


def _dead_address() -> str:
    """An address where nothing listens (a port just released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"


async def test_retryable_status_is_retried_on_the_same_endpoint(start_engine: EngineFactory) -> None:
    engine = await start_engine("e1")
    engine.fail_next = 1
    async with open_gateway(gateway_config([engine], cluster=NO_BACKOFF)) as gw, client(gw.url) as http:
        r = await http.post("/v1/completions", json={"prompt": "p"})
        assert r.status_code == 200
        assert r.headers["x-pixiu-kv-endpoint"] == "e1"
    assert engine.completions == 2


async def test_exponential_backoff_retries_up_to_max_attempts(start_engine: EngineFactory) -> None:
    engine = await start_engine("e1")
    engine.fail_next = 2
    retry = ('[clusters.retry]\npolicy = "ExponentialBackoff"\nmax_attempts = 3\n'
             'base_backoff = "1ms"\nmax_backoff = "4ms"')
    async with open_gateway(gateway_config([engine], cluster=retry)) as gw, client(gw.url) as http:
        assert (await http.post("/v1/completions", json={"prompt": "p"})).status_code == 200
    assert engine.completions == 3


async def test_policy_none_makes_one_attempt_and_passes_the_error_on(start_engine: EngineFactory) -> None:
    engine = await start_engine("e1")
    engine.fail_next = 5
    retry = '[clusters.retry]\npolicy = "none"'
    async with open_gateway(gateway_config([engine], cluster=retry)) as gw, client(gw.url) as http:
        r = await http.post("/v1/completions", json={"prompt": "p"})
        # The engine answered: its own error is passed on, not replaced.
        assert r.status_code == 503
        assert r.json()["error"]["message"] == "e1 overloaded"
        assert r.headers["x-pixiu-kv-endpoint"] == "e1"
    assert engine.completions == 1


async def test_failover_then_cooldown_keeps_the_failed_endpoint_out(start_engine: EngineFactory) -> None:
    e0, e1 = await start_engine("e0"), await start_engine("e1")
    e0.fail_next = 100
    config = loads_config(f"""
[listener]
graceful_timeout = "1s"
[[clusters]]
name = "main"
cooldown = "1h"
health_check.enabled = false
retry = {{ policy = "count", max_attempts = 2, base_backoff = "0s" }}
endpoints = [{{ id = "e0", address = "{e0.url}" }}, {{ id = "e1", address = "{e1.url}" }}]
""")
    async with open_gateway(config) as gw, client(gw.url) as http:
        served = [(await http.post("/v1/completions", json={"prompt": str(i)})).headers["x-pixiu-kv-endpoint"]
                  for i in range(4)]
    assert served == ["e1"] * 4
    # e0 was tried twice (its attempts), then cooled down and never chosen again.
    assert e0.completions == 2
    assert e1.completions == 4


async def test_failover_wraps_around_from_the_last_endpoint(start_engine: EngineFactory) -> None:
    e0, e1, e2 = await start_engine("e0"), await start_engine("e1"), await start_engine("e2")
    e2.fail_next = 100
    e0.fail_next = 0
    async with open_gateway(gateway_config([e0, e1, e2], cluster=NO_BACKOFF),
                            decode_filters=[PreferFromBody()]) as gw, client(gw.url) as http:
        r = await http.post("/v1/completions", json={"prompt": "p", "prefer": "e2"})
        assert r.status_code == 200
        assert r.headers["x-pixiu-kv-endpoint"] == "e0"


async def test_no_fallback_stays_on_one_endpoint(start_engine: EngineFactory) -> None:
    e0, e1 = await start_engine("e0"), await start_engine("e1")
    e0.fail_next = e1.fail_next = 100
    async with open_gateway(gateway_config([e0, e1], cluster="fallback = false\n" + NO_BACKOFF)) as gw, \
            client(gw.url) as http:
        r = await http.post("/v1/completions", json={"prompt": "p"})
        assert r.status_code == 503
    assert e0.completions + e1.completions == 2
    assert 0 in (e0.completions, e1.completions)


async def test_unreachable_endpoints_give_503_listing_what_was_tried() -> None:
    config = loads_config(f"""
[listener]
graceful_timeout = "1s"
[[clusters]]
name = "main"
health_check.enabled = false
retry = {{ policy = "count", max_attempts = 2, base_backoff = "0s" }}
endpoints = [{{ id = "dead0", address = "{_dead_address()}" }},
             {{ id = "dead1", address = "{_dead_address()}" }}]
""")
    async with open_gateway(config) as gw, client(gw.url) as http:
        r = await http.post("/v1/completions", json={"prompt": "p"})
        assert r.status_code == 503
        message = r.json()["error"]["message"]
        assert "tried:" in message and "dead0" in message and "dead1" in message
        # Both are now cooling down: the next request is refused without trying anything.
        r = await http.post("/v1/completions", json={"prompt": "p"})
        assert r.status_code == 503
        assert "no healthy endpoint" in r.json()["error"]["message"]
        assert (await http.get("/ready")).status_code == 503


async def test_passive_connect_failures_mark_an_endpoint_unhealthy(start_engine: EngineFactory) -> None:
    alive = await start_engine("alive")
    config = loads_config(f"""
[listener]
graceful_timeout = "1s"
[[clusters]]
name = "main"
cooldown = "0s"
fallback = true
health_check = {{ interval = "1h", unhealthy_threshold = 2, healthy_threshold = 1 }}
retry = {{ policy = "count", max_attempts = 2, base_backoff = "0s" }}
endpoints = [{{ id = "dead", address = "{_dead_address()}" }}, {{ id = "alive", address = "{alive.url}" }}]
""")
    async with open_gateway(config) as gw, client(gw.url) as http:
        runtime = gw.app.runtime
        assert runtime is not None
        dead = runtime.clusters["main"].endpoint("dead")
        assert dead is not None
        # The first active check already failed once; requests add the rest.
        served = {(await http.post("/v1/completions", json={"prompt": str(i)})).headers["x-pixiu-kv-endpoint"]
                  for i in range(3)}
        assert served == {"alive"}
        assert not dead.healthy


async def test_active_health_checks_take_an_endpoint_out_and_back(start_engine: EngineFactory) -> None:
    engine = await start_engine("e1")
    health = 'interval = "20ms"\ntimeout = "1s"\nunhealthy_threshold = 2\nhealthy_threshold = 2'
    async with open_gateway(gateway_config([engine], health=health)) as gw, client(gw.url) as http:
        runtime = gw.app.runtime
        assert runtime is not None
        endpoint = runtime.clusters["main"].endpoint("e1")
        assert endpoint is not None
        engine.healthy = False
        await wait_until(lambda: not endpoint.healthy)
        assert (await http.get("/ready")).status_code == 503
        r = await http.post("/v1/completions", json={"prompt": "p"})
        assert r.status_code == 503
        assert "no healthy endpoint" in r.json()["error"]["message"]
        engine.healthy = True
        await wait_until(lambda: endpoint.healthy)
        assert (await http.get("/ready")).status_code == 200
        assert (await http.post("/v1/completions", json={"prompt": "p"})).status_code == 200


async def test_first_byte_timeout_gives_504_and_closes_upstream(start_engine: EngineFactory) -> None:
    engine = await start_engine("e1")
    config = gateway_config([engine], proxy='first_byte_timeout = "200ms"')
    async with open_gateway(config) as gw, client(gw.url) as http:
        r = await http.post("/v1/completions", json={"prompt": "p"}, headers={"x-test-mode": "hang-headers"})
        assert r.status_code == 504
        assert r.json()["error"]["code"] == "upstream_timeout"
        await wait_until(lambda: engine.open_requests == 0 and engine.established_connections() == 0)
    assert engine.completions == 1


async def test_idle_stream_is_ended_with_an_error_event(start_engine: EngineFactory) -> None:
    engine = await start_engine("e1")
    config = gateway_config([engine], proxy='idle_timeout = "200ms"')
    async with open_gateway(config) as gw, client(gw.url) as http:
        async with http.stream("POST", "/v1/completions", json={"prompt": "p", "stream": True},
                               headers={"x-test-mode": "hang-body"}) as r:
            assert r.status_code == 200
            lines = [line async for line in r.aiter_lines() if line]
        assert "went idle" in lines[0] and lines[-1] == "data: [DONE]"
        await wait_until(lambda: engine.open_requests == 0 and engine.established_connections() == 0)
