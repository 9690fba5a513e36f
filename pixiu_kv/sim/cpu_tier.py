"""The LMCache CPU tier of one engine: full 256-token chunks in an LRU, reported to a controller.

Chunks are known by the controller's prefix-chain keys (:func:`lmcache_link.chunk_keys`),
so what the tier reports is exactly what a controller lookup of the same tokens asks
for. The tier implements :class:`lmcache_link.WorkerControl`: a controller may pin
(exempt from eviction), compress (half the room, slower to load), decompress, evict
and clear.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import attrs

from .lmcache_link import CHUNK_SIZE, LOCATION, ChunkSink, chunk_keys

__all__ = ["CpuTier", "NullChunkSink", "TierMatch"]


class NullChunkSink:
    """Reports to nobody: an engine without a controller."""

    def admit(self, keys: Sequence[int]) -> None:
        pass

    def evict(self, keys: Sequence[int]) -> None:
        pass


@attrs.define
class _Chunk:
    pinned: bool = False
    compressed: bool = False


@attrs.frozen
class TierMatch:
    """The chunks at the start of a prompt that the tier holds."""

    chunks: int
    compressed_chunks: int


class CpuTier:
    """An LRU of chunk keys with a token capacity. Not thread-safe: call it from trio."""

    def __init__(
        self,
        capacity_tokens: int,
        sink: ChunkSink | None = None,
        *,
        chunk_size: int = CHUNK_SIZE,
        compression_ratio: float = 2.0,
    ) -> None:
        if capacity_tokens < 0 or chunk_size <= 0 or compression_ratio <= 0:
            raise ValueError("capacity must be >= 0, chunk size and compression ratio > 0")
        self.capacity_tokens = capacity_tokens
        self.chunk_size = chunk_size
        self._compressed_cost = max(1, round(chunk_size / compression_ratio))
        self._chunks: OrderedDict[int, _Chunk] = OrderedDict()
        self._used = 0
        self._sink: ChunkSink = sink if sink is not None else NullChunkSink()
        self.error_code = 0
        """What :meth:`health` reports; the engine sets it when faulted dead."""
        self.admitted_total = 0
        self.evicted_total = 0

    # -- engine side --------------------------------------------------------------

    @property
    def enabled(self) -> bool:
        return self.capacity_tokens >= self.chunk_size

    @property
    def used_tokens(self) -> int:
        return self._used

    def __len__(self) -> int:
        return len(self._chunks)

    def __contains__(self, key: object) -> bool:
        return key in self._chunks

    def keys(self) -> list[int]:
        return list(self._chunks)

    def is_compressed(self, key: int) -> bool:
        chunk = self._chunks.get(key)
        return chunk is not None and chunk.compressed

    def is_pinned(self, key: int) -> bool:
        chunk = self._chunks.get(key)
        return chunk is not None and chunk.pinned

    def attach_sink(self, sink: ChunkSink) -> None:
        """Report to ``sink`` from now on; it first learns every chunk already held."""
        self._sink = sink
        if self._chunks:
            sink.admit(list(self._chunks))

    def held_prefix(self, keys: Sequence[int]) -> int:
        """How many leading chunks of ``keys`` are held here, without touching their recency
        (what a router or the controller's lookup sees; :meth:`match` is the engine's use)."""
        chunks = 0
        for key in keys:
            if key not in self._chunks:
                break
            chunks += 1
        return chunks

    def match(self, keys: Sequence[int]) -> TierMatch:
        """The leading chunks of ``keys`` held here; they become most recently used."""
        chunks = 0
        compressed = 0
        for key in keys:
            chunk = self._chunks.get(key)
            if chunk is None:
                break
            self._chunks.move_to_end(key)
            chunks += 1
            compressed += chunk.compressed
        return TierMatch(chunks, compressed)

    def store(self, keys: Sequence[int]) -> None:
        """Keep the chunks of a prefilled prompt, evicting unpinned chunks LRU first."""
        if not self.enabled:
            return
        admitted: list[int] = []
        evicted: list[int] = []
        for key in keys:
            if key in self._chunks:
                self._chunks.move_to_end(key)
                continue
            if not self._make_room(self.chunk_size, evicted, keep=None):
                break  # everything left is pinned: later chunks would be useless anyway
            self._chunks[key] = _Chunk()
            self._used += self.chunk_size
            admitted.append(key)
        self._report(admitted, evicted)

    def _cost(self, chunk: _Chunk) -> int:
        return self._compressed_cost if chunk.compressed else self.chunk_size

    def _make_room(self, need: int, evicted: list[int], keep: set[int] | None) -> bool:
        if self._used + need <= self.capacity_tokens:
            return True
        victims: list[int] = []
        freed = 0
        for key, chunk in self._chunks.items():
            if chunk.pinned or (keep is not None and key in keep):
                continue
            victims.append(key)
            freed += self._cost(chunk)
            if self._used - freed + need <= self.capacity_tokens:
                break
        if self._used - freed + need > self.capacity_tokens:
            return False
        for key in victims:
            self._used -= self._cost(self._chunks.pop(key))
        evicted.extend(victims)
        return True

    def _report(self, admitted: list[int], evicted: list[int]) -> None:
        if evicted:
            self.evicted_total += len(evicted)
            self._sink.evict(evicted)
        if admitted:
            self.admitted_total += len(admitted)
            self._sink.admit(admitted)

    def _held(self, tokens: Sequence[int]) -> list[int]:
        return [key for key in chunk_keys(tokens, self.chunk_size) if key in self._chunks]

    # -- WorkerControl ---------------------------------------------------------------

    def health(self) -> int:
        return self.error_code

    def pin(self, tokens: Sequence[int], location: str) -> int:
        if location != LOCATION:
            return 0
        held = self._held(tokens)
        for key in held:
            self._chunks[key].pinned = True
        return len(held) * self.chunk_size

    def unpin(self, tokens: Sequence[int], location: str) -> int:
        if location != LOCATION:
            return 0
        held = self._held(tokens)
        for key in held:
            self._chunks[key].pinned = False
        return len(held) * self.chunk_size

    def compress(self, tokens: Sequence[int], method: str, location: str) -> int:
        if location != LOCATION:
            return 0
        held = self._held(tokens)
        for key in held:
            chunk = self._chunks[key]
            if not chunk.compressed:
                chunk.compressed = True
                self._used -= self.chunk_size - self._compressed_cost
        return len(held) * self.chunk_size

    def decompress(self, tokens: Sequence[int], method: str, location: str) -> int:
        if location != LOCATION:
            return 0
        held = self._held(tokens)
        keep = set(held)
        evicted: list[int] = []
        done = 0
        for key in held:
            chunk = self._chunks.get(key)
            if chunk is None or not chunk.compressed:
                done += chunk is not None
                continue
            if not self._make_room(self.chunk_size - self._compressed_cost, evicted, keep):
                break
            chunk.compressed = False
            self._used += self.chunk_size - self._compressed_cost
            done += 1
        self._report([], evicted)
        return done * self.chunk_size

    def evict(self, tokens: Sequence[int]) -> int:
        held = self._held(tokens)
        for key in held:
            self._used -= self._cost(self._chunks.pop(key))
        self._report([], held)
        return len(held) * self.chunk_size

    def clear(self, location: str) -> int:
        if location != LOCATION:
            return 0
        dropped = list(self._chunks)
        self._chunks.clear()
        self._used = 0
        self._report([], dropped)
        return len(dropped) * self.chunk_size
