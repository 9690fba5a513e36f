"""The kvcache filter's core against a real lmcache_controller: real /lookup replies parse,
routing follows the instance the controller reports, /pin reaches the worker, and the
missing /evict is detected."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from functools import partial
from typing import Any

import httpx
import hypercorn.config
import hypercorn.trio
import pytest
import trio
from real_controller_support import RealController

from pixiu_kv.config import CacheStrategyConfig, KvCacheConfig, TokenCacheConfig
from pixiu_kv.context import RouteHint
from pixiu_kv.filters.kvcache import KvCache, open_kvcache
from pixiu_kv.hostload import HostLoad
from pixiu_kv.sim.controller import MemoryTier
from pixiu_kv.sim.lmcache_link import chunk_keys
from pixiu_kv.sim.lmcache_worker import open_lmcache_worker

pytestmark = pytest.mark.integration

WAIT_S = 15.0


def prompt_ids(n: int, salt: int) -> list[int]:
    return [(i * 37 + salt * 104729) % 32_000 for i in range(n)]


class Tokenizer:
    """``POST /tokenize``: the ids registered for a prompt text (what an engine would give)."""

    def __init__(self, prompts: dict[str, list[int]]) -> None:
        self.prompts = prompts

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while (await receive())["type"] != "lifespan.shutdown":
                await send({"type": "lifespan.startup.complete"})
            await send({"type": "lifespan.shutdown.complete"})
            return
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        tokens = self.prompts[json.loads(body)["prompt"]]
        reply = json.dumps({"count": len(tokens), "tokens": tokens, "max_model_len": 32768}).encode()
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-type", b"application/json")],
            }
        )
        await send({"type": "http.response.body", "body": reply})


async def serve(nursery: trio.Nursery, app: Any) -> str:
    config = hypercorn.config.Config()
    config.bind = ["127.0.0.1:0"]
    config.accesslog = None
    config.graceful_timeout = 0.1
    binds = await nursery.start(
        partial(hypercorn.trio.serve, app, config, shutdown_trigger=trio.Event().wait)
    )
    return str(binds[0])


async def eventually(check: Callable[[], Awaitable[bool]]) -> None:
    """The controller applies pushed chunk batches asynchronously: poll until it has them."""
    with trio.fail_after(WAIT_S):
        while not await check():  # noqa: ASYNC110 - the controller announces nothing
            await trio.sleep(0.05)


async def request(kv: KvCache, text: str) -> RouteHint:
    async with trio.open_nursery() as nursery:
        hint = await kv.route({"model": "m", "prompt": text}, nursery)
    return hint


async def test_routes_to_the_instance_the_real_controller_reports(
    real_controller: RealController, nursery: trio.Nursery
) -> None:
    tokens = prompt_ids(1100, salt=11)
    tokenizer_url = await serve(nursery, Tokenizer({"doc": tokens}))
    config = KvCacheConfig(
        enabled=True,
        vllm_endpoint=tokenizer_url,
        lmcache_endpoint=real_controller.url,
        lookup_routing_timeout=5.0,
        request_timeout=10.0,
        token_cache=TokenCacheConfig(enabled=True),
        cache_strategy=CacheStrategyConfig(
            enable_pinning=True, hot_content_threshold=2, enable_eviction=True, memory_threshold=0.5
        ),
        load_sample_interval=0.01,
    )
    c_tier, d_tier = MemoryTier(), MemoryTier()
    host, ports = real_controller.host, real_controller.ports
    async with (
        open_lmcache_worker(host, ports, "it-kv-C", c_tier) as c_sink,
        open_lmcache_worker(host, ports, "it-kv-D", d_tier) as d_sink,
        httpx.AsyncClient(base_url=real_controller.url, timeout=10.0) as http,
    ):
        c_tier.attach(c_sink)
        d_tier.attach(d_sink)
        c_tier.store(tokens[:600])
        d_tier.store(tokens)

        async def both_reported() -> bool:
            layout = (await http.post("/lookup", json={"tokens": tokens})).json()["layout_info"]
            return bool(layout.get("it-kv-D", [None, 0])[1] == 1024 and "it-kv-C" in layout)

        await eventually(both_reported)
        async with open_kvcache(config, read_host_load=lambda: HostLoad(cpu=0.0, memory=0.9)) as kv:
            with trio.fail_after(WAIT_S):
                while kv.host_load is None:  # noqa: ASYNC110 - first sample of the fake reading
                    await trio.sleep(0.01)
            # First sight: not routed; tokenized, looked up, and (memory pressure) evicted,
            # which the real controller does not support.
            assert await request(kv, "doc") == RouteHint(None, "no_tokens")
            assert kv.evict_supported is False
            assert kv.stats.actions["evict"]["unsupported"] == 1
            assert kv.stats.background_lookups_ok == 1
            # Second: routed to the longest holder; the prompt is hot now, so pinned there
            # (pin wins over evict).
            assert await request(kv, "doc") == RouteHint("it-kv-D", "kv_prefix", 1024, 1100)
            assert kv.stats.actions["pin"]["ok"] == 1
            assert d_tier.pinned_keys == frozenset(chunk_keys(tokens))
            assert not c_tier.pinned_keys
            assert set(kv.stats.breakers.values()) == {"closed"}
