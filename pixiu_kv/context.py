"""The per-request context that filters share.

A context is created fresh for every request and dropped with it, so a hint such as
``preferred_endpoint_id`` (Pixiu's ``llm_preferred_endpoint_id``) can never leak into the
next request, even on a keep-alive connection.
"""

from __future__ import annotations

from typing import Any

import attrs
import trio

__all__ = ["RequestContext", "RouteHint"]


@attrs.frozen
class RouteHint:
    """Why a filter prefers an endpoint: shown to operators in ``x-pixiu-kv-route``."""

    endpoint_id: str | None
    reason: str
    matched_tokens: int | None = None
    prompt_tokens: int | None = None


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
    # A nursery owned by this request: cancelled when the client disconnects, and given
    # ``request_timeout`` to finish after a completed response.
    nursery: trio.Nursery
    started_at: float = attrs.field(factory=trio.current_time)
    preferred_endpoint_id: str | None = None
    route_hint: RouteHint | None = None
    # Free-form values for filters that cooperate (kept small; dropped with the request).
    values: dict[str, Any] = attrs.field(factory=dict)

    @property
    def model(self) -> str | None:
        if isinstance(self.json, dict):
            model = self.json.get("model")
            if isinstance(model, str):
                return model
        return None
