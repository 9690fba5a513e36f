"""Shared fixtures for the simulated engine tests."""

from __future__ import annotations

from collections.abc import AsyncIterator

import httpx
import pytest
from sim_helpers import RecordingSink

from pixiu_kv.sim import EngineConfig, SimEngine, serve_engine


@pytest.fixture
def sink() -> RecordingSink:
    return RecordingSink()


@pytest.fixture
def fast_config() -> EngineConfig:
    # Fast enough that HTTP tests finish in milliseconds of simulated work.
    return EngineConfig(speed=1000.0, gpu_kv_tokens=16384, cpu_tier_tokens=8192, max_model_len=8192)


@pytest.fixture
def engine(fast_config: EngineConfig) -> SimEngine:
    return SimEngine(fast_config)


@pytest.fixture
async def client(engine: SimEngine) -> AsyncIterator[httpx.AsyncClient]:
    async with serve_engine(engine) as url, httpx.AsyncClient(base_url=url, timeout=10.0) as http:
        yield http
