"""Fixtures for the operations tests: a fake gateway control and a real admin server."""

from __future__ import annotations

from collections.abc import AsyncIterator

import httpx
import pytest
import trio
from ops_fakes import FakeControl, serve_asgi

from pixiu_kv.admin import AdminApp
from pixiu_kv.metrics import GatewayMetrics


@pytest.fixture
def control() -> FakeControl:
    return FakeControl()


@pytest.fixture
def metrics() -> GatewayMetrics:
    return GatewayMetrics()


@pytest.fixture
async def admin_client(nursery: trio.Nursery, control: FakeControl,
                       metrics: GatewayMetrics) -> AsyncIterator[httpx.AsyncClient]:
    url = await serve_asgi(nursery, AdminApp(control, metrics=metrics, max_body=1024))
    async with httpx.AsyncClient(base_url=url, timeout=10.0) as client:
        yield client


@pytest.fixture
async def secured_client(nursery: trio.Nursery, control: FakeControl,
                         metrics: GatewayMetrics) -> AsyncIterator[httpx.AsyncClient]:
    url = await serve_asgi(nursery, AdminApp(control, token="s3cret-token", metrics=metrics))
    async with httpx.AsyncClient(base_url=url, timeout=10.0) as client:
        yield client
