"""HTTP clients to the engines: one keep-alive connection pool per endpoint.

The request path uses :mod:`pixiu_kv.upstream.http11`, the lean HTTP/1.1 client: the proxy
spends its CPU in the two HTTP hops, and httpx (and even httpcore's pool under it) cost
two to three times more CPU per request than a client that sends a request in one write
and carries no model, tracing or generator layers (numbers in ``docs/architecture.md``).
Health checks and ``/v1/models`` use an httpx client; they are off the hot path.

Timeouts are set deliberately, because general-purpose defaults (httpx: 5 s for everything,
20 kept-alive connections) cut slow first tokens and churn connections under load:

* connect: ``llm_proxy.connect_timeout``;
* writing the request: ``llm_proxy.idle_timeout``;
* first byte and idle gaps between chunks: enforced by the proxy with trio cancel scopes
  (``first_byte_timeout`` until the response head, ``idle_timeout`` between chunks), so a
  long healthy stream is never cut;
* pool: at most the endpoint's in-flight cap of connections (itself at most
  ``max_connections_per_endpoint``), all of them kept alive; the proxy never has more
  requests in flight to an endpoint, so a request never waits for a connection.
"""

from __future__ import annotations

import http.cookiejar
import ssl
from collections.abc import AsyncIterator, Iterable
from contextlib import AsyncExitStack, asynccontextmanager

import httpx
import trio

from ..cluster import Endpoint
from ..config import LlmProxyConfig
from .http11 import Http11Pool, UpstreamConnectError, UpstreamResponse, system_tls_context
from .resilience import UpstreamError

__all__ = [
    "EngineClients",
    "UpstreamConnectError",
    "UpstreamError",
    "UpstreamResponse",
    "open_engine_clients",
    "probe_health",
]


def _no_cookies() -> http.cookiejar.CookieJar:
    # A proxy must not collect engines' cookies into one shared jar (it would grow unbounded
    # and leak state between clients).
    return http.cookiejar.CookieJar(policy=http.cookiejar.DefaultCookiePolicy(allowed_domains=[]))


def _tls_context(endpoints: list[Endpoint]) -> ssl.SSLContext:
    """One context shared by every client: httpx would otherwise load certificates per client.

    Without any https endpoint no certificate is ever checked, so the trust store is not
    loaded at all (the context still verifies, should it ever be used).
    """
    if any(e.config.address.startswith("https:") for e in endpoints):
        return system_tls_context()
    return ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)


def _client(config: LlmProxyConfig, pool_size: int, tls: ssl.SSLContext) -> httpx.AsyncClient:
    return httpx.AsyncClient(
        verify=tls,
        timeout=httpx.Timeout(connect=config.connect_timeout, read=None,
                              write=config.idle_timeout, pool=config.connect_timeout),
        limits=httpx.Limits(max_connections=pool_size, max_keepalive_connections=pool_size,
                            keepalive_expiry=config.keepalive_expiry),
        trust_env=False,
        follow_redirects=False,
        cookies=_no_cookies(),
    )


class EngineClients:
    """The connection pools, keyed by endpoint id. Owned by the gateway's lifespan."""

    __slots__ = ("_pools", "config", "health", "models")

    def __init__(self, config: LlmProxyConfig, pools: dict[str, Http11Pool], health: httpx.AsyncClient,
                 models: httpx.AsyncClient) -> None:
        self.config = config
        self._pools = pools
        # Health checks use their own small pool: a pool full of long streams must not make
        # a healthy engine's checks wait for a slot and fail.
        self.health = health
        # ``GET /v1/models`` fan-outs get their own pool too, so a burst of them can never
        # starve the health checks (and mark healthy engines down).
        self.models = models

    def pool(self, endpoint_id: str) -> Http11Pool:
        return self._pools[endpoint_id]

    async def send(self, endpoint: Endpoint, method: str, target: bytes,
                   headers: list[tuple[bytes, bytes]], body: bytes) -> UpstreamResponse:
        """Send a request to ``endpoint`` (its address's path prefixed to ``target``)."""
        return await self._pools[endpoint.config.id].send(method.encode("ascii"), target, headers, body)


@asynccontextmanager
async def open_engine_clients(config: LlmProxyConfig,
                              endpoints: Iterable[Endpoint]) -> AsyncIterator[EngineClients]:
    """One pool per endpoint, sized to the endpoint's in-flight cap; all closed on exit."""
    async with AsyncExitStack() as stack:
        pools: dict[str, Http11Pool] = {}
        endpoints = list(endpoints)
        tls = _tls_context(endpoints)
        for endpoint in endpoints:
            pool = Http11Pool(
                endpoint.config.address,
                max_connections=min(endpoint.max_in_flight, config.max_connections_per_endpoint),
                connect_timeout=config.connect_timeout, write_timeout=config.idle_timeout,
                keepalive_expiry=config.keepalive_expiry, tls=tls)
            stack.callback(pool.close)
            pools[endpoint.id] = pool
        health = await stack.enter_async_context(_client(config, max(1, len(endpoints)), tls))
        models = await stack.enter_async_context(_client(config, max(1, len(endpoints)), tls))
        yield EngineClients(config, pools, health, models)


async def probe_health(client: httpx.AsyncClient, url: str, within: float, api_key: str = "") -> bool:
    """One active health check: a 2xx within ``within`` seconds (with the endpoint's key, for
    engines behind an authenticating front)."""
    headers = {"accept": "*/*"}
    if api_key:
        headers["authorization"] = f"Bearer {api_key}"
    with trio.move_on_after(within):
        try:
            response = await client.get(url, headers=headers)
        except httpx.HTTPError:
            return False
        return 200 <= response.status_code < 300
    return False
