"""A global bound on concurrent background cache-management jobs.

Jobs run wherever the caller spawns them (a request's :class:`~pixiu_kv.context.BackgroundScope`,
or any trio nursery), so their lifetime follows the request: a disconnect cancels them.
Beyond ``limit`` running jobs a new one is dropped and counted, never queued: cache
management is best effort, and a queue would only grow under the load that filled it.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

from ...upstream.resilience import is_cancellation
from .stats import KvCacheStats

__all__ = ["BackgroundJobs", "Spawn"]

log = logging.getLogger("pixiu_kv.kvcache")

Spawn = Callable[..., Awaitable[bool]]
"""``await spawn(fn, *args)`` starts ``fn(*args)`` in the caller's scope; False if it could not."""


class BackgroundJobs:
    __slots__ = ("_limit", "_running", "_stats")

    def __init__(self, limit: int, stats: KvCacheStats) -> None:
        if limit <= 0:
            raise ValueError("limit must be > 0")
        self._limit = limit
        self._running = 0
        self._stats = stats

    @property
    def running(self) -> int:
        return self._running

    async def start(self, spawn: Spawn, fn: Callable[..., Awaitable[Any]], *args: Any) -> bool:
        """Start ``fn(*args)`` through ``spawn`` unless ``limit`` jobs are running already."""
        if self._running >= self._limit:
            self._stats.background_dropped += 1
            return False
        self._running += 1  # reserved before the await, so concurrent starts cannot overshoot
        try:
            started = await spawn(self._run, fn, *args)
        except BaseException:
            self._running -= 1
            raise
        if not started:
            self._running -= 1
            self._stats.background_dropped += 1
        return started

    async def _run(self, fn: Callable[..., Awaitable[Any]], *args: Any) -> None:
        stats = self._stats
        stats.background_started += 1
        try:
            await fn(*args)
        except BaseException as exc:
            if is_cancellation(exc):
                stats.background_cancelled += 1
                raise
            if not isinstance(exc, Exception):
                raise  # KeyboardInterrupt and the like are not ours to swallow
            stats.background_failed += 1
            log.exception("kvcache background job failed")
        else:
            stats.background_finished += 1
        finally:
            self._running -= 1
