"""The router's per-request seam with the LLM proxy.

The kvcache filter knows the prompt (tokens, LMCache's lookup, the session key) but not the
endpoints' live state; the proxy knows the endpoints at pick time and sees the response.
The filter leaves a :class:`RoutingHook` in ``ctx.values[ROUTING_HOOK_KEY]``; the proxy
calls ``choose`` just before it picks (the decision then sees fresh health and in-flight
counts and sets the preferred endpoint), ``first_byte`` when the response head arrives,
``feed`` for every body chunk, and ``done`` when the response completed. Anything else
(an error answer, a timeout, a client gone) is a failure: :meth:`watch`, run in the
request's background scope, releases the decision when that scope ends without ``done``.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Protocol

import trio

from ..context import RequestContext
from ._blocks import PrefixKeys
from ._request import RoutingInput
from ._router import Router
from ._types import Decision, EndpointView
from .usage import UsageScanner

__all__ = ["ROUTING_HOOK_KEY", "Compressor", "EndpointState", "RoutingHook"]

Compressor = Callable[[Sequence[int], str], Awaitable[Any]]
"""Compresses a prompt prefix (its token ids) on an instance through LMCache."""

ROUTING_HOOK_KEY = "pixiu_kv.routing.hook"


class EndpointState(Protocol):
    """What the proxy's endpoints expose (``pixiu_kv.cluster.Endpoint``)."""

    @property
    def id(self) -> str: ...

    @property
    def weight(self) -> int: ...

    @property
    def in_flight(self) -> int: ...

    @property
    def max_in_flight(self) -> int: ...

    @property
    def healthy(self) -> bool: ...

    @property
    def draining(self) -> bool: ...

    def available(self, now: float) -> bool: ...


class RoutingHook:
    __slots__ = ("_body_seen", "_compressor", "_ctx", "_decided", "_decided_at", "_finished", "_input",
                 "_router", "_scanner", "_scope", "_serving", "_stream", "decision")

    def __init__(self, router: Router, routing_input: RoutingInput, ctx: RequestContext,
                 compressor: Compressor | None = None) -> None:
        self._router = router
        self._input = routing_input
        self._ctx = ctx
        self._compressor = compressor
        self._decided = trio.Event()
        body = ctx.json
        # Only a stream's first byte is its first token; a plain response comes whole.
        self._stream = isinstance(body, dict) and body.get("stream") is True
        self._scanner = UsageScanner()
        self._scope: trio.CancelScope | None = None
        self._finished = False
        self._body_seen = False
        self._serving: str | None = None
        self._decided_at = 0.0
        self.decision: Decision | None = None

    def choose(self, endpoints: Sequence[EndpointState], now: float) -> Decision:
        """Decide now, with the endpoints as the proxy sees them; sets the preferred endpoint."""
        if self.decision is not None:
            return self.decision  # one decision per request (a failover is the proxy's choice)
        views = [EndpointView(e.id, healthy=e.available(now), in_flight=e.in_flight,
                              max_in_flight=e.max_in_flight, weight=e.weight,
                              down=not e.healthy or e.draining) for e in endpoints]
        inp = self._input
        decision = self._router.decide(views, inp.tokens, inp.lookup, inp.session_key, now)
        self.decision = decision
        self._decided_at = now
        self._decided.set()
        self._ctx.route_hint = decision.route_hint()
        if decision.endpoint_id is not None:
            self._ctx.preferred_endpoint_id = decision.endpoint_id
        return decision

    def first_byte(self, endpoint_id: str, now: float) -> None:
        """The response head arrived from ``endpoint_id``. A streaming server sends its head
        before any token, so the first token is the first body chunk (:meth:`feed`)."""
        self._serving = endpoint_id

    def feed(self, chunk: bytes) -> None:
        if not self._body_seen:
            self._body_seen = True
            d = self.decision
            if d is not None and self._stream and self._serving == d.endpoint_id:
                self._router.on_first_byte(d, trio.current_time() - self._decided_at)
        self._scanner.feed(chunk)

    def done(self, endpoint_id: str, now: float) -> None:
        """The response from ``endpoint_id`` completed."""
        d = self.decision
        if d is None or self._finished:
            return
        self._finished = True
        if endpoint_id == d.endpoint_id:
            usage = self._scanner.result()
            self._router.on_complete(d, usage.cached_tokens if usage else None,
                                     usage.prompt_tokens if usage else None, now,
                                     usage.completion_tokens if usage else None)
        else:
            self._router.on_failure(d, now)  # served elsewhere after a failover
        if self._scope is not None:
            self._scope.cancel()

    async def watch(self) -> None:
        """Run in the request's background scope: a request that ends without ``done`` failed.
        A decision that asks for its prefix to be compressed gets the call here too."""
        with trio.CancelScope() as scope:
            self._scope = scope
            try:
                await self._decided.wait()
                d = self.decision
                tokens = self._input.tokens
                if (self._compressor is not None and d is not None and d.compress_tokens
                        and d.endpoint_id is not None and tokens is not None):
                    ids = tokens.tokens if isinstance(tokens, PrefixKeys) else tokens
                    await self._ctx.background.start_soon(self._compressor, ids[: d.compress_tokens],
                                                          d.endpoint_id)
                await trio.sleep_forever()
            finally:
                if not self._finished:
                    self._finished = True
                    if self.decision is not None:
                        self._router.on_failure(self.decision)
