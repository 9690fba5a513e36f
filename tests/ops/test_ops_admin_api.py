"""The admin API against a fake gateway, over real HTTP on loopback."""

from __future__ import annotations

import httpx
from ops_fakes import FakeControl


async def test_config_endpoints_and_breakers_are_shown(admin_client: httpx.AsyncClient) -> None:
    config = await admin_client.get("/admin/config")
    assert config.status_code == 200
    assert config.json()["admin"]["token"] == "<redacted>"
    endpoints = (await admin_client.get("/admin/endpoints")).json()["endpoints"]
    assert {e["id"]: e["healthy"] for e in endpoints} == {"e1": True, "e2": False}
    assert endpoints[0]["in_flight"] == 2
    breakers = (await admin_client.get("/admin/breakers")).json()["breakers"]
    assert breakers == [{"name": "lmcache", "state": "closed", "failures": 0}]


async def test_drain_and_undrain_change_the_endpoint(admin_client: httpx.AsyncClient,
                                                    control: FakeControl) -> None:
    drained = await admin_client.post("/admin/endpoints/e1/drain")
    assert drained.status_code == 200
    assert drained.json()["draining"] is True
    assert control.endpoint_state["e1"]["draining"] is True
    listed = (await admin_client.get("/admin/endpoints")).json()["endpoints"]
    assert [e["id"] for e in listed if e["draining"]] == ["e1"]
    undrained = await admin_client.post("/admin/endpoints/e1/undrain")
    assert undrained.json()["draining"] is False
    assert control.endpoint_state["e1"]["draining"] is False


async def test_drain_of_an_unknown_endpoint_is_404(admin_client: httpx.AsyncClient) -> None:
    response = await admin_client.post("/admin/endpoints/nope/drain")
    assert response.status_code == 404
    assert response.json()["error"]["param"] == "id"
    assert "nope" in response.json()["error"]["message"]


async def test_wrong_method_is_405_with_allow(admin_client: httpx.AsyncClient) -> None:
    response = await admin_client.get("/admin/endpoints/e1/drain")
    assert response.status_code == 405
    assert response.headers["allow"] == "POST"
    assert set(response.json()["error"]) == {"message", "type", "param", "code"}
    assert (await admin_client.post("/admin/config")).status_code == 405


async def test_unknown_path_is_404_in_openai_shape(admin_client: httpx.AsyncClient) -> None:
    response = await admin_client.get("/admin/secrets")
    assert response.status_code == 404
    assert response.json()["error"]["type"] == "not_found_error"


async def test_reload_success_reports_the_new_generation(admin_client: httpx.AsyncClient) -> None:
    response = await admin_client.post("/admin/reload")
    assert response.status_code == 200
    assert response.json() == {"ok": True, "generation": 2, "error": None, "changed": ["clusters"],
                               "restart_required": []}


async def test_reload_refusal_keeps_the_old_config(admin_client: httpx.AsyncClient,
                                                   control: FakeControl) -> None:
    control.next_reload_error = "clusters[0].endpoints[0].address: 'ftp://x' is not an http:// URL"
    response = await admin_client.post("/admin/reload")
    assert response.status_code == 422
    body = response.json()
    assert body["ok"] is False
    assert body["generation"] == 1
    assert "ftp://x" in body["error"]
    assert control.generation == 1


async def test_route_explanation_forwards_the_body_and_path(admin_client: httpx.AsyncClient,
                                                            control: FakeControl) -> None:
    body = b'{"model":"m","prompt":"hello"}'
    response = await admin_client.post("/admin/route", params={"path": "/v1/completions"}, content=body)
    assert response.status_code == 200
    assert response.json()["reason"] == "cache_hit"
    assert control.routed == [("/v1/completions", body)]


async def test_route_explanation_refuses_bad_bodies(admin_client: httpx.AsyncClient,
                                                    control: FakeControl) -> None:
    bad = await admin_client.post("/admin/route", content=b"not json")
    assert bad.status_code == 400
    assert bad.json()["error"]["message"] == "body is not a JSON object"
    too_big = await admin_client.post("/admin/route", content=b"{" + b" " * 2048 + b"}")
    assert too_big.status_code == 413
    assert control.routed == []
    # The server keeps serving after refusing.
    assert (await admin_client.get("/admin/breakers")).status_code == 200


async def test_metrics_are_served_in_prometheus_text(admin_client: httpx.AsyncClient) -> None:
    response = await admin_client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain; version=0.0.4")
    assert "# TYPE pixiu_kv_requests_total counter" in response.text


async def test_token_is_required_when_configured(secured_client: httpx.AsyncClient,
                                                 control: FakeControl) -> None:
    for headers in ({}, {"authorization": "Bearer wrong"}, {"authorization": "Basic s3cret-token"},
                    {"authorization": "Bearer s3cret-token-and-more"}):
        response = await secured_client.post("/admin/endpoints/e1/drain", headers=headers)
        assert response.status_code == 401, headers
        assert response.headers["www-authenticate"].startswith("Bearer")
        assert response.json()["error"]["type"] == "authentication_error"
    assert control.endpoint_state["e1"]["draining"] is False
    assert (await secured_client.get("/metrics")).status_code == 401
    ok = await secured_client.post("/admin/endpoints/e1/drain",
                                   headers={"authorization": "Bearer s3cret-token"})
    assert ok.status_code == 200
    assert control.endpoint_state["e1"]["draining"] is True
