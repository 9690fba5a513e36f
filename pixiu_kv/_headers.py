"""Header rewriting between the client and the engines (pure functions).

Hop-by-hop headers describe one connection, not the message, so they are dropped in both
directions (RFC 9110 7.6.1), together with any header the ``Connection`` header names.
Headers the gateway itself speaks (``x-pixiu-kv-*``) are never taken from a client.
"""

from __future__ import annotations

from collections.abc import Iterable

__all__ = [
    "GATEWAY_PREFIX",
    "HOP_BY_HOP",
    "header_value",
    "request_headers_for_upstream",
    "response_headers_for_client",
]

Headers = list[tuple[bytes, bytes]]

HOP_BY_HOP = frozenset({
    b"connection", b"keep-alive", b"te", b"trailer", b"transfer-encoding", b"upgrade",
    b"proxy-connection", b"proxy-authenticate", b"proxy-authorization",
})
GATEWAY_PREFIX = b"x-pixiu-kv-"
# Set by the HTTP client from the body it sends, or by the gateway itself.
_REQUEST_OWN = frozenset({b"host", b"content-length", b"x-request-id", b"authorization"})
_RESPONSE_OWN = frozenset({b"x-request-id", b"date", b"server"})


def header_value(headers: Iterable[tuple[bytes, bytes]], name: bytes) -> bytes | None:
    """The first value of ``name`` (lower case), or None."""
    for key, value in headers:
        if key.lower() == name:
            return value
    return None


def _connection_named(headers: Iterable[tuple[bytes, bytes]]) -> frozenset[bytes]:
    named: set[bytes] = set()
    for key, value in headers:
        if key.lower() == b"connection":
            named.update(token.strip().lower() for token in value.split(b",") if token.strip())
    return frozenset(named)


def _is_hop(key: bytes, named: frozenset[bytes]) -> bool:
    return key in HOP_BY_HOP or key.startswith(b"proxy-") or key in named


def request_headers_for_upstream(headers: Iterable[tuple[bytes, bytes]], *, request_id: str,
                                 api_key: str) -> Headers:
    """The client's headers as the engine should see them.

    The client's ``Authorization`` is kept unless the endpoint has its own api_key, which
    then replaces it.
    """
    headers = list(headers)
    named = _connection_named(headers)
    out: Headers = []
    client_auth: bytes | None = None
    for key, value in headers:
        k = key.lower()
        if k == b"authorization":
            client_auth = value
            continue
        if k in _REQUEST_OWN or k.startswith(GATEWAY_PREFIX) or _is_hop(k, named):
            continue
        out.append((k, value))
    if api_key:
        out.append((b"authorization", b"Bearer " + api_key.encode("latin-1")))
    elif client_auth is not None:
        out.append((b"authorization", client_auth))
    out.append((b"x-request-id", request_id.encode("latin-1")))
    return out


def response_headers_for_client(headers: Iterable[tuple[bytes, bytes]], *, request_id: str,
                                endpoint_id: str, extra: Iterable[tuple[bytes, bytes]] = ()) -> Headers:
    """The engine's response headers as the client should see them, plus the gateway's own."""
    headers = list(headers)
    named = _connection_named(headers)
    out: Headers = [
        (k, v) for k, v in ((key.lower(), value) for key, value in headers)
        if not (k in _RESPONSE_OWN or k.startswith(GATEWAY_PREFIX) or _is_hop(k, named))
    ]
    out.append((b"x-request-id", request_id.encode("latin-1")))
    out.append((b"x-pixiu-kv-endpoint", endpoint_id.encode("latin-1")))
    out.extend(extra)
    return out
