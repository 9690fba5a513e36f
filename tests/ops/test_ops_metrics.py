"""Metric exposition: names, types and labels; scrapes read live state."""

from __future__ import annotations

import re

import attrs
import pytest

from pixiu_kv.cluster import Cluster
from pixiu_kv.config import ClusterConfig, EndpointConfig
from pixiu_kv.filters.kvcache import KvCacheStats
from pixiu_kv.metrics import (
    BackgroundJobCounts,
    BreakerSample,
    GatewayMetrics,
    KvCacheSample,
    StateSnapshot,
    route_outcome,
    sample_endpoints,
    sample_kvcache,
)

EXPECTED_TYPES = {
    "pixiu_kv_requests": "counter",
    "pixiu_kv_requests_in_flight": "gauge",
    "pixiu_kv_request_duration_seconds": "histogram",
    "pixiu_kv_time_to_first_byte_seconds": "histogram",
    "pixiu_kv_client_disconnects": "counter",
    "pixiu_kv_upstream_errors": "counter",
    "pixiu_kv_upstream_retries": "counter",
    "pixiu_kv_upstream_failovers": "counter",
    "pixiu_kv_routing_decisions": "counter",
    "pixiu_kv_lookup_duration_seconds": "histogram",
    "pixiu_kv_prompt_tokens": "counter",
    "pixiu_kv_cached_prompt_tokens": "counter",
    "pixiu_kv_observed_cache_hit_ratio": "gauge",
    "pixiu_kv_config_reloads": "counter",
    "pixiu_kv_config_generation": "gauge",
    "pixiu_kv_endpoint_healthy": "gauge",
    "pixiu_kv_endpoint_available": "gauge",
    "pixiu_kv_endpoint_draining": "gauge",
    "pixiu_kv_endpoint_in_flight_requests": "gauge",
    "pixiu_kv_endpoint_max_in_flight_requests": "gauge",
    "pixiu_kv_circuit_breaker_state": "gauge",
    "pixiu_kv_token_cache_hits": "counter",
    "pixiu_kv_token_cache_misses": "counter",
    "pixiu_kv_token_cache_entries": "gauge",
    "pixiu_kv_token_cache_bytes": "gauge",
    "pixiu_kv_hotness_keys": "gauge",
    "pixiu_kv_background_jobs_started": "counter",
    "pixiu_kv_background_jobs_finished": "counter",
    "pixiu_kv_background_jobs_dropped": "counter",
    "pixiu_kv_background_jobs_cancelled": "counter",
    "pixiu_kv_background_jobs_running": "gauge",
    "pixiu_kv_cache_actions": "counter",
    "pixiu_kv_kvcache_lookups": "counter",
    "pixiu_kv_tokenize_requests": "counter",
}


def families(metrics: GatewayMetrics) -> dict[str, str]:
    return {m.name: m.type for m in metrics.registry.collect()}


def test_every_family_has_its_name_and_type() -> None:
    assert families(GatewayMetrics()) == EXPECTED_TYPES


def test_exposition_follows_prometheus_conventions() -> None:
    text = GatewayMetrics().render().decode()
    types = dict(re.findall(r"^# TYPE (\S+) (\S+)$", text, re.M))
    for name, kind in types.items():
        assert name.startswith("pixiu_kv_"), name
        if kind == "counter":
            assert name.endswith("_total"), name
        if name.endswith("_seconds"):
            assert kind == "histogram", name
    assert types["pixiu_kv_requests_total"] == "counter"
    assert "# HELP pixiu_kv_request_duration_seconds " in text


def test_gateways_do_not_share_a_registry() -> None:
    a, b = GatewayMetrics(), GatewayMetrics()
    a.route_decided("cache_hit")
    assert a.value("pixiu_kv_routing_decisions_total", {"outcome": "cache_hit"}) == 1.0
    assert b.value("pixiu_kv_routing_decisions_total", {"outcome": "cache_hit"}) == 0.0


def test_request_events_are_counted_with_labels() -> None:
    m = GatewayMetrics()
    m.request_started()
    m.request_started()
    assert m.value("pixiu_kv_requests_in_flight") == 2.0
    m.request_finished(cluster="c", endpoint="e1", status=200, duration=0.5, time_to_first_byte=0.02)
    m.request_cancelled(phase="streaming")
    assert m.value("pixiu_kv_requests_in_flight") == 0.0
    assert m.value("pixiu_kv_requests_total", {"cluster": "c", "endpoint": "e1", "code": "200"}) == 1.0
    assert m.value("pixiu_kv_request_duration_seconds_count", {"cluster": "c"}) == 1.0
    assert m.value("pixiu_kv_request_duration_seconds_bucket", {"cluster": "c", "le": "0.5"}) == 1.0
    assert m.value("pixiu_kv_request_duration_seconds_bucket", {"cluster": "c", "le": "0.25"}) == 0.0
    assert m.value("pixiu_kv_time_to_first_byte_seconds_sum", {"cluster": "c"}) == pytest.approx(0.02)
    assert m.value("pixiu_kv_client_disconnects_total", {"phase": "streaming"}) == 1.0


def test_gateway_answered_errors_have_no_endpoint() -> None:
    m = GatewayMetrics()
    m.request_started()
    m.request_finished(cluster="c", endpoint=None, status=503, duration=0.001)
    assert m.value("pixiu_kv_requests_total", {"cluster": "c", "endpoint": "none", "code": "503"}) == 1.0
    assert m.value("pixiu_kv_time_to_first_byte_seconds_count", {"cluster": "c"}) is None


def test_upstream_and_routing_label_values_are_bounded() -> None:
    m = GatewayMetrics()
    m.upstream_error("e1", "connect")
    m.upstream_error("e1", "something new " * 10)
    m.upstream_retry("e1")
    m.upstream_failover("c")
    m.route_decided("lookup_timeout")
    m.route_decided("a reason nobody planned for")
    m.lookup_observed(0.003, "hit")
    m.lookup_observed(0.050, "surprise")
    assert m.value("pixiu_kv_upstream_errors_total", {"endpoint": "e1", "kind": "connect"}) == 1.0
    assert m.value("pixiu_kv_upstream_errors_total", {"endpoint": "e1", "kind": "other"}) == 1.0
    assert m.value("pixiu_kv_upstream_retries_total", {"endpoint": "e1"}) == 1.0
    assert m.value("pixiu_kv_upstream_failovers_total", {"cluster": "c"}) == 1.0
    assert m.value("pixiu_kv_routing_decisions_total", {"outcome": "lookup_timeout"}) == 1.0
    assert m.value("pixiu_kv_routing_decisions_total", {"outcome": "other"}) == 1.0
    assert m.value("pixiu_kv_lookup_duration_seconds_count", {"outcome": "hit"}) == 1.0
    assert m.value("pixiu_kv_lookup_duration_seconds_count", {"outcome": "other"}) == 1.0


def test_every_routing_outcome_scrapes_as_zero_before_it_happens() -> None:
    text = GatewayMetrics().render().decode()
    for outcome in ("cache_hit", "no_tokens", "lookup_miss", "lookup_timeout", "breaker_open",
                    "preferred_unhealthy"):
        assert f'pixiu_kv_routing_decisions_total{{outcome="{outcome}"}} 0.0' in text


def test_observed_hit_ratio_comes_from_cached_tokens() -> None:
    m = GatewayMetrics()
    assert m.value("pixiu_kv_observed_cache_hit_ratio") is None
    m.usage_observed(prompt_tokens=1000, cached_tokens=768)
    m.usage_observed(prompt_tokens=1000, cached_tokens=0)
    m.usage_observed(prompt_tokens=10, cached_tokens=99)  # clamped: an engine cannot cache more
    m.usage_observed(prompt_tokens=0, cached_tokens=0)
    assert m.value("pixiu_kv_prompt_tokens_total") == 2010.0
    assert m.value("pixiu_kv_cached_prompt_tokens_total") == 778.0
    assert m.value("pixiu_kv_observed_cache_hit_ratio") == pytest.approx(778 / 2010)


def test_state_is_read_at_scrape_time() -> None:
    m = GatewayMetrics()
    cluster = Cluster(ClusterConfig(name="fleet", endpoints=(
        EndpointConfig(id="e1", address="http://127.0.0.1:1", max_in_flight=7),
        EndpointConfig(id="e2", address="http://127.0.0.1:2"),
    )))
    draining: set[str] = set()
    breaker = {"state": "closed"}
    kv = {"hits": 0}
    m.set_state_source(lambda: StateSnapshot(
        endpoints=sample_endpoints([cluster], now=100.0, draining=draining),
        breakers=(BreakerSample("lmcache", breaker["state"]),),
        kvcache=KvCacheSample(token_cache_hits=kv["hits"], token_cache_entries=3, hotness_keys=2,
                              background=BackgroundJobCounts(started=5, finished=3, dropped=1,
                                                             cancelled=1, running=0),
                              cache_actions={("pin", "ok"): 2, ("evict", "error"): 1}),
        config_generation=4,
    ))
    e1 = {"cluster": "fleet", "endpoint": "e1"}
    assert m.value("pixiu_kv_endpoint_in_flight_requests", e1) == 0.0
    assert m.value("pixiu_kv_endpoint_max_in_flight_requests", e1) == 7.0
    # Mutate the live objects: the next scrape sees it, with no call from the request path.
    cluster.endpoints[0].in_flight = 5
    cluster.endpoints[1].healthy = False
    draining.add("e1")
    breaker["state"] = "open"
    kv["hits"] = 9
    assert m.value("pixiu_kv_endpoint_in_flight_requests", e1) == 5.0
    assert m.value("pixiu_kv_endpoint_healthy", {"cluster": "fleet", "endpoint": "e2"}) == 0.0
    assert m.value("pixiu_kv_endpoint_draining", e1) == 1.0
    assert m.value("pixiu_kv_endpoint_available", e1) == 0.0
    assert m.value("pixiu_kv_circuit_breaker_state", {"breaker": "lmcache", "state": "open"}) == 1.0
    assert m.value("pixiu_kv_circuit_breaker_state", {"breaker": "lmcache", "state": "closed"}) == 0.0
    assert m.value("pixiu_kv_token_cache_hits_total") == 9.0
    assert m.value("pixiu_kv_token_cache_entries") == 3.0
    assert m.value("pixiu_kv_hotness_keys") == 2.0
    assert m.value("pixiu_kv_background_jobs_dropped_total") == 1.0
    assert m.value("pixiu_kv_cache_actions_total", {"action": "evict", "outcome": "error"}) == 1.0
    assert m.value("pixiu_kv_config_generation") == 4.0


def test_a_scrape_without_state_source_lists_families_without_samples() -> None:
    m = GatewayMetrics()
    assert m.value("pixiu_kv_endpoint_healthy", {"cluster": "c", "endpoint": "e"}) is None
    assert "# TYPE pixiu_kv_endpoint_healthy gauge" in m.render().decode()


def test_breaker_states_are_validated() -> None:
    with pytest.raises(ValueError):
        BreakerSample("lmcache", "ajar")
    assert attrs.evolve(BreakerSample("b", "open"), state="half_open").state == "half_open"


def test_kvcache_stats_are_read_live_at_scrape_time() -> None:
    stats = KvCacheStats()
    m = GatewayMetrics()

    def snapshot() -> StateSnapshot:
        kv, breakers = sample_kvcache(stats)
        return StateSnapshot(breakers=breakers, kvcache=kv)

    m.set_state_source(snapshot)
    assert m.value("pixiu_kv_kvcache_lookups_total", {"outcome": "timeout"}) == 0.0
    stats.lookups["timeout"] += 3
    stats.actions["pin"]["ok"] += 2
    stats.background_dropped = 4
    stats.tokenize_calls, stats.tokenize_failures = 10, 3
    stats.token_cache_size = 12
    stats.breakers = {"lookup_routing": "open", "tokenize": "closed"}
    assert m.value("pixiu_kv_kvcache_lookups_total", {"outcome": "timeout"}) == 3.0
    assert m.value("pixiu_kv_cache_actions_total", {"action": "pin", "outcome": "ok"}) == 2.0
    assert m.value("pixiu_kv_cache_actions_total", {"action": "evict", "outcome": "failed"}) == 0.0
    assert m.value("pixiu_kv_background_jobs_dropped_total") == 4.0
    assert m.value("pixiu_kv_tokenize_requests_total", {"outcome": "ok"}) == 7.0
    assert m.value("pixiu_kv_tokenize_requests_total", {"outcome": "failed"}) == 3.0
    assert m.value("pixiu_kv_token_cache_entries") == 12.0
    assert m.value("pixiu_kv_circuit_breaker_state", {"breaker": "lookup_routing", "state": "open"}) == 1.0
    assert m.value("pixiu_kv_circuit_breaker_state", {"breaker": "tokenize", "state": "closed"}) == 1.0


@pytest.mark.parametrize("hint_endpoint, reason, used, outcome", [
    ("e1", "kv_prefix", "e1", "cache_hit"),
    ("e1", "kv_prefix", "e2", "preferred_unhealthy"),
    ("e1", "kv_prefix", None, "preferred_unhealthy"),
    (None, "no_tokens", "e2", "no_tokens"),
    (None, "miss", "e2", "lookup_miss"),
    (None, "timeout", "e2", "lookup_timeout"),
    (None, "breaker_open", "e2", "breaker_open"),
    (None, "error", "e2", "lookup_error"),
    (None, "no_prompt", "e2", "no_preference"),
    (None, None, "e2", "no_preference"),
    (None, "from a newer filter", "e2", "other"),
])
def test_route_outcomes_from_hints(hint_endpoint: str | None, reason: str | None, used: str | None,
                                   outcome: str) -> None:
    assert route_outcome(hint_endpoint, reason, used) == outcome
