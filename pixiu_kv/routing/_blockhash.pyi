"""Chained block keys of token ids, in C (optional; see ``_blocks.py``)."""

from collections.abc import Hashable, Iterable, Sequence

def chain(tokens: Iterable[Hashable], start: int, ends: Sequence[int], key: int, /) -> list[int]: ...
