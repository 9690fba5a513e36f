"""The per-request context that filters share.

A context is created fresh for every request and dropped with it, so a hint such as
``preferred_endpoint_id`` (Pixiu's ``llm_preferred_endpoint_id``) can never leak into the
next request, even on a keep-alive connection.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import attrs
import trio

__all__ = ["BackgroundScope", "RequestContext", "RouteHint"]


@attrs.frozen
class RouteHint:
    """Why a filter prefers an endpoint: shown to operators in ``x-pixiu-kv-route``."""

    endpoint_id: str | None
    reason: str
    matched_tokens: int | None = None
    prompt_tokens: int | None = None


class BackgroundScope:
    """Background work owned by one request, running in the gateway's nursery.

    It never delays the response or the connection: the request handler returns at once.
    A client disconnect before the response completed cancels it (with any call in flight);
    a completed response leaves it ``grace`` seconds to finish; gateway shutdown cancels it.
    The nursery is opened lazily, so a request that starts no background work pays nothing.
    """

    __slots__ = ("_cancel_scope", "_closed", "_done", "_nursery", "_opening", "_parent")

    def __init__(self, parent: trio.Nursery) -> None:
        self._parent = parent
        self._nursery: trio.Nursery | None = None
        self._opening: trio.Event | None = None
        self._cancel_scope = trio.CancelScope()
        self._done = trio.Event()
        self._closed = False

    async def start_soon(self, fn: Callable[..., Awaitable[Any]], *args: Any) -> bool:
        """Start ``fn(*args)``; False when the request is already over."""
        if self._closed:
            return False
        if self._nursery is None:
            if self._opening is not None:
                # Another task of this request is opening the nursery: share it.
                await self._opening.wait()
            else:
                self._opening = trio.Event()
                try:
                    self._nursery = await self._parent.start(self._run)
                finally:
                    self._opening.set()
            if self._nursery is None or self._closed:
                return False
        self._nursery.start_soon(fn, *args)
        return True

    async def _run(self, task_status: trio.TaskStatus[trio.Nursery]) -> None:
        with self._cancel_scope:
            async with trio.open_nursery() as nursery:
                task_status.started(nursery)
                await self._done.wait()

    def finish(self, grace: float) -> None:
        """The response completed: let running work finish within ``grace`` seconds."""
        self._closed = True
        self._cancel_scope.deadline = min(self._cancel_scope.deadline, trio.current_time() + grace)
        self._done.set()

    def cancel(self) -> None:
        """The client went away (or the gateway stops): cancel everything at once."""
        self._closed = True
        self._cancel_scope.cancel()
        self._done.set()


@attrs.define(slots=True, eq=False)
class RequestContext:
    request_id: str
    method: str
    path: str
    headers: list[tuple[bytes, bytes]]
    body: bytes
    # The parsed JSON body, parsed once by the chain (``None`` when it is not JSON).
    json: Any
    # Route resolution (filled by the chain before any filter runs).
    cluster_name: str
    # Background work owned by this request (see BackgroundScope).
    background: BackgroundScope
    started_at: float = attrs.field(factory=trio.current_time)
    preferred_endpoint_id: str | None = None
    route_hint: RouteHint | None = None
    # Free-form values for filters that cooperate (kept small; dropped with the request).
    values: dict[str, Any] = attrs.field(factory=dict)
    # The raw query string (without "?"), forwarded upstream as is.
    query_string: bytes = b""

    @property
    def model(self) -> str | None:
        if isinstance(self.json, dict):
            model = self.json.get("model")
            if isinstance(model, str):
                return model
        return None
