"""A fleet on loopback, wired to the controller emulator or to any chunk sink."""

from __future__ import annotations

import httpx
import pytest
from sim_helpers import RecordingSink, words

from pixiu_kv.sim import EngineConfig, open_fleet
from pixiu_kv.sim.cli import main as cli_main
from pixiu_kv.sim.lmcache_link import WorkerControl, chunk_keys

CONFIG = EngineConfig(speed=1000.0, gpu_kv_tokens=16384, cpu_tier_tokens=8192, max_model_len=8192)


async def test_controller_lookup_finds_the_engine_that_served_a_prompt() -> None:
    async with open_fleet(3, CONFIG) as fleet, httpx.AsyncClient(timeout=10) as http:
        assert [e.instance_id for e in fleet.engines] == ["engine-0", "engine-1", "engine-2"]
        assert fleet.controller_url is not None
        prompt = words(700)
        target = fleet.by_id("engine-1")
        reply = await http.post(target.url + "/v1/completions", json={"prompt": prompt, "max_tokens": 1})
        assert reply.status_code == 200
        tokens = (await http.post(target.url + "/tokenize", json={"prompt": prompt})).json()["tokens"]
        lookup = (await http.post(fleet.controller_url + "/lookup", json={"tokens": tokens})).json()
        full_chunks = len(tokens) // 256
        assert lookup["layout_info"] == {"engine-1": ["LocalCPUBackend", full_chunks * 256]}
        # The controller drives the engine's tier: clearing it empties the lookup.
        cleared = await http.post(fleet.controller_url + "/clear",
                                  json={"instance_id": "engine-1", "location": "LocalCPUBackend"})
        assert cleared.status_code == 200
        assert len(target.engine.cpu_tier) == 0
        lookup = (await http.post(fleet.controller_url + "/lookup", json={"tokens": tokens})).json()
        assert lookup["layout_info"] == {}


async def test_reset_caches_empties_both_tiers_and_the_controller_index() -> None:
    async with open_fleet(1, CONFIG) as fleet, httpx.AsyncClient(timeout=10) as http:
        assert fleet.controller_url is not None
        url = fleet.urls[0]
        prompt = words(600)
        await http.post(url + "/v1/completions", json={"prompt": prompt, "max_tokens": 1})
        tokens = (await http.post(url + "/tokenize", json={"prompt": prompt})).json()["tokens"]
        lookup = (await http.post(fleet.controller_url + "/lookup", json={"tokens": tokens})).json()
        assert lookup["layout_info"] != {}
        reply = await http.post(url + "/sim/reset_caches")
        assert reply.json() == {"cpu_tier_tokens_dropped": len(tokens) // 256 * 256}
        lookup = (await http.post(fleet.controller_url + "/lookup", json={"tokens": tokens})).json()
        assert lookup["layout_info"] == {}
        again = (await http.post(url + "/v1/completions", json={"prompt": prompt, "max_tokens": 1})).json()
        assert again["usage"]["prompt_tokens_details"]["cached_tokens"] == 0


async def test_chunk_sink_factory_receives_exact_keys() -> None:
    sinks: dict[str, RecordingSink] = {}
    controls: dict[str, WorkerControl] = {}

    def factory(instance_id: str, control: WorkerControl) -> RecordingSink:
        controls[instance_id] = control
        return sinks.setdefault(instance_id, RecordingSink())

    async with open_fleet(2, CONFIG, chunk_sink_factory=factory,
                          per_engine=[{}, {"cpu_tier_tokens": 0}]) as fleet, \
            httpx.AsyncClient(timeout=10) as http:
        assert fleet.controller_url is None
        prompt = words(600)
        for entry in fleet.engines:
            await http.post(entry.url + "/v1/completions", json={"prompt": prompt, "max_tokens": 1})
        tokens = (await http.post(fleet.urls[0] + "/tokenize", json={"prompt": prompt})).json()["tokens"]
        assert sinks["engine-0"].admitted == chunk_keys(tokens)
        assert sinks["engine-1"].admitted == []  # no LMCache tier on this one
        assert controls["engine-0"].health() == 0


async def test_fixed_ports() -> None:
    async with open_fleet(1, CONFIG, controller=False) as fleet:
        port = int(fleet.urls[0].rsplit(":", 1)[1])
    async with open_fleet(1, CONFIG, base_port=port, controller=False) as fleet:
        assert fleet.urls[0].endswith(f":{port}")


def test_cli_rejects_bad_arguments(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_main(["--engines", "0"]) == 2
    assert cli_main(["--speed", "-1"]) == 2
    assert "pixiu-kv sim" in capsys.readouterr().err


def test_python_dash_m_runs_a_fleet_until_interrupted() -> None:
    import json
    import signal
    import subprocess
    import sys

    with subprocess.Popen(
        [sys.executable, "-m", "pixiu_kv.sim", "--engines", "2", "--speed", "100", "--json"],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
    ) as proc:
        try:
            assert proc.stdout is not None
            fleet = json.loads(proc.stdout.readline())
            assert [e["instance_id"] for e in fleet["engines"]] == ["engine-0", "engine-1"]
            assert fleet["controller_url"].startswith("http://127.0.0.1:")
            reply = httpx.get(fleet["engines"][1]["url"] + "/v1/models", timeout=10)
            assert reply.json()["data"][0]["id"] == "sim-llama-8b"
            proc.send_signal(signal.SIGINT)
            assert proc.wait(timeout=20) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=10)
