"""Real loopback servers for the kvcache tests: one raw-ASGI app plays vLLM's /tokenize and
the LMCache controller's API, with per-path faults (hang, 500, 404, 405, garbage, hold).

Every request is counted on the server side; a handler that is aborted (client gone or
server shut down while it was held) is counted too, so tests observe cancellation where it
matters: at the upstream.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable
from functools import partial
from typing import Any

import hypercorn.config
import hypercorn.trio
import trio

from pixiu_kv._asgi import receive_body, serve_lifespan
from pixiu_kv.config import KvCacheConfig, TokenCacheConfig

_MAX_BODY = 64 * 1024 * 1024


def fake_tokens(text: str) -> list[int]:
    return list(text.encode())


def render_chat(messages: list[dict[str, Any]]) -> str:
    return "".join(f"<{m['role']}>{m['content']}" for m in messages)


class FakeUpstream:
    """vLLM /tokenize + LMCache controller, programmable per path."""

    def __init__(self) -> None:
        self.calls: Counter[str] = Counter()
        self.aborted: Counter[str] = Counter()
        self.bodies: dict[str, list[Any]] = {}
        # path -> "ok" | "hang" | "hold" | "500" | "404" | "405" | "422" | "garbage"
        self.fault: dict[str, str] = {}
        # The layout /lookup answers, in the real (array) form unless pixiu_form.
        self.layout: dict[str, tuple[str, int]] = {}
        self.pixiu_form = False
        self.release = trio.Event()  # opens every "hold"
        self._changed = trio.Event()

    async def wait_for(self, predicate: Callable[[], bool], within: float = 10.0) -> None:
        """Wait until ``predicate()`` holds, re-checked whenever a request starts or ends."""
        with trio.fail_after(within):
            while not predicate():
                await self._changed.wait()

    def _notify(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            await serve_lifespan(receive, send)
            return
        path = scope["path"]
        body = await receive_body(receive, _MAX_BODY)
        if body is None:
            return  # the client left
        self.calls[path] += 1
        self.bodies.setdefault(path, []).append(json.loads(body) if body else None)
        self._notify()
        fault = self.fault.get(path, "ok")
        try:
            if fault in ("hang", "hold") and await self._held_until_disconnect(receive, fault == "hang"):
                self.aborted[path] += 1
                self._notify()
                return
        except trio.Cancelled:  # the server is shutting down
            self.aborted[path] += 1
            self._notify()
            raise
        status, reply = self._reply(path, fault, json.loads(body) if body else None)
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/json")]})
        await send({"type": "http.response.body", "body": reply})

    async def _held_until_disconnect(self, receive: Any, forever: bool) -> bool:
        """Hold the request until released (or forever); True when the client went away."""
        disconnected = False
        async with trio.open_nursery() as nursery:
            async def watch_disconnect() -> None:
                nonlocal disconnected
                while (await receive())["type"] != "http.disconnect":
                    pass
                disconnected = True
                nursery.cancel_scope.cancel()

            nursery.start_soon(watch_disconnect)
            if forever:
                await trio.sleep_forever()
            await self.release.wait()
            nursery.cancel_scope.cancel()
        return disconnected

    def _reply(self, path: str, fault: str, body: Any) -> tuple[int, bytes]:
        if fault in ("500", "404", "405", "422"):
            return int(fault), json.dumps({"detail": "fault"}).encode()
        if fault == "garbage":
            return 200, b"<html>not json"
        if path == "/tokenize":
            if "messages" in body:
                tokens = fake_tokens(render_chat(body["messages"]))
            else:
                tokens = fake_tokens(body["prompt"])
            return 200, json.dumps({"count": len(tokens), "tokens": tokens, "max_model_len": 4096}).encode()
        if path == "/lookup":
            info: dict[str, Any] = {
                inst: ({"0": loc, "1": n} if self.pixiu_form else [loc, n])
                for inst, (loc, n) in self.layout.items()
            }
            return 200, json.dumps({"event_id": "e", "layout_info": info}).encode()
        if path in ("/pin", "/compress", "/evict", "/clear"):
            return 200, json.dumps({"event_id": "e", "num_tokens": 1}).encode()
        return 404, b'{"detail":"Not Found"}'


async def serve_asgi(nursery: trio.Nursery, app: Any) -> str:
    """Serve ``app`` on 127.0.0.1:<free port> until the nursery ends; returns its base URL."""
    config = hypercorn.config.Config()
    config.bind = ["127.0.0.1:0"]
    config.accesslog = None
    config.errorlog = None
    config.graceful_timeout = 0.1
    stop = trio.Event()
    binds = await nursery.start(partial(hypercorn.trio.serve, app, config, shutdown_trigger=stop.wait))
    return str(binds[0])


def kv_config(url: str, **overrides: Any) -> KvCacheConfig:
    """A config with both upstreams on ``url`` and the token cache on."""
    fields: dict[str, Any] = {
        "enabled": True,
        "vllm_endpoint": url,
        "lmcache_endpoint": url,
        "token_cache": TokenCacheConfig(enabled=True, max_size=100, ttl=600.0),
        "lookup_routing_timeout": 2.0,
    }
    fields.update(overrides)
    return KvCacheConfig(**fields)


async def wait_until(predicate: Callable[[], bool], within: float = 10.0) -> None:
    """Wait for a condition that no event announces (e.g. a counter of the code under test)."""
    with trio.fail_after(within):
        while not predicate():  # noqa: ASYNC110 - the code under test announces no event
            await trio.sleep(0.002)
