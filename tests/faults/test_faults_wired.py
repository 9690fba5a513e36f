"""The operations features wired into the gateway: /metrics, the admin listener, hot
reload (file, SIGHUP) with in-flight requests finishing on their configuration."""

from __future__ import annotations

import signal
import sys
from pathlib import Path
from subprocess import PIPE

import attrs
import httpx
import pytest
import trio
from faults_support import (
    ENGINE,
    Stack,
    chat,
    gateway_toml,
    partial_process,
    prompt,
    raw_stream,
    read_line,
    run_fleet,
    stream_chat,
    wait_until,
)

from pixiu_kv.app import GatewayApp, serve
from pixiu_kv.config import load_config, loads_config
from pixiu_kv.sim.fleet import open_fleet

if not hasattr(GatewayApp, "reload"):
    pytest.skip("the gateway core does not expose metrics, admin and reload yet", allow_module_level=True)


def metric(text: str, line_start: str) -> float:
    for line in text.splitlines():
        if line.startswith(line_start + " "):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"no sample {line_start}")


async def test_gateway_metrics_count_requests_routes_usage_and_disconnects(stack: Stack) -> None:
    text = prompt("wired-metrics")
    await stack.warm(text)
    # A client that leaves mid-stream.
    for index in (0, 1):
        stack.engine(index).set_faults(slow_stream_s=0.05)
    left = await raw_stream(stack.url, chat(text, max_tokens=200), leave_after_first_event=True)
    assert left.status == 200
    await wait_until(stack.idle)
    exposition = (await stack.client.get("/metrics")).text
    assert metric(exposition, 'pixiu_kv_routing_decisions_total{outcome="cache_hit"}') >= 2
    assert metric(exposition, 'pixiu_kv_routing_decisions_total{outcome="no_tokens"}') >= 1
    assert metric(exposition, "pixiu_kv_prompt_tokens_total") > 0
    assert metric(exposition, "pixiu_kv_cached_prompt_tokens_total") > 0
    assert 0 < metric(exposition, "pixiu_kv_observed_cache_hit_ratio") < 1
    assert metric(exposition, 'pixiu_kv_client_disconnects_total{phase="streaming"}') == 1
    assert metric(exposition, "pixiu_kv_requests_in_flight") == 0
    assert metric(exposition, 'pixiu_kv_endpoint_healthy{cluster="fleet",endpoint="engine-0"}') == 1
    assert 'pixiu_kv_lookup_duration_seconds_count{outcome="hit"}' in exposition
    assert 'pixiu_kv_time_to_first_byte_seconds_count{cluster="fleet"}' in exposition


async def test_admin_listener_is_separate_and_protected() -> None:
    async with open_fleet(3, ENGINE) as fleet:
        assert fleet.controller_url is not None
        config = loads_config(gateway_toml(
            [(e.instance_id, e.url) for e in fleet.engines[:2]], tokenizer_url=fleet.engines[2].url,
            lmcache_url=fleet.controller_url))
        config = attrs.evolve(config, admin=attrs.evolve(config.admin, enabled=True, port=0, token="s3"))
        async with trio.open_nursery() as nursery:
            stop = trio.Event()
            running = await nursery.start(lambda task_status: serve(
                config, port=0, shutdown_trigger=stop.wait, task_status=task_status))
            assert running.admin_url is not None and running.admin_url != running.url
            async with httpx.AsyncClient(base_url=running.admin_url, timeout=10) as admin:
                assert (await admin.get("/admin/endpoints")).status_code == 401
                auth = {"authorization": "Bearer s3"}
                endpoints = (await admin.get("/admin/endpoints", headers=auth)).json()["endpoints"]
                assert [e["id"] for e in endpoints] == ["engine-0", "engine-1"]
                config_view = (await admin.get("/admin/config", headers=auth)).json()
                assert config_view["admin"]["token"] == "<redacted>"
                drained = await admin.post("/admin/endpoints/engine-0/drain", headers=auth)
                assert drained.json()["draining"] is True
            async with httpx.AsyncClient(base_url=running.url, timeout=10) as client:
                for _ in range(3):
                    r = await client.post("/v1/chat/completions", json=chat("x", stream=False))
                    assert r.headers["x-pixiu-kv-endpoint"] == "engine-1"
                # The admin API is not on the public listener.
                assert (await client.get("/admin/endpoints")).status_code == 404
            stop.set()


async def test_reload_swaps_atomically_and_refuses_bad_files(tmp_path: Path) -> None:
    async with open_fleet(3, attrs.evolve(ENGINE, faults=attrs.evolve(ENGINE.faults, slow_stream_s=0.2))
                          ) as fleet:
        assert fleet.controller_url is not None
        engines = [(e.instance_id, e.url) for e in fleet.engines]
        path = tmp_path / "gateway.toml"

        def write(endpoints: list[tuple[str, str]]) -> None:
            path.write_text(gateway_toml(endpoints, tokenizer_url=engines[2][1],
                                         lmcache_url=fleet.controller_url, kvcache=False), encoding="utf-8")

        write(engines[:1])
        async with trio.open_nursery() as nursery:
            stop = trio.Event()
            running = await nursery.start(lambda task_status: serve(
                load_config(path), port=0, shutdown_trigger=stop.wait, config_path=str(path),
                task_status=task_status))
            app = running.app
            results = []

            async def long_stream() -> None:
                results.append(await raw_stream(running.url, chat("in flight", max_tokens=15)))

            nursery.start_soon(long_stream)
            await wait_until(lambda: app.runtime is not None
                             and app.runtime.clusters["fleet"].endpoints[0].in_flight == 1)
            old_runtime = app.runtime
            write(engines[1:2])
            result = await app.reload()
            assert result.ok and result.generation == 2 and result.changed == ("clusters",)
            assert app.runtime is not old_runtime
            async with httpx.AsyncClient(base_url=running.url, timeout=10) as client:
                r = await client.post("/v1/chat/completions", json=chat("new", stream=False))
                assert r.headers["x-pixiu-kv-endpoint"] == "engine-1"
                # An invalid file is refused; the running configuration stays.
                path.write_text("[[clusters]]\nname = 1\n", encoding="utf-8")
                refused = await app.reload()
                assert not refused.ok and "clusters[0]" in (refused.error or "")
                r = await client.post("/v1/chat/completions", json=chat("still", stream=False))
                assert r.headers["x-pixiu-kv-endpoint"] == "engine-1"
                exposition = (await client.get("/metrics")).text
                assert metric(exposition, 'pixiu_kv_config_reloads_total{outcome="refused"}') == 1
                assert metric(exposition, "pixiu_kv_config_generation") == 2
            await wait_until(lambda: bool(results))
            # The stream that began before the reload finished on the old configuration.
            assert results[0].status == 200 and results[0].done
            stop.set()


async def test_sighup_reloads_the_serving_process(tmp_path: Path) -> None:
    with trio.fail_after(60):
        async with run_fleet() as fleet, trio.open_nursery() as nursery:
            path = tmp_path / "gateway.toml"

            def write(endpoints: list[tuple[str, str]]) -> None:
                text = gateway_toml(endpoints, tokenizer_url=fleet.engines[2][1],
                                    lmcache_url=fleet.controller_url, listener="port = 0")
                path.write_text(text + '\n[admin]\nenabled = true\nport = 0\n', encoding="utf-8")

            write(list(fleet.engines[:1]))
            gateway: trio.Process = await nursery.start(partial_process(
                [sys.executable, "-c", "import sys; from pixiu_kv.cli import main; sys.exit(main())",
                 "serve", "--config", str(path)], stdout=PIPE))
            assert gateway.stdout is not None
            buffer = bytearray()
            urls: dict[str, str] = {}
            while "admin" not in urls:
                line = await read_line(gateway.stdout, buffer)
                if "listening on" in line:
                    urls["gateway"] = line.rsplit(" ", 1)[1]
                if "admin API on" in line:
                    urls["admin"] = line.rsplit(" ", 1)[1]
            async with httpx.AsyncClient(timeout=10) as client:
                assert (await client.get(urls["admin"] + "/admin/config")).json()["generation"] == 1
                write(list(fleet.engines[:2]))
                gateway.send_signal(signal.SIGHUP)
                with trio.fail_after(20):
                    while True:  # the signal is handled asynchronously: poll the generation
                        if (await client.get(urls["admin"] + "/admin/config")).json()["generation"] == 2:
                            break
                        await trio.sleep(0.05)
                endpoints = (await client.get(urls["admin"] + "/admin/endpoints")).json()["endpoints"]
                assert [e["id"] for e in endpoints] == ["engine-0", "engine-1"]
            gateway.send_signal(signal.SIGTERM)
            with trio.fail_after(20):
                assert await gateway.wait() == 0


async def test_upstream_failures_retries_and_failovers_are_counted(stack: Stack) -> None:
    from pixiu_kv.filters import llm_proxy
    if not hasattr(llm_proxy, "FAILURES_KEY"):
        pytest.skip("the LLM proxy does not record failures by kind yet")
    stack.engine(0).set_faults(dead=True)
    for i in range(4):
        result = await stream_chat(stack.client, chat(prompt(f"wired-failover-{i}")))
        assert result.status == 200 and result.done
    exposition = (await stack.client.get("/metrics")).text
    assert metric(exposition, 'pixiu_kv_upstream_errors_total{endpoint="engine-0",kind="status_5xx"}') >= 1
    assert metric(exposition, 'pixiu_kv_upstream_failovers_total{cluster="fleet"}') >= 1
    assert metric(exposition, 'pixiu_kv_upstream_retries_total{endpoint="engine-0"}') >= 1
    stack.engine(0).set_faults(dead=False)
