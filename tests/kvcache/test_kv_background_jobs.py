from __future__ import annotations

from typing import Any

import pytest
import trio
import trio.testing

from pixiu_kv.filters.kvcache.background import BackgroundJobs
from pixiu_kv.filters.kvcache.singleflight import SingleFlight
from pixiu_kv.filters.kvcache.stats import KvCacheStats


def spawner(nursery: trio.Nursery) -> Any:
    async def spawn(fn: Any, *args: Any) -> bool:
        nursery.start_soon(fn, *args)
        return True
    return spawn


async def test_excess_jobs_are_dropped_and_counted_never_queued() -> None:
    stats = KvCacheStats()
    jobs = BackgroundJobs(limit=3, stats=stats)
    gate = trio.Event()
    async with trio.open_nursery() as nursery:
        started = [await jobs.start(spawner(nursery), gate.wait) for _ in range(5)]
        assert started == [True, True, True, False, False]
        assert jobs.running == 3 and stats.background_dropped == 2
        gate.set()
    assert jobs.running == 0 and stats.background_finished == 3
    # Slots are free again.
    async with trio.open_nursery() as nursery:
        assert await jobs.start(spawner(nursery), trio.lowlevel.checkpoint)
    assert stats.background_started == 4


async def test_cancelled_and_failed_jobs_are_counted_and_release_slots() -> None:
    stats = KvCacheStats()
    jobs = BackgroundJobs(limit=2, stats=stats)

    async def boom() -> None:
        raise RuntimeError("bug")

    async with trio.open_nursery() as nursery:
        await jobs.start(spawner(nursery), trio.sleep_forever)
        await jobs.start(spawner(nursery), boom)
        await trio.testing.wait_all_tasks_blocked()
        nursery.cancel_scope.cancel()
    assert (stats.background_cancelled, stats.background_failed, jobs.running) == (1, 1, 0)


async def test_spawn_refused_releases_the_slot() -> None:
    stats = KvCacheStats()
    jobs = BackgroundJobs(limit=1, stats=stats)

    async def closed(fn: Any, *args: Any) -> bool:
        return False

    assert not await jobs.start(closed, trio.sleep_forever)
    assert jobs.running == 0 and stats.background_dropped == 1


async def test_single_flight_shares_one_call() -> None:
    flights: SingleFlight[int] = SingleFlight()
    calls = 0
    gate = trio.Event()
    results: list[int | None] = []

    async def work() -> int:
        nonlocal calls
        calls += 1
        await gate.wait()
        return 42

    async def caller() -> None:
        results.append(await flights.run("k", work))

    async with trio.open_nursery() as nursery:
        for _ in range(5):
            nursery.start_soon(caller)
        await trio.testing.wait_all_tasks_blocked()
        assert len(flights) == 1 and flights.joined == 4
        gate.set()
    assert calls == 1 and results == [42] * 5 and len(flights) == 0


async def test_cancelled_leader_releases_followers_with_none() -> None:
    flights: SingleFlight[int] = SingleFlight()
    results: list[int | None] = []

    async def follower() -> None:
        results.append(await flights.run("k", trio.sleep_forever))  # type: ignore[arg-type]

    async with trio.open_nursery() as outer:
        leader_scope = trio.CancelScope()

        async def leader() -> None:
            with leader_scope:
                await flights.run("k", trio.sleep_forever)  # type: ignore[arg-type]

        outer.start_soon(leader)
        await trio.testing.wait_all_tasks_blocked()
        outer.start_soon(follower)
        outer.start_soon(follower)
        await trio.testing.wait_all_tasks_blocked()
        leader_scope.cancel()
    assert results == [None, None]
    assert len(flights) == 0


async def test_cancelled_follower_does_not_cancel_the_leader() -> None:
    flights: SingleFlight[str] = SingleFlight()
    gate = trio.Event()
    results: list[str | None] = []

    async def work() -> str:
        await gate.wait()
        return "done"

    async with trio.open_nursery() as nursery:
        nursery.start_soon(lambda: _append(results, flights.run("k", work)))
        await trio.testing.wait_all_tasks_blocked()
        with trio.move_on_after(0):
            await flights.run("k", work)
        gate.set()
    assert results == ["done"]


async def _append(results: list[Any], awaitable: Any) -> None:
    results.append(await awaitable)


async def test_failing_leader_gives_followers_none() -> None:
    flights: SingleFlight[int] = SingleFlight()
    gate = trio.Event()
    results: list[int | None] = []

    async def work() -> int:
        await gate.wait()
        raise ValueError("boom")

    async def leader() -> None:
        with pytest.raises(ValueError):
            await flights.run("k", work)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(leader)
        await trio.testing.wait_all_tasks_blocked()
        nursery.start_soon(lambda: _append(results, flights.run("k", work)))
        await trio.testing.wait_all_tasks_blocked()
        gate.set()
    assert results == [None]
