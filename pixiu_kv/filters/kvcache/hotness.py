"""How often a prompt was seen lately: a sliding-window counter per prompt key.

Each key keeps at most ``max_records`` timestamps in a deque (oldest first); keys live in
an LRU of at most ``max_keys``. Recording prunes only timestamps that left the window, so
each timestamp is appended and dropped once: amortised O(1) per request.
"""

from __future__ import annotations

from collections import OrderedDict, deque

__all__ = ["HotnessTracker"]


class HotnessTracker:
    __slots__ = ("_keys", "_max_keys", "_max_records", "_window")

    def __init__(self, window: float, max_records: int, max_keys: int) -> None:
        if window <= 0 or max_records <= 0 or max_keys <= 0:
            raise ValueError("window, max_records and max_keys must be > 0")
        self._window = window
        self._max_records = max_records
        self._max_keys = max_keys
        self._keys: OrderedDict[str, deque[float]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._keys)

    def record(self, key: str, now: float) -> int:
        """Count one access of ``key`` at ``now``; returns the accesses within the window."""
        stamps = self._keys.get(key)
        if stamps is None:
            stamps = deque(maxlen=self._max_records)
            self._keys[key] = stamps
            if len(self._keys) > self._max_keys:
                self._keys.popitem(last=False)
        else:
            self._keys.move_to_end(key)
        stamps.append(now)
        return self._prune(stamps, now)

    def count(self, key: str, now: float) -> int:
        """Accesses of ``key`` within the window, without recording one."""
        stamps = self._keys.get(key)
        return 0 if stamps is None else self._prune(stamps, now)

    def _prune(self, stamps: deque[float], now: float) -> int:
        horizon = now - self._window
        while stamps and stamps[0] <= horizon:
            stamps.popleft()
        return len(stamps)
