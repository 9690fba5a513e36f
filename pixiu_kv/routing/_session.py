"""Session affinity: consistent hashing with bounded loads (Mirrokni, Thorup, Zadimoghaddam).

A session key maps to a point on a ring of endpoint points; the request goes to the first
endpoint clockwise whose load stays within ``factor x`` the mean load (counting this
request). The same session keeps its endpoint while it is not overloaded; adding or losing
an endpoint moves only the sessions that hashed next to it. Hashes are BLAKE2b, stable
across processes, so every gateway replica sends a session to the same engine.
"""

from __future__ import annotations

import bisect
import hashlib
import math
from collections.abc import Mapping, Sequence

__all__ = ["SessionRing", "stable_hash"]

_POINTS_PER_WEIGHT = 40
_MAX_RINGS = 16


def stable_hash(text: str) -> int:
    """A 64-bit hash of ``text`` that is the same in every process (unlike ``hash(str)``)."""
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=8).digest(),
                          "big")


class SessionRing:
    """Rings are built per set of endpoints (and weights) and kept: O(log points) per pick."""

    __slots__ = ("_rings",)

    def __init__(self) -> None:
        self._rings: dict[tuple[tuple[str, int], ...], tuple[list[int], list[str]]] = {}

    def _ring(self, members: tuple[tuple[str, int], ...]) -> tuple[list[int], list[str]]:
        ring = self._rings.get(members)
        if ring is None:
            points = sorted((stable_hash(f"{endpoint_id}#{i}"), endpoint_id)
                            for endpoint_id, weight in members
                            for i in range(_POINTS_PER_WEIGHT * max(1, weight)))
            ring = ([p for p, _ in points], [e for _, e in points])
            if len(self._rings) >= _MAX_RINGS:
                self._rings.pop(next(iter(self._rings)))
            self._rings[members] = ring
        return ring

    def pick(self, session_key: str, members: Sequence[tuple[str, int]], loads: Mapping[str, int],
             factor: float) -> str | None:
        """The session's endpoint among ``loads``' keys (the usable ones), or None if none.

        ``members`` is every endpoint of the cluster with its weight: keeping unusable ones on
        the ring means a short outage does not reshuffle everyone else's sessions.
        """
        if not loads:
            return None
        hashes, owners = self._ring(tuple(sorted(members)))
        if not hashes:
            return None
        total = sum(loads.values()) + 1
        capacity = math.ceil(factor * total / len(loads))
        start = bisect.bisect_left(hashes, stable_hash(session_key))
        n = len(hashes)
        seen: set[str] = set()
        for step in range(n):
            endpoint_id = owners[(start + step) % n]
            if endpoint_id in seen:
                continue
            seen.add(endpoint_id)
            load = loads.get(endpoint_id)
            if load is not None and load + 1 <= capacity:
                return endpoint_id
            if len(seen) == len(members):
                break
        # Every usable endpoint is at capacity (cannot happen with factor >= 1): least loaded.
        return min(loads, key=lambda e: (loads[e], e))
