from __future__ import annotations

from sim_helpers import RecordingSink

from pixiu_kv.sim.cpu_tier import CpuTier
from pixiu_kv.sim.lmcache_link import CHUNK_SIZE, LOCATION, chunk_keys


def _tokens(chunks: int, salt: int = 0, extra: int = 10) -> list[int]:
    return [300 + salt * 104729 + i for i in range(chunks * CHUNK_SIZE + extra)]


def test_reports_exact_chunk_keys_to_the_sink(sink: RecordingSink) -> None:
    tier = CpuTier(8 * CHUNK_SIZE, sink)
    tokens = _tokens(3)
    tier.store(chunk_keys(tokens))
    assert sink.admitted == chunk_keys(tokens)
    assert len(sink.admitted) == 3  # the trailing partial chunk has no key
    assert tier.match(chunk_keys(tokens)).chunks == 3


def test_held_prefix_counts_leading_chunks_without_touching_recency(sink: RecordingSink) -> None:
    tier = CpuTier(4 * CHUNK_SIZE, sink)
    first, second = _tokens(2, salt=1), _tokens(2, salt=2)
    tier.store(chunk_keys(first))
    tier.store(chunk_keys(second))
    assert tier.held_prefix(chunk_keys(first)) == 2
    assert tier.held_prefix(chunk_keys(_tokens(3, salt=1))) == 2  # a longer prompt, same start
    # Looking did not make `first` recent: the next store evicts it, not `second`.
    tier.store(chunk_keys(_tokens(1, salt=3)))
    assert tier.held_prefix(chunk_keys(first)) == 0
    assert tier.held_prefix(chunk_keys(second)) == 2


def test_lru_eviction_is_reported(sink: RecordingSink) -> None:
    tier = CpuTier(4 * CHUNK_SIZE, sink)
    first, second = _tokens(3, salt=1), _tokens(3, salt=2)
    tier.store(chunk_keys(first))
    tier.store(chunk_keys(second))
    assert sink.evicted == chunk_keys(first)[:2]
    assert sink.held() == set(tier.keys())
    assert tier.used_tokens == 4 * CHUNK_SIZE


def test_pinned_chunks_survive_pressure(sink: RecordingSink) -> None:
    tier = CpuTier(4 * CHUNK_SIZE, sink)
    hot = _tokens(2, salt=1)
    tier.store(chunk_keys(hot))
    assert tier.pin(hot, LOCATION) == 2 * CHUNK_SIZE
    for salt in range(2, 6):
        tier.store(chunk_keys(_tokens(2, salt=salt)))
    assert tier.match(chunk_keys(hot)).chunks == 2
    assert not set(chunk_keys(hot)) & set(sink.evicted)
    assert tier.unpin(hot, LOCATION) == 2 * CHUNK_SIZE
    tier.store(chunk_keys(_tokens(4, salt=9)))
    assert tier.match(chunk_keys(hot)).chunks == 0


def test_everything_pinned_stops_admission(sink: RecordingSink) -> None:
    tier = CpuTier(2 * CHUNK_SIZE, sink)
    hot = _tokens(2, salt=1)
    tier.store(chunk_keys(hot))
    tier.pin(hot, LOCATION)
    tier.store(chunk_keys(_tokens(2, salt=2)))
    assert sink.admitted == chunk_keys(hot)
    assert sink.evicted == []


def test_compression_doubles_room_and_decompress_restores(sink: RecordingSink) -> None:
    tier = CpuTier(4 * CHUNK_SIZE, sink, compression_ratio=2.0)
    a = _tokens(4, salt=1)
    tier.store(chunk_keys(a))
    assert tier.compress(a, "cachegen", LOCATION) == 4 * CHUNK_SIZE
    assert tier.used_tokens == 2 * CHUNK_SIZE
    assert all(tier.is_compressed(k) for k in chunk_keys(a))
    b = _tokens(2, salt=2)
    tier.store(chunk_keys(b))
    assert sink.evicted == []  # fits thanks to compression
    assert tier.decompress(a, "cachegen", LOCATION) > 0
    assert tier.used_tokens <= 4 * CHUNK_SIZE
    assert set(sink.evicted) == set(chunk_keys(b))  # decompressing made room by evicting b


def test_evict_clear_and_health(sink: RecordingSink) -> None:
    tier = CpuTier(8 * CHUNK_SIZE, sink)
    a, b = _tokens(2, salt=1), _tokens(3, salt=2)
    tier.store(chunk_keys(a))
    tier.store(chunk_keys(b))
    assert tier.evict(a) == 2 * CHUNK_SIZE
    assert sink.evicted == chunk_keys(a)
    assert tier.pin(b, "OtherBackend") == 0
    assert tier.clear(LOCATION) == 3 * CHUNK_SIZE
    assert len(tier) == 0 and tier.used_tokens == 0
    assert sink.held() == set()
    assert tier.health() == 0


def test_attaching_a_sink_replays_held_chunks(sink: RecordingSink) -> None:
    tier = CpuTier(8 * CHUNK_SIZE)
    tier.store(chunk_keys(_tokens(2)))
    tier.attach_sink(sink)
    assert sink.admitted == chunk_keys(_tokens(2))
