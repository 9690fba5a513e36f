"""Everything the gateway owns while it runs, opened and closed as one structured unit.

Opening order: connection pools, then the gateway nursery (health checks, filters'
background work, per-request BackgroundScopes), then the decode filters. Closing runs in
reverse: filters close, the nursery is cancelled (health checks and leftover background
work stop), then the pools close.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any

import attrs
import trio

from ._routing import RouteTable
from .chain import DecodeFilter
from .cluster import Cluster, Endpoint
from .config import GatewayConfig, KvCacheConfig
from .filters.llm_proxy import LlmProxyFilter
from .logs import log_event
from .upstream.engine import EngineClients, open_engine_clients, probe_health

__all__ = ["DEFAULT_BACKGROUND_GRACE", "Runtime", "open_runtime"]

DEFAULT_BACKGROUND_GRACE = 2.0
_log = logging.getLogger("pixiu_kv.health")


@attrs.define(slots=True, eq=False)
class Runtime:
    config: GatewayConfig
    clusters: dict[str, Cluster]
    clients: EngineClients
    nursery: trio.Nursery
    routes: RouteTable
    decode_filters: list[DecodeFilter]
    proxy: LlmProxyFilter
    # Seconds a request's background work may continue after its response completed.
    background_grace: float = DEFAULT_BACKGROUND_GRACE


async def _open_kvcache(config: KvCacheConfig, nursery: trio.Nursery,
                        stack: AsyncExitStack) -> DecodeFilter:
    try:
        from .filters.kvcache import open_kvcache_filter  # type: ignore[attr-defined,unused-ignore]
    except ImportError as exc:
        raise RuntimeError("the kvcache filter is enabled but pixiu_kv.filters.kvcache."
                           f"open_kvcache_filter is not available: {exc}") from None
    kv_filter: DecodeFilter = await stack.enter_async_context(open_kvcache_filter(config, nursery))
    return kv_filter


async def _health_loop(cluster: Cluster, endpoint: Endpoint, clients: EngineClients,
                       on_down: Callable[[str], None] = lambda _: None) -> None:
    hc = cluster.config.health_check
    url = endpoint.config.address.rstrip("/") + hc.path
    while True:
        ok = await probe_health(clients.health, url, hc.timeout, endpoint.config.api_key)
        if cluster.record_check(endpoint, ok):
            log_event(_log, logging.WARNING if not endpoint.healthy else logging.INFO,
                      "endpoint_health_changed", cluster=cluster.name, endpoint=endpoint.id,
                      healthy=endpoint.healthy)
            if not endpoint.healthy:
                on_down(endpoint.id)
        await trio.sleep(hc.interval)


def _down_notifier(filters: Sequence[DecodeFilter]) -> Callable[[str], None]:
    """Tells every filter with an ``endpoint_down(endpoint_id)`` hook (the kvcache router:
    a restarted engine's cache is empty) that an endpoint turned unhealthy."""
    hooks = [hook for f in filters if callable(hook := getattr(f, "endpoint_down", None))]

    def notify(endpoint_id: str) -> None:
        for hook in hooks:
            hook(endpoint_id)
    return notify


@asynccontextmanager
async def open_runtime(config: GatewayConfig,
                       extra_filters: Sequence[DecodeFilter] = ()) -> AsyncIterator[Runtime]:
    proxy_config = config.llm_proxy
    clusters = {c.name: Cluster(c, max_connections_per_endpoint=proxy_config.max_connections_per_endpoint)
                for c in config.clusters}
    endpoints = [e for c in clusters.values() for e in c.endpoints]
    async with open_engine_clients(proxy_config, endpoints) as clients, trio.open_nursery() as nursery:
        try:
            async with AsyncExitStack() as stack:
                decode_filters: list[DecodeFilter] = []
                grace = DEFAULT_BACKGROUND_GRACE
                for item in config.http_filters[:-1]:
                    if isinstance(item.config, KvCacheConfig):
                        # Disabled means a pure pass-through: leave it out of the chain.
                        if not item.config.enabled:
                            continue
                        decode_filters.append(await _open_kvcache(item.config, nursery, stack))
                        grace = max(grace, item.config.request_timeout)
                decode_filters.extend(extra_filters)
                for f in decode_filters:
                    grace = max(grace, _grace_of(f))
                on_down = _down_notifier(decode_filters)
                for cluster in clusters.values():
                    if cluster.config.health_check.enabled:
                        for endpoint in cluster.endpoints:
                            nursery.start_soon(_health_loop, cluster, endpoint, clients, on_down)
                yield Runtime(
                    config=config, clusters=clusters, clients=clients, nursery=nursery,
                    routes=RouteTable(config.routes), decode_filters=decode_filters,
                    proxy=LlmProxyFilter(proxy_config, clusters, clients),
                    background_grace=grace,
                )
        finally:
            nursery.cancel_scope.cancel()


def _grace_of(f: Any) -> float:
    """A decode filter may declare ``background_grace`` (seconds) for its background work."""
    value = getattr(f, "background_grace", None)
    return float(value) if isinstance(value, int | float) and value >= 0 else 0.0
