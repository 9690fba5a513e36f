"""A minimal in-memory LMCache CPU tier: a set of chunk keys, no timing, no capacity.

It implements :class:`~pixiu_kv.sim.lmcache_link.WorkerControl` and reports what it
holds to a :class:`~pixiu_kv.sim.lmcache_link.ChunkSink`, so a controller (emulated or
real) can be exercised without a simulated engine. It records the control calls it got.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence

from pixiu_kv.sim.lmcache_link import CHUNK_SIZE, LOCATION, ChunkSink, chunk_keys

__all__ = ["MemoryTier"]


class MemoryTier:
    """Holds chunk keys in insertion order; ``calls`` keeps the last ``max_calls`` control calls."""

    def __init__(self, *, chunk_size: int = CHUNK_SIZE, max_calls: int = 1000) -> None:
        self._chunk_size = chunk_size
        self._keys: dict[int, None] = {}
        self._pinned: set[int] = set()
        self._compressed: set[int] = set()
        self._sink: ChunkSink | None = None
        self.health_code = 0
        self.calls: deque[tuple[str, ...]] = deque(maxlen=max_calls)

    def attach(self, sink: ChunkSink) -> None:
        """Report to ``sink`` from now on, starting with everything already held."""
        self._sink = sink
        if self._keys:
            sink.admit(list(self._keys))

    def store(self, tokens: Sequence[int]) -> int:
        """Hold the full chunks of ``tokens``; returns how many chunks were new."""
        new = [k for k in chunk_keys(tokens, self._chunk_size) if k not in self._keys]
        for key in new:
            self._keys[key] = None
        if new and self._sink is not None:
            self._sink.admit(new)
        return len(new)

    def holds(self, tokens: Sequence[int]) -> int:
        """Tokens of the longest held prefix of ``tokens``."""
        count = 0
        for key in chunk_keys(tokens, self._chunk_size):
            if key not in self._keys:
                break
            count += 1
        return count * self._chunk_size

    @property
    def keys(self) -> list[int]:
        return list(self._keys)

    def _drop(self, keys: Sequence[int]) -> None:
        for key in keys:
            self._keys.pop(key, None)
            self._pinned.discard(key)
            self._compressed.discard(key)
        if keys and self._sink is not None:
            self._sink.evict(keys)

    # -- WorkerControl --------------------------------------------------------------------

    def health(self) -> int:
        self.calls.append(("health",))
        return self.health_code

    def pin(self, tokens: Sequence[int], location: str) -> int:
        self.calls.append(("pin", location))
        held = self.holds(tokens)
        self._pinned.update(chunk_keys(tokens, self._chunk_size)[: held // self._chunk_size])
        return held

    def unpin(self, tokens: Sequence[int], location: str) -> int:
        self.calls.append(("unpin", location))
        held = self.holds(tokens)
        self._pinned.difference_update(chunk_keys(tokens, self._chunk_size))
        return held

    def compress(self, tokens: Sequence[int], method: str, location: str) -> int:
        self.calls.append(("compress", method, location))
        held = self.holds(tokens)
        self._compressed.update(chunk_keys(tokens, self._chunk_size)[: held // self._chunk_size])
        return held

    def decompress(self, tokens: Sequence[int], method: str, location: str) -> int:
        self.calls.append(("decompress", method, location))
        held = self.holds(tokens)
        self._compressed.difference_update(chunk_keys(tokens, self._chunk_size))
        return held

    def evict(self, tokens: Sequence[int]) -> int:
        self.calls.append(("evict",))
        gone = [k for k in chunk_keys(tokens, self._chunk_size) if k in self._keys]
        self._drop(gone)
        return len(gone) * self._chunk_size

    def clear(self, location: str) -> int:
        self.calls.append(("clear", location))
        if location != LOCATION:
            return 0
        gone = list(self._keys)
        self._drop(gone)
        return len(gone) * self._chunk_size

    @property
    def pinned_keys(self) -> frozenset[int]:
        return frozenset(self._pinned)

    @property
    def compressed_keys(self) -> frozenset[int]:
        return frozenset(self._compressed)
