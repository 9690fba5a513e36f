"""First-sight routing: without a local tokenizer the engine's /tokenize runs on the routing
path (within the routing budget, one call per prompt in flight), then LMCache's lookup."""

from __future__ import annotations

from typing import Any

import httpx
import pytest
import trio
from kv_fakes import FakeUpstream, kv_config, wait_until
from test_kv_gateway import LONG, MODEL, complete, settle, stack

from pixiu_kv.filters.kvcache import KvCacheFilter, TokenSeq
from pixiu_kv.filters.kvcache.core import open_kvcache
from pixiu_kv.routing import PrefixKeys, Router, RoutingConfig

ROUTING = "[http_filters.config.routing]\nenabled = true\n"


def decider(kv_filter: KvCacheFilter) -> Router:
    router = kv_filter.kv.decider
    assert router is not None
    return router


def spawner(nursery: trio.Nursery) -> Any:
    async def spawn(fn: Any, *args: Any) -> bool:
        nursery.start_soon(fn, *args)
        return True
    return spawn


LOCAL = ROUTING + '[[http_filters.config.routing.tokenizers]]\nmodel = "sim-llama-8b"\npath = "builtin:sim"\n'


@pytest.mark.parametrize("local_tokenizer", [False, True])
async def test_first_seen_prompt_lands_where_its_system_prompt_is_cached(
        local_tokenizer: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    # Without a local tokenizer the engine's /tokenize gives the ids; with one (the engine's
    # own), its ids are looked up at once, without a round trip. Either way the ids are keyed
    # where they were tokenized: the token cache's JSON is never decoded again to route.
    decoded: list[int] = []
    ids = TokenSeq.ids
    monkeypatch.setattr(TokenSeq, "ids", lambda self: decoded.append(self.count) or ids(self))
    async with stack(LOCAL if local_tokenizer else ROUTING) as (fleet, _gw, kv_filter, http):
        assert fleet.controller is not None
        index = fleet.controller.index
        for n, warmed in enumerate(("engine-1", "engine-2"), 1):
            system = f"system prompt number {n}: {LONG}"
            # The system prompt reaches one engine's cache without the gateway: only LMCache
            # knows where it is.
            before = index.total_keys
            url = fleet.by_id(warmed).url
            async with httpx.AsyncClient(base_url=url, timeout=httpx.Timeout(30.0)) as direct:
                r = await direct.post("/v1/completions", json={
                    "model": MODEL, "prompt": system + " warm-up question", "max_tokens": 2})
                assert r.status_code == 200, r.text
            await wait_until(lambda seen=before: index.total_keys > seen)
            engine, route, cached = await complete(http, system + " a question nobody asked before")
            assert engine == warmed, route
            assert "reason=cache" in route and cached > 0
            await settle(kv_filter, n)
        stats = kv_filter.kv.stats
        assert stats.tokenize_calls == (0 if local_tokenizer else 2) and stats.lookups["routed"] == 2
        assert decoded == []


async def test_next_turn_of_a_chat_lands_where_the_previous_turn_is_cached() -> None:
    async with stack(ROUTING) as (_fleet, _gw, kv_filter, http):
        router = decider(kv_filter)
        messages: list[dict[str, Any]] = [{"role": "system", "content": LONG},
                                          {"role": "user", "content": "turn 1 of the conversation"}]
        served: list[str] = []
        for turn in range(1, 4):
            r = await http.post("/v1/chat/completions", json={"model": MODEL, "messages": messages,
                                                              "max_tokens": 4})
            assert r.status_code == 200, r.text
            engine = r.headers["x-pixiu-kv-endpoint"]
            served.append(engine)
            if turn > 1:
                assert engine == served[0], r.headers["x-pixiu-kv-route"]
                assert "reason=cache" in r.headers["x-pixiu-kv-route"]
                assert r.json()["usage"]["prompt_tokens_details"]["cached_tokens"] > 0
            await settle(kv_filter, turn)
            await wait_until(lambda: router.stats().pending == 0)
            # The gateway's own index forgets the engine: the next turn can only find it
            # through LMCache's prefix lookup of the engine's tokens.
            router.forget_endpoint(engine)
            messages = [*messages, r.json()["choices"][0]["message"],
                        {"role": "user", "content": f"turn {turn + 1} of the conversation"}]
        assert kv_filter.kv.stats.lookups["routed"] == 2


async def test_concurrent_identical_first_sight_prompts_share_one_tokenize(
        upstream: tuple[FakeUpstream, str]) -> None:
    fake, url = upstream
    fake.fault["/tokenize"] = "hold"
    fake.layout = {"engine-1": ("LocalCPUBackend", 256)}
    config = kv_config(url, routing=RoutingConfig(enabled=True))
    body = {"model": MODEL, "prompt": LONG}
    async with open_kvcache(config) as kv, trio.open_nursery() as nursery:
        results: list[Any] = []

        async def one() -> None:
            results.append(await kv.process_routed(body, spawner(nursery)))

        for _ in range(3):
            nursery.start_soon(one)
        await fake.wait_for(lambda: fake.calls["/tokenize"] == 1)
        await wait_until(lambda: kv.stats.single_flight_joined == 2)
        fake.release.set()
        await wait_until(lambda: len(results) == 3)
    assert fake.calls["/tokenize"] == 1
    for hint, routing_input in results:
        assert hint is not None and hint.endpoint_id == "engine-1"
        assert routing_input is not None and isinstance(routing_input.tokens, PrefixKeys)
        assert routing_input.lookup == {"engine-1": 256}


async def test_a_slow_tokenize_costs_no_more_than_the_routing_budget(
        upstream: tuple[FakeUpstream, str]) -> None:
    fake, url = upstream
    fake.fault["/tokenize"] = "hang"
    config = kv_config(url, routing=RoutingConfig(enabled=True), lookup_routing_timeout=0.05)
    async with open_kvcache(config) as kv, trio.open_nursery() as nursery:
        hint, routing_input = await kv.process_routed({"model": MODEL, "prompt": LONG}, spawner(nursery))
        assert hint is not None and hint.reason == "no_tokens"
        assert routing_input is not None and routing_input.tokens is None
        # The budget cut the call: not a tokenizer failure, and no lookup was sent.
        assert kv.stats.breakers["tokenize"] == "closed" and fake.calls["/lookup"] == 0
        nursery.cancel_scope.cancel()


async def test_tokenize_on_route_off_leaves_first_sight_unrouted(upstream: tuple[FakeUpstream, str]) -> None:
    fake, url = upstream
    config = kv_config(url, routing=RoutingConfig(enabled=True, tokenize_on_route=False))
    async with open_kvcache(config) as kv, trio.open_nursery() as nursery:
        hint, routing_input = await kv.process_routed({"model": MODEL, "prompt": LONG}, spawner(nursery))
        assert hint is not None and hint.reason == "no_tokens"
        assert routing_input is not None and routing_input.tokens is None
        nursery.cancel_scope.cancel()
    assert fake.calls["/lookup"] == 0
