"""Which prompt prefixes each endpoint is believed to hold: a bounded LRU of block keys.

The index is what this gateway *knows it sent*: every routed prompt is recorded on its
endpoint at decision time (so the next request of a burst already sees it), and engines'
own reports (``usage.prompt_tokens_details.cached_tokens``) correct it.

Invariant: each endpoint's set of held blocks is *prefix-closed* (holding a block implies
holding every block before it). ``record`` touches blocks deepest first, so a prefix is
always at least as recent as any of its extensions, both in the LRU order and in the
per-endpoint last-use times; LRU eviction, TTL expiry and eviction watermarks therefore
drop extensions before their prefixes. Thanks to it ``match`` finds an endpoint's depth by
binary search: O(log blocks) lookups per holder instead of a walk over every block.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

from ._blocks import BlockSchedule, PrefixKeys

__all__ = ["PrefixIndex"]

_NEVER = float("-inf")


class PrefixIndex:
    """Bounded map: block key -> {endpoint id: last use}. All times come from the caller.

    * ``match(tokens)`` -> {endpoint id: matched tokens} (only endpoints matching > 0).
    * ``record(endpoint, tokens)`` -> the endpoint now holds the prompt's blocks.
    * ``observe(endpoint, tokens, cached_tokens)`` -> an engine's report of what it had.
    * ``forget(endpoint)`` -> the endpoint lost everything (restart, removal).

    ``tokens`` may be token ids or their :class:`PrefixKeys` (computed once, reused).
    ``lookups`` counts dictionary probes, so tests can check the cost without timing.
    """

    __slots__ = ("_clock", "_entries", "_max_entries", "_schedule", "_ttl", "_watermark", "lookups")

    def __init__(self, max_entries: int, schedule: BlockSchedule | None = None,
                 ttl: float = float("inf")) -> None:
        if max_entries < 1 or not ttl > 0:
            raise ValueError("max_entries must be >= 1 and ttl > 0")
        self._max_entries = max_entries
        self._schedule = schedule or BlockSchedule()
        self._ttl = ttl
        self._entries: OrderedDict[int, dict[str, float]] = OrderedDict()
        # Per endpoint: entries last used at or before this time are gone from its cache.
        self._watermark: dict[str, float] = {}
        self._clock = 0.0
        self.lookups = 0

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def schedule(self) -> BlockSchedule:
        return self._schedule

    def keys(self, tokens: Sequence[int] | PrefixKeys) -> PrefixKeys:
        return tokens if isinstance(tokens, PrefixKeys) else self._schedule.keys(tokens)

    def _now(self, now: float | None) -> float:
        if now is not None and now > self._clock:
            self._clock = now
        return self._clock

    def _cutoff(self, endpoint_id: str, now: float) -> float:
        return max(self._watermark.get(endpoint_id, _NEVER), now - self._ttl)

    # -- queries ---------------------------------------------------------------------

    def match(self, tokens: Sequence[int] | PrefixKeys, now: float | None = None) -> dict[str, int]:
        """Tokens of the prompt each endpoint holds (its deepest held block's end)."""
        pk = self.keys(tokens)
        keys = pk.keys
        if not keys:
            return {}
        now = self._now(now)
        entries = self._entries
        self.lookups += 1
        first = entries.get(keys[0])
        if first is None:
            return {}
        matched: dict[str, int] = {}
        last = len(keys) - 1
        for endpoint_id, used in first.items():
            cutoff = self._cutoff(endpoint_id, now)
            if used <= cutoff:
                continue
            # Largest block index the endpoint holds; block lo is known held.
            lo, hi = 0, last
            while lo < hi:
                mid = (lo + hi + 1) // 2
                self.lookups += 1
                entry = entries.get(keys[mid])
                held = entry.get(endpoint_id) if entry is not None else None
                if held is not None and held > cutoff:
                    lo = mid
                else:
                    hi = mid - 1
            matched[endpoint_id] = pk.ends[lo]
        return matched

    def held_uses(self, endpoint_id: str, tokens: Sequence[int] | PrefixKeys,
                  now: float | None = None) -> list[float | None]:
        """Last-use times of the leading blocks the endpoint holds (prefix order)."""
        pk = self.keys(tokens)
        cutoff = self._cutoff(endpoint_id, self._now(now))
        uses: list[float | None] = []
        for key in pk.keys:
            self.lookups += 1
            entry = self._entries.get(key)
            used = entry.get(endpoint_id) if entry is not None else None
            if used is None or used <= cutoff:
                break
            uses.append(used)
        return uses

    # -- updates ---------------------------------------------------------------------

    def record(self, endpoint_id: str, tokens: Sequence[int] | PrefixKeys,
               now: float | None = None) -> list[float | None]:
        """The endpoint holds the prompt's blocks from now on.

        Returns each block's previous last use by this endpoint (None: not held), which
        :meth:`observe` needs later to tell how old an evicted block was.
        """
        pk = self.keys(tokens)
        keys = pk.keys
        now = self._now(now)
        entries = self._entries
        get = entries.get
        move_to_end = entries.move_to_end
        prior: list[float | None] = []
        append = prior.append
        # Deepest first: a prefix must end up at least as recent as its extensions.
        for key in reversed(keys):
            entry = get(key)
            if entry is None:
                entries[key] = {endpoint_id: now}
                append(None)
            else:
                move_to_end(key)
                append(entry.get(endpoint_id))
                entry[endpoint_id] = now
        self.lookups += len(keys)
        while len(entries) > self._max_entries:
            entries.popitem(last=False)
        prior.reverse()
        return prior

    def held_depth(self, endpoint_id: str, uses: Sequence[float | None], now: float | None = None) -> int:
        """How many leading blocks of ``uses`` (as :meth:`record` returned) were held."""
        cutoff = self._cutoff(endpoint_id, self._now(now))
        for depth, used in enumerate(uses):
            if used is None or used <= cutoff:
                return depth
        return len(uses)

    def observe(self, endpoint_id: str, tokens: Sequence[int] | PrefixKeys, cached_tokens: int,
                now: float | None = None, *, prior: Sequence[float | None] | None = None) -> bool:
        """An engine reports it had ``cached_tokens`` of this prompt before serving it.

        Fewer than we believed means it evicted the first block it lacked, and with it,
        being LRU, everything of it we last used no later than that block: the endpoint's
        eviction watermark moves up to that block's last use. The prompt itself is then
        recorded again, since the engine just computed it (trimming it would lose the
        affinity of the conversation's next turn). ``prior`` is what :meth:`record`
        returned when the request was routed (the index has been refreshed since); without
        it the index's current state is the belief. Returns True when a correction was made.
        """
        pk = self.keys(tokens)
        now = self._now(now)
        uses = prior if prior is not None else self.held_uses(endpoint_id, pk, now)
        uses = uses[: self.held_depth(endpoint_id, uses, now)]
        corrected = False
        # vLLM recomputes a prompt's last token even when fully cached, so a report up to one
        # base block short of the belief is no evidence of eviction.
        confirmed = cached_tokens + self._schedule.block_size
        for i, used in enumerate(uses):
            if used is not None and pk.ends[i] > confirmed:
                if used > self._watermark.get(endpoint_id, _NEVER):
                    self._watermark[endpoint_id] = used
                corrected = True
                break
        self.record(endpoint_id, pk, now)
        return corrected

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
        self._watermark.pop(endpoint_id, None)
        return removed
