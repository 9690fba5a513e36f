"""Client of the LMCache controller's HTTP API: /lookup, /pin, /compress, /evict, /clear.

``/lookup`` answers ``{"event_id", "layout_info": {instance_id: layout}}``. The real
controller sends each layout as an array ``[location, matched_end]``; Pixiu-style
controllers send an object ``{"0": location, "1": count}``. Both are accepted; malformed
entries are ignored, not fatal. The instance holding the prompt's longest prefix is the one
with the largest matched count (> 0), not the first key.

The real controller has no ``/evict``: a 404 or 405 there raises :class:`EndpointMissing`,
and the caller decides what to do about it.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import attrs

from .resilience import (
    CircuitBreaker,
    MalformedReply,
    RetryPolicy,
    UpstreamRejected,
    call_with_retry,
)

__all__ = [
    "MAX_REPLY_BYTES",
    "EndpointMissing",
    "JsonPost",
    "LayoutEntry",
    "LmCacheClient",
    "LookupResult",
    "parse_lookup_reply",
]

MAX_REPLY_BYTES = 1024 * 1024


JsonPost = Callable[[str, bytes], Awaitable[Any]]
"""``await post(path, json_body)`` -> decoded JSON reply, failures as ``UpstreamError``s."""


class EndpointMissing(UpstreamRejected):
    """The controller does not implement this path (404/405)."""


@attrs.frozen(slots=True)
class LayoutEntry:
    instance_id: str
    location: str
    matched: int


@attrs.frozen(slots=True)
class LookupResult:
    """Where a prompt's prefix is cached: every instance reported, and the best of them."""

    layout: Mapping[str, LayoutEntry]
    best: LayoutEntry | None


def parse_lookup_reply(reply: object) -> LookupResult:
    """Parse a /lookup reply in either layout form; raise :class:`MalformedReply` if it has none."""
    if not isinstance(reply, dict):
        raise MalformedReply("lookup reply is not an object")
    info = reply.get("layout_info")
    if not isinstance(info, dict):
        raise MalformedReply("lookup reply has no layout_info object")
    layout: dict[str, LayoutEntry] = {}
    best: LayoutEntry | None = None
    for instance_id, value in info.items():
        entry = _layout_entry(instance_id, value)
        if entry is None:
            continue
        layout[instance_id] = entry
        # Largest matched count wins; among equals the smallest id, so the choice is stable.
        if entry.matched > 0 and (best is None or entry.matched > best.matched
                                  or (entry.matched == best.matched and instance_id < best.instance_id)):
            best = entry
    return LookupResult(layout=layout, best=best)


def _layout_entry(instance_id: object, value: object) -> LayoutEntry | None:
    if not isinstance(instance_id, str) or not instance_id:
        return None
    if isinstance(value, list) and len(value) == 2:
        location, matched = value
    elif isinstance(value, dict) and "1" in value:
        location, matched = value.get("0", ""), value["1"]
    else:
        return None
    if not isinstance(location, str) or type(matched) is not int or matched < 0:
        return None
    return LayoutEntry(instance_id, location, matched)


def _tokens_body(tokens_json: bytes, **fields: Any) -> bytes:
    # Splice the pre-encoded token array in rather than re-encoding thousands of ints.
    if not fields:
        return b'{"tokens":' + tokens_json + b"}"
    rest = json.dumps(fields, separators=(",", ":")).encode()
    return b'{"tokens":' + tokens_json + b"," + rest[1:]


class LmCacheClient:
    """One controller; the caller picks the breaker (routing and background keep their own)."""

    __slots__ = ("_policy", "_post")

    def __init__(self, post: JsonPost, policy: RetryPolicy) -> None:
        self._post = post
        self._policy = policy

    async def lookup(self, tokens_json: bytes, *, breaker: CircuitBreaker, deadline: float,
                     cancel_is_failure: bool = False, bounded: bool = False) -> LookupResult:
        body = _tokens_body(tokens_json)

        async def attempt() -> LookupResult:
            return parse_lookup_reply(await self._post("/lookup", body))

        return await call_with_retry(attempt, policy=self._policy, breaker=breaker, deadline=deadline,
                                     cancel_is_failure=cancel_is_failure, bounded=bounded)

    async def pin(self, tokens_json: bytes, instance_id: str, location: str, *,
                  breaker: CircuitBreaker, deadline: float) -> int | None:
        return await self._act("/pin", _tokens_body(tokens_json, instance_id=instance_id, location=location),
                               breaker, deadline)

    async def compress(self, tokens_json: bytes, instance_id: str, location: str, method: str, *,
                       breaker: CircuitBreaker, deadline: float) -> int | None:
        body = _tokens_body(tokens_json, instance_id=instance_id, location=location, method=method)
        return await self._act("/compress", body, breaker, deadline)

    async def evict(self, tokens_json: bytes, instance_id: str, *,
                    breaker: CircuitBreaker, deadline: float) -> int | None:
        body = _tokens_body(tokens_json, instance_id=instance_id)
        return await self._act("/evict", body, breaker, deadline)

    async def clear(self, instance_id: str, location: str, *,
                    breaker: CircuitBreaker, deadline: float) -> int | None:
        """Drop *everything* at ``location`` of ``instance_id`` (the real controller's only eviction)."""
        body = json.dumps({"instance_id": instance_id, "location": location}, separators=(",", ":")).encode()
        return await self._act("/clear", body, breaker, deadline)

    async def _act(self, path: str, body: bytes, breaker: CircuitBreaker, deadline: float) -> int | None:
        async def attempt() -> int | None:
            try:
                reply = await self._post(path, body)
            except UpstreamRejected as exc:
                if exc.status in (404, 405):
                    raise EndpointMissing(f"POST {path}: HTTP {exc.status}", exc.status) from None
                raise
            if not isinstance(reply, dict):
                raise MalformedReply(f"POST {path}: reply is not an object")
            num_tokens = reply.get("num_tokens")
            return num_tokens if type(num_tokens) is int else None

        return await call_with_retry(attempt, policy=self._policy, breaker=breaker, deadline=deadline)
