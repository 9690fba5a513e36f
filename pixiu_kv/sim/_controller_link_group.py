"""Links for a whole fleet, registered through a synchronous ``(instance_id, control) -> sink``.

A fleet builds its engines and asks a factory for each engine's sink without awaiting
(``fleet.ChunkSinkFactory``). :class:`LinkGroup.register` returns a buffering sink at once
and queues the registration; one task registers the queued instances in call order (so
the controller's first-registered rule follows the fleet's order) and keeps each link
running until the group closes.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import trio

from pixiu_kv.sim._controller_link import (
    ControllerPorts,
    RegistrationError,
    WorkerLinkSettings,
    WorkerLinkSink,
    linked,
)
from pixiu_kv.sim.lmcache_link import WorkerControl

__all__ = ["LinkGroup", "open_lmcache_links"]

log = logging.getLogger(__name__)

_Request = tuple[str, WorkerControl, WorkerLinkSink]


class LinkGroup:
    """Registers instances with one controller; use :func:`open_lmcache_links`."""

    def __init__(
        self, controller_host: str, ports: ControllerPorts, settings: WorkerLinkSettings, max_links: int
    ) -> None:
        self._host = controller_host
        self._ports = ports
        self._settings = settings
        self._send, self._receive = trio.open_memory_channel[_Request](max_links)
        self._closing = trio.Event()
        self._changed = trio.Event()
        self._requested = 0
        self._processed = 0
        self.sinks: dict[str, WorkerLinkSink] = {}
        self.failed: list[str] = []
        """Instance ids whose registration failed (their sinks drop what they get)."""

    def register(self, instance_id: str, control: WorkerControl) -> WorkerLinkSink:
        """Queue ``instance_id`` for registration; its sink buffers until it is linked.

        Raises ValueError for an id already registered here, RuntimeError when the group
        is closed or ``max_links`` registrations are waiting.
        """
        if instance_id in self.sinks:
            raise ValueError(f"instance {instance_id!r} is already linked")
        if self._closing.is_set():
            raise RuntimeError("the link group is closed")
        sink = WorkerLinkSink(self._settings)
        try:
            self._send.send_nowait((instance_id, control, sink))
        except trio.WouldBlock:
            raise RuntimeError("too many registrations waiting") from None
        self.sinks[instance_id] = sink
        self._requested += 1
        return sink

    async def registered(self) -> None:
        """Wait until every registration requested so far was attempted (see ``failed``)."""
        while self._processed < self._requested:
            await self._changed.wait()

    def _mark_processed(self) -> None:
        self._processed += 1
        self._changed.set()
        self._changed = trio.Event()

    async def _run_link(
        self,
        instance_id: str,
        control: WorkerControl,
        sink: WorkerLinkSink,
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        async with linked(self._host, self._ports, instance_id, control, self._settings, sink):
            task_status.started()
            await self._closing.wait()

    async def _registrar(self, nursery: trio.Nursery) -> None:
        async with self._receive:
            async for instance_id, control, sink in self._receive:
                try:
                    await nursery.start(self._run_link, instance_id, control, sink)
                except* RegistrationError as group:
                    log.error("lmcache link %s: %s", instance_id, group.exceptions[0])
                    self.failed.append(instance_id)
                finally:
                    self._mark_processed()

    def _close(self) -> None:
        self._closing.set()
        self._send.close()


@asynccontextmanager
async def open_lmcache_links(
    controller_host: str,
    ports: ControllerPorts,
    settings: WorkerLinkSettings | None = None,
    *,
    max_links: int = 1024,
) -> AsyncIterator[LinkGroup]:
    """Yield a :class:`LinkGroup`; on exit every link flushes and deregisters.

    ``group.register`` fits ``open_fleet(chunk_sink_factory=...)``; exit the fleet first.
    ``settings`` apply to every link (keep ``worker_port`` 0 so each binds its own port).
    """
    group = LinkGroup(controller_host, ports, settings or WorkerLinkSettings(), max_links)
    body_error: BaseException | None = None
    async with trio.open_nursery() as nursery:
        nursery.start_soon(group._registrar, nursery)
        try:
            yield group
        except BaseException as exc:
            body_error = exc  # re-raised below so it does not reach the caller as an ExceptionGroup
        finally:
            group._close()
    if body_error is not None:
        raise body_error
