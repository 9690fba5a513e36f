"""Helpers shared by the simulated engine tests."""

from __future__ import annotations

from collections.abc import Sequence


class RecordingSink:
    """A ChunkSink that remembers every report, in order."""

    def __init__(self) -> None:
        self.admitted: list[int] = []
        self.evicted: list[int] = []

    def admit(self, keys: Sequence[int]) -> None:
        self.admitted.extend(keys)

    def evict(self, keys: Sequence[int]) -> None:
        self.evicted.extend(keys)

    def held(self) -> set[int]:
        held: set[int] = set()
        for key in self.admitted:
            held.add(key)
        for key in self.evicted:
            held.discard(key)
        return held


def words(count: int, salt: str = "") -> str:
    """Distinct English-ish text: ``count`` words, each one token or two."""
    return " ".join(f"w{salt}{i}x" for i in range(count))
