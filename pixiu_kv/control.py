"""The running gateway as the admin API and the metrics collector see it.

:class:`GatewayController` implements :class:`~pixiu_kv.admin.GatewayControl` over a
gateway's live runtime (read through a callable, so a reload that swaps the runtime is
seen at once); :func:`snapshot` builds the scrape-time :class:`~pixiu_kv.metrics.StateSnapshot`.

Drain marks are set on the runtime endpoint (``Endpoint.draining``: the endpoint choice skips
it, its in-flight requests finish) and kept in a :class:`DrainSet` keyed by endpoint id, so a
reload that builds new endpoints can apply them again (:func:`apply_drains`).
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any, Protocol

import trio

from .cluster import Cluster, Endpoint
from .config import GatewayConfig, config_to_dict
from .errors import GatewayError
from .metrics import (
    BreakerSample,
    KvCacheSample,
    KvStatsLike,
    StateSnapshot,
    route_outcome,
    sample_endpoints,
    sample_kvcache,
)
from .reload import ReloadResult

__all__ = ["DrainSet", "GatewayController", "RuntimeLike", "apply_drains", "find_kvcache_stats", "snapshot"]


class DrainSet:
    """Endpoint ids an operator drained. Small, owned by the gateway, kept across reloads."""

    __slots__ = ("_ids",)

    def __init__(self) -> None:
        self._ids: set[str] = set()

    def __contains__(self, endpoint_id: object) -> bool:
        return endpoint_id in self._ids

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self._ids))

    def add(self, endpoint_id: str) -> None:
        self._ids.add(endpoint_id)

    def discard(self, endpoint_id: str) -> None:
        self._ids.discard(endpoint_id)


class RuntimeLike(Protocol):
    """What the controller reads from the gateway's runtime (``pixiu_kv._runtime.Runtime``)."""

    @property
    def config(self) -> GatewayConfig: ...

    @property
    def clusters(self) -> Mapping[str, Cluster]: ...

    @property
    def decode_filters(self) -> Sequence[object]: ...


def apply_drains(clusters: Iterable[Cluster], drained: DrainSet) -> None:
    """Mark the endpoints of freshly built clusters (after a reload) that were drained."""
    for cluster in clusters:
        for endpoint in cluster.endpoints:
            endpoint.draining = endpoint.id in drained


def find_kvcache_stats(filters: Iterable[object]) -> KvStatsLike | None:
    """The kvcache filter's stats (``filter.kv.stats``), if that filter is in the chain."""
    for f in filters:
        kv = getattr(f, "kv", None)
        stats = getattr(kv, "stats", None) if kv is not None else None
        if stats is not None:
            return stats  # type: ignore[no-any-return]
    return None


def snapshot(runtime: RuntimeLike | None, drained: DrainSet, generation: int) -> StateSnapshot:
    """The live state for one metrics scrape."""
    if runtime is None:
        return StateSnapshot(config_generation=generation)
    now = trio.current_time()
    kv_sample: KvCacheSample | None = None
    breakers: tuple[BreakerSample, ...] = ()
    stats = find_kvcache_stats(runtime.decode_filters)
    if stats is not None:
        kv_sample, breakers = sample_kvcache(stats)
    return StateSnapshot(endpoints=sample_endpoints(runtime.clusters.values(), now, drained),
                         breakers=breakers, kvcache=kv_sample, config_generation=generation)


def _endpoint_view(cluster: Cluster, endpoint: Endpoint, now: float, drained: DrainSet) -> dict[str, Any]:
    return {
        "id": endpoint.id, "cluster": cluster.name, "address": endpoint.config.address,
        "healthy": endpoint.healthy, "draining": endpoint.draining or endpoint.id in drained,
        "cooling_down": endpoint.cooling_down(now), "in_flight": endpoint.in_flight,
        "max_in_flight": endpoint.max_in_flight, "weight": endpoint.weight,
    }


class GatewayController:
    """:class:`~pixiu_kv.admin.GatewayControl` over a running gateway.

    ``runtime`` returns the current runtime (None before startup); ``reload`` re-reads the
    configuration (e.g. :meth:`ConfigReloader.reload`), None when there is no file.
    """

    def __init__(self, runtime: Callable[[], RuntimeLike | None], drained: DrainSet, *,
                 reload: Callable[[], Awaitable[ReloadResult]] | None = None,
                 generation: Callable[[], int] = lambda: 1) -> None:
        self._runtime = runtime
        self._drained = drained
        self._reload = reload
        self._generation = generation

    def _require(self) -> RuntimeLike:
        runtime = self._runtime()
        if runtime is None:
            raise GatewayError(503, "the gateway is not running yet", "service_unavailable",
                               code="not_started")
        return runtime

    def effective_config(self) -> Mapping[str, Any]:
        runtime = self._require()
        out: dict[str, Any] = config_to_dict(runtime.config)
        out["generation"] = self._generation()
        return out

    def endpoints(self) -> Sequence[Mapping[str, Any]]:
        runtime = self._require()
        now = trio.current_time()
        return [_endpoint_view(c, e, now, self._drained)
                for c in runtime.clusters.values() for e in c.endpoints]

    def breakers(self) -> Sequence[Mapping[str, Any]]:
        stats = find_kvcache_stats(self._require().decode_filters)
        if stats is None:
            return []
        return [{"name": name, "state": state} for name, state in sorted(stats.breakers.items())]

    def _find(self, endpoint_id: str) -> tuple[Cluster, Endpoint] | None:
        for cluster in self._require().clusters.values():
            endpoint = cluster.endpoint(endpoint_id)
            if endpoint is not None:
                return cluster, endpoint
        return None

    def drain(self, endpoint_id: str) -> Mapping[str, Any] | None:
        found = self._find(endpoint_id)
        if found is None:
            return None
        self._drained.add(endpoint_id)
        found[1].draining = True
        return _endpoint_view(*found, trio.current_time(), self._drained)

    def undrain(self, endpoint_id: str) -> Mapping[str, Any] | None:
        found = self._find(endpoint_id)
        if found is None:
            return None
        self._drained.discard(endpoint_id)
        found[1].draining = False
        return _endpoint_view(*found, trio.current_time(), self._drained)

    async def reload(self) -> ReloadResult:
        if self._reload is None:
            return ReloadResult(False, self._generation(),
                                "the gateway was started without a configuration file; nothing to reload")
        return await self._reload()

    async def explain_route(self, path: str, body: bytes) -> Mapping[str, Any]:
        """The decision for ``body`` on ``path``: route, cluster, the kvcache hint and the
        endpoint the proxy would take, with the state of every endpoint it considered.

        Nothing is forwarded and no background work is started. The hint comes from the
        kvcache filter's routing lookup, so it is the live answer of LMCache (or of its
        breaker) right now.
        """
        runtime = self._require()
        parsed = _parse(body)
        model = parsed.get("model")
        route = _resolve(runtime, path, model if isinstance(model, str) else None)
        if route is None:
            raise GatewayError(404, f"no route for {path}", "NotFoundError", code="no_route")
        cluster = runtime.clusters[route.cluster]
        hint = await _hint(runtime.decode_filters, parsed)
        now = trio.current_time()
        views = [_endpoint_view(cluster, e, now, self._drained) for e in cluster.endpoints]
        usable = [v for v in views if v["healthy"] and not v["draining"] and not v["cooling_down"]
                  and v["in_flight"] < v["max_in_flight"]]
        preferred = hint.get("endpoint_id") if hint else None
        chosen = preferred if any(v["id"] == preferred for v in usable) else None
        decision = {
            "endpoint": chosen,
            "balanced_among": [] if chosen else [v["id"] for v in usable],
            "lb_policy": cluster.config.lb_policy,
            "outcome": route_outcome(preferred, hint.get("reason") if hint else None,
                                     chosen if preferred else None),
        }
        return {"path": path, "model": model if isinstance(model, str) else None,
                "route": {"prefix": route.prefix, "model": route.model, "cluster": route.cluster},
                "hint": hint, "decision": decision, "endpoints": views,
                "breakers": list(self.breakers())}


def _parse(body: bytes) -> dict[str, Any]:
    try:
        parsed = json.loads(body)
    except (ValueError, RecursionError):
        raise GatewayError(400, "request body is not valid JSON", code="invalid_json") from None
    if not isinstance(parsed, dict):
        raise GatewayError(400, "request body must be a JSON object", code="invalid_json")
    return parsed


def _resolve(runtime: RuntimeLike, path: str, model: str | None) -> Any:
    routes = getattr(runtime, "routes", None)
    if routes is not None:
        return routes.resolve(path, model)
    for route in runtime.config.routes:
        if path.startswith(route.prefix) and (not route.model or route.model == model):
            return route
    return None


async def _hint(filters: Iterable[object], body: dict[str, Any]) -> dict[str, Any] | None:
    """The kvcache filter's routing hint for ``body``, computed without background work."""
    for f in filters:
        kv = getattr(f, "kv", None)
        process = getattr(kv, "process", None)
        if process is None:
            continue

        async def refuse(*_: Any) -> bool:
            return False  # explaining must not start cache management

        hint = await process(body, refuse)
        if hint is None:
            return {"endpoint_id": None, "reason": "no_prompt", "matched_tokens": None,
                    "prompt_tokens": None}
        return {"endpoint_id": hint.endpoint_id, "reason": hint.reason,
                "matched_tokens": hint.matched_tokens, "prompt_tokens": hint.prompt_tokens}
    return None
