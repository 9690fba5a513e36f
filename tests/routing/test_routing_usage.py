"""Reading the engine's usage report from forwarded response bytes."""

from __future__ import annotations

import json

import pytest

from pixiu_kv.routing import Usage, UsageScanner, session_key_of


def _scan(*chunks: bytes) -> Usage | None:
    scanner = UsageScanner()
    for chunk in chunks:
        scanner.feed(chunk)
    return scanner.result()


def _event(payload: object) -> bytes:
    return b"data: " + json.dumps(payload).encode() + b"\n\n"


def test_json_body() -> None:
    body = json.dumps({"id": "x", "choices": [{"text": "hi " * 20_000}],
                       "usage": {"prompt_tokens": 1200, "completion_tokens": 5, "total_tokens": 1205,
                                 "prompt_tokens_details": {"cached_tokens": 1024}}}).encode()
    # Split anywhere, and longer than the kept tail: usage is at the end.
    assert _scan(body[:7], body[7:50_000], body[50_000:]) == Usage(1200, 1024, 5)


def test_stream_with_include_usage() -> None:
    chunks = [_event({"choices": [{"delta": {"content": "a"}}], "usage": None}) for _ in range(50)]
    chunks.append(_event({"choices": [], "usage": {"prompt_tokens": 300, "completion_tokens": 50,
                                                   "prompt_tokens_details": {"cached_tokens": 256}}}))
    chunks.append(b"data: [DONE]\n\n")
    stream = b"".join(chunks)
    assert _scan(*(stream[i:i + 100] for i in range(0, len(stream), 100))) == Usage(300, 256, 50)


@pytest.mark.parametrize(("payload", "expected"), [
    ({"usage": {"prompt_tokens": 10}}, Usage(10, None)),  # no prompt details
    ({"usage": {"prompt_tokens": 10, "prompt_tokens_details": None}}, Usage(10, None)),
    ({"usage": {"prompt_tokens": -1, "prompt_tokens_details": {"cached_tokens": True}}}, Usage(None, None)),
    ({"usage": {"completion_tokens": "7"}}, Usage(None, None, None)),
    ({"choices": []}, None),
])
def test_partial_or_absent_reports(payload: object, expected: Usage | None) -> None:
    assert _scan(json.dumps(payload).encode()) == expected


def test_a_stream_without_usage_and_garbage() -> None:
    assert _scan(_event({"choices": [], "usage": None}), b"data: [DONE]\n\n") is None
    assert _scan(b'\xff\xfe"usage": {broken') is None
    assert _scan(b"") is None


@pytest.mark.parametrize(("headers", "body", "expected"), [
    ([(b"X-Session-Id", b" abc ")], {"user": "u1"}, "abc"),
    ([(b"x-session-id", b"")], {"user": "u1"}, "u1"),
    ([], {"user": "  "}, None),
    ([], {"user": 7}, None),
    ([], ["not", "a", "dict"], None),
    ([(b"x-session-id", b"k" * 1000)], None, "k" * 256),
])
def test_session_key_comes_from_the_header_then_the_body_user(
        headers: list[tuple[bytes, bytes]], body: object, expected: str | None) -> None:
    assert session_key_of(headers, body, "x-session-id") == expected
