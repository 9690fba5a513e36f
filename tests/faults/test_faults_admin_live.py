"""The admin API and metrics against a real gateway, fleet and controller emulator."""

from __future__ import annotations

from collections.abc import AsyncIterator

import httpx
import pytest
import trio
from faults_support import Stack, chat, open_stack, prompt, serve_asgi, stream_chat, wait_until

from pixiu_kv.admin import AdminApp
from pixiu_kv.control import DrainSet, GatewayController, snapshot
from pixiu_kv.metrics import GatewayMetrics
from pixiu_kv.sim.controller import Faults


@pytest.fixture
async def live(nursery: trio.Nursery) -> AsyncIterator[tuple[Stack, httpx.AsyncClient, GatewayMetrics]]:
    async with open_stack() as stack:
        drained = DrainSet()
        controller = GatewayController(lambda: stack.gateway.app.runtime, drained)  # type: ignore[arg-type,return-value]
        metrics = GatewayMetrics()
        metrics.set_state_source(lambda: snapshot(stack.gateway.app.runtime, drained, 1))  # type: ignore[arg-type]
        url = await serve_asgi(nursery, AdminApp(controller, token="t0k", metrics=metrics))
        async with httpx.AsyncClient(base_url=url, timeout=10.0,
                                     headers={"authorization": "Bearer t0k"}) as admin:
            yield stack, admin, metrics


async def test_endpoints_config_and_breakers_are_live(live: tuple[Stack, httpx.AsyncClient, GatewayMetrics]
                                                      ) -> None:
    stack, admin, _ = live
    endpoints = (await admin.get("/admin/endpoints")).json()["endpoints"]
    assert [e["id"] for e in endpoints] == ["engine-0", "engine-1"]
    assert all(e["healthy"] and not e["draining"] for e in endpoints)
    config = (await admin.get("/admin/config")).json()
    assert config["clusters"][0]["name"] == "fleet"
    breakers = {b["name"]: b["state"] for b in (await admin.get("/admin/breakers")).json()["breakers"]}
    assert breakers["lookup_routing"] == "closed"
    text = prompt("admin-breakers")
    await stack.warm(text)
    stack.controller.faults = Faults(error_rate=1.0)
    for _ in range(3):
        assert (await stream_chat(stack.client, chat(text))).status == 200
    breakers = {b["name"]: b["state"] for b in (await admin.get("/admin/breakers")).json()["breakers"]}
    assert breakers["lookup_routing"] == "open"
    stack.controller.faults = Faults()
    await wait_until(stack.idle)


async def test_route_explanation_shows_the_decision_without_forwarding(
        live: tuple[Stack, httpx.AsyncClient, GatewayMetrics]) -> None:
    stack, admin, _ = live
    text = prompt("admin-explain")
    routed = await stack.warm(text)
    served_before = sum(e.engine.metrics.requests_finished for e in stack.fleet.engines)
    response = await admin.post("/admin/route", json=chat(text))
    assert response.status_code == 200
    explained = response.json()
    assert explained["route"]["cluster"] == "fleet"
    assert explained["hint"]["reason"] == "kv_prefix"
    assert explained["hint"]["endpoint_id"] == routed.route["hinted"]
    assert explained["hint"]["prompt_tokens"] > explained["hint"]["matched_tokens"] > 0
    assert explained["decision"] == {"endpoint": routed.route["hinted"], "balanced_among": [],
                                     "lb_policy": "round_robin", "outcome": "cache_hit"}
    assert len(explained["endpoints"]) == 2
    assert sum(e.engine.metrics.requests_finished for e in stack.fleet.engines) == served_before
    bad = await admin.post("/admin/route", content=b"[1, 2]")
    assert bad.status_code == 400


async def test_drain_is_shown_and_explained(live: tuple[Stack, httpx.AsyncClient, GatewayMetrics]) -> None:
    stack, admin, metrics = live
    text = prompt("admin-drain")
    routed = await stack.warm(text)
    preferred = routed.route["hinted"]
    drained = await admin.post(f"/admin/endpoints/{preferred}/drain")
    assert drained.json()["draining"] is True
    explained = (await admin.post("/admin/route", json=chat(text))).json()
    assert explained["decision"]["endpoint"] is None
    assert explained["decision"]["outcome"] == "preferred_unhealthy"
    assert preferred not in explained["decision"]["balanced_among"]
    assert metrics.value("pixiu_kv_endpoint_draining", {"cluster": "fleet", "endpoint": preferred}) == 1.0
    # The proxy honours it: the prompt's preferred endpoint takes no new request.
    for _ in range(3):
        result = await stream_chat(stack.client, chat(text))
        assert result.status == 200 and result.done
        assert result.headers["x-pixiu-kv-endpoint"] != preferred
    assert (await admin.post(f"/admin/endpoints/{preferred}/undrain")).json()["draining"] is False
    assert metrics.value("pixiu_kv_endpoint_draining", {"cluster": "fleet", "endpoint": preferred}) == 0.0


async def test_metrics_scrape_reads_the_live_gateway(live: tuple[Stack, httpx.AsyncClient, GatewayMetrics]
                                                     ) -> None:
    stack, admin, _ = live
    await stack.warm(prompt("admin-metrics"))
    text = (await admin.get("/metrics")).text
    assert 'pixiu_kv_endpoint_healthy{cluster="fleet",endpoint="engine-0"} 1.0' in text
    assert 'pixiu_kv_kvcache_lookups_total{outcome="routed"}' in text
    assert "pixiu_kv_token_cache_entries 1.0" in text
    assert 'pixiu_kv_circuit_breaker_state{breaker="lookup_routing",state="closed"} 1.0' in text
