"""The router: one decision per request, from cache knowledge and load, in one cost.

    tokens --> block keys --> local index match --+
    LMCache /lookup (optional) -------------------+--> matched tokens per endpoint
    endpoints (health, in-flight) + reservations ---> queue, load, overload guard
    hot prefix tracker ---------------------------> replicas of a popular prefix
    per endpoint: predicted TTFT = queue + running + base + per_token x uncached + cached load
                                   + KV admission wait (a full GPU KV cache)
    winner = argmin (ties: load, then a per-prompt hash of the id); the deepest holder keeps
             it within a bounded load; session hash if no signal

The decision reserves its predicted prefill work on the chosen endpoint at once, so the
next decision of a burst sees it; callbacks release it and teach the per-endpoint costs.
Pure: no I/O and no clock of its own (``now`` comes from the caller); not thread-safe (one
trio thread owns it).
"""

from __future__ import annotations

import itertools
import math
from collections import Counter, OrderedDict
from collections.abc import Mapping, Sequence
from typing import Final

import attrs

from ._blocks import LMCACHE_CHUNK, BlockSchedule, PrefixKeys
from ._cost import KvOccupancy, PredictionLag, PrefillLearner, PrefillQueue
from ._hot import HotPlacement, HotPrefixes
from ._prefix_index import PrefixIndex
from ._session import SessionRing, stable_hash
from ._types import Decision, EndpointView, Reason
from .config import RoutingConfig

__all__ = ["LearnedCost", "Router", "RouterStats"]

# Predicted times closer than this are a tie (then load, then the id hash decide).
_COST_RESOLUTION = 0.001
_SHOWN_COSTS = 4
# A hot prefix gets another replica when all its engines have more queued than a copy costs,
# or use this share of their max_in_flight.
_HOT_BUSY = 0.25
# A prefix drawing this many engines' fair shares of the traffic is copied without waiting
# for its engines to fall behind: one engine taking it would carry twice its share of the
# fleet's requests however fast it keeps up.
_HOT_WIDE = 2.0
# Weight of each report in the moving average of output tokens per request.
_OUTPUT_WEIGHT = 0.05
# Prefixes asked to be compressed lately, remembered per endpoint for ``hot_window``.
_MAX_COMPRESSED = 4096


def _load_per_weight(rows: Sequence[_Row]) -> float:
    """The eligible endpoints' mean load per unit of weight (in flight, or routed and not done)."""
    return sum([row[_LOAD] for row in rows]) / sum([row[_VIEW].weight for row in rows])


def _prefix_key(keys: PrefixKeys | None, matched: int) -> int | None:
    """The key of the deepest block within the first ``matched`` tokens (None: no such block):
    what names a shared prefix in an endpoint's KV occupancy."""
    if not matched or keys is None:
        return None
    block = keys.block_at(matched)
    return keys.keys[block] if block >= 0 else None


@attrs.frozen(slots=True)
class LearnedCost:
    endpoint_id: str
    prefill_tokens_per_second: float
    base_latency: float
    samples: int
    queued_seconds: float
    outstanding: int


@attrs.frozen(slots=True)
class RouterStats:
    decisions: Mapping[str, int]
    pending: int
    index_entries: int
    hot_prefixes: int
    corrections: int
    endpoints: tuple[LearnedCost, ...]


class _EndpointState:
    __slots__ = ("kv", "lag", "learner", "queue", "recent", "recent_since")

    def __init__(self, learner: PrefillLearner) -> None:
        self.learner = learner
        self.queue = PrefillQueue()
        self.lag = PredictionLag()
        self.kv = KvOccupancy()
        # Requests routed here lately (decayed over the hot window): among a hot prefix's
        # replicas of about equal cost and equal load, the one that got fewer wins, so they
        # share its traffic evenly instead of by a hash's chance.
        self.recent = 0.0
        self.recent_since = 0.0

    def recent_count(self, now: float, window: float) -> float:
        if now > self.recent_since:
            if self.recent > 0.0:
                self.recent *= math.exp(-(now - self.recent_since) / window)
            self.recent_since = now
        return self.recent


# One eligible endpoint during a decision (a plain tuple: built 16 times per decision).
_Row = tuple[EndpointView, _EndpointState, float, int, bool, int, int, float, float]
_VIEW: Final = 0
_STATE: Final = 1
_QUEUED: Final = 2
_LOAD: Final = 3
_OVERLOADED: Final = 4
_REAL: Final = 5
_EFFECTIVE: Final = 6
_TTFT: Final = 7
_OWN_TTFT: Final = 8  # the prediction with what the endpoint really holds (no replica credit)


class _Pending:
    __slots__ = (
        "created",
        "endpoint_id",
        "keys",
        "kv_full",
        "kv_prefix",
        "kv_tokens",
        "kv_wait",
        "lag",
        "load",
        "matched",
        "prefilled",
        "prompt_tokens",
        "queued",
        "receipt",
        "ttft",
        "work",
    )

    def __init__(self, endpoint_id: str, work: float, queued: float, load: int, matched: int,
                 prompt_tokens: int, keys: PrefixKeys | None,
                 receipt: tuple[list[float | None], float] | None, created: float, lag: float,
                 kv_tokens: float, kv_prefix: int | None, kv_wait: float, kv_full: bool) -> None:
        self.endpoint_id = endpoint_id
        self.work = work
        self.queued = queued
        self.load = load
        self.matched = matched
        self.prompt_tokens = prompt_tokens
        self.keys = keys
        self.receipt = receipt
        self.created = created
        self.ttft: float | None = None
        self.prefilled = False
        # The endpoint's lag when it was chosen (part of the predicted TTFT).
        self.lag = lag
        # KV tokens this request holds there until it ends (its private ones, and its prefix
        # by key), and the admission wait predicted for it.
        self.kv_tokens = kv_tokens
        self.kv_prefix = kv_prefix
        self.kv_wait = kv_wait
        self.kv_full = kv_full


class Router:
    """Decides which endpoint serves a request. See the module docstring for the pipeline."""

    def __init__(self, config: RoutingConfig | None = None) -> None:
        cfg = config or RoutingConfig()
        self._cfg = cfg
        self._schedule = BlockSchedule(cfg.block_size, cfg.max_block_size)
        self._index = (PrefixIndex(cfg.max_index_entries, self._schedule,
                                   cfg.engine_cache_tokens or float("inf"))
                       if cfg.prefix_index else None)
        self._hot = (HotPrefixes(window=cfg.hot_window, threshold=cfg.hot_threshold,
                                 min_requests=cfg.hot_min_requests, max_hot=cfg.max_hot_prefixes)
                     if cfg.hot_spread else None)
        self._ring = SessionRing()
        # Endpoints seen down (unhealthy or drained): their cache was forgotten once.
        self._down: set[str] = set()
        self._states: dict[str, _EndpointState] = {}
        self._learners: dict[int, PrefillLearner] = {}
        self._id_hashes: dict[str, int] = {}
        self._pending: OrderedDict[int, _Pending] = OrderedDict()
        self._handles = itertools.count(1)
        self._clock = 0.0
        self._decisions: Counter[str] = Counter()
        self._corrections = 0
        self._cached_cost = 1.0 / cfg.cached_tokens_per_second
        # Output tokens per request (a moving average of the engines' reports): part of what
        # a request holds in the KV cache until it ends.
        self._mean_output = 0.0
        # (prefix key, endpoint) -> when the request to compress it there expires.
        self._compressed: OrderedDict[tuple[int, str], float] = OrderedDict()

    @property
    def config(self) -> RoutingConfig:
        return self._cfg

    @property
    def index(self) -> PrefixIndex | None:
        return self._index

    def prefix_keys(self, tokens: Sequence[int]) -> PrefixKeys:
        """The prompt's block keys: cache them with the tokens to save the hashing next time."""
        return self._schedule.keys(tokens)

    def extend_keys(self, previous: PrefixKeys, more: Sequence[int]) -> PrefixKeys:
        """The keys of ``previous``'s prompt followed by ``more`` tokens (a chat's next turn:
        the previous prompt, the answer and the new message), hashing only the new tokens."""
        return self._schedule.extend(previous, more)

    def _state(self, view: EndpointView) -> _EndpointState:
        state = self._states.get(view.id)
        if state is None:
            # Endpoints of equal weight are the same hardware to the operator: they share one
            # learned cost. Per-endpoint fits from a few dozen noisy TTFTs each (queueing the
            # router did not predict lands in them) drift apart and then send every uncached
            # request to whichever identical engine looks fastest by chance.
            learner = self._learners.get(view.weight)
            if learner is None:
                cfg = self._cfg
                learner = PrefillLearner(per_token=1.0 / (cfg.prefill_tokens_per_second * view.weight),
                                         base=cfg.base_latency, learning_rate=cfg.learning_rate)
                self._learners[view.weight] = learner
            state = _EndpointState(learner)
            self._states[view.id] = state
            self._id_hashes[view.id] = stable_hash(view.id)
        return state

    # -- the decision ----------------------------------------------------------------

    def decide(self, endpoints: Sequence[EndpointView], tokens: Sequence[int] | PrefixKeys | None,
               lookup: Mapping[str, int] | None, session_key: str | None, now: float) -> Decision:
        """Pick an endpoint for a request and reserve its predicted work there.

        ``tokens``: the prompt's token ids (or their :meth:`prefix_keys`), None if unknown.
        ``lookup``: LMCache's answer, instance id -> matched tokens (None: no answer).
        ``session_key``: the ``x-session-id`` header or the body's ``user`` field, if any.
        """
        cfg = self._cfg
        if now > self._clock:
            self._clock = now
        if self._pending and next(iter(self._pending.values())).created < now - cfg.reservation_timeout:
            self._expire(now)

        keys: PrefixKeys | None = None
        prompt_tokens = 0
        if isinstance(tokens, PrefixKeys):
            keys = tokens
            prompt_tokens = keys.length
        elif tokens is not None:
            if self._index is not None or self._hot is not None:
                keys = self._schedule.keys(tokens)
            prompt_tokens = len(tokens)

        matched = self._index.match(keys) if self._index is not None and keys is not None else {}
        if lookup:
            for instance_id, count in lookup.items():
                count = min(count, prompt_tokens) if prompt_tokens else count
                if count > matched.get(instance_id, 0):
                    matched[instance_id] = count

        # Eligible endpoints: healthy and not full (counting requests routed but not yet
        # seen in flight by the proxy: a burst must not overrun max_in_flight). One pass
        # computes each one's cost; a hot prefix's replicas are re-costed after.
        ratio = cfg.overload_in_flight_ratio
        max_queue = cfg.overload_queue_time
        running = cfg.running_request_cost
        per_cached = self._cached_cost
        salt = (keys.keys[-1] if keys is not None and keys.keys
                else stable_hash(session_key) if session_key else 0)
        cost_model = cfg.cost_model
        duplicate = cfg.duplicate_cost_factor
        states = self._states
        id_hashes = self._id_hashes
        down = self._down
        rows: list[_Row] = []
        append = rows.append
        least_queued = math.inf
        most_queued = 0.0
        best_eligible_real = 0
        best_real = max(matched.values()) if matched else 0
        # Each row's rank (see "Rank" below) is computed in the same pass, with the deepest
        # match of any endpoint standing in for the deepest eligible one: it is the same in
        # the common case, and the ranks are computed again when not (or when a row changes
        # after this pass). One pass over the endpoints instead of two.
        top = best_real if cost_model and duplicate else 0
        ranks: list[tuple[float, int, int, int]] = []
        append_rank = ranks.append
        kv_capacity = cfg.engine_kv_tokens
        private = prompt_tokens + self._mean_output  # what a request holds, before its match
        n = 0  # rows so far
        # The hot loop of a decision (once per endpoint): locals only, and the queue and lag
        # are asked only when they hold something.
        for view in endpoints:
            endpoint_id = view.id
            if (view.down or down) and view.down is not (endpoint_id in down):
                self._note_down(endpoint_id, view.down)
            if not view.healthy:
                continue
            state = states.get(endpoint_id) or self._state(view)
            queue = state.queue
            load = view.in_flight
            if queue.outstanding > load:
                load = queue.outstanding
            cap = view.max_in_flight
            if load >= cap:
                continue
            # Predicted work not yet prefilled, plus how late this engine has lately been
            # against its predictions (closes the loop on what the model does not see).
            lag = state.lag
            # queue.backlog(now) (when anything is pending) + lag.value(now), inlined: two calls
            # per endpoint cost ~5% of a decision (test_routing_router checks it to the last bit).
            queued = 0.0
            if queue.pending:
                since = queue._since
                if now > since:
                    if queue._backlog > 0:
                        queue._backlog = max(0.0, queue._backlog - (now - since))
                    queue._since = now
                queued = queue._backlog
            level = lag.level
            if level:
                since = lag._since
                if level > 0.0 and now > since:
                    level *= 0.5 ** ((now - since) / lag._half_life)
                    lag.level = level
                    lag._since = now
                queued += level
            if queued < least_queued:
                least_queued = queued
            if queued > most_queued:
                most_queued = queued
            overloaded = load >= ratio * cap
            real = matched.get(endpoint_id, 0) if matched and not overloaded else 0
            if real > best_eligible_real:
                best_eligible_real = real
            learner = state.learner
            ttft = (queued + running * load + learner.base + learner.per_token * (prompt_tokens - real)
                    + per_cached * real)
            if kv_capacity and state.kv.used:
                kv = state.kv
                prefix = _prefix_key(keys, real)
                ttft += kv.wait(kv.needed(private - real, prefix, real), kv_capacity * view.weight)
            if not cost_model:
                append_rank((-real, load, id_hashes[endpoint_id] ^ salt, n))
            elif real < top:
                append_rank(((ttft + duplicate * learner.per_token * (top - real)) // _COST_RESOLUTION,
                             load, id_hashes[endpoint_id] ^ salt, n))
            else:
                append_rank((ttft // _COST_RESOLUTION, load, id_hashes[endpoint_id] ^ salt, n))
            append((view, state, queued, load, overloaded, real, real, ttft, ttft))
            n += 1
        if not rows:
            self._decisions["no-endpoint"] += 1
            return Decision(endpoint_id=None, reason="no-endpoint", matched_tokens=0,
                            prompt_tokens=prompt_tokens)
        # Overloaded also: more than ``overload_queue_time`` queued beyond the least queued
        # eligible endpoint. Relative, because when the whole fleet is saturated no engine is
        # faster than another, and computing a prefix again elsewhere only adds work to every
        # queue: cache affinity is then worth the most, not the least.
        # And only an endpoint carrying more than the mean load (per unit of weight): when a
        # KV-bound fleet makes requests wait everywhere, a long queue on an endpoint with no
        # more requests than the others is the fleet's state, not a hot spot, and a copy of
        # its prefix elsewhere would only take KV room there.
        queue_limit = least_queued + max_queue
        changed = False  # a row changed after its rank was computed
        if most_queued > queue_limit:
            changed = True
            best_eligible_real = 0
            mean_load = _load_per_weight(rows)
            for i, row in enumerate(rows):
                real = row[_REAL]
                if row[_QUEUED] > queue_limit and row[_LOAD] > mean_load * row[_VIEW].weight:
                    extra = (row[_STATE].learner.per_token - per_cached) * real
                    rows[i] = (row[_VIEW], row[_STATE], row[_QUEUED], row[_LOAD], True, 0, 0,
                               row[_TTFT] + extra, row[_OWN_TTFT] + extra)
                elif real > best_eligible_real:
                    best_eligible_real = real

        # Hot prefix: the deepest prefix anyone holds, if popular, gets replicas, which are
        # then costed as if they held it (the first request to a new replica places it).
        replicas: list[str] = []
        row_of: dict[str, int] = {}
        hot_tokens = 0
        hot = self._hot
        if hot is not None and keys is not None:
            hot.count_request(now)
            block = keys.block_at(best_real) if best_real >= cfg.hot_min_tokens else -1
            if block >= 0:
                hot_tokens = keys.ends[block]
                hot.fleet_size = len(rows)
                key = keys.keys[block]
                wanted = hot.note(key, hot_tokens, now)
                if wanted > 1 or hot.is_hot(key):
                    row_of = {row[_VIEW].id: i for i, row in enumerate(rows) if not row[_OVERLOADED]}
                    kept = hot.current(key)
                    if (wanted > len(kept)
                            and hot.share(key, now) * len(rows) < _HOT_WIDE * cfg.hot_threshold
                            and not self._pressed(rows, row_of, kept, matched, hot_tokens)):
                        # Popular, but its engines keep up: another copy would only take
                        # cache space from other prefixes.
                        wanted = max(1, len(kept))
                    if 1 < wanted <= len(kept) and all(map(row_of.__contains__, kept[:wanted])):
                        # What HotPrefixes.replicas returns when its replicas stand (most
                        # decisions of a hot prefix), without building its arguments.
                        replicas = kept[:wanted]
                    else:
                        replicas = hot.replicas(
                            key, wanted, keys.tokens, usable=row_of.__contains__,
                            holders=(e for e, n in matched.items() if n >= hot_tokens),
                            by_load=lambda: sorted(row_of, key=lambda e: (rows[row_of[e]][_QUEUED], e)))
                    for endpoint_id in replicas:
                        i = row_of[endpoint_id]
                        row = rows[i]
                        if row[_EFFECTIVE] < hot_tokens:
                            saved = row[_STATE].learner.per_token - per_cached
                            ttft = row[_TTFT] - saved * (hot_tokens - row[_EFFECTIVE])
                            rows[i] = (row[_VIEW], row[_STATE], row[_QUEUED], row[_LOAD],
                                       row[_OVERLOADED], row[_REAL], hot_tokens, ttft, row[_OWN_TTFT])
                            changed = True

        # Rank: predicted TTFT, plus a penalty for computing again what another eligible
        # endpoint holds (a copy costs the fleet cache space: spill only when clearly faster);
        # ties: load, then (among a hot prefix's replicas) fewer requests lately, so copies
        # share its traffic evenly, then a per-prompt hash of the id (identical prompts agree
        # everywhere). Elsewhere the hash alone breaks ties: alternating between engines
        # that merely both hold a prefix keeps duplicates warm at other prefixes' expense
        # (measured in the fleet simulation).
        window = cfg.hot_window
        if changed or (cost_model and top != (best_eligible_real if duplicate else 0)):
            # The first pass's ranks do not hold (see above): rank again.
            if not cost_model:
                ranks = [(-row[_EFFECTIVE], row[_LOAD], id_hashes[row[_VIEW].id] ^ salt, i)
                         for i, row in enumerate(rows)]
            elif duplicate and best_eligible_real:
                top = best_eligible_real
                ranks = [((row[_TTFT] + duplicate * row[_STATE].learner.per_token
                           * (top - row[_EFFECTIVE] if row[_EFFECTIVE] < top else 0))
                          // _COST_RESOLUTION, row[_LOAD], id_hashes[row[_VIEW].id] ^ salt, i)
                         for i, row in enumerate(rows)]
            else:
                ranks = [(row[_TTFT] // _COST_RESOLUTION, row[_LOAD], id_hashes[row[_VIEW].id] ^ salt, i)
                         for i, row in enumerate(rows)]

        reason: Reason
        new_prefix = False  # the new-prefix placement overruled the cost
        order = sorted(ranks)
        best = order[0]
        if replicas and rows[best[3]][_VIEW].id in replicas:
            # A hot prefix's replicas hold the same prefix: among those whose cost is within
            # a recomputation of the prefix of the cheapest (a lag of a few tens of ms, a
            # slower moment), the least loaded, then the one that got fewer requests lately,
            # takes it: replicas exist to share the prefix's traffic, and a replica truly
            # behind shows it in its in-flight count.
            band = rows[best[3]][_STATE].learner.predict(hot_tokens)
            limit = best[0] + band / _COST_RESOLUTION
            # (ranks are in row order)
            spread = [((r[1], int(rows[r[3]][_STATE].recent_count(now, window)), r[2]), r)
                      for r in (ranks[row_of[e]] for e in replicas) if r[0] <= limit]
            best = min(spread)[1]
        elif (cfg.new_prefix_spread and cost_model and len(order) > 1
              and 2 * best_eligible_real < prompt_tokens):
            # Most of the prompt is new to every eligible endpoint: this request places a new
            # prefix, and the requests that reuse it will follow it there. Among the endpoints
            # about as fast as the cheapest (within the fixed cost plus what the deepest match
            # saves) and no more loaded, the one that got the fewest requests lately (per unit
            # of weight) takes it, so new prefixes and their traffic spread evenly instead of
            # gathering where a short common prefix (a system prompt) is cached.
            learner = rows[best[3]][_STATE].learner
            band = learner.base + (learner.per_token * (1.0 + duplicate) - per_cached) * best_eligible_real
            limit = best[0] + band / _COST_RESOLUTION
            tied = [r for r in order if r[0] <= limit and r[1] <= best[1]]
            if len(tied) > 1:
                placed = min(tied, key=lambda r: (rows[r[3]][_STATE].recent_count(now, window)
                                                  / rows[r[3]][_VIEW].weight, r[2]))
                new_prefix = placed is not best
                best = placed
        winner = rows[best[3]]
        affinity_kept = False  # bounded-load affinity overruled the cost
        bound = cfg.affinity_load_factor
        if (bound and best_eligible_real and not replicas and not new_prefix
                and winner[_REAL] < best_eligible_real):
            # Bounded-load affinity: the cheapest endpoint holding the deepest match keeps the
            # request while its in-flight count is within ``bound`` x the mean (+1). The
            # predicted TTFT sees a copy's prefill, not what the copy then holds: on a
            # KV-bound engine the prefix's blocks stay allocated for the whole decode, and
            # requests that share them on one engine run more at once. Spilling on small
            # cost differences spreads a prefix's requests over every engine, each paying
            # those blocks again (measured: `benchmarks.virtual_fleet`, docs/routing.md).
            # Per unit of weight: an endpoint of weight 2 is two endpoints' worth of hardware.
            per_weight = bound * _load_per_weight(rows)
            for r in order:
                row = rows[r[3]]
                if row[_REAL] >= best_eligible_real and row[_LOAD] <= per_weight * row[_VIEW].weight + 1.0:
                    winner = row
                    affinity_kept = True
                    break
        if best_eligible_real == 0 and not replicas and session_key and cfg.session_affinity:
            loads_by_id = {row[_VIEW].id: row[_LOAD] for row in rows if not row[_OVERLOADED]}
            picked = self._ring.pick(session_key, [(v.id, v.weight) for v in endpoints], loads_by_id,
                                     cfg.session_load_factor)
            if picked is not None:
                winner = next(row for row in rows if row[_VIEW].id == picked)
                reason = "session"
            else:
                reason = "load"
        elif replicas and winner[_REAL] < hot_tokens and winner[_VIEW].id in replicas:
            reason = "hot-spread"
        elif new_prefix:
            reason = "new-prefix"
        elif affinity_kept:
            reason = "affinity"
        elif winner[_REAL] > 0 and winner[_REAL] >= best_eligible_real:
            reason = "cache"
        else:
            reason = "load"

        view = winner[_VIEW]
        state = winner[_STATE]
        real_matched = min(matched.get(view.id, 0), prompt_tokens)
        # The engine is busy with this request until its first token: the fixed part too (on
        # a loaded engine, the learned fixed part is mostly that time), not only the tokens.
        work = state.learner.predict(prompt_tokens - real_matched) + per_cached * real_matched
        # The cost learner sees the TTFT minus the predicted queue only: a lasting excess
        # (gateway overhead, a slower engine) moves its fixed part, and the lag is left with
        # what is transient. Subtracting the lag too would leave a lasting excess in the lag,
        # where it pushes traffic away from whichever engines are busy (the holders).
        backlog = state.queue.backlog(now)
        state.queue.add(work, now)
        kv_tokens = 0.0
        kv_prefix = None
        kv_wait = 0.0
        kv_full = False
        if kv_capacity:
            kv_tokens = private - real_matched
            kv_prefix = _prefix_key(keys, real_matched)
            kv = state.kv
            needed = kv.needed(kv_tokens, kv_prefix, real_matched)
            kv_wait = kv.wait(needed, kv_capacity * view.weight)
            kv_full = kv.used + needed > kv_capacity * view.weight
            kv.hold(kv_tokens, kv_prefix, real_matched)
        state.recent = state.recent_count(now, window) + 1.0
        receipt = (self._index.record(view.id, keys)
                   if self._index is not None and keys is not None else None)
        handle = next(self._handles)
        self._pending[handle] = _Pending(view.id, work, backlog, winner[_LOAD], real_matched,
                                         prompt_tokens, keys, receipt, now,
                                         max(0.0, winner[_QUEUED] - backlog), kv_tokens, kv_prefix, kv_wait,
                                         kv_full)
        if len(self._pending) > cfg.max_pending:
            self._drop(next(iter(self._pending)))
        self._decisions[reason] += 1

        compress = (self._compress(view.id, keys, real_matched, now)
                    if cfg.compress_when_full and real_matched >= LMCACHE_CHUNK else 0)
        shown = tuple([(row[_VIEW].id, row[_TTFT], row[_EFFECTIVE], row[_LOAD], row[_OVERLOADED])
                       for row in [rows[r[3]] for r in order[:_SHOWN_COSTS]]])
        return Decision(endpoint_id=view.id, reason=reason, matched_tokens=real_matched,
                        prompt_tokens=prompt_tokens, reservation=handle, predicted_ttft=winner[_OWN_TTFT],
                        cost_rows=shown, compress_tokens=compress)

    def _compress(self, endpoint_id: str, keys: PrefixKeys | None, matched: int, now: float) -> int:
        """Tokens of the prompt to compress on ``endpoint_id``: its cached prefix in whole
        LMCache chunks, if that endpoint's cache is full (it has computed more tokens than
        its cache holds, so it evicts) and the prefix was not asked to be compressed there
        lately; else 0. The prefix is being reused, the kind worth keeping: compressed, it
        takes less room, and more reused prefixes stay cached."""
        index = self._index
        if index is None or keys is None or index.inserted(endpoint_id) <= index.capacity(endpoint_id):
            return 0
        tokens = matched // LMCACHE_CHUNK * LMCACHE_CHUNK
        block = keys.block_at(tokens)
        if block < 0:
            return 0
        recent = self._compressed
        while recent and next(iter(recent.values())) <= now:
            recent.popitem(last=False)
        memo = (keys.keys[block], endpoint_id)
        if memo in recent:
            return 0
        recent[memo] = now + self._cfg.hot_window  # one TTL for all: insertion order = expiry order
        if len(recent) > _MAX_COMPRESSED:
            recent.popitem(last=False)
        return tokens

    def _pressed(self, rows: list[_Row], row_of: Mapping[str, int], kept: Sequence[str],
                 matched: Mapping[str, int], hot_tokens: int) -> bool:
        """Every usable engine serving the prefix (holder or replica) is busier than a copy
        costs: its queued prefill exceeds the time to compute the prefix elsewhere, or a
        quarter of its in-flight limit is used. A replica then pays for itself with the next
        request; before that, a copy only takes cache space from other prefixes."""
        serving = {e for e, n in matched.items() if n >= hot_tokens and e in row_of}
        serving.update(e for e in kept if e in row_of)
        if not serving:
            return True
        for endpoint_id in serving:
            row = rows[row_of[endpoint_id]]
            copy_cost = row[_STATE].learner.predict(hot_tokens)
            if row[_QUEUED] < copy_cost and row[_LOAD] < row[_VIEW].max_in_flight * _HOT_BUSY:
                return False
        return True

    # -- feedback --------------------------------------------------------------------

    def on_first_byte(self, decision: Decision, ttft: float) -> None:
        """The response's first byte arrived ``ttft`` seconds after the decision (streams only:
        a non-streamed response's first byte comes after the whole generation)."""
        pending = self._pending.get(decision.reservation)
        if pending is None or pending.prefilled:
            return
        pending.ttft = max(0.0, ttft)
        pending.prefilled = True
        state = self._states.get(pending.endpoint_id)
        if state is not None:
            at = pending.created + pending.ttft
            state.queue.prefilled(pending.work, at)
            if decision.predicted_ttft is not None:
                # Excess over the model without the lag (the lag estimates that excess).
                state.lag.observe(pending.ttft - (decision.predicted_ttft - pending.lag), at)

    def on_complete(self, decision: Decision, cached_tokens: int | None, prompt_tokens: int | None,
                    now: float | None = None, completion_tokens: int | None = None) -> None:
        """The request ended well; ``cached_tokens``, ``prompt_tokens`` and ``completion_tokens``
        from the engine's ``usage`` (``prompt_tokens_details.cached_tokens``), None when it
        did not report them."""
        pending = self._pending.pop(decision.reservation, None)
        if pending is None:
            return
        now = self._clock if now is None else now
        state = self._release(pending, now)
        if completion_tokens is not None and completion_tokens >= 0:
            self._mean_output += _OUTPUT_WEIGHT * (completion_tokens - self._mean_output)
        if state is not None:
            # How long the request held its KV blocks: from its admission (about its
            # predicted prefill before its first byte) to its end. Not the time it waited
            # for admission: counting that would feed the predicted wait back into itself.
            held = now - pending.created
            if pending.ttft is not None:
                held = held - pending.ttft + min(pending.work, pending.ttft)
            state.kv.observe_lifetime(held)
        total = prompt_tokens if prompt_tokens is not None and prompt_tokens > 0 else pending.prompt_tokens
        cached = (min(max(cached_tokens, 0), total) if cached_tokens is not None
                  else min(pending.matched, total))
        if state is not None and pending.ttft is not None and not pending.kv_full:
            # A request that found the KV cache full teaches nothing about prefill speed: its
            # TTFT is mostly its wait for room, and how long that was is only a guess.
            cfg = self._cfg
            prefill_seconds = (pending.ttft - pending.queued - cfg.running_request_cost * pending.load
                               - self._cached_cost * cached)
            state.learner.learn(total - cached, prefill_seconds)
        if cached_tokens is not None and self._index is not None and pending.keys is not None:
            if self._index.observe(pending.endpoint_id, pending.keys, cached_tokens,
                                   receipt=pending.receipt):
                self._corrections += 1

    def on_failure(self, decision: Decision, now: float | None = None) -> None:
        """The request failed or was abandoned: release it; the engine did not keep the part of
        the prompt it did not already hold."""
        pending = self._pending.pop(decision.reservation, None)
        if pending is None:
            return
        self._release(pending, self._clock if now is None else now)
        if self._index is not None and pending.keys is not None and pending.receipt is not None:
            prior, before = pending.receipt
            depth = self._index.held_depth(pending.endpoint_id, prior, before)
            kept = pending.keys.ends[depth - 1] if depth else 0
            self._index.discard(pending.endpoint_id, pending.keys, kept, stamp=before)

    def _release(self, pending: _Pending, now: float) -> _EndpointState | None:
        state = self._states.get(pending.endpoint_id)
        if state is not None:
            if not pending.prefilled:
                pending.prefilled = True
                state.queue.prefilled(pending.work, now)
            state.queue.ended()
            state.kv.release(pending.kv_tokens, pending.kv_prefix)
        return state

    def _drop(self, handle: int) -> None:
        pending = self._pending.pop(handle)
        self._release(pending, self._clock)

    def _expire(self, now: float) -> None:
        # Callbacks that never came (a bug upstream, a lost task) must not hold work for ever.
        horizon = now - self._cfg.reservation_timeout
        while self._pending:
            handle, pending = next(iter(self._pending.items()))
            if pending.created >= horizon:
                break
            self._drop(handle)

    # -- hot prefixes and housekeeping -----------------------------------------------

    def hot_placements(self, now: float | None = None) -> list[HotPlacement]:
        """Where hot prefixes should be kept (pin them through LMCache); cold ones are omitted."""
        if self._hot is None:
            return []
        return self._hot.placements(self._clock if now is None else now)

    def forget_endpoint(self, endpoint_id: str) -> None:
        """An endpoint's engine restarted: its cache is empty (its learned speed still holds)."""
        if self._index is not None:
            self._index.forget(endpoint_id)

    def _note_down(self, endpoint_id: str, down: bool) -> None:
        # Seen going down at decision time (a drain, or health checks failing): its engine
        # may come back empty, so what this gateway believed it holds goes now, once.
        if down:
            self._down.add(endpoint_id)
            self.forget_endpoint(endpoint_id)
        else:
            self._down.discard(endpoint_id)

    def stats(self) -> RouterStats:
        return RouterStats(
            decisions=dict(self._decisions),
            pending=len(self._pending),
            index_entries=len(self._index) if self._index is not None else 0,
            hot_prefixes=len(self.hot_placements()),
            corrections=self._corrections,
            endpoints=tuple(
                LearnedCost(endpoint_id=e, prefill_tokens_per_second=1.0 / s.learner.per_token,
                            base_latency=s.learner.base, samples=s.learner.samples,
                            queued_seconds=s.queue.backlog(self._clock), outstanding=s.queue.outstanding)
                for e, s in sorted(self._states.items())),
        )
