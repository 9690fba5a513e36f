"""One call in flight per key: concurrent identical prompts share one tokenize and one lookup.

The first caller (the leader) runs the work in its own task, that is in the background
scope of its own request. Followers wait for its result. If the leader fails or is
cancelled (its client went away), followers get ``None`` at once and carry on without
the result; a follower cancelled while waiting changes nothing for the others.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

import trio

__all__ = ["SingleFlight"]

T = TypeVar("T")


class _Flight(Generic[T]):
    __slots__ = ("done", "result")

    def __init__(self) -> None:
        self.done = trio.Event()
        self.result: T | None = None


class SingleFlight(Generic[T]):
    __slots__ = ("_flights", "joined")

    def __init__(self) -> None:
        self._flights: dict[str, _Flight[T]] = {}
        self.joined = 0

    def __len__(self) -> int:
        return len(self._flights)

    async def run(self, key: str, fn: Callable[[], Awaitable[T | None]]) -> T | None:
        """``fn()``'s result, shared with every concurrent caller of the same ``key``."""
        flight = self._flights.get(key)
        if flight is not None:
            self.joined += 1
            await flight.done.wait()
            return flight.result
        flight = _Flight()
        self._flights[key] = flight
        try:
            flight.result = await fn()
        finally:
            # Runs on failure and cancellation too: followers never wait on a dead leader.
            del self._flights[key]
            flight.done.set()
        return flight.result
