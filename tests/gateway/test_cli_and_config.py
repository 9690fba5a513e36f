"""Configuration loading and validation messages, the CLI, and running under hypercorn's CLI."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import trio
from gateway_support import EngineFactory, gateway_toml

from pixiu_kv.cli import embedded_default, main
from pixiu_kv.config import ConfigError, KvCacheConfig, load_config, loads_config

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "config.toml.example"
VENV_BIN = Path(sys.executable).parent

MINIMAL = """
[[clusters]]
name = "c"
[[clusters.endpoints]]
id = "e1"
address = "http://127.0.0.1:8000"
"""


def test_example_config_loads_with_the_seed_kvcache_settings() -> None:
    config = load_config(EXAMPLE)
    kv = config.kvcache
    assert isinstance(kv, KvCacheConfig)
    assert kv.enabled and kv.vllm_endpoint == "http://127.0.0.1:8000"
    assert kv.lmcache_endpoint == "http://127.0.0.1:9000"
    assert kv.lookup_routing_timeout == pytest.approx(0.05)
    assert kv.token_cache.max_size == 1024 and kv.token_cache.ttl == 600
    assert kv.cache_strategy.pin_location == "LocalCPUBackend"
    assert kv.circuit_breaker.half_open_max_calls == 2
    assert [f.name for f in config.http_filters] == ["dgp.filter.ai.kvcache", "dgp.filter.llm.proxy"]
    assert config.clusters[0].endpoints[0].retry is not None


@pytest.mark.parametrize(("extra", "fragments"), [
    ('[listener]\nport = 70000', ["listener.port", "70000", "outside [0, 65535]"]),
    ('[listener]\ngraceful_timeout = "-1s"', ["listener.graceful_timeout", "negative"]),
    ('[listener]\nmax_request_body = "lots"', ["listener.max_request_body", "is not a size"]),
    ('[listener]\nprot = 1', ["listener.prot", "unknown key"]),
    ('[log]\nformat = "xml"', ["log.format", "is not one of: json, text"]),
    ('[[routes]]\nprefix = "/v1"\ncluster = "nope"', ["routes[0].cluster", "names no cluster"]),
    ('[[routes]]\nprefix = "v1"\ncluster = "c"', ["routes[0].prefix", "must start with '/'"]),
    ('[[http_filters]]\nname = "dgp.filter.llm.proxy"\n[http_filters.config]\nidle_timeout = "0s"',
     ["http_filters[0].config.idle_timeout", "greater than 0"]),
    ('[[http_filters]]\nname = "dgp.filter.llm.proxy"\n[[http_filters]]\nname = "kvcache"',
     ["http_filters[0].name", "must be the last filter"]),
    ('[[http_filters]]\nname = "kvcache"\n[http_filters.config]\nenabled = true\n'
     '[[http_filters]]\nname = "proxy"', ["http_filters[0].config.vllm_endpoint", "required while enabled"]),
    ('[[http_filters]]\nname = "kvcache"\n[http_filters.config.cache_strategy]\nload_threshold = 1.7\n'
     '[[http_filters]]\nname = "proxy"', ["http_filters[0].config.cache_strategy.load_threshold",
                                          "outside [0, 1]"]),
    ('[[http_filters]]\nname = "kvcache"\n[http_filters.config.token_cache]\nmax_size = 0\n'
     '[[http_filters]]\nname = "proxy"', ["http_filters[0].config.token_cache.max_size", "at least 1"]),
])
def test_bad_configs_name_the_field(extra: str, fragments: list[str]) -> None:
    with pytest.raises(ConfigError) as info:
        loads_config(MINIMAL + extra)
    for fragment in fragments:
        assert fragment in str(info.value), str(info.value)


@pytest.mark.parametrize(("text", "fragments"), [
    (MINIMAL.replace('"http://127.0.0.1:8000"', '"ftp://x"'),
     ["clusters[0].endpoints[0].address", "not an http"]),
    (MINIMAL + '\n[clusters.retry]\npolicy = "sometimes"',
     ["clusters[0].retry.policy", "is not one of"]),
    (MINIMAL + '[[clusters]]\nname = "d"\n[[clusters.endpoints]]\nid = "e1"\naddress = "http://h:1"\n'
     '[[routes]]\ncluster = "c"\n', ["clusters[1].endpoints[0].id", "duplicate endpoint id"]),
    ('[[clusters]]\nname = "c"\nendpoints = []', ["clusters[0].endpoints", "is empty"]),
])
def test_bad_cluster_configs_name_the_field(text: str, fragments: list[str]) -> None:
    with pytest.raises(ConfigError) as info:
        loads_config(text)
    for fragment in fragments:
        assert fragment in str(info.value), str(info.value)


def test_check_config_prints_effective_config_with_secrets_redacted(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "gw.toml"
    path.write_text(MINIMAL.replace('address = "http://127.0.0.1:8000"',
                                    'address = "http://127.0.0.1:8000"\napi_key = "sk-very-secret"')
                    + '[admin]\ntoken = "admin-secret"\n')
    assert main(["check-config", str(path)]) == 0
    out = capsys.readouterr().out
    data = json.loads(out)
    assert data["clusters"][0]["endpoints"][0]["api_key"] == "<redacted>"
    assert data["admin"]["token"] == "<redacted>"
    assert "sk-very-secret" not in out and "admin-secret" not in out
    assert data["listener"]["graceful_timeout"] == "30s"


def test_check_config_reports_errors_with_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(MINIMAL + '[listener]\nkeep_alive_timeout = "soon"\n')
    assert main(["check-config", str(path)]) == 2
    err = capsys.readouterr().err
    assert "listener.keep_alive_timeout" in err and "'soon'" in err
    assert main(["check-config", str(tmp_path / "missing.toml")]) == 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


async def _run_until_ready(argv: list[str], env: dict[str, str], url: str) -> trio.Process:
    process = await trio.lowlevel.open_process(argv, env=env, stdout=subprocess.DEVNULL,
                                               stderr=subprocess.DEVNULL)
    async with httpx.AsyncClient(timeout=2.0) as http:
        with trio.fail_after(30):
            while True:
                assert process.poll() is None, f"{argv[0]} exited with {process.returncode}"
                try:
                    if (await http.get(url + "/ready")).status_code == 200:
                        return process
                except httpx.TransportError:
                    pass
                await trio.sleep(0.05)


async def _stop(process: trio.Process, sig: int = signal.SIGTERM) -> int:
    if process.poll() is None:
        process.send_signal(sig)
    with trio.move_on_after(15):
        return await process.wait()
    process.kill()
    return await process.wait()


@pytest.mark.parametrize("runner", ["hypercorn", "pixiu-kv"])
async def test_served_by_hypercorn_cli_and_pixiu_kv_serve(
        start_engine: EngineFactory, tmp_path: Path, runner: str) -> None:
    engine = await start_engine("e1")
    path = tmp_path / "gw.toml"
    path.write_text(gateway_toml([engine]))
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "PIXIU_KV_CONFIG": str(path)}
    if runner == "hypercorn":
        argv = [str(VENV_BIN / "hypercorn"), "-k", "trio", "--bind", f"127.0.0.1:{port}",
                "pixiu_kv.app:create_app()"]
    else:
        argv = [str(VENV_BIN / "pixiu-kv"), "serve", "--port", str(port)]
    process = await _run_until_ready(argv, env, url)
    try:
        async with httpx.AsyncClient(base_url=url, timeout=10.0) as http:
            r = await http.post("/v1/completions", json={"prompt": "p"})
            assert r.status_code == 200
            assert r.headers["x-pixiu-kv-endpoint"] == "e1"
    finally:
        code = await _stop(process)
    if runner == "pixiu-kv":
        assert code == 0  # SIGTERM is a graceful stop


@pytest.mark.parametrize("command", ["sim", "bench"])
def test_sim_and_bench_are_delegated(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main([command, "--help"])
    assert info.value.code == 0
    assert "usage:" in capsys.readouterr().out


async def test_the_embedded_default_tells_the_router_what_the_engines_hold() -> None:
    from pixiu_kv.sim.fleet import open_fleet

    async with open_fleet(2) as fleet:
        config = embedded_default(fleet)
    kv = config.kvcache
    assert kv is not None and kv.routing.enabled
    engine = fleet.engines[0].engine.config
    assert kv.routing.engine_kv_tokens == engine.gpu_kv_tokens
    assert kv.routing.engine_cache_tokens == max(engine.gpu_kv_tokens, engine.cpu_tier_tokens)
    assert [e.id for e in config.clusters[0].endpoints] == [e.instance_id for e in fleet.engines]


async def test_serve_without_config_runs_the_embedded_fleet_with_the_kvcache_filter() -> None:
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    env = {k: v for k, v in os.environ.items() if k != "PIXIU_KV_CONFIG"}
    process = await _run_until_ready([str(VENV_BIN / "pixiu-kv"), "serve", "--port", str(port)], env, url)
    try:
        async with httpx.AsyncClient(base_url=url, timeout=20.0) as http:
            models = (await http.get("/v1/models")).json()["data"]
            shared = "the embedded default " * 120
            body = {"model": models[0]["id"], "prompt": shared + "first question", "max_tokens": 2}
            r = await http.post("/v1/completions", json=body)
            assert r.status_code == 200, r.text
            assert r.headers["x-pixiu-kv-endpoint"].startswith("engine-")
            # The kvcache filter ran and explained its decision.
            assert "reason=" in r.headers["x-pixiu-kv-route"]
            # Its router is on: a new prompt sharing that prefix, seen for the first time,
            # goes where the prefix is cached.
            again = await http.post("/v1/completions", json=body | {"prompt": shared + "another one"})
            assert again.status_code == 200, again.text
            assert again.headers["x-pixiu-kv-endpoint"] == r.headers["x-pixiu-kv-endpoint"]
            assert "reason=cache" in again.headers["x-pixiu-kv-route"]
            assert again.json()["usage"]["prompt_tokens_details"]["cached_tokens"] > 0
    finally:
        assert await _stop(process) == 0


async def test_serve_reports_a_busy_port_and_exits_1(tmp_path: Path) -> None:
    path = tmp_path / "gw.toml"
    path.write_text(MINIMAL)
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = await trio.run_process([str(VENV_BIN / "pixiu-kv"), "serve", "--config", str(path),
                                         "--port", str(port)], capture_stdout=True, capture_stderr=True,
                                        check=False)
    assert result.returncode == 1
    assert b"cannot serve" in result.stderr and b"in use" in result.stderr
