"""The client's HTTP/1.1 reply parser and request writer, checked against h11 on the same bytes.

Every reply is fed whole, byte by byte, and in two halves; the parser must read what h11
reads (status, headers, body, whether the connection can carry another request) and refuse
what h11 refuses.
"""

from __future__ import annotations

from typing import Any

import h11
import pytest
from wire_helpers import read_whole_body, splits

from pixiu_kv._http11_wire import ReplyParser, request_bytes
from pixiu_kv.upstream.resilience import MalformedReply, UpstreamUnavailable

Outcome = tuple[Any, ...]

REPLIES = {
    "length": b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}",
    "length-zero": b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n",
    "no-reason": b"HTTP/1.1 200 \r\ncontent-length: 1\r\n\r\nx",
    "no-reason-no-space": b"HTTP/1.1 404\r\ncontent-length: 1\r\n\r\nx",
    "same-length-twice": b"HTTP/1.1 200 OK\r\ncontent-length: 1\r\ncontent-length: 1\r\n\r\nx",
    "length-list": b"HTTP/1.1 200 OK\r\ncontent-length: 1, 1\r\n\r\nx",
    "header-spaces": b"HTTP/1.1 200 OK\r\nX-A:   padded  \r\nX-Empty:\r\ncontent-length: 1\r\n\r\nx",
    "chunked": (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                b"4;ext=1\r\n{\"a\"\r\n6\r\n: [1, \r\n3\r\n2]}\r\n0\r\nX-Trailer: t\r\n\r\n"),
    "chunked-upper-hex": b"HTTP/1.1 200 OK\r\ntransfer-encoding: Chunked\r\n\r\nA\r\n0123456789\r\n0\r\n\r\n",
    "chunked-and-length": (b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\ntransfer-encoding: chunked\r\n\r\n"
                           b"2\r\nab\r\n0\r\n\r\n"),
    "close-delimited": b"HTTP/1.1 200 OK\r\n\r\nuntil the end",
    "http10": b"HTTP/1.0 200 OK\r\ncontent-length: 2\r\n\r\nok",
    "connection-close": b"HTTP/1.1 200 OK\r\nconnection: keep-alive, Close\r\ncontent-length: 2\r\n\r\nok",
    "informational-first": b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok",
    "204": b"HTTP/1.1 204 No Content\r\n\r\n",
    "304-with-length": b"HTTP/1.1 304 Not Modified\r\ncontent-length: 5\r\n\r\n",
    "bytes-after-reply": b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nokHTTP/1.1 408 Timeout\r\n\r\n",
    # refused by both
    "not-http": b"SMTP ready\r\n\r\n",
    "http2": b"HTTP/2.0 200 OK\r\ncontent-length: 0\r\n\r\n",
    "bad-status": b"HTTP/1.1 2000 OK\r\ncontent-length: 0\r\n\r\n",
    "bad-length": b"HTTP/1.1 200 OK\r\ncontent-length: nope\r\n\r\n",
    "negative-length": b"HTTP/1.1 200 OK\r\ncontent-length: -1\r\n\r\n",
    "conflicting-lengths": b"HTTP/1.1 200 OK\r\ncontent-length: 1\r\ncontent-length: 2\r\n\r\nxy",
    "gzip-coding": b"HTTP/1.1 200 OK\r\ntransfer-encoding: gzip\r\n\r\nxx",
    "bad-chunk-size": b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\nzz\r\n",
    "chunk-without-crlf": b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n2\r\nabX\r\n0\r\n\r\n",
    "space-before-colon": b"HTTP/1.1 200 OK\r\nX-A : b\r\ncontent-length: 0\r\n\r\n",
    "no-colon": b"HTTP/1.1 200 OK\r\nnot a header\r\ncontent-length: 0\r\n\r\n",
    "control-in-value": b"HTTP/1.1 200 OK\r\nX-A: a\x01b\r\ncontent-length: 0\r\n\r\n",
    "switching": b"HTTP/1.1 101 Switching Protocols\r\nupgrade: h2c\r\n\r\n",
    "truncated-length": b"HTTP/1.1 200 OK\r\ncontent-length: 50\r\n\r\n{\"a\"",
    "truncated-chunked": b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nab",
    "truncated-head": b"HTTP/1.1 200 OK\r\ncontent-len",
    "empty": b"",
}


def via_h11(raw: bytes, method: bytes) -> Outcome:
    conn = h11.Connection(h11.CLIENT)
    conn.send(h11.Request(method=method, target=b"/", headers=[(b"host", b"h"), (b"content-length", b"0")]))
    conn.send(h11.EndOfMessage())
    conn.receive_data(raw)
    status, headers, body, eof = 0, [], b"", False
    try:
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                if eof:
                    return ("error",)
                conn.receive_data(b"")
                eof = True
            elif isinstance(event, h11.Response):
                status, headers = event.status_code, [(bytes(k), bytes(v)) for k, v in event.headers]
            elif isinstance(event, h11.Data):
                body += event.data
            elif isinstance(event, h11.EndOfMessage):
                break
            elif isinstance(event, h11.ConnectionClosed):
                return ("error",)
    except h11.RemoteProtocolError:
        return ("error",)
    reusable = (not eof and conn.our_state is h11.DONE and conn.their_state is h11.DONE
                and not conn.trailing_data[0])
    return (status, headers, body, reusable)


def via_parser(pieces: list[bytes], method: bytes) -> Outcome:
    parser = ReplyParser()
    parser.expect_reply(no_body=method == b"HEAD")
    feed = iter([*pieces, b""])
    try:
        while (head := parser.read_head()) is None:
            parser.feed(next(feed))
        body = read_whole_body(parser, feed)
    except (MalformedReply, UpstreamUnavailable):
        return ("error",)
    for rest in feed:  # what the server sent after the reply (not its close: h11 saw none)
        if rest:
            parser.feed(rest)
    return (head.status, head.headers, body, parser.reusable)


# Stricter than h11, on purpose: no other HTTP version, no control characters in values.
STRICTER = {"http2", "control-in-value"}


def canonical(outcome: Outcome) -> Outcome:
    """h11 merges repeated Content-Length values and lowercases Transfer-Encoding; the
    framing they gave shows in the body anyway."""
    if outcome == ("error",):
        return outcome
    status, headers, body, reusable = outcome
    kept = [(k, v) for k, v in headers if k not in (b"content-length", b"transfer-encoding")]
    return (status, kept, body, reusable)


@pytest.mark.parametrize("name", REPLIES)
@pytest.mark.parametrize("method", [b"POST", b"HEAD"])
def test_reads_what_h11_reads(name: str, method: bytes) -> None:
    raw = REPLIES[name]
    expected = ("error",) if name in STRICTER else canonical(via_h11(raw, method))
    for pieces in splits(raw):
        assert canonical(via_parser(pieces, method)) == expected, (name, len(pieces))


def test_stricter_cases_are_accepted_by_h11() -> None:
    for name in STRICTER:
        assert via_h11(REPLIES[name], b"POST") != ("error",)


def test_the_corpus_has_both_kinds() -> None:
    outcomes = [via_h11(raw, b"POST") for raw in REPLIES.values()]
    assert sum(o == ("error",) for o in outcomes) >= 15
    assert sum(o != ("error",) and o[3] for o in outcomes) >= 8  # reusable replies


def test_errors_say_which_kind() -> None:
    for raw, error in ((REPLIES["not-http"], MalformedReply),
                       (REPLIES["truncated-length"], UpstreamUnavailable),
                       (REPLIES["truncated-head"], UpstreamUnavailable)):
        parser = ReplyParser()
        parser.expect_reply(no_body=False)
        parser.feed(raw)
        parser.feed(b"")
        with pytest.raises(error):
            parser.read_head()
            while not parser.read_body()[1]:
                pass


def test_a_huge_head_is_refused_before_it_ends() -> None:
    parser = ReplyParser()
    parser.expect_reply(no_body=False)
    parser.feed(b"HTTP/1.1 200 OK\r\n" + b"x-a: b\r\n" * 10_000)
    with pytest.raises(MalformedReply):
        parser.read_head()


def test_body_bytes_before_a_framing_error_are_delivered_first() -> None:
    parser = ReplyParser()
    parser.expect_reply(no_body=False)
    parser.feed(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n2\r\nab\r\nzz\r\n")
    assert parser.read_head() is not None
    assert parser.read_body() == (b"ab", False)
    with pytest.raises(MalformedReply):
        parser.read_body()


def test_request_bytes_match_h11() -> None:
    headers = [(b"host", b"127.0.0.1:8000"), (b"content-type", b"application/json"),
               (b"content-length", b"2")]
    conn = h11.Connection(h11.CLIENT)
    expected = (conn.send(h11.Request(method=b"POST", target=b"/v1/x?a=b", headers=headers))
                + conn.send(h11.Data(data=b"{}")) + conn.send(h11.EndOfMessage()))
    assert request_bytes(b"POST", b"/v1/x?a=b", headers, b"{}") == expected


@pytest.mark.parametrize(("method", "target", "header"), [
    (b"POST", b"/a b", (b"x", b"1")),
    (b"POST", b"/a\r\nx: y", (b"x", b"1")),
    (b"POST", b"", (b"x", b"1")),
    (b"PO ST", b"/", (b"x", b"1")),
    (b"POST", b"/", (b"x y", b"1")),
    (b"POST", b"/", (b"x", b"1\r\ninjected: yes")),
    (b"POST", b"/", (b"x", b"\x00")),
])
def test_request_bytes_refuse_what_would_change_the_request(method: bytes, target: bytes,
                                                            header: tuple[bytes, bytes]) -> None:
    with pytest.raises(ValueError):
        request_bytes(method, target, [header], b"")
