"""An in-process LMCache controller emulator with the real controller's HTTP API.

Simulated engines register in-process (:meth:`ControllerEmulator.register`) and report
the chunk keys their CPU tier admits and evicts through the returned
:class:`~pixiu_kv.sim.lmcache_link.ChunkSink`; the emulator answers ``POST /lookup``
and the other routes of ``lmcache_controller`` 0.5.6 from that index, with the same
shapes, status codes and lookup rule (see ``docs/lmcache.md``).

Extensions for testing a gateway against Pixiu-style controllers and against failures:
``POST /evict {"tokens","instance_id"}`` (switchable off, then 404 like the real one),
the Pixiu object form of ``layout_info`` values (``{"0": location, "1": count}``),
and injected faults (:class:`Faults`).
"""

from __future__ import annotations

import random
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager

import attrs

from pixiu_kv.sim._controller_api import EmulatorState
from pixiu_kv.sim._controller_asgi import ControllerAsgi, FaultBox, Faults
from pixiu_kv.sim._controller_index import ChunkIndex
from pixiu_kv.sim._controller_memtier import MemoryTier
from pixiu_kv.sim._serving import DEFAULT_SERVER, ServerKind, serving
from pixiu_kv.sim.lmcache_link import CHUNK_SIZE, ChunkSink, WorkerControl

__all__ = ["ControllerEmulator", "Faults", "MemoryTier", "open_controller_emulator"]


@attrs.define(slots=True, eq=False)
class _IndexSink:
    """The ChunkSink of one registered instance: updates the index synchronously."""

    _index: ChunkIndex
    _instance_id: str

    def admit(self, keys: Sequence[int]) -> None:
        self._index.admit(self._instance_id, keys)

    def evict(self, keys: Sequence[int]) -> None:
        self._index.evict(self._instance_id, keys)


class ControllerEmulator:
    """The emulated controller: its index, its switches and its ASGI app.

    Use :func:`open_controller_emulator` to serve it; ``url`` is set while it is served.
    """

    def __init__(
        self,
        *,
        object_form: bool = False,
        evict_enabled: bool = True,
        move_enabled: bool = False,
        strict_bodies: bool = False,
        faults: Faults | None = None,
        max_keys: int = 1_000_000,
        max_body_bytes: int = 8 * 1024 * 1024,
        chunk_size: int = CHUNK_SIZE,
        seed: int = 0,
    ) -> None:
        self._state = EmulatorState(
            index=ChunkIndex(max_keys=max_keys, chunk_size=chunk_size),
            object_form=object_form,
            evict_enabled=evict_enabled,
            move_enabled=move_enabled,
            strict_bodies=strict_bodies,
        )
        self._faults = FaultBox(faults=faults or Faults(), rng=random.Random(seed))
        self.app = ControllerAsgi(self._state, self._faults, max_body_bytes=max_body_bytes)
        self.url: str = ""

    # -- registration (in-process workers) ----------------------------------------------

    def register(self, instance_id: str, control: WorkerControl) -> ChunkSink:
        """Register an instance; returns the sink its CPU tier reports chunk keys to.

        Registration order decides lookups (first-registered holder of a chunk wins).
        Registering an id again keeps its place, replaces its control and forgets its
        keys, as the real controller does for a worker that registers twice.
        """
        if not instance_id:
            raise ValueError("instance_id must not be empty")
        self._state.index.register(instance_id)
        self._state.controls[instance_id] = control
        return _IndexSink(self._state.index, instance_id)

    def deregister(self, instance_id: str) -> bool:
        """Drop an instance and all its keys. False if it was not registered."""
        self._state.controls.pop(instance_id, None)
        return self._state.index.deregister(instance_id)

    # -- run-time switches ---------------------------------------------------------------

    @property
    def object_form(self) -> bool:
        """Answer lookups with Pixiu's ``{"0": location, "1": count}`` values."""
        return self._state.object_form

    @object_form.setter
    def object_form(self, value: bool) -> None:
        self._state.object_form = value

    @property
    def evict_enabled(self) -> bool:
        """Offer ``POST /evict``; when off it is 404 like on the real controller."""
        return self._state.evict_enabled

    @evict_enabled.setter
    def evict_enabled(self, value: bool) -> None:
        self._state.evict_enabled = value

    @property
    def move_enabled(self) -> bool:
        """Acknowledge ``/move`` between registered instances instead of failing with 500."""
        return self._state.move_enabled

    @move_enabled.setter
    def move_enabled(self, value: bool) -> None:
        self._state.move_enabled = value

    @property
    def strict_bodies(self) -> bool:
        """Reject unknown fields and non-integer tokens (the real controller coerces)."""
        return self._state.strict_bodies

    @strict_bodies.setter
    def strict_bodies(self, value: bool) -> None:
        self._state.strict_bodies = value

    @property
    def faults(self) -> Faults:
        return self._faults.faults

    @faults.setter
    def faults(self, value: Faults) -> None:
        self._faults.set(value)

    def release_hangs(self) -> None:
        """Let every request held by a ``hang`` fault proceed."""
        self._faults.release()

    @property
    def held_requests(self) -> int:
        """Requests currently held by a ``hang`` fault."""
        return self._faults.held

    async def wait_held_requests(self, count: int) -> None:
        """Wait until at least ``count`` requests are held by a ``hang`` fault."""
        await self._faults.wait_held(count)

    # -- observation ---------------------------------------------------------------------

    @property
    def index(self) -> ChunkIndex:
        return self._state.index

    def request_count(self, path: str) -> int:
        """How many requests reached ``path`` (faulted ones included)."""
        return self._state.requests[path]

    @property
    def injected_faults(self) -> int:
        return self._faults.injected


@asynccontextmanager
async def open_controller_emulator(
    emulator: ControllerEmulator | None = None, *, host: str = "127.0.0.1", port: int = 0,
    server: ServerKind = DEFAULT_SERVER,
) -> AsyncIterator[ControllerEmulator]:
    """Serve ``emulator`` (a default one if None) on ``host:port`` (0 = any free port), on
    the lean server by default or on hypercorn. ``emulator.url`` is its base URL; the
    server stops when the block exits.
    """
    emulator = emulator or ControllerEmulator()
    body_error: BaseException | None = None
    async with serving(emulator.app, host=host, port=port, server=server) as url:
        emulator.url = url
        try:
            yield emulator
        except BaseException as exc:
            body_error = exc  # re-raised below so it does not reach the caller as an ExceptionGroup
        finally:
            emulator.release_hangs()
    if body_error is not None:
        raise body_error
