"""Runs the strategy's actions against the LMCache controller, best effort.

Each action is independent: one failing does not stop the next. A successful pin or
compress of the same tokens on the same instance is remembered for the hot window, so a
hot prompt is pinned once, not on every request.

``/evict`` does not exist on the real controller. The first 404/405 is logged once and
eviction is marked unsupported; from then on an eviction is either skipped (counted as
``unsupported``) or, only when ``evict_fallback_to_clear`` is set, replaced by ``/clear``
of the target's location, which drops everything cached there.
"""

from __future__ import annotations

import logging
from collections import OrderedDict

from ...config import CacheStrategyConfig
from ...upstream.lmcache import EndpointMissing, LmCacheClient
from ...upstream.resilience import BreakerOpenError, CircuitBreaker, UpstreamError, UpstreamTimeout
from .stats import ActionOutcome, KvCacheStats
from .strategy import Action
from .tokens import TokenSeq

__all__ = ["ActionRunner", "RecentActions"]

log = logging.getLogger("pixiu_kv.kvcache")


class RecentActions:
    """Bounded set of (kind, instance, prompt key) done lately; entries expire after ``ttl``."""

    __slots__ = ("_entries", "_max", "_ttl")

    def __init__(self, ttl: float, max_entries: int) -> None:
        self._ttl = ttl
        self._max = max_entries
        self._entries: OrderedDict[tuple[str, str, str], float] = OrderedDict()

    def __contains__(self, item: tuple[str, str, str]) -> bool:
        return item in self._entries

    def sweep(self, now: float) -> None:
        entries = self._entries
        while entries:
            item, expires_at = next(iter(entries.items()))
            if expires_at > now:
                return
            del entries[item]

    def add(self, item: tuple[str, str, str], now: float) -> None:
        self._entries.pop(item, None)
        self._entries[item] = now + self._ttl  # same TTL for all: insertion order = expiry order
        while len(self._entries) > self._max:
            self._entries.popitem(last=False)


class ActionRunner:
    __slots__ = ("_breaker", "_client", "_recent", "_stats", "_strategy", "evict_supported")

    def __init__(self, client: LmCacheClient, breaker: CircuitBreaker, strategy: CacheStrategyConfig,
                 stats: KvCacheStats, recent: RecentActions) -> None:
        self._client = client
        self._breaker = breaker
        self._strategy = strategy
        self._stats = stats
        self._recent = recent
        # None until the controller has shown whether it has /evict.
        self.evict_supported: bool | None = None

    def pending(self, actions: tuple[Action, ...], key: str, now: float) -> tuple[Action, ...]:
        """The actions that need a call: a recent pin/compress, or an eviction the controller
        cannot do (and no /clear fallback), is counted here and dropped."""
        if not actions:
            return actions
        self._recent.sweep(now)
        needed: list[Action] = []
        for action in actions:
            if action.kind == "evict":
                skip: ActionOutcome | None = (
                    "unsupported" if self.evict_supported is False
                    and not self._strategy.evict_fallback_to_clear else None)
            else:
                skip = "recent" if (action.kind, action.instance_id, key) in self._recent else None
            if skip is None:
                needed.append(action)
            else:
                self._stats.actions[action.kind][skip] += 1
        return tuple(needed)

    async def run(self, action: Action, tokens: TokenSeq, key: str, now: float,
                  deadline: float) -> ActionOutcome:
        outcome = await self._run(action, tokens, key, now, deadline)
        self._stats.actions[action.kind][outcome] += 1
        return outcome

    async def _run(self, action: Action, tokens: TokenSeq, key: str, now: float,
                   deadline: float) -> ActionOutcome:
        memo = (action.kind, action.instance_id, key)
        if action.kind != "evict":
            self._recent.sweep(now)
            if memo in self._recent:
                return "recent"
        client, breaker = self._client, self._breaker
        try:
            if action.kind == "compress":
                await client.compress(tokens.json, action.instance_id, action.location, action.method,
                                      breaker=breaker, deadline=deadline)
            elif action.kind == "pin":
                await client.pin(tokens.json, action.instance_id, action.location,
                                 breaker=breaker, deadline=deadline)
            else:
                return await self._evict(action, tokens, key, deadline)
        except UpstreamError as exc:
            return self._failed(action, tokens, key, exc)
        self._recent.add(memo, now)
        return "ok"

    async def _evict(self, action: Action, tokens: TokenSeq, key: str, deadline: float) -> ActionOutcome:
        if self.evict_supported is not False:
            try:
                await self._client.evict(tokens.json, action.instance_id,
                                         breaker=self._breaker, deadline=deadline)
            except EndpointMissing as exc:
                self.evict_supported = False
                log.warning("kvcache: the LMCache controller has no /evict (HTTP %s); eviction is %s",
                            exc.status, "done with /clear of the whole location"
                            if self._strategy.evict_fallback_to_clear else
                            "disabled (set cache_strategy.evict_fallback_to_clear to use /clear)")
            else:
                self.evict_supported = True
                return "ok"
        if not self._strategy.evict_fallback_to_clear:
            return "unsupported"
        try:
            await self._client.clear(action.instance_id, action.location,
                                     breaker=self._breaker, deadline=deadline)
        except UpstreamError as exc:
            return self._failed(action, tokens, key, exc)
        return "cleared"

    def _failed(self, action: Action, tokens: TokenSeq, key: str, exc: UpstreamError) -> ActionOutcome:
        if isinstance(exc, BreakerOpenError):
            return "breaker_open"
        log.warning("kvcache: %s on %s failed for prompt %s (%d tokens): %s",
                    action.kind, action.instance_id, key[:12], tokens.count, exc)
        return "timeout" if isinstance(exc, UpstreamTimeout) else "failed"
