"""Prompt prefixes as chained block keys: the unit in which engines cache, and we index.

An engine caches a prompt in whole blocks (vLLM's GPU cache: 16 tokens; LMCache: 256-token
chunks), so two prompts share cache exactly as far as they share leading blocks. Each block
gets a key that hashes the block *and* the key before it, so a key names a whole prefix.

Block boundaries depend only on the position, never on the prompt's length, so every
prompt cuts a shared prefix at the same places. Blocks are ``block_size`` tokens up to
``16 x block_size`` tokens into the prompt and then double each time the position doubles
(up to ``max_block_size``): a match is exact to 1/8 of its length or one base block, and
a 4k-token prompt takes 48 blocks instead of 256 (the index's work per decision is per
block: recording a prompt, matching it, releasing it).
Every boundary is a multiple of ``block_size``, like the engine's own.

The keys are computed by the optional C extension ``_blockhash`` when it was built and
agrees with the pure-Python loop on a fixed sample at import (:data:`NATIVE_KEYS`), else by
that loop; both give the same keys. ``PIXIU_KV_PURE_PYTHON=1`` in the environment forces
the pure-Python loop.
"""

from __future__ import annotations

import bisect
import os
import sys
from array import array
from collections.abc import Callable, Hashable, Sequence

import attrs

__all__ = ["LMCACHE_CHUNK", "NATIVE_KEYS", "BlockSchedule", "PrefixKeys"]

LMCACHE_CHUNK = 256
"""LMCache stores, pins and compresses whole chunks of this many tokens."""

# A block is doubled once the position reaches this many blocks of its current size.
_FINE_BLOCKS = 16

PURE_PYTHON_ENV = "PIXIU_KV_PURE_PYTHON"
"""Set to ``1`` to key blocks in pure Python even when the C extension is built."""

_Chain = Callable[[Sequence[Hashable], int, Sequence[int], int], list[int]]


def chain_reference(tokens: Sequence[Hashable], start: int, ends: Sequence[int], key: int) -> list[int]:
    """The keys of the blocks ``tokens[start:ends[0]]``, ``tokens[ends[0]:ends[1]]``, ...
    chained from ``key``: the definition, which the C extension's ``chain`` computes."""
    keys: list[int] = []
    prev = start
    for end in ends:
        key = hash((key, tuple(tokens[prev:end])))
        keys.append(key)
        prev = end
    return keys


def _load_native() -> _Chain | None:
    """The C extension's ``chain`` if it is built, allowed and agrees with
    :func:`chain_reference` on a fixed sample (as a list and as ``array('I')``)."""
    if os.environ.get(PURE_PYTHON_ENV, "") not in ("", "0"):
        return None
    # A free-threaded interpreter would turn the GIL back on for a module that does not
    # declare itself safe without it (this one reads lists without locking them).
    if not getattr(sys, "_is_gil_enabled", lambda: True)():
        return None
    try:
        from ._blockhash import chain
    except ImportError:
        return None
    # Small ids and ids past 2**30 (more than one digit of a CPython int), an empty block,
    # chained from a nonzero key.
    sample = [(i * 2_654_435_761) % 2**32 for i in range(70)] + [0, 1, 2**30 - 1, 2**30, 2**32 - 1]
    ends = (16, 16, 40, 73, 75)
    key = 0x5EED_0F_B10C_4E75
    expected = chain_reference(sample, 3, ends, key)
    try:
        agrees = (chain(sample, 3, ends, key) == expected
                  and chain(tuple(sample), 3, ends, key) == expected
                  and chain(array("I", sample), 3, ends, key) == expected)
    except Exception:
        return None
    return chain if agrees else None


_native_chain: _Chain | None = _load_native()

NATIVE_KEYS: bool = _native_chain is not None
"""Whether block keys are computed by the C extension (same keys, fewer CPU cycles)."""


def _packed(tokens: Sequence[int]) -> bool:
    return isinstance(tokens, array) and tokens.typecode == "I"


@attrs.frozen(slots=True, eq=False)
class PrefixKeys:
    """The block keys of one prompt: ``keys[i]`` names the prefix ``tokens[:ends[i]]``.

    Computing it is the costly part of a decision (O(prompt tokens)); a caller that sees the
    same prompt again (a token cache) can keep it and pass it instead of the tokens, and a
    caller that sees a prompt continue a known one can extend it
    (:meth:`BlockSchedule.extend`). ``tokens`` is the ids as given to
    :meth:`BlockSchedule.keys` (a list only when the C extension keyed them), a tuple, or
    a packed ``array('I')`` after :meth:`compact`.
    """

    tokens: Sequence[int] = attrs.field(repr=False)
    keys: tuple[int, ...] = attrs.field(repr=False)
    ends: tuple[int, ...] = attrs.field(repr=False)

    def compact(self) -> PrefixKeys:
        """The same keys with the ids packed 4 bytes each (a tuple of ids takes ~36 bytes per
        token): what a token cache should keep."""
        if isinstance(self.tokens, array):
            return self
        return PrefixKeys(tokens=array("I", self.tokens), keys=self.keys, ends=self.ends)

    @property
    def length(self) -> int:
        """Tokens in the prompt (the trailing partial block included)."""
        return len(self.tokens)

    def block_at(self, tokens: int) -> int:
        """Index of the deepest block lying entirely within the first ``tokens`` tokens (-1: none)."""
        return bisect.bisect_right(self.ends, tokens) - 1


class BlockSchedule:
    """Block boundaries as a function of position (see the module docstring)."""

    __slots__ = ("_ends", "_slices", "block_size", "max_block_size")

    def __init__(self, block_size: int = 16, max_block_size: int = 256) -> None:
        if block_size < 1 or max_block_size < block_size:
            raise ValueError("need 1 <= block_size <= max_block_size")
        self.block_size = block_size
        self.max_block_size = max_block_size
        self._ends: list[int] = []
        self._slices: list[slice] = []
        self._extend(64 * 1024)

    def _extend(self, upto: int) -> None:
        position = self._ends[-1] if self._ends else 0
        while position < upto:
            size = self.block_size
            while size * _FINE_BLOCKS <= position and size < self.max_block_size:
                size *= 2
            self._slices.append(slice(position, position + size))
            position += size
            self._ends.append(position)

    def ends(self, length: int) -> list[int]:
        """Boundaries of the full blocks of a prompt of ``length`` tokens."""
        if length > self._ends[-1]:
            self._extend(length)
        return self._ends[: bisect.bisect_right(self._ends, length)]

    def keys(self, tokens: Sequence[int]) -> PrefixKeys:
        """Chained block keys of ``tokens``: ``key_i = hash((key_{i-1}, block_i))``.

        The hash of a tuple of ints is CPython's builtin one, which is independent of
        PYTHONHASHSEED: every gateway process computes the same keys. A tuple or an
        ``array('I')`` of ids is kept as given, and so is a list when the C extension keys
        it (it hashes the list in place; copying 4096 ids a JSON decoder just made cost more
        than hashing them): do not change the sequence afterwards. Otherwise the ids are
        copied to a tuple; in pure Python its slices are the blocks (measured: slicing the
        caller's list into lists and those into tuples costs more).
        """
        seq = (tokens if isinstance(tokens, tuple) or _packed(tokens)
               or (_native_chain is not None and type(tokens) is list) else tuple(tokens))
        ends = tuple(self.ends(len(seq)))
        if _native_chain is not None:
            keys = _native_chain(seq, 0, ends, 0)
        else:
            keys = self._chain(seq if isinstance(seq, tuple) else tuple(seq), self._slices[: len(ends)], 0)
        return PrefixKeys(tokens=seq, keys=tuple(keys), ends=ends)

    def extend(self, known: PrefixKeys, more: Sequence[int]) -> PrefixKeys:
        """The keys of ``known``'s prompt followed by ``more`` tokens (a conversation's next
        turn): ``known``'s whole blocks are kept and only the rest is hashed, so the cost is
        O(len(more) + one block), not O(prompt). The ids are concatenated (a copy of
        references or packed ints, far cheaper than hashing them)."""
        old = known.tokens
        total = len(old) + len(more)
        ends = tuple(self.ends(total))
        kept = len(known.keys)
        start = known.ends[-1] if kept else 0
        key = known.keys[-1] if kept else 0
        tokens: Sequence[int]
        if isinstance(old, array):
            tokens = old + array(old.typecode, more)
        else:
            tokens = (old if isinstance(old, tuple) else tuple(old)) + tuple(more)
        new: list[int]
        if _native_chain is not None and (isinstance(tokens, tuple) or _packed(tokens)):
            new = _native_chain(tokens, start, ends[kept:], key)
        else:
            tail = tokens[start:]
            slices = [slice(block.start - start, block.stop - start)
                      for block in self._slices[kept: len(ends)]]
            new = self._chain(tail if isinstance(tail, tuple) else tuple(tail), slices, key)
        return PrefixKeys(tokens=tokens, keys=known.keys + tuple(new), ends=ends)

    @staticmethod
    def _chain(tokens: tuple[int, ...], blocks: Sequence[slice], h: int) -> list[int]:
        keys: list[int] = []
        append = keys.append
        for block in blocks:
            h = hash((h, tokens[block]))
            append(h)
        return keys
