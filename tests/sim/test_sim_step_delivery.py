"""Lockstep streams delivered by the step-timer holder: same tokens, same order, same
step times as streams that wake for every step; a write the socket did not take is
flushed by the stream's own task (autojump clock, no HTTP)."""

from __future__ import annotations

import trio
import trio.testing

from pixiu_kv.sim import EngineConfig, SimEngine
from pixiu_kv.sim.costmodel import PrefillPlan


def _engine(prefill_tokens_per_s: float = 1e9) -> SimEngine:
    # Prefill in no time by default: every stream joins the batch at the same step, so step
    # times are fully determined (when streams finish at different steps, whether a stream
    # that just got its last token still counts in the next step's batch depends on task
    # order, with or without delivery).
    return SimEngine(EngineConfig(gpu_kv_tokens=65536, cpu_tier_tokens=0, max_model_len=4096,
                                  prefill_tokens_per_s=prefill_tokens_per_s))


def _prompt(salt: int) -> list[int]:
    return [300 + salt * 977 + i for i in range(40)]


async def _run(engine: SimEngine, streams: int, *, delivered: bool, refuse_every: int = 0
               ) -> tuple[list[list[tuple[int, float, tuple[int, ...]]]], list[int], list[list[list[int]]]]:
    """Start ``streams`` 12-token streams together; per stream: (step, time, ids) as seen."""
    seen: list[list[tuple[int, float, tuple[int, ...]]]] = [[] for _ in range(streams)]
    flushes = [0] * streams
    outputs: list[list[list[int]]] = [[] for _ in range(streams)]
    start = trio.current_time()

    async def one(index: int) -> None:
        async def on_step(step: int, ids: list[int], plan: PrefillPlan) -> None:
            if step < 0:
                flushes[index] += 1
                return
            seen[index].append((step, trio.current_time() - start, tuple(ids)))

        def deliver(step: int, ids: list[int], plan: PrefillPlan) -> bool:
            seen[index].append((step, trio.current_time() - start, tuple(ids)))
            return not (refuse_every and step % refuse_every == 0)

        gen = await engine.scheduler.generate(
            _prompt(index), 12, n=2, seed=index, on_step=on_step,
            deliver=deliver if delivered else None)
        outputs[index] = gen.outputs

    async with trio.open_nursery() as nursery:
        for index in range(streams):
            nursery.start_soon(one, index)
    return seen, flushes, outputs


async def test_delivered_steps_match_woken_steps(autojump_clock: trio.testing.MockClock) -> None:
    woken, no_flushes, woken_out = await _run(_engine(), 20, delivered=False)
    held, flushes, held_out = await _run(_engine(), 20, delivered=True)
    assert no_flushes == [0] * 20 and flushes == [0] * 20
    assert held_out == woken_out
    for old, new in zip(woken, held, strict=True):
        assert [s for s, _, _ in new] == list(range(12))
        assert [ids for _, _, ids in new] == [ids for _, _, ids in old]
        # Same batch step times (from each run's start); step 0 ends each stream's own prefill,
        # whose order among the streams follows task order.
        assert [round(t, 9) for _, t, _ in new[1:]] == [round(t, 9) for _, t, _ in old[1:]]


async def test_staggered_streams_get_the_same_tokens(autojump_clock: trio.testing.MockClock) -> None:
    woken, _, woken_out = await _run(_engine(prefill_tokens_per_s=10_000.0), 20, delivered=False)
    held, _, held_out = await _run(_engine(prefill_tokens_per_s=10_000.0), 20, delivered=True)
    assert held_out == woken_out
    for old, new in zip(woken, held, strict=True):
        assert [(s, ids) for s, _, ids in new] == [(s, ids) for s, _, ids in old]


async def test_refused_write_is_flushed_by_the_stream_task(autojump_clock: trio.testing.MockClock) -> None:
    seen, flushes, outputs = await _run(_engine(), 5, delivered=True, refuse_every=4)
    for steps in seen:
        assert [s for s, _, _ in steps] == list(range(12))
    # Steps 4 and 8 were refused (11 is the last step: it always completes the stream).
    assert flushes == [2] * 5
    reference, _, reference_out = await _run(_engine(), 5, delivered=False)
    assert outputs == reference_out
    assert [[ids for _, _, ids in s] for s in seen] == [[ids for _, _, ids in s] for s in reference]


async def test_cancelled_holder_hands_the_timer_over(autojump_clock: trio.testing.MockClock) -> None:
    engine = _engine()
    finished: list[int] = []

    async def stream(index: int, cancel_scope: trio.CancelScope | None) -> None:
        def deliver(step: int, ids: list[int], plan: PrefillPlan) -> bool:
            if cancel_scope is not None and step == 3:
                cancel_scope.cancel()
            return True

        async def on_step(step: int, ids: list[int], plan: PrefillPlan) -> None:
            pass

        await engine.scheduler.generate(_prompt(index), 12, on_step=on_step, deliver=deliver)
        finished.append(index)

    async with trio.open_nursery() as nursery:
        doomed = trio.CancelScope()

        async def cancellable() -> None:
            with doomed:
                await stream(0, doomed)

        nursery.start_soon(cancellable)
        for index in range(1, 4):
            nursery.start_soon(stream, index, None)
    assert sorted(finished) == [1, 2, 3]
    assert engine.scheduler.running == 0
    assert engine.metrics.requests_aborted == 1


async def _unary(engine: SimEngine, requests: int, abandon: bool = False
                 ) -> tuple[dict[int, float], dict[int, list[list[int]]]]:
    finished: dict[int, float] = {}
    outputs: dict[int, list[list[int]]] = {}
    start = trio.current_time()

    async def unary(index: int) -> None:
        gen = await engine.scheduler.generate(_prompt(index), 12, n=2, seed=index)
        finished[index] = trio.current_time() - start
        outputs[index] = gen.outputs

    async def abandoned() -> None:
        with trio.move_on_after(engine.scheduler.cost.decode_interval(4) * 3):
            await engine.scheduler.generate(_prompt(9), 12, seed=9)

    async with trio.open_nursery() as nursery:
        for index in range(requests):
            nursery.start_soon(unary, index)
        if abandon:
            nursery.start_soon(abandoned)
    return finished, outputs


async def test_requests_without_a_stream_finish_at_their_last_batch_step(
        autojump_clock: trio.testing.MockClock) -> None:
    """Unary requests decode in the same steps as streams: the same ids, done at the step
    a stream of the same length gets its last token."""
    streamed, _, stream_out = await _run(_engine(), 3, delivered=True)
    finished, outputs = await _unary(_engine(), 3)
    assert [outputs[i] for i in range(3)] == stream_out
    assert [finished[i] for i in range(3)] == [times[-1][1] for times in streamed]


async def test_a_cancelled_request_without_a_stream_leaves_the_others_on_time(
        autojump_clock: trio.testing.MockClock) -> None:
    engine = _engine()
    finished, outputs = await _unary(engine, 3, abandon=True)
    alone, alone_outputs = await _unary(_engine(), 3)
    assert outputs == alone_outputs
    # The batch held one more request for three steps, which were a little longer.
    assert all(alone[i] < finished[i] < alone[i] * 1.1 for i in range(3))
    assert engine.scheduler.running == 0 and engine.metrics.requests_aborted == 1
