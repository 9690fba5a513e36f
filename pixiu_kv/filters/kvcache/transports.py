"""The HTTP transports of the kvcache filter: one connection pool per upstream use.

Plain ``http://`` upstreams (the usual case: vLLM and the LMCache controller next to the
gateway) get the small HTTP/1.1 client of :mod:`.http11`: a fraction of httpx's CPU per call,
and a connection is closed the moment its call is cancelled, so a client disconnect can never
leave a pool slot behind. ``https://`` upstreams get an httpx client (TLS, certificates).
"""

from __future__ import annotations

import functools

import httpx

from ...upstream.lmcache import JsonPost, httpx_post
from .http11 import Http11Pool

__all__ = ["Transports"]


class Transports:
    """Creates the pools and closes them all together."""

    __slots__ = ("_clients", "_pool_size", "_pools", "_timeout", "_tls")

    def __init__(self, pool_size: int, timeout: float) -> None:
        self._pool_size = pool_size
        self._timeout = timeout  # httpx only; every call also runs under its own deadline
        self._pools: list[Http11Pool] = []
        self._clients: list[httpx.AsyncClient] = []
        # Loading the CA bundle costs tens of ms: at most once, and only for https.
        self._tls = functools.cache(httpx.create_ssl_context)

    def post(self, base_url: str, max_reply_bytes: int) -> JsonPost:
        """A JSON POST function on a pool of its own for ``base_url``."""
        if base_url.startswith("http:"):
            pool = Http11Pool(base_url, max_connections=self._pool_size, max_reply_bytes=max_reply_bytes)
            self._pools.append(pool)
            return pool.post_json
        client = httpx.AsyncClient(
            base_url=base_url,
            timeout=httpx.Timeout(self._timeout),
            limits=httpx.Limits(max_connections=self._pool_size, max_keepalive_connections=self._pool_size),
            follow_redirects=False,
            trust_env=False,
            verify=self._tls(),
        )
        self._clients.append(client)
        return httpx_post(client, max_reply_bytes)

    async def aclose(self) -> None:
        for pool in self._pools:
            pool.close()
        for client in self._clients:
            await client.aclose()
