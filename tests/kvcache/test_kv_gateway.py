"""End to end: gateway + kvcache filter + simulated vLLM fleet + LMCache controller emulator."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import attrs
import httpx
import trio
from kv_fakes import FakeUpstream, wait_until

from pixiu_kv.app import RunningGateway, open_gateway
from pixiu_kv.config import GatewayConfig, loads_config
from pixiu_kv.filters.kvcache import KvCacheFilter
from pixiu_kv.sim.engine_config import EngineConfig
from pixiu_kv.sim.faults import FaultConfig
from pixiu_kv.sim.fleet import Fleet, open_fleet

MODEL = "sim-llama-8b"
# Long enough for several 256-token LMCache chunks with the simulator's tokenizer.
LONG = " ".join(f"fact{i} about the shared system prompt" for i in range(300))


def config_for(fleet: Fleet, kvcache: str = "") -> GatewayConfig:
    assert fleet.controller_url is not None
    endpoints = "\n".join(f'[[clusters.endpoints]]\nid = "{e.instance_id}"\naddress = "{e.url}"\n'
                          for e in fleet.engines)
    return loads_config(f"""
[listener]
graceful_timeout = "1s"

[[clusters]]
name = "main"
lb_policy = "round_robin"
[clusters.health_check]
enabled = false

{endpoints}

[[http_filters]]
name = "dgp.filter.ai.kvcache"
[http_filters.config]
enabled = true
vllm_endpoint = "{fleet.engines[0].url}"
lmcache_endpoint = "{fleet.controller_url}"
lookup_routing_timeout = "2s"
request_timeout = "10s"
[http_filters.config.token_cache]
enabled = true
{kvcache}

[[http_filters]]
name = "dgp.filter.llm.proxy"
""")


@asynccontextmanager
async def stack(kvcache: str = "") -> AsyncIterator[tuple[Fleet, RunningGateway, KvCacheFilter,
                                                          httpx.AsyncClient]]:
    async with open_fleet(3, EngineConfig(speed=100.0)) as fleet, \
            open_gateway(config_for(fleet, kvcache)) as gw, \
            httpx.AsyncClient(base_url=gw.url, timeout=httpx.Timeout(30.0)) as http:
        runtime = gw.app.runtime
        assert runtime is not None
        kv_filter = runtime.decode_filters[0]
        assert isinstance(kv_filter, KvCacheFilter)
        yield fleet, gw, kv_filter, http


async def complete(http: httpx.AsyncClient, prompt: str) -> tuple[str, str, int]:
    r = await http.post("/v1/completions", json={"model": MODEL, "prompt": prompt, "max_tokens": 2})
    assert r.status_code == 200, r.text
    cached = r.json()["usage"]["prompt_tokens_details"]["cached_tokens"]
    return r.headers["x-pixiu-kv-endpoint"], r.headers.get("x-pixiu-kv-route", ""), cached


async def settle(kv_filter: KvCacheFilter, requests: int) -> None:
    """Wait until the background work of ``requests`` requests is done (or was not needed)."""
    await wait_until(lambda: kv_filter.kv.stats.background_finished + kv_filter.kv.stats.background_skipped
                     >= requests)


async def test_repeat_prompt_goes_to_the_engine_holding_its_prefix() -> None:
    async with stack() as (_fleet, _gw, kv_filter, http):
        first_engine, first_route, first_cached = await complete(http, LONG)
        assert first_cached == 0 and "reason=no_tokens" in first_route
        await settle(kv_filter, 1)
        for n in range(2, 6):
            engine, route, cached = await complete(http, LONG)
            # Round robin alone would have moved on to the other engines.
            assert engine == first_engine, route
            assert f"reason=kv_prefix; hinted={first_engine}; used=yes" in route
            assert cached > 0
            await settle(kv_filter, n)
        stats = kv_filter.kv.stats
        assert stats.lookups["routed"] == 4 and stats.tokenize_calls == 1


async def test_chat_request_is_routed_by_its_prefix() -> None:
    messages: list[dict[str, Any]] = [{"role": "system", "content": LONG},
                                      {"role": "user", "content": "first question"}]
    body = {"model": MODEL, "messages": messages, "max_tokens": 2}
    async with stack() as (_fleet, _gw, kv_filter, http):
        r1 = await http.post("/v1/chat/completions", json=body)
        assert r1.status_code == 200
        await settle(kv_filter, 1)
        r2 = await http.post("/v1/chat/completions", json=body)
        assert r2.headers["x-pixiu-kv-endpoint"] == r1.headers["x-pixiu-kv-endpoint"]
        assert "reason=kv_prefix" in r2.headers["x-pixiu-kv-route"]
        assert r2.json()["usage"]["prompt_tokens_details"]["cached_tokens"] > 0


async def test_hot_prompt_is_pinned_on_its_engine() -> None:
    async with stack('[http_filters.config.cache_strategy]\nenable_pinning = true\nhot_content_threshold = 2'
                     ) as (fleet, _gw, kv_filter, http):
        engine_id, _, _ = await complete(http, LONG)
        await settle(kv_filter, 1)
        assert fleet.controller is not None
        assert fleet.controller.request_count("/pin") == 0
        await complete(http, LONG)
        await settle(kv_filter, 2)
        await complete(http, LONG)
        await settle(kv_filter, 3)
        assert fleet.controller.request_count("/pin") == 1  # pinned once, then remembered
        tier = fleet.by_id(engine_id).engine.cpu_tier
        assert any(tier.is_pinned(key) for key in tier.keys())
        assert kv_filter.kv.stats.actions["pin"]["ok"] == 1


async def test_no_hint_leaks_to_the_next_request() -> None:
    async with stack() as (_fleet, _gw, kv_filter, http):
        await complete(http, LONG)
        await settle(kv_filter, 1)
        _, routed, _ = await complete(http, LONG)
        assert "reason=kv_prefix" in routed
        _, other, cached = await complete(http, "an unrelated prompt " * 50)
        assert "reason=no_tokens; hinted=-" in other and cached == 0


async def test_client_disconnect_cancels_background_tokenize(upstream: tuple[FakeUpstream, str]) -> None:
    """The client gives up while the engine is still thinking: the gateway cancels the
    request's background work, and the tokenizer sees its request aborted."""
    fake, url = upstream
    fake.fault["/tokenize"] = "hang"
    async with open_fleet(1, EngineConfig(speed=100.0, faults=FaultConfig(hang=True)),
                          controller=False) as fleet:
        config = config_for(Fleet(fleet.engines, controller_url=url))
        config = attrs.evolve(config, http_filters=(
            attrs.evolve(config.http_filters[0], config=attrs.evolve(
                config.http_filters[0].config, vllm_endpoint=url)),
            config.http_filters[1]))
        async with open_gateway(config) as gw:
            runtime = gw.app.runtime
            assert runtime is not None
            kv_filter = runtime.decode_filters[0]
            assert isinstance(kv_filter, KvCacheFilter)
            async with trio.open_nursery() as nursery:
                async def doomed_client() -> None:
                    async with httpx.AsyncClient(base_url=gw.url, timeout=httpx.Timeout(30.0)) as http:
                        await http.post("/v1/completions", json={"model": MODEL, "prompt": LONG})

                nursery.start_soon(doomed_client)
                await fake.wait_for(lambda: fake.calls["/tokenize"] == 1)
                nursery.cancel_scope.cancel()  # the client goes away
            await fake.wait_for(lambda: fake.aborted["/tokenize"] == 1)
            await wait_until(lambda: kv_filter.kv.stats.background_cancelled == 1)


async def test_lmcache_down_costs_requests_nothing_but_the_hint() -> None:
    """With the controller unreachable every request is still served; once the breakers
    are open the filter does not even try."""
    with trio.socket.socket() as s:
        await s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}"
    async with open_fleet(2, EngineConfig(speed=100.0)) as fleet:
        config = config_for(Fleet(fleet.engines, controller_url=dead),
                            "[http_filters.config.circuit_breaker]\nfailure_threshold = 1\n"
                            'recovery_timeout = "10m"')
        async with open_gateway(config) as gw, \
                httpx.AsyncClient(base_url=gw.url, timeout=httpx.Timeout(30.0)) as http:
            runtime = gw.app.runtime
            assert runtime is not None
            kv_filter = runtime.decode_filters[0]
            assert isinstance(kv_filter, KvCacheFilter)
            reasons = []
            for n in range(1, 6):
                _, route, _ = await complete(http, LONG)
                reasons.append(route.split(";")[0])
                await settle(kv_filter, n)
            assert reasons[0] == "reason=no_tokens"
            assert reasons[2:] == ["reason=breaker_open"] * 3
            assert kv_filter.kv.stats.breakers["lookup_routing"] == "open"
