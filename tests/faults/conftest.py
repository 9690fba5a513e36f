"""Fixtures for the fault-injection suite: a real fleet, controller emulator and gateway."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from faults_support import Stack, open_stack


@pytest.fixture
async def stack() -> AsyncIterator[Stack]:
    async with open_stack() as running:
        yield running
