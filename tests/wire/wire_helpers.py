"""Feeding the wire parsers the way a socket would: whole, byte by byte, in halves."""

from __future__ import annotations

from collections.abc import Iterator

from pixiu_kv._http11_wire import ReplyParser, RequestParser


def splits(raw: bytes) -> list[list[bytes]]:
    return [[raw], [raw[i:i + 1] for i in range(len(raw))], [raw[: len(raw) // 2], raw[len(raw) // 2:]]]


def read_whole_body(parser: ReplyParser | RequestParser, feed: Iterator[bytes]) -> bytes:
    """The message's whole body, feeding the parser the next piece whenever it needs more."""
    body = b""
    while True:
        data, done = parser.read_body()
        body += data
        if done:
            return body
        if not data:
            parser.feed(next(feed))
