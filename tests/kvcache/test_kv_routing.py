"""End to end with the router on: gateway + kvcache filter + simulated fleet + LMCache emulator."""

from __future__ import annotations

import json

import trio
from kv_fakes import wait_until
from test_kv_gateway import LONG, MODEL, complete, settle, stack

from pixiu_kv.filters.kvcache import KvCacheFilter
from pixiu_kv.routing import EndpointView, Router
from pixiu_kv.sim import tokenizer as sim_tokenizer
from pixiu_kv.sim.lmcache_link import chunk_keys

ROUTING = """
[http_filters.config.routing]
enabled = true
[[http_filters.config.routing.tokenizers]]
model = "sim-llama-8b"
path = "builtin:sim"
"""


def decider(kv_filter: KvCacheFilter) -> Router:
    router = kv_filter.kv.decider
    assert router is not None
    return router


async def test_first_sight_prompt_is_routed_and_its_repeats_and_next_turns_follow_it() -> None:
    async with stack(ROUTING) as (_fleet, _gw, kv_filter, http):
        router = decider(kv_filter)
        # First sight: no token cache entry, no lookup yet; the local tokenizer gives tokens and
        # the router places it by cost (the reference would not route it at all).
        engine, route, cached = await complete(http, LONG)
        assert cached == 0 and "reason=load" in route and f"hinted={engine}; used=yes" in route
        await settle(kv_filter, 1)
        for n, prompt in enumerate((LONG, LONG + " and a follow-up question", LONG + " and another one"), 2):
            again, route, cached = await complete(http, prompt)
            assert again == engine, route
            assert "reason=cache" in route and cached > 0
            await settle(kv_filter, n)
        # Every reservation was released by the proxy's completion callback, and the engines'
        # usage reports reached the router.
        await wait_until(lambda: router.stats().pending == 0)
        assert router.stats().decisions == {"load": 1, "cache": 3}


async def test_streamed_responses_teach_the_router_its_costs() -> None:
    async with stack(ROUTING) as (_fleet, _gw, kv_filter, http):
        router = decider(kv_filter)
        for i in range(3):
            body = {"model": MODEL, "prompt": f"{i} {LONG}", "max_tokens": 2, "stream": True,
                    "stream_options": {"include_usage": True}}
            async with http.stream("POST", "/v1/completions", json=body) as r:
                assert r.status_code == 200
                events = [line async for line in r.aiter_lines() if line.startswith("data: {")]
            assert "usage" in json.loads(events[-1][6:])
            await settle(kv_filter, i + 1)
        await wait_until(lambda: router.stats().pending == 0)
        # Endpoints of equal weight share one learned cost: it learnt from all three.
        assert {e.samples for e in router.stats().endpoints} == {3}


async def test_a_session_without_a_cache_signal_sticks_to_its_engine() -> None:
    async with stack(ROUTING) as (_fleet, _gw, _kv_filter, http):
        engines = set()
        for i in range(4):
            # Short prompts share no whole block: only the session key can keep them together.
            r = await http.post("/v1/completions", headers={"x-session-id": "conversation-7"},
                                json={"model": MODEL, "prompt": f"question {i}", "max_tokens": 2})
            assert r.status_code == 200, r.text
            assert "reason=session" in r.headers["x-pixiu-kv-route"]
            engines.add(r.headers["x-pixiu-kv-endpoint"])
        assert len(engines) == 1


async def test_routing_off_keeps_the_reference_behaviour() -> None:
    async with stack() as (_fleet, _gw, kv_filter, http):
        assert kv_filter.kv.decider is None
        _engine, route, _cached = await complete(http, LONG)
        assert "reason=no_tokens" in route


async def test_an_error_answer_still_releases_its_reservation() -> None:
    async with stack(ROUTING) as (_fleet, _gw, kv_filter, http):
        router = decider(kv_filter)
        r = await http.post("/v1/completions", json={"model": MODEL, "prompt": LONG, "max_tokens": -5})
        assert r.status_code == 400
        await wait_until(lambda: router.stats().pending == 0)
        assert all(e.outstanding == 0 for e in router.stats().endpoints)


async def test_hot_prefix_placements_are_pinned_once_on_each_replica() -> None:
    config = ROUTING + "[http_filters.config.cache_strategy]\nenable_pinning = true\n"
    async with stack(config) as (fleet, _gw, kv_filter, http):
        router = decider(kv_filter)
        engine, _, _ = await complete(http, LONG)  # the engine now holds the prefix
        await settle(kv_filter, 1)
        # Traffic on that prefix piling up faster than it is served (no completions): the
        # router places it on more engines.
        assert fleet.controller is not None
        before = fleet.controller.request_count("/pin")
        views = [EndpointView(e.instance_id, max_in_flight=64) for e in fleet.engines]
        tokens = sim_tokenizer.tokenize_prompt(LONG)
        for i in range(40):
            router.decide(views, [*tokens, *sim_tokenizer.tokenize(f" question {i}")], None, None,
                          now=trio.current_time())
        placements = router.hot_placements()
        assert len({p.endpoint_id for p in placements}) >= 2
        assert engine in {p.endpoint_id for p in placements}
        assert fleet.controller is not None
        # (The filter's own pinning round may run meanwhile: count pins, not this call's.)
        await kv_filter.kv.pin_hot_prefixes()
        assert fleet.controller.request_count("/pin") - before >= len(placements)
        assert await kv_filter.kv.pin_hot_prefixes() == 0  # all pinned: nothing to do
        tier = fleet.by_id(engine).engine.cpu_tier
        assert any(tier.is_pinned(key) for key in tier.keys())


async def test_a_reused_prefix_on_a_full_engine_is_compressed_there() -> None:
    # A 256-token cache: the first request fills it, so the next one that finds its prefix
    # cached there asks LMCache to compress it on that engine (whole chunks, once).
    config = ROUTING.replace("enabled = true\n", "enabled = true\ncompress_when_full = true\n"
                             "engine_cache_tokens = 256\n", 1)
    async with stack(config) as (fleet, _gw, kv_filter, http):
        assert fleet.controller is not None
        engine, _, _ = await complete(http, LONG)
        await settle(kv_filter, 1)
        assert fleet.controller.request_count("/compress") == 0  # first sight: nothing reused
        tier = fleet.by_id(engine).engine.cpu_tier
        assert tier.keys() and not any(tier.is_compressed(key) for key in tier.keys())
        for n, prompt in enumerate((LONG + " one more question", LONG + " and another"), 2):
            again, route, cached = await complete(http, prompt)
            assert again == engine and "reason=cache" in route and cached > 0
            await settle(kv_filter, n)
        await wait_until(lambda: fleet.controller is not None
                         and fleet.controller.request_count("/compress") == 1)
        prefix_chunks = chunk_keys(sim_tokenizer.tokenize_prompt(LONG), 256)
        assert prefix_chunks and all(key in tier and tier.is_compressed(key) for key in prefix_chunks)
        assert kv_filter.kv.stats.actions["compress"]["ok"] == 1
