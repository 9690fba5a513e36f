"""Simulated engines registered with a real ``lmcache_controller``, as LMCache workers.

``open_lmcache_worker`` registers one instance over ZMQ exactly as an LMCache 0.5.6
worker does, then for as long as the block runs:

* answers the controller's control messages (health, pin, clear, compress, decompress)
  on a REP socket by calling the engine's :class:`WorkerControl`;
* forwards the chunk keys the engine's CPU tier admits and evicts (reported to the
  returned :class:`WorkerLinkSink`, which never blocks) as ``BatchedKVOperationMsg``
  batches on a PUSH socket;
* optionally sends heartbeats, and answers the controller's full-sync requests (after its
  start or a restart) with every chunk key the tier holds.

On exit it flushes what is pending and deregisters, under a deadline, even when the block
is cancelled: a controller keeps a dead worker registered and then hangs on ``/pin``,
``/clear`` and ``/health``.

``open_lmcache_links`` does the same for a whole fleet through a synchronous
``register(instance_id, control) -> sink`` (``open_fleet(chunk_sink_factory=...)``).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from pixiu_kv.sim._controller_link import (
    ControllerPorts,
    LinkStats,
    RegistrationError,
    WorkerLinkSettings,
    WorkerLinkSink,
    linked,
)
from pixiu_kv.sim._controller_link_group import LinkGroup, open_lmcache_links
from pixiu_kv.sim.lmcache_link import WorkerControl

__all__ = [
    "ControllerPorts",
    "LinkGroup",
    "LinkStats",
    "RegistrationError",
    "WorkerLinkSettings",
    "WorkerLinkSink",
    "open_lmcache_links",
    "open_lmcache_worker",
]


@asynccontextmanager
async def open_lmcache_worker(
    controller_host: str,
    ports: ControllerPorts,
    instance_id: str,
    control: WorkerControl,
    settings: WorkerLinkSettings | None = None,
) -> AsyncIterator[WorkerLinkSink]:
    """Register ``instance_id`` with the controller at ``controller_host``; yield its sink.

    Raises :class:`RegistrationError` if the controller does not answer in time.
    """
    settings = settings or WorkerLinkSettings()
    sink = WorkerLinkSink(settings)
    async with linked(controller_host, ports, instance_id, control, settings, sink):
        yield sink
