"""The lean server's ``send_nowait`` ASGI extension, on real loopback sockets: a chunk the
socket does not take whole is kept and goes out first with the next ``send``."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, MutableMapping
from functools import partial
from typing import Any

import httpx
import trio

from pixiu_kv.sim._http_server import SEND_NOWAIT, HttpServerConfig, SendNowait, serve_asgi

Message = MutableMapping[str, Any]


async def test_a_chunk_the_socket_refuses_is_sent_before_the_next_one() -> None:
    big = bytes(range(256)) * (64 * 1024)  # 16 MiB: more than a loopback socket takes at once
    results: list[bool] = []

    async def app(scope: Message, receive: Callable[[], Awaitable[Message]],
                  send: Callable[[Message], Awaitable[None]]) -> None:
        send_nowait: SendNowait = scope["extensions"][SEND_NOWAIT]
        await receive()
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"application/octet-stream")]})
        results.append(send_nowait(b"first;"))
        results.append(send_nowait(big))
        if not results[-1]:
            await send({"type": "http.response.body", "body": b"", "more_body": True})  # the flush
        await send({"type": "http.response.body", "body": b";last", "more_body": False})

    reply = await _get_once(app)
    assert reply.status_code == 200
    assert reply.content == b"first;" + big + b";last"
    assert results == [True, False]


async def test_send_nowait_outside_a_streamed_body_is_refused() -> None:
    errors: list[str] = []

    async def app(scope: Message, receive: Callable[[], Awaitable[Message]],
                  send: Callable[[Message], Awaitable[None]]) -> None:
        send_nowait: SendNowait = scope["extensions"][SEND_NOWAIT]
        try:
            send_nowait(b"too early")
        except RuntimeError as error:
            errors.append(str(error))
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]})
        await send({"type": "http.response.body", "body": b"ok"})

    reply = await _get_once(app)
    assert reply.content == b"ok"
    assert len(errors) == 1


async def _get_once(app: Callable[..., Awaitable[None]]) -> httpx.Response:
    """Serve ``app`` on the lean server (port 0), GET / once, stop the server."""
    stop = trio.Event()
    async with trio.open_nursery() as nursery:
        urls: list[str] = await nursery.start(
            partial(serve_asgi, app, HttpServerConfig(), shutdown_trigger=stop.wait))
        with trio.fail_after(10):
            async with httpx.AsyncClient() as client:
                reply = await client.get(urls[0] + "/")
        stop.set()
    return reply
