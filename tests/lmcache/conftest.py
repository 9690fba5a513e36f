"""Fixtures for the LMCache side of the simulated fleet: a served controller emulator."""

from __future__ import annotations

from collections.abc import AsyncIterator

import httpx
import pytest

from pixiu_kv.sim.controller import ControllerEmulator, open_controller_emulator


@pytest.fixture
async def emulator() -> AsyncIterator[ControllerEmulator]:
    async with open_controller_emulator() as served:
        yield served


@pytest.fixture
async def client(emulator: ControllerEmulator) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=emulator.url, timeout=10.0) as http:
        yield http
