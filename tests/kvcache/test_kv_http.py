"""The core over real loopback sockets: routing, single-flight, bounds, faults, cancellation."""

from __future__ import annotations

import logging
import random
from typing import Any

import psutil
import pytest
import trio
from kv_fakes import FakeUpstream, fake_tokens, kv_config, wait_until

from pixiu_kv.config import CacheStrategyConfig, CircuitBreakerConfig, LookupRetryConfig
from pixiu_kv.context import RouteHint
from pixiu_kv.filters.kvcache import ROUTED_REASON, KvCache, open_kvcache
from pixiu_kv.hostload import HostLoad

Upstream = tuple[FakeUpstream, str]


async def request(kv: KvCache, body: Any) -> RouteHint:
    """One request whose background work runs to completion (a finished request)."""
    async with trio.open_nursery() as nursery:
        hint = await kv.route(body, nursery)
    return hint


def completion(text: str, model: str = "m") -> dict[str, Any]:
    return {"model": model, "prompt": text}


async def test_second_request_goes_to_the_instance_holding_the_prefix(upstream: Upstream) -> None:
    fake, url = upstream
    fake.layout = {"engine-a": ("LocalCPUBackend", 256), "engine-b": ("LocalCPUBackend", 512)}
    text = "x" * 600
    async with open_kvcache(kv_config(url)) as kv:
        first = await request(kv, completion(text))
        assert first == RouteHint(None, "no_tokens")
        assert fake.bodies["/tokenize"] == [{"model": "m", "prompt": text}]
        second = await request(kv, completion(text))
        assert second == RouteHint("engine-b", ROUTED_REASON, 512, 600)
        # The routing lookup sent the tokens /tokenize gave.
        assert fake.bodies["/lookup"][-1] == {"tokens": fake_tokens(text)}
        # Routing answered, so the background did not tokenize or look up again.
        assert (fake.calls["/tokenize"], fake.calls["/lookup"]) == (1, 2)
        stats = kv.stats
        assert stats.lookups["no_tokens"] == 1 and stats.lookups["routed"] == 1
        assert stats.token_cache_size == 1 and stats.token_cache_hits == 1


async def test_pixiu_object_layout_form_routes_too(upstream: Upstream) -> None:
    fake, url = upstream
    fake.layout = {"engine-c": ("LocalCPUBackend", 40)}
    fake.pixiu_form = True
    async with open_kvcache(kv_config(url)) as kv:
        await request(kv, completion("hello world"))
        hint = await request(kv, completion("hello world"))
    assert hint.endpoint_id == "engine-c" and hint.matched_tokens == 40


async def test_miss_and_chat_tokenize_form(upstream: Upstream) -> None:
    fake, url = upstream
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    async with open_kvcache(kv_config(url)) as kv:
        await request(kv, {"model": "m", "messages": messages, "temperature": 0})
        hint = await request(kv, {"model": "m", "messages": messages})
    assert fake.bodies["/tokenize"] == [{"model": "m", "messages": messages}]
    assert hint.endpoint_id is None and hint.reason == "miss" and hint.matched_tokens == 0
    assert kv.stats.lookups["miss"] == 1


async def test_no_prompt_passes_through_without_calls(upstream: Upstream) -> None:
    fake, url = upstream
    async with open_kvcache(kv_config(url)) as kv:
        assert await request(kv, {"model": "m"}) == RouteHint(None, "no_prompt")
        assert await request(kv, None) == RouteHint(None, "no_prompt")
    assert sum(fake.calls.values()) == 0
    assert kv.stats.background_started == 0


async def test_identical_concurrent_prompts_share_one_tokenize_and_one_lookup(upstream: Upstream) -> None:
    fake, url = upstream
    fake.fault["/tokenize"] = "hold"
    fake.layout = {"engine-a": ("LocalCPUBackend", 256)}
    n = 8
    async with open_kvcache(kv_config(url)) as kv:
        async with trio.open_nursery() as nursery:
            for _ in range(n):
                nursery.start_soon(kv.route, completion("same prompt"), nursery)
            await fake.wait_for(lambda: fake.calls["/tokenize"] >= 1)
            await wait_until(lambda: kv.stats.single_flight_joined == n - 1)
            fake.release.set()
        assert fake.calls["/tokenize"] == 1
        assert fake.calls["/lookup"] == 1
        assert kv.stats.background_finished == n
        # A different prompt is not joined to the first.
        await request(kv, completion("other prompt"))
        assert fake.calls["/tokenize"] == 2


async def test_cancelled_leader_does_not_hang_followers(upstream: Upstream) -> None:
    fake, url = upstream
    fake.fault["/tokenize"] = "hang"
    async with open_kvcache(kv_config(url)) as kv:
        leader_scope = trio.CancelScope()

        async def leader_request() -> None:
            with leader_scope:
                async with trio.open_nursery() as nursery:
                    await kv.route(completion("p"), nursery)

        async with trio.open_nursery() as outer:
            outer.start_soon(leader_request)
            await fake.wait_for(lambda: fake.calls["/tokenize"] == 1)
            followers_done = trio.Event()

            async def followers() -> None:
                async with trio.open_nursery() as nursery:
                    for _ in range(3):
                        await kv.route(completion("p"), nursery)
                followers_done.set()

            outer.start_soon(followers)
            await wait_until(lambda: kv.stats.single_flight_joined == 3)
            leader_scope.cancel()  # the leader's client went away
            await followers_done.wait()
        await fake.wait_for(lambda: fake.aborted["/tokenize"] == 1)
        stats = kv.stats
        assert stats.background_cancelled == 1 and stats.background_finished == 3
        assert fake.calls["/tokenize"] == 1


@pytest.mark.parametrize("path", ["/tokenize", "/lookup", "/pin"])
async def test_cancel_aborts_the_inflight_upstream_call(upstream: Upstream, path: str) -> None:
    """A client disconnect cancels the request's background work with its upstream call."""
    fake, url = upstream
    fake.layout = {"engine-a": ("LocalCPUBackend", 256)}
    config = kv_config(url, lookup_routing_timeout=0.05,
                       cache_strategy=CacheStrategyConfig(enable_pinning=True, hot_content_threshold=1))
    async with open_kvcache(config) as kv:
        if path == "/lookup":
            fake.fault["/pin"] = "404"
            await request(kv, completion("p"))  # tokens cached: the background only looks up
        fake.fault[path] = "hang"
        request_scope = trio.CancelScope()
        async with trio.open_nursery() as nursery:
            async def one_request() -> None:
                with request_scope:
                    async with trio.open_nursery() as request_nursery:
                        await kv.route(completion("p"), request_nursery)

            nursery.start_soon(one_request)
            # The background call is held by the server; for /lookup the routing lookup (cut
            # by its budget) came first and was aborted already.
            calls, aborted = (3, 1) if path == "/lookup" else (1, 0)
            await wait_until(lambda: kv.stats.background_running == 1 and fake.calls[path] == calls
                             and fake.aborted[path] == aborted)
            request_scope.cancel()
            await fake.wait_for(lambda: fake.aborted[path] == aborted + 1)
        assert kv.stats.background_cancelled == 1 and kv.stats.background_running == 0
        # Cancellation is not a failure of the upstream: the background breakers did not move.
        assert kv.stats.breakers["tokenize"] == kv.stats.breakers["lmcache_background"] == "closed"


def _in_flight(fake: FakeUpstream, path: str) -> bool:
    return fake.calls[path] > fake.aborted[path]


async def test_background_jobs_are_bounded_globally(upstream: Upstream) -> None:
    fake, url = upstream
    fake.fault["/tokenize"] = "hold"
    async with open_kvcache(kv_config(url, max_background_jobs=2)) as kv:
        async with trio.open_nursery() as nursery:
            for i in range(5):
                await kv.route(completion(f"prompt {i}"), nursery)
            await fake.wait_for(lambda: fake.calls["/tokenize"] == 2)
            assert kv.stats.background_dropped == 3
            fake.release.set()
        assert fake.calls["/tokenize"] == 2
        assert kv.stats.background_finished == 2 and kv.stats.background_running == 0


async def test_routing_lookup_respects_its_budget_and_trips_only_its_breaker(upstream: Upstream) -> None:
    fake, url = upstream
    config = kv_config(url, lookup_routing_timeout=0.05, request_timeout=30.0,
                       circuit_breaker=CircuitBreakerConfig(failure_threshold=1))
    async with open_kvcache(config) as kv:
        await request(kv, completion("p"))
        fake.fault["/lookup"] = "hang"
        async with trio.open_nursery() as nursery:
            hint = await kv.route(completion("p"), nursery)
            assert hint.reason == "timeout" and hint.endpoint_id is None
            assert kv.stats.breakers["lookup_routing"] == "open"
            # The background lookup is still in flight; its breaker is untouched.
            await fake.wait_for(lambda: _in_flight(fake, "/lookup"))
            assert kv.stats.breakers["lmcache_background"] == "closed"
            nursery.cancel_scope.cancel()
        assert kv.stats.breakers["lmcache_background"] == "closed"
        assert kv.stats.lookups["timeout"] == 1


async def test_open_breaker_lookup_costs_no_network_call(upstream: Upstream) -> None:
    fake, url = upstream
    config = kv_config(url, circuit_breaker=CircuitBreakerConfig(failure_threshold=1, recovery_timeout=600.0))
    async with open_kvcache(config) as kv:
        await request(kv, completion("p"))  # tokens cached
        fake.fault["/lookup"] = "500"
        first = await request(kv, completion("p"))
        assert first.reason == "error"
        assert kv.stats.breakers == {"tokenize": "closed", "lookup_routing": "open",
                                     "lmcache_background": "open"}
        before = fake.calls["/lookup"]
        for _ in range(5):
            hint = await request(kv, completion("p"))
            assert hint.reason == "breaker_open"
        assert fake.calls["/lookup"] == before
        assert kv.stats.lookups["breaker_open"] == 5


async def test_transient_errors_are_retried_malformed_replies_are_not(upstream: Upstream) -> None:
    fake, url = upstream
    retry = LookupRetryConfig(max_attempts=3, base_backoff=0.001, max_backoff=0.002)
    async with open_kvcache(kv_config(url, retry=retry)) as kv:
        fake.fault["/tokenize"] = "500"
        await request(kv, completion("a"))
        assert fake.calls["/tokenize"] == 3
        assert kv.stats.tokenize_failures == 1
        fake.fault["/tokenize"] = "garbage"
        await request(kv, completion("b"))
        assert fake.calls["/tokenize"] == 4
        fake.fault["/tokenize"] = "422"
        await request(kv, completion("c"))
        assert fake.calls["/tokenize"] == 5
        fake.fault.clear()
        await request(kv, completion("d"))
        fake.fault["/lookup"] = "garbage"
        before = fake.calls["/lookup"]
        hint = await request(kv, completion("d"))
        assert hint.reason == "error"
        assert fake.calls["/lookup"] == before + 2  # one routing try, one background try


async def test_hot_prompt_is_pinned_once_where_its_prefix_is(upstream: Upstream) -> None:
    fake, url = upstream
    fake.layout = {"engine-a": ("LocalCPUBackend", 256)}
    config = kv_config(url, cache_strategy=CacheStrategyConfig(enable_pinning=True, hot_content_threshold=2))
    async with open_kvcache(config) as kv:
        await request(kv, completion("hot"))
        assert fake.calls["/pin"] == 0
        await request(kv, completion("hot"))
        assert fake.bodies["/pin"] == [{"tokens": fake_tokens("hot"), "instance_id": "engine-a",
                                        "location": "LocalCPUBackend"}]
        await request(kv, completion("hot"))
        assert fake.calls["/pin"] == 1
        assert kv.stats.actions["pin"]["ok"] == 1 and kv.stats.actions["pin"]["recent"] == 1
        # The third request had nothing left to do: no background job was started for it.
        assert kv.stats.background_started == 2 and kv.stats.background_skipped == 1


def pressure(cpu: float = 0.0, memory: float = 0.0) -> Any:
    return lambda: HostLoad(cpu=cpu, memory=memory)


async def test_compress_under_cpu_load(upstream: Upstream) -> None:
    fake, url = upstream
    fake.layout = {"engine-a": ("LocalCPUBackend", 256)}
    strategy = CacheStrategyConfig(enable_compression=True, load_threshold=0.5, compress_method="lz4")
    async with open_kvcache(kv_config(url, cache_strategy=strategy, load_sample_interval=0.005),
                            read_host_load=pressure(cpu=0.9)) as kv:
        await wait_until(lambda: kv.host_load is not None)
        await request(kv, completion("c"))
    assert fake.bodies["/compress"] == [{"tokens": fake_tokens("c"), "instance_id": "engine-a",
                                         "location": "LocalCPUBackend", "method": "lz4"}]


@pytest.mark.parametrize("status", ["404", "405"])
async def test_missing_evict_is_detected_once_and_not_replaced_silently(
        upstream: Upstream, status: str, caplog: pytest.LogCaptureFixture) -> None:
    fake, url = upstream
    fake.layout = {"engine-a": ("LocalCPUBackend", 256)}
    fake.fault["/evict"] = status
    strategy = CacheStrategyConfig(enable_eviction=True, memory_threshold=0.8)
    async with open_kvcache(kv_config(url, cache_strategy=strategy, load_sample_interval=0.005),
                            read_host_load=pressure(memory=0.95)) as kv:
        await wait_until(lambda: kv.host_load is not None)
        with caplog.at_level(logging.WARNING, logger="pixiu_kv.kvcache"):
            for text in ("a", "b", "c"):
                await request(kv, completion(text))
        assert kv.evict_supported is False
        assert fake.calls["/evict"] == 1 and fake.calls["/clear"] == 0
        assert kv.stats.actions["evict"]["unsupported"] == 3
        assert len([r for r in caplog.records if "/evict" in r.getMessage()]) == 1
        assert kv.stats.breakers["lmcache_background"] == "closed"


async def test_missing_evict_falls_back_to_clear_only_when_configured(upstream: Upstream) -> None:
    fake, url = upstream
    fake.layout = {"engine-a": ("LocalDiskBackend", 256)}
    fake.fault["/evict"] = "404"
    strategy = CacheStrategyConfig(enable_eviction=True, memory_threshold=0.8, evict_fallback_to_clear=True)
    async with open_kvcache(kv_config(url, cache_strategy=strategy, load_sample_interval=0.005),
                            read_host_load=pressure(memory=0.95)) as kv:
        await wait_until(lambda: kv.host_load is not None)
        await request(kv, completion("a"))
        await request(kv, completion("b"))
    assert fake.calls["/evict"] == 1
    assert fake.bodies["/clear"] == [{"instance_id": "engine-a", "location": "LocalDiskBackend"}] * 2
    assert kv.stats.actions["evict"]["cleared"] == 2


async def test_evict_where_supported(upstream: Upstream) -> None:
    fake, url = upstream
    fake.layout = {"engine-a": ("LocalCPUBackend", 256)}
    strategy = CacheStrategyConfig(enable_eviction=True, memory_threshold=0.8)
    async with open_kvcache(kv_config(url, cache_strategy=strategy, load_sample_interval=0.005),
                            read_host_load=pressure(memory=0.95)) as kv:
        await wait_until(lambda: kv.host_load is not None)
        await request(kv, completion("a"))
        assert kv.evict_supported is True
    assert fake.bodies["/evict"] == [{"tokens": fake_tokens("a"), "instance_id": "engine-a"}]


async def test_cancellations_do_not_leak_pool_connections(upstream: Upstream) -> None:
    """Requests cancelled at every stage (before connecting, connecting, waiting) leave no
    connection open and a small pool usable (httpcore can leak a slot when cancelled while
    connecting), and every cancelled job is counted as cancelled."""
    fake, url = upstream
    port = int(url.rsplit(":", 1)[1])
    fake.fault["/tokenize"] = "hang"
    rng = random.Random(5)
    async with open_kvcache(kv_config(url), http_pool_size=2) as kv:
        for i in range(20):
            async with trio.open_nursery() as nursery:
                for j in range(8):
                    await kv.route(completion(f"p{i}-{j}"), nursery)
                for _ in range(rng.randrange(4)):
                    await trio.lowlevel.checkpoint()
                if i % 4 == 3:
                    await fake.wait_for(lambda: _in_flight(fake, "/tokenize"))
                nursery.cancel_scope.cancel()
            assert client_sockets_to(port) == 0
        stats = kv.stats
        assert stats.background_started == stats.background_cancelled == 160
        fake.fault.clear()
        await request(kv, completion("after"))
        assert kv.stats.tokenize_failures == 0
        assert kv.stats.token_cache_size == 1


def client_sockets_to(port: int) -> int:
    """ESTABLISHED connections of this process to ``port`` (its client side)."""
    return sum(1 for c in psutil.Process().net_connections(kind="tcp")
               if c.status == psutil.CONN_ESTABLISHED and c.raddr and c.raddr.port == port)
