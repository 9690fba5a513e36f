"""Every counter of the kvcache filter in one place, ready for a metrics exporter.

Counters only grow; gauges (sizes, running jobs, breaker states) are refreshed when the
stats are read through ``KvCache.stats``.
"""

from __future__ import annotations

from typing import Literal

import attrs

__all__ = ["ACTION_OUTCOMES", "LOOKUP_OUTCOMES", "ActionOutcome", "KvCacheStats", "LookupOutcome"]

LookupOutcome = Literal["routed", "no_tokens", "miss", "timeout", "breaker_open", "error"]
LOOKUP_OUTCOMES: tuple[LookupOutcome, ...] = (
    "routed", "no_tokens", "miss", "timeout", "breaker_open", "error",
)

ActionOutcome = Literal["ok", "failed", "timeout", "breaker_open", "unsupported", "cleared", "recent"]
ACTION_OUTCOMES: tuple[ActionOutcome, ...] = (
    "ok", "failed", "timeout", "breaker_open", "unsupported", "cleared", "recent",
)
ACTION_KINDS = ("compress", "pin", "evict")


def _zeros(names: tuple[str, ...]) -> dict[str, int]:
    return dict.fromkeys(names, 0)


@attrs.define(slots=True)
class KvCacheStats:
    # Routing lookups on the request path, by outcome.
    lookups: dict[str, int] = attrs.field(factory=lambda: _zeros(LOOKUP_OUTCOMES))
    # Lookups made by background cache management (when routing had no answer).
    background_lookups_ok: int = 0
    background_lookups_failed: int = 0
    token_cache_hits: int = 0
    token_cache_misses: int = 0
    token_cache_size: int = 0
    token_cache_bytes: int = 0
    tokenize_calls: int = 0
    tokenize_failures: int = 0
    # Background jobs that waited for an identical prompt's tokenize/lookup instead of their own.
    single_flight_joined: int = 0
    hot_keys: int = 0
    background_started: int = 0
    background_finished: int = 0
    background_dropped: int = 0
    # Requests that needed no background work: nothing to decide on, or nowhere to act.
    background_skipped: int = 0
    background_cancelled: int = 0
    background_failed: int = 0
    background_running: int = 0
    # actions[kind][outcome]
    actions: dict[str, dict[str, int]] = attrs.field(
        factory=lambda: {kind: _zeros(ACTION_OUTCOMES) for kind in ACTION_KINDS})
    # Breaker name -> "closed" | "open" | "half_open".
    breakers: dict[str, str] = attrs.field(factory=dict)
