from __future__ import annotations

import trio
import trio.testing

from pixiu_kv.filters.kvcache import HotnessTracker


def test_counts_within_sliding_window() -> None:
    hot = HotnessTracker(window=10.0, max_records=100, max_keys=10)
    assert [hot.record("k", t) for t in (0.0, 1.0, 2.0)] == [1, 2, 3]
    assert hot.count("k", 9.9) == 3
    assert hot.count("k", 10.5) == 2  # the access at 0.0 left the window
    assert hot.record("k", 20.0) == 1
    assert hot.count("other", 0.0) == 0


def test_records_per_key_are_capped() -> None:
    hot = HotnessTracker(window=100.0, max_records=3, max_keys=10)
    counts = [hot.record("k", float(t)) for t in range(10)]
    assert counts == [1, 2, 3, 3, 3, 3, 3, 3, 3, 3]


def test_keys_are_an_lru() -> None:
    hot = HotnessTracker(window=100.0, max_records=10, max_keys=2)
    hot.record("a", 0.0)
    hot.record("b", 0.0)
    hot.record("a", 1.0)  # "b" is least recently used now
    hot.record("c", 2.0)
    assert len(hot) == 2
    assert hot.count("b", 2.0) == 0
    assert hot.count("a", 2.0) == 2 and hot.count("c", 2.0) == 1


async def test_window_slides_on_the_trio_clock(autojump_clock: trio.testing.MockClock) -> None:
    hot = HotnessTracker(window=300.0, max_records=300, max_keys=10)
    for _ in range(5):
        hot.record("k", trio.current_time())
        await trio.sleep(60.0)
    # Accesses at t0, +60, ... +240; now it is t0 + 300: the first one left the window.
    assert hot.count("k", trio.current_time()) == 4
    await trio.sleep(240.0)
    assert hot.count("k", trio.current_time()) == 0
