"""HTTP/1.1 on the wire, without I/O: the upstream client's requests and replies, and the
requests of the simulator's lean server.

Why not h11: on the routing lookup h11 costs about 0.3 ms of CPU per call on this stack
(event objects, header validation, a state machine per event), nearly doubling the call;
these parsers cost a few microseconds. They are strict where it matters (and checked
against h11 on the same bytes by the tests): the start line, header syntax, one agreed
Content-Length, ``Transfer-Encoding: chunked`` as the only coding, chunk framing, a bounded
head, and bytes no request asked for.

A reply body is framed by, in order: no body (1xx skipped, 204, 304, a reply to HEAD),
chunked coding, Content-Length, else the connection's end (never kept alive). A request
body by chunked coding, else Content-Length, else there is none.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import attrs

from .upstream.resilience import MalformedReply, UpstreamUnavailable

__all__ = [
    "BadRequest",
    "ClientGone",
    "ReplyHead",
    "ReplyParser",
    "RequestHead",
    "RequestParser",
    "header_block",
    "request_bytes",
    "request_with_headers",
]

MAX_HEAD_BYTES = 64 * 1024
_MAX_CHUNK_LINE = 1024

_TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_TARGET_OR_METHOD_UNSAFE = re.compile(rb"[\x00-\x20\x7f]")
_VALUE_UNSAFE = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")
# Header lines, checked all at once (one C call instead of one per line).
_HEADER_LINES = re.compile(rb"(?:\r\n[!#$%&'*+\-.^_`|~0-9A-Za-z]+:[ \t\x21-\x7e\x80-\xff]*)*")
_REQUEST_LINE = re.compile(rb"([!#$%&'*+\-.^_`|~0-9A-Za-z]+) ([\x21-\x7e\x80-\xff]+) HTTP/1\.([01])")
_STATUS_LINE = re.compile(rb"HTTP/1\.([01]) ([0-9]{3})(?: [\t \x21-\x7e\x80-\xff]*)?")
_CHUNK_SIZE = re.compile(rb"([0-9A-Fa-f]{1,16})[ \t]*(?:;.*)?")

# Body framing modes.
_NONE, _LENGTH, _CHUNK_SIZE_LINE, _CHUNK_DATA, _CHUNK_END, _TRAILERS, _UNTIL_CLOSE, _DONE = range(8)


def request_bytes(method: bytes, target: bytes, headers: Sequence[tuple[bytes, bytes]], body: bytes) -> bytes:
    """The whole request, ready for one write. Raises ValueError for what is not sendable
    (it would be another request, or a broken one, on the wire)."""
    return request_with_headers(method, target, header_block(headers), body)


def header_block(headers: Sequence[tuple[bytes, bytes]]) -> bytes:
    """``name: value`` lines; a block made once can serve many requests."""
    parts: list[bytes] = []
    for name, value in headers:
        if not _TOKEN.fullmatch(name) or _VALUE_UNSAFE.search(value):
            raise ValueError(f"header {name[:40]!r} is not sendable")
        parts += (name, b": ", value, b"\r\n")
    return b"".join(parts)


def request_with_headers(method: bytes, target: bytes, block: bytes, body: bytes) -> bytes:
    """The request with a header block from :func:`header_block` (plus, if need be, lines as
    safe as its own, e.g. a Content-Length)."""
    if not target or _TARGET_OR_METHOD_UNSAFE.search(target) or not _TOKEN.fullmatch(method):
        raise ValueError("request line has a character not allowed there")
    return b"".join((method, b" ", target, b" HTTP/1.1\r\n", block, b"\r\n", body))


@attrs.frozen(slots=True)
class ReplyHead:
    status: int
    headers: list[tuple[bytes, bytes]]  # names lowercased, in the order received


@attrs.frozen(slots=True)
class RequestHead:
    method: bytes
    target: bytes
    http11: bool
    """HTTP/1.1 (else 1.0: the connection closes after the reply)."""
    headers: list[tuple[bytes, bytes]]  # names lowercased, in the order received
    keep_alive: bool
    """Neither side asked to close the connection after this exchange."""
    expects_continue: bool
    """The client waits for ``100 Continue`` before it sends the body."""
    content_length: int | None
    """The declared body length; None for a chunked body."""


class BadRequest(Exception):
    """A request that is not HTTP/1.x as this server takes it; ``status`` is the answer."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


class ClientGone(Exception):
    """The client closed the connection inside a request."""


class _Message:
    """The buffer and the body framing (Content-Length or chunked) shared by both parsers;
    subclasses name the errors raised: ``_malformed`` (the bytes are not HTTP) and ``_cut``
    (the connection ended inside a message)."""

    __slots__ = ("_eof", "_error", "_left", "_mode", "buffer")

    _malformed: type[Exception] = ValueError
    _cut: type[Exception] = EOFError
    _kind = "message"

    def __init__(self) -> None:
        self.buffer = bytearray()
        self._eof = False
        self._mode = _DONE
        self._left = 0
        self._error: Exception | None = None

    def feed(self, data: bytes) -> None:
        """Bytes received; ``b""`` means the peer closed the connection."""
        if data:
            self.buffer += data
        else:
            self._eof = True

    @property
    def at_eof(self) -> bool:
        return self._eof

    @property
    def body_done(self) -> bool:
        return self._mode == _DONE

    def _framing(self, headers: list[tuple[bytes, bytes]]) -> tuple[int | None, bool, bool]:
        """(Content-Length, chunked, ``Connection: close`` seen) from the headers."""
        chunked = close = False
        length: int | None = None
        for name, value in headers:
            if name == b"content-length":
                for item in value.split(b","):
                    item = item.strip()
                    if not item.isdigit() or (length is not None and int(item) != length):
                        raise self._malformed("bad Content-Length")
                    length = int(item)
            elif name == b"transfer-encoding":
                if chunked or value.strip().lower() != b"chunked":
                    raise self._not_chunked()
                chunked = True
            elif name == b"connection" and b"close" in (t.strip().lower() for t in value.split(b",")):
                close = True
        return length, chunked, close

    def _not_chunked(self) -> Exception:
        return self._malformed("only Transfer-Encoding: chunked is supported")

    def _take_head(self, limit: int) -> tuple[bytes, int] | None:
        """The next head (up to its blank line, taken from the buffer) and the end of its
        first line; None while it is incomplete. Refused past ``limit`` bytes, even before
        it ends."""
        buf = self.buffer
        end = buf.find(b"\r\n\r\n", 0, limit + 4)
        if end < 0:
            if len(buf) > limit:
                raise self._too_large()
            return None
        head = bytes(buf[:end])
        del buf[: end + 4]
        first_end = head.find(b"\r\n")
        return head, first_end if first_end >= 0 else len(head)

    def _too_large(self) -> Exception:
        return self._malformed(f"{self._kind} head too large")

    def read_body(self) -> tuple[bytes, bool]:
        """The body bytes available now (``b""``: feed more) and whether the body is complete.

        An error after some body bytes is raised on the next call, so they are delivered.
        """
        if self._error is not None:
            raise self._error
        out: list[bytes] = []
        try:
            done = self._read_body(out)
        except (self._malformed, self._cut) as exc:
            if not out:
                raise
            self._error = exc
            done = False
        return (out[0] if len(out) == 1 else b"".join(out)), done

    def _read_body(self, out: list[bytes]) -> bool:
        buf = self.buffer
        while True:
            mode = self._mode
            if mode == _DONE:
                return True
            if mode == _LENGTH or mode == _CHUNK_DATA:
                if not buf:
                    break
                take = min(self._left, len(buf))
                out.append(bytes(buf[:take]))
                del buf[:take]
                self._left -= take
                if not self._left:
                    self._mode = _DONE if mode == _LENGTH else _CHUNK_END
            elif mode == _UNTIL_CLOSE:
                if buf:
                    out.append(bytes(buf))
                    buf.clear()
                if not self._eof:
                    return False
                self._mode = _DONE
            elif mode == _CHUNK_SIZE_LINE:
                eol = buf.find(b"\r\n", 0, _MAX_CHUNK_LINE)
                if eol < 0:
                    if len(buf) >= _MAX_CHUNK_LINE:
                        raise self._malformed("bad chunk header")
                    break
                size = _CHUNK_SIZE.fullmatch(buf, 0, eol)
                if size is None:
                    raise self._malformed("bad chunk size")
                self._left = int(size[1], 16)  # before the buffer changes under the match
                del buf[: eol + 2]
                self._mode = _CHUNK_DATA if self._left else _TRAILERS
            elif mode == _CHUNK_END:
                if len(buf) < 2:
                    break
                if buf[:2] != b"\r\n":
                    raise self._malformed("chunk not followed by CRLF")
                del buf[:2]
                self._mode = _CHUNK_SIZE_LINE
            else:  # _TRAILERS: header lines (normally none) up to an empty line
                eol = buf.find(b"\r\n")
                if eol < 0:
                    if len(buf) > MAX_HEAD_BYTES:
                        raise self._malformed("trailers too large")
                    break
                if eol:
                    _parse_headers(b"\r\n" + buf[:eol], 0, self._malformed)
                else:
                    self._mode = _DONE
                del buf[: eol + 2]
        if self._eof:
            raise self._cut(f"connection closed inside the {self._kind} body")
        return False


class ReplyParser(_Message):
    """The replies of one connection, one at a time: :meth:`expect_reply` per request, then
    :meth:`read_head` until it gives the head, then :meth:`read_body` until done.

    Raises :class:`MalformedReply` for what is not HTTP/1.1 and
    :class:`UpstreamUnavailable` when the connection ended inside a reply.
    """

    __slots__ = ("_keep_alive", "_no_body")

    _malformed = MalformedReply
    _cut = UpstreamUnavailable
    _kind = "reply"

    def __init__(self) -> None:
        super().__init__()
        self._keep_alive = False
        self._no_body = False

    def expect_reply(self, *, no_body: bool) -> None:
        """A request was sent; ``no_body``: its reply has no body whatever it says (HEAD)."""
        self._no_body = no_body
        self._mode = _NONE
        self._error = None

    @property
    def reusable(self) -> bool:
        """The reply is complete, both sides may go on, and no byte arrived unasked."""
        return self._mode == _DONE and self._keep_alive and not self.buffer and not self._eof

    def read_head(self) -> ReplyHead | None:
        """The reply head once complete (informational replies skipped); None: feed more."""
        while True:
            taken = self._take_head(MAX_HEAD_BYTES)
            if taken is None:
                if self._eof:
                    raise UpstreamUnavailable("connection closed before the reply head")
                return None
            head, first_end = taken
            status_line = _STATUS_LINE.fullmatch(head, 0, first_end)
            if status_line is None:
                raise MalformedReply("reply is not HTTP/1.x")
            status = int(status_line[2])
            headers = _parse_headers(head, first_end, MalformedReply)
            if 100 <= status < 200:
                if status == 101:
                    raise MalformedReply("the server switched protocols")
                continue
            if status < 100:
                raise MalformedReply(f"reply status {status} is not valid")
            self._frame(status, status_line[1] == b"1", headers)
            return ReplyHead(status, headers)

    def _frame(self, status: int, http11: bool, headers: list[tuple[bytes, bytes]]) -> None:
        length, chunked, close = self._framing(headers)
        self._keep_alive = http11 and not close
        if self._no_body or status in (204, 304):
            self._mode = _DONE
        elif chunked:
            self._mode = _CHUNK_SIZE_LINE
        elif length is not None:
            self._mode, self._left = (_LENGTH, length) if length else (_DONE, 0)
        else:
            self._mode = _UNTIL_CLOSE
            self._keep_alive = False


class RequestParser(_Message):
    """The requests of one server connection, one at a time: :meth:`read_head` until it gives
    the head, then :meth:`read_body` until done, then :meth:`read_head` for the next one
    (bytes of a pipelined request stay in the buffer).

    Raises :class:`BadRequest` (with the status to answer) for what is not an HTTP/1.x
    request, and :class:`ClientGone` when the connection ended inside a request. As strict
    as h11's server side (checked against it by the tests), and stricter in one place: a
    request with both Content-Length and chunked coding is refused (a smuggling vector).
    """

    __slots__ = ("_max_head",)

    _malformed = BadRequest
    _cut = ClientGone
    _kind = "request"

    def __init__(self, max_head_bytes: int = MAX_HEAD_BYTES) -> None:
        super().__init__()
        self._max_head = max_head_bytes

    def _not_chunked(self) -> Exception:
        return BadRequest("only Transfer-Encoding: chunked is supported", 501)

    def _too_large(self) -> Exception:
        return BadRequest("request head too large", 431)

    def read_head(self) -> RequestHead | None:
        """The next request head once complete; None: feed more, or (``at_eof``) the client
        closed the connection between requests."""
        if self._mode != _DONE:
            raise RuntimeError("read_head before the previous request body was read")
        taken = self._take_head(self._max_head)
        if taken is None:
            if self._eof and self.buffer:
                raise ClientGone("connection closed inside a request head")
            return None
        head, first_end = taken
        line = _REQUEST_LINE.fullmatch(head, 0, first_end)
        if line is None:
            raise BadRequest("not an HTTP/1.x request line")
        http11 = line[3] == b"1"
        headers = _parse_headers(head, first_end, BadRequest)
        length, chunked, close = self._framing(headers)
        if chunked and length is not None:
            raise BadRequest("both Content-Length and Transfer-Encoding")
        hosts = 0
        expects_continue = False
        for name, value in headers:
            if name == b"host":
                hosts += 1
            elif name == b"expect" and value.lower() == b"100-continue":
                expects_continue = http11
        if hosts > 1 or (http11 and not hosts):
            raise BadRequest("a request needs exactly one Host header")
        if chunked:
            self._mode = _CHUNK_SIZE_LINE
        elif length:
            self._mode, self._left = _LENGTH, length
        else:
            self._mode = _DONE
        return RequestHead(line[1], line[2], http11, headers, http11 and not close,
                           expects_continue and self._mode != _DONE, None if chunked else length or 0)


def _parse_headers(head: bytes, start: int, error: type[Exception]) -> list[tuple[bytes, bytes]]:
    """The header lines of ``head`` from ``start`` (each line led by CRLF), names lowercased."""
    if _HEADER_LINES.fullmatch(head, start) is None:
        raise error("malformed header line")
    headers = []
    for line in head[start + 2:].split(b"\r\n") if start < len(head) else ():
        name, _, value = line.partition(b":")
        headers.append((name.lower(), value.strip(b" \t")))
    return headers
