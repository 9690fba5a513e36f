"""Helpers shared by the simulated engine tests."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence

import trio


class RecordingSink:
    """A ChunkSink that remembers every report, in order."""

    def __init__(self) -> None:
        self.admitted: list[int] = []
        self.evicted: list[int] = []

    def admit(self, keys: Sequence[int]) -> None:
        self.admitted.extend(keys)

    def evict(self, keys: Sequence[int]) -> None:
        self.evicted.extend(keys)

    def held(self) -> set[int]:
        held: set[int] = set()
        for key in self.admitted:
            held.add(key)
        for key in self.evicted:
            held.discard(key)
        return held


def words(count: int, salt: str = "") -> str:
    """Distinct English-ish text: ``count`` words, each one token or two."""
    return " ".join(f"w{salt}{i}x" for i in range(count))


def sse_events(raw: str) -> list[str]:
    """The payloads of a complete SSE body, checking every event is exactly ``data: X\\n\\n``."""
    assert raw.endswith("\n\n"), raw[-50:]
    events = raw[:-2].split("\n\n")
    payloads = []
    for event in events:
        assert event.startswith("data: ") and "\n" not in event, event
        payloads.append(event[len("data: "):])
    return payloads


async def wait_until(condition: Callable[[], bool], within: float = 5.0) -> None:
    """Wait (bounded) for a condition on in-process state another task changes.

    The engine's counters are plain attributes with no event to wait on, hence the poll.
    """
    with trio.fail_after(within):
        while not condition():  # noqa: ASYNC110
            await trio.sleep(0.005)


async def open_raw_stream(url: str, path: str, body: dict[str, object]) -> trio.SocketStream:
    """POST ``body`` as JSON on a bare socket and return the socket (the reply unread).

    Lets a test leave mid-reply by closing the socket, with no client library in between.
    """
    host, port = url.removeprefix("http://").rsplit(":", 1)
    stream = await trio.open_tcp_stream(host, int(port))
    data = json.dumps(body).encode()
    head = (f"POST {path} HTTP/1.1\r\nhost: {host}\r\ncontent-type: application/json\r\n"
            f"content-length: {len(data)}\r\n\r\n").encode()
    await stream.send_all(head + data)
    return stream
