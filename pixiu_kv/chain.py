"""The HTTP filter chain, as in Pixiu: decode filters in order, then one terminal filter.

Decode filters read the request (``ctx.json`` is parsed once, before the chain runs) and
may set values in the per-request :class:`~pixiu_kv.context.RequestContext`, such as the
preferred endpoint. They never answer the client themselves except by raising
:class:`~pixiu_kv.errors.GatewayError`. The LLM proxy filter is terminal: it sends the
response.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any, Protocol

from .context import RequestContext

__all__ = ["ASGIReceive", "ASGISend", "DecodeFilter", "TerminalFilter"]

ASGISend = Callable[[MutableMapping[str, Any]], Awaitable[None]]
ASGIReceive = Callable[[], Awaitable[MutableMapping[str, Any]]]


class DecodeFilter(Protocol):
    """A filter that runs before the terminal one. Must be quick: it is on the hot path."""

    async def decode(self, ctx: RequestContext) -> None: ...


class TerminalFilter(Protocol):
    """The filter that answers: forwards the request upstream and streams the reply back."""

    async def serve(self, ctx: RequestContext, send: ASGISend) -> None: ...
