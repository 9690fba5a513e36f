"""The KV-cache core: routing hints on the request path, cache management in the background.

Per request (all in microseconds except the bounded lookup):

1. extract model and prompt (no prompt: nothing to do);
2. record the prompt's hotness;
3. routing lookup under ``lookup_routing_timeout`` (token cache hit only), giving a hint;
4. start background cache management through the caller's ``spawn`` and return.

Background management gets the prompt's tokens (token cache, else ``/tokenize``) and,
unless routing already has it, the lookup result; identical prompts in flight share one
tokenize and one lookup. Then the pure strategy decides and the actions run. Every call
is bounded by ``request_timeout``; cancelling the spawning scope cancels them at once.
"""

from __future__ import annotations

import hashlib
import logging
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from typing import Any

import trio

from ...config import KvCacheConfig
from ...context import RouteHint
from ...hostload import HostLoad, HostLoadSampler
from ...routing import PrefixKeys, RoutingInput
from ...routing import Router as DecisionRouter
from ...routing.local_tokenizer import LocalTokenizers, load_local_tokenizers
from ...upstream.http11 import Http11Pool
from ...upstream.lmcache import MAX_REPLY_BYTES as LMCACHE_MAX_REPLY_BYTES
from ...upstream.lmcache import LmCacheClient, LookupResult
from ...upstream.resilience import BreakerState, CircuitBreaker, RetryPolicy, UpstreamError
from ...upstream.tokenizer import MAX_REPLY_BYTES as TOKENIZE_MAX_REPLY_BYTES
from ...upstream.tokenizer import TokenizerClient
from .actions import ActionRunner, RecentActions
from .background import BackgroundJobs, Spawn
from .hotness import HotnessTracker
from .prompt import Prompt, extract_prompt
from .routing import Router, Routing
from .singleflight import SingleFlight
from .stats import KvCacheStats
from .strategy import DEFAULT_LOCATION, Action, decide
from .tokens import TokenCache, TokenSeq

__all__ = ["DEFAULT_HTTP_POOL_SIZE", "KvCache", "open_kvcache"]

log = logging.getLogger("pixiu_kv.kvcache")

DEFAULT_HTTP_POOL_SIZE = 64
"""Connections per upstream client (routing, background LMCache, tokenizer each have one)."""

# How often the router's hot-prefix placements are checked for pins to make.
_HOT_PIN_INTERVAL = 2.0
# Prompts whose block keys are kept (~20 KB each for 4k tokens).
_PREFIX_KEYS_MAX = 1024
_Shared = tuple[TokenSeq, LookupResult | None]


class KvCache:
    """The core. Build it with :func:`open_kvcache` (or the gateway's ``open_kvcache_filter``)."""

    def __init__(self, config: KvCacheConfig, *, tokenizer: TokenizerClient, routing_client: LmCacheClient,
                 background_client: LmCacheClient, routing_breaker: CircuitBreaker,
                 background_breaker: CircuitBreaker, sampler: HostLoadSampler | None) -> None:
        self.config = config
        self._stats = KvCacheStats()
        tc = config.token_cache
        self._token_cache = TokenCache(tc.max_size, tc.ttl) if tc.enabled else None
        self._hotness = HotnessTracker(config.hot_window, config.hot_max_records, config.hot_max_keys)
        self._tokenizer = tokenizer
        self._background_client = background_client
        self._breakers = (tokenizer.breaker, routing_breaker, background_breaker)
        self._background_breaker = background_breaker
        self._jobs = BackgroundJobs(config.max_background_jobs, self._stats)
        self._flights: SingleFlight[_Shared] = SingleFlight()
        self._actions = ActionRunner(background_client, background_breaker, config.cache_strategy,
                                     self._stats, RecentActions(config.hot_window, config.hot_max_keys))
        self._sampler = sampler
        rc = config.routing
        # The router (``routing.enabled``): decides at the proxy's pick time through a hook.
        self.decider = DecisionRouter(rc) if rc.enabled else None
        self._local_tokens: LocalTokenizers | None = (
            load_local_tokenizers(rc.tokenizers) if rc.enabled and rc.tokenizers else None)
        # First sight on the routing path: the engine's /tokenize, one call per prompt in flight.
        self._route_tokenize: SingleFlight[TokenSeq] = SingleFlight()
        first_sight = (self._tokenize_for_routing
                       if rc.enabled and rc.tokenize_on_route and self._token_cache is not None else None)
        self._router = Router(routing_client, routing_breaker, self._token_cache,
                              config.lookup_routing_timeout, self._stats, first_sight)
        # Hot prefixes pinned where the router placed them: (prefix key, endpoint id).
        self._hot_pinned: set[tuple[int, str]] = set()
        # Block keys of recently routed prompts (by prompt key): a repeated prompt is routed
        # without decoding its cached ids or hashing them again.
        self._prefix_keys: OrderedDict[str, PrefixKeys] = OrderedDict()

    @property
    def pins_hot_prefixes(self) -> bool:
        """The router places hot prefixes and pinning is allowed: keep them pinned there."""
        return (self.decider is not None and self.config.routing.hot_spread
                and self.config.cache_strategy.enable_pinning)

    async def pin_hot_prefixes(self) -> int:
        """Pin through LMCache every hot prefix placement not pinned yet; returns pins made.

        Each call has the background deadline; a failure is retried on the next round.
        Placements that cooled down are forgotten here (and left to the cache's eviction).
        """
        if self.decider is None:
            return 0
        now = trio.current_time()
        placements = self.decider.hot_placements(now)
        current = {(p.key, p.endpoint_id) for p in placements}
        self._hot_pinned &= current
        location = self.config.cache_strategy.pin_location or DEFAULT_LOCATION
        pinned = 0
        for placement in placements:
            target = (placement.key, placement.endpoint_id)
            tokens = placement.chunk_aligned()
            if target in self._hot_pinned or not tokens:
                continue
            try:
                await self._background_client.pin(
                    TokenSeq.from_ids(tokens).json, placement.endpoint_id, location,
                    breaker=self._background_breaker, deadline=now + self.config.request_timeout)
            except UpstreamError as exc:
                log.info("kvcache: pinning hot prefix %x (%d tokens) on %s failed: %s",
                         placement.key & 0xFFFFFFFF, len(tokens), placement.endpoint_id, exc)
                continue
            self._hot_pinned.add(target)
            pinned += 1
        return pinned

    async def compress_prefix(self, ids: Sequence[int], instance_id: str) -> None:
        """Compress a prompt prefix (whole LMCache chunks) on ``instance_id``: the router asked
        for it (``routing.compress_when_full``). Best effort, with the background deadline;
        counted in the ``compress`` action stats. Logs sizes and hashes only."""
        strategy = self.config.cache_strategy
        tokens = TokenSeq.from_ids(ids)
        key = "prefix:" + hashlib.blake2b(tokens.json, digest_size=8).hexdigest()
        now = trio.current_time()
        action = Action("compress", instance_id, strategy.compress_location or DEFAULT_LOCATION,
                        strategy.compress_method)
        await self._actions.run(action, tokens, key, now, now + self.config.request_timeout)

    @property
    def stats(self) -> KvCacheStats:
        """All counters, with gauges refreshed as of now."""
        s = self._stats
        cache = self._token_cache
        if cache is not None:
            s.token_cache_hits, s.token_cache_misses = cache.hits, cache.misses
            s.token_cache_size, s.token_cache_bytes = len(cache), cache.bytes
        s.hot_keys = len(self._hotness)
        s.single_flight_joined = self._flights.joined + self._route_tokenize.joined
        s.background_running = self._jobs.running
        s.breakers = {b.name: b.state.value for b in self._breakers}
        return s

    @property
    def host_load(self) -> HostLoad | None:
        """The latest host load sample (None when not sampled: not needed, or not yet)."""
        return self._sampler.latest if self._sampler is not None else None

    @property
    def evict_supported(self) -> bool | None:
        """Whether the controller has /evict: None until an eviction was attempted."""
        return self._actions.evict_supported

    async def route(self, body: object, nursery: trio.Nursery) -> RouteHint:
        """The routing hint for a parsed request ``body``; cache management starts in ``nursery``.

        ``nursery`` should be the request's: cancelling it cancels the background work.
        A body without a prompt gets ``RouteHint(None, "no_prompt")``.
        """
        async def spawn(fn: Any, *args: Any) -> bool:
            nursery.start_soon(fn, *args)
            return True

        hint = await self.process(body, spawn)
        return hint if hint is not None else RouteHint(None, "no_prompt")

    async def process(self, body: object, spawn: Spawn) -> RouteHint | None:
        """Steps 1-4 for one request; None when the body has no prompt (pass through)."""
        hint, _ = await self.process_routed(body, spawn)
        return hint

    async def process_routed(self, body: object,
                             spawn: Spawn) -> tuple[RouteHint | None, RoutingInput | None]:
        """:meth:`process`, plus what the router needs (tokens, lookup) when it is enabled."""
        prompt = extract_prompt(body, self.config.default_model)
        if prompt is None:
            return None, None
        hot_count = self._hotness.record(prompt.key, trio.current_time())
        routing = await self._router.route(prompt)
        routing_input = self._routing_input(prompt, routing) if self.decider is not None else None
        actions: tuple[Action, ...] | None = None
        if routing.tokens is not None:
            if routing.lookup is not None:
                # Everything the decision needs is known: decide now, spawn only for calls.
                actions = self._pending_actions(prompt, hot_count, routing.lookup)
                if not actions:
                    self._stats.background_skipped += 1
                    return routing.hint, routing_input
            elif self._background_breaker.state is BreakerState.OPEN:
                # Tokens known and LMCache known down: a lookup or an action could not be sent.
                self._stats.background_skipped += 1
                return routing.hint, routing_input
        await self._jobs.start(spawn, self._manage, prompt, hot_count, routing, actions)
        return routing.hint, routing_input

    async def _tokenize_for_routing(self, prompt: Prompt, deadline: float) -> TokenSeq | None:
        """The engine's tokens of a prompt missing from the token cache, for routing now.

        A local tokenizer of the model answers without a round trip (its ids serve this
        request's lookup and are not cached: only the engine's own ids are). Otherwise the
        engine's ``/tokenize``, unless its breaker is open; concurrent identical prompts share
        one call, the caller's budget scope bounds the wait, and the tokens land in the token
        cache for later.
        """
        local = self._local_tokens
        if local is not None and prompt.model in local:
            ids = local.tokens(prompt.tokenize_body)
            if not ids:
                return None
            self._remember_keys(prompt.key, ids)
            return TokenSeq.from_ids(ids)
        if self._tokenizer.breaker.state is BreakerState.OPEN:
            return None
        return await self._route_tokenize.run(prompt.key, lambda: self._tokenize(prompt, deadline))

    def _remember_keys(self, key: str, ids: Sequence[int] | Callable[[], Sequence[int]]) -> PrefixKeys | None:
        """The prompt's block keys, kept for its next requests: the ones kept already (the
        prompt keeps the keys it was first routed with, which the index recorded), else
        those of ``ids`` (or of what ``ids()`` returns). None: no router.

        Called where a prompt is tokenized, with the ids at hand as a list: keying them there
        spares decoding the token cache's JSON again for the decision (~0.5 ms for 4096 ids,
        several times the decision itself)."""
        if self.decider is None:
            return None
        keys = self._prefix_keys.get(key)
        if keys is not None:
            self._prefix_keys.move_to_end(key)
            return keys
        keys = self.decider.prefix_keys(ids() if callable(ids) else ids).compact()
        self._prefix_keys[key] = keys
        if len(self._prefix_keys) > _PREFIX_KEYS_MAX:
            self._prefix_keys.popitem(last=False)
        return keys

    def _routing_input(self, prompt: Prompt, routing: Routing) -> RoutingInput:
        """Tokens from the token cache, else a local tokenizer; LMCache's matches if looked up."""
        tokens: list[int] | PrefixKeys | None = None
        if routing.tokens is not None and self.decider is not None:
            tokens = self._remember_keys(prompt.key, routing.tokens.ids)
        elif self._local_tokens is not None:
            tokens = self._local_tokens.tokens(prompt.tokenize_body)
        lookup = ({instance: entry.matched for instance, entry in routing.lookup.layout.items()}
                  if routing.lookup is not None else None)
        return RoutingInput(tokens=tokens, lookup=lookup)

    def _pending_actions(self, prompt: Prompt, hot_count: int,
                         lookup: LookupResult | None) -> tuple[Action, ...]:
        decided = decide(self.config.cache_strategy, self.host_load, hot_count, lookup)
        return self._actions.pending(decided, prompt.key, trio.current_time())

    # -- background --------------------------------------------------------------------

    async def _manage(self, prompt: Prompt, hot_count: int, routing: Routing,
                      actions: tuple[Action, ...] | None) -> None:
        """Background work of one request; ``actions`` None: decide once tokens and lookup are in."""
        deadline = trio.current_time() + self.config.request_timeout
        tokens, lookup = routing.tokens, routing.lookup
        if tokens is None or lookup is None:
            known = tokens
            shared = await self._flights.run(
                prompt.key, lambda: self._tokens_and_lookup(prompt, known, deadline))
            if shared is None:
                return
            tokens, lookup = shared
        if actions is None:
            actions = self._pending_actions(prompt, hot_count, lookup)
        now = trio.current_time()
        for action in actions:
            await self._actions.run(action, tokens, prompt.key, now, deadline)

    async def _tokens_and_lookup(self, prompt: Prompt, tokens: TokenSeq | None,
                                 deadline: float) -> _Shared | None:
        if tokens is None:
            tokens = await self._tokenize(prompt, deadline)
            if tokens is None:
                return None
        try:
            lookup = await self._background_client.lookup(tokens.json, breaker=self._background_breaker,
                                                          deadline=deadline)
        except UpstreamError as exc:
            self._stats.background_lookups_failed += 1
            log.info("kvcache: background lookup failed (prompt %s, %d tokens): %s",
                     prompt.key[:12], tokens.count, exc)
            return tokens, None
        self._stats.background_lookups_ok += 1
        return tokens, lookup

    async def _tokenize(self, prompt: Prompt, deadline: float) -> TokenSeq | None:
        cache = self._token_cache
        if cache is not None:
            cached = cache.peek(prompt.key, trio.current_time())
            if cached is not None:
                return cached
        self._stats.tokenize_calls += 1
        try:
            result = await self._tokenizer.tokenize(prompt.tokenize_body, deadline=deadline)
        except UpstreamError as exc:
            self._stats.tokenize_failures += 1
            log.info("kvcache: tokenize failed (prompt %s, %d chars): %s", prompt.key[:12], prompt.size, exc)
            return None
        if not result.tokens:
            return None
        tokens = TokenSeq.from_ids(result.tokens)
        if cache is not None:
            cache.put(prompt.key, tokens, trio.current_time())
        self._remember_keys(prompt.key, result.tokens)
        return tokens


def _on_breaker_change(breaker: CircuitBreaker, state: BreakerState) -> None:
    level = logging.WARNING if state is BreakerState.OPEN else logging.INFO
    log.log(level, "kvcache: %s circuit breaker is now %s", breaker.name, state.value)


@asynccontextmanager
async def open_kvcache_core(config: KvCacheConfig, nursery: trio.Nursery, *,
                            http_pool_size: int = DEFAULT_HTTP_POOL_SIZE,
                            read_host_load: Callable[[], HostLoad] | None = None) -> AsyncIterator[KvCache]:
    """The core with its HTTP clients and host-load sampler (run in ``nursery``); closed on exit.

    ``read_host_load`` replaces the psutil reading (for tests and for hosts where the
    signal should come from elsewhere).
    """
    cb = config.circuit_breaker

    def breaker(name: str) -> CircuitBreaker:
        return CircuitBreaker(name, cb.failure_threshold, cb.recovery_timeout, cb.half_open_max_calls,
                              on_change=_on_breaker_change)

    policy = RetryPolicy(config.retry.max_attempts, config.retry.base_backoff, config.retry.max_backoff)

    def pool(base_url: str, max_reply_bytes: int) -> Http11Pool:
        # Reads have no limit of their own: every call runs under its deadline (the routing
        # budget, or request_timeout for background work).
        return Http11Pool(base_url, max_connections=http_pool_size, connect_timeout=config.request_timeout,
                          write_timeout=config.request_timeout, max_reply_bytes=max_reply_bytes)

    tokenize_pool = pool(config.vllm_endpoint, TOKENIZE_MAX_REPLY_BYTES)
    # Routing gets its own pool, so background work never makes it wait for a connection.
    routing_pool = pool(config.lmcache_endpoint, LMCACHE_MAX_REPLY_BYTES)
    background_pool = pool(config.lmcache_endpoint, LMCACHE_MAX_REPLY_BYTES)
    strategy = config.cache_strategy
    needs_load = ((strategy.enable_compression and strategy.load_threshold > 0)
                  or (strategy.enable_eviction and strategy.memory_threshold > 0))
    sampler = HostLoadSampler(config.load_sample_interval, read_host_load) if needs_load else None
    kv = KvCache(
        config,
        tokenizer=TokenizerClient(tokenize_pool.post_json, policy, breaker("tokenize")),
        routing_client=LmCacheClient(routing_pool.post_json, policy),
        background_client=LmCacheClient(background_pool.post_json, policy),
        routing_breaker=breaker("lookup_routing"),
        background_breaker=breaker("lmcache_background"),
        sampler=sampler,
    )
    sampler_scope = trio.CancelScope()
    try:
        if sampler is not None:
            await nursery.start(_run_sampler, sampler, sampler_scope)
        if kv.pins_hot_prefixes:
            nursery.start_soon(_run_hot_pinner, kv, sampler_scope)
        yield kv
    finally:
        sampler_scope.cancel()
        for closing in (tokenize_pool, routing_pool, background_pool):
            closing.close()


async def _run_hot_pinner(kv: KvCache, scope: trio.CancelScope) -> None:
    with scope:
        while True:
            await kv.pin_hot_prefixes()
            await trio.sleep(_HOT_PIN_INTERVAL)


async def _run_sampler(sampler: HostLoadSampler, scope: trio.CancelScope, *,
                       task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
    with scope:
        await sampler.run(task_status=task_status)


@asynccontextmanager
async def open_kvcache(config: KvCacheConfig, *, http_pool_size: int = DEFAULT_HTTP_POOL_SIZE,
                       read_host_load: Callable[[], HostLoad] | None = None) -> AsyncIterator[KvCache]:
    """Embed the KV-cache core in any trio program: ``async with open_kvcache(cfg) as kv``.

    Then, per request, ``hint = await kv.route(body, request_nursery)``.
    """
    if not (config.vllm_endpoint and config.lmcache_endpoint):
        raise ValueError("open_kvcache needs vllm_endpoint and lmcache_endpoint")
    async with trio.open_nursery() as nursery, open_kvcache_core(
            config, nursery, http_pool_size=http_pool_size, read_host_load=read_host_load) as kv:
        yield kv
