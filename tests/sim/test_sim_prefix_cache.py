from __future__ import annotations

from pixiu_kv.sim.prefix_cache import PrefixCache, block_hashes

BLOCK = 16


def _prompt(length: int, salt: int = 0) -> list[int]:
    return [1000 + salt * 7919 + i for i in range(length)]


def _run(cache: PrefixCache, prompt: list[int], output: int = 0) -> int:
    """Allocate, prefill, release one request; returns its hit tokens."""
    hashes = block_hashes(prompt, BLOCK)
    allocation = cache.try_allocate(hashes, len(prompt), len(prompt) + output)
    assert allocation is not None
    cache.commit_prompt(allocation, hashes)
    cache.release(allocation)
    return allocation.hit_tokens


def test_hits_are_whole_blocks_and_never_the_last_prompt_token() -> None:
    cache = PrefixCache(1024, BLOCK)
    assert _run(cache, _prompt(64)) == 0
    # 64 tokens = 4 full blocks, but the last token must be computed: 3 blocks hit.
    assert _run(cache, _prompt(64)) == 48
    # A longer prompt sharing the 4 blocks hits all of them.
    assert _run(cache, [*_prompt(64), 7, 8, 9]) == 64
    # A partial trailing block is never cached.
    assert _run(cache, _prompt(70)) == 64


def test_divergent_prefix_stops_matching() -> None:
    cache = PrefixCache(1024, BLOCK)
    _run(cache, _prompt(64))
    other = _prompt(64)
    other[20] = 5  # second block differs
    assert _run(cache, other) == 16


def test_lru_eviction_under_capacity() -> None:
    cache = PrefixCache(8 * BLOCK, BLOCK)  # 8 blocks
    _run(cache, _prompt(65, salt=1))  # 4 full blocks + 1 partial, 4 stay cached
    _run(cache, _prompt(65, salt=2))
    assert cache.cached_blocks == 7  # 4 + 3: the first prompt's tail block was evicted first
    assert cache.evicted_blocks == 1
    assert _run(cache, _prompt(65, salt=1)) == 48  # its first 3 blocks survived
    assert cache.evicted_blocks >= 2


def test_blocks_of_a_running_request_are_not_evicted() -> None:
    cache = PrefixCache(8 * BLOCK, BLOCK)
    prompt = _prompt(64, salt=3)
    hashes = block_hashes(prompt, BLOCK)
    running = cache.try_allocate(hashes, 64, 64)
    assert running is not None
    cache.commit_prompt(running, hashes)
    assert cache.usage() == 0.5
    # Another request needs 5 blocks, only 4 free: it must wait, nothing is evicted.
    other = _prompt(80, salt=4)
    assert cache.try_allocate(block_hashes(other, BLOCK), 80, 80) is None
    assert cache.evicted_blocks == 0
    # A request sharing the running prefix reuses its blocks instead of needing new ones.
    shared = cache.try_allocate(hashes, 64, 64)
    assert shared is not None and shared.hit_tokens == 48
    cache.release(shared)
    cache.release(running)
    assert cache.usage() == 0.0
    assert cache.try_allocate(block_hashes(other, BLOCK), 80, 80) is not None


def test_reset_drops_unreferenced_blocks_only_when_idle() -> None:
    cache = PrefixCache(1024, BLOCK)
    _run(cache, _prompt(64))
    assert cache.reset()
    assert _run(cache, _prompt(64)) == 0
