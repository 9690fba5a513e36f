"""What the kvcache filter hands the proxy for routing, and where a session key comes from."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import attrs

from ._blocks import PrefixKeys

__all__ = ["ROUTING_INPUT_KEY", "RoutingInput", "session_key_of"]

ROUTING_INPUT_KEY = "pixiu_kv.routing.input"
"""Key of the :class:`RoutingInput` in ``RequestContext.values``."""

# A session key is an identifier, not content: anything longer is cut (it is only hashed).
_MAX_SESSION_KEY = 256


@attrs.frozen(slots=True)
class RoutingInput:
    """The prompt's tokens (or their keys), LMCache's answer, and the session key, if known."""

    tokens: Sequence[int] | PrefixKeys | None = attrs.field(default=None, repr=False)
    lookup: Mapping[str, int] | None = None
    session_key: str | None = None


def session_key_of(headers: Sequence[tuple[bytes, bytes]], body: object, header: str) -> str | None:
    """The ``header`` (lower-case name) of the request, else the body's string ``user``."""
    name = header.encode("latin-1")
    for key, value in headers:
        if key.lower() == name:
            text = value.decode("latin-1").strip()
            if text:
                return text[:_MAX_SESSION_KEY]
    if isinstance(body, dict):
        user = body.get("user")
        if isinstance(user, str) and user.strip():
            return user.strip()[:_MAX_SESSION_KEY]
    return None
