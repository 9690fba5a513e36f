"""Reading a request body from ASGI messages: whole, bounded, refused early, disconnects."""

from __future__ import annotations

from typing import Any

import pytest

from pixiu_kv._asgi import BodyTooLarge, read_body, receive_body
from pixiu_kv.errors import GatewayError


class Messages:
    """An ASGI ``receive`` that plays a fixed list of messages and counts the calls."""

    def __init__(self, *messages: dict[str, Any]) -> None:
        self.messages = list(messages)
        self.calls = 0

    async def __call__(self) -> dict[str, Any]:
        self.calls += 1
        return self.messages.pop(0)


def part(body: bytes, more: bool) -> dict[str, Any]:
    return {"type": "http.request", "body": body, "more_body": more}


async def test_pieces_are_joined() -> None:
    receive = Messages(part(b"ab", True), part(b"", True), part(b"cd", False))
    assert await receive_body(receive, 4) == b"abcd"
    assert await receive_body(Messages({"type": "http.request"}), 4) == b""


async def test_disconnect_before_the_end_gives_none() -> None:
    assert await receive_body(Messages(part(b"ab", True), {"type": "http.disconnect"}), 10) is None


async def test_declared_length_over_the_limit_is_refused_unread() -> None:
    receive = Messages(part(b"abcde", False))
    with pytest.raises(BodyTooLarge) as caught:
        await receive_body(receive, 4, content_length=5)
    assert caught.value.limit == 4 and "4 bytes" in str(caught.value)
    assert receive.calls == 0


async def test_received_bytes_over_the_limit_stop_the_reading() -> None:
    receive = Messages(part(b"abc", True), part(b"de", True), part(b"never read", False))
    with pytest.raises(BodyTooLarge):
        await receive_body(receive, 4)
    assert receive.calls == 2


async def test_the_proxied_path_answers_413_in_openai_shape() -> None:
    with pytest.raises(GatewayError) as caught:
        await read_body(Messages(part(b"abcde", False)), 4, None)
    assert caught.value.status == 413 and caught.value.code == "request_too_large"
