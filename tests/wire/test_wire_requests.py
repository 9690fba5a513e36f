"""The lean server's request parser, checked against h11's server side on the same bytes.

Every corpus entry is fed whole, byte by byte, and in two halves; the parser must read the
requests h11 reads (method, target, version, headers, body) and refuse what h11 refuses.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import h11
import pytest
from wire_helpers import read_whole_body, splits

from pixiu_kv._http11_wire import BadRequest, ClientGone, RequestParser

Outcome = tuple[Any, ...]

REQUESTS = {
    "get": b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n",
    "post-length": b"POST /v1/completions?a=b HTTP/1.1\r\nhost: x\r\nContent-Length: 2\r\n\r\n{}",
    "length-zero": b"POST / HTTP/1.1\r\nhost: x\r\ncontent-length: 0\r\n\r\n",
    "same-length-twice": b"POST / HTTP/1.1\r\nhost: x\r\ncontent-length: 1\r\ncontent-length: 1\r\n\r\nx",
    "header-spaces": b"GET / HTTP/1.1\r\nhost: x\r\nX-A:   padded  \r\nX-Empty:\r\n\r\n",
    "chunked": (b"POST / HTTP/1.1\r\nhost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
                b"4;ext=1\r\n{\"a\"\r\n6\r\n: [1, \r\n3\r\n2]}\r\n0\r\nX-Trailer: t\r\n\r\n"),
    "pipelined": (b"GET /a HTTP/1.1\r\nhost: x\r\n\r\n"
                  b"POST /b HTTP/1.1\r\nhost: x\r\ncontent-length: 3\r\n\r\nabc"
                  b"GET /c HTTP/1.1\r\nhost: x\r\n\r\n"),
    "leading-empty-line": b"\r\nGET / HTTP/1.1\r\nhost: x\r\n\r\n",
    "http10-no-host": b"GET / HTTP/1.0\r\n\r\n",
    "http10-close": b"POST / HTTP/1.0\r\ncontent-length: 2\r\n\r\nok",
    "connection-close": b"GET / HTTP/1.1\r\nhost: x\r\nconnection: keep-alive, Close\r\n\r\n",
    "expect-continue": b"POST / HTTP/1.1\r\nhost: x\r\nexpect: 100-continue\r\ncontent-length: 2\r\n\r\nok",
    "odd-method": b"PURGE /x HTTP/1.1\r\nhost: x\r\n\r\n",
    # refused by both
    "no-host": b"GET / HTTP/1.1\r\n\r\n",
    "two-hosts": b"GET / HTTP/1.1\r\nhost: a\r\nhost: b\r\n\r\n",
    "http2": b"GET / HTTP/2.0\r\nhost: x\r\n\r\n",
    "not-http": b"HELLO\r\n\r\n",
    "space-in-target": b"GET /a b HTTP/1.1\r\nhost: x\r\n\r\n",
    "bad-length": b"POST / HTTP/1.1\r\nhost: x\r\ncontent-length: nope\r\n\r\n",
    "negative-length": b"POST / HTTP/1.1\r\nhost: x\r\ncontent-length: -1\r\n\r\n",
    "conflicting-lengths": b"POST / HTTP/1.1\r\nhost: x\r\ncontent-length: 1\r\ncontent-length: 2\r\n\r\nxy",
    "gzip-coding": b"POST / HTTP/1.1\r\nhost: x\r\ntransfer-encoding: gzip\r\n\r\nxx",
    "bad-chunk-size": b"POST / HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\nzz\r\n",
    "chunk-without-crlf": (b"POST / HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\n"
                           b"2\r\nabX\r\n0\r\n\r\n"),
    "space-before-colon": b"GET / HTTP/1.1\r\nhost : x\r\n\r\n",
    "no-colon": b"GET / HTTP/1.1\r\nhost: x\r\nnot a header\r\n\r\n",
    "obs-fold": b"GET / HTTP/1.1\r\nhost: x\r\nx-a: b\r\n  c\r\n\r\n",
    "truncated-body": b"POST / HTTP/1.1\r\nhost: x\r\ncontent-length: 50\r\n\r\n{\"a\"",
    "truncated-chunked": b"POST / HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\n5\r\nab",
    "truncated-head": b"GET / HTTP/1.1\r\nhost: x\r\nx-a",
}

# Stricter than h11, on purpose: no other HTTP version, no folded header lines (RFC 9112
# lets a server refuse them), never both framings (a request smuggling vector).
STRICTER = {"http2", "obs-fold", "both-framings"}
REQUESTS["both-framings"] = (b"POST / HTTP/1.1\r\nhost: x\r\ncontent-length: 3\r\ntransfer-encoding: chunked"
                             b"\r\n\r\n2\r\nab\r\n0\r\n\r\n")


def via_h11(raw: bytes) -> list[Outcome]:
    """Every request h11 reads, then ("error",) if it refused something or the bytes ended
    inside a request."""
    conn = h11.Connection(h11.SERVER)
    conn.receive_data(raw)
    conn.receive_data(b"")
    out: list[Outcome] = []
    current: list[Any] = []
    try:
        while True:
            event = conn.next_event()
            if type(event) is h11.Request:
                current = [event.method, event.target, event.http_version == b"1.1",
                           [(bytes(k), bytes(v)) for k, v in event.headers], b""]
            elif type(event) is h11.Data:
                current[4] += bytes(event.data)
            elif type(event) is h11.EndOfMessage:
                out.append(tuple(current))
                conn.send(h11.Response(status_code=200, headers=[(b"content-length", b"0")]))
                conn.send(h11.EndOfMessage())
                if conn.our_state is not h11.DONE or conn.their_state is not h11.DONE:
                    return out
                conn.start_next_cycle()
            elif type(event) is h11.ConnectionClosed:
                return out
            else:  # NEED_DATA after EOF, or PAUSED
                return [*out, ("error",)] if event is h11.NEED_DATA else out
    except h11.RemoteProtocolError:
        return [*out, ("error",)]


def via_parser(pieces: list[bytes]) -> list[Outcome]:
    parser = RequestParser()
    feed: Iterator[bytes] = iter([*pieces, b""])
    out: list[Outcome] = []
    try:
        while True:
            head = parser.read_head()
            while head is None:
                if parser.at_eof:
                    return out
                parser.feed(next(feed))
                head = parser.read_head()
            body = read_whole_body(parser, feed)
            out.append((head.method, head.target, head.http11, head.headers, body))
            if not head.keep_alive:
                return out
    except (BadRequest, ClientGone):
        return [*out, ("error",)]


def canonical(outcomes: list[Outcome]) -> list[Outcome]:
    """h11 merges repeated Content-Length values; the framing they gave shows in the body."""
    return [o if o == ("error",) else (*o[:3], [(k, v) for k, v in o[3] if k != b"content-length"], o[4])
            for o in outcomes]


@pytest.mark.parametrize("name", REQUESTS)
def test_reads_what_h11_reads(name: str) -> None:
    raw = REQUESTS[name]
    expected = [("error",)] if name in STRICTER else canonical(via_h11(raw))
    for pieces in splits(raw):
        assert canonical(via_parser(pieces)) == expected, (name, len(pieces))


def test_stricter_cases_are_accepted_by_h11() -> None:
    for name in STRICTER:
        assert ("error",) not in via_h11(REQUESTS[name])


def test_the_corpus_has_both_kinds() -> None:
    outcomes = [via_h11(raw) for raw in REQUESTS.values()]
    assert sum(("error",) in o for o in outcomes) >= 15
    assert sum(("error",) not in o for o in outcomes) >= 12


def test_head_flags_say_how_the_exchange_goes_on() -> None:
    parser = RequestParser()
    parser.feed(REQUESTS["expect-continue"] + REQUESTS["http10-close"] + REQUESTS["connection-close"])
    first = parser.read_head()
    assert first is not None and first.expects_continue and first.keep_alive and first.content_length == 2
    assert parser.read_body() == (b"ok", True)
    second = parser.read_head()
    assert second is not None and not second.http11 and not second.keep_alive
    assert parser.read_body() == (b"ok", True)
    third = parser.read_head()
    assert third is not None and not third.keep_alive and third.content_length == 0


@pytest.mark.parametrize(("raw", "status"), [
    (b"GET / HTTP/1.1\r\nhost: x\r\nx-big: " + b"a" * 2000 + b"\r\n\r\n", 431),
    (b"GET / HTTP/1.1\r\nhost: x\r\nx-big: " + b"a" * 2000, 431),  # refused before it ends
    (REQUESTS["gzip-coding"], 501),
    (REQUESTS["no-host"], 400),
])
def test_refusals_carry_the_status_to_answer(raw: bytes, status: int) -> None:
    parser = RequestParser(max_head_bytes=1024)
    parser.feed(raw)
    with pytest.raises(BadRequest) as caught:
        parser.read_head()
    assert caught.value.status == status
