"""The worker link's protocol, against an in-process stand-in for the controller's ZMQ side.

The stand-in binds the controller's ROUTER (reply) and PULL sockets and plays the
controller's REQ to the worker, with the same frames lmcache 0.5.6 uses. The real
controller is exercised in tests/integration.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from typing import Any

import msgpack
import pytest
import trio
import zmq

from pixiu_kv.sim._controller_wire import (
    KvOp,
    WireError,
    answer_control,
    decode_frame,
    encode_kv_batch,
    encode_register,
)
from pixiu_kv.sim._controller_zmq import close_socket, recv_frames, send_frames
from pixiu_kv.sim.controller import MemoryTier
from pixiu_kv.sim.lmcache_link import LOCATION, chunk_keys
from pixiu_kv.sim.lmcache_worker import (
    ControllerPorts,
    RegistrationError,
    WorkerLinkSettings,
    open_lmcache_links,
    open_lmcache_worker,
)

WAIT_S = 10.0


def prompt(n: int, salt: int = 0) -> list[int]:
    return [(i * 13 + salt) % 40_000 for i in range(n)]


def pack(message: dict[str, Any]) -> bytes:
    packed: bytes = msgpack.packb(message, use_bin_type=True)
    return packed


class FakeController:
    """The controller's worker-facing sockets, driven by the test."""

    def __init__(self, ctx: zmq.Context[zmq.Socket[bytes]]) -> None:
        self.ctx = ctx
        self.router = ctx.socket(zmq.ROUTER)
        self.pull = ctx.socket(zmq.PULL)
        self.ports = ControllerPorts(
            pull=self.pull.bind_to_random_port("tcp://127.0.0.1"),
            reply=self.router.bind_to_random_port("tcp://127.0.0.1"),
        )
        self.heartbeat = ctx.socket(zmq.ROUTER)
        self.heartbeat_port = self.heartbeat.bind_to_random_port("tcp://127.0.0.1")
        self.req: zmq.Socket[bytes] | None = None

    async def accept_registration(self, reply: dict[str, Any] | None = None) -> dict[str, Any]:
        with trio.fail_after(WAIT_S):
            identity, empty, frame = await recv_frames(self.router)
        assert empty == b""
        assert frame.startswith(b"{")  # registration goes as JSON
        message = decode_frame(frame)
        answer = reply if reply is not None else {"type": "RegisterRetMsg", "extra_config": {}}
        await send_frames(self.router, [identity, b"", pack(answer)], max_wait=WAIT_S)
        return message

    async def answer(self, sock: zmq.Socket[bytes], reply: dict[str, Any]) -> dict[str, Any]:
        """Receive one DEALER request on a ROUTER socket and answer it."""
        with trio.fail_after(WAIT_S):
            identity, _, frame = await recv_frames(sock)
        await send_frames(sock, [identity, b"", pack(reply)], max_wait=WAIT_S)
        return decode_frame(frame)

    async def next_push(self) -> dict[str, Any]:
        with trio.fail_after(WAIT_S):
            frames = await recv_frames(self.pull)
        assert len(frames) == 1
        return decode_frame(frames[0])

    async def control(self, registration: dict[str, Any], message: dict[str, Any]) -> dict[str, Any]:
        if self.req is None:
            self.req = self.ctx.socket(zmq.REQ)
            self.req.connect(f"tcp://{registration['ip']}:{registration['port']}")
        await send_frames(self.req, [pack(message)], max_wait=WAIT_S)
        with trio.fail_after(WAIT_S):
            return decode_frame((await recv_frames(self.req))[-1])

    def close(self) -> None:
        for sock in (self.router, self.pull, self.heartbeat, self.req):
            if sock is not None:
                close_socket(sock, linger_ms=0)


@pytest.fixture
def zmq_context() -> Iterator[zmq.Context[zmq.Socket[bytes]]]:
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    yield ctx
    ctx.term()


@asynccontextmanager
async def fake_controller(ctx: zmq.Context[zmq.Socket[bytes]]) -> AsyncIterator[FakeController]:
    fake = FakeController(ctx)
    try:
        yield fake
    finally:
        fake.close()


async def test_register_batch_and_deregister(zmq_context: zmq.Context[zmq.Socket[bytes]]) -> None:
    tokens = prompt(600)
    tier = MemoryTier()
    async with fake_controller(zmq_context) as fake:
        async with trio.open_nursery() as nursery:
            registered = trio.Event()
            seen: dict[str, Any] = {}

            async def controller_side() -> None:
                seen["register"] = await fake.accept_registration()
                registered.set()

            nursery.start_soon(controller_side)
            async with open_lmcache_worker("127.0.0.1", fake.ports, "inst-1", tier) as sink:
                await registered.wait()
                tier.attach(sink)
                tier.store(tokens)
                batch = await fake.next_push()
                tier.evict(tokens)
                second = await fake.next_push()
            deregister = await fake.next_push()

    register = seen["register"]
    assert register == {
        "type": "RegisterMsg",
        "instance_id": "inst-1",
        "worker_id": 0,
        "ip": "127.0.0.1",
        "port": sink.port,
        "peer_init_url": None,
    }
    keys = chunk_keys(tokens)
    assert batch["type"] == "BatchedKVOperationMsg"
    assert (batch["instance_id"], batch["worker_id"], batch["location"]) == ("inst-1", 0, LOCATION)
    assert batch["operations"] == [
        {"op_type": "admit", "key": keys[0], "seq_num": 0},
        {"op_type": "admit", "key": keys[1], "seq_num": 1},
    ]
    assert [op["op_type"] for op in second["operations"]] == ["evict", "evict"]
    assert [op["seq_num"] for op in second["operations"]] == [2, 3]
    assert deregister == {
        "type": "DeRegisterMsg",
        "instance_id": "inst-1",
        "worker_id": 0,
        "ip": "127.0.0.1",
        "port": sink.port,
    }


async def test_control_requests_are_answered(zmq_context: zmq.Context[zmq.Socket[bytes]]) -> None:
    tokens = prompt(600)
    tier = MemoryTier()
    tier.store(tokens)
    async with fake_controller(zmq_context) as fake, trio.open_nursery() as nursery:
        registration: dict[str, Any] = {}
        done = trio.Event()

        async def controller_side() -> None:
            registration.update(await fake.accept_registration())
            done.set()

        nursery.start_soon(controller_side)
        async with open_lmcache_worker("127.0.0.1", fake.ports, "inst-2", tier) as sink:
            await done.wait()
            pin = await fake.control(
                registration,
                {"type": "PinWorkerMsg", "worker_event_id": "w1", "location": LOCATION, "tokens": tokens},
            )
            assert tier.pinned_keys == frozenset(chunk_keys(tokens))
            health = await fake.control(registration, {"type": "HealthWorkerMsg", "worker_event_id": "w2"})
            compress = await fake.control(
                registration,
                {
                    "type": "CompressWorkerMsg",
                    "worker_event_id": "w3",
                    "method": "zstd",
                    "location": LOCATION,
                    "tokens": None,
                },
            )
            unknown = await fake.control(
                registration,
                {
                    "type": "MoveWorkerMsg",
                    "worker_event_id": "w4",
                    "old_position": LOCATION,
                    "new_position": ["x", LOCATION],
                },
            )
            clear = await fake.control(
                registration, {"type": "ClearWorkerMsg", "worker_event_id": "w5", "location": LOCATION}
            )
            assert sink.stats.control_requests == 5

    assert pin == {"type": "PinWorkerRetMsg", "num_tokens": 512}
    assert health == {"type": "HealthWorkerRetMsg", "error_code": 0}
    assert compress == {"type": "CompressWorkerRetMsg", "num_tokens": 0}  # tokens None: nothing named
    assert unknown["type"] == "ErrorMsg"
    assert clear == {"type": "ClearWorkerRetMsg", "num_tokens": 512}


async def test_registration_without_reply_fails_in_time(zmq_context: zmq.Context[zmq.Socket[bytes]]) -> None:
    async with fake_controller(zmq_context) as fake:
        settings = WorkerLinkSettings(register_timeout=0.2)
        with pytest.raises(RegistrationError):
            async with open_lmcache_worker("127.0.0.1", fake.ports, "inst-3", MemoryTier(), settings):
                pytest.fail("registration should not have succeeded")


async def test_refused_registration(zmq_context: zmq.Context[zmq.Socket[bytes]]) -> None:
    async with fake_controller(zmq_context) as fake, trio.open_nursery() as nursery:
        nursery.start_soon(fake.accept_registration, {"type": "ErrorMsg", "error": "no"})
        with pytest.raises(RegistrationError, match="refused"):
            async with open_lmcache_worker("127.0.0.1", fake.ports, "inst-4", MemoryTier()):
                pytest.fail("registration should have been refused")


async def test_cancelled_link_still_flushes_and_deregisters(
    zmq_context: zmq.Context[zmq.Socket[bytes]],
) -> None:
    tier = MemoryTier()
    async with fake_controller(zmq_context) as fake:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(fake.accept_registration)
            with trio.CancelScope() as scope:
                async with open_lmcache_worker("127.0.0.1", fake.ports, "inst-5", tier) as sink:
                    tier.attach(sink)
                    tier.store(prompt(256))
                    scope.cancel()  # before the flush task had a chance to run
                    await trio.sleep_forever()
            assert scope.cancelled_caught
        batch = await fake.next_push()
        deregister = await fake.next_push()
    assert [op["op_type"] for op in batch["operations"]] == ["admit"]
    assert deregister["type"] == "DeRegisterMsg"


async def test_body_exception_leaves_unwrapped(zmq_context: zmq.Context[zmq.Socket[bytes]]) -> None:
    async with fake_controller(zmq_context) as fake:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(fake.accept_registration)
            with pytest.raises(KeyError):
                async with open_lmcache_worker("127.0.0.1", fake.ports, "inst-6", MemoryTier()):
                    raise KeyError("from the body")
        assert (await fake.next_push())["type"] == "DeRegisterMsg"


async def test_sink_coalesces_and_is_bounded(zmq_context: zmq.Context[zmq.Socket[bytes]]) -> None:
    settings = WorkerLinkSettings(max_pending=2, batch_size=10)
    async with fake_controller(zmq_context) as fake, trio.open_nursery() as nursery:
        registered = trio.Event()

        async def controller_side() -> None:
            await fake.accept_registration()
            registered.set()

        nursery.start_soon(controller_side)
        async with open_lmcache_worker("127.0.0.1", fake.ports, "inst-7", MemoryTier(), settings) as sink:
            await registered.wait()
            # No checkpoint between these calls, so the flush task sees them together.
            sink.admit([1, 2])
            sink.evict([1])  # same key: only the newest operation is kept
            sink.admit([3])  # a third distinct key does not fit
            assert sink.pending == 2
            assert sink.stats.dropped == 1
            batch = await fake.next_push()
            with trio.fail_after(WAIT_S):
                await sink.flushed()
        await fake.next_push()  # deregistration
    assert [(op["op_type"], op["key"]) for op in batch["operations"]] == [("admit", 2), ("evict", 1)]
    sink.admit([9])  # after the link closed: ignored, never raises
    assert sink.stats.dropped == 2


def test_answer_control_reports_engine_failures_as_error_messages() -> None:
    class Broken(MemoryTier):
        def pin(self, tokens: Any, location: str) -> int:
            raise RuntimeError("tier down")

    reply = msgpack.unpackb(
        answer_control(pack({"type": "PinWorkerMsg", "location": LOCATION, "tokens": [1]}), Broken())
    )
    assert reply["type"] == "ErrorMsg"
    assert "tier down" in reply["error"]
    garbage = msgpack.unpackb(answer_control(b"\xc1not msgpack", MemoryTier()))
    assert garbage["type"] == "ErrorMsg"
    bad_tokens = msgpack.unpackb(
        answer_control(pack({"type": "PinWorkerMsg", "location": LOCATION, "tokens": ["x"]}), MemoryTier())
    )
    assert bad_tokens["type"] == "ErrorMsg"


def test_frame_encodings() -> None:
    assert decode_frame(encode_register("i", 1, "127.0.0.1", 9)) == {
        "type": "RegisterMsg",
        "instance_id": "i",
        "worker_id": 1,
        "ip": "127.0.0.1",
        "port": 9,
        "peer_init_url": None,
    }
    batch = decode_frame(encode_kv_batch("i", 0, LOCATION, [(KvOp.EVICT, -5, 7)]))
    assert batch["operations"] == [{"op_type": "evict", "key": -5, "seq_num": 7}]
    assert next(iter(batch)) == "type"  # the tag leads, as msgspec writes it
    with pytest.raises(WireError):
        decode_frame(pack({"no": "type"}))
    with pytest.raises(WireError):
        decode_frame(b"{not json")


async def test_link_group_registers_in_call_order_and_deregisters_all(
    zmq_context: zmq.Context[zmq.Socket[bytes]],
) -> None:
    first, second = MemoryTier(), MemoryTier()
    async with fake_controller(zmq_context) as fake, trio.open_nursery() as nursery:
        registrations: list[str] = []

        async def controller_side() -> None:
            for _ in range(2):
                registrations.append((await fake.accept_registration())["instance_id"])

        nursery.start_soon(controller_side)
        async with open_lmcache_links("127.0.0.1", fake.ports) as links:
            # Reports made before registration are buffered, then sent.
            first.attach(links.register("engine-0", first))
            first.store(prompt(256))
            second.attach(links.register("engine-1", second))
            with pytest.raises(ValueError):
                links.register("engine-0", first)
            with trio.fail_after(WAIT_S):
                await links.registered()
            assert links.failed == []
            batch = await fake.next_push()
        pushes = [await fake.next_push(), await fake.next_push()]

    assert registrations == ["engine-0", "engine-1"]
    assert batch["instance_id"] == "engine-0"
    assert [op["op_type"] for op in batch["operations"]] == ["admit"]
    assert sorted((p["type"], p["instance_id"]) for p in pushes) == [
        ("DeRegisterMsg", "engine-0"),
        ("DeRegisterMsg", "engine-1"),
    ]


async def test_link_group_records_failed_registrations(zmq_context: zmq.Context[zmq.Socket[bytes]]) -> None:
    tier = MemoryTier()
    async with fake_controller(zmq_context) as fake:
        settings = WorkerLinkSettings(register_timeout=0.2)
        async with open_lmcache_links("127.0.0.1", fake.ports, settings) as links:
            sink = links.register("engine-0", tier)
            with trio.fail_after(WAIT_S):
                await links.registered()
            assert links.failed == ["engine-0"]
            sink.admit([1])  # a sink without a link drops, never raises
            assert sink.stats.dropped == 1


async def test_full_sync_on_request_sends_everything_held(
    zmq_context: zmq.Context[zmq.Socket[bytes]],
) -> None:
    tokens = prompt(512)
    tier = MemoryTier()
    tier.store(tokens)
    settings = WorkerLinkSettings(heartbeat_interval=0.05)
    synced_keys: list[int] = []
    async with fake_controller(zmq_context) as fake, trio.open_nursery() as nursery:
        hb_url = f"127.0.0.1:{fake.heartbeat_port}"
        nursery.start_soon(
            fake.accept_registration, {"type": "RegisterRetMsg", "extra_config": {"heartbeat_url": hb_url}}
        )
        async with open_lmcache_worker("127.0.0.1", fake.ports, "inst-8", tier, settings) as sink:
            tier.attach(sink)
            heartbeat = await fake.answer(
                fake.heartbeat,
                {"type": "HeartbeatRetMsg", "commands": [{"command_type": "full_sync", "reason": "restart"}]},
            )
            assert heartbeat["type"] == "HeartbeatMsg"
            assert heartbeat["instance_id"] == "inst-8"
            start = await fake.answer(
                fake.router, {"type": "FullSyncStartRetMsg", "sync_id": "s", "accepted": True}
            )
            assert start["type"] == "FullSyncStartMsg"
            assert (start["total_keys"], start["batch_count"]) == (2, 1)
            while True:  # an incremental batch sent before the sync may come first
                pushed = await fake.next_push()
                if pushed["type"] == "FullSyncBatchMsg":
                    synced_keys.extend(pushed["keys"])
                if pushed["type"] == "FullSyncEndMsg":
                    assert pushed["actual_total_keys"] == 2
                    break
            status = await fake.answer(
                fake.router,
                {
                    "type": "FullSyncStatusRetMsg",
                    "sync_id": start["sync_id"],
                    "is_complete": True,
                    "global_progress": 1.0,
                    "can_exit_freeze": True,
                    "missing_batches": [],
                },
            )
            assert status["type"] == "FullSyncStatusMsg"
            assert status["sync_id"] == start["sync_id"]
            # Incremental batches resume after the sync.
            tier.evict(tokens)
            after = await fake.next_push()
            assert sink.stats.full_syncs == 1
            nursery.cancel_scope.cancel()
    assert sorted(synced_keys) == sorted(chunk_keys(tokens))
    assert after["type"] == "BatchedKVOperationMsg"
    assert [op["op_type"] for op in after["operations"]] == ["evict", "evict"]
