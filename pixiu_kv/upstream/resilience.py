"""Calls to best-effort upstreams: failure classes, a circuit breaker, deadline-aware retries.

* Only *transient* failures are retried: connection errors, timeouts, 429 and 5xx. A 4xx
  or a reply that does not parse will not get better by asking again.
* Backoff is exponential with full jitter, and never sleeps past the call's deadline nor
  after the last attempt.
* A circuit breaker stops calling an upstream that keeps failing: after
  ``failure_threshold`` consecutive failures it opens (calls cost nothing), after
  ``recovery_timeout`` it half-opens and admits exactly ``half_open_max_calls`` probes;
  when all of them succeed it closes, when one fails it opens again. A 4xx proves the
  upstream alive and counts as a success; a malformed reply counts as a failure.

Time is ``trio.current_time()``, so everything here runs under trio's autojump clock.
"""

from __future__ import annotations

import enum
import random
from collections.abc import Awaitable, Callable
from typing import TypeVar

import attrs
import trio

__all__ = [
    "BreakerOpenError",
    "BreakerState",
    "CircuitBreaker",
    "MalformedReply",
    "Permit",
    "RetryPolicy",
    "UpstreamError",
    "UpstreamRejected",
    "UpstreamTimeout",
    "UpstreamUnavailable",
    "call_with_retry",
    "check_status",
    "is_cancellation",
]

T = TypeVar("T")


# -- failure classes ---------------------------------------------------------------------

class UpstreamError(Exception):
    """A call to an upstream failed. ``transient``: worth retrying; ``breaker_failure``:
    evidence that the upstream is unhealthy."""

    transient = False
    breaker_failure = True


class UpstreamUnavailable(UpstreamError):
    """Connection refused/reset, transport timeout, 429 or 5xx."""

    transient = True

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class UpstreamTimeout(UpstreamError):
    """The call's deadline passed. Counts against the breaker; never retried (no time left)."""


class UpstreamRejected(UpstreamError):
    """A 4xx: the upstream is alive and said no."""

    breaker_failure = False

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


class MalformedReply(UpstreamError):
    """The reply was not what the API promises (not JSON, wrong shape, too large)."""


class BreakerOpenError(UpstreamError):
    """The breaker refused the call: nothing was sent."""

    breaker_failure = False


def is_cancellation(exc: BaseException) -> bool:
    """A trio cancellation, also when it arrives wrapped in exception groups (a nursery
    inside a library call, e.g. happy-eyeballs connecting, wraps it under strict groups)."""
    if isinstance(exc, trio.Cancelled):
        return True
    if isinstance(exc, BaseExceptionGroup):
        return exc.split(trio.Cancelled)[1] is None
    return False


# -- circuit breaker -----------------------------------------------------------------------

class BreakerState(enum.Enum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


@attrs.frozen(slots=True)
class Permit:
    """Leave to make one call. Outcomes of calls admitted in an earlier state are ignored."""

    generation: int
    probe: bool


class CircuitBreaker:
    __slots__ = (
        "_failures",
        "_generation",
        "_half_open_max",
        "_opened_at",
        "_probe_successes",
        "_probes",
        "_recovery",
        "_state",
        "_threshold",
        "name",
        "on_change",
    )

    def __init__(self, name: str, failure_threshold: int, recovery_timeout: float, half_open_max_calls: int,
                 on_change: Callable[[CircuitBreaker, BreakerState], None] | None = None) -> None:
        if failure_threshold <= 0 or recovery_timeout <= 0 or half_open_max_calls <= 0:
            raise ValueError("breaker settings must be > 0")
        self.name = name
        self.on_change = on_change
        self._threshold = failure_threshold
        self._recovery = recovery_timeout
        self._half_open_max = half_open_max_calls
        self._state = BreakerState.CLOSED
        self._generation = 0
        self._failures = 0
        self._opened_at = 0.0
        self._probes = 0
        self._probe_successes = 0

    @property
    def state(self) -> BreakerState:
        """The state as of now (an open breaker whose recovery time passed reads half-open)."""
        if self._state is BreakerState.OPEN and trio.current_time() >= self._opened_at + self._recovery:
            return BreakerState.HALF_OPEN
        return self._state

    def acquire(self) -> Permit | None:
        """A permit to call, or None when the breaker refuses (open, or half-open and full)."""
        state = self._state
        if state is BreakerState.CLOSED:
            return Permit(self._generation, False)
        if state is BreakerState.OPEN:
            if trio.current_time() < self._opened_at + self._recovery:
                return None
            self._move(BreakerState.HALF_OPEN)
        if self._probes >= self._half_open_max:
            return None
        self._probes += 1
        return Permit(self._generation, True)

    def success(self, permit: Permit) -> None:
        if permit.generation != self._generation:
            return
        if self._state is BreakerState.HALF_OPEN:
            self._probe_successes += 1
            if self._probe_successes >= self._half_open_max:
                self._move(BreakerState.CLOSED)
        else:
            self._failures = 0

    def failure(self, permit: Permit) -> None:
        if permit.generation != self._generation:
            return
        if self._state is BreakerState.HALF_OPEN:
            self._move(BreakerState.OPEN)
        elif self._state is BreakerState.CLOSED:
            self._failures += 1
            if self._failures >= self._threshold:
                self._move(BreakerState.OPEN)

    def release(self, permit: Permit) -> None:
        """The call ended without a verdict (cancelled from outside): free its probe slot."""
        if permit.generation == self._generation and permit.probe and self._state is BreakerState.HALF_OPEN:
            self._probes -= 1

    def _move(self, state: BreakerState) -> None:
        self._state = state
        self._generation += 1
        self._failures = 0
        self._probes = 0
        self._probe_successes = 0
        if state is BreakerState.OPEN:
            self._opened_at = trio.current_time()
        if self.on_change is not None:
            self.on_change(self, state)


# -- retries -------------------------------------------------------------------------------

@attrs.frozen(slots=True)
class RetryPolicy:
    """``max_attempts`` counts the first try."""

    max_attempts: int = attrs.field(validator=attrs.validators.ge(1))
    base_backoff: float = attrs.field(validator=attrs.validators.ge(0))
    max_backoff: float = attrs.field(validator=attrs.validators.ge(0))

    def backoff(self, retry: int, rng: random.Random | None = None) -> float:
        """Full jitter: uniform in [0, min(max_backoff, base_backoff * 2**retry)]."""
        ceiling = min(self.max_backoff, self.base_backoff * (2.0 ** min(retry, 62)))
        return (rng or _RNG).uniform(0.0, ceiling)


_RNG = random.Random()


async def call_with_retry(
    op: Callable[[], Awaitable[T]],
    *,
    policy: RetryPolicy,
    breaker: CircuitBreaker,
    deadline: float,
    cancel_is_failure: bool = False,
    bounded: bool = False,
    rng: random.Random | None = None,
) -> T:
    """Run ``op`` until it succeeds, fails for good, or time/attempts run out.

    Each attempt needs a breaker permit and runs under ``deadline``. A cancellation from
    outside (client gone, caller's budget spent) releases the permit without a verdict,
    unless ``cancel_is_failure``: a routing lookup cut by its budget *is* a slow upstream.
    ``bounded``: the caller already runs this under a cancel scope ending at ``deadline``
    (saves a scope per attempt on the hot path; its expiry arrives as a cancellation).
    """
    last: UpstreamError | None = None
    for attempt in range(policy.max_attempts):
        permit = breaker.acquire()
        if permit is None:
            if last is not None:
                raise last
            raise BreakerOpenError(f"{breaker.name} circuit breaker is open")
        try:
            if bounded:
                result, timed_out = await op(), False
            else:
                with trio.move_on_at(deadline) as scope:
                    result = await op()
                timed_out = scope.cancelled_caught
        except UpstreamError as exc:
            (breaker.failure if exc.breaker_failure else breaker.success)(permit)
            if not exc.transient:
                raise
            last = exc
        except BaseException as exc:
            (breaker.failure if cancel_is_failure and is_cancellation(exc) else breaker.release)(permit)
            raise
        else:
            if timed_out:
                breaker.failure(permit)
                raise UpstreamTimeout(f"{breaker.name}: no reply before the deadline")
            breaker.success(permit)
            return result
        if attempt + 1 >= policy.max_attempts:
            break
        delay = policy.backoff(attempt, rng)
        if trio.current_time() + delay >= deadline:
            break
        await trio.sleep(delay)
    assert last is not None
    raise last


# -- HTTP ----------------------------------------------------------------------------------

def check_status(status: int, path: str) -> None:
    """Raise the failure class of a non-200 reply status."""
    if status == 200:
        return
    if status == 429 or status >= 500:
        raise UpstreamUnavailable(f"POST {path}: HTTP {status}", status)
    if status >= 400:
        raise UpstreamRejected(f"POST {path}: HTTP {status}", status)
    raise MalformedReply(f"POST {path}: unexpected HTTP {status}")
