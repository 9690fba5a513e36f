from __future__ import annotations

import random

import pytest
import trio
import trio.lowlevel
import trio.testing

from pixiu_kv.upstream.resilience import (
    BreakerOpenError,
    BreakerState,
    CircuitBreaker,
    MalformedReply,
    RetryPolicy,
    UpstreamError,
    UpstreamRejected,
    UpstreamTimeout,
    UpstreamUnavailable,
    call_with_retry,
    is_cancellation,
)


class Script:
    """An operation that fails as scripted, recording when each attempt started."""

    def __init__(self, *outcomes: UpstreamError | str, hang: bool = False) -> None:
        self.outcomes = list(outcomes)
        self.starts: list[float] = []
        self.hang = hang

    async def __call__(self) -> str:
        self.starts.append(trio.current_time())
        if self.hang:
            await trio.sleep_forever()
        outcome = self.outcomes.pop(0)
        await trio.lowlevel.checkpoint()
        if isinstance(outcome, UpstreamError):
            raise outcome
        return outcome


def breaker(threshold: int = 100, recovery: float = 10.0, probes: int = 2) -> CircuitBreaker:
    return CircuitBreaker("test", threshold, recovery, probes)


def test_full_jitter_backoff_is_bounded() -> None:
    policy = RetryPolicy(max_attempts=5, base_backoff=0.1, max_backoff=0.5)
    rng = random.Random(1)
    for retry, ceiling in [(0, 0.1), (1, 0.2), (2, 0.4), (3, 0.5), (10, 0.5), (1000, 0.5)]:
        samples = [policy.backoff(retry, rng) for _ in range(200)]
        assert all(0.0 <= s <= ceiling for s in samples)
        assert max(samples) > ceiling * 0.8  # jitter spans the range, not a fixed value


async def test_retries_transient_failures_then_succeeds(autojump_clock: trio.testing.MockClock) -> None:
    op = Script(UpstreamUnavailable("refused"), UpstreamUnavailable("503", 503), "ok")
    policy = RetryPolicy(max_attempts=3, base_backoff=0.1, max_backoff=1.0)
    result = await call_with_retry(op, policy=policy, breaker=breaker(),
                                   deadline=trio.current_time() + 100)
    assert result == "ok" and len(op.starts) == 3


@pytest.mark.parametrize("error", [UpstreamRejected("400", 400), UpstreamRejected("404", 404),
                                   MalformedReply("not json")])
async def test_no_retry_on_4xx_or_malformed(autojump_clock: trio.testing.MockClock,
                                            error: UpstreamError) -> None:
    op = Script(error, "never reached")
    policy = RetryPolicy(max_attempts=5, base_backoff=0.1, max_backoff=1.0)
    start = trio.current_time()
    with pytest.raises(type(error)):
        await call_with_retry(op, policy=policy, breaker=breaker(), deadline=start + 100)
    assert len(op.starts) == 1
    assert trio.current_time() == start  # no backoff sleep at all


async def test_no_sleep_after_the_last_attempt(autojump_clock: trio.testing.MockClock) -> None:
    op = Script(*(UpstreamUnavailable("503", 503) for _ in range(3)))
    policy = RetryPolicy(max_attempts=3, base_backoff=1.0, max_backoff=1.0)
    start = trio.current_time()
    with pytest.raises(UpstreamUnavailable):
        await call_with_retry(op, policy=policy, breaker=breaker(), deadline=start + 1000,
                              rng=random.Random(7))
    assert len(op.starts) == 3
    # The call ends the moment the last attempt failed.
    assert trio.current_time() == op.starts[-1]


async def test_never_sleeps_past_the_deadline(autojump_clock: trio.testing.MockClock) -> None:
    for seed in range(20):
        op = Script(*(UpstreamUnavailable("refused") for _ in range(50)))
        policy = RetryPolicy(max_attempts=50, base_backoff=0.2, max_backoff=5.0)
        start = trio.current_time()
        deadline = start + 1.0
        with pytest.raises(UpstreamUnavailable):
            await call_with_retry(op, policy=policy, breaker=breaker(), deadline=deadline,
                                  rng=random.Random(seed))
        assert trio.current_time() < deadline
        assert len(op.starts) < 50


async def test_deadline_cuts_a_hanging_attempt(autojump_clock: trio.testing.MockClock) -> None:
    op = Script(hang=True)
    b = breaker(threshold=1)
    start = trio.current_time()
    with pytest.raises(UpstreamTimeout):
        await call_with_retry(op, policy=RetryPolicy(3, 0.1, 1.0), breaker=b, deadline=start + 2.0)
    assert trio.current_time() == start + 2.0
    assert len(op.starts) == 1
    assert b.state is BreakerState.OPEN  # a timeout is evidence of an unhealthy upstream


async def test_outside_cancellation_is_neutral_unless_asked(autojump_clock: trio.testing.MockClock) -> None:
    for cancel_is_failure, expected in ((False, BreakerState.CLOSED), (True, BreakerState.OPEN)):
        b = breaker(threshold=1)
        with trio.move_on_after(0.05):
            await call_with_retry(Script(hang=True), policy=RetryPolicy(1, 0.1, 1.0), breaker=b,
                                  deadline=trio.current_time() + 10.0, cancel_is_failure=cancel_is_failure)
        assert b.state is expected


async def test_breaker_opens_after_threshold_and_costs_nothing(
        autojump_clock: trio.testing.MockClock) -> None:
    b = breaker(threshold=3, recovery=10.0)
    policy = RetryPolicy(1, 0.1, 1.0)
    for _ in range(3):
        with pytest.raises(UpstreamUnavailable):
            await call_with_retry(Script(UpstreamUnavailable("x")), policy=policy, breaker=b,
                                  deadline=trio.current_time() + 5)
    assert b.state is BreakerState.OPEN
    op = Script("ok")
    with pytest.raises(BreakerOpenError):
        await call_with_retry(op, policy=policy, breaker=b, deadline=trio.current_time() + 5)
    assert op.starts == []


async def test_4xx_does_not_trip_the_breaker(autojump_clock: trio.testing.MockClock) -> None:
    b = breaker(threshold=2)
    for _ in range(5):
        with pytest.raises(UpstreamRejected):
            await call_with_retry(Script(UpstreamRejected("404", 404)), policy=RetryPolicy(1, 0, 0),
                                  breaker=b, deadline=trio.current_time() + 5)
    assert b.state is BreakerState.CLOSED


async def test_success_resets_consecutive_failures(autojump_clock: trio.testing.MockClock) -> None:
    b = breaker(threshold=2)
    p = b.acquire()
    assert p is not None
    b.failure(p)
    p = b.acquire()
    assert p is not None
    b.success(p)
    p = b.acquire()
    assert p is not None
    b.failure(p)
    assert b.state is BreakerState.CLOSED


async def test_half_open_admits_exactly_n_probes(autojump_clock: trio.testing.MockClock) -> None:
    b = breaker(threshold=1, recovery=10.0, probes=3)
    p = b.acquire()
    assert p is not None
    b.failure(p)
    assert b.state is BreakerState.OPEN
    assert b.acquire() is None
    await trio.sleep(10.0)
    assert b.state is BreakerState.HALF_OPEN
    probes = [b.acquire() for _ in range(5)]
    admitted = [p for p in probes if p is not None]
    assert len(admitted) == 3 and probes[3:] == [None, None]
    # Two successes are not enough; the third closes it.
    b.success(admitted[0])
    b.success(admitted[1])
    assert b.state is BreakerState.HALF_OPEN and b.acquire() is None
    b.success(admitted[2])
    assert b.state is BreakerState.CLOSED


async def test_half_open_failure_reopens_and_stale_outcomes_are_ignored(
        autojump_clock: trio.testing.MockClock) -> None:
    b = breaker(threshold=1, recovery=10.0, probes=2)
    first = b.acquire()
    late = b.acquire()
    assert first is not None and late is not None
    b.failure(first)
    await trio.sleep(10.0)
    probe = b.acquire()
    assert probe is not None and probe.probe
    b.success(late)  # admitted while closed: must not count as a probe success
    assert b.state is BreakerState.HALF_OPEN
    b.failure(probe)
    assert b.state is BreakerState.OPEN
    assert b.acquire() is None


async def test_cancelled_probe_frees_its_slot(autojump_clock: trio.testing.MockClock) -> None:
    b = breaker(threshold=1, recovery=1.0, probes=1)
    p = b.acquire()
    assert p is not None
    b.failure(p)
    await trio.sleep(1.0)
    probe = b.acquire()
    assert probe is not None and b.acquire() is None
    b.release(probe)
    again = b.acquire()
    assert again is not None
    b.success(again)
    assert b.state is BreakerState.CLOSED


async def test_state_changes_are_reported(autojump_clock: trio.testing.MockClock) -> None:
    seen: list[BreakerState] = []
    b = CircuitBreaker("x", 1, 1.0, 1, on_change=lambda _, state: seen.append(state))
    p = b.acquire()
    assert p is not None
    b.failure(p)
    await trio.sleep(1.0)
    p = b.acquire()
    assert p is not None
    b.success(p)
    assert seen == [BreakerState.OPEN, BreakerState.HALF_OPEN, BreakerState.CLOSED]


async def test_cancellation_wrapped_in_groups_is_recognised() -> None:
    with trio.CancelScope() as scope:
        scope.cancel()
        try:
            await trio.lowlevel.checkpoint()
        except trio.Cancelled as exc:
            cancelled = exc
        else:
            raise AssertionError("not cancelled")
    assert is_cancellation(cancelled)
    assert is_cancellation(BaseExceptionGroup("g", [cancelled, BaseExceptionGroup("h", [cancelled])]))
    assert not is_cancellation(BaseExceptionGroup("g", [cancelled, ValueError()]))
    assert not is_cancellation(ValueError())


async def test_routing_cancel_inside_a_group_still_counts_for_its_breaker(
        autojump_clock: trio.testing.MockClock) -> None:
    b = breaker(threshold=1)

    async def connect_in_a_nursery() -> str:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(trio.sleep_forever)
        return "never"

    with trio.move_on_after(0.05):
        await call_with_retry(connect_in_a_nursery, policy=RetryPolicy(1, 0.1, 1.0), breaker=b,
                              deadline=trio.current_time() + 0.05, cancel_is_failure=True, bounded=True)
    assert b.state is BreakerState.OPEN
