"""Host CPU and memory usage, sampled periodically in the background, never per request.

The cache strategy compresses when the host is busy and evicts when memory is short. Those
are host signals (the gateway usually shares its host with an engine or the cache), read
from psutil every ``interval`` seconds by one task; the request path only reads the
latest sample.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import attrs
import psutil
import trio

__all__ = ["CpuCounter", "HostLoad", "HostLoadSampler", "read_host_load"]

log = logging.getLogger("pixiu_kv.hostload")


@attrs.frozen(slots=True)
class HostLoad:
    """Host CPU and memory usage, as ratios in [0, 1]."""

    cpu: float = attrs.field(validator=[attrs.validators.ge(0.0), attrs.validators.le(1.0)])
    memory: float = attrs.field(validator=[attrs.validators.ge(0.0), attrs.validators.le(1.0)])


class CpuCounter:
    """CPU busy ratio between two calls, from the host's cumulative CPU times.

    Computed from deltas of our own, instead of ``psutil.cpu_percent``, whose baseline is
    process-global state that any other caller would reset.
    """

    __slots__ = ("_busy", "_total")

    def __init__(self) -> None:
        self._busy, self._total = self._read()

    @staticmethod
    def _read() -> tuple[float, float]:
        times = psutil.cpu_times()
        total = float(sum(times))
        idle = times.idle + getattr(times, "iowait", 0.0)
        return total - idle, total

    def ratio(self) -> float:
        busy, total = self._read()
        d_busy, d_total = busy - self._busy, total - self._total
        self._busy, self._total = busy, total
        if d_total <= 0:
            return 0.0
        return min(1.0, max(0.0, d_busy / d_total))


def read_host_load(cpu: CpuCounter) -> HostLoad:
    return HostLoad(cpu=cpu.ratio(), memory=min(1.0, max(0.0, psutil.virtual_memory().percent / 100.0)))


class HostLoadSampler:
    """Keeps :attr:`latest` fresh; ``None`` until the first full interval has been measured."""

    __slots__ = ("_interval", "_read", "latest")

    def __init__(self, interval: float, read: Callable[[], HostLoad] | None = None) -> None:
        if interval <= 0:
            raise ValueError("interval must be > 0")
        self._interval = interval
        self._read = read
        self.latest: HostLoad | None = None

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        read = self._read
        if read is None:
            counter = CpuCounter()

            def read() -> HostLoad:
                return read_host_load(counter)

        task_status.started()
        while True:
            await trio.sleep(self._interval)
            try:
                self.latest = read()
            except (OSError, ValueError) as exc:  # e.g. /proc unreadable in a sandbox
                log.warning("host load sample failed: %s", exc)
