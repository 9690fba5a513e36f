"""The seam between a simulated engine's LMCache CPU tier and an LMCache controller.

A simulated engine reports which 256-token chunks its CPU tier holds through a
:class:`ChunkSink`, and obeys the controller's control messages through
:class:`WorkerControl`. Two controllers plug in here:

* the bundled controller emulator (in-process, ``controller.py``);
* the real ``lmcache_controller`` over ZMQ (``lmcache_worker.py``).

Chunk keys are computed exactly as the real controller computes them, so a lookup
of the same token ids finds the same chunks in both.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

__all__ = ["CHUNK_SIZE", "LOCATION", "ChunkSink", "WorkerControl", "chunk_keys"]

CHUNK_SIZE = 256
"""LMCache's default chunk size, in tokens. Only full chunks are stored."""

LOCATION = "LocalCPUBackend"
"""The location name LMCache workers report for the CPU tier."""


def chunk_keys(tokens: Sequence[int], chunk_size: int = CHUNK_SIZE) -> list[int]:
    """Prefix hash chain of the full chunks of ``tokens``, as the real controller computes it.

    ``h = 0; for chunk in chunks: h = hash((h, tuple(chunk), ()))``. CPython's hash of a
    tuple of ints does not depend on PYTHONHASHSEED, so keys agree across processes.
    A trailing partial chunk has no key.
    """
    keys: list[int] = []
    h = 0
    for start in range(0, len(tokens) - chunk_size + 1, chunk_size):
        h = hash((h, tuple(tokens[start : start + chunk_size]), ()))
        keys.append(h)
    return keys


class ChunkSink(Protocol):
    """Where an engine's CPU tier reports the chunk keys it admits and evicts.

    Calls must not block: implementations buffer (bounded) and flush in their own task.
    """

    def admit(self, keys: Sequence[int]) -> None: ...

    def evict(self, keys: Sequence[int]) -> None: ...


class WorkerControl(Protocol):
    """What a controller may ask of an engine's LMCache tier. Each returns a token count."""

    def health(self) -> int:
        """0 when healthy, an error code otherwise."""
        ...

    def pin(self, tokens: Sequence[int], location: str) -> int: ...

    def unpin(self, tokens: Sequence[int], location: str) -> int: ...

    def compress(self, tokens: Sequence[int], method: str, location: str) -> int: ...

    def decompress(self, tokens: Sequence[int], method: str, location: str) -> int: ...

    def evict(self, tokens: Sequence[int]) -> int:
        """Drop the chunks of ``tokens`` (the emulator's ``/evict``)."""
        ...

    def clear(self, location: str) -> int:
        """Drop everything held at ``location``."""
        ...
