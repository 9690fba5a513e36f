"""The admin API: a small raw-ASGI app on its own listener (127.0.0.1 by default).

    GET  /admin/config                        effective configuration, secrets redacted
    GET  /admin/endpoints                     endpoints with health, drain mark, in-flight load
    GET  /admin/breakers                      circuit breaker states
    POST /admin/endpoints/{id}/drain          stop sending new requests to an endpoint
    POST /admin/endpoints/{id}/undrain        take it back
    POST /admin/reload                        re-read the configuration file (like SIGHUP)
    POST /admin/route[?path=/v1/...]          the routing decision for a body, nothing forwarded
    GET  /metrics                             Prometheus exposition (same as the gateway's)

With ``[admin].token`` set, every request needs ``Authorization: Bearer <token>`` (compared
in constant time) or gets 401. The app talks to the gateway only through
:class:`GatewayControl`, so it can be served against a fake in tests.
"""

from __future__ import annotations

import hmac
import json
import logging
from collections.abc import Mapping, MutableMapping, Sequence
from typing import Any, Protocol
from urllib.parse import parse_qs

import trio

from ._asgi import BodyTooLarge, receive_body, serve_lifespan
from .chain import ASGIReceive, ASGISend
from .errors import GatewayError
from .logs import log_event
from .metrics import METRICS_CONTENT_TYPE, GatewayMetrics
from .reload import ReloadResult

__all__ = ["AdminApp", "GatewayControl", "send_metrics"]

_log = logging.getLogger("pixiu_kv.admin")

_JSON = (b"content-type", b"application/json")
_NO_STORE = (b"cache-control", b"no-store")
_DEFAULT_ROUTE_PATH = "/v1/chat/completions"


class GatewayControl(Protocol):
    """What the admin API needs from a running gateway. Every method is quick and never
    forwards anything to an engine."""

    def effective_config(self) -> Mapping[str, Any]:
        """The running configuration as plain data, secrets redacted."""
        ...

    def endpoints(self) -> Sequence[Mapping[str, Any]]:
        """One entry per endpoint: at least ``id``, ``cluster``, ``healthy``, ``draining``,
        ``in_flight``, ``max_in_flight``."""
        ...

    def breakers(self) -> Sequence[Mapping[str, Any]]:
        """One entry per circuit breaker: at least ``name`` and ``state``."""
        ...

    def drain(self, endpoint_id: str) -> Mapping[str, Any] | None:
        """Mark the endpoint drained (no new requests; in-flight ones finish). Its entry, or
        None when no endpoint has that id."""
        ...

    def undrain(self, endpoint_id: str) -> Mapping[str, Any] | None: ...

    async def reload(self) -> ReloadResult: ...

    async def explain_route(self, path: str, body: bytes) -> Mapping[str, Any]:
        """The decision the gateway would take for ``body`` on ``path`` and every input that
        led to it. Raises :class:`GatewayError` for a body the gateway would refuse."""
        ...


class AdminApp:
    """The admin ASGI application."""

    def __init__(self, control: GatewayControl, *, token: str = "", metrics: GatewayMetrics | None = None,
                 max_body: int = 8 * 1024 * 1024, body_timeout: float = 10.0) -> None:
        self._control = control
        self._token = token.encode()
        self._metrics = metrics
        self._max_body = max_body
        self._body_timeout = body_timeout

    async def __call__(self, scope: MutableMapping[str, Any], receive: ASGIReceive, send: ASGISend) -> None:
        kind = scope["type"]
        if kind == "lifespan":
            await serve_lifespan(receive, send)
            return
        if kind != "http":
            return  # websockets are not served here
        try:
            await self._dispatch(scope, receive, send)
        except GatewayError as exc:
            await _send(send, exc.status, exc.body(), exc.headers)

    async def _dispatch(self, scope: MutableMapping[str, Any], receive: ASGIReceive, send: ASGISend) -> None:
        if not self._authorised(scope):
            raise GatewayError(401, "missing or invalid admin bearer token", "authentication_error",
                               headers=((b"www-authenticate", b'Bearer realm="pixiu-kv admin"'),))
        method: str = scope["method"]
        path: str = scope["path"]
        if path == "/metrics":
            _allow(method, "GET")
            if self._metrics is None:
                raise GatewayError(404, "metrics are not enabled", "not_found_error")
            await send_metrics(send, self._metrics)
        elif path == "/admin/config":
            _allow(method, "GET")
            await _send_json(send, 200, self._control.effective_config())
        elif path == "/admin/endpoints":
            _allow(method, "GET")
            await _send_json(send, 200, {"endpoints": list(self._control.endpoints())})
        elif path == "/admin/breakers":
            _allow(method, "GET")
            await _send_json(send, 200, {"breakers": list(self._control.breakers())})
        elif path.startswith("/admin/endpoints/") and path.rsplit("/", 1)[-1] in ("drain", "undrain"):
            _allow(method, "POST")
            endpoint_id, action = path[len("/admin/endpoints/"):].rsplit("/", 1)
            await self._drain(send, endpoint_id, action)
        elif path == "/admin/reload":
            _allow(method, "POST")
            result = await self._control.reload()
            # 422: the new file was understood as a request but refused; the old one serves on.
            await _send_json(send, 200 if result.ok else 422, result.to_dict())
        elif path == "/admin/route":
            _allow(method, "POST")
            await self._explain(scope, receive, send)
        else:
            raise GatewayError(404, f"no admin resource at {path}", "not_found_error")

    def _authorised(self, scope: Mapping[str, Any]) -> bool:
        if not self._token:
            return True
        presented = b""
        for name, value in scope["headers"]:
            if name == b"authorization":
                scheme, _, credential = bytes(value).partition(b" ")
                if scheme.lower() == b"bearer":
                    presented = credential.strip()
                break
        # Constant time whatever the presented length: a timing side channel must not leak
        # the token's prefix.
        return hmac.compare_digest(presented, self._token)

    async def _drain(self, send: ASGISend, endpoint_id: str, action: str) -> None:
        if not endpoint_id or "/" in endpoint_id:
            raise GatewayError(404, "no endpoint id in the path", "not_found_error")
        if action == "drain":
            entry = self._control.drain(endpoint_id)
        else:
            entry = self._control.undrain(endpoint_id)
        if entry is None:
            raise GatewayError(404, f"no endpoint with id {endpoint_id!r}", "not_found_error",
                               param="id")
        log_event(_log, logging.INFO, "endpoint_" + action, endpoint=endpoint_id)
        await _send_json(send, 200, entry)

    async def _explain(self, scope: Mapping[str, Any], receive: ASGIReceive, send: ASGISend) -> None:
        query = parse_qs(bytes(scope.get("query_string", b"")).decode("latin-1"))
        route_path = query.get("path", [_DEFAULT_ROUTE_PATH])[0]
        if not route_path.startswith("/"):
            raise GatewayError(400, "path must start with '/'", param="path")
        body = await self._read_body(receive)
        if body is None:
            return  # the client left; nobody to answer
        decision = await self._control.explain_route(route_path, body)
        await _send_json(send, 200, decision)

    async def _read_body(self, receive: ASGIReceive) -> bytes | None:
        body: bytes | None = None
        with trio.move_on_after(self._body_timeout) as timer:
            try:
                body = await receive_body(receive, self._max_body)
            except BodyTooLarge:
                raise GatewayError(413, f"request body exceeds {self._max_body} bytes",
                                   code="request_too_large") from None
        if timer.cancelled_caught:
            raise GatewayError(408, "request body not received in time", code="request_timeout")
        return body


def _allow(method: str, allowed: str) -> None:
    if method != allowed:
        raise GatewayError(405, f"method {method} not allowed; use {allowed}",
                           headers=((b"allow", allowed.encode()),))


async def send_metrics(send: ASGISend, metrics: GatewayMetrics) -> None:
    """Answer with the Prometheus exposition (for the gateway's own ``GET /metrics`` too)."""
    await _send(send, 200, metrics.render(), ((b"content-type", METRICS_CONTENT_TYPE.encode()),))


async def _send_json(send: ASGISend, status: int, payload: Any) -> None:
    await _send(send, status, json.dumps(payload, separators=(",", ":"), default=str).encode(), (_JSON,))


async def _send(send: ASGISend, status: int, body: bytes,
                headers: Sequence[tuple[bytes, bytes]] = ()) -> None:
    all_headers = [*headers]
    if not any(name == b"content-type" for name, _ in all_headers):
        all_headers.append(_JSON)
    all_headers += [_NO_STORE, (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": all_headers})
    await send({"type": "http.response.body", "body": body})



