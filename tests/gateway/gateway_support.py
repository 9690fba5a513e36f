"""Support for gateway tests: a small vLLM-like engine served by hypercorn on 127.0.0.1:0.

The engine is raw ASGI so tests can make it misbehave precisely (fail with 503, hang before
its headers, hang mid-stream, stream forever) and count, on the server side, the requests
still open and the TCP connections still established.
"""

from __future__ import annotations

import json
import math
import ssl
from collections.abc import Awaitable, Callable
from typing import Any

import httpx
import psutil
import trio

from pixiu_kv._asgi import serve_lifespan
from pixiu_kv.config import GatewayConfig, loads_config
from pixiu_kv.context import RequestContext, RouteHint

Scope = dict[str, Any]


class FakeEngine:
    """A vLLM-shaped engine. Per-request behaviour via the ``x-test-mode`` header:

    ``hang-headers`` (never answers), ``hang-body`` (headers, then nothing),
    ``endless`` (an SSE event every few ms until the client leaves), ``status-<code>``,
    ``close`` (answers with ``Connection: close``), ``die-mid-stream`` (two events, then the
    connection breaks), ``slow-<seconds>`` (a pause after each event).
    Engine-wide: ``fail_next`` answers 503 that many times; ``healthy`` drives /health.
    """

    def __init__(self, name: str, models: tuple[str, ...] = ("demo",)) -> None:
        self.name = name
        self.models = models
        self.url = ""
        self.port = 0
        self.healthy = True
        self.fail_next = 0
        self.fail_status = 503
        self.open_requests = 0
        self.requests: list[dict[str, Any]] = []
        self.health_checks = 0
        self.stream_chunks = 5
        self.stop = trio.Event()

    # -- observations --------------------------------------------------------------------

    @property
    def completions(self) -> int:
        return sum(1 for r in self.requests if r["path"] != "/health")

    def established_connections(self) -> int:
        """Server-side TCP connections to this engine that are still open."""
        return sum(
            1 for c in psutil.Process().net_connections(kind="tcp")
            if c.laddr and c.laddr.port == self.port and c.status == psutil.CONN_ESTABLISHED
        )

    # -- ASGI ------------------------------------------------------------------------------

    async def __call__(self, scope: Scope, receive: Callable[[], Awaitable[Any]],
                       send: Callable[[Any], Awaitable[None]]) -> None:
        if scope["type"] == "lifespan":
            await serve_lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        self.open_requests += 1
        try:
            await self._http(scope, receive, send)
        finally:
            self.open_requests -= 1

    async def _http(self, scope: Scope, receive: Callable[[], Awaitable[Any]],
                    send: Callable[[Any], Awaitable[None]]) -> None:
        headers = {k.decode().lower(): v.decode() for k, v in scope["headers"]}
        body = b""
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        path = scope["path"]
        if path == "/health":
            self.health_checks += 1
            await _reply(send, 200 if self.healthy else 503, b"")
            return
        self.requests.append({"path": path, "headers": headers, "body": body,
                              "query": scope["query_string"], "client_port": scope["client"][1]})
        if path == "/v1/models":
            await _reply_json(send, 200, {"object": "list", "data": [
                {"id": m, "object": "model", "created": 0, "owned_by": "vllm", "root": m,
                 "parent": None, "max_model_len": 4096} for m in self.models]})
            return
        mode = headers.get("x-test-mode", "")
        if self.fail_next > 0:
            self.fail_next -= 1
            await _reply_json(send, self.fail_status, _error(f"{self.name} overloaded", self.fail_status))
            return
        if mode == "close":
            body = json.dumps({"id": "x", "object": "text_completion", "choices": []}).encode()
            await send({"type": "http.response.start", "status": 200, "headers": [
                (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                (b"connection", b"close")]})
            await send({"type": "http.response.body", "body": body, "more_body": False})
            return
        if mode.startswith("status-"):
            code = int(mode.removeprefix("status-"))
            await _reply_json(send, code, _error(f"{self.name} says {code}", code))
            return
        if mode == "hang-headers":
            await _wait_disconnect(receive)
            return
        request = json.loads(body) if body else {}
        if path == "/tokenize":
            await _reply_json(send, 200, {"count": 3, "max_model_len": 4096, "tokens": [1, 2, 3],
                                          "token_strs": None})
            return
        chat = path == "/v1/chat/completions"
        if request.get("stream"):
            await self._stream(send, receive, request, chat, mode)
            return
        text = f"hello from {self.name}"
        choice: dict[str, Any] = (
            {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
             "finish_reason": "stop", "stop_reason": None}
            if chat else
            {"index": 0, "text": text, "logprobs": None, "finish_reason": "stop", "stop_reason": None}
        )
        await _reply_json(send, 200, {
            "id": f"cmpl-{self.name}-{len(self.requests)}",
            "object": "chat.completion" if chat else "text_completion",
            "created": 0, "model": request.get("model", "demo"), "choices": [choice],
            "usage": {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7,
                      "prompt_tokens_details": None},
        })

    async def _stream(self, send: Callable[[Any], Awaitable[None]], receive: Callable[[], Awaitable[Any]],
                      request: dict[str, Any], chat: bool, mode: str) -> None:
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"text/event-stream")]})
        if mode == "hang-body":
            await _wait_disconnect(receive)
            return
        count = math.inf if mode == "endless" else self.stream_chunks
        if mode == "die-mid-stream":
            count = 2
        disconnected = trio.Event()

        async def watch() -> None:
            await _wait_disconnect(receive)
            disconnected.set()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(watch)
            i = 0
            while i < count and not disconnected.is_set():
                if chat:
                    delta = {"role": "assistant", "content": ""} if i == 0 else {"content": f"t{i}"}
                    chunk = {"id": f"chat-{self.name}", "object": "chat.completion.chunk", "created": 0,
                             "model": request.get("model", "demo"),
                             "choices": [{"index": 0, "delta": delta, "logprobs": None,
                                          "finish_reason": None}]}
                else:
                    chunk = {"id": f"cmpl-{self.name}", "object": "text_completion", "created": 0,
                             "model": request.get("model", "demo"),
                             "choices": [{"index": 0, "text": f"t{i}", "logprobs": None,
                                          "finish_reason": None}]}
                await send({"type": "http.response.body",
                            "body": b"data: " + json.dumps(chunk).encode() + b"\n\n", "more_body": True})
                i += 1
                if mode == "endless":
                    await trio.sleep(0.005)
                elif mode.startswith("slow-"):
                    await trio.sleep(float(mode.removeprefix("slow-")))
            if mode == "die-mid-stream":
                raise RuntimeError("engine crashed mid-stream (test)")
            if not disconnected.is_set():
                await send({"type": "http.response.body", "body": b"data: [DONE]\n\n", "more_body": False})
            nursery.cancel_scope.cancel()


def _error(message: str, code: int) -> dict[str, Any]:
    return {"error": {"message": message, "type": "ServiceUnavailable", "param": None, "code": code}}


async def _wait_disconnect(receive: Callable[[], Awaitable[Any]]) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


async def _reply(send: Callable[[Any], Awaitable[None]], status: int, body: bytes,
                 content_type: bytes = b"text/plain") -> None:
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", content_type), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body, "more_body": False})


async def _reply_json(send: Callable[[Any], Awaitable[None]], status: int, payload: Any) -> None:
    await _reply(send, status, json.dumps(payload).encode(), b"application/json")


EngineFactory = Callable[..., Awaitable[FakeEngine]]





def gateway_toml(engines: list[FakeEngine], *, cluster: str = "", endpoint: str = "",
                 proxy: str = "", top: str = "", health: str = "enabled = false") -> str:
    """A gateway configuration over ``engines`` (one cluster ``main``), as TOML text."""
    endpoints = "\n".join(
        f'[[clusters.endpoints]]\nid = "{e.name}"\naddress = "{e.url}"\n{endpoint}\n' for e in engines)
    return f"""
{top}
[listener]
graceful_timeout = "1s"

[[clusters]]
name = "main"
{cluster}

[clusters.health_check]
{health}

{endpoints}

[[http_filters]]
name = "dgp.filter.llm.proxy"
[http_filters.config]
{proxy}
"""


def gateway_config(engines: list[FakeEngine], **kwargs: str) -> GatewayConfig:
    return loads_config(gateway_toml(engines, **kwargs))


async def wait_until(condition: Callable[[], bool], *, within: float = 10.0) -> None:
    """Poll ``condition`` until it holds; fail the test if it does not within ``within`` s.

    Polling, because some conditions (TCP connection states) have no event to wait on.
    """
    with trio.fail_after(within):
        while not condition():  # noqa: ASYNC110
            await trio.sleep(0.01)


_PLAIN_TLS = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)


def client(url: str, **kwargs: Any) -> httpx.AsyncClient:
    """A test client (plain http only: a shared TLS context spares loading certificates)."""
    return httpx.AsyncClient(base_url=url, timeout=httpx.Timeout(10.0), verify=_PLAIN_TLS, **kwargs)


class PreferFromBody:
    """A decode filter standing in for the kvcache filter: prefers ``body["prefer"]``."""

    def __init__(self) -> None:
        self.seen_on_entry: list[str | None] = []

    async def decode(self, ctx: RequestContext) -> None:
        self.seen_on_entry.append(ctx.preferred_endpoint_id)
        prefer = ctx.json.get("prefer")
        if isinstance(prefer, str):
            ctx.preferred_endpoint_id = prefer
            ctx.route_hint = RouteHint(prefer, "test", matched_tokens=5, prompt_tokens=9)
