"""Per-request glue between the gateway's request path and :class:`~pixiu_kv.metrics.GatewayMetrics`.

The request path calls three things, each a few microseconds:

* ``observer = RequestObserver(metrics, started_at)`` when a proxied request is admitted,
  and ``send = observer.wrap_send(send)`` so the response's first byte and the engine's
  ``usage`` block (prompt and cached tokens) are seen on the way out;
* ``await timed_decode(filter, ctx, metrics)`` in place of ``await filter.decode(ctx)``, so
  the routing lookup's latency is recorded by outcome;
* ``observer.finish(ctx, completed=..., status=...)`` once, however the request ended.

Upstream retries and failovers are read from what the LLM proxy records in ``ctx.values``
(tried endpoints, attempts, and failures by kind when it records them).
"""

from __future__ import annotations

from collections.abc import MutableMapping
from typing import Any, Final, Protocol

import trio

from .chain import ASGISend
from .context import RequestContext
from .metrics import GatewayMetrics, route_outcome
from .routing.usage import UsageScanner

__all__ = [
    "ATTEMPTS_KEY",
    "ENDPOINT_KEY",
    "TRIED_KEY",
    "UPSTREAM_FAILURES_KEY",
    "RequestObserver",
    "lookup_outcome",
    "timed_decode",
]

# Keys the LLM proxy writes into ``ctx.values`` (same strings as pixiu_kv.filters.llm_proxy).
ENDPOINT_KEY: Final = "proxy.endpoint"
ATTEMPTS_KEY: Final = "proxy.attempts"
TRIED_KEY: Final = "proxy.tried"
UPSTREAM_FAILURES_KEY: Final = "proxy.failures"
"""``list[tuple[endpoint_id, kind]]``: one entry per failed upstream attempt (kinds as in
:data:`pixiu_kv.metrics.UPSTREAM_ERROR_KINDS`)."""

_LOOKUP_OUTCOMES: Final = {"kv_prefix": "hit", "miss": "miss", "timeout": "timeout", "error": "error"}


def lookup_outcome(reason: str | None) -> str | None:
    """The lookup outcome behind a route-hint reason; None when no lookup was made
    (tokens unknown, breaker open, no prompt)."""
    return None if reason is None else _LOOKUP_OUTCOMES.get(reason)


class DecodeFilterLike(Protocol):
    async def decode(self, ctx: RequestContext) -> None: ...


async def timed_decode(f: DecodeFilterLike, ctx: RequestContext, metrics: GatewayMetrics) -> None:
    """Run a decode filter; when it made a routing lookup, record how long the filter took
    (the lookup dominates it) under the lookup's outcome."""
    before = ctx.route_hint
    started = trio.current_time()
    await f.decode(ctx)
    hint = ctx.route_hint
    if hint is not None and hint is not before:
        outcome = lookup_outcome(hint.reason)
        if outcome is not None:
            metrics.lookup_observed(trio.current_time() - started, outcome)


class RequestObserver:
    """Watches one proxied request on behalf of the metrics."""

    __slots__ = ("_done", "_first_byte_at", "_metrics", "_started_at", "_usage")

    def __init__(self, metrics: GatewayMetrics, started_at: float) -> None:
        self._metrics = metrics
        self._started_at = started_at
        self._first_byte_at: float | None = None
        self._usage = UsageScanner()
        self._done = False
        metrics.request_started()

    def wrap_send(self, send: ASGISend) -> ASGISend:
        async def observed(message: MutableMapping[str, Any]) -> None:
            if message["type"] == "http.response.body":
                body = message.get("body", b"")
                if body:
                    if self._first_byte_at is None:
                        self._first_byte_at = trio.current_time()
                    self._usage.feed(body)
            await send(message)
        return observed

    def finish(self, ctx: RequestContext | None, *, response_started: bool, completed: bool,
               status: int) -> None:
        """Record the request's end (idempotent). ``completed``: the whole response was sent;
        otherwise the client went away (``response_started`` tells in which phase)."""
        if self._done:
            return
        self._done = True
        m = self._metrics
        values = ctx.values if ctx is not None else {}
        endpoint = values.get(ENDPOINT_KEY)
        cluster = ctx.cluster_name if ctx is not None else "none"
        if completed:
            ttfb = None if self._first_byte_at is None else self._first_byte_at - self._started_at
            m.request_finished(cluster=cluster, endpoint=endpoint, status=status,
                               duration=trio.current_time() - self._started_at, time_to_first_byte=ttfb)
            usage = self._usage.result()
            if usage is not None and usage.prompt_tokens is not None:
                m.usage_observed(usage.prompt_tokens, usage.cached_tokens or 0)
        else:
            phase = ("streaming" if response_started
                     else "before_first_byte" if values.get(ATTEMPTS_KEY) else "before_upstream")
            m.request_cancelled(phase=phase)
        if ctx is None:
            return
        hint = ctx.route_hint
        m.route_decided(route_outcome(hint.endpoint_id if hint else None, hint.reason if hint else None,
                                      endpoint))
        tried: list[str] = values.get(TRIED_KEY) or []
        for _ in range(max(0, len(tried) - 1)):
            m.upstream_failover(cluster)
        failures = values.get(UPSTREAM_FAILURES_KEY)
        if failures is None:
            # Without per-attempt records, retries are attributed to the last endpoint tried.
            attempts = int(values.get(ATTEMPTS_KEY) or 0)
            for _ in range(max(0, attempts - len(tried))):
                m.upstream_retry(tried[-1] if tried else "none")
            return
        per_endpoint: dict[str, int] = {}
        for endpoint_id, kind in failures:
            m.upstream_error(endpoint_id, kind)
            per_endpoint[endpoint_id] = per_endpoint.get(endpoint_id, 0) + 1
        if endpoint is not None and completed:
            per_endpoint[endpoint] = per_endpoint.get(endpoint, 0) + 1
        for endpoint_id, attempts_here in per_endpoint.items():
            for _ in range(attempts_here - 1):
                m.upstream_retry(endpoint_id)
