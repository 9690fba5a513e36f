"""A fleet of simulated engines on loopback, optionally with the controller emulator.

``open_fleet`` serves N engines (port 0 unless told) inside its own nursery, registers
each engine's CPU tier with the controller (the in-process emulator by default, or any
``chunk_sink_factory``), and stops them all on exit. Instance ids are ``engine-0`` ..
``engine-{N-1}``: the LMCache instance id equals the gateway endpoint id (the routing contract).

Engines and the emulator are served by the lean trio server of :mod:`._http_server` by
default (``server="lean"``): it costs a fraction of hypercorn's CPU per request, so the
simulator does not distort gateway measurements. ``server="hypercorn"`` serves them
with hypercorn's trio worker instead.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from typing import TYPE_CHECKING, Any

import attrs

from ._serving import DEFAULT_SERVER, SERVER_KINDS, ServerKind, serving
from .engine import SimEngine
from .engine_config import EngineConfig
from .lmcache_link import ChunkSink, WorkerControl

if TYPE_CHECKING:
    from .controller import ControllerEmulator

__all__ = ["DEFAULT_SERVER", "SERVER_KINDS", "ChunkSinkFactory", "Fleet", "FleetEngine", "ServerKind",
           "open_fleet", "serve_engine"]

ChunkSinkFactory = Callable[[str, WorkerControl], ChunkSink]
"""``(instance_id, worker_control) -> sink`` the engine's CPU tier reports to."""


@attrs.frozen
class FleetEngine:
    instance_id: str
    url: str
    """Base URL, e.g. ``http://127.0.0.1:40123`` (the OpenAI base is ``url + "/v1"``)."""
    engine: SimEngine


@attrs.frozen
class Fleet:
    engines: tuple[FleetEngine, ...]
    controller_url: str | None = None
    controller: ControllerEmulator | None = None
    """The controller emulator when the fleet runs one."""

    @property
    def urls(self) -> list[str]:
        return [e.url for e in self.engines]

    def by_id(self, instance_id: str) -> FleetEngine:
        for entry in self.engines:
            if entry.instance_id == instance_id:
                return entry
        raise KeyError(instance_id)


@asynccontextmanager
async def serve_engine(engine: SimEngine, *, host: str = "127.0.0.1", port: int = 0,
                       server: ServerKind = DEFAULT_SERVER) -> AsyncIterator[str]:
    """Serve one engine until the block exits; yields its base URL."""
    async with serving(engine, host=host, port=port, server=server) as url:
        yield url


def _engine_configs(count: int, base: EngineConfig, overrides: Sequence[dict[str, Any]] | None
                    ) -> list[EngineConfig]:
    if count < 1:
        raise ValueError("a fleet needs at least one engine")
    if overrides is not None and len(overrides) != count:
        raise ValueError("per-engine overrides must name every engine")
    configs = []
    for index in range(count):
        changes: dict[str, Any] = {"instance_id": f"engine-{index}"}
        if overrides is not None:
            changes.update(overrides[index])
        configs.append(attrs.evolve(base, **changes))
    return configs


@asynccontextmanager
async def open_fleet(
    count: int = 4,
    config: EngineConfig | None = None,
    *,
    host: str = "127.0.0.1",
    base_port: int = 0,
    per_engine: Sequence[dict[str, Any]] | None = None,
    controller: bool = True,
    controller_port: int = 0,
    chunk_sink_factory: ChunkSinkFactory | None = None,
    server: ServerKind = DEFAULT_SERVER,
) -> AsyncIterator[Fleet]:
    """Serve ``count`` engines built from ``config`` (instance ids ``engine-i``).

    ``base_port`` 0 picks free ports; otherwise engine ``i`` listens on ``base_port + i``.
    ``per_engine`` gives field overrides for each engine (e.g. a fault on one of them).
    With ``chunk_sink_factory`` the engines report to it and no emulator is started;
    otherwise, when ``controller`` is true, the in-process controller emulator is served
    and every engine registered with it, in index order. ``server`` picks the engines'
    HTTP server (``"lean"``, the default, or ``"hypercorn"``).
    """
    if server not in SERVER_KINDS:
        raise ValueError(f"unknown server {server!r}; expected one of {SERVER_KINDS}")
    configs = _engine_configs(count, config or EngineConfig(), per_engine)
    engines = [SimEngine(c) for c in configs]
    async with AsyncExitStack() as stack:
        controller_url: str | None = None
        emulator: ControllerEmulator | None = None
        factory = chunk_sink_factory
        if factory is None and controller:
            from .controller import open_controller_emulator

            emulator = await stack.enter_async_context(open_controller_emulator(
                host=host, port=controller_port, server=server))
            controller_url = emulator.url
            factory = emulator.register
        if factory is not None:
            for engine in engines:
                engine.attach_chunk_sink(factory(engine.instance_id, engine.worker_control))
        entries = []
        for index, engine in enumerate(engines):
            port = base_port + index if base_port else 0
            url = await stack.enter_async_context(serve_engine(engine, host=host, port=port,
                                                                   server=server))
            entries.append(FleetEngine(engine.instance_id, url, engine))
        yield Fleet(tuple(entries), controller_url, emulator)
