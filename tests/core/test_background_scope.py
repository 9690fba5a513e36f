"""BackgroundScope: lazily opened, shared by concurrent starters, cancelled or given grace."""

import trio
import trio.testing

from pixiu_kv.context import BackgroundScope


async def test_concurrent_starters_share_one_nursery(nursery: trio.Nursery) -> None:
    scope = BackgroundScope(nursery)
    ran: list[int] = []
    release = trio.Event()

    async def job(i: int) -> None:
        await release.wait()
        ran.append(i)

    async def start(i: int) -> None:
        assert await scope.start_soon(job, i)

    async with trio.open_nursery() as starters:
        for i in range(5):
            starters.start_soon(start, i)
    release.set()
    scope.finish(grace=10.0)
    await trio.testing.wait_all_tasks_blocked()
    assert sorted(ran) == [0, 1, 2, 3, 4]


async def test_cancel_stops_running_work_and_refuses_new(nursery: trio.Nursery) -> None:
    scope = BackgroundScope(nursery)
    cancelled = trio.Event()

    async def forever() -> None:
        try:
            await trio.sleep_forever()
        except trio.Cancelled:
            cancelled.set()
            raise

    assert await scope.start_soon(forever)
    await trio.testing.wait_all_tasks_blocked()
    scope.cancel()
    await cancelled.wait()
    assert not await scope.start_soon(forever)


async def test_finish_gives_work_its_grace_then_cancels(
    nursery: trio.Nursery, autojump_clock: object
) -> None:
    scope = BackgroundScope(nursery)
    outcome: list[str] = []

    async def job(seconds: float) -> None:
        try:
            await trio.sleep(seconds)
            outcome.append(f"done {seconds}")
        except trio.Cancelled:
            outcome.append(f"cancelled {seconds}")
            raise

    await scope.start_soon(job, 1.0)
    await scope.start_soon(job, 5.0)
    scope.finish(grace=2.0)
    await trio.sleep(10)
    assert sorted(outcome) == ["cancelled 5.0", "done 1.0"]
