"""Which prompt prefixes each endpoint is believed to hold: per endpoint, block key -> stamp.

The index is what this gateway *knows it sent*: every routed prompt is recorded on its
endpoint at decision time (so the next request of a burst already sees it), and engines'
own reports (``usage.prompt_tokens_details.cached_tokens``) correct it.

Engines' caches are LRU with a fixed capacity, and an LRU only evicts when something new
comes in: a block survives exactly as long as fewer than *capacity* new tokens were cached
after its last use. So each endpoint has an insertion counter (tokens it had to compute,
as far as this gateway knows) and each entry is stamped with that counter at its last use;
an entry is held while ``inserted - stamp <= capacity`` (its own tokens count). The
capacity is learned from the engines' reports: a block the engine lacked bounds it from
above, a block it still had bounds it from below (see :meth:`PrefixIndex.observe`).
Unknown capacity = unbounded.

The stamp is also the entry's recency, so no separate LRU order is kept: ``record`` is one
read and one write per block, looped in C (the extension's ``stamp``, else ``map`` and
``dict.update``), and the bound on entries is kept by compaction (the endpoint holding the
most entries loses at least its stalest half; see :meth:`PrefixIndex._compact`).

Invariant: each endpoint's set of held blocks is *prefix-closed* (holding a block implies
holding every block before it). ``record`` stamps a whole prompt alike, so a prefix's stamp
is never older than any of its extensions'; expiry (the capacity) and compaction both drop
the oldest stamps first, so they drop extensions before their prefixes. Thanks to it
``match`` finds an endpoint's depth by binary search: O(log blocks) lookups per holder
instead of a walk over every block.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Sequence
from itertools import repeat

from ._blocks import NATIVE_KEYS, BlockSchedule, PrefixKeys

# The C extension's copies of record's and match's loops (see _blockhash.c), when it is built
# and in use for keys (which tells that it loaded and agreed with pure Python at import).
_NATIVE = NATIVE_KEYS
if _NATIVE:
    from . import _blockhash

__all__ = ["PrefixIndex"]

_UNKNOWN = math.inf
# Compaction removes at least this share of the largest endpoint's entries (its stalest).
_COMPACT_SHARE = 0.5


class PrefixIndex:
    """Bounded map: endpoint id -> {block key: insertion stamp}.

    * ``match(tokens)`` -> {endpoint id: matched tokens} (only endpoints matching > 0).
    * ``record(endpoint, tokens)`` -> the endpoint now holds the prompt's blocks.
    * ``observe(endpoint, tokens, cached_tokens)`` -> an engine's report of what it had.
    * ``forget(endpoint)`` -> the endpoint lost everything (restart, removal).

    ``tokens`` may be token ids or their :class:`PrefixKeys` (computed once, reused).
    ``len(index)`` counts (endpoint, block) entries, bounded by ``max_entries``.
    ``lookups`` counts dictionary probes, so tests can check the cost without timing.
    """

    __slots__ = ("_capacity", "_default_capacity", "_held", "_inserted", "_max_entries",
                 "_schedule", "_size", "lookups")

    def __init__(self, max_entries: int, schedule: BlockSchedule | None = None,
                 engine_cache_tokens: float = _UNKNOWN) -> None:
        if max_entries < 1 or not engine_cache_tokens > 0:
            raise ValueError("max_entries must be >= 1 and engine_cache_tokens > 0")
        self._max_entries = max_entries
        self._schedule = schedule or BlockSchedule()
        self._default_capacity = engine_cache_tokens
        self._held: dict[str, dict[int, float]] = {}
        self._size = 0
        self._inserted: dict[str, float] = {}
        self._capacity: dict[str, float] = {}
        self.lookups = 0

    def __len__(self) -> int:
        return self._size

    @property
    def schedule(self) -> BlockSchedule:
        return self._schedule

    def keys(self, tokens: Sequence[int] | PrefixKeys) -> PrefixKeys:
        return tokens if isinstance(tokens, PrefixKeys) else self._schedule.keys(tokens)

    def capacity(self, endpoint_id: str) -> float:
        """The endpoint's learned cache capacity in tokens (``inf``: not known yet)."""
        return self._capacity.get(endpoint_id, self._default_capacity)

    def inserted(self, endpoint_id: str) -> float:
        """Tokens the endpoint had to compute so far, as far as this index knows."""
        return self._inserted.get(endpoint_id, 0.0)

    def _cutoff(self, endpoint_id: str) -> float:
        """Entries stamped below this are evicted from the endpoint's cache."""
        return self._inserted.get(endpoint_id, 0.0) - self._capacity.get(endpoint_id, self._default_capacity)

    # -- queries ---------------------------------------------------------------------

    def match(self, tokens: Sequence[int] | PrefixKeys) -> dict[str, int]:
        """Tokens of the prompt each endpoint holds (its deepest held block's end)."""
        pk = self.keys(tokens)
        keys = pk.keys
        if not keys:
            return {}
        if _NATIVE:
            found, probes = _blockhash.depths(self._held, keys, pk.ends, self._inserted, self._capacity,
                                           self._default_capacity)
            self.lookups += probes
            return found
        # The same loop as _blockhash.c's depths.
        matched: dict[str, int] = {}
        first = keys[0]
        last = len(keys) - 1
        inserted = self._inserted
        capacity = self._capacity
        default = self._default_capacity
        probes = 0
        # The depth found for the previous holder: holders of a shared prefix mostly hold
        # it to the same depth, which two probes confirm (a binary search takes log2(blocks)).
        hint = -1
        for endpoint_id, held in self._held.items():
            probes += 1
            stamp = held.get(first)
            if stamp is None:
                continue
            cutoff = inserted.get(endpoint_id, 0.0) - capacity.get(endpoint_id, default)  # _cutoff
            if stamp < cutoff:
                continue
            # Largest block index the endpoint holds; block lo is known held.
            lo, hi = 0, last
            if hint > 0:
                probes += 1
                stamp = held.get(keys[hint])
                if stamp is not None and stamp >= cutoff:
                    lo = hint
                    if hint < last:
                        probes += 1
                        stamp = held.get(keys[hint + 1])
                        if stamp is None or stamp < cutoff:
                            hi = hint
                        else:
                            lo = hint + 1
                else:
                    hi = hint - 1
            while lo < hi:
                mid = (lo + hi + 1) // 2
                probes += 1
                stamp = held.get(keys[mid])
                if stamp is not None and stamp >= cutoff:
                    lo = mid
                else:
                    hi = mid - 1
            matched[endpoint_id] = pk.ends[lo]
            hint = lo
        self.lookups += probes
        return matched

    def stamps(self, endpoint_id: str, tokens: Sequence[int] | PrefixKeys) -> list[float | None]:
        """The endpoint's current stamp of each block of the prompt (None: no entry)."""
        pk = self.keys(tokens)
        self.lookups += len(pk.keys)
        held = self._held.get(endpoint_id)
        if held is None:
            return [None] * len(pk.keys)
        return list(map(held.get, pk.keys))

    def held_depth(self, endpoint_id: str, stamps: Sequence[float | None],
                   inserted: float | None = None) -> int:
        """How many leading blocks were held, given their ``stamps`` and the endpoint's
        insertion counter at the time (default: now)."""
        if inserted is None:
            inserted = self.inserted(endpoint_id)
        cutoff = inserted - self.capacity(endpoint_id)
        for depth, stamp in enumerate(stamps):
            if stamp is None or stamp < cutoff:
                return depth
        return len(stamps)

    # -- updates ---------------------------------------------------------------------

    def record(self, endpoint_id: str, tokens: Sequence[int] | PrefixKeys
               ) -> tuple[list[float | None], float]:
        """The endpoint holds the prompt's blocks from now on.

        Returns each block's previous stamp for this endpoint (None: no entry) and the
        endpoint's insertion counter before this prompt: :meth:`observe` needs both later
        to tell what the engine was believed to hold.
        """
        pk = self.keys(tokens)
        keys = pk.keys
        held = self._held.get(endpoint_id)
        if held is None:
            held = self._held[endpoint_id] = {}
        before = self._inserted.get(endpoint_id, 0.0)
        # One stamp for the whole prompt: its prefixes are as recent as its extensions.
        prior: list[float | None]
        if _NATIVE:
            prior = _blockhash.stamp(held, keys, before)
        else:  # what _blockhash.c's stamp does
            prior = list(map(held.get, keys))
            held.update(zip(keys, repeat(before)))
        self.lookups += len(keys)
        self._size += prior.count(None)
        # The endpoint's holdings are prefix-closed: when it held the deepest block it held
        # them all; otherwise the first block it lacked is found by binary search (along a
        # prompt, stamps never grow and missing entries are a tail).
        cutoff = before - self._capacity.get(endpoint_id, self._default_capacity)
        deepest = prior[-1] if prior else before
        if deepest is None or deepest < cutoff:
            lo, hi = 0, len(prior) - 1  # the first block lacked is in [lo, hi]
            while lo < hi:
                mid = (lo + hi) // 2
                stamp = prior[mid]
                if stamp is None or stamp < cutoff:
                    hi = mid
                else:
                    lo = mid + 1
            self._inserted[endpoint_id] = before + pk.ends[-1] - (pk.ends[lo - 1] if lo else 0)
        if self._size > self._max_entries:
            self._compact()
        return prior, before

    def _compact(self) -> None:
        """Bring the entries back under the bound: the endpoint holding the most loses the
        entries its cache no longer holds and its stalest, at least ``_COMPACT_SHARE`` of
        them (repeated while the bound does not hold).

        Stalest = stamped longest ago by that endpoint's counter (the tokens it computed
        since). Whole stamps go at once, so a prefix never goes before its extensions, and
        the newest stamp (the latest prompt, with its prefix) goes only when it is all the
        endpoint holds. O(entries of that endpoint), once per ``_COMPACT_SHARE`` of them
        inserted.
        """
        while self._size > self._max_entries:
            endpoint_id, held = max(self._held.items(), key=lambda item: len(item[1]))
            drop = min(len(held), max(self._size - self._max_entries,
                                      math.ceil(len(held) * _COMPACT_SHARE)))
            ordered = sorted(held.values())
            threshold = ordered[drop - 1]  # entries stamped at or before it go
            newest = ordered[-1]
            if threshold >= newest:
                older = bisect.bisect_left(ordered, newest)
                threshold = ordered[older - 1] if older else newest
            cutoff = self._cutoff(endpoint_id)
            kept = {key: stamp for key, stamp in held.items() if stamp > threshold and stamp >= cutoff}
            self._size -= len(held) - len(kept)
            if kept:
                self._held[endpoint_id] = kept
            else:
                del self._held[endpoint_id]

    def observe(self, endpoint_id: str, tokens: Sequence[int] | PrefixKeys, cached_tokens: int, *,
                receipt: tuple[Sequence[float | None], float] | None = None) -> bool:
        """An engine reports it had ``cached_tokens`` of this prompt before serving it.

        ``receipt`` is what :meth:`record` returned when the request was routed (the prompt
        is already recorded); without it the index's current state is the belief and the
        prompt is recorded now. The deepest block the engine still had bounds its capacity
        from below (it survived that many newer tokens), the first block it lacked bounds
        it from above. The prompt itself stays recorded in full: the engine just computed
        it (trimming it would lose the affinity of the conversation's next turn). Returns
        True when the engine had less than believed.
        """
        pk = self.keys(tokens)
        if receipt is None:
            prior: Sequence[float | None] = self.stamps(endpoint_id, pk)
            before = self.inserted(endpoint_id)
        else:
            prior, before = receipt
        believed_depth = self.held_depth(endpoint_id, prior, before)
        believed = pk.ends[believed_depth - 1] if believed_depth else 0
        # vLLM recomputes a prompt's last token even when all of it is cached, so a report of
        # every whole block but the one holding the last token confirms the whole prompt.
        block = self._schedule.block_size
        confirmed = pk.length if cached_tokens >= (pk.length - 1) // block * block else cached_tokens
        # A block survived (or not) every token inserted since its stamp, its own included.
        capacity = self.capacity(endpoint_id)
        lower = upper = None
        for i, stamp in enumerate(prior):
            if stamp is None:
                break
            if pk.ends[i] <= confirmed:
                lower = before - stamp
            else:
                upper = before - stamp
                break
        if lower is not None and lower > capacity:
            capacity = lower
        if upper is not None and upper <= capacity:
            capacity = max(upper - block, lower if lower is not None else 0.0, float(block))
            if math.isfinite(self._default_capacity):
                # A configured size is the operator's fact: a miss below it comes from the
                # blocks running requests occupy, or from traffic this gateway does not see,
                # not from a smaller cache. Learning it down made a saturated fleet forget
                # conversations it still held and scatter their next turns.
                capacity = max(capacity, self._default_capacity)
        if capacity != self.capacity(endpoint_id):
            self._capacity[endpoint_id] = capacity
        evicted = believed > confirmed
        if receipt is None:
            self.record(endpoint_id, pk)  # counts what the engine computed again
        elif confirmed != believed:
            # The routing-time record counted what was believed missing as inserted: the
            # engine computed again what it had lost beyond that, and not what it still had.
            held = min(confirmed, pk.ends[-1] if pk.ends else 0)
            self._inserted[endpoint_id] = max(0.0, self.inserted(endpoint_id) + believed - held)
        return evicted

    def discard(self, endpoint_id: str, tokens: Sequence[int] | PrefixKeys, keep_tokens: int,
                stamp: float | None = None) -> int:
        """The endpoint does not hold the prompt beyond ``keep_tokens`` (a failed request).

        ``stamp``: the one its :meth:`record` gave (the receipt's insertion counter): then
        only blocks still carrying it go; a block another request recorded since (sharing
        the prefix, on the same endpoint) stays, as do that request's deeper blocks.
        """
        pk = self.keys(tokens)
        held = self._held.get(endpoint_id)
        if held is None:
            return 0
        removed = 0
        for key in pk.keys[pk.block_at(keep_tokens) + 1:]:
            self.lookups += 1
            current = held.get(key)
            if current is not None and (stamp is None or current == stamp):
                del held[key]
                removed += 1
        self._size -= removed
        if not held:
            del self._held[endpoint_id]
        return removed

    def forget(self, endpoint_id: str) -> int:
        """Drop everything the endpoint was believed to hold."""
        held = self._held.pop(endpoint_id, None)
        if held is None:
            return 0
        self._size -= len(held)
        return len(held)
