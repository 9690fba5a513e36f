"""Prometheus metrics for one gateway instance.

Two kinds of numbers, collected two ways:

* **Events** (a request finished, an upstream error, a routing decision) are counted when
  they happen, by :class:`GatewayMetrics` methods the request path calls. Each is one dict
  lookup plus a locked add: microseconds.
* **State** (endpoint health and in-flight load, breaker states, token-cache size, background
  jobs, cache actions) is *read at scrape time* from the components' own state objects by a
  custom collector. It costs the request path nothing, and cannot drift from the truth.

Every gateway owns its :class:`~prometheus_client.CollectorRegistry`; the process-global
default registry is never touched, so many gateways can live in one process (tests do).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Container, Iterable, Iterator, Mapping, Sequence
from typing import Final, Protocol

import attrs
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4, generate_latest
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

__all__ = [
    "BREAKER_STATES",
    "LATENCY_BUCKETS",
    "LOOKUP_BUCKETS",
    "METRICS_CONTENT_TYPE",
    "ROUTE_OUTCOMES",
    "UPSTREAM_ERROR_KINDS",
    "BackgroundJobCounts",
    "BreakerSample",
    "ClusterLike",
    "EndpointLike",
    "EndpointSample",
    "GatewayMetrics",
    "KvCacheSample",
    "KvStatsLike",
    "StateSnapshot",
    "StateSource",
    "route_outcome",
    "sample_endpoints",
    "sample_kvcache",
]

METRICS_CONTENT_TYPE: Final = CONTENT_TYPE_PLAIN_0_0_4
"""The classic Prometheus text format, which every Prometheus version scrapes."""

PREFIX: Final = "pixiu_kv_"

LATENCY_BUCKETS: Final = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                          10.0, 30.0, 60.0, 120.0, 300.0, math.inf)
"""Request and time-to-first-byte buckets: from a gateway-answered error to a long generation."""

LOOKUP_BUCKETS: Final = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1,
                         0.25, 0.5, 1.0, math.inf)
"""LMCache lookup buckets: the routing lookup is bounded by ``lookup_routing_timeout`` (ms)."""

ROUTE_OUTCOMES: Final = frozenset({
    "cache_hit",            # routed to the endpoint that holds the longest cached prefix
    "no_tokens",            # the prompt's tokens were not known yet (tokenize pending/failed)
    "lookup_miss",          # LMCache answered: no endpoint holds any of the prefix
    "lookup_timeout",       # the lookup did not answer within lookup_routing_timeout
    "lookup_error",         # the lookup failed (LMCache 5xx, garbage, connection refused)
    "breaker_open",         # LMCache's circuit breaker is open: no lookup was attempted
    "preferred_unhealthy",  # a preferred endpoint existed but was unhealthy, full or draining
    "no_preference",        # the kvcache filter is off or the request is not cacheable
})
"""Why a request went where it went. Any other reason is counted as ``other``."""

UPSTREAM_ERROR_KINDS: Final = frozenset({
    "connect", "timeout", "status_5xx", "status_429", "reset_before_first_byte",
    "reset_after_first_byte", "protocol",
})
"""Kinds of upstream failure. Any other kind is counted as ``other`` (bounded label values)."""

BREAKER_STATES: Final = ("closed", "open", "half_open")


# -- state read at scrape time -------------------------------------------------------------

@attrs.frozen
class EndpointSample:
    cluster: str
    endpoint: str
    healthy: bool
    in_flight: int
    max_in_flight: int
    draining: bool = False
    cooling_down: bool = False


@attrs.frozen
class BreakerSample:
    name: str
    state: str = attrs.field(validator=attrs.validators.in_(BREAKER_STATES))


@attrs.frozen
class BackgroundJobCounts:
    started: int = 0
    finished: int = 0
    dropped: int = 0
    cancelled: int = 0
    running: int = 0


@attrs.frozen
class KvCacheSample:
    """What the kvcache filter knows, as plain numbers (counters are cumulative)."""

    token_cache_hits: int = 0
    token_cache_misses: int = 0
    token_cache_entries: int = 0
    token_cache_bytes: int = 0
    hotness_keys: int = 0
    background: BackgroundJobCounts = BackgroundJobCounts()
    # (action, outcome) -> count, e.g. ("pin", "ok") -> 3
    cache_actions: Mapping[tuple[str, str], int] = attrs.field(factory=dict)
    # Routing lookups as the kvcache filter counted them, by outcome.
    lookups: Mapping[str, int] = attrs.field(factory=dict)
    tokenize_calls: int = 0
    tokenize_failures: int = 0


@attrs.frozen
class StateSnapshot:
    endpoints: tuple[EndpointSample, ...] = ()
    breakers: tuple[BreakerSample, ...] = ()
    kvcache: KvCacheSample | None = None
    config_generation: int = 0


StateSource = Callable[[], StateSnapshot]


class EndpointLike(Protocol):
    """What the collector reads from a runtime endpoint (``pixiu_kv.cluster.Endpoint``)."""

    healthy: bool
    in_flight: int
    max_in_flight: int

    @property
    def id(self) -> str: ...

    def cooling_down(self, now: float) -> bool: ...


class ClusterLike(Protocol):
    @property
    def name(self) -> str: ...

    @property
    def endpoints(self) -> Sequence[EndpointLike]: ...


def sample_endpoints(clusters: Iterable[ClusterLike], now: float,
                     draining: Container[str] = ()) -> tuple[EndpointSample, ...]:
    """Endpoint samples from the runtime clusters, for a :class:`StateSnapshot`."""
    return tuple(
        EndpointSample(cluster=c.name, endpoint=e.id, healthy=e.healthy, in_flight=e.in_flight,
                       max_in_flight=e.max_in_flight,
                       draining=e.id in draining or bool(getattr(e, "draining", False)),
                       cooling_down=e.cooling_down(now))
        for c in clusters for e in c.endpoints
    )


class _StateCollector(Collector):
    """Reads the gateway's live state on every scrape."""

    def __init__(self, source: Callable[[], StateSource | None]) -> None:
        self._source = source

    def describe(self) -> Iterable[Metric]:
        # Names only: registering must not call into a gateway that is still being built.
        return list(self._families(None))

    def collect(self) -> Iterable[Metric]:
        source = self._source()
        return list(self._families(source() if source is not None else None))

    @staticmethod
    def _families(snap: StateSnapshot | None) -> Iterator[Metric]:
        ep_labels = ("cluster", "endpoint")
        healthy = GaugeMetricFamily(PREFIX + "endpoint_healthy",
                                    "1 when the endpoint passes health checks, else 0.", labels=ep_labels)
        available = GaugeMetricFamily(
            PREFIX + "endpoint_available",
            "1 when the endpoint can be chosen (healthy, not draining, not cooling down).", labels=ep_labels)
        draining = GaugeMetricFamily(PREFIX + "endpoint_draining",
                                     "1 while an operator has drained the endpoint.", labels=ep_labels)
        in_flight = GaugeMetricFamily(PREFIX + "endpoint_in_flight_requests",
                                      "Requests the gateway has in flight to the endpoint.", labels=ep_labels)
        capacity = GaugeMetricFamily(PREFIX + "endpoint_max_in_flight_requests",
                                     "The endpoint's in-flight limit.", labels=ep_labels)
        breaker = GaugeMetricFamily(PREFIX + "circuit_breaker_state",
                                    "1 for the breaker's current state, 0 for the others.",
                                    labels=("breaker", "state"))
        generation = GaugeMetricFamily(PREFIX + "config_generation",
                                       "Generation of the running configuration (1 at start, +1 per reload).")
        tc_hits = CounterMetricFamily(PREFIX + "token_cache_hits", "Prompt-token cache hits.")
        tc_misses = CounterMetricFamily(PREFIX + "token_cache_misses", "Prompt-token cache misses.")
        tc_entries = GaugeMetricFamily(PREFIX + "token_cache_entries", "Prompts in the token cache.")
        tc_bytes = GaugeMetricFamily(PREFIX + "token_cache_bytes", "Size of the cached token arrays.")
        hot_keys = GaugeMetricFamily(PREFIX + "hotness_keys", "Prompt keys tracked for hotness.")
        jobs = {
            name: CounterMetricFamily(PREFIX + f"background_jobs_{name}", f"Background cache jobs {name}.")
            for name in ("started", "finished", "dropped", "cancelled")
        }
        running = GaugeMetricFamily(PREFIX + "background_jobs_running", "Background cache jobs running now.")
        actions = CounterMetricFamily(PREFIX + "cache_actions",
                                      "Cache-management actions sent to LMCache, by action and outcome.",
                                      labels=("action", "outcome"))
        lookups = CounterMetricFamily(PREFIX + "kvcache_lookups",
                                      "Routing lookups of the kvcache filter, by outcome.",
                                      labels=("outcome",))
        tokenize = CounterMetricFamily(PREFIX + "tokenize_requests",
                                       "Tokenize calls to the engine, by outcome.", labels=("outcome",))
        if snap is not None:
            for e in snap.endpoints:
                labels = [e.cluster, e.endpoint]
                healthy.add_metric(labels, 1.0 if e.healthy else 0.0)
                available.add_metric(
                    labels, 1.0 if e.healthy and not e.draining and not e.cooling_down else 0.0)
                draining.add_metric(labels, 1.0 if e.draining else 0.0)
                in_flight.add_metric(labels, float(e.in_flight))
                capacity.add_metric(labels, float(e.max_in_flight))
            for b in snap.breakers:
                for state in BREAKER_STATES:
                    breaker.add_metric([b.name, state], 1.0 if b.state == state else 0.0)
            generation.add_metric([], float(snap.config_generation))
            kv = snap.kvcache
            if kv is not None:
                tc_hits.add_metric([], float(kv.token_cache_hits))
                tc_misses.add_metric([], float(kv.token_cache_misses))
                tc_entries.add_metric([], float(kv.token_cache_entries))
                tc_bytes.add_metric([], float(kv.token_cache_bytes))
                hot_keys.add_metric([], float(kv.hotness_keys))
                bg = kv.background
                for name, value in (("started", bg.started), ("finished", bg.finished),
                                    ("dropped", bg.dropped), ("cancelled", bg.cancelled)):
                    jobs[name].add_metric([], float(value))
                running.add_metric([], float(bg.running))
                for (action, outcome), count in sorted(kv.cache_actions.items()):
                    actions.add_metric([action, outcome], float(count))
                for outcome, count in sorted(kv.lookups.items()):
                    lookups.add_metric([outcome], float(count))
                tokenize.add_metric(["ok"], float(kv.tokenize_calls - kv.tokenize_failures))
                tokenize.add_metric(["failed"], float(kv.tokenize_failures))
        yield from (healthy, available, draining, in_flight, capacity, breaker, generation,
                    tc_hits, tc_misses, tc_entries, tc_bytes, hot_keys, *jobs.values(), running, actions,
                    lookups, tokenize)


class KvStatsLike(Protocol):
    """What the collector reads from the kvcache filter's ``KvCacheStats``."""

    lookups: dict[str, int]
    token_cache_hits: int
    token_cache_misses: int
    token_cache_size: int
    token_cache_bytes: int
    tokenize_calls: int
    tokenize_failures: int
    hot_keys: int
    background_started: int
    background_finished: int
    background_dropped: int
    background_cancelled: int
    background_running: int
    actions: dict[str, dict[str, int]]
    breakers: dict[str, str]


def sample_kvcache(stats: KvStatsLike) -> tuple[KvCacheSample, tuple[BreakerSample, ...]]:
    """The kvcache filter's stats (``KvCache.stats``, refreshed on read) as samples."""
    sample = KvCacheSample(
        token_cache_hits=stats.token_cache_hits, token_cache_misses=stats.token_cache_misses,
        token_cache_entries=stats.token_cache_size, token_cache_bytes=stats.token_cache_bytes,
        hotness_keys=stats.hot_keys,
        background=BackgroundJobCounts(
            started=stats.background_started, finished=stats.background_finished,
            dropped=stats.background_dropped, cancelled=stats.background_cancelled,
            running=stats.background_running),
        cache_actions={(kind, outcome): count for kind, outcomes in stats.actions.items()
                       for outcome, count in outcomes.items()},
        lookups=dict(stats.lookups),
        tokenize_calls=stats.tokenize_calls, tokenize_failures=stats.tokenize_failures,
    )
    breakers = tuple(BreakerSample(name, state) for name, state in sorted(stats.breakers.items())
                     if state in BREAKER_STATES)
    return sample, breakers


_HINT_OUTCOMES: Final = {
    "no_tokens": "no_tokens",
    "miss": "lookup_miss",
    "timeout": "lookup_timeout",
    "breaker_open": "breaker_open",
    "error": "lookup_error",
    "no_prompt": "no_preference",
}


def route_outcome(hint_endpoint: str | None, hint_reason: str | None, used_endpoint: str | None) -> str:
    """The routing-decision outcome of one request, from its route hint and where it went.

    A hint that named an endpoint is a ``cache_hit`` when the request went there and
    ``preferred_unhealthy`` when the proxy had to choose another one (unhealthy, draining,
    cooling down or full). A hint without an endpoint says why there was none.
    """
    if hint_reason is None:
        return "no_preference"
    if hint_endpoint is not None:
        return "cache_hit" if used_endpoint == hint_endpoint else "preferred_unhealthy"
    return _HINT_OUTCOMES.get(hint_reason, "other")


# -- events counted on the request path ---------------------------------------------------

def _bounded(value: str, allowed: frozenset[str]) -> str:
    return value if value in allowed else "other"


def _status_code(status: int) -> str:
    return str(status) if 100 <= status <= 599 else "other"


class GatewayMetrics:
    """All pixiu_kv_* metric families of one gateway, in a registry of its own.

    The request path calls the event methods; :meth:`set_state_source` plugs in the function
    that snapshots live state at scrape time (it may be swapped on reload). :meth:`render`
    produces the exposition for ``GET /metrics``.
    """

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self._state_source: StateSource | None = None
        self._prompt_total = 0
        self._cached_total = 0
        r = self.registry
        self._requests = Counter(
            PREFIX + "requests", "Requests answered, by cluster, endpoint and HTTP status code.",
            ("cluster", "endpoint", "code"), registry=r)
        self._in_flight = Gauge(PREFIX + "requests_in_flight", "Requests being served now.", registry=r)
        self._duration = Histogram(
            PREFIX + "request_duration_seconds",
            "Time from request received to the last response byte, by cluster.",
            ("cluster",), buckets=LATENCY_BUCKETS, registry=r)
        self._ttfb = Histogram(
            PREFIX + "time_to_first_byte_seconds",
            "Time from request received to the first response body byte sent, by cluster.",
            ("cluster",), buckets=LATENCY_BUCKETS, registry=r)
        self._disconnects = Counter(
            PREFIX + "client_disconnects",
            "Clients that went away before their response completed, by phase.",
            ("phase",), registry=r)
        self._upstream_errors = Counter(
            PREFIX + "upstream_errors", "Failed attempts against an upstream engine, by kind.",
            ("endpoint", "kind"), registry=r)
        self._retries = Counter(
            PREFIX + "upstream_retries", "Retries against the same endpoint.", ("endpoint",), registry=r)
        self._failovers = Counter(
            PREFIX + "upstream_failovers", "Moves of a request to another endpoint after failures.",
            ("cluster",), registry=r)
        self._routing = Counter(
            PREFIX + "routing_decisions", "Routing decisions, by outcome.", ("outcome",), registry=r)
        self._lookup = Histogram(
            PREFIX + "lookup_duration_seconds", "LMCache routing lookups, by outcome.",
            ("outcome",), buckets=LOOKUP_BUCKETS, registry=r)
        self._prompt_tokens = Counter(
            PREFIX + "prompt_tokens", "Prompt tokens engines reported in responses' usage.", registry=r)
        self._cached_tokens = Counter(
            PREFIX + "cached_prompt_tokens",
            "Prompt tokens engines served from cache (usage.prompt_tokens_details.cached_tokens).",
            registry=r)
        self._reloads = Counter(
            PREFIX + "config_reloads", "Configuration reloads, by outcome.", ("outcome",), registry=r)
        # Pre-create the label sets operators alert on, so they scrape as 0 rather than absent.
        for outcome in sorted(ROUTE_OUTCOMES):
            self._routing.labels(outcome)
        for outcome in ("ok", "refused"):
            self._reloads.labels(outcome)
        r.register(_StateCollector(lambda: self._state_source))
        r.register(_HitRatioCollector(self))

    # -- wiring --------------------------------------------------------------------------

    def set_state_source(self, source: StateSource | None) -> None:
        """Plug in (or replace) the function that snapshots live state at scrape time."""
        self._state_source = source

    def render(self) -> bytes:
        """The Prometheus text exposition of every family."""
        return generate_latest(self.registry)

    # -- events --------------------------------------------------------------------------

    def request_started(self) -> None:
        self._in_flight.inc()

    def request_finished(self, *, cluster: str, endpoint: str | None, status: int, duration: float,
                         time_to_first_byte: float | None = None) -> None:
        """A response completed (or failed) with ``status``; pairs with :meth:`request_started`."""
        self._in_flight.dec()
        self._requests.labels(cluster, endpoint or "none", _status_code(status)).inc()
        self._duration.labels(cluster).observe(duration)
        if time_to_first_byte is not None:
            self._ttfb.labels(cluster).observe(time_to_first_byte)

    def request_cancelled(self, *, phase: str) -> None:
        """The client went away; ``phase`` is ``before_upstream``, ``before_first_byte`` or
        ``streaming``. Pairs with :meth:`request_started`."""
        self._in_flight.dec()
        self._disconnects.labels(_bounded(phase, _DISCONNECT_PHASES)).inc()

    def upstream_error(self, endpoint: str, kind: str) -> None:
        self._upstream_errors.labels(endpoint, _bounded(kind, UPSTREAM_ERROR_KINDS)).inc()

    def upstream_retry(self, endpoint: str) -> None:
        self._retries.labels(endpoint).inc()

    def upstream_failover(self, cluster: str) -> None:
        self._failovers.labels(cluster).inc()

    def route_decided(self, outcome: str) -> None:
        self._routing.labels(_bounded(outcome, ROUTE_OUTCOMES)).inc()

    def lookup_observed(self, seconds: float, outcome: str) -> None:
        """One LMCache lookup: ``outcome`` is ``hit``, ``miss``, ``timeout`` or ``error``."""
        self._lookup.labels(_bounded(outcome, _LOOKUP_OUTCOMES)).observe(seconds)

    def usage_observed(self, prompt_tokens: int, cached_tokens: int) -> None:
        """A response's usage block: feeds the observed cache hit ratio."""
        if prompt_tokens > 0:
            cached = max(0, min(cached_tokens, prompt_tokens))
            self._prompt_tokens.inc(prompt_tokens)
            self._cached_tokens.inc(cached)
            self._prompt_total += prompt_tokens
            self._cached_total += cached

    def reload_finished(self, ok: bool) -> None:
        self._reloads.labels("ok" if ok else "refused").inc()

    # -- read back (tests, the admin API) -------------------------------------------------

    def value(self, name: str, labels: Mapping[str, str] | None = None) -> float | None:
        """The current value of one sample, e.g. ``value("pixiu_kv_requests_total", {...})``."""
        return self.registry.get_sample_value(name, dict(labels or {}))

    @property
    def observed_hit_ratio(self) -> float | None:
        return None if self._prompt_total <= 0 else self._cached_total / self._prompt_total


_DISCONNECT_PHASES: Final = frozenset({"before_upstream", "before_first_byte", "streaming"})
_LOOKUP_OUTCOMES: Final = frozenset({"hit", "miss", "timeout", "error"})


class _HitRatioCollector(Collector):
    """``cached / prompt`` tokens since start, as a ready-made gauge for dashboards."""

    def __init__(self, metrics: GatewayMetrics) -> None:
        self._metrics = metrics

    def describe(self) -> Iterable[Metric]:
        return [self._family(None)]

    def collect(self) -> Iterable[Metric]:
        return [self._family(self._metrics.observed_hit_ratio)]

    @staticmethod
    def _family(ratio: float | None) -> Metric:
        family = GaugeMetricFamily(
            PREFIX + "observed_cache_hit_ratio",
            "Share of prompt tokens engines served from cache, since start (from responses' cached_tokens).")
        if ratio is not None:
            family.add_metric([], ratio)
        return family
