from __future__ import annotations

import pytest
import trio
import trio.testing

from pixiu_kv.filters.kvcache import TokenCache, TokenSeq


def seq(*ids: int) -> TokenSeq:
    return TokenSeq.from_ids(ids)


def test_token_seq_is_compact_json() -> None:
    s = seq(1, 22, 333)
    assert s.count == 3 and s.json == b"[1,22,333]" and s.ids() == [1, 22, 333]


def test_hit_and_miss_counted() -> None:
    cache = TokenCache(max_size=4, ttl=0)
    assert cache.get("a", 0.0) is None
    cache.put("a", seq(1), 0.0)
    assert cache.get("a", 1e9) == seq(1)  # ttl 0: never expires
    assert (cache.hits, cache.misses) == (1, 1)


def test_ttl_expires_and_sweeps_without_lookup_of_the_key() -> None:
    cache = TokenCache(max_size=10, ttl=10.0)
    cache.put("a", seq(1), 0.0)
    cache.put("b", seq(2), 5.0)
    assert cache.get("a", 9.9) == seq(1)
    # Reading "b" at 10.0 sweeps "a" (expired at 10.0) although "a" was used recently.
    assert cache.get("b", 10.0) == seq(2)
    assert len(cache) == 1
    assert cache.get("a", 10.0) is None
    assert cache.get("b", 15.0) is None
    assert len(cache) == 0 and cache.bytes == 0


def test_put_refreshes_expiry() -> None:
    cache = TokenCache(max_size=10, ttl=10.0)
    cache.put("a", seq(1), 0.0)
    cache.put("a", seq(1, 2), 8.0)
    assert cache.get("a", 15.0) == seq(1, 2)
    assert len(cache) == 1


def test_lru_evicts_least_recently_used() -> None:
    cache = TokenCache(max_size=2, ttl=0)
    cache.put("a", seq(1), 0.0)
    cache.put("b", seq(2), 0.0)
    assert cache.get("a", 0.0) is not None  # "b" is now the least recently used
    cache.put("c", seq(3), 0.0)
    assert cache.peek("b", 0.0) is None
    assert cache.peek("a", 0.0) == seq(1) and cache.peek("c", 0.0) == seq(3)
    assert len(cache) == 2


def test_byte_budget_bounds_total_size() -> None:
    cache = TokenCache(max_size=100, ttl=0, max_bytes=20)
    cache.put("a", seq(1, 2, 3), 0.0)  # 7 bytes
    cache.put("b", seq(4, 5, 6), 0.0)  # 7 bytes
    cache.put("c", seq(7, 8, 9), 0.0)  # 21 > 20: "a" goes
    assert cache.peek("a", 0.0) is None and len(cache) == 2 and cache.bytes == 14
    cache.put("huge", seq(*range(100)), 0.0)  # larger than the budget: not cached at all
    assert cache.peek("huge", 0.0) is None and len(cache) == 2


def test_peek_does_not_count_or_reorder() -> None:
    cache = TokenCache(max_size=2, ttl=0)
    cache.put("a", seq(1), 0.0)
    cache.put("b", seq(2), 0.0)
    assert cache.peek("a", 0.0) == seq(1)
    cache.put("c", seq(3), 0.0)
    assert cache.peek("a", 0.0) is None
    assert cache.hits == 0 and cache.misses == 0


def test_invalid_bounds_rejected() -> None:
    with pytest.raises(ValueError):
        TokenCache(max_size=0, ttl=1.0)
    with pytest.raises(ValueError):
        TokenCache(max_size=1, ttl=-1.0)


async def test_ttl_on_the_trio_clock(autojump_clock: trio.testing.MockClock) -> None:
    cache = TokenCache(max_size=10, ttl=600.0)
    cache.put("a", seq(1), trio.current_time())
    await trio.sleep(599.0)
    assert cache.get("a", trio.current_time()) == seq(1)  # reading does not extend the TTL
    await trio.sleep(1.0)
    assert cache.get("a", trio.current_time()) is None and len(cache) == 0
