"""The GPU KV cache with automatic prefix caching, block for block as vLLM keeps it.

The cache holds ``num_blocks`` blocks of ``block_size`` tokens. A full prompt block is
known by a hash chain over the block token ids. Blocks referenced by a running request
cannot be evicted; unreferenced cached blocks sit in an LRU queue and are reused
oldest first (a finished request frees its blocks tail first, so its prefix outlives
its suffix). Hits count whole blocks and never the last prompt token.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import attrs

__all__ = ["BlockAllocation", "PrefixCache", "block_hashes"]


def block_hashes(tokens: Sequence[int], block_size: int) -> list[int]:
    """Hash chain of the full blocks of ``tokens`` (in-process keys, like vLLM's)."""
    hashes: list[int] = []
    parent = 0
    for start in range(0, len(tokens) - block_size + 1, block_size):
        parent = hash((parent, tuple(tokens[start : start + block_size])))
        hashes.append(parent)
    return hashes


@attrs.define
class BlockAllocation:
    """The blocks one request holds: shared cached blocks and private (uncached) ones."""

    hit_tokens: int
    shared: list[int]
    """Hashes of cached blocks this request references, in prompt order."""
    private_blocks: int
    released: bool = False


class PrefixCache:
    """Block accounting and prefix matching for one engine's GPU KV cache."""

    def __init__(self, num_tokens: int, block_size: int) -> None:
        if num_tokens < block_size:
            raise ValueError("the GPU KV cache must hold at least one block")
        self.block_size = block_size
        self.num_blocks = num_tokens // block_size
        self._refs: dict[int, int] = {}
        """Cached block hash -> number of running requests using it."""
        self._free_cached: OrderedDict[int, None] = OrderedDict()
        """Cached blocks nobody uses, least recently freed first (evicted first)."""
        self._used_blocks = 0
        self.evicted_blocks = 0

    @property
    def used_blocks(self) -> int:
        return self._used_blocks

    @property
    def cached_blocks(self) -> int:
        return len(self._refs)

    def usage(self) -> float:
        return self._used_blocks / self.num_blocks

    def match(self, hashes: Sequence[int], prompt_len: int) -> int:
        """Cached blocks at the start of ``hashes``, capped below the last prompt token."""
        cap = max(prompt_len - 1, 0) // self.block_size
        matched = 0
        refs = self._refs
        for block_hash in hashes[:cap]:
            if block_hash not in refs:
                break
            matched += 1
        return matched

    def try_allocate(
        self, hashes: Sequence[int], prompt_len: int, total_tokens: int
    ) -> BlockAllocation | None:
        """Reserve blocks for ``total_tokens`` (prompt and output), reusing the cached prefix.

        ``None`` when the free blocks do not suffice now (the request must wait).
        """
        matched = self.match(hashes, prompt_len)
        shared = list(hashes[:matched])
        needed_blocks = -(-total_tokens // self.block_size)
        private = max(needed_blocks - matched, 0)
        revived = sum(1 for h in shared if self._refs[h] == 0)
        free = self.num_blocks - self._used_blocks
        if revived + private > free:
            return None
        for block_hash in shared:
            if self._refs[block_hash] == 0:
                del self._free_cached[block_hash]
            self._refs[block_hash] += 1
        self._used_blocks += revived
        self._take_private(private)
        return BlockAllocation(matched * self.block_size, shared, private)

    def _take_private(self, count: int) -> None:
        uncached_free = self.num_blocks - self._used_blocks - len(self._free_cached)
        shortfall = count - uncached_free
        while shortfall > 0:
            victim, _ = self._free_cached.popitem(last=False)
            del self._refs[victim]
            self.evicted_blocks += 1
            shortfall -= 1
        self._used_blocks += count

    def commit_prompt(self, allocation: BlockAllocation, hashes: Sequence[int]) -> None:
        """After prefill: the prompt's full blocks become cached (shareable) blocks."""
        for block_hash in hashes[len(allocation.shared) :]:
            if allocation.private_blocks == 0:
                break
            if block_hash in self._refs:
                # Another request computed the same block meanwhile; ours stays private.
                continue
            self._refs[block_hash] = 1
            allocation.shared.append(block_hash)
            allocation.private_blocks -= 1

    def release(self, allocation: BlockAllocation) -> None:
        if allocation.released:
            return
        allocation.released = True
        for block_hash in reversed(allocation.shared):
            count = self._refs[block_hash] - 1
            self._refs[block_hash] = count
            if count == 0:
                self._free_cached[block_hash] = None
                self._used_blocks -= 1
        self._used_blocks -= allocation.private_blocks

    def reset(self) -> bool:
        """Drop every unreferenced cached block; False (nothing done) while requests run."""
        if self._used_blocks:
            return False
        for block_hash in self._free_cached:
            del self._refs[block_hash]
        self._free_cached.clear()
        return True
