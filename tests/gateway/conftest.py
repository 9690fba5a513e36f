"""Fixtures for gateway tests (helpers live in gateway_support.py)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from functools import partial
from typing import Any

import pytest
import trio
from gateway_support import EngineFactory, FakeEngine
from hypercorn.config import Config as HypercornConfig
from hypercorn.trio import serve as hypercorn_serve


@pytest.fixture
async def start_engine(nursery: trio.Nursery) -> AsyncIterator[EngineFactory]:
    engines: list[FakeEngine] = []

    async def start(name: str = "e1", *, keep_alive_timeout: float = 5.0, **kwargs: Any) -> FakeEngine:
        engine = FakeEngine(name, **kwargs)
        cfg = HypercornConfig()
        cfg.bind = ["127.0.0.1:0"]
        cfg.graceful_timeout = 0.5
        cfg.keep_alive_timeout = keep_alive_timeout
        cfg.accesslog = None
        binds = await nursery.start(partial(hypercorn_serve, engine, cfg,  # type: ignore[arg-type]
                                            shutdown_trigger=engine.stop.wait))
        engine.url = binds[0]
        engine.port = int(engine.url.rsplit(":", 1)[1])
        engines.append(engine)
        return engine

    yield start
    for engine in engines:
        engine.stop.set()


