"""The controller emulator's chunk index: which registered instance holds which chunk key.

Pure data, no I/O. Mirrors the real controller's lookup rule: walk the chunk keys in
order, take the first-registered instance holding each key, stop at the first chunk
nobody holds.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Iterable, Sequence

import attrs

from pixiu_kv.sim.lmcache_link import CHUNK_SIZE, LOCATION

__all__ = ["ChunkIndex", "InstanceEntry", "LookupHit"]


@attrs.frozen(slots=True)
class LookupHit:
    """One instance's share of a lookup: it held chunks ending at ``matched_end``."""

    instance_id: str
    location: str
    matched_end: int


@attrs.define(slots=True)
class InstanceEntry:
    """A registered instance: its registration rank and the keys its worker reported."""

    instance_id: str
    rank: int
    registration_time: float
    last_heartbeat_time: float
    keys: set[int] = attrs.field(factory=set)


def _positive(_inst: object, attribute: attrs.Attribute[int], value: int) -> None:
    if value <= 0:
        raise ValueError(f"{attribute.name} must be > 0, got {value}")


@attrs.define(slots=True)
class ChunkIndex:
    """Bounded reverse index ``key -> instances``, ordered by registration.

    ``max_keys`` caps the number of (instance, key) entries over all instances: an admit
    beyond it is refused and counted in ``refused_admits`` (the real controller is
    unbounded; an emulator inside a test process must not be).
    """

    max_keys: int = attrs.field(default=1_000_000, validator=_positive)
    chunk_size: int = attrs.field(default=CHUNK_SIZE, validator=_positive)
    refused_admits: int = 0
    _instances: dict[str, InstanceEntry] = attrs.field(factory=dict)
    _holders: dict[int, set[str]] = attrs.field(factory=dict)
    _entries: int = 0
    _ranks: itertools.count[int] = attrs.field(factory=itertools.count)

    # -- registration -------------------------------------------------------------------

    def register(self, instance_id: str) -> InstanceEntry:
        """Register ``instance_id``. A repeated registration keeps the original rank and,
        like the real controller, forgets every key the instance had reported."""
        entry = self._instances.get(instance_id)
        if entry is not None:
            self._drop_keys(entry)
            return entry
        now = time.time()
        entry = InstanceEntry(instance_id, next(self._ranks), now, now)
        self._instances[instance_id] = entry
        return entry

    def deregister(self, instance_id: str) -> bool:
        entry = self._instances.pop(instance_id, None)
        if entry is None:
            return False
        self._drop_keys(entry)
        return True

    def is_registered(self, instance_id: str) -> bool:
        return instance_id in self._instances

    def instances(self) -> list[InstanceEntry]:
        """Registered instances in registration order."""
        return sorted(self._instances.values(), key=lambda e: e.rank)

    def get(self, instance_id: str) -> InstanceEntry | None:
        return self._instances.get(instance_id)

    # -- key reports --------------------------------------------------------------------

    def admit(self, instance_id: str, keys: Iterable[int]) -> None:
        """Record keys an instance now holds. Reports from unregistered instances are
        ignored, as the real controller ignores batches from unknown workers."""
        entry = self._instances.get(instance_id)
        if entry is None:
            return
        for key in keys:
            if key in entry.keys:
                continue
            if self._entries >= self.max_keys:
                self.refused_admits += 1
                continue
            entry.keys.add(key)
            self._holders.setdefault(key, set()).add(instance_id)
            self._entries += 1

    def evict(self, instance_id: str, keys: Iterable[int]) -> None:
        entry = self._instances.get(instance_id)
        if entry is None:
            return
        for key in keys:
            if key in entry.keys:
                entry.keys.discard(key)
                self._forget_holder(key, instance_id)

    def _drop_keys(self, entry: InstanceEntry) -> None:
        for key in entry.keys:
            self._forget_holder(key, entry.instance_id)
        entry.keys.clear()

    def _forget_holder(self, key: int, instance_id: str) -> None:
        holders = self._holders.get(key)
        if holders is None:
            return
        holders.discard(instance_id)
        self._entries -= 1
        if not holders:
            del self._holders[key]

    # -- queries ------------------------------------------------------------------------

    def lookup(self, keys: Sequence[int]) -> dict[str, LookupHit]:
        """Apply the real controller's rule to the chunk keys of a prompt.

        Insertion order of the result is the order in which instances first matched.
        """
        layout: dict[str, LookupHit] = {}
        for position, key in enumerate(keys):
            holders = self._holders.get(key)
            if not holders:
                break
            first = min(holders, key=lambda i: self._instances[i].rank)
            layout[first] = LookupHit(first, LOCATION, (position + 1) * self.chunk_size)
        return layout

    def held_prefix_tokens(self, instance_id: str, keys: Sequence[int]) -> int:
        """Tokens of the longest prefix of ``keys`` that ``instance_id`` holds."""
        entry = self._instances.get(instance_id)
        if entry is None:
            return 0
        count = 0
        for key in keys:
            if key not in entry.keys:
                break
            count += 1
        return count * self.chunk_size

    @property
    def total_keys(self) -> int:
        return self._entries
