"""Hot prefixes: prompt prefixes too popular for one engine, placed on several.

A prefix is identified by the block key at the end of the deepest match a request finds
(the shared system prompt or document everyone's requests start with). Its popularity is
its share of recent requests (exponentially decayed over ``window`` seconds). One engine's
fair share of traffic is ``1 / n`` of it with ``n`` eligible engines; a prefix gets one
replica per ``threshold`` fair shares it draws: ``replicas = ceil(share x n / threshold)``.
Replicas are kept stable (added when popularity grows, the least loaded first; dropped
when it falls) so that pins through LMCache stay meaningful.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence

import attrs

from ._blocks import LMCACHE_CHUNK

__all__ = ["HotPlacement", "HotPrefixes"]


@attrs.frozen(slots=True)
class HotPlacement:
    """Keep ``tokens`` (a prompt prefix) cached on ``endpoint_id``: pin it through LMCache."""

    key: int
    endpoint_id: str
    tokens: tuple[int, ...] = attrs.field(repr=False)
    share: float

    @property
    def length(self) -> int:
        return len(self.tokens)

    def chunk_aligned(self, chunk_size: int = LMCACHE_CHUNK) -> tuple[int, ...]:
        """The prefix cut to whole LMCache chunks (only whole chunks are stored or pinned)."""
        return self.tokens[: len(self.tokens) // chunk_size * chunk_size]


@attrs.define(slots=True)
class _Heat:
    count: float
    since: float
    length: int
    # Set once the prefix is hot: its tokens (for pinning) and the engines chosen for it.
    tokens: tuple[int, ...] | None = None
    replicas: list[str] = attrs.field(factory=list)


class HotPrefixes:
    """Decayed request counts per prefix key, bounded; O(1) per request."""

    __slots__ = ("_hot", "_max_hot", "_max_tracked", "_min_requests", "_threshold", "_total",
                 "_total_since", "_tracked", "_window", "fleet_size")

    def __init__(self, *, window: float, threshold: float, min_requests: float, max_hot: int) -> None:
        self._window = window
        self._threshold = threshold
        self._min_requests = min_requests
        self._max_hot = max_hot
        self._max_tracked = max(64, 16 * max_hot)
        self._tracked: OrderedDict[int, _Heat] = OrderedDict()
        self._hot: set[int] = set()
        self._total = 0.0
        self._total_since = 0.0
        self.fleet_size = 1

    def _decay(self, since: float, now: float) -> float:
        return math.exp(-(now - since) / self._window) if now > since else 1.0

    def count_request(self, now: float) -> None:
        """Every routed request with tokens counts in the total (the share's denominator)."""
        # (_decay inlined here and in note: they run on every decision)
        since = self._total_since
        if now > since:
            self._total = self._total * math.exp(-(now - since) / self._window) + 1.0
            self._total_since = now
        else:
            self._total += 1.0

    def note(self, key: int, length: int, now: float) -> int:
        """A request uses prefix ``key`` of ``length`` tokens: replicas it should have now."""
        tracked = self._tracked
        heat = tracked.get(key)
        if heat is None:
            heat = _Heat(count=0.0, since=now, length=length)
            tracked[key] = heat
            if len(tracked) > self._max_tracked:
                old_key, _old = tracked.popitem(last=False)
                self._hot.discard(old_key)
        else:
            tracked.move_to_end(key)
        since = heat.since
        if now > since:
            heat.count = heat.count * math.exp(-(now - since) / self._window) + 1.0
            heat.since = now
        else:
            heat.count += 1.0
        # _wanted(heat, now), inlined: heat.since >= now here, so its count needs no decay.
        count = heat.count
        if count < self._min_requests:
            return 1
        since = self._total_since
        total = self._total * (math.exp(-(now - since) / self._window) if now > since else 1.0)
        share = min(count / total, 1.0) if total > 0 else 0.0
        n = self.fleet_size
        return max(1, min(n, math.ceil(share * n / self._threshold - 1e-9)))

    def _wanted(self, heat: _Heat, now: float) -> int:
        count = heat.count * self._decay(heat.since, now)
        if count < self._min_requests:
            return 1
        total = self._total * self._decay(self._total_since, now)
        share = min(count / total, 1.0) if total > 0 else 0.0
        n = self.fleet_size
        return max(1, min(n, math.ceil(share * n / self._threshold - 1e-9)))

    def current(self, key: int) -> list[str]:
        """The replicas a hot prefix has now (empty when it is not hot)."""
        heat = self._tracked.get(key)
        return heat.replicas if heat is not None and key in self._hot else []

    def is_hot(self, key: int) -> bool:
        return key in self._hot

    def share(self, key: int, now: float) -> float:
        heat = self._tracked.get(key)
        total = self._total * self._decay(self._total_since, now)
        if heat is None or total <= 0:
            return 0.0
        return min(heat.count * self._decay(heat.since, now) / total, 1.0)

    def replicas(self, key: int, wanted: int, tokens: Sequence[int], usable: Callable[[str], bool],
                 holders: Iterable[str], by_load: Callable[[], list[str]]) -> list[str]:
        """The engines that serve hot prefix ``key``: kept ones first, then real holders, then
        the least loaded (``by_load()``: usable engines, least loaded first), up to ``wanted``.
        Empty when the prefix is not hot. O(replicas) when nothing changes."""
        if wanted < 2:
            if key in self._hot:
                self._cool(key)
            return []
        heat = self._tracked.get(key)
        if heat is None:
            return []
        if key not in self._hot:
            if len(self._hot) >= self._max_hot:
                return []
            self._hot.add(key)
            heat.tokens = tuple(tokens[: heat.length])
        kept = heat.replicas
        if len(kept) >= wanted and all(usable(e) for e in kept[:wanted]):
            return kept[:wanted]
        chosen = [e for e in kept if usable(e)][:wanted]
        for endpoint_id in holders:
            if len(chosen) >= wanted:
                break
            if endpoint_id not in chosen and usable(endpoint_id):
                chosen.append(endpoint_id)
        if len(chosen) < wanted:
            chosen.extend([e for e in by_load() if e not in chosen][: wanted - len(chosen)])
        heat.replicas = chosen
        return chosen

    def _cool(self, key: int) -> None:
        self._hot.discard(key)
        heat = self._tracked.get(key)
        if heat is not None:
            heat.replicas = []
            heat.tokens = None

    def placements(self, now: float) -> list[HotPlacement]:
        """Where each currently hot prefix should be kept; cold ones are dropped here."""
        out: list[HotPlacement] = []
        for key in sorted(self._hot):
            heat = self._tracked[key]
            wanted = self._wanted(heat, now)
            if wanted < 2 or heat.tokens is None:
                self._cool(key)
                continue
            share = self.share(key, now)
            out.extend(HotPlacement(key=key, endpoint_id=e, tokens=heat.tokens, share=share)
                       for e in heat.replicas[:wanted])
        return out
