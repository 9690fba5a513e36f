"""The gateway adapter: RequestContext in, hint and background work out."""

from __future__ import annotations

from typing import Any

import trio
from kv_fakes import FakeUpstream, kv_config, wait_until

from pixiu_kv.context import BackgroundScope, RequestContext, RouteHint
from pixiu_kv.filters.kvcache import BACKGROUND_GRACE, KvCacheFilter, PassThroughFilter, open_kvcache_filter

Upstream = tuple[FakeUpstream, str]


def context(nursery: trio.Nursery, body: Any) -> RequestContext:
    return RequestContext(request_id="r", method="POST", path="/v1/completions", headers=[], body=b"",
                          json=body, cluster_name="main", background=BackgroundScope(nursery))


async def test_decode_sets_hint_and_grace_and_returns_before_background_work(
        upstream: Upstream, nursery: trio.Nursery) -> None:
    fake, url = upstream
    fake.layout = {"engine-a": ("LocalCPUBackend", 256)}
    async with open_kvcache_filter(kv_config(url, request_timeout=7.0), nursery) as kv_filter:
        assert isinstance(kv_filter, KvCacheFilter)
        assert kv_filter.background_grace == 7.0
        fake.fault["/tokenize"] = "hold"
        first = context(nursery, {"model": "m", "prompt": "p"})
        await kv_filter.decode(first)  # returns while /tokenize is held
        assert first.route_hint == RouteHint(None, "no_tokens")
        assert first.preferred_endpoint_id is None
        assert first.values[BACKGROUND_GRACE] == 7.0
        await fake.wait_for(lambda: fake.calls["/tokenize"] == 1)
        # The response completed: the held work may finish within the grace period.
        first.background.finish(7.0)
        fake.release.set()
        await wait_until(lambda: kv_filter.kv.stats.background_finished == 1)
        second = context(nursery, {"model": "m", "prompt": "p"})
        await kv_filter.decode(second)
        assert second.preferred_endpoint_id == "engine-a"
        assert second.route_hint == RouteHint("engine-a", "kv_prefix", 256, 1)
        second.background.finish(7.0)
        unrelated = context(nursery, {"model": "m", "prompt": "q"})
        await kv_filter.decode(unrelated)
        assert unrelated.preferred_endpoint_id is None
        unrelated.background.cancel()


async def test_disconnect_cancels_background_work_at_once(upstream: Upstream, nursery: trio.Nursery) -> None:
    fake, url = upstream
    fake.fault["/tokenize"] = "hang"
    async with open_kvcache_filter(kv_config(url), nursery) as kv_filter:
        assert isinstance(kv_filter, KvCacheFilter)
        ctx = context(nursery, {"model": "m", "prompt": "p"})
        await kv_filter.decode(ctx)
        await fake.wait_for(lambda: fake.calls["/tokenize"] == 1)
        ctx.background.cancel()
        await fake.wait_for(lambda: fake.aborted["/tokenize"] == 1)
        await wait_until(lambda: kv_filter.kv.stats.background_cancelled == 1)


async def test_body_without_prompt_is_untouched(upstream: Upstream, nursery: trio.Nursery) -> None:
    fake, url = upstream
    async with open_kvcache_filter(kv_config(url), nursery) as kv_filter:
        ctx = context(nursery, {"model": "m", "input": "embeddings"})
        await kv_filter.decode(ctx)
        assert ctx.route_hint is None and ctx.preferred_endpoint_id is None
        ctx.background.finish(1.0)
    assert sum(fake.calls.values()) == 0


async def test_disabled_filter_passes_through(nursery: trio.Nursery) -> None:
    async with open_kvcache_filter(kv_config("http://127.0.0.1:9", enabled=False), nursery) as kv_filter:
        assert isinstance(kv_filter, PassThroughFilter)
        ctx = context(nursery, {"model": "m", "prompt": "p"})
        await kv_filter.decode(ctx)
        assert ctx.route_hint is None and ctx.values == {}
