"""Which prompt prefixes each endpoint is believed to hold: a bounded LRU of block keys.

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

Invariant: each endpoint's set of held blocks is *prefix-closed* (holding a block implies
holding every block before it). ``record`` touches blocks deepest first and stamps a whole
prompt alike, so a prefix is always at least as recent as any of its extensions, in the
LRU order and in stamps; eviction by either drops extensions before their prefixes. Thanks
to it ``match`` finds an endpoint's depth by binary search: O(log blocks) lookups per
holder instead of a walk over every block.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Sequence

from ._blocks import BlockSchedule, PrefixKeys

__all__ = ["PrefixIndex"]

_UNKNOWN = math.inf


class PrefixIndex:
    """Bounded map: block key -> {endpoint id: insertion stamp}.

    * ``match(tokens)`` -> {endpoint id: matched tokens} (only endpoints matching > 0).
    * ``record(endpoint, tokens)`` -> the endpoint now holds the prompt's blocks.
    * ``observe(endpoint, tokens, cached_tokens)`` -> an engine's report of what it had.
    * ``forget(endpoint)`` -> the endpoint lost everything (restart, removal).

    ``tokens`` may be token ids or their :class:`PrefixKeys` (computed once, reused).
    ``lookups`` counts dictionary probes, so tests can check the cost without timing.
    """

    __slots__ = ("_capacity", "_default_capacity", "_entries", "_inserted", "_max_entries",
                 "_schedule", "lookups")

    def __init__(self, max_entries: int, schedule: BlockSchedule | None = None,
                 engine_cache_tokens: float = _UNKNOWN) -> None:
        if max_entries < 1 or not engine_cache_tokens > 0:
            raise ValueError("max_entries must be >= 1 and engine_cache_tokens > 0")
        self._max_entries = max_entries
        self._schedule = schedule or BlockSchedule()
        self._default_capacity = engine_cache_tokens
        self._entries: OrderedDict[int, dict[str, float]] = OrderedDict()
        self._inserted: dict[str, float] = {}
        self._capacity: dict[str, float] = {}
        self.lookups = 0

    def __len__(self) -> int:
        return len(self._entries)

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
        entries = self._entries
        self.lookups += 1
        first = entries.get(keys[0])
        if first is None:
            return {}
        matched: dict[str, int] = {}
        last = len(keys) - 1
        get = entries.get
        inserted = self._inserted
        capacity = self._capacity
        default = self._default_capacity
        probes = 0
        for endpoint_id, stamp in first.items():
            cutoff = inserted.get(endpoint_id, 0.0) - capacity.get(endpoint_id, default)  # _cutoff
            if stamp < cutoff:
                continue
            # Largest block index the endpoint holds; block lo is known held.
            lo, hi = 0, last
            while lo < hi:
                mid = (lo + hi + 1) // 2
                probes += 1
                entry = get(keys[mid])
                held = entry.get(endpoint_id) if entry is not None else None
                if held is not None and held >= cutoff:
                    lo = mid
                else:
                    hi = mid - 1
            matched[endpoint_id] = pk.ends[lo]
        self.lookups += probes
        return matched

    def stamps(self, endpoint_id: str, tokens: Sequence[int] | PrefixKeys) -> list[float | None]:
        """The endpoint's current stamp of each block of the prompt (None: no entry)."""
        pk = self.keys(tokens)
        self.lookups += len(pk.keys)
        out: list[float | None] = []
        for key in pk.keys:
            entry = self._entries.get(key)
            out.append(entry.get(endpoint_id) if entry is not None else None)
        return out

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
        entries = self._entries
        before = self._inserted.get(endpoint_id, 0.0)
        cutoff = before - self._capacity.get(endpoint_id, self._default_capacity)
        get = entries.get
        move_to_end = entries.move_to_end
        prior: list[float | None] = []
        append = prior.append
        # Deepest first: a prefix must end up at least as recent as its extensions.
        for key in reversed(keys):
            entry = get(key)
            if entry is None:
                entries[key] = {endpoint_id: before}
                append(None)
            else:
                move_to_end(key)
                append(entry.get(endpoint_id))
                entry[endpoint_id] = before
        prior.reverse()
        self.lookups += len(keys)
        # The endpoint's holdings are prefix-closed: when it held the deepest block it held
        # them all; otherwise the first block it lacked is found from the front.
        deepest = prior[-1] if prior else before
        if deepest is None or deepest < cutoff:
            missing = 0
            for stamp in prior:
                if stamp is None or stamp < cutoff:
                    break
                missing += 1
            self._inserted[endpoint_id] = before + pk.ends[-1] - (pk.ends[missing - 1] if missing else 0)
        while len(entries) > self._max_entries:
            entries.popitem(last=False)
        return prior, before

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

    def discard(self, endpoint_id: str, tokens: Sequence[int] | PrefixKeys, keep_tokens: int) -> int:
        """The endpoint does not hold the prompt beyond ``keep_tokens`` (a failed request)."""
        pk = self.keys(tokens)
        removed = 0
        for i in range(pk.block_at(keep_tokens) + 1, len(pk.keys)):
            self.lookups += 1
            entry = self._entries.get(pk.keys[i])
            if entry is not None and entry.pop(endpoint_id, None) is not None:
                removed += 1
                if not entry:
                    del self._entries[pk.keys[i]]
        return removed

    def forget(self, endpoint_id: str) -> int:
        """Drop everything the endpoint was believed to hold. O(entries): rare by nature."""
        removed = 0
        empty: list[int] = []
        for key, entry in self._entries.items():
            if entry.pop(endpoint_id, None) is not None:
                removed += 1
                if not entry:
                    empty.append(key)
        for key in empty:
            del self._entries[key]
        return removed
