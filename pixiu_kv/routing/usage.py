"""What the engine reported about a request's prompt: ``usage`` read from the response bytes.

The router learns from ``usage.prompt_tokens`` and ``usage.prompt_tokens_details.
cached_tokens`` (vLLM reports the latter with ``--enable-prompt-tokens-details``; a stream
carries ``usage`` only when the client asked for ``stream_options.include_usage``). The
proxy feeds every body chunk it forwards; the scanner keeps only a bounded tail, since
``usage`` comes last (the final event of a stream, the end of a JSON body), and parses once
at the end. Pure: no I/O, O(1) memory.
"""

from __future__ import annotations

import json

import attrs

__all__ = ["Usage", "UsageScanner"]

_TAIL = 16 * 1024
# Streams put ``"usage": null`` in every chunk before the final one: look back a few.
_MAX_TRIES = 8


@attrs.frozen(slots=True)
class Usage:
    prompt_tokens: int | None
    cached_tokens: int | None
    completion_tokens: int | None = None


class UsageScanner:
    __slots__ = ("_tail",)

    def __init__(self) -> None:
        self._tail = bytearray()

    def feed(self, chunk: bytes) -> None:
        self._tail += chunk
        if len(self._tail) > 2 * _TAIL:
            del self._tail[: len(self._tail) - _TAIL]

    def result(self) -> Usage | None:
        """The last ``usage`` object in what was fed, or None when there is none."""
        text = bytes(self._tail[-_TAIL:]).decode("utf-8", "replace")
        decoder = json.JSONDecoder()
        end = len(text)
        for _ in range(_MAX_TRIES):
            at = text.rfind('"usage"', 0, end)
            if at < 0:
                return None
            end = at
            colon = text.find(":", at + 7)
            if colon < 0:
                continue
            start = colon + 1
            while start < len(text) and text[start] in " \t\r\n":
                start += 1
            try:
                usage, _ = decoder.raw_decode(text, start)
            except ValueError:
                continue
            if isinstance(usage, dict):
                return Usage(prompt_tokens=_count(usage.get("prompt_tokens")),
                             cached_tokens=_cached(usage.get("prompt_tokens_details")),
                             completion_tokens=_count(usage.get("completion_tokens")))
        return None


def _count(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else None


def _cached(details: object) -> int | None:
    return _count(details.get("cached_tokens")) if isinstance(details, dict) else None
