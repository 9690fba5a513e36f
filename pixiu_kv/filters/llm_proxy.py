"""The terminal filter ``dgp.filter.llm.proxy``: forward to an engine, stream the reply back.

Choice: the endpoint a decode filter preferred (``ctx.preferred_endpoint_id``) when it is
usable, else the cluster's load-balancing policy. Failures *before any byte reached the
client* (connect errors, and 429/502/503/504 answers) are retried against the same endpoint
per its retry policy, then fail over to the next endpoint (wrap-around) and put the
exhausted endpoint in cooldown. Once the response has started, nothing is retried.

The upstream response lives in ``async with``-like code inside the request's own task, so a
client disconnect (which cancels that task) closes the upstream connection at any phase.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Mapping
from typing import Final

import attrs
import trio

from .._headers import header_value, request_headers_for_upstream, response_headers_for_client
from ..chain import ASGISend
from ..cluster import Cluster, Endpoint, PickFailure, attempts_allowed, backoff_delay
from ..config import LlmProxyConfig
from ..context import RequestContext
from ..errors import GatewayError, error_body
from ..routing.hook import ROUTING_HOOK_KEY
from ..upstream.engine import EngineClients, UpstreamConnectError, UpstreamError, UpstreamResponse

__all__ = [
    "ATTEMPTS_KEY",
    "ENDPOINT_KEY",
    "RETRYABLE_STATUS",
    "TRIED_KEY",
    "TTFB_KEY",
    "LlmProxyFilter",
]

RETRYABLE_STATUS: Final = frozenset({429, 502, 503, 504})
# A failed attempt's body is kept (to pass it on if nothing better comes) up to this size.
ERROR_BODY_LIMIT: Final = 64 * 1024
# Keys this filter writes into ``ctx.values`` for the access log.
ENDPOINT_KEY: Final = "proxy.endpoint"
ATTEMPTS_KEY: Final = "proxy.attempts"
TRIED_KEY: Final = "proxy.tried"
TTFB_KEY: Final = "proxy.ttfb"
# (endpoint id, kind) per failed attempt; kinds as in pixiu_kv.metrics.UPSTREAM_ERROR_KINDS.
FAILURES_KEY: Final = "proxy.failures"


@attrs.frozen
class _Answered:
    """An engine answered with a retryable error; kept to pass on if nothing succeeds."""

    endpoint_id: str
    status: int
    headers: list[tuple[bytes, bytes]]
    body: bytes


@attrs.frozen
class _Unreachable:
    endpoint_id: str
    reason: str


class _Done:
    """The response was sent (completely, or cut after it started)."""


class _TimedOut:
    """No response headers within first_byte_timeout."""


_DONE: Final = _Done()
_TIMED_OUT: Final = _TimedOut()
_Outcome = _Answered | _Unreachable | _Done | _TimedOut


class LlmProxyFilter:
    """Forwards the request to an endpoint of ``ctx.cluster_name`` and relays the reply."""

    def __init__(self, config: LlmProxyConfig, clusters: Mapping[str, Cluster],
                 clients: EngineClients, *, rng: random.Random | None = None,
                 clock: Callable[[], float] = trio.current_time) -> None:
        self.config = config
        self._clusters = clusters
        self._clients = clients
        self._rng = rng or random.Random()
        self._clock = clock

    async def serve(self, ctx: RequestContext, send: ASGISend) -> None:
        cluster = self._clusters[ctx.cluster_name]
        tried: list[Endpoint] = []
        ctx.values[TRIED_KEY] = tried_ids = []
        ctx.values[ATTEMPTS_KEY] = 0
        hook = ctx.values.get(ROUTING_HOOK_KEY)
        if hook is not None:  # the kvcache filter's router decides now, on live endpoint state
            hook.choose(cluster.endpoints, self._clock())
        pick = cluster.pick(self._clock(), ctx.preferred_endpoint_id)
        endpoint = pick.endpoint
        failure = pick.failure
        last_answer: _Answered | None = None
        while endpoint is not None:
            tried.append(endpoint)
            tried_ids.append(endpoint.id)
            endpoint.in_flight += 1
            try:
                outcome = await self._try_endpoint(ctx, cluster, endpoint, send)
            finally:
                endpoint.in_flight -= 1
            if isinstance(outcome, _Done):
                return
            if isinstance(outcome, _TimedOut):
                raise GatewayError(504, f"endpoint {endpoint.id} sent no response within "
                                   f"{self.config.first_byte_timeout:g}s", "upstream_timeout",
                                   code="upstream_timeout", headers=self._ids(endpoint))
            if isinstance(outcome, _Answered):
                last_answer = outcome
            cluster.start_cooldown(endpoint, self._clock())
            if not cluster.config.fallback:
                break
            pick = cluster.next_after(endpoint, self._clock(), tried)
            endpoint = pick.endpoint
            failure = pick.failure
        if last_answer is not None:
            await self._pass_on(ctx, last_answer, send)
            return
        raise self._no_endpoint(cluster, failure, tried_ids)

    async def _try_endpoint(self, ctx: RequestContext, cluster: Cluster, endpoint: Endpoint,
                            send: ASGISend) -> _Outcome:
        """All attempts against one endpoint, with the policy's backoff between them."""
        policy = endpoint.retry
        outcome: _Outcome = _Unreachable(endpoint.id, "not tried")
        for attempt in range(attempts_allowed(policy)):
            if attempt:
                await trio.sleep(backoff_delay(policy, attempt, self._rng))
            ctx.values[ATTEMPTS_KEY] += 1
            outcome = await self._attempt(ctx, cluster, endpoint, send)
            if isinstance(outcome, _Done | _TimedOut):
                return outcome
        return outcome

    async def _attempt(self, ctx: RequestContext, cluster: Cluster, endpoint: Endpoint,
                       send: ASGISend) -> _Outcome:
        target = ctx.path.encode("latin-1") + (b"?" + ctx.query_string if ctx.query_string else b"")
        headers = request_headers_for_upstream(ctx.headers, request_id=ctx.request_id,
                                               api_key=endpoint.config.api_key)
        started = False
        response: UpstreamResponse | None = None
        # One scope carries every upstream deadline: first byte until the response head
        # arrives, then the idle gap before each chunk. A client disconnect cancels an outer
        # scope; either way the ``finally`` closes the upstream connection without awaiting.
        with trio.CancelScope(deadline=self._clock() + self.config.first_byte_timeout) as scope:
            try:
                response = await self._clients.send(endpoint, ctx.method, target, headers, ctx.body)
                if response.status in RETRYABLE_STATUS:
                    _failed(ctx, endpoint, "status_429" if response.status == 429 else "status_5xx")
                    body = await _read_bounded(response, ERROR_BODY_LIMIT)
                    return _Answered(endpoint.id, response.status, response.headers, body)
                ctx.values[TTFB_KEY] = self._clock() - ctx.started_at
                ctx.values[ENDPOINT_KEY] = endpoint.id
                hook = ctx.values.get(ROUTING_HOOK_KEY)
                if hook is not None:
                    hook.first_byte(endpoint.id, self._clock())
                scope.deadline = math.inf
                await send({
                    "type": "http.response.start",
                    "status": response.status,
                    "headers": response_headers_for_client(
                        response.headers, request_id=ctx.request_id, endpoint_id=endpoint.id,
                        extra=_route_header(ctx, endpoint.id)),
                })
                started = True
                idle = self.config.idle_timeout
                while True:
                    scope.deadline = self._clock() + idle
                    chunk = await response.next_chunk()
                    if chunk is None:
                        break
                    if chunk:
                        if hook is not None:
                            hook.feed(chunk)
                        await send({"type": "http.response.body", "body": chunk, "more_body": True})
                scope.deadline = math.inf
                await send({"type": "http.response.body", "body": b"", "more_body": False})
                if hook is not None:
                    hook.done(endpoint.id, self._clock())
                return _DONE
            except UpstreamConnectError as exc:
                # Passive health: an engine that refuses connections counts as failing checks.
                cluster.record_connect_failure(endpoint)
                _failed(ctx, endpoint, "connect")
                return _Unreachable(endpoint.id, str(exc))
            except UpstreamError as exc:
                if response is None or not started:
                    _failed(ctx, endpoint, "reset_before_first_byte")
                    return _Unreachable(endpoint.id, str(exc))
                _failed(ctx, endpoint, "reset_after_first_byte")
                await _end_cut_stream(response.headers, send, f"endpoint {endpoint.id} failed mid-stream")
                return _DONE
            finally:
                if response is not None:
                    response.close()
        # The scope's own deadline fired.
        _failed(ctx, endpoint, "timeout")
        if not started or response is None:
            return _TIMED_OUT
        await _end_cut_stream(response.headers, send, f"endpoint {endpoint.id} went idle for "
                              f"{self.config.idle_timeout:g}s mid-stream")
        return _DONE

    async def _pass_on(self, ctx: RequestContext, answer: _Answered, send: ASGISend) -> None:
        ctx.values[ENDPOINT_KEY] = answer.endpoint_id
        headers = [(k, v) for k, v in answer.headers if k.lower() != b"content-length"]
        out = response_headers_for_client(headers, request_id=ctx.request_id,
                                          endpoint_id=answer.endpoint_id,
                                          extra=_route_header(ctx, answer.endpoint_id))
        out.append((b"content-length", str(len(answer.body)).encode()))
        await send({"type": "http.response.start", "status": answer.status, "headers": out})
        await send({"type": "http.response.body", "body": answer.body, "more_body": False})

    @staticmethod
    def _ids(endpoint: Endpoint) -> tuple[tuple[bytes, bytes], ...]:
        return ((b"x-pixiu-kv-endpoint", endpoint.id.encode("latin-1")),)

    @staticmethod
    def _no_endpoint(cluster: Cluster, failure: PickFailure | None, tried: list[str]) -> GatewayError:
        if tried:
            return GatewayError(503, f"no endpoint of cluster {cluster.name} could serve the "
                                f"request; tried: {', '.join(tried)}", "service_unavailable",
                                code="no_endpoint_available")
        if failure is PickFailure.ALL_FULL:
            return GatewayError(429, f"every endpoint of cluster {cluster.name} is at its "
                                "in-flight limit; retry later", "rate_limit_error",
                                code="endpoints_full", headers=((b"retry-after", b"1"),))
        return GatewayError(503, f"cluster {cluster.name} has no healthy endpoint",
                            "service_unavailable", code="no_healthy_endpoint")


def _failed(ctx: RequestContext, endpoint: Endpoint, kind: str) -> None:
    """Note a failed upstream attempt for the metrics (``pixiu_kv_upstream_errors_total``)."""
    failures = ctx.values.get(FAILURES_KEY)
    if failures is None:
        ctx.values[FAILURES_KEY] = failures = []
    failures.append((endpoint.id, kind))


def _route_header(ctx: RequestContext, endpoint_id: str) -> tuple[tuple[bytes, bytes], ...]:
    """``x-pixiu-kv-route`` on every proxied response: why the request went where it went.

    ``reason=no_hint`` when no filter preferred an endpoint (the cluster's policy chose).
    """
    hint = ctx.route_hint
    if hint is None:
        return ((b"x-pixiu-kv-route", f"reason=no_hint; hinted=-; used=no; endpoint={endpoint_id}"
                 .encode("latin-1", "replace")),)
    parts = [f"reason={hint.reason}", f"hinted={hint.endpoint_id or '-'}",
             f"used={'yes' if hint.endpoint_id == endpoint_id else 'no'}"]
    if hint.matched_tokens is not None:
        parts.append(f"matched={hint.matched_tokens}")
    if hint.prompt_tokens is not None:
        parts.append(f"prompt={hint.prompt_tokens}")
    parts.append(f"endpoint={endpoint_id}")
    return ((b"x-pixiu-kv-route", "; ".join(parts).encode("latin-1", "replace")),)


async def _read_bounded(response: UpstreamResponse, limit: int) -> bytes:
    body = bytearray()
    while len(body) < limit:
        chunk = await response.next_chunk()
        if chunk is None:
            break
        body += chunk[: limit - len(body)]
    return bytes(body)


async def _end_cut_stream(headers: list[tuple[bytes, bytes]], send: ASGISend, message: str) -> None:
    """The response already started and the engine failed: tell the client as well as HTTP allows.

    An event stream gets a final error event (as vLLM sends mid-stream errors) and ends;
    any other body is left incomplete, so the server aborts the connection and the client
    sees a truncated response instead of a silently short one.
    """
    content_type = header_value(headers, b"content-type") or b""
    if content_type.lower().startswith(b"text/event-stream"):
        event = b"data: " + error_body(message, "upstream_error", "upstream_stream_cut") + b"\n\n"
        await send({"type": "http.response.body", "body": event, "more_body": True})
        await send({"type": "http.response.body", "body": b"data: [DONE]\n\n", "more_body": False})
