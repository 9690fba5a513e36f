"""The synchronous routing lookup: which instance holds the longest prefix of this prompt.

It runs on the request path, so it never outlives its budget (``lookup_routing_timeout``)
and costs nothing when the controller is known to be down (its breaker is open). Tokens
come from the local token cache; on a miss, and only when a ``first_sight`` tokenizer is
given (the router's ``tokenize_on_route``), the engine's ``/tokenize`` is asked within the
same budget, so the budget covers tokenize and lookup together. Without it a prompt seen
for the first time is not routed (Pixiu's behaviour).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

import attrs
import trio

from ...context import RouteHint
from ...upstream.lmcache import LmCacheClient, LookupResult
from ...upstream.resilience import (
    BreakerOpenError,
    BreakerState,
    CircuitBreaker,
    UpstreamError,
    UpstreamTimeout,
)
from .prompt import Prompt
from .stats import KvCacheStats, LookupOutcome
from .tokens import TokenCache, TokenSeq

__all__ = ["ROUTED_REASON", "FirstSight", "Router", "Routing"]

log = logging.getLogger("pixiu_kv.kvcache")

ROUTED_REASON = "kv_prefix"

FirstSight = Callable[[Prompt, float], Awaitable[TokenSeq | None]]
"""Tokens of a prompt the token cache does not hold, by ``deadline`` (None: none to be had)."""


@attrs.frozen(slots=True)
class Routing:
    """What routing learnt: the hint, and the tokens and lookup result for cache management."""

    outcome: LookupOutcome
    hint: RouteHint
    tokens: TokenSeq | None
    lookup: LookupResult | None


class Router:
    __slots__ = ("_breaker", "_budget", "_client", "_first_sight", "_stats", "_token_cache")

    def __init__(self, client: LmCacheClient, breaker: CircuitBreaker, token_cache: TokenCache | None,
                 budget: float, stats: KvCacheStats, first_sight: FirstSight | None = None) -> None:
        self._client = client
        self._first_sight = first_sight
        self._breaker = breaker
        self._token_cache = token_cache
        self._budget = budget
        self._stats = stats

    def tokens_for_routing(self, prompt: Prompt) -> TokenSeq | None:
        cache = self._token_cache
        if cache is None:
            return None
        tokens = cache.get(prompt.key, trio.current_time())
        return tokens if tokens is not None and tokens.count > 0 else None

    async def route(self, prompt: Prompt) -> Routing:
        tokens = self.tokens_for_routing(prompt)
        deadline = trio.current_time() + self._budget
        # A lookup cut by the budget counts against the controller only when the controller
        # had the whole budget (not what a tokenize before it left).
        budget_is_lookups = tokens is not None
        if tokens is None:
            if self._first_sight is None:
                return self._done("no_tokens", prompt, None, None)
            # First sight: the engine's tokens within the same budget as the lookup after it.
            with trio.move_on_at(deadline) as scope:
                tokens = await self._first_sight(prompt, deadline)
            if tokens is None or tokens.count == 0:
                if scope.cancelled_caught:
                    log.info("kvcache: tokenize for routing took over %.0f ms (prompt %s, %d chars)",
                             self._budget * 1000, prompt.key[:12], prompt.size)
                return self._done("no_tokens", prompt, None, None)
        if self._breaker.state is BreakerState.OPEN:
            # Known down: no scope, no request, no exception. A half-open breaker goes on.
            return self._done("breaker_open", prompt, tokens, None)
        lookup: LookupResult | None = None
        outcome: LookupOutcome = "error"
        error: UpstreamError | None = None
        with trio.move_on_at(deadline) as scope:
            try:
                # The budget is this scope; a lookup it cuts counts against the routing breaker.
                lookup = await self._client.lookup(tokens.json, breaker=self._breaker, deadline=deadline,
                                                   cancel_is_failure=budget_is_lookups, bounded=True)
            except BreakerOpenError:
                outcome = "breaker_open"
            except UpstreamTimeout:
                outcome = "timeout"
            except UpstreamError as exc:
                error = exc
        if scope.cancelled_caught:
            outcome = "timeout"
        elif lookup is not None:
            outcome = "routed" if lookup.best is not None else "miss"
        if outcome == "timeout":
            log.warning("kvcache: routing lookup timed out after %.0f ms (prompt %s, %d tokens)",
                        self._budget * 1000, prompt.key[:12], tokens.count)
        elif error is not None:
            log.warning("kvcache: routing lookup failed (prompt %s, %d tokens): %s",
                        prompt.key[:12], tokens.count, error)
        return self._done(outcome, prompt, tokens, lookup)

    def _done(self, outcome: LookupOutcome, prompt: Prompt, tokens: TokenSeq | None,
              lookup: LookupResult | None) -> Routing:
        self._stats.lookups[outcome] += 1
        count = tokens.count if tokens is not None else None
        best = lookup.best if lookup is not None else None
        if best is not None:
            log.debug("kvcache: prompt %s (%d tokens) routed to %s (%d tokens cached)",
                      prompt.key[:12], count, best.instance_id, best.matched)
            hint = RouteHint(best.instance_id, ROUTED_REASON, best.matched, count)
        else:
            hint = RouteHint(None, outcome, 0 if outcome == "miss" else None, count)
        return Routing(outcome, hint, tokens, lookup)
