"""Pure logic as tables: endpoint choice, health bookkeeping, backoff, headers, routes."""

from __future__ import annotations

import json
import logging
import random
from collections import Counter
from io import StringIO

import attrs
import pytest

from pixiu_kv._headers import request_headers_for_upstream, response_headers_for_client
from pixiu_kv._routing import RouteTable, is_json_content_type
from pixiu_kv.cluster import Cluster, PickFailure, attempts_allowed, backoff_delay
from pixiu_kv.config import (
    ClusterConfig,
    EndpointConfig,
    HealthCheckConfig,
    LogConfig,
    RetryPolicyConfig,
    RouteConfig,
)
from pixiu_kv.logs import configure_logging, log_event


def _cluster(policy: str = "round_robin", weights: tuple[int, ...] = (1, 1, 1),
             max_in_flight: int = 10, **kwargs: object) -> Cluster:
    endpoints = tuple(EndpointConfig(id=f"e{i}", address=f"http://127.0.0.1:{9000 + i}", weight=w,
                                     max_in_flight=max_in_flight) for i, w in enumerate(weights))
    config = ClusterConfig(name="c", endpoints=endpoints, lb_policy=policy, **kwargs)  # type: ignore[arg-type]
    return Cluster(config, rng=random.Random(7))


def _ids(cluster: Cluster, n: int, now: float = 0.0) -> list[str]:
    out = []
    for _ in range(n):
        pick = cluster.pick(now)
        assert pick.endpoint is not None
        out.append(pick.endpoint.id)
    return out


def test_round_robin_is_smooth_and_weighted() -> None:
    assert _ids(_cluster(), 6) == ["e0", "e1", "e2", "e0", "e1", "e2"]
    counts = Counter(_ids(_cluster(weights=(3, 1, 1)), 50))
    assert counts == {"e0": 30, "e1": 10, "e2": 10}
    # Smooth: the heavy endpoint's turns are spread, never three in a row.
    seq = _ids(_cluster(weights=(3, 1, 1)), 5)
    assert seq.count("e0") == 3 and "e0e0e0" not in "".join(seq)


def test_least_request_prefers_fewest_in_flight_per_weight() -> None:
    cluster = _cluster("least_request", weights=(1, 2, 1))
    e0, e1, e2 = cluster.endpoints
    e0.in_flight, e1.in_flight, e2.in_flight = 2, 3, 5
    assert cluster.pick(0.0).endpoint is e1  # 3/2 < 2/1
    e1.in_flight = 6
    assert cluster.pick(0.0).endpoint is e0


def test_random_respects_weights() -> None:
    counts = Counter(_ids(_cluster("random", weights=(8, 1, 1)), 1000))
    assert counts["e0"] > 700 and counts["e1"] > 30 and counts["e2"] > 30


@pytest.mark.parametrize(("state", "preferred", "expected", "was_preferred"), [
    ("ok", "e1", "e1", True),
    ("unhealthy", "e1", "e0", False),
    ("cooldown", "e1", "e0", False),
    ("full", "e1", "e0", False),
    ("draining", "e1", "e0", False),
    ("ok", "unknown", "e0", False),
    ("ok", None, "e0", False),
])
def test_preferred_endpoint_is_used_only_when_usable(state: str, preferred: str | None, expected: str,
                                                     was_preferred: bool) -> None:
    cluster = _cluster(weights=(1, 1))
    e1 = cluster.endpoints[1]
    if state == "unhealthy":
        e1.healthy = False
    elif state == "cooldown":
        cluster.start_cooldown(e1, now=0.0)
    elif state == "full":
        e1.in_flight = e1.max_in_flight
    elif state == "draining":
        e1.draining = True
    pick = cluster.pick(1.0, preferred)
    assert pick.endpoint is not None and pick.endpoint.id == expected
    assert pick.preferred is was_preferred


def test_pick_failures_say_why() -> None:
    cluster = _cluster(weights=(1, 1), max_in_flight=1)
    for e in cluster.endpoints:
        e.in_flight = 1
    assert cluster.pick(0.0).failure is PickFailure.ALL_FULL
    for e in cluster.endpoints:
        e.healthy = False
    assert cluster.pick(0.0).failure is PickFailure.NONE_HEALTHY


def test_cooldown_expires() -> None:
    cluster = _cluster(weights=(1,), cooldown=5.0)
    e0 = cluster.endpoints[0]
    cluster.start_cooldown(e0, now=10.0)
    assert cluster.pick(14.9).failure is PickFailure.NONE_HEALTHY
    assert cluster.pick(15.0).endpoint is e0


def test_failover_order_wraps_around_and_skips_tried_and_full() -> None:
    cluster = _cluster(weights=(1, 1, 1, 1))
    e0, e1, e2, e3 = cluster.endpoints
    assert cluster.next_after(e2, 0.0, [e2]).endpoint is e3
    assert cluster.next_after(e3, 0.0, [e2, e3]).endpoint is e0
    e0.in_flight = e0.max_in_flight
    assert cluster.next_after(e3, 0.0, [e2, e3]).endpoint is e1
    assert cluster.next_after(e1, 0.0, [e1, e2, e3]).failure is PickFailure.ALL_FULL
    e0.in_flight = 0
    assert cluster.next_after(e0, 0.0, [e0, e1, e2, e3]).failure is PickFailure.ALL_TRIED


def test_health_thresholds() -> None:
    health = HealthCheckConfig(unhealthy_threshold=2, healthy_threshold=3)
    cluster = _cluster(weights=(1,), health_check=health)
    e0 = cluster.endpoints[0]
    assert [cluster.record_check(e0, ok) for ok in (False, True, False, False)] == [False, False, False, True]
    assert not e0.healthy
    assert [cluster.record_check(e0, True) for _ in range(3)] == [False, False, True]
    assert e0.healthy


def test_passive_failures_count_only_with_active_checks() -> None:
    off = _cluster(weights=(1,), health_check=HealthCheckConfig(enabled=False, unhealthy_threshold=1))
    assert not off.record_connect_failure(off.endpoints[0]) and off.endpoints[0].healthy
    on = _cluster(weights=(1,), health_check=HealthCheckConfig(unhealthy_threshold=1))
    assert on.record_connect_failure(on.endpoints[0]) and not on.endpoints[0].healthy


def test_in_flight_cap_is_bounded_by_the_pool() -> None:
    endpoint = EndpointConfig(id="e", address="http://h:1", max_in_flight=900)
    config = ClusterConfig(name="c", endpoints=(endpoint,))
    assert Cluster(config, max_connections_per_endpoint=100).endpoints[0].max_in_flight == 100


def test_backoff_policies() -> None:
    rng = random.Random(1)
    count = RetryPolicyConfig(policy="count", max_attempts=3, base_backoff=0.2, max_backoff=1.0)
    assert [backoff_delay(count, n, rng) for n in (1, 2, 3)] == [0.2, 0.2, 0.2]
    none = attrs.evolve(count, policy="none")
    assert attempts_allowed(none) == 1 and attempts_allowed(count) == 3
    expo = RetryPolicyConfig(policy="exponential", max_attempts=10, base_backoff=0.1, max_backoff=0.5)
    for n, cap in ((1, 0.1), (2, 0.2), (3, 0.4), (4, 0.5), (9, 0.5)):
        samples = [backoff_delay(expo, n, rng) for _ in range(200)]
        assert all(0.0 <= s <= cap for s in samples)
        assert max(samples) > cap * 0.8  # full jitter spans the whole range


def test_request_headers_for_upstream() -> None:
    headers = [(b"Host", b"gw"), (b"Content-Length", b"5"), (b"Connection", b"close, X-Hop"),
               (b"X-Hop", b"1"), (b"TE", b"trailers"), (b"Upgrade", b"h2c"), (b"Proxy-Foo", b"1"),
               (b"Authorization", b"Bearer client"), (b"X-Pixiu-KV-Endpoint", b"spoof"),
               (b"X-Request-Id", b"old"), (b"Accept", b"text/event-stream")]
    out = request_headers_for_upstream(headers, request_id="rid", api_key="")
    assert out == [(b"accept", b"text/event-stream"), (b"authorization", b"Bearer client"),
                   (b"x-request-id", b"rid")]
    keyed = request_headers_for_upstream(headers, request_id="rid", api_key="k")
    assert (b"authorization", b"Bearer k") in keyed and (b"authorization", b"Bearer client") not in keyed


def test_response_headers_for_client() -> None:
    upstream = [(b"Content-Type", b"text/event-stream"), (b"Transfer-Encoding", b"chunked"),
                (b"Connection", b"keep-alive"), (b"Keep-Alive", b"timeout=5"), (b"Date", b"x"),
                (b"Server", b"uvicorn"), (b"x-pixiu-kv-endpoint", b"spoof")]
    out = response_headers_for_client(upstream, request_id="rid", endpoint_id="e1")
    assert out == [(b"content-type", b"text/event-stream"), (b"x-request-id", b"rid"),
                   (b"x-pixiu-kv-endpoint", b"e1")]


def test_route_table_longest_prefix_then_model() -> None:
    table = RouteTable([RouteConfig(cluster="all"), RouteConfig(cluster="v1", prefix="/v1"),
                        RouteConfig(cluster="big", prefix="/v1", model="big"),
                        RouteConfig(cluster="chat", prefix="/v1/chat")])
    assert table.resolve("/v1/completions", "small").cluster == "v1"  # type: ignore[union-attr]
    assert table.resolve("/v1/completions", "big").cluster == "big"  # type: ignore[union-attr]
    assert table.resolve("/v1/chat/completions", "big").cluster == "chat"  # type: ignore[union-attr]
    assert table.resolve("/tokenize", None).cluster == "all"  # type: ignore[union-attr]
    assert RouteTable([RouteConfig(cluster="x", prefix="/v1", model="m")]).resolve("/v1/a", None) is None


@pytest.mark.parametrize(("value", "ok"), [
    (b"application/json", True), (b"Application/JSON; charset=utf-8", True),
    (b"application/vnd.api+json", True), (b"text/plain", False), (None, False),
    (b"application/x-www-form-urlencoded", False),
])
def test_json_content_types(value: bytes | None, ok: bool) -> None:
    assert is_json_content_type(value) is ok


@pytest.mark.parametrize("fmt", ["text", "json"])
def test_structured_log_lines(fmt: str) -> None:
    stream = StringIO()
    configure_logging(LogConfig(level="info", format=fmt), stream)
    try:
        logger = logging.getLogger("pixiu_kv.access")
        log_event(logger, logging.INFO, "request", request_id="r1", path="/v1/completions",
                  status=200, ttfb_ms=1.5, tried=["e1", "e2"], note="two words")
        log_event(logger, logging.DEBUG, "hidden", x=1)
    finally:
        root = logging.getLogger("pixiu_kv")
        for handler in list(root.handlers):
            root.removeHandler(handler)
        root.propagate = True
        root.setLevel(logging.NOTSET)
    lines = stream.getvalue().splitlines()
    assert len(lines) == 1
    if fmt == "json":
        record = json.loads(lines[0])
        assert record["event"] == "request" and record["status"] == 200 and record["tried"] == ["e1", "e2"]
    else:
        assert " event=request request_id=r1 path=/v1/completions status=200 ttfb_ms=1.500 tried=e1,e2 " \
               'note="two words"' in lines[0] + " "
