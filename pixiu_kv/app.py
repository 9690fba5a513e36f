"""The gateway as one raw ASGI application, and helpers to serve it with hypercorn.

* ``lifespan`` opens the gateway's runtime (pools, nursery, filters, health checks) for the
  whole life of the server, and closes it in order at shutdown.
* ``/health``, ``/ready`` and ``GET /v1/models`` are answered by the gateway.
* The OpenAI/vLLM JSON endpoints go through the filter chain: body read once under a size
  limit, parsed once into ``ctx.json``, route resolved, decode filters in order, then the
  LLM proxy filter streams the engine's reply back.

Why raw ASGI rather than a framework: see ``docs/architecture.md`` (the framework layer
costs about a millisecond per request, the whole budget of the hot path).
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping, Sequence
from contextlib import ExitStack, asynccontextmanager
from functools import partial
from typing import Any

import attrs
import httpx
import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.trio import serve as hypercorn_serve

from ._asgi import ResponseTracker, read_body, send_error, send_json
from ._headers import header_value
from ._routing import JSON_ENDPOINTS, OWN_ENDPOINTS, is_json_content_type
from ._runtime import Runtime, open_runtime
from .admin import AdminApp, send_metrics
from .chain import ASGIReceive, ASGISend, DecodeFilter
from .config import GatewayConfig, load_config
from .context import BackgroundScope, RequestContext
from .control import DrainSet, GatewayController, apply_drains, snapshot
from .errors import GatewayError
from .filters.llm_proxy import ATTEMPTS_KEY, ENDPOINT_KEY, TRIED_KEY, TTFB_KEY
from .logs import log_event
from .metrics import GatewayMetrics
from .observe import RequestObserver, timed_decode
from .reload import ConfigReloader, ReloadResult
from .runtime_host import RuntimeHost

__all__ = ["BACKGROUND_GRACE_KEY", "CONFIG_ENV", "GatewayApp", "RunningGateway", "create_app",
           "hypercorn_config", "open_gateway", "serve"]

CONFIG_ENV = "PIXIU_KV_CONFIG"
# A decode filter sets ``ctx.values[BACKGROUND_GRACE_KEY]`` (seconds) to say how long the
# background work it started may outlive a completed response.
BACKGROUND_GRACE_KEY = "background_grace"
_access_log = logging.getLogger("pixiu_kv.access")
_log = logging.getLogger("pixiu_kv.gateway")
_REQUEST_ID_RE = re.compile(rb"^[A-Za-z0-9._:\-]{1,128}$")
Scope = MutableMapping[str, Any]


def _request_id(headers: list[tuple[bytes, bytes]]) -> str:
    """The client's ``x-request-id`` when it is a sane token, else a fresh one."""
    given = header_value(headers, b"x-request-id")
    if given is not None and _REQUEST_ID_RE.match(given):
        return given.decode("ascii")
    return os.urandom(12).hex()


def _content_length(headers: list[tuple[bytes, bytes]]) -> int | None:
    value = header_value(headers, b"content-length")
    if value is None:
        return None
    try:
        return int(value)
    except ValueError:
        raise GatewayError(400, "Content-Length is not an integer") from None


class GatewayApp:
    """The ASGI callable. One instance serves one configuration."""

    def __init__(self, config: GatewayConfig, *, decode_filters: Sequence[DecodeFilter] = (),
                 config_path: str | None = None) -> None:
        self.config = config
        self._extra_filters = tuple(decode_filters)
        self._active = 0
        self.metrics = GatewayMetrics()
        self.drained = DrainSet()
        # Runtime generations: a reload opens a new one beside the current one; a request
        # keeps the runtime it started with (see runtime_host.py).
        self._host: RuntimeHost[Runtime] = RuntimeHost(
            partial(open_runtime, extra_filters=self._extra_filters),
            retire_timeout=max(config.listener.graceful_timeout, 1.0),
            prepare=lambda runtime: apply_drains(runtime.clusters.values(), self.drained))
        self._reloader: ConfigReloader[Runtime | None] = ConfigReloader(
            config_path, config, None, self._build_runtime)
        self.metrics.set_state_source(
            lambda: snapshot(self._runtime, self.drained, self._reloader.generation))
        self.control = GatewayController(lambda: self._runtime, self.drained,
                                         reload=self.reload if config_path else None,
                                         generation=lambda: self._reloader.generation)

    @property
    def runtime(self) -> Runtime | None:
        """The running state (None outside the server's lifespan)."""
        return self._host.current

    @property
    def _runtime(self) -> Runtime | None:
        return self._host.current

    async def reload(self) -> ReloadResult:
        """Re-read the configuration file and swap to it (SIGHUP, ``POST /admin/reload``)."""
        result = await self._reloader.reload()
        if result.ok:
            self.config = self._reloader.config
        self.metrics.reload_finished(result.ok)
        return result

    async def _build_runtime(self, config: GatewayConfig, _previous: Runtime | None) -> Runtime:
        return await self._host.replace(config)

    async def __call__(self, scope: Scope, receive: ASGIReceive, send: ASGISend) -> None:
        kind = scope["type"]
        if kind == "http":
            await self._http(scope, receive, send)
        elif kind == "lifespan":
            await self._lifespan(receive, send)
        elif kind == "websocket":
            await send({"type": "websocket.close", "code": 1003})

    # -- lifespan ------------------------------------------------------------------------

    async def _lifespan(self, receive: ASGIReceive, send: ASGISend) -> None:
        message = await receive()
        if message["type"] != "lifespan.startup":
            return
        started = False
        try:
            async with trio.open_nursery() as nursery:
                await nursery.start(partial(self._host.run, self.config))
                started = True
                await send({"type": "lifespan.startup.complete"})
                log_event(_log, logging.INFO, "gateway_started",
                          clusters=[c.name for c in self.config.clusters])
                while (await receive())["type"] != "lifespan.shutdown":
                    pass
                # Closes every runtime generation: background work cancelled, pools closed.
                nursery.cancel_scope.cancel()
        except Exception as exc:
            kind = "lifespan.shutdown.failed" if started else "lifespan.startup.failed"
            _log.exception("lifespan failed")
            await send({"type": kind, "message": f"{type(exc).__name__}: {exc}"})
            return
        await send({"type": "lifespan.shutdown.complete"})

    # -- HTTP ----------------------------------------------------------------------------

    async def _http(self, scope: Scope, receive: ASGIReceive, send: ASGISend) -> None:
        path: str = scope["path"]
        method: str = scope["method"]
        if path == "/metrics":
            if method not in ("GET", "HEAD"):
                await send_error(send, _method_not_allowed(path, "GET"))
            else:
                await send_metrics(send, self.metrics)
            return
        if path in JSON_ENDPOINTS:
            if method != "POST":
                await self._refuse(scope, send, _method_not_allowed(path, "POST"))
                return
            await self._proxy(scope, receive, send)
            return
        allowed = OWN_ENDPOINTS.get(path)
        if allowed is None:
            await self._refuse(scope, send, GatewayError(404, f"no such endpoint: {method} {path}",
                                                         "NotFoundError", code="not_found"))
        elif method != allowed and not (allowed == "GET" and method == "HEAD"):
            await self._refuse(scope, send, _method_not_allowed(path, allowed))
        elif path == "/health":
            await send_json(send, 200, {"status": "ok"})
        elif path == "/ready":
            await self._ready(send)
        else:
            await self._models(send)

    async def _refuse(self, scope: Scope, send: ASGISend, error: GatewayError) -> None:
        """Answer a request the gateway does not serve, with a request id and an access line."""
        request_id = _request_id(scope["headers"])
        await send_error(send, error, request_id)
        log_event(_access_log, logging.INFO, "request", request_id=request_id, method=scope["method"],
                  path=scope["path"], status=error.status, completed=True)

    async def _ready(self, send: ASGISend) -> None:
        runtime = self._runtime
        if runtime is None:
            await send_json(send, 503, {"status": "starting", "endpoints": {}})
            return
        now = trio.current_time()
        endpoints = {e.id: e.available(now) for c in runtime.clusters.values() for e in c.endpoints}
        ready = any(endpoints.values())
        await send_json(send, 200 if ready else 503,
                        {"status": "ready" if ready else "no healthy endpoint", "endpoints": endpoints})

    async def _models(self, send: ASGISend) -> None:
        runtime = self._runtime
        if runtime is None:
            await send_error(send, _not_started())
            return
        replies: list[list[Any]] = []
        now = trio.current_time()

        async def fetch(address: str, api_key: str, within: float) -> None:
            headers = {"authorization": f"Bearer {api_key}"} if api_key else {}
            with trio.move_on_after(within):
                try:
                    response = await runtime.clients.models.get(address.rstrip("/") + "/v1/models",
                                                                headers=headers)
                    data = response.json().get("data") if response.status_code == 200 else None
                except (httpx.HTTPError, ValueError, AttributeError):
                    return
                if isinstance(data, list):
                    replies.append(data)

        async with trio.open_nursery() as nursery:
            for cluster in runtime.clusters.values():
                for e in cluster.endpoints:
                    if e.available(now):
                        nursery.start_soon(fetch, e.config.address, e.config.api_key,
                                           cluster.config.health_check.timeout)
        if not replies:
            await send_error(send, GatewayError(503, "no endpoint answered GET /v1/models",
                                                "service_unavailable", code="no_endpoint_available"))
            return
        seen: dict[str, Any] = {}
        for data in replies:
            for model in data:
                if isinstance(model, dict) and isinstance(model.get("id"), str):
                    seen.setdefault(model["id"], model)
        await send_json(send, 200, {"object": "list", "data": list(seen.values())})

    # -- the proxied path -----------------------------------------------------------------

    async def _proxy(self, scope: Scope, receive: ASGIReceive, send: ASGISend) -> None:
        headers: list[tuple[bytes, bytes]] = scope["headers"]
        request_id = _request_id(headers)
        ctx: RequestContext | None = None
        started_at = trio.current_time()
        observer = RequestObserver(self.metrics, started_at)
        tracker = ResponseTracker(observer.wrap_send(send))
        body_size = 0
        uses = ExitStack()
        try:
            if self._host.current is None:
                raise _not_started()
            # This request keeps this runtime until it ends, even if a reload swaps it.
            runtime = uses.enter_context(self._host.use())
            listener = self.config.listener
            if self._active >= listener.max_concurrent_requests:
                raise GatewayError(503, "the gateway is at its concurrent request limit "
                                   f"({listener.max_concurrent_requests}); retry later",
                                   "service_unavailable", code="gateway_busy",
                                   headers=((b"retry-after", b"1"),))
            self._active += 1
            try:
                body: bytes | None = None
                with trio.move_on_after(listener.body_timeout):
                    body = await read_body(receive, listener.max_request_body, _content_length(headers))
                    if body is None:
                        return  # the client left while sending its request
                if body is None:
                    raise GatewayError(408, f"request body not received within "
                                       f"{listener.body_timeout:g}s", code="request_timeout")
                body_size = len(body)
                parsed = _parse_json(headers, body)
                model = parsed.get("model")
                route = runtime.routes.resolve(scope["path"], model if isinstance(model, str) else None)
                if route is None:
                    raise GatewayError(404, f"no route for {scope['path']}"
                                       + (f" and model {model!r}" if isinstance(model, str) else ""),
                                       "NotFoundError", code="no_route")
                ctx = RequestContext(
                    request_id=request_id, method=scope["method"], path=scope["path"],
                    headers=headers, body=body, json=parsed, cluster_name=route.cluster,
                    background=BackgroundScope(runtime.nursery), started_at=started_at,
                    query_string=scope.get("query_string", b""),
                )
                await self._chain(runtime, ctx, receive, tracker)
            finally:
                self._active -= 1
        except GatewayError as error:
            if not tracker.started:
                await send_error(tracker.send, error, request_id)
        finally:
            uses.close()
            observer.finish(ctx, response_started=tracker.started, completed=tracker.finished,
                            status=tracker.status)
            self._log_access(scope, request_id, ctx, tracker, started_at, body_size)

    async def _chain(self, runtime: Runtime, ctx: RequestContext, receive: ASGIReceive,
                     tracker: ResponseTracker) -> None:
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_watch_disconnect, receive, nursery.cancel_scope, ctx, tracker)
                try:
                    await self._run_filters(runtime, ctx, tracker)
                finally:
                    nursery.cancel_scope.cancel()
        finally:
            # Whatever ended the request (including a cancellation from outside, such as the
            # server's graceful deadline), its background work is released or cancelled.
            if tracker.finished:
                grace = ctx.values.get(BACKGROUND_GRACE_KEY)
                ctx.background.finish(float(grace) if isinstance(grace, int | float)
                                      else runtime.background_grace)
            else:
                ctx.background.cancel()

    async def _run_filters(self, runtime: Runtime, ctx: RequestContext, tracker: ResponseTracker) -> None:
        try:
            for f in runtime.decode_filters:
                try:
                    await timed_decode(f, ctx, self.metrics)
                except GatewayError:
                    raise
                except Exception:
                    # Decode filters are advisory (routing hints, cache management): a
                    # broken one must not fail the request; it is logged loudly instead.
                    _log.exception("decode filter %s failed; continuing", type(f).__name__)
            await runtime.proxy.serve(ctx, tracker.send)
        except GatewayError as error:
            if not tracker.started:
                await send_error(tracker.send, error, ctx.request_id)
        except Exception:
            _log.exception("request %s failed", ctx.request_id)
            if not tracker.started:
                await send_error(tracker.send, GatewayError(500, "internal gateway error",
                                                            "internal_error"), ctx.request_id)

    def _log_access(self, scope: Scope, request_id: str, ctx: RequestContext | None,
                    tracker: ResponseTracker, started_at: float, body_size: int) -> None:
        if not _access_log.isEnabledFor(logging.INFO):
            return
        values = ctx.values if ctx is not None else {}
        ttfb = values.get(TTFB_KEY)
        hint = ctx.route_hint if ctx is not None else None
        log_event(
            _access_log, logging.INFO, "request",
            request_id=request_id, method=scope["method"], path=scope["path"],
            cluster=ctx.cluster_name if ctx is not None else None,
            endpoint=values.get(ENDPOINT_KEY),
            preferred=ctx.preferred_endpoint_id if ctx is not None else None,
            route_reason=hint.reason if hint is not None else None,
            status=tracker.status if tracker.started else 499,
            completed=tracker.finished,
            attempts=values.get(ATTEMPTS_KEY, 0), tried=values.get(TRIED_KEY),
            ttfb_ms=None if ttfb is None else round(ttfb * 1e3, 3),
            total_ms=round((trio.current_time() - started_at) * 1e3, 3),
            bytes_in=body_size, bytes_out=tracker.bytes_out,
        )


async def _watch_disconnect(receive: ASGIReceive, scope: trio.CancelScope, ctx: RequestContext,
                            tracker: ResponseTracker) -> None:
    """Cancel the request (and its background work) as soon as the client goes away.

    The server also reports a disconnect after a completed response; that one is ignored.
    """
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            if not tracker.finished:
                ctx.background.cancel()
                scope.cancel()
            return


def _parse_json(headers: list[tuple[bytes, bytes]], body: bytes) -> dict[str, Any]:
    if not is_json_content_type(header_value(headers, b"content-type")):
        raise GatewayError(400, "Content-Type must be application/json", "BadRequestError",
                           code="invalid_content_type")
    try:
        parsed = json.loads(body)
    except (ValueError, RecursionError):
        raise GatewayError(400, "request body is not valid JSON", "BadRequestError",
                           code="invalid_json") from None
    if not isinstance(parsed, dict):
        raise GatewayError(400, "request body must be a JSON object", "BadRequestError",
                           code="invalid_json")
    return parsed


def _method_not_allowed(path: str, allowed: str) -> GatewayError:
    return GatewayError(405, f"method not allowed for {path}; use {allowed}", "invalid_request_error",
                        code="method_not_allowed", headers=((b"allow", allowed.encode()),))


def _not_started() -> GatewayError:
    return GatewayError(503, "the gateway is not running (no lifespan startup yet)",
                        "service_unavailable", code="not_started")


def create_app(config: GatewayConfig | None = None, *,
               decode_filters: Sequence[DecodeFilter] = (), config_path: str | None = None) -> GatewayApp:
    """The gateway's ASGI app. Without a config, the file named by ``$PIXIU_KV_CONFIG`` is read.

    ``decode_filters`` run after the configured ones, before the proxy (embedding and tests).
    """
    if config is None:
        path = os.environ.get(CONFIG_ENV)
        if not path:
            raise RuntimeError(f"create_app() needs a GatewayConfig or ${CONFIG_ENV} naming a TOML file")
        config = load_config(path)
        config_path = config_path or path
    return GatewayApp(config, decode_filters=decode_filters, config_path=config_path)


def hypercorn_config(config: GatewayConfig, *, host: str | None = None,
                     port: int | None = None) -> HypercornConfig:
    """A hypercorn configuration with every stream-cutting default replaced on purpose."""
    listener = config.listener
    hc = HypercornConfig()
    bind_host = listener.host if host is None else host
    bind_port = listener.port if port is None else port
    hc.bind = [f"[{bind_host}]:{bind_port}" if ":" in bind_host else f"{bind_host}:{bind_port}"]
    # Default 3 s would cut every stream 3 s after SIGTERM.
    hc.graceful_timeout = listener.graceful_timeout
    hc.keep_alive_timeout = listener.keep_alive_timeout
    # Default 1000 closes busy keep-alive connections on a schedule.
    hc.keep_alive_max_requests = sys.maxsize
    # A socket read timeout would fire during long responses (the client sends nothing
    # while it streams); request bodies have their own deadline (listener.body_timeout).
    hc.read_timeout = None
    hc.h11_max_incomplete_size = 64 * 1024
    hc.backlog = 1024
    hc.include_server_header = False
    hc.accesslog = None
    hc.errorlog = logging.getLogger("pixiu_kv.server")
    return hc


@attrs.frozen
class RunningGateway:
    url: str
    app: GatewayApp
    admin_url: str | None = None


async def serve(config: GatewayConfig, *, host: str | None = None, port: int | None = None,
                decode_filters: Sequence[DecodeFilter] = (),
                shutdown_trigger: Callable[[], Awaitable[Any]] | None = None,
                config_path: str | None = None,
                task_status: trio.TaskStatus[RunningGateway] = trio.TASK_STATUS_IGNORED) -> None:
    """Serve the gateway with hypercorn until ``shutdown_trigger`` returns (graceful stop).

    ``task_status.started`` reports the bound base URL (useful with port 0).
    """
    app = create_app(config, decode_filters=decode_filters, config_path=config_path)
    hc = hypercorn_config(config, host=host, port=port)
    trigger = shutdown_trigger or trio.sleep_forever
    async with trio.open_nursery() as nursery:
        binds: list[str] = await nursery.start(partial(hypercorn_serve, app, hc,  # type: ignore[arg-type]
                                                       shutdown_trigger=trigger))
        admin_url: str | None = None
        if config.admin.enabled:
            # Its own listener (127.0.0.1 by default), never the public one.
            admin = AdminApp(app.control, token=config.admin.token, metrics=app.metrics)
            ahc = HypercornConfig()
            ahost = config.admin.host
            ahc.bind = [f"[{ahost}]:{config.admin.port}" if ":" in ahost else f"{ahost}:{config.admin.port}"]
            ahc.accesslog = None
            ahc.errorlog = logging.getLogger("pixiu_kv.server")
            ahc.graceful_timeout = 1.0
            ahc.include_server_header = False
            admin_binds: list[str] = await nursery.start(partial(
                hypercorn_serve, admin, ahc, shutdown_trigger=trigger))  # type: ignore[arg-type]
            admin_url = admin_binds[0]
        task_status.started(RunningGateway(url=binds[0], app=app, admin_url=admin_url))


@asynccontextmanager
async def open_gateway(config: GatewayConfig, *, host: str = "127.0.0.1", port: int = 0,
                       decode_filters: Sequence[DecodeFilter] = ()) -> AsyncIterator[RunningGateway]:
    """Run the gateway in a nursery for the duration of the block (bound URL in ``.url``)."""
    stop = trio.Event()
    async with trio.open_nursery() as nursery:
        running: RunningGateway = await nursery.start(partial(
            serve, config, host=host, port=port, decode_filters=decode_filters,
            shutdown_trigger=stop.wait))
        try:
            yield running
        finally:
            stop.set()
