"""Test doubles and servers for the operations tests."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from functools import partial
from typing import Any

import hypercorn.config
import hypercorn.trio
import trio

from pixiu_kv.errors import GatewayError
from pixiu_kv.reload import ReloadResult


class FakeControl:
    """A gateway stand-in with the state the admin API shows and changes."""

    def __init__(self) -> None:
        self.config: dict[str, Any] = {"listener": {"port": 8888}, "admin": {"token": "<redacted>"}}
        self.endpoint_state: dict[str, dict[str, Any]] = {
            "e1": {"id": "e1", "cluster": "c", "healthy": True, "draining": False, "in_flight": 2,
                   "max_in_flight": 8},
            "e2": {"id": "e2", "cluster": "c", "healthy": False, "draining": False, "in_flight": 0,
                   "max_in_flight": 8},
        }
        self.breaker_state = [{"name": "lmcache", "state": "closed", "failures": 0}]
        self.generation = 1
        self.next_reload_error: str | None = None
        self.routed: list[tuple[str, bytes]] = []

    def effective_config(self) -> Mapping[str, Any]:
        return self.config

    def endpoints(self) -> Sequence[Mapping[str, Any]]:
        return list(self.endpoint_state.values())

    def breakers(self) -> Sequence[Mapping[str, Any]]:
        return self.breaker_state

    def drain(self, endpoint_id: str) -> Mapping[str, Any] | None:
        entry = self.endpoint_state.get(endpoint_id)
        if entry is not None:
            entry["draining"] = True
        return entry

    def undrain(self, endpoint_id: str) -> Mapping[str, Any] | None:
        entry = self.endpoint_state.get(endpoint_id)
        if entry is not None:
            entry["draining"] = False
        return entry

    async def reload(self) -> ReloadResult:
        if self.next_reload_error is not None:
            return ReloadResult(False, self.generation, self.next_reload_error)
        self.generation += 1
        return ReloadResult(True, self.generation, changed=("clusters",))

    async def explain_route(self, path: str, body: bytes) -> Mapping[str, Any]:
        if not body.strip().startswith(b"{"):
            raise GatewayError(400, "body is not a JSON object")
        self.routed.append((path, body))
        return {"endpoint": "e1", "reason": "cache_hit", "path": path, "body_bytes": len(body)}


async def serve_asgi(nursery: trio.Nursery, app: Any) -> str:
    """Serve ``app`` on an ephemeral loopback port inside ``nursery``; returns its base URL."""
    config = hypercorn.config.Config()
    config.bind = ["127.0.0.1:0"]
    config.accesslog = None
    config.errorlog = None
    stop = trio.Event()
    binds = await nursery.start(partial(hypercorn.trio.serve, app, config, shutdown_trigger=stop.wait))
    return str(binds[0])
