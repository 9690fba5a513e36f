"""Prompt tokens and the bounded local cache of them.

Tokens are kept as their compact JSON array (``b"[1,2,3]"``): that is exactly what every
LMCache call sends, so a cached prompt costs no re-encoding on the routing path, and it
takes a fraction of the memory of a list of Python ints.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from collections.abc import Sequence

import attrs

__all__ = ["DEFAULT_MAX_TOKEN_BYTES", "TokenCache", "TokenSeq"]

DEFAULT_MAX_TOKEN_BYTES = 256 * 1024 * 1024
"""Total size bound of cached token arrays, on top of the entry bound (long prompts are big)."""


@attrs.frozen(slots=True)
class TokenSeq:
    """A prompt's token ids: their count and their compact JSON array."""

    count: int
    json: bytes = attrs.field(repr=False)

    @classmethod
    def from_ids(cls, ids: Sequence[int]) -> TokenSeq:
        return cls(count=len(ids), json=json.dumps(list(ids), separators=(",", ":")).encode())

    def ids(self) -> list[int]:
        decoded: list[int] = json.loads(self.json)
        return decoded


@attrs.define(slots=True)
class _Entry:
    tokens: TokenSeq
    expires_at: float


class TokenCache:
    """LRU cache of prompt tokens with a TTL, bounded in entries and bytes; O(1) per call.

    Recency order lives in one ordered dict, expiry order in another. The TTL is the same
    for every entry, so insertion order *is* expiry order: expired entries are swept from
    the front of the expiry order on every call, amortised O(1), and never linger.
    """

    __slots__ = ("_by_expiry", "_bytes", "_entries", "_max_bytes", "_max_size", "_ttl", "hits", "misses")

    def __init__(self, max_size: int, ttl: float, max_bytes: int = DEFAULT_MAX_TOKEN_BYTES) -> None:
        if max_size <= 0 or max_bytes <= 0 or ttl < 0:
            raise ValueError("max_size and max_bytes must be > 0, ttl >= 0")
        self._max_size = max_size
        self._max_bytes = max_bytes
        self._ttl = ttl  # 0 = entries never expire
        self._entries: OrderedDict[str, _Entry] = OrderedDict()
        self._by_expiry: OrderedDict[str, None] = OrderedDict()
        self._bytes = 0
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def bytes(self) -> int:
        return self._bytes

    def get(self, key: str, now: float) -> TokenSeq | None:
        self._sweep(now)
        entry = self._entries.get(key)
        if entry is None:
            self.misses += 1
            return None
        self._entries.move_to_end(key)
        self.hits += 1
        return entry.tokens

    def peek(self, key: str, now: float) -> TokenSeq | None:
        """Like :meth:`get` without touching recency or the hit counters."""
        self._sweep(now)
        entry = self._entries.get(key)
        return None if entry is None else entry.tokens

    def put(self, key: str, tokens: TokenSeq, now: float) -> None:
        size = len(tokens.json)
        if size > self._max_bytes:
            return  # larger than the whole budget: not worth evicting everything else for
        self._remove(key)
        self._sweep(now)
        expires_at = now + self._ttl if self._ttl > 0 else float("inf")
        self._entries[key] = _Entry(tokens, expires_at)
        self._by_expiry[key] = None
        self._bytes += size
        while len(self._entries) > self._max_size or self._bytes > self._max_bytes:
            oldest = next(iter(self._entries))
            self._remove(oldest)

    def _remove(self, key: str) -> None:
        entry = self._entries.pop(key, None)
        if entry is not None:
            del self._by_expiry[key]
            self._bytes -= len(entry.tokens.json)

    def _sweep(self, now: float) -> None:
        if self._ttl <= 0:
            return
        entries = self._entries
        by_expiry = self._by_expiry
        while by_expiry:
            key = next(iter(by_expiry))
            if entries[key].expires_at > now:
                return
            self._remove(key)
