"""One simulated engine's link to a real ``lmcache_controller`` (the LMCache worker protocol).

See ``lmcache_worker`` (the public facade) and ``docs/lmcache.md``.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from functools import partial
from typing import Any

import attrs
import trio
import zmq

from pixiu_kv.sim._controller_full_sync import FullSyncPlan, run_full_sync, wants_full_sync
from pixiu_kv.sim._controller_wire import (
    KvOp,
    WireError,
    answer_control,
    decode_frame,
    encode_deregister,
    encode_heartbeat,
    encode_kv_batch,
    encode_register,
)
from pixiu_kv.sim._controller_zmq import close_socket, recv_frames, send_frames
from pixiu_kv.sim.lmcache_link import LOCATION, WorkerControl

__all__ = [
    "ControllerPorts",
    "LinkStats",
    "RegistrationError",
    "WorkerLinkSettings",
    "WorkerLinkSink",
    "linked",
]

log = logging.getLogger(__name__)


def _port(_inst: object, attribute: attrs.Attribute[int], value: int) -> None:
    if not 0 < value < 65536:
        raise ValueError(f"{attribute.name} must be a TCP port, got {value}")


def _optional_port(_inst: object, attribute: attrs.Attribute[int | None], value: int | None) -> None:
    if value is not None:
        _port(_inst, attribute, value)  # type: ignore[arg-type]


@attrs.frozen(slots=True)
class ControllerPorts:
    """The controller's ``--monitor-ports``: ``{"pull": P1, "reply": P2, "heartbeat": P3}``."""

    pull: int = attrs.field(validator=_port)
    reply: int = attrs.field(validator=_port)
    heartbeat: int | None = attrs.field(default=None, validator=_optional_port)


@attrs.frozen(slots=True)
class WorkerLinkSettings:
    """Bounds and deadlines of one worker link.

    ``bind_host`` is where the control socket listens and the address the controller is
    told to connect to (``advertise_ip`` overrides the latter). ``worker_port`` 0 picks a
    free port. ``max_pending`` caps distinct chunk keys waiting to be sent (more are
    dropped and counted); ``batch_size`` caps operations per message. ``max_held`` caps
    the keys remembered for a full sync (see ``heartbeat_interval``).
    """

    worker_id: int = 0
    bind_host: str = "127.0.0.1"
    advertise_ip: str | None = None
    worker_port: int = 0
    max_pending: int = attrs.field(default=100_000, validator=attrs.validators.gt(0))
    batch_size: int = attrs.field(default=512, validator=attrs.validators.gt(0))
    register_timeout: float = attrs.field(default=10.0, validator=attrs.validators.gt(0))
    send_timeout: float = attrs.field(default=5.0, validator=attrs.validators.gt(0))
    close_timeout: float = attrs.field(default=5.0, validator=attrs.validators.gt(0))
    heartbeat_interval: float | None = None
    max_held: int = attrs.field(default=1_000_000, validator=attrs.validators.gt(0))
    linger_ms: int = 2000


@attrs.define(slots=True)
class LinkStats:
    admits: int = 0
    evicts: int = 0
    dropped: int = 0
    batches_sent: int = 0
    ops_sent: int = 0
    send_failures: int = 0
    control_requests: int = 0
    heartbeats: int = 0
    full_syncs: int = 0
    untracked: int = 0
    """Admitted keys not remembered for a full sync because ``max_held`` was reached."""


class RegistrationError(RuntimeError):
    """The controller did not accept the registration in time."""


class WorkerLinkSink:
    """The ChunkSink of a linked instance: never blocks, buffers at most ``max_pending`` keys.

    Operations on one key coalesce to the latest (admit then evict before a flush sends
    only the evict), which is what the controller's set semantics need. Call it from the
    trio thread that runs the link.
    """

    def __init__(self, settings: WorkerLinkSettings) -> None:
        self._settings = settings
        self.port = 0
        """The worker's control port, known once the link has bound it."""
        self.stats = LinkStats()
        self._pending: dict[int, KvOp] = {}
        # What the tier holds now, as reported: the state a full sync sends.
        self._held: dict[int, None] = {}
        self._in_flight = 0
        self._closed = False
        self._changed = trio.Event()

    # -- ChunkSink ----------------------------------------------------------------------

    def admit(self, keys: Sequence[int]) -> None:
        self._record(keys, KvOp.ADMIT)
        self.stats.admits += len(keys)

    def evict(self, keys: Sequence[int]) -> None:
        self._record(keys, KvOp.EVICT)
        self.stats.evicts += len(keys)

    def _record(self, keys: Sequence[int], op: KvOp) -> None:
        if self._closed:
            self.stats.dropped += len(keys)
            return
        for key in keys:
            if op is KvOp.EVICT:
                self._held.pop(key, None)
            elif key not in self._held:
                if len(self._held) < self._settings.max_held:
                    self._held[key] = None
                else:
                    self.stats.untracked += 1
            if key not in self._pending and len(self._pending) >= self._settings.max_pending:
                self.stats.dropped += 1
                continue
            self._pending.pop(key, None)  # re-insert: the newest operation goes last
            self._pending[key] = op
        self._notify()

    # -- flushing -----------------------------------------------------------------------

    @property
    def pending(self) -> int:
        return len(self._pending)

    async def flushed(self) -> None:
        """Wait until every reported operation has been handed to the controller's socket."""
        while self._pending or self._in_flight:
            await self._changed.wait()

    def _notify(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    def _take(self, limit: int) -> list[tuple[int, KvOp]]:
        batch: list[tuple[int, KvOp]] = []
        for key in list(itertools.islice(self._pending, limit)):
            batch.append((key, self._pending.pop(key)))
        self._in_flight = len(batch)
        return batch

    def _snapshot_for_sync(self) -> list[int]:
        """Everything held, for a full sync; pending operations are part of it, so drop them."""
        self._pending.clear()
        self._notify()
        return list(self._held)

    def _restore(self, batch: list[tuple[int, KvOp]]) -> None:
        """Put back an unsent batch; operations reported since then stay newer."""
        for key, op in batch:
            self._pending.setdefault(key, op)
        self._in_flight = 0

    def _done(self) -> None:
        self._in_flight = 0
        self._notify()


@attrs.define(eq=False)
class _LinkIO:
    """The sockets and counters one link's tasks share. Only the push lock's holder sends."""

    ctx: zmq.Context[zmq.Socket[bytes]]
    push: zmq.Socket[bytes]
    reply_url: str
    instance_id: str
    ip: str
    port: int
    settings: WorkerLinkSettings
    sink: WorkerLinkSink
    push_lock: trio.Lock = attrs.field(factory=trio.Lock)
    next_seq: int = 0

    async def push_frame(self, frame: bytes) -> None:
        await send_frames(self.push, [frame], max_wait=self.settings.send_timeout)

    async def request(self, frame: bytes) -> dict[str, Any]:
        """One request/reply on the controller's reply socket, each way under the send deadline."""
        dealer = self.ctx.socket(zmq.DEALER)
        dealer.connect(self.reply_url)
        try:
            await send_frames(dealer, [b"", frame], max_wait=self.settings.send_timeout)
            return decode_frame((await recv_frames(dealer, max_wait=self.settings.send_timeout))[-1])
        finally:
            close_socket(dealer, linger_ms=0)


async def _send_batches(io: _LinkIO, *, until_empty: bool) -> None:
    """Send pending operations; with ``until_empty`` return when none are left."""
    sink, settings = io.sink, io.settings
    while True:
        if not sink._pending:
            if until_empty:
                return
            await sink._changed.wait()
            continue
        async with io.push_lock:
            batch = sink._take(settings.batch_size)
            if not batch:  # a full sync took them while this task waited for the lock
                sink._done()
                continue
            ops = [(op, key, io.next_seq + i) for i, (key, op) in enumerate(batch)]
            frame = encode_kv_batch(io.instance_id, settings.worker_id, LOCATION, ops)
            try:
                await io.push_frame(frame)
            except trio.TooSlowError:
                # The controller is unreachable: drop the batch rather than grow without bound.
                sink.stats.send_failures += 1
                sink.stats.dropped += len(batch)
                log.warning(
                    "lmcache link %s: dropped %d chunk operations (send timed out)",
                    io.instance_id,
                    len(batch),
                )
            except BaseException:
                sink._restore(batch)
                raise
            else:
                io.next_seq += len(batch)
                sink.stats.batches_sent += 1
                sink.stats.ops_sent += len(batch)
            sink._done()


async def _serve_control(
    rep: zmq.Socket[bytes], control: WorkerControl, sink: WorkerLinkSink, max_wait: float
) -> None:
    while True:
        frames = await recv_frames(rep)
        sink.stats.control_requests += 1
        reply = answer_control(frames[-1], control)
        try:
            await send_frames(rep, [reply], max_wait=max_wait)
        except trio.TooSlowError:
            log.warning("lmcache link: control reply not sent in %.1fs", max_wait)


async def _full_sync(io: _LinkIO) -> None:
    plan = FullSyncPlan(io.instance_id, io.settings.worker_id, LOCATION)
    async with io.push_lock:  # no incremental batch may interleave with the sync
        keys = io.sink._snapshot_for_sync()
        try:
            done = await run_full_sync(plan, keys, io.request, io.push_frame)
        except (trio.TooSlowError, WireError) as exc:
            log.warning("lmcache link %s: full sync failed: %s", io.instance_id, exc)
            return
    if done:
        io.sink.stats.full_syncs += 1


async def _heartbeat(io: _LinkIO, url: str) -> None:
    """Heartbeats; a ``full_sync`` command in a reply runs a full sync before the next one."""
    settings = io.settings
    assert settings.heartbeat_interval is not None
    frame = encode_heartbeat(io.instance_id, settings.worker_id, io.ip, io.port)
    sock = io.ctx.socket(zmq.DEALER)
    sock.connect(url)
    try:
        while True:
            try:
                await send_frames(sock, [b"", frame], max_wait=settings.send_timeout)
                reply = decode_frame((await recv_frames(sock, max_wait=settings.send_timeout))[-1])
            except (trio.TooSlowError, WireError) as exc:
                log.warning("lmcache link %s: heartbeat failed: %s", io.instance_id, exc)
            else:
                io.sink.stats.heartbeats += 1
                if wants_full_sync(reply):
                    await _full_sync(io)
            await trio.sleep(settings.heartbeat_interval)
    finally:
        close_socket(sock, linger_ms=0)


def _tcp(address: str) -> str:
    return address if "://" in address else f"tcp://{address}"


async def _register(io: _LinkIO) -> dict[str, object]:
    frame = encode_register(io.instance_id, io.settings.worker_id, io.ip, io.port)
    max_wait = io.settings.register_timeout
    dealer = io.ctx.socket(zmq.DEALER)
    dealer.connect(io.reply_url)
    try:
        await send_frames(dealer, [b"", frame], max_wait=max_wait)
        reply = decode_frame((await recv_frames(dealer, max_wait=max_wait))[-1])
    except trio.TooSlowError:
        raise RegistrationError(f"no registration reply from {io.reply_url} within {max_wait}s") from None
    except WireError as exc:
        raise RegistrationError(f"bad registration reply from {io.reply_url}: {exc}") from None
    finally:
        close_socket(dealer, linger_ms=0)
    if reply["type"] != "RegisterRetMsg":
        raise RegistrationError(f"registration refused by {io.reply_url}: {reply}")
    extra = reply.get("extra_config")
    return dict(extra) if isinstance(extra, dict) else {}


@asynccontextmanager
async def linked(
    controller_host: str,
    ports: ControllerPorts,
    instance_id: str,
    control: WorkerControl,
    settings: WorkerLinkSettings,
    sink: WorkerLinkSink,
) -> AsyncIterator[None]:
    """Register ``instance_id`` and run its link for the duration of the block.

    ``sink`` may already hold operations: they are sent once registered. When the block
    ends (or registration fails) the sink is closed: later reports are dropped.
    Raises :class:`RegistrationError` if the controller does not answer in time.
    """
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    rep = ctx.socket(zmq.REP)
    push = ctx.socket(zmq.PUSH)
    try:
        if settings.worker_port:
            rep.bind(f"tcp://{settings.bind_host}:{settings.worker_port}")
            port = settings.worker_port
        else:
            port = rep.bind_to_random_port(f"tcp://{settings.bind_host}")
        sink.port = port
        push.connect(f"tcp://{controller_host}:{ports.pull}")
        io = _LinkIO(
            ctx=ctx,
            push=push,
            reply_url=f"tcp://{controller_host}:{ports.reply}",
            instance_id=instance_id,
            ip=settings.advertise_ip or settings.bind_host,
            port=port,
            settings=settings,
            sink=sink,
        )
        extra = await _register(io)
        log.info("lmcache link %s registered (worker port %d)", instance_id, port)
        body_error: BaseException | None = None
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_serve_control, rep, control, sink, settings.send_timeout)
                nursery.start_soon(partial(_send_batches, io, until_empty=False))
                heartbeat_url = extra.get("heartbeat_url")
                if settings.heartbeat_interval and isinstance(heartbeat_url, str):
                    nursery.start_soon(_heartbeat, io, _tcp(heartbeat_url))
                try:
                    yield
                except BaseException as exc:
                    # Re-raised below, outside the nursery, so the caller gets its own
                    # exception rather than an ExceptionGroup around it.
                    body_error = exc
                finally:
                    nursery.cancel_scope.cancel()
        finally:
            sink._closed = True
            with trio.CancelScope(shield=True, deadline=trio.current_time() + settings.close_timeout):
                await _send_batches(io, until_empty=True)
                try:
                    await io.push_frame(encode_deregister(instance_id, settings.worker_id, io.ip, port))
                except trio.TooSlowError:
                    log.warning("lmcache link %s: deregistration not sent", instance_id)
                else:
                    log.info("lmcache link %s deregistered", instance_id)
        if body_error is not None:
            raise body_error
    finally:
        sink._closed = True
        close_socket(rep, linger_ms=0)
        close_socket(push, linger_ms=settings.linger_ms)
        # term() waits for queued messages (the deregistration) up to the linger bound.
        with trio.CancelScope(shield=True):
            await trio.to_thread.run_sync(ctx.term)
