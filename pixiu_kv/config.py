"""The gateway's configuration: one frozen, typed tree loaded from TOML.

The shape mirrors Pixiu's concepts (listener, routes, clusters with endpoints, an ordered
list of HTTP filters), and the kvcache filter keeps the field names and defaults of Pixiu's
``dgp.filter.ai.kvcache`` except where a default was a trap (see ``docs/configuration.md``).

Loading is strict: unknown keys, wrong types and out-of-range values are rejected with a
:class:`ConfigError` naming the field's path, the value, and what is allowed.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import attrs
import tomli

from ._config_parse import ConfigError, FieldError, Table, format_duration
from .routing.config import RoutingConfig, read_routing_config

__all__ = [
    "AdminConfig",
    "CacheStrategyConfig",
    "CircuitBreakerConfig",
    "ClusterConfig",
    "ConfigError",
    "EndpointConfig",
    "FilterConfig",
    "GatewayConfig",
    "HealthCheckConfig",
    "KvCacheConfig",
    "ListenerConfig",
    "LlmProxyConfig",
    "LogConfig",
    "LookupRetryConfig",
    "RetryPolicyConfig",
    "RouteConfig",
    "TokenCacheConfig",
    "config_to_dict",
    "load_config",
    "loads_config",
    "parse_config",
]

KVCACHE_FILTER = "dgp.filter.ai.kvcache"
LLM_PROXY_FILTER = "dgp.filter.llm.proxy"
FILTER_NAMES = {
    KVCACHE_FILTER: KVCACHE_FILTER,
    "kvcache": KVCACHE_FILTER,
    LLM_PROXY_FILTER: LLM_PROXY_FILTER,
    "llm_proxy": LLM_PROXY_FILTER,
    "proxy": LLM_PROXY_FILTER,
}
LB_POLICIES = {
    "round_robin": "round_robin", "RoundRobin": "round_robin",
    "least_request": "least_request", "LeastRequest": "least_request",
    "random": "random", "Random": "random",
}
RETRY_POLICIES = {
    "none": "none", "NoRetry": "none",
    "count": "count", "CountBased": "count",
    "exponential": "exponential", "ExponentialBackoff": "exponential",
}

_DURATION = {"duration": True}
_SECRET = {"secret": True}


# -- validators ------------------------------------------------------------------------

def _ratio(_: object, attribute: attrs.Attribute[Any], value: float) -> None:
    if not 0.0 <= value <= 1.0:
        raise FieldError(attribute.name, value, "is outside [0, 1]")


def _non_negative(_: object, attribute: attrs.Attribute[Any], value: float) -> None:
    if value < 0:
        raise FieldError(attribute.name, value, "must be >= 0")


def _positive(_: object, attribute: attrs.Attribute[Any], value: float) -> None:
    if value <= 0:
        raise FieldError(attribute.name, value, "must be greater than 0")


def _http_url(_: object, attribute: attrs.Attribute[Any], value: str) -> None:
    if value == "":
        return
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise FieldError(attribute.name, value, "is not an http:// or https:// URL")
    try:
        parts.port  # noqa: B018 - raises ValueError on a bad port
    except ValueError:
        raise FieldError(attribute.name, value, "has an invalid port") from None


def _dur(default: float, *, positive: bool = False) -> Any:
    return attrs.field(default=default, metadata=_DURATION,
                       validator=_positive if positive else _non_negative)


# -- gateway -----------------------------------------------------------------------------

@attrs.frozen
class ListenerConfig:
    host: str = "127.0.0.1"
    port: int = attrs.field(default=8888, validator=attrs.validators.and_(
        attrs.validators.ge(0), attrs.validators.le(65535)))
    max_request_body: int = attrs.field(default=8 * 1024 * 1024, validator=_positive)
    max_concurrent_requests: int = attrs.field(default=4096, validator=_positive)
    keep_alive_timeout: float = _dur(75.0, positive=True)
    body_timeout: float = _dur(60.0, positive=True)
    graceful_timeout: float = _dur(30.0)


@attrs.frozen
class AdminConfig:
    enabled: bool = False
    host: str = "127.0.0.1"
    port: int = attrs.field(default=8889, validator=attrs.validators.and_(
        attrs.validators.ge(0), attrs.validators.le(65535)))
    token: str = attrs.field(default="", metadata=_SECRET)


@attrs.frozen
class LogConfig:
    level: str = "info"
    format: str = "text"


@attrs.frozen
class RouteConfig:
    cluster: str
    prefix: str = "/"
    model: str = ""


@attrs.frozen
class HealthCheckConfig:
    enabled: bool = True
    path: str = "/health"
    interval: float = _dur(5.0, positive=True)
    timeout: float = _dur(1.0, positive=True)
    unhealthy_threshold: int = attrs.field(default=3, validator=_positive)
    healthy_threshold: int = attrs.field(default=2, validator=_positive)


@attrs.frozen
class RetryPolicyConfig:
    """Retries against one endpoint before failing over. ``max_attempts`` counts the first try."""

    policy: str = "count"
    max_attempts: int = attrs.field(default=2, validator=_positive)
    base_backoff: float = _dur(0.05)
    max_backoff: float = _dur(1.0)


@attrs.frozen
class EndpointConfig:
    id: str
    address: str = attrs.field(validator=_http_url)
    api_key: str = attrs.field(default="", metadata=_SECRET)
    weight: int = attrs.field(default=1, validator=_positive)
    max_in_flight: int = attrs.field(default=256, validator=_positive)
    retry: RetryPolicyConfig | None = None


@attrs.frozen
class ClusterConfig:
    name: str
    endpoints: tuple[EndpointConfig, ...]
    lb_policy: str = "round_robin"
    health_check: HealthCheckConfig = HealthCheckConfig()
    retry: RetryPolicyConfig = RetryPolicyConfig()
    fallback: bool = True
    cooldown: float = _dur(5.0)


@attrs.frozen
class LlmProxyConfig:
    """The terminal filter. Timeouts are deliberate: none of them cuts a healthy long stream."""

    connect_timeout: float = _dur(2.0, positive=True)
    first_byte_timeout: float = _dur(300.0, positive=True)
    idle_timeout: float = _dur(60.0, positive=True)
    max_connections_per_endpoint: int = attrs.field(default=512, validator=_positive)
    keepalive_expiry: float = _dur(30.0, positive=True)


# -- kvcache filter --------------------------------------------------------------------

@attrs.frozen
class TokenCacheConfig:
    enabled: bool = False
    # The seed's 0 meant "unbounded"; an unbounded cache of prompt tokens is a memory leak
    # waiting for traffic, so pixiu-kv always bounds it.
    max_size: int = attrs.field(default=10_000, validator=_positive)
    ttl: float = _dur(600.0)


@attrs.frozen
class CacheStrategyConfig:
    enable_compression: bool = False
    enable_pinning: bool = False
    enable_eviction: bool = False
    load_threshold: float = attrs.field(default=0.0, validator=_ratio)
    memory_threshold: float = attrs.field(default=0.0, validator=_ratio)
    hot_content_threshold: int = attrs.field(default=0, validator=_non_negative)
    pin_instance_id: str = ""
    pin_location: str = ""
    compress_instance_id: str = ""
    compress_location: str = ""
    compress_method: str = "zstd"
    evict_instance_id: str = ""
    # The real LMCache controller has no /evict; /clear wipes a whole location, so it is
    # only used in its place when asked for explicitly.
    evict_fallback_to_clear: bool = False


@attrs.frozen
class LookupRetryConfig:
    max_attempts: int = attrs.field(default=3, validator=_positive)
    base_backoff: float = _dur(0.1)
    max_backoff: float = _dur(2.0)


@attrs.frozen
class CircuitBreakerConfig:
    failure_threshold: int = attrs.field(default=5, validator=_positive)
    recovery_timeout: float = _dur(10.0, positive=True)
    half_open_max_calls: int = attrs.field(default=2, validator=_positive)


@attrs.frozen
class KvCacheConfig:
    enabled: bool = False
    vllm_endpoint: str = attrs.field(default="", validator=_http_url)
    lmcache_endpoint: str = attrs.field(default="", validator=_http_url)
    default_model: str = ""
    request_timeout: float = _dur(2.0, positive=True)
    lookup_routing_timeout: float = _dur(0.05, positive=True)
    hot_window: float = _dur(300.0, positive=True)
    hot_max_records: int = attrs.field(default=300, validator=_positive)
    # The seed's 0 meant "unbounded": bounded here for the same reason as the token cache.
    hot_max_keys: int = attrs.field(default=10_000, validator=_positive)
    token_cache: TokenCacheConfig = TokenCacheConfig()
    cache_strategy: CacheStrategyConfig = CacheStrategyConfig()
    retry: LookupRetryConfig = LookupRetryConfig()
    circuit_breaker: CircuitBreakerConfig = CircuitBreakerConfig()
    max_background_jobs: int = attrs.field(default=256, validator=_positive)
    load_sample_interval: float = _dur(1.0, positive=True)
    routing: RoutingConfig = attrs.field(factory=RoutingConfig)

    def __attrs_post_init__(self) -> None:
        if self.enabled:
            for name in ("vllm_endpoint", "lmcache_endpoint"):
                if not getattr(self, name):
                    raise FieldError(name, "", "is required while enabled = true")
        hot = self.cache_strategy.hot_content_threshold
        if hot > self.hot_max_records:
            raise FieldError("cache_strategy.hot_content_threshold", hot,
                             f"is larger than hot_max_records ({self.hot_max_records}); "
                             "it could never be reached")


@attrs.frozen
class FilterConfig:
    name: str
    config: KvCacheConfig | LlmProxyConfig


@attrs.frozen
class GatewayConfig:
    routes: tuple[RouteConfig, ...]
    clusters: tuple[ClusterConfig, ...]
    http_filters: tuple[FilterConfig, ...]
    listener: ListenerConfig = ListenerConfig()
    admin: AdminConfig = AdminConfig()
    log: LogConfig = LogConfig()

    def cluster(self, name: str) -> ClusterConfig:
        for cluster in self.clusters:
            if cluster.name == name:
                return cluster
        raise KeyError(name)

    @property
    def kvcache(self) -> KvCacheConfig | None:
        for f in self.http_filters:
            if isinstance(f.config, KvCacheConfig):
                return f.config
        return None

    @property
    def llm_proxy(self) -> LlmProxyConfig:
        last = self.http_filters[-1].config
        assert isinstance(last, LlmProxyConfig)
        return last


# -- readers -------------------------------------------------------------------------

def _read_retry_policy(t: Table) -> RetryPolicyConfig:
    return t.build(
        RetryPolicyConfig,
        policy=t.text("policy", "count", choices=RETRY_POLICIES),
        max_attempts=t.integer("max_attempts", 2, minimum=1, maximum=100),
        base_backoff=t.duration("base_backoff", 0.05),
        max_backoff=t.duration("max_backoff", 1.0),
    )


def _read_endpoint(t: Table) -> EndpointConfig:
    retry = _read_retry_policy(t.table("retry")) if t.has("retry") else None
    endpoint_id = t.text("id")
    if not endpoint_id:
        raise ConfigError(t.at("id"), endpoint_id, "must not be empty")
    return t.build(
        EndpointConfig,
        id=endpoint_id,
        address=t.text("address"),
        api_key=t.text("api_key", ""),
        weight=t.integer("weight", 1, minimum=1, maximum=10_000),
        max_in_flight=t.integer("max_in_flight", 256, minimum=1),
        retry=retry,
    )


def _read_cluster(t: Table) -> ClusterConfig:
    endpoints = tuple(_read_endpoint(e) for e in t.tables("endpoints", required=True))
    if not endpoints:
        raise ConfigError(t.at("endpoints"), [], "is empty; a cluster needs at least one endpoint")
    hc = t.table("health_check")
    health = hc.build(
        HealthCheckConfig,
        enabled=hc.flag("enabled", True),
        path=hc.text("path", "/health"),
        interval=hc.duration("interval", 5.0, positive=True),
        timeout=hc.duration("timeout", 1.0, positive=True),
        unhealthy_threshold=hc.integer("unhealthy_threshold", 3, minimum=1),
        healthy_threshold=hc.integer("healthy_threshold", 2, minimum=1),
    )
    return t.build(
        ClusterConfig,
        name=t.text("name"),
        endpoints=endpoints,
        lb_policy=t.text("lb_policy", "round_robin", choices=LB_POLICIES),
        health_check=health,
        retry=_read_retry_policy(t.table("retry")),
        fallback=t.flag("fallback", True),
        cooldown=t.duration("cooldown", 5.0),
    )


def _read_llm_proxy(t: Table) -> LlmProxyConfig:
    return t.build(
        LlmProxyConfig,
        connect_timeout=t.duration("connect_timeout", 2.0, positive=True),
        first_byte_timeout=t.duration("first_byte_timeout", 300.0, positive=True),
        idle_timeout=t.duration("idle_timeout", 60.0, positive=True),
        max_connections_per_endpoint=t.integer("max_connections_per_endpoint", 512, minimum=1),
        keepalive_expiry=t.duration("keepalive_expiry", 30.0, positive=True),
    )


def _read_kvcache(t: Table) -> KvCacheConfig:
    tc = t.table("token_cache")
    token_cache = tc.build(
        TokenCacheConfig,
        enabled=tc.flag("enabled", False),
        max_size=tc.integer("max_size", 10_000, minimum=1),
        ttl=tc.duration("ttl", 600.0),
    )
    cs = t.table("cache_strategy")
    strategy = cs.build(
        CacheStrategyConfig,
        enable_compression=cs.flag("enable_compression", False),
        enable_pinning=cs.flag("enable_pinning", False),
        enable_eviction=cs.flag("enable_eviction", False),
        load_threshold=cs.ratio("load_threshold", 0.0),
        memory_threshold=cs.ratio("memory_threshold", 0.0),
        hot_content_threshold=cs.integer("hot_content_threshold", 0, minimum=0),
        pin_instance_id=cs.text("pin_instance_id", ""),
        pin_location=cs.text("pin_location", ""),
        compress_instance_id=cs.text("compress_instance_id", ""),
        compress_location=cs.text("compress_location", ""),
        compress_method=cs.text("compress_method", "zstd"),
        evict_instance_id=cs.text("evict_instance_id", ""),
        evict_fallback_to_clear=cs.flag("evict_fallback_to_clear", False),
    )
    rt = t.table("retry")
    retry = rt.build(
        LookupRetryConfig,
        max_attempts=rt.integer("max_attempts", 3, minimum=1, maximum=20),
        base_backoff=rt.duration("base_backoff", 0.1),
        max_backoff=rt.duration("max_backoff", 2.0),
    )
    cb = t.table("circuit_breaker")
    breaker = cb.build(
        CircuitBreakerConfig,
        failure_threshold=cb.integer("failure_threshold", 5, minimum=1),
        recovery_timeout=cb.duration("recovery_timeout", 10.0, positive=True),
        half_open_max_calls=cb.integer("half_open_max_calls", 2, minimum=1),
    )
    return t.build(
        KvCacheConfig,
        enabled=t.flag("enabled", False),
        vllm_endpoint=t.text("vllm_endpoint", ""),
        lmcache_endpoint=t.text("lmcache_endpoint", ""),
        default_model=t.text("default_model", ""),
        request_timeout=t.duration("request_timeout", 2.0, positive=True),
        lookup_routing_timeout=t.duration("lookup_routing_timeout", 0.05, positive=True),
        hot_window=t.duration("hot_window", 300.0, positive=True),
        hot_max_records=t.integer("hot_max_records", 300, minimum=1),
        hot_max_keys=t.integer("hot_max_keys", 10_000, minimum=1),
        token_cache=token_cache,
        cache_strategy=strategy,
        retry=retry,
        circuit_breaker=breaker,
        max_background_jobs=t.integer("max_background_jobs", 256, minimum=1),
        load_sample_interval=t.duration("load_sample_interval", 1.0, positive=True),
        routing=read_routing_config(t.table("routing")),
    )


def _read_filters(root: Table) -> tuple[FilterConfig, ...]:
    tables = root.tables("http_filters")
    filters: list[FilterConfig] = []
    for t in tables:
        name = t.text("name", choices=FILTER_NAMES)
        body = t.table("config")
        config: KvCacheConfig | LlmProxyConfig = (
            _read_kvcache(body) if name == KVCACHE_FILTER else _read_llm_proxy(body)
        )
        t.close()
        filters.append(FilterConfig(name=name, config=config))
    if not filters:
        # Pixiu's minimum chain: the proxy alone.
        return (FilterConfig(name=LLM_PROXY_FILTER, config=LlmProxyConfig()),)
    names = [f.name for f in filters]
    if names[-1] != LLM_PROXY_FILTER or names.count(LLM_PROXY_FILTER) != 1:
        index = names.index(LLM_PROXY_FILTER) if LLM_PROXY_FILTER in names else len(names) - 1
        raise ConfigError(f"http_filters[{index}].name", names[index],
                          f"is misplaced; exactly one {LLM_PROXY_FILTER} is required and it "
                          "must be the last filter")
    if names.count(KVCACHE_FILTER) > 1:
        index = names.index(KVCACHE_FILTER, names.index(KVCACHE_FILTER) + 1)
        raise ConfigError(f"http_filters[{index}].name", names[index], "appears twice")
    return tuple(filters)


def parse_config(data: Mapping[str, Any]) -> GatewayConfig:
    """Build a :class:`GatewayConfig` from decoded TOML (or any equivalent mapping)."""
    root = Table(data)
    lt = root.table("listener")
    listener = lt.build(
        ListenerConfig,
        host=lt.text("host", "127.0.0.1"),
        port=lt.integer("port", 8888, minimum=0, maximum=65535),
        max_request_body=lt.size("max_request_body", 8 * 1024 * 1024),
        max_concurrent_requests=lt.integer("max_concurrent_requests", 4096, minimum=1),
        keep_alive_timeout=lt.duration("keep_alive_timeout", 75.0, positive=True),
        body_timeout=lt.duration("body_timeout", 60.0, positive=True),
        graceful_timeout=lt.duration("graceful_timeout", 30.0),
    )
    at = root.table("admin")
    admin = at.build(
        AdminConfig,
        enabled=at.flag("enabled", False),
        host=at.text("host", "127.0.0.1"),
        port=at.integer("port", 8889, minimum=0, maximum=65535),
        token=at.text("token", ""),
    )
    lg = root.table("log")
    log = lg.build(
        LogConfig,
        level=lg.text("level", "info", choices={k: k for k in ("debug", "info", "warning", "error")}),
        format=lg.text("format", "text", choices={"text": "text", "json": "json"}),
    )
    clusters = tuple(_read_cluster(c) for c in root.tables("clusters", required=True))
    if not clusters:
        raise ConfigError("clusters", [], "is empty; at least one cluster is required")
    _check_unique_names(clusters)

    routes: list[RouteConfig] = []
    cluster_names = {c.name for c in clusters}
    for rt in root.tables("routes"):
        prefix = rt.text("prefix", "/")
        if not prefix.startswith("/"):
            raise ConfigError(rt.at("prefix"), prefix, "must start with '/'")
        cluster = rt.text("cluster")
        if cluster not in cluster_names:
            raise ConfigError(rt.at("cluster"), cluster,
                              f"names no cluster; defined clusters: {', '.join(sorted(cluster_names))}")
        routes.append(rt.build(RouteConfig, cluster=cluster, prefix=prefix, model=rt.text("model", "")))
    if not routes:
        if len(clusters) != 1:
            raise ConfigError("routes", [], "is empty; with several clusters each needs a route")
        routes.append(RouteConfig(cluster=clusters[0].name))

    filters = _read_filters(root)
    root.close()
    return GatewayConfig(routes=tuple(routes), clusters=clusters, http_filters=filters,
                         listener=listener, admin=admin, log=log)


def _check_unique_names(clusters: tuple[ClusterConfig, ...]) -> None:
    seen_clusters: set[str] = set()
    seen_ids: set[str] = set()
    for ci, cluster in enumerate(clusters):
        if cluster.name in seen_clusters:
            raise ConfigError(f"clusters[{ci}].name", cluster.name, "is a duplicate cluster name")
        seen_clusters.add(cluster.name)
        for ei, endpoint in enumerate(cluster.endpoints):
            # Endpoint ids are LMCache instance ids: they must name one endpoint only.
            if endpoint.id in seen_ids:
                raise ConfigError(f"clusters[{ci}].endpoints[{ei}].id", endpoint.id,
                                  "is a duplicate endpoint id; ids must be unique across clusters")
            seen_ids.add(endpoint.id)


def loads_config(text: str, *, source: str = "<string>") -> GatewayConfig:
    try:
        data = tomli.loads(text)
    except tomli.TOMLDecodeError as exc:
        raise ConfigError(source, "(file)", f"is not valid TOML: {exc}") from None
    return parse_config(data)


def load_config(path: str | Path) -> GatewayConfig:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(str(path), "(file)", f"cannot be read: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise ConfigError(str(path), "(file)", "is not UTF-8 text") from None
    return loads_config(text, source=str(path))


def config_to_dict(value: Any, *, redact: bool = True) -> Any:
    """The effective configuration as plain data: durations as strings, secrets redacted."""
    if attrs.has(type(value)):
        out: dict[str, Any] = {}
        for field in attrs.fields(type(value)):
            item = getattr(value, field.name)
            if item is None:
                continue
            if field.metadata.get("duration"):
                out[field.name] = format_duration(item)
            elif field.metadata.get("secret") and redact and item:
                out[field.name] = "<redacted>"
            else:
                out[field.name] = config_to_dict(item, redact=redact)
        return out
    if isinstance(value, tuple | list):
        return [config_to_dict(v, redact=redact) for v in value]
    return value
