"""``dgp.filter.ai.kvcache`` as a gateway decode filter: a thin adapter over the core.

The filter sets the request's ``preferred_endpoint_id`` (Pixiu's
``llm_preferred_endpoint_id``) and ``route_hint``, starts cache management in the request's
:class:`~pixiu_kv.context.BackgroundScope`, and tells the gateway how long that work may
outlive a completed response (``ctx.values["background_grace"]``).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

import attrs
import trio

from ...config import KvCacheConfig
from ...context import RequestContext
from ...hostload import HostLoad
from ...routing import RoutingInput, session_key_of
from ...routing.hook import ROUTING_HOOK_KEY, RoutingHook
from .core import DEFAULT_HTTP_POOL_SIZE, KvCache, open_kvcache_core

__all__ = ["BACKGROUND_GRACE", "KvCacheFilter", "PassThroughFilter", "open_kvcache_filter"]

BACKGROUND_GRACE = "background_grace"
"""Key in ``ctx.values``: seconds background work may run on after a completed response."""


class KvCacheFilter:
    __slots__ = ("kv",)

    def __init__(self, kv: KvCache) -> None:
        self.kv = kv

    @property
    def request_timeout(self) -> float:
        return self.kv.config.request_timeout

    @property
    def background_grace(self) -> float:
        """How long the gateway should let background work finish after a response."""
        return self.kv.config.request_timeout

    def endpoint_down(self, endpoint_id: str) -> None:
        """The gateway saw ``endpoint_id`` turn unhealthy: its engine may restart empty, so
        the router forgets what it believed that engine holds."""
        decider = self.kv.decider
        if decider is not None:
            decider.forget_endpoint(endpoint_id)

    async def decode(self, ctx: RequestContext) -> None:
        # Before anything is spawned, so the gateway always knows the grace of started work.
        ctx.values[BACKGROUND_GRACE] = self.kv.config.request_timeout
        hint, routing_input = await self.kv.process_routed(ctx.json, ctx.background.start_soon)
        if hint is not None:
            ctx.route_hint = hint
            ctx.preferred_endpoint_id = hint.endpoint_id
        decider = self.kv.decider
        if decider is not None:
            # The router decides when the proxy picks (fresh endpoint state), through a hook.
            session = session_key_of(ctx.headers, ctx.json, decider.config.session_header)
            inp = routing_input or RoutingInput()
            compressor = self.kv.compress_prefix if decider.config.compress_when_full else None
            hook = RoutingHook(decider, attrs.evolve(inp, session_key=session), ctx, compressor)
            ctx.values[ROUTING_HOOK_KEY] = hook
            await ctx.background.start_soon(hook.watch)


class PassThroughFilter:
    """The filter with ``enabled = false``: touches nothing."""

    __slots__ = ()

    request_timeout = 0.0
    background_grace = 0.0

    async def decode(self, ctx: RequestContext) -> None:
        return None


@asynccontextmanager
async def open_kvcache_filter(config: KvCacheConfig, nursery: trio.Nursery, *,
                              http_pool_size: int = DEFAULT_HTTP_POOL_SIZE,
                              read_host_load: Callable[[], HostLoad] | None = None,
                              ) -> AsyncIterator[KvCacheFilter | PassThroughFilter]:
    """The decode filter; ``nursery`` is the gateway's long-lived one (host-load sampler)."""
    if not config.enabled:
        yield PassThroughFilter()
        return
    async with open_kvcache_core(config, nursery, http_pool_size=http_pool_size,
                                 read_host_load=read_host_load) as kv:
        yield KvCacheFilter(kv)
