"""Simulated engines registered with a real lmcache_controller over its ZMQ worker protocol."""

from __future__ import annotations

import base64
import json
import subprocess
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
from real_controller_support import RealController, run_real_controller

from pixiu_kv.sim._controller_wire import KvOp, encode_deregister, encode_kv_batch, encode_register
from pixiu_kv.sim.controller import MemoryTier
from pixiu_kv.sim.cpu_tier import CpuTier
from pixiu_kv.sim.engine_config import EngineConfig
from pixiu_kv.sim.fleet import open_fleet
from pixiu_kv.sim.lmcache_link import LOCATION, chunk_keys
from pixiu_kv.sim.lmcache_worker import WorkerLinkSettings, open_lmcache_links, open_lmcache_worker

pytestmark = pytest.mark.integration

WAIT_S = 15.0


def prompt(n: int, salt: int) -> list[int]:
    return [(i * 31 + salt * 7919) % 32_000 for i in range(n)]


async def eventually(
    check: Callable[[], Awaitable[Any]], accept: Callable[[Any], bool], *, within: float = WAIT_S
) -> Any:
    """Poll ``check`` until ``accept`` holds (the controller applies pushed batches asynchronously)."""
    last: Any = None
    try:
        with trio.fail_after(within):
            while True:
                last = await check()
                if accept(last):
                    return last
                await trio.sleep(0.05)
    except trio.TooSlowError:
        pytest.fail(f"condition not reached within {within}s; last value: {last!r}")


def lookup(client: httpx.AsyncClient, tokens: list[int]) -> Callable[[], Awaitable[dict[str, Any]]]:
    async def call() -> dict[str, Any]:
        reply = await client.post("/lookup", json={"tokens": tokens})
        assert reply.status_code == 200, reply.text
        layout: dict[str, Any] = reply.json()["layout_info"]
        return layout

    return call


def key_stats(client: httpx.AsyncClient) -> Callable[[], Awaitable[dict[str, Any]]]:
    async def call() -> dict[str, Any]:
        stats: dict[str, Any] = (await client.get("/controller/key-stats")).json()
        return stats

    return call


def instance_ids(stats: dict[str, Any]) -> set[str]:
    return {row["instance_id"] for row in stats["instances"]}


async def test_admit_evict_deregister_round_trip(real_controller: RealController) -> None:
    tokens = prompt(600, salt=1)  # 2 full chunks and a partial one
    tier = MemoryTier()
    async with httpx.AsyncClient(base_url=real_controller.url, timeout=10.0) as client:
        async with open_lmcache_worker(
            real_controller.host, real_controller.ports, "it-round-trip", tier
        ) as sink:
            tier.attach(sink)
            tier.store(tokens)
            with trio.fail_after(WAIT_S):
                await sink.flushed()
            assert sink.stats.ops_sent == 2

            layout = await eventually(lookup(client, tokens), bool)
            assert layout == {"it-round-trip": [LOCATION, 512]}

            tier.evict(tokens[:256])  # the first chunk only; the second stays held
            assert await eventually(lookup(client, tokens), lambda v: v == {}) == {}
            stats = await eventually(key_stats(client), lambda s: "it-round-trip" in instance_ids(s))
            assert {r["instance_id"]: r["key_count"] for r in stats["instances"]}["it-round-trip"] == 1

            tier.evict(tokens)
            stats = await eventually(
                key_stats(client),
                lambda s: (
                    {r["instance_id"]: r["key_count"] for r in s["instances"]}.get("it-round-trip") == 0
                ),
            )

            tier.store(tokens)  # held again when the worker leaves
            await eventually(lookup(client, tokens), bool)
        # Leaving the block deregistered the instance and dropped its keys.
        assert await eventually(lookup(client, tokens), lambda v: v == {}) == {}
        stats = await eventually(key_stats(client), lambda s: "it-round-trip" not in instance_ids(s))
        assert "it-round-trip" not in instance_ids(stats)


async def test_control_messages_reach_the_worker(real_controller: RealController) -> None:
    tokens = prompt(600, salt=2)
    tier = MemoryTier()
    async with httpx.AsyncClient(base_url=real_controller.url, timeout=10.0) as client:
        async with open_lmcache_worker(
            real_controller.host, real_controller.ports, "it-control", tier
        ) as sink:
            tier.attach(sink)
            tier.store(tokens)
            await eventually(lookup(client, tokens), bool)

            pin = await client.post(
                "/pin", json={"instance_id": "it-control", "location": LOCATION, "tokens": tokens}
            )
            assert pin.status_code == 200, pin.text
            assert pin.json()["num_tokens"] == 512
            assert tier.pinned_keys == frozenset(chunk_keys(tokens))

            compress = await client.post(
                "/compress",
                json={"instance_id": "it-control", "method": "zstd", "location": LOCATION, "tokens": tokens},
            )
            assert compress.json()["num_tokens"] == 512
            assert ("compress", "zstd", LOCATION) in tier.calls

            tier.health_code = 7
            health = await client.post("/health", json={"instance_id": "it-control"})
            assert health.json()["error_codes"] == {"0": 7}

            clear = await client.post("/clear", json={"instance_id": "it-control", "location": LOCATION})
            assert clear.json()["num_tokens"] == 512
            # Clearing reported evictions, so the controller forgets the chunks too.
            assert await eventually(lookup(client, tokens), lambda v: v == {}) == {}
            assert sink.stats.control_requests == 4


async def test_first_registered_holder_wins_on_the_real_controller(real_controller: RealController) -> None:
    tokens = prompt(1100, salt=3)
    c_tier, d_tier = MemoryTier(), MemoryTier()
    async with httpx.AsyncClient(base_url=real_controller.url, timeout=10.0) as client:
        async with open_lmcache_worker(real_controller.host, real_controller.ports, "it-C", c_tier) as c_sink:
            async with open_lmcache_worker(
                real_controller.host, real_controller.ports, "it-D", d_tier
            ) as d_sink:
                c_tier.attach(c_sink)
                d_tier.attach(d_sink)
                c_tier.store(tokens[:600])
                d_tier.store(tokens)
                layout = await eventually(
                    lookup(client, tokens), lambda v: v.get("it-D", [0, 0])[1] == 1024 and "it-C" in v
                )
                assert layout == {"it-C": [LOCATION, 512], "it-D": [LOCATION, 1024]}


async def test_engine_cpu_tier_evictions_reach_the_real_controller(real_controller: RealController) -> None:
    first, second = prompt(512, salt=4), prompt(512, salt=5)
    tier = CpuTier(capacity_tokens=512)  # room for one prompt's two chunks
    settings = WorkerLinkSettings(heartbeat_interval=0.2)
    async with httpx.AsyncClient(base_url=real_controller.url, timeout=10.0) as client:
        async with open_lmcache_worker(
            real_controller.host, real_controller.ports, "it-engine", tier, settings
        ) as sink:
            tier.attach_sink(sink)
            tier.store(chunk_keys(first))
            assert await eventually(lookup(client, first), bool) == {"it-engine": [LOCATION, 512]}

            tier.store(chunk_keys(second))  # LRU-evicts the first prompt's chunks
            assert await eventually(lookup(client, second), bool) == {"it-engine": [LOCATION, 512]}
            assert await eventually(lookup(client, first), lambda v: v == {}) == {}

            pin = await client.post(
                "/pin", json={"instance_id": "it-engine", "location": LOCATION, "tokens": second}
            )
            assert pin.json()["num_tokens"] == 512
            assert all(tier.is_pinned(k) for k in chunk_keys(second))

            async def heartbeats() -> int:
                return sink.stats.heartbeats

            assert await eventually(heartbeats, lambda n: n >= 1) >= 1


_DECODE = """
import base64, json, sys
import msgspec
from lmcache.v1.cache_controller.message import Msg
out = []
for frame in json.load(sys.stdin):
    raw = base64.b64decode(frame)
    if raw.startswith(b"{"):
        msg = msgspec.convert(json.loads(raw), type=Msg)
    else:
        msg = msgspec.msgpack.decode(raw, type=Msg)
    out.append(msgspec.to_builtins(msg))
print(json.dumps(out))
"""


def test_frames_decode_as_the_real_message_classes(real_controller: RealController) -> None:
    frames = [
        encode_register("inst", 0, "127.0.0.1", 5555),
        encode_kv_batch("inst", 0, LOCATION, [(KvOp.ADMIT, -(2**63), 0), (KvOp.EVICT, 2**63 - 1, 1)]),
        encode_deregister("inst", 0, "127.0.0.1", 5555),
    ]
    result = subprocess.run(
        [str(real_controller.python), "-c", _DECODE],
        input=json.dumps([base64.b64encode(f).decode() for f in frames]),
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    register, batch, deregister = json.loads(result.stdout.strip().splitlines()[-1])
    assert register == {
        "type": "RegisterMsg",
        "instance_id": "inst",
        "worker_id": 0,
        "ip": "127.0.0.1",
        "port": 5555,
        "peer_init_url": None,
    }
    assert batch["type"] == "BatchedKVOperationMsg"
    assert batch["operations"] == [
        {"op_type": "admit", "key": -(2**63), "seq_num": 0},
        {"op_type": "evict", "key": 2**63 - 1, "seq_num": 1},
    ]
    assert deregister["type"] == "DeRegisterMsg"


async def test_simulated_fleet_registered_with_the_real_controller(real_controller: RealController) -> None:
    config = EngineConfig(speed=1000.0, gpu_kv_tokens=16384, cpu_tier_tokens=8192, max_model_len=8192)
    text = " ".join(f"word{i % 97}" for i in range(700))
    async with httpx.AsyncClient(base_url=real_controller.url, timeout=10.0) as controller:
        async with open_lmcache_links(real_controller.host, real_controller.ports) as links:
            async with open_fleet(2, config, chunk_sink_factory=links.register) as fleet:
                with trio.fail_after(WAIT_S):
                    await links.registered()
                assert links.failed == []
                target = fleet.by_id("engine-1")
                async with httpx.AsyncClient(base_url=target.url, timeout=10.0) as engine:
                    tokens = (await engine.post("/tokenize", json={"prompt": text})).json()["tokens"]
                    assert len(tokens) >= 512
                    reply = await engine.post("/v1/completions", json={"prompt": text, "max_tokens": 1})
                    assert reply.status_code == 200, reply.text
                full = len(tokens) // 256 * 256
                layout = await eventually(lookup(controller, tokens), bool)
                assert layout == {"engine-1": [LOCATION, full]}
        # The fleet and its links are gone: the controller forgot both engines.
        stats = await eventually(
            key_stats(controller), lambda s: not instance_ids(s) & {"engine-0", "engine-1"}
        )
        assert not instance_ids(stats) & {"engine-0", "engine-1"}


async def test_link_resyncs_after_a_controller_restart(tmp_path: Path) -> None:
    """A restarted controller knows nothing; heartbeats re-register the worker and it
    answers the controller's full-sync request with everything it holds."""
    tokens = prompt(600, salt=6)
    tier = MemoryTier()
    settings = WorkerLinkSettings(heartbeat_interval=0.2)

    first_run = run_real_controller(tmp_path / "first")
    (tmp_path / "first").mkdir()
    (tmp_path / "second").mkdir()
    first = await trio.to_thread.run_sync(first_run.__enter__)
    second_run = None
    try:
        async with httpx.AsyncClient(base_url=first.url, timeout=10.0) as client:
            async with open_lmcache_worker(first.host, first.ports, "it-restart", tier, settings) as sink:
                tier.attach(sink)
                tier.store(tokens)
                assert await eventually(lookup(client, tokens), bool) == {"it-restart": [LOCATION, 512]}

                await trio.to_thread.run_sync(first_run.__exit__, None, None, None)
                second_run = run_real_controller(tmp_path / "second", same_ports_as=first)
                await trio.to_thread.run_sync(second_run.__enter__)
                # Nothing new is admitted: only the full sync can tell the new controller.
                layout = await eventually(lookup(client, tokens), bool, within=30.0)
                assert layout == {"it-restart": [LOCATION, 512]}
                assert sink.stats.full_syncs >= 1
    finally:
        # The link deregistered above; now stop whichever controller runs.
        await trio.to_thread.run_sync((second_run or first_run).__exit__, None, None, None)
