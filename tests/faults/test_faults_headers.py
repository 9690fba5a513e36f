"""Header injection: CR/LF, hop-by-hop headers and spoofed ``x-pixiu-kv-*`` headers, in
both directions, against an engine that echoes what it received."""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator, MutableMapping
from functools import partial
from typing import Any
from urllib.parse import urlsplit

import hypercorn.config
import hypercorn.trio
import pytest
import trio
from faults_support import Stack, chat, open_stack, prompt, stream_chat

from pixiu_kv.sim.fleet import Fleet

ENGINE_HEADERS = [
    (b"content-type", b"application/json"),
    (b"x-pixiu-kv-route", b"reason=spoofed-by-engine"),
    (b"x-pixiu-kv-endpoint", b"spoofed"),
    (b"keep-alive", b"timeout=99"),
    (b"proxy-authenticate", b"Basic realm=x"),
    (b"connection", b"x-engine-hop"),
    (b"x-engine-hop", b"1"),
    (b"x-engine-ok", b"kept"),
]


async def echo_engine(scope: MutableMapping[str, Any], receive: Any, send: Any) -> None:
    """An engine that answers every request with the headers it received."""
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            await send({"type": message["type"] + ".complete"})
            if message["type"] == "lifespan.shutdown":
                return
    while (await receive()).get("more_body"):
        pass
    received = [[k.decode("latin-1"), v.decode("latin-1")] for k, v in scope["headers"]]
    body = json.dumps({"headers": received}).encode()
    await send({"type": "http.response.start", "status": 200,
                "headers": [*ENGINE_HEADERS, (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


@pytest.fixture
async def echo_stack(nursery: trio.Nursery) -> AsyncIterator[Stack]:
    config = hypercorn.config.Config()
    config.bind = ["127.0.0.1:0"]
    config.accesslog = None
    config.errorlog = None
    stop = trio.Event()
    binds = await nursery.start(partial(hypercorn.trio.serve, echo_engine, config,  # type: ignore[arg-type]
                                        shutdown_trigger=stop.wait))

    def endpoints(_: Fleet) -> list[tuple[str, str]]:
        return [("echo", binds[0])]

    async with open_stack(1, endpoints=endpoints) as running:
        yield running
    stop.set()


async def test_spoofed_and_hop_by_hop_request_headers_are_not_forwarded(echo_stack: Stack) -> None:
    response = await echo_stack.client.post("/v1/chat/completions", json=chat("hi", stream=False), headers={
        "x-pixiu-kv-route": "reason=spoofed-by-client",
        "x-pixiu-kv-endpoint": "engine-9",
        "x-pixiu-kv-anything": "1",
        "connection": "keep-alive, x-client-hop",
        "x-client-hop": "secret",
        "keep-alive": "timeout=1",
        "te": "trailers",
        "proxy-authorization": "Basic Zm9vOmJhcg==",
        "x-client-ok": "kept",
    })
    assert response.status_code == 200
    seen = {k for k, _ in response.json()["headers"]}
    for name in ("x-pixiu-kv-route", "x-pixiu-kv-endpoint", "x-pixiu-kv-anything", "x-client-hop",
                 "keep-alive", "te", "proxy-authorization"):
        assert name not in seen, name
    assert "x-client-ok" in seen
    assert "x-request-id" in seen


async def test_engine_cannot_spoof_the_gateway_headers(echo_stack: Stack) -> None:
    response = await echo_stack.client.post("/v1/chat/completions", json=chat("hi", stream=False))
    assert response.status_code == 200
    headers = response.headers
    assert headers.get_list("x-pixiu-kv-endpoint") == ["echo"]
    assert all("spoofed" not in v for v in headers.get_list("x-pixiu-kv-route"))
    for name in ("keep-alive", "proxy-authenticate", "x-engine-hop"):
        assert name not in headers, name
    assert headers["x-engine-ok"] == "kept"


async def test_client_cannot_choose_the_endpoint_with_a_header(stack: Stack) -> None:
    for _ in range(4):
        result = await stream_chat(stack.client, chat("pick me"),
                                   headers={"x-pixiu-kv-endpoint": "engine-1"})
        assert result.status == 200
    # Round robin over two engines, regardless of the header.
    served = {(await stream_chat(stack.client, chat("x"), headers={"x-pixiu-kv-endpoint": "engine-1"})
               ).headers["x-pixiu-kv-endpoint"] for _ in range(4)}
    assert served == {"engine-0", "engine-1"}


@pytest.mark.parametrize("raw_header", [
    b"x-evil: a\rinjected: yes",
    b"x-evil: a\ninjected: yes",
    b"x-evil: a\x00b",
    b"x-evil: ok\r\n folded: continuation",
    b"bad header name: x",
], ids=["cr", "lf", "nul", "obs-fold", "space-in-name"])
async def test_cr_lf_and_malformed_headers_never_reach_an_engine(echo_stack: Stack,
                                                                 raw_header: bytes) -> None:
    url = urlsplit(echo_stack.url)
    body = json.dumps(chat("x", stream=False)).encode()
    conn = await trio.open_tcp_stream(url.hostname or "127.0.0.1", url.port or 80)
    try:
        await conn.send_all(b"POST /v1/chat/completions HTTP/1.1\r\nhost: gw\r\nconnection: close\r\n"
                            + raw_header + b"\r\ncontent-type: application/json\r\ncontent-length: "
                            + str(len(body)).encode() + b"\r\n\r\n" + body)
        received = b""
        with trio.fail_after(20):
            while True:
                chunk = await conn.receive_some(65536)
                if not chunk:
                    break
                received += chunk
    finally:
        await conn.aclose()
    if received.startswith(b"HTTP/1.1 200"):
        # The HTTP layer accepted it as ordinary headers (a bare LF ends a line; an obs-fold
        # is unfolded into one value): what the engine got must be clean header lines.
        forwarded = json.loads(received.split(b"\r\n\r\n", 1)[1])["headers"]
        for name, value in forwarded:
            assert not re.search(r"[\r\n\x00]", name + value), (name, value)
    else:
        # Refused by the HTTP layer (or the connection dropped), never forwarded.
        assert received == b"" or received.startswith(b"HTTP/1.1 400"), received[:80]
    ok = await echo_stack.client.post("/v1/chat/completions", json=chat("still serving", stream=False))
    assert ok.status_code == 200


async def test_request_id_must_be_a_plain_token(stack: Stack) -> None:
    good = await stack.client.post("/v1/chat/completions", json=chat("x", stream=False),
                                   headers={"x-request-id": "req-42.a_b:c"})
    assert good.headers["x-request-id"] == "req-42.a_b:c"
    bad = await stack.client.post("/v1/chat/completions", json=chat("x", stream=False),
                                  headers={"x-request-id": "<script>alert(1)</script> x"})
    assert re.fullmatch(r"[0-9a-f]{24}", bad.headers["x-request-id"])


async def test_every_proxied_response_explains_its_route() -> None:
    async with open_stack(kvcache=False) as stack:
        result = await stream_chat(stack.client, chat("no filter, no hint"))
        assert result.status == 200
        assert result.route == {"reason": "no_hint", "hinted": "-", "used": "no",
                                "endpoint": result.headers["x-pixiu-kv-endpoint"]}
    async with open_stack() as stack:
        text = prompt("explained")
        routed = await stack.warm(text)
        assert routed.route["endpoint"] == routed.route["hinted"] == routed.headers["x-pixiu-kv-endpoint"]
        assert int(routed.route["prompt"]) > int(routed.route["matched"]) > 0
        # An engine answer passed on after failover carries it too.
        for index in (0, 1):
            stack.engine(index).set_faults(dead=True)
        response = await stack.client.post("/v1/chat/completions", json=chat(text, stream=False))
        assert response.status_code == 503
        assert "reason=" in response.headers["x-pixiu-kv-route"]
