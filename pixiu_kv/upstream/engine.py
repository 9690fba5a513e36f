"""HTTP clients to the engines: one connection pool per endpoint.

The request path uses httpcore's pool directly (the transport under httpx): the httpx layer
above it (URL and header models, auth and redirect machinery, a cookie jar) cost about 15% of
the gateway's CPU per request and a proxy needs none of it. Health checks and ``/v1/models``
use an httpx client.

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
from urllib.parse import urlsplit

import attrs
import httpcore
import httpx
import trio

from ..cluster import Endpoint
from ..config import LlmProxyConfig

__all__ = ["CONNECT_ERRORS", "TRANSPORT_ERRORS", "EngineClients", "open_engine_clients", "probe_health"]

# Failures to reach an engine at all (passive health signals).
CONNECT_ERRORS = (httpcore.ConnectError, httpcore.ConnectTimeout, httpcore.PoolTimeout)
# Every failure of the transport (connection lost, protocol violation, timeout).
TRANSPORT_ERRORS = (httpcore.NetworkError, httpcore.ProtocolError, httpcore.TimeoutException)


@attrs.frozen
class _Origin:
    scheme: bytes
    host: bytes
    port: int
    host_header: bytes
    base_path: bytes

    @classmethod
    def of(cls, address: str) -> _Origin:
        parts = urlsplit(address)
        scheme = parts.scheme.encode()
        port = parts.port or (443 if scheme == b"https" else 80)
        return cls(scheme, (parts.hostname or "").encode("idna"), port,
                   parts.netloc.rsplit("@", 1)[-1].encode("idna"), parts.path.rstrip("/").encode())


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

    __slots__ = ("_extensions", "_origins", "_pools", "config", "health")

    def __init__(self, config: LlmProxyConfig, pools: dict[str, httpcore.AsyncConnectionPool],
                 health: httpx.AsyncClient) -> None:
        self.config = config
        self._pools = pools
        self._origins: dict[str, _Origin] = {}
        # Read timeout off: the proxy enforces first-byte and idle deadlines itself.
        self._extensions = {"timeout": {"connect": config.connect_timeout, "pool": config.connect_timeout,
                                        "write": config.idle_timeout, "read": None}}
        # Health checks use their own small pool: a pool full of long streams must not make
        # a healthy engine's checks wait for a slot and fail.
        self.health = health

    def pool(self, endpoint_id: str) -> httpcore.AsyncConnectionPool:
        return self._pools[endpoint_id]

    def request(self, endpoint: Endpoint, method: str, target: bytes,
                headers: list[tuple[bytes, bytes]], body: bytes) -> httpcore.Request:
        """The upstream request, with exactly the given headers plus Host and Content-Length."""
        origin = self._origins.get(endpoint.id)
        if origin is None:
            origin = self._origins[endpoint.id] = _Origin.of(endpoint.config.address)
        headers = [(b"host", origin.host_header), *headers]
        if body or method not in ("GET", "HEAD"):
            headers.append((b"content-length", str(len(body)).encode()))
        url = httpcore.URL(scheme=origin.scheme, host=origin.host, port=origin.port,
                           target=origin.base_path + target)
        return httpcore.Request(method.encode(), url, headers=headers, content=body,
                                extensions=self._extensions)


@asynccontextmanager
async def open_engine_clients(config: LlmProxyConfig,
                              endpoints: Iterable[Endpoint]) -> AsyncIterator[EngineClients]:
    """One pool per endpoint, sized to the endpoint's in-flight cap; all closed on exit."""
    async with AsyncExitStack() as stack:
        pools: dict[str, httpcore.AsyncConnectionPool] = {}
        endpoints = list(endpoints)
        tls = _tls_context(endpoints)
        for endpoint in endpoints:
            size = min(endpoint.max_in_flight, config.max_connections_per_endpoint)
            pools[endpoint.id] = await stack.enter_async_context(httpcore.AsyncConnectionPool(
                ssl_context=tls, max_connections=size, max_keepalive_connections=size,
                keepalive_expiry=config.keepalive_expiry, http1=True, http2=False, retries=0))
        health = await stack.enter_async_context(_client(config, max(1, len(endpoints)), tls))
        yield EngineClients(config, pools, health)


async def probe_health(client: httpx.AsyncClient, url: str, within: float) -> bool:
    """One active health check: a 2xx within ``within`` seconds."""
    with trio.move_on_after(within):
        try:
            response = await client.get(url, headers={"accept": "*/*"})
        except httpx.HTTPError:
            return False
        return 200 <= response.status_code < 300
    return False
