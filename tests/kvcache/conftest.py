"""Fixtures of the kvcache tests (helpers live in kv_fakes.py)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
import trio
from kv_fakes import FakeUpstream, serve_asgi


@pytest.fixture
async def upstream(nursery: trio.Nursery) -> AsyncIterator[tuple[FakeUpstream, str]]:
    fake = FakeUpstream()
    url = await serve_asgi(nursery, fake)
    yield fake, url
    fake.release.set()
