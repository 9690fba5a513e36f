"""The controller emulator answers like lmcache_controller 0.5.6 (shapes checked against the real one)."""

from __future__ import annotations

import httpx
import pytest
import trio

from pixiu_kv.sim.controller import ControllerEmulator, Faults, MemoryTier, open_controller_emulator
from pixiu_kv.sim.lmcache_link import LOCATION, chunk_keys


def prompt(n: int, salt: int = 0) -> list[int]:
    return [(i * 7 + salt) % 50_000 for i in range(n)]


def register(emulator: ControllerEmulator, instance_id: str) -> MemoryTier:
    tier = MemoryTier()
    tier.attach(emulator.register(instance_id, tier))
    return tier


async def test_documented_two_instance_example(
    emulator: ControllerEmulator, client: httpx.AsyncClient
) -> None:
    tokens = prompt(1100)
    c = register(emulator, "C")
    d = register(emulator, "D")
    c.store(tokens[:600])  # 2 full chunks
    d.store(tokens)  # 4 full chunks

    reply = await client.post("/lookup", json={"tokens": tokens})

    assert reply.status_code == 200
    body = reply.json()
    assert set(body) == {"event_id", "layout_info"}
    assert body["event_id"].startswith("Lookup")
    assert body["layout_info"] == {"C": [LOCATION, 512], "D": [LOCATION, 1024]}


async def test_registration_order_decides_not_key_order(
    emulator: ControllerEmulator, client: httpx.AsyncClient
) -> None:
    tokens = prompt(1100)
    d = register(emulator, "D")
    c = register(emulator, "C")
    c.store(tokens[:600])
    d.store(tokens)

    body = (await client.post("/lookup", json={"tokens": tokens})).json()

    assert body["layout_info"] == {"D": [LOCATION, 1024]}


async def test_lookup_stops_at_first_chunk_nobody_holds(
    emulator: ControllerEmulator, client: httpx.AsyncClient
) -> None:
    tokens = prompt(1024)
    a = register(emulator, "A")
    a.store(tokens[:256])
    # A also holds the third chunk's key (same prefix chain) but not the second.
    a.store(tokens)
    a.evict(tokens[:512])  # drops chunks 1 and 2
    a.store(tokens[:256])  # chunk 1 back; chunk 2 missing; chunks 3 and 4 held

    body = (await client.post("/lookup", json={"tokens": tokens})).json()

    assert body["layout_info"] == {"A": [LOCATION, 256]}


async def test_miss_partial_chunk_and_deregistration(
    emulator: ControllerEmulator, client: httpx.AsyncClient
) -> None:
    tokens = prompt(600)
    assert (await client.post("/lookup", json={"tokens": tokens})).json()["layout_info"] == {}
    a = register(emulator, "A")
    a.store(tokens[:255])  # no full chunk: nothing reported
    assert (await client.post("/lookup", json={"tokens": tokens})).json()["layout_info"] == {}
    a.store(tokens)
    assert (await client.post("/lookup", json={"tokens": tokens})).json()["layout_info"] == {
        "A": [LOCATION, 512]
    }
    assert emulator.deregister("A")
    assert (await client.post("/lookup", json={"tokens": tokens})).json()["layout_info"] == {}
    assert emulator.index.total_keys == 0


async def test_object_form_switch(emulator: ControllerEmulator, client: httpx.AsyncClient) -> None:
    tokens = prompt(600)
    register(emulator, "A").store(tokens)

    emulator.object_form = True
    assert (await client.post("/lookup", json={"tokens": tokens})).json()["layout_info"] == {
        "A": {"0": LOCATION, "1": 512}
    }
    emulator.object_form = False
    assert (await client.post("/lookup", json={"tokens": tokens})).json()["layout_info"] == {
        "A": [LOCATION, 512]
    }


@pytest.mark.parametrize(
    ("body", "kind", "loc"),
    [
        ({}, "missing", ["body", "tokens"]),
        ({"tokens": None}, "list_type", ["body", "tokens"]),
        ({"tokens": "abc"}, "list_type", ["body", "tokens"]),
        ({"tokens": [1.5]}, "int_from_float", ["body", "tokens", 0]),
        ({"tokens": [1, "x"]}, "int_parsing", ["body", "tokens", 1]),
        ([], "model_attributes_type", ["body"]),
    ],
)
async def test_lookup_bad_bodies_are_422_like_fastapi(
    client: httpx.AsyncClient, body: object, kind: str, loc: list[object]
) -> None:
    reply = await client.post("/lookup", json=body)

    assert reply.status_code == 422
    detail = reply.json()["detail"]
    assert isinstance(detail, list)
    assert detail[0]["type"] == kind
    assert detail[0]["loc"] == loc


async def test_lookup_invalid_json_and_wrong_content_type(client: httpx.AsyncClient) -> None:
    bad_json = await client.post("/lookup", content=b"nope", headers={"content-type": "application/json"})
    assert bad_json.status_code == 422
    assert bad_json.json()["detail"][0]["type"] == "json_invalid"

    no_json_type = await client.post("/lookup", content=b'{"tokens":[1]}')
    assert no_json_type.status_code == 422
    assert no_json_type.json()["detail"][0]["type"] == "model_attributes_type"


async def test_lenient_like_the_real_controller_unless_strict(
    emulator: ControllerEmulator, client: httpx.AsyncClient
) -> None:
    lenient = await client.post("/lookup", json={"tokens": ["1", 2.0, True], "model": "m"})
    assert lenient.status_code == 200

    emulator.strict_bodies = True
    strict = await client.post("/lookup", json={"tokens": ["1", 2], "model": "m"})
    assert strict.status_code == 422
    kinds = {(e["type"], tuple(e["loc"])) for e in strict.json()["detail"]}
    assert kinds == {("int_type", ("body", "tokens", 0)), ("extra_forbidden", ("body", "model"))}


async def test_worker_operations_without_a_registered_worker_are_500(client: httpx.AsyncClient) -> None:
    pin = await client.post("/pin", json={"instance_id": "X", "location": LOCATION, "tokens": [1]})
    assert pin.status_code == 500
    assert pin.json() == {"detail": "The number of tokens pinned should be the same across all workers."}
    clear = await client.post("/clear", json={"instance_id": "X", "location": LOCATION})
    assert clear.status_code == 500
    compress = await client.post(
        "/compress", json={"instance_id": "X", "method": "zstd", "location": LOCATION}
    )
    assert compress.status_code == 500
    move = await client.post(
        "/move",
        json={"old_position": ["A", LOCATION], "new_position": ["B", LOCATION], "tokens": []},
    )
    assert move.status_code == 500
    health = await client.post("/health", json={"instance_id": "X"})
    assert health.status_code == 200
    assert health.json()["error_codes"] == {}
    missing = await client.post("/pin", json={"instance_id": "X"})
    assert missing.status_code == 422
    assert [e["loc"] for e in missing.json()["detail"]] == [["body", "location"], ["body", "tokens"]]


async def test_worker_operations_reach_the_registered_control(
    emulator: ControllerEmulator, client: httpx.AsyncClient
) -> None:
    tokens = prompt(600)
    a = register(emulator, "A")
    a.store(tokens)

    pin = await client.post("/pin", json={"instance_id": "A", "location": LOCATION, "tokens": tokens})
    assert pin.status_code == 200
    assert pin.json()["num_tokens"] == 512
    assert a.pinned_keys == frozenset(chunk_keys(tokens))

    compress = await client.post(
        "/compress", json={"instance_id": "A", "method": "zstd", "location": LOCATION, "tokens": tokens}
    )
    assert compress.json()["num_tokens"] == 512
    assert ("compress", "zstd", LOCATION) in a.calls

    a.health_code = 3
    health = await client.post("/health", json={"instance_id": "A"})
    assert health.json()["error_codes"] == {"0": 3}

    clear = await client.post("/clear", json={"instance_id": "A", "location": LOCATION})
    assert clear.json()["num_tokens"] == 512
    assert (await client.post("/lookup", json={"tokens": tokens})).json()["layout_info"] == {}


async def test_evict_extension_and_its_switch(
    emulator: ControllerEmulator, client: httpx.AsyncClient
) -> None:
    tokens = prompt(600)
    a = register(emulator, "A")
    a.store(tokens)

    evicted = await client.post("/evict", json={"tokens": tokens[:256], "instance_id": "A"})
    assert evicted.status_code == 200
    assert evicted.json()["num_tokens"] == 256
    assert (await client.post("/lookup", json={"tokens": tokens})).json()["layout_info"] == {}
    assert a.holds(tokens) == 0

    unknown = await client.post("/evict", json={"tokens": tokens, "instance_id": "nobody"})
    assert unknown.status_code == 500

    emulator.evict_enabled = False
    gone = await client.post("/evict", json={"tokens": tokens, "instance_id": "A"})
    assert gone.status_code == 404
    assert gone.json() == {"detail": "Not Found"}


async def test_get_routes_and_method_checks(emulator: ControllerEmulator, client: httpx.AsyncClient) -> None:
    register(emulator, "A").store(prompt(600))
    register(emulator, "B")

    assert (await client.get("/health")).status_code == 405
    assert (await client.get("/lookup")).status_code == 405
    assert (await client.post("/nowhere", json={})).status_code == 404

    stats = (await client.get("/controller/key-stats")).json()
    assert stats == {
        "total_key_count": 2,
        "total_instance_count": 2,
        "total_worker_count": 2,
        "instances": [
            {"instance_id": "A", "key_count": 2, "worker_count": 1},
            {"instance_id": "B", "key_count": 0, "worker_count": 1},
        ],
    }
    workers = (await client.get("/controller/workers")).json()
    assert workers["total_count"] == 2
    assert [w["instance_id"] for w in workers["workers"]] == ["A", "B"]
    assert (await client.get("/controller/workers", params={"instance_id": "Z"})).status_code == 404
    one = await client.get("/controller/workers", params={"instance_id": "A", "worker_id": "0"})
    assert one.json()["key_count"] == 2

    info = (await client.post("/query_worker_info", json={"instance_id": "all"})).json()
    assert [w["instance_id"] for w in info["worker_infos"]] == ["A", "B"]
    assert (await client.post("/query_instance", json={"event_id": "e", "ip": "10.0.0.9"})).status_code == 500

    metrics = (await client.get("/metrics")).text
    assert 'lmcache:cache_controller_kv_pool_keys_count{role="controller"} 2.0' in metrics
    assert 'lmcache:cache_controller_registered_workers_count{role="controller"} 2.0' in metrics


async def test_index_is_bounded() -> None:
    emulator = ControllerEmulator(max_keys=3)
    tier = MemoryTier()
    tier.attach(emulator.register("A", tier))
    tier.store(prompt(256 * 5))

    assert emulator.index.total_keys == 3
    assert emulator.index.refused_admits == 2


async def test_fault_error_rate_and_garbage(emulator: ControllerEmulator, client: httpx.AsyncClient) -> None:
    emulator.faults = Faults(error_rate=1.0)
    failed = await client.post("/lookup", json={"tokens": [1]})
    assert failed.status_code == 500
    assert failed.json() == {"detail": "injected fault"}
    # GET routes stay honest so a test can still observe the emulator.
    assert (await client.get("/controller/key-stats")).status_code == 200

    emulator.faults = Faults(garbage=True)
    garbage = await client.post("/lookup", json={"tokens": [1]})
    assert garbage.status_code == 200
    with pytest.raises(ValueError):
        garbage.json()

    emulator.faults = Faults(error_rate=1.0, paths=frozenset({"/pin"}))
    assert (await client.post("/lookup", json={"tokens": [1]})).status_code == 200
    assert emulator.injected_faults == 2


async def test_fault_error_rate_is_a_share(emulator: ControllerEmulator, client: httpx.AsyncClient) -> None:
    emulator.faults = Faults(error_rate=0.5)
    statuses = [(await client.post("/lookup", json={"tokens": [1]})).status_code for _ in range(40)]
    assert set(statuses) == {200, 500}


async def test_fault_hang_until_released(emulator: ControllerEmulator, client: httpx.AsyncClient) -> None:
    emulator.faults = Faults(hang=True)
    results: list[int] = []

    async def call() -> None:
        results.append((await client.post("/lookup", json={"tokens": [1]})).status_code)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(call)
        with trio.fail_after(10):
            await emulator.wait_held_requests(1)
        assert results == []
        emulator.faults = Faults()  # lifting the hang releases held requests
    assert results == [200]
    assert emulator.held_requests == 0


async def test_fault_hang_times_out_on_the_client(
    emulator: ControllerEmulator, client: httpx.AsyncClient
) -> None:
    emulator.faults = Faults(hang=True)
    with pytest.raises(httpx.ReadTimeout):
        await client.post("/lookup", json={"tokens": [1]}, timeout=0.2)
    # The emulator keeps serving other requests.
    emulator.faults = Faults()
    assert (await client.post("/lookup", json={"tokens": [1]})).status_code == 200


async def test_fault_latency_is_applied(emulator: ControllerEmulator, client: httpx.AsyncClient) -> None:
    emulator.faults = Faults(latency=0.3)
    # Not a timing assertion: a client deadline below the added latency must expire.
    with pytest.raises(httpx.ReadTimeout):
        await client.post("/lookup", json={"tokens": [1]}, timeout=0.05)


async def test_fault_dead_instance_hangs_worker_routes_only(
    emulator: ControllerEmulator, client: httpx.AsyncClient
) -> None:
    tokens = prompt(600)
    register(emulator, "A").store(tokens)
    register(emulator, "B")
    emulator.faults = Faults(dead_instances=frozenset({"A"}))

    # Lookups still name the dead instance; other instances' worker routes still answer.
    assert (await client.post("/lookup", json={"tokens": tokens})).json()["layout_info"] == {
        "A": [LOCATION, 512]
    }
    assert (await client.post("/health", json={"instance_id": "B"})).status_code == 200
    with pytest.raises(httpx.ReadTimeout):
        await client.post("/health", json={"instance_id": "A"}, timeout=0.2)

    results: list[int] = []

    async def pin() -> None:
        reply = await client.post("/pin", json={"instance_id": "A", "location": LOCATION, "tokens": tokens})
        results.append(reply.status_code)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(pin)
        with trio.fail_after(10):
            await emulator.wait_held_requests(1)
        assert results == []
        emulator.faults = Faults()
    assert results == [200]


async def test_body_size_is_bounded() -> None:
    async with open_controller_emulator(ControllerEmulator(max_body_bytes=1000)) as emulator:
        async with httpx.AsyncClient(base_url=emulator.url, timeout=10.0) as client:
            too_big = await client.post("/lookup", json={"tokens": list(range(1000))})
            assert too_big.status_code == 413
            assert (await client.post("/lookup", json={"tokens": [1, 2]})).status_code == 200


async def test_worker_query_parameters_are_validated(
    emulator: ControllerEmulator, client: httpx.AsyncClient
) -> None:
    register(emulator, "A")
    bad = await client.get("/controller/workers", params={"instance_id": "A", "worker_id": "x"})
    assert bad.status_code == 422
    assert bad.json()["detail"][0]["loc"] == ["query", "worker_id"]
    missing = await client.get("/controller/workers", params={"instance_id": "A", "worker_id": "3"})
    assert missing.status_code == 404


async def test_errors_in_the_block_leave_unwrapped() -> None:
    with pytest.raises(KeyError):
        async with open_controller_emulator():
            raise KeyError("from the body")
