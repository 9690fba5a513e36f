"""ASGI plumbing of the controller emulator: bounded bodies, injected faults, replies."""

from __future__ import annotations

import json
import random
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

import attrs
import trio

from pixiu_kv._asgi import serve_lifespan
from pixiu_kv.sim._controller_api import ApiReply, EmulatorState, handle_request

__all__ = ["ControllerAsgi", "FaultBox", "Faults"]

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

GARBAGE_BODY = b"<html>controller fault: not JSON</html>"
_CLIENT_GONE = b"\x00client gone"  # compared by identity, never a real body


def _non_negative(_inst: object, attribute: attrs.Attribute[float], value: float) -> None:
    if value < 0:
        raise ValueError(f"{attribute.name} must be >= 0, got {value}")


def _ratio(_inst: object, attribute: attrs.Attribute[float], value: float) -> None:
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{attribute.name} must be within [0, 1], got {value}")


@attrs.frozen(slots=True)
class Faults:
    """Faults the emulator injects into its POST API (``paths`` None = every POST route).

    ``latency``: seconds added before replying. ``error_rate``: share of requests answered
    500 ``{"detail": "injected fault"}``. ``hang``: requests wait until the hang is released
    (``ControllerEmulator.release_hangs`` or faults without ``hang``), the client goes away,
    or ``hang_limit`` seconds pass, then are answered normally. ``garbage``: 200 with a body
    that is not JSON. ``dead_instances``: requests the controller would forward to these
    instances' workers (``/pin``, ``/clear``, ``/compress``, ``/decompress``, ``/health``,
    ``/evict``) hang like ``hang``, as the real controller hangs on a worker that died
    without deregistering; lookups still name them.
    """

    latency: float = attrs.field(default=0.0, validator=_non_negative)
    error_rate: float = attrs.field(default=0.0, validator=_ratio)
    hang: bool = False
    hang_limit: float = attrs.field(default=60.0, validator=_non_negative)
    garbage: bool = False
    paths: frozenset[str] | None = None
    dead_instances: frozenset[str] = frozenset()

    def applies_to(self, method: str, path: str) -> bool:
        if method != "POST":
            return False
        return self.paths is None or path in self.paths


@attrs.define(slots=True)
class FaultBox:
    """The current faults, swappable at run time, and what releases hanging requests."""

    faults: Faults = attrs.field(factory=Faults)
    rng: random.Random = attrs.field(factory=lambda: random.Random(0))
    injected: int = 0
    held: int = 0
    _release: trio.Event = attrs.field(factory=trio.Event)
    _held_changed: trio.Event = attrs.field(factory=trio.Event)

    def set(self, faults: Faults) -> None:
        self.faults = faults
        if not faults.hang and not faults.dead_instances:
            self.release()

    def release(self) -> None:
        self._release.set()
        self._release = trio.Event()

    @property
    def release_event(self) -> trio.Event:
        return self._release

    def change_held(self, delta: int) -> None:
        self.held += delta
        self._held_changed.set()
        self._held_changed = trio.Event()

    async def wait_held(self, count: int) -> None:
        """Return once at least ``count`` requests are held by a hang."""
        while self.held < count:
            await self._held_changed.wait()


@attrs.define(slots=True)
class ControllerAsgi:
    """A raw ASGI app: no framework between the socket and the emulated controller."""

    state: EmulatorState
    faults: FaultBox
    max_body_bytes: int = 8 * 1024 * 1024

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        method: str = scope["method"]
        path: str = scope["path"]
        raw = await self._read_body(receive)
        if raw is _CLIENT_GONE:
            return
        if raw is None:
            await _reply(send, ApiReply(413, b'{"detail":"Request body too large"}'))
            return
        faults = self.faults.faults
        if faults.applies_to(method, path):
            if faults.latency > 0:
                await trio.sleep(faults.latency)
            hang = faults.hang or _targets_dead_worker(path, raw, faults.dead_instances)
            if hang and not await self._hang(faults, receive):
                return  # the client went away while the request hung
            if faults.error_rate > 0 and self.faults.rng.random() < faults.error_rate:
                self.faults.injected += 1
                await _reply(send, ApiReply(500, b'{"detail":"injected fault"}'))
                return
            if faults.garbage:
                self.faults.injected += 1
                await _reply(send, ApiReply(200, GARBAGE_BODY))
                return
        headers = dict(scope.get("headers") or [])
        content_type = headers.get(b"content-type", b"").decode("latin-1")
        query = scope.get("query_string", b"").decode("latin-1")
        await _reply(send, handle_request(self.state, method, path, query, raw, content_type))

    async def _read_body(self, receive: Receive) -> bytes | None:
        """The whole body; None when it exceeds the limit, ``_CLIENT_GONE`` on disconnect."""
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return _CLIENT_GONE
            body = message.get("body", b"")
            size += len(body)
            if size > self.max_body_bytes:
                return None
            chunks.append(body)
            if not message.get("more_body", False):
                return b"".join(chunks)

    async def _hang(self, faults: Faults, receive: Receive) -> bool:
        """Hold the request; True to answer it afterwards, False if the client left."""
        self.faults.injected += 1
        release = self.faults.release_event
        client_left = False

        async def watch_disconnect(scope: trio.CancelScope) -> None:
            nonlocal client_left
            while (await receive())["type"] != "http.disconnect":
                pass
            client_left = True
            scope.cancel()

        self.faults.change_held(+1)
        try:
            with trio.move_on_after(faults.hang_limit) as limit:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(watch_disconnect, limit)
                    await release.wait()
                    nursery.cancel_scope.cancel()
        finally:
            self.faults.change_held(-1)
        return not client_left

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        await serve_lifespan(receive, send, on_shutdown=self.faults.release)


_WORKER_ROUTES = frozenset({"/pin", "/clear", "/compress", "/decompress", "/health", "/evict"})


def _targets_dead_worker(path: str, raw: bytes, dead: frozenset[str]) -> bool:
    if not dead or path not in _WORKER_ROUTES:
        return False
    try:
        body = json.loads(raw)
    except ValueError:
        return False  # validation answers it
    return isinstance(body, dict) and body.get("instance_id") in dead


async def _reply(send: Send, reply: ApiReply) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": reply.status,
            "headers": [
                (b"content-type", reply.content_type.encode()),
                (b"content-length", str(len(reply.body)).encode()),
            ],
        }
    )
    await send({"type": "http.response.body", "body": reply.body})
