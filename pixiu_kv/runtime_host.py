"""Runtime generations: what makes a configuration reload atomic for requests in flight.

The gateway's runtime (routes, clusters, connection pools, filters) is opened as one async
context. A reload opens a *new* generation next to the current one, then swaps the
reference in one step: new requests get the new runtime, and a request keeps the runtime it
started with until it ends (``with host.use() as runtime``). The old generation is closed
once its last request is done, or after ``retire_timeout`` at the latest. If opening the
new generation fails, nothing is swapped and the current one keeps serving.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import AbstractAsyncContextManager, contextmanager
from typing import Generic, TypeVar

import trio

from .config import GatewayConfig

__all__ = ["RuntimeHost"]

R = TypeVar("R")


class _Generation(Generic[R]):
    __slots__ = ("idle", "retired", "runtime", "users")

    def __init__(self, runtime: R) -> None:
        self.runtime = runtime
        self.users = 0
        self.retired = trio.Event()
        self.idle = trio.Event()

    def release(self) -> None:
        self.users -= 1
        if self.users == 0 and self.retired.is_set():
            self.idle.set()

    def retire(self) -> None:
        self.retired.set()
        if self.users == 0:
            self.idle.set()


class RuntimeHost(Generic[R]):
    """Holds the current runtime generation and retires older ones.

    ``open_runtime(config)`` is an async context manager factory (the gateway's
    ``open_runtime``); ``prepare(runtime)`` runs on each new runtime before it serves (e.g.
    re-applying drain marks).
    """

    def __init__(self, open_runtime: Callable[[GatewayConfig], AbstractAsyncContextManager[R]], *,
                 retire_timeout: float, prepare: Callable[[R], None] | None = None) -> None:
        self._open = open_runtime
        self._retire_timeout = retire_timeout
        self._prepare = prepare
        self._current: _Generation[R] | None = None
        self._nursery: trio.Nursery | None = None
        self.generations_open = 0

    @property
    def current(self) -> R | None:
        return None if self._current is None else self._current.runtime

    @contextmanager
    def use(self) -> Iterator[R]:
        """The current runtime, kept open until the block ends even if a reload replaces it."""
        generation = self._current
        if generation is None:
            raise RuntimeError("no runtime is open")
        generation.users += 1
        try:
            yield generation.runtime
        finally:
            generation.release()

    async def run(self, config: GatewayConfig, *,
                  task_status: trio.TaskStatus[R] = trio.TASK_STATUS_IGNORED) -> None:
        """Open the first generation and host generations until cancelled; cancelling closes
        every open generation."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            try:
                self._current = await nursery.start(self._generation, config)
                task_status.started(self._current.runtime)
                await trio.sleep_forever()
            finally:
                self._current = None
                self._nursery = None

    async def replace(self, config: GatewayConfig) -> R:
        """Open a generation for ``config`` and make it current; the old one retires.

        Raises whatever opening the new generation raised; the current one is untouched.
        """
        if self._nursery is None:
            raise RuntimeError("the runtime host is not running")
        new: _Generation[R] = await self._nursery.start(self._generation, config)
        old, self._current = self._current, new
        if old is not None:
            old.retire()
        return new.runtime

    async def _generation(self, config: GatewayConfig, *,
                          task_status: trio.TaskStatus[_Generation[R]] = trio.TASK_STATUS_IGNORED) -> None:
        async with self._open(config) as runtime:
            if self._prepare is not None:
                self._prepare(runtime)
            generation = _Generation(runtime)
            self.generations_open += 1
            try:
                task_status.started(generation)
                await generation.retired.wait()
                with trio.move_on_after(self._retire_timeout):
                    await generation.idle.wait()
            finally:
                self.generations_open -= 1
