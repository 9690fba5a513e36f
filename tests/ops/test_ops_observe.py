"""The request-path glue: what one request's life turns into in the metrics."""

from __future__ import annotations

from typing import Any

import trio

from pixiu_kv.context import BackgroundScope, RequestContext, RouteHint
from pixiu_kv.metrics import GatewayMetrics
from pixiu_kv.observe import RequestObserver, lookup_outcome, timed_decode


def make_ctx(nursery: trio.Nursery, **values: Any) -> RequestContext:
    ctx = RequestContext(request_id="r", method="POST", path="/v1/chat/completions", headers=[],
                         body=b"{}", json={}, cluster_name="fleet", background=BackgroundScope(nursery))
    ctx.values.update(values)
    return ctx


async def sink(message: Any) -> None:
    return None


SSE_END = (b'data: {"choices":[],"usage":{"prompt_tokens":600,"completion_tokens":2,'
           b'"prompt_tokens_details":{"cached_tokens":512}}}\n\ndata: [DONE]\n\n')


async def test_a_completed_stream_is_counted_with_ttfb_usage_and_route(nursery: trio.Nursery) -> None:
    m = GatewayMetrics()
    observer = RequestObserver(m, trio.current_time())
    assert m.value("pixiu_kv_requests_in_flight") == 1.0
    send = observer.wrap_send(sink)
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b'data: {"choices":[],"usage":null}\n\n',
                "more_body": True})
    await send({"type": "http.response.body", "body": SSE_END, "more_body": False})
    ctx = make_ctx(nursery, **{"proxy.endpoint": "e1", "proxy.attempts": 1, "proxy.tried": ["e1"]})
    ctx.route_hint = RouteHint("e1", "kv_prefix", 512, 600)
    observer.finish(ctx, response_started=True, completed=True, status=200)
    observer.finish(ctx, response_started=True, completed=True, status=200)  # idempotent
    assert m.value("pixiu_kv_requests_in_flight") == 0.0
    assert m.value("pixiu_kv_requests_total", {"cluster": "fleet", "endpoint": "e1", "code": "200"}) == 1.0
    assert m.value("pixiu_kv_time_to_first_byte_seconds_count", {"cluster": "fleet"}) == 1.0
    assert m.value("pixiu_kv_prompt_tokens_total") == 600.0
    assert m.value("pixiu_kv_cached_prompt_tokens_total") == 512.0
    assert m.value("pixiu_kv_routing_decisions_total", {"outcome": "cache_hit"}) == 1.0
    assert m.value("pixiu_kv_upstream_retries_total", {"endpoint": "e1"}) is None


async def test_retries_failovers_and_failures_are_counted(nursery: trio.Nursery) -> None:
    m = GatewayMetrics()
    observer = RequestObserver(m, trio.current_time())
    ctx = make_ctx(nursery, **{"proxy.endpoint": "e2", "proxy.attempts": 3, "proxy.tried": ["e1", "e2"],
                               "proxy.failures": [("e1", "status_5xx"), ("e1", "connect")]})
    ctx.route_hint = RouteHint("e1", "kv_prefix", 512, 600)
    observer.finish(ctx, response_started=True, completed=True, status=200)
    assert m.value("pixiu_kv_upstream_failovers_total", {"cluster": "fleet"}) == 1.0
    # Two failed attempts on e1 (one retry there), then e2 served at its first attempt.
    assert m.value("pixiu_kv_upstream_retries_total", {"endpoint": "e1"}) == 1.0
    assert m.value("pixiu_kv_upstream_retries_total", {"endpoint": "e2"}) is None
    assert m.value("pixiu_kv_upstream_errors_total", {"endpoint": "e1", "kind": "connect"}) == 1.0
    assert m.value("pixiu_kv_routing_decisions_total", {"outcome": "preferred_unhealthy"}) == 1.0


async def test_disconnects_are_counted_by_phase(nursery: trio.Nursery) -> None:
    m = GatewayMetrics()
    RequestObserver(m, trio.current_time()).finish(None, response_started=False, completed=False, status=0)
    RequestObserver(m, trio.current_time()).finish(make_ctx(nursery, **{"proxy.attempts": 1}),
                                                   response_started=False, completed=False, status=0)
    RequestObserver(m, trio.current_time()).finish(make_ctx(nursery, **{"proxy.attempts": 1}),
                                                   response_started=True, completed=False, status=200)
    for phase in ("before_upstream", "before_first_byte", "streaming"):
        assert m.value("pixiu_kv_client_disconnects_total", {"phase": phase}) == 1.0
    assert m.value("pixiu_kv_requests_in_flight") == 0.0


class HintingFilter:
    def __init__(self, reason: str) -> None:
        self.reason = reason

    async def decode(self, ctx: RequestContext) -> None:
        await trio.lowlevel.checkpoint()
        ctx.route_hint = RouteHint(None, self.reason)


async def test_timed_decode_records_only_real_lookups(nursery: trio.Nursery) -> None:
    m = GatewayMetrics()
    for reason in ("timeout", "miss", "no_tokens", "breaker_open"):
        await timed_decode(HintingFilter(reason), make_ctx(nursery), m)
    assert m.value("pixiu_kv_lookup_duration_seconds_count", {"outcome": "timeout"}) == 1.0
    assert m.value("pixiu_kv_lookup_duration_seconds_count", {"outcome": "miss"}) == 1.0
    assert m.value("pixiu_kv_lookup_duration_seconds_count", {"outcome": "other"}) is None
    outcomes = [lookup_outcome(r) for r in ("kv_prefix", "error", "no_tokens", None)]
    assert outcomes == ["hit", "error", None, None]


async def test_without_failure_records_retries_go_to_the_last_endpoint(nursery: trio.Nursery) -> None:
    m = GatewayMetrics()
    observer = RequestObserver(m, trio.current_time())
    ctx = make_ctx(nursery, **{"proxy.endpoint": "e1", "proxy.attempts": 2, "proxy.tried": ["e1"]})
    observer.finish(ctx, response_started=True, completed=True, status=200)
    assert m.value("pixiu_kv_upstream_retries_total", {"endpoint": "e1"}) == 1.0
