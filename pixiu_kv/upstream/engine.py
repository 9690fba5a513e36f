"""HTTP clients to the engines: one httpx connection pool per endpoint.

Timeouts are set deliberately, because httpx's defaults (5 s for everything, 20 kept-alive
connections) cut slow first tokens and churn connections under load:

* connect: ``llm_proxy.connect_timeout`` (also bounds waiting for a pool slot, which the
  per-endpoint in-flight cap makes rare);
* first byte and idle gaps between chunks: enforced by the proxy with trio cancel scopes
  (``first_byte_timeout`` until the response headers, ``idle_timeout`` between chunks), so the
  client's own read timeout is off and a long healthy stream is never cut;
* pool: ``max_connections_per_endpoint`` connections, all of them kept alive.
"""

from __future__ import annotations

import functools
import http.cookiejar
import ssl
from collections.abc import AsyncIterator, Iterable
from contextlib import AsyncExitStack, asynccontextmanager

import httpx
import trio

from ..cluster import Endpoint
from ..config import LlmProxyConfig

__all__ = ["EngineClients", "open_engine_clients", "probe_health"]


def _no_cookies() -> http.cookiejar.CookieJar:
    # A proxy must not collect engines' cookies into one shared jar (it would grow unbounded
    # and leak state between clients).
    return http.cookiejar.CookieJar(policy=http.cookiejar.DefaultCookiePolicy(allowed_domains=[]))


@functools.cache
def _trust_store_context() -> ssl.SSLContext:
    """The system trust store, loaded once per process (loading it costs ~0.1 s)."""
    return ssl.create_default_context()


def _tls_context(endpoints: list[Endpoint]) -> ssl.SSLContext:
    """One context shared by every pool: httpx would otherwise load certificates per client.

    Without any https endpoint no certificate is ever checked, so the trust store is not
    loaded at all (the context still verifies, should it ever be used).
    """
    if any(e.config.address.startswith("https:") for e in endpoints):
        return _trust_store_context()
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

    __slots__ = ("_clients", "config", "health")

    def __init__(self, config: LlmProxyConfig, clients: dict[str, httpx.AsyncClient],
                 health: httpx.AsyncClient) -> None:
        self.config = config
        self._clients = clients
        # Health checks use their own small pool: a pool full of long streams must not make
        # a healthy engine's checks wait for a slot and fail.
        self.health = health

    def client(self, endpoint_id: str) -> httpx.AsyncClient:
        return self._clients[endpoint_id]

    def request(self, endpoint: Endpoint, method: str, path_and_query: str,
                headers: list[tuple[bytes, bytes]], body: bytes) -> httpx.Request:
        """Build the upstream request directly, so the client adds no default headers."""
        url = endpoint.config.address.rstrip("/") + path_and_query
        return httpx.Request(method, url, headers=headers,
                             content=body if body or method not in ("GET", "HEAD") else None)


@asynccontextmanager
async def open_engine_clients(config: LlmProxyConfig,
                              endpoints: Iterable[Endpoint]) -> AsyncIterator[EngineClients]:
    """One pool per endpoint, sized to the endpoint's in-flight cap; all closed on exit."""
    async with AsyncExitStack() as stack:
        clients: dict[str, httpx.AsyncClient] = {}
        endpoints = list(endpoints)
        tls = _tls_context(endpoints)
        for endpoint in endpoints:
            size = min(endpoint.max_in_flight, config.max_connections_per_endpoint)
            clients[endpoint.id] = await stack.enter_async_context(_client(config, size, tls))
        health = await stack.enter_async_context(_client(config, max(1, len(endpoints)), tls))
        yield EngineClients(config, clients, health)


async def probe_health(client: httpx.AsyncClient, url: str, within: float) -> bool:
    """One active health check: a 2xx within ``within`` seconds."""
    with trio.move_on_after(within):
        try:
            response = await client.get(url, headers={"accept": "*/*"})
        except httpx.HTTPError:
            return False
        return 200 <= response.status_code < 300
    return False
