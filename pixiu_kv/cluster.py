"""Runtime state of clusters and endpoints, and the endpoint choice.

Pure logic, no I/O: health counters, cooldowns, in-flight counts and the load-balancing
decision live here so they can be tested as tables. The proxy filter and the health
checker feed observations in; the clock is passed explicitly.
"""

from __future__ import annotations

import enum
import math
import random
from collections.abc import Iterable

import attrs

from .config import ClusterConfig, EndpointConfig, RetryPolicyConfig

__all__ = ["Cluster", "Endpoint", "Pick", "PickFailure", "attempts_allowed", "backoff_delay"]


class PickFailure(enum.Enum):
    """Why no endpoint could be chosen."""

    NONE_HEALTHY = "no healthy endpoint"
    ALL_FULL = "every healthy endpoint is at its in-flight limit"
    ALL_TRIED = "every eligible endpoint was already tried"


@attrs.define(slots=True, eq=False)
class Endpoint:
    """One upstream engine and what the gateway currently believes about it."""

    config: EndpointConfig
    retry: RetryPolicyConfig
    # The in-flight cap also bounds the connection pool so a request never queues for a slot.
    max_in_flight: int
    healthy: bool = True
    # Drained by an operator: takes no new requests, in-flight ones finish.
    draining: bool = False
    cooldown_until: float = -math.inf
    in_flight: int = 0
    consecutive_failures: int = 0
    consecutive_successes: int = 0
    # Smooth weighted round robin state (nginx's algorithm).
    current_weight: int = 0

    @property
    def id(self) -> str:
        return self.config.id

    @property
    def weight(self) -> int:
        return self.config.weight

    def cooling_down(self, now: float) -> bool:
        return now < self.cooldown_until

    def available(self, now: float) -> bool:
        """Healthy, not drained and not cooling down (whether or not it is full)."""
        return self.healthy and not self.draining and not self.cooling_down(now)

    @property
    def full(self) -> bool:
        return self.in_flight >= self.max_in_flight


@attrs.frozen
class Pick:
    endpoint: Endpoint | None
    failure: PickFailure | None = None
    # True when the request went where a filter asked (e.g. the kvcache filter's hint).
    preferred: bool = False


class Cluster:
    """A named set of endpoints with a load-balancing policy and health bookkeeping."""

    __slots__ = ("_by_id", "_cursor", "_rng", "config", "endpoints")

    def __init__(self, config: ClusterConfig, *, max_connections_per_endpoint: int | None = None,
                 rng: random.Random | None = None) -> None:
        self.config = config
        cap = max_connections_per_endpoint
        self.endpoints: tuple[Endpoint, ...] = tuple(
            Endpoint(config=e, retry=e.retry or config.retry,
                     max_in_flight=e.max_in_flight if cap is None else min(e.max_in_flight, cap))
            for e in config.endpoints
        )
        self._by_id = {e.id: e for e in self.endpoints}
        self._cursor = 0
        self._rng = rng or random.Random()

    @property
    def name(self) -> str:
        return self.config.name

    def endpoint(self, endpoint_id: str) -> Endpoint | None:
        return self._by_id.get(endpoint_id)

    def any_healthy(self, now: float) -> bool:
        return any(e.available(now) for e in self.endpoints)

    # -- choice ------------------------------------------------------------------------

    def pick(self, now: float, preferred_id: str | None = None,
             exclude: Iterable[Endpoint] = ()) -> Pick:
        """Choose an endpoint; the caller increments ``in_flight`` when it commits to it.

        A preferred endpoint is honoured when it belongs to this cluster, is healthy, is not
        cooling down, is not full and was not tried already; otherwise the cluster's policy
        decides among the eligible endpoints.
        """
        excluded = set(map(id, exclude))
        if preferred_id is not None:
            hinted = self._by_id.get(preferred_id)
            if (hinted is not None and id(hinted) not in excluded
                    and hinted.available(now) and not hinted.full):
                return Pick(hinted, preferred=True)
        available = [e for e in self.endpoints if id(e) not in excluded and e.available(now)]
        if not available:
            if excluded and any(e.available(now) for e in self.endpoints):
                return Pick(None, PickFailure.ALL_TRIED)
            return Pick(None, PickFailure.NONE_HEALTHY)
        eligible = [e for e in available if not e.full]
        if not eligible:
            return Pick(None, PickFailure.ALL_FULL)
        return Pick(self._balance(eligible))

    def next_after(self, failed: Endpoint, now: float, exclude: Iterable[Endpoint]) -> Pick:
        """Failover: the next eligible endpoint after ``failed`` in configuration order,
        wrapping around to the start of the list."""
        excluded = set(map(id, exclude))
        n = len(self.endpoints)
        start = self.endpoints.index(failed)
        saw_full = False
        for step in range(1, n + 1):
            e = self.endpoints[(start + step) % n]
            if id(e) in excluded or not e.available(now):
                continue
            if e.full:
                saw_full = True
                continue
            return Pick(e)
        if saw_full:
            return Pick(None, PickFailure.ALL_FULL)
        return Pick(None, PickFailure.ALL_TRIED if self.any_healthy(now) else PickFailure.NONE_HEALTHY)

    def _balance(self, eligible: list[Endpoint]) -> Endpoint:
        policy = self.config.lb_policy
        if len(eligible) == 1:
            return eligible[0]
        if policy == "random":
            return self._rng.choices(eligible, weights=[e.weight for e in eligible])[0]
        if policy == "least_request":
            # Ties rotate so equal endpoints share load instead of the first one taking it all.
            self._cursor += 1
            n = len(eligible)
            rotated = [eligible[(self._cursor + i) % n] for i in range(n)]
            return min(rotated, key=lambda e: e.in_flight / e.weight)
        # Smooth weighted round robin: spreads a heavy endpoint's turns instead of bursting them.
        total = 0
        best = eligible[0]
        for e in eligible:
            e.current_weight += e.weight
            total += e.weight
            if e.current_weight > best.current_weight:
                best = e
        best.current_weight -= total
        return best

    # -- observations --------------------------------------------------------------------

    def record_check(self, endpoint: Endpoint, ok: bool) -> bool:
        """Feed one active health check result. Returns True when it flipped the health."""
        hc = self.config.health_check
        if ok:
            endpoint.consecutive_failures = 0
            endpoint.consecutive_successes += 1
            if not endpoint.healthy and endpoint.consecutive_successes >= hc.healthy_threshold:
                endpoint.healthy = True
                return True
            return False
        endpoint.consecutive_successes = 0
        endpoint.consecutive_failures += 1
        if endpoint.healthy and endpoint.consecutive_failures >= hc.unhealthy_threshold:
            endpoint.healthy = False
            return True
        return False

    def record_connect_failure(self, endpoint: Endpoint) -> bool:
        """Passive health: a refused or timed-out connection counts as a failed check.

        Only while active checks run, since only they can bring the endpoint back.
        """
        if not self.config.health_check.enabled:
            return False
        return self.record_check(endpoint, False)

    def start_cooldown(self, endpoint: Endpoint, now: float) -> None:
        """The endpoint exhausted its attempts: leave it out of choices for a while."""
        if self.config.cooldown > 0:
            endpoint.cooldown_until = now + self.config.cooldown


def backoff_delay(policy: RetryPolicyConfig, retry_number: int, rng: random.Random) -> float:
    """Delay before retry ``retry_number`` (1 = the first retry) against one endpoint.

    ``count`` waits ``base_backoff`` each time; ``exponential`` uses full jitter
    (uniform in [0, min(max_backoff, base * 2^(n-1))]) so retries of many requests spread out
    instead of hitting a recovering engine in lockstep.
    """
    if policy.policy == "none" or retry_number < 1:
        return 0.0
    if policy.policy == "count":
        return min(policy.base_backoff, policy.max_backoff) if policy.max_backoff else policy.base_backoff
    cap = min(policy.max_backoff, policy.base_backoff * (2 ** (retry_number - 1)))
    return rng.uniform(0.0, cap)


def attempts_allowed(policy: RetryPolicyConfig) -> int:
    """Tries against one endpoint, the first one included."""
    return 1 if policy.policy == "none" else policy.max_attempts
