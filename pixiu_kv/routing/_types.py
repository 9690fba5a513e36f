"""Values that cross the router's boundary: what it sees of endpoints, and what it decides."""

from __future__ import annotations

from typing import Literal

import attrs

from ..context import RouteHint

__all__ = ["CostLine", "Decision", "EndpointView", "Reason"]

Reason = Literal["cache", "affinity", "load", "new-prefix", "session", "hot-spread", "no-endpoint"]
"""Which term decided: the cache match, bounded-load affinity (the holder kept a request
another endpoint looked faster for), the load (queue, in-flight), new-prefix placement (a
mostly new prompt went to an endpoint that got fewer requests lately than the cheapest), the
session's hash, the spreading of a hot prefix over replicas, or nothing was eligible."""


def _non_negative_int(_: object, attribute: attrs.Attribute[int], value: int) -> None:
    if value < 0:
        raise ValueError(f"{attribute.name} must be >= 0, got {value}")


@attrs.frozen(slots=True)
class EndpointView:
    """What the proxy knows of an endpoint at decision time."""

    id: str
    healthy: bool = True
    in_flight: int = attrs.field(default=0, validator=_non_negative_int)
    max_in_flight: int = attrs.field(default=256, validator=attrs.validators.ge(1))
    weight: int = attrs.field(default=1, validator=attrs.validators.ge(1))
    # Failing its health checks or drained by an operator (not merely cooling down after a
    # refused request): its engine may restart, so what it cached is no longer trusted.
    down: bool = False

    @property
    def full(self) -> bool:
        return self.in_flight >= self.max_in_flight


@attrs.frozen(slots=True)
class CostLine:
    """One endpoint's predicted time to first token (seconds) and what went into it."""

    endpoint_id: str
    predicted_ttft: float
    matched_tokens: int
    load: int
    overloaded: bool = False


@attrs.frozen(slots=True)
class Decision:
    """Where a request goes and why. ``reservation`` identifies it in the router's callbacks
    (0: nothing reserved, e.g. no endpoint was eligible)."""

    endpoint_id: str | None
    reason: Reason
    matched_tokens: int
    prompt_tokens: int
    reservation: int = 0
    predicted_ttft: float | None = None
    # (endpoint id, predicted ttft, matched tokens, load, overloaded) of the cheapest few,
    # kept raw: building value objects for every decision would cost more than the decision.
    cost_rows: tuple[tuple[str, float, int, int, bool], ...] = attrs.field(default=(), repr=False)
    # ``compress_when_full``: the prompt's first this many tokens (whole LMCache chunks) are
    # cached on the endpoint, whose cache is full: compress them there (0: nothing to do).
    compress_tokens: int = 0

    @property
    def costs(self) -> tuple[CostLine, ...]:
        """The cheapest few endpoints, cheapest first (the winner is not always first: a
        session or a hot-prefix replica can win over a cheaper endpoint)."""
        return tuple(CostLine(*row) for row in self.cost_rows)

    def route_hint(self) -> RouteHint:
        """The request context's hint for the proxy (``ctx.route_hint``)."""
        return RouteHint(endpoint_id=self.endpoint_id, reason=self.reason,
                         matched_tokens=self.matched_tokens, prompt_tokens=self.prompt_tokens)

    def explain(self) -> str:
        """One line for operators (a response header or a log): never contains prompt text."""
        parts = [f"endpoint={self.endpoint_id or '-'}", f"reason={self.reason}",
                 f"matched={self.matched_tokens}/{self.prompt_tokens}"]
        if self.predicted_ttft is not None:
            parts.append(f"ttft={self.predicted_ttft * 1e3:.1f}ms")
        parts.extend(f"{c.endpoint_id}:{c.predicted_ttft * 1e3:.1f}ms/{c.matched_tokens}" for c in self.costs)
        return ";".join(parts)
