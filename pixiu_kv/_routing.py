"""Which requests the gateway accepts, and which cluster serves them (pure logic).

The proxied API is the OpenAI/vLLM JSON surface: every route below is ``POST`` with a JSON
object body. Anything else the gateway answers itself (``/health``, ``/ready``,
``/v1/models``) or refuses with 404/405, so engine administration endpoints are never
exposed by accident.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Final

from .config import RouteConfig

__all__ = ["JSON_ENDPOINTS", "OWN_ENDPOINTS", "RouteTable", "is_json_content_type"]

JSON_ENDPOINTS: Final = frozenset({
    "/v1/completions",
    "/v1/chat/completions",
    "/v1/embeddings",
    "/v1/responses",
    "/v1/score",
    "/v1/rerank",
    "/v2/rerank",
    "/rerank",
    "/score",
    "/pooling",
    "/classify",
    "/tokenize",
    "/detokenize",
})
# The gateway's own routes: path -> allowed method.
OWN_ENDPOINTS: Final = {"/health": "GET", "/ready": "GET", "/v1/models": "GET"}


def is_json_content_type(value: bytes | None) -> bool:
    """``application/json`` or ``application/<something>+json``, parameters ignored."""
    if value is None:
        return False
    media = value.split(b";", 1)[0].strip().lower()
    return media == b"application/json" or (media.startswith(b"application/") and media.endswith(b"+json"))


class RouteTable:
    """Routes ordered for matching: longest prefix first, and at equal prefix a route bound
    to a model before the catch-all one."""

    __slots__ = ("_routes",)

    def __init__(self, routes: Iterable[RouteConfig]) -> None:
        self._routes = sorted(routes, key=lambda r: (-len(r.prefix), r.model == ""))

    def resolve(self, path: str, model: str | None) -> RouteConfig | None:
        for route in self._routes:
            if path.startswith(route.prefix) and (not route.model or route.model == model):
                return route
        return None
